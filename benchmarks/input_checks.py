"""What the runtimes' argument checks (crnet/model/inputs.py) cost per call, in microseconds of CPU time:
an episode's and a cached-prompt query's, 1-shot, batch 1, at r50's input size (321) unless --size says
another (tiny: 129), with the masks off the CPU (a GPU's: their values are not read) and on it (read).

    python benchmarks/input_checks.py [--size 321] [--calls 20000]
"""

from __future__ import annotations

import timeit

from crnet.commands.script_args import OneLineParser, count, run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch

    from crnet.model.crnet import SupportPrompt
    from crnet.model.inputs import check_episode, check_images, check_prompt

CHANNELS = 256


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=count(1, 10**7), default=20000, help="calls timed (default 20000)")
    parser.add_argument("--size", type=count(8, 4096), default=321, help="image side (default 321)")
    args = parser.parse_args()
    size = args.size
    query, supports = torch.randn(1, 3, size, size), torch.randn(1, 1, 3, size, size)
    masks = torch.zeros(1, 1, size, size, dtype=torch.long)
    masks[..., size // 4 : size // 2, size // 4 : size // 2] = 1
    prompt = SupportPrompt(torch.zeros(1, CHANNELS), torch.zeros(1, CHANNELS))
    off_cpu = masks.to("meta")  # as a GPU's masks: shapes only
    cases = {
        "episode, masks off the CPU": lambda: check_episode(query, supports, off_cpu, size),
        "episode, masks on the CPU": lambda: check_episode(query, supports, masks, size),
        "cached-prompt query": lambda: (check_images(query, size=size), check_prompt(prompt, 1)),
    }
    print(f"| checks | us per call ({args.calls} calls) |\n|---|---|")
    for name, call in cases.items():
        print(f"| {name} | {timeit.timeit(call, number=args.calls) / args.calls * 1e6:.2f} |")


if __name__ == "__main__":
    run(main)
