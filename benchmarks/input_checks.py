"""What the runtimes' argument checks (crnet/model/inputs.py) cost per call, in microseconds of CPU time:
an episode's and a cached-prompt query's, at the r50 shapes (321x321, 1-shot, batch 1), with the masks
off the CPU (a GPU's: their values are not read) and on it (values read).

    python benchmarks/input_checks.py [--calls 20000]
"""

from __future__ import annotations

import timeit

from crnet.commands.script_args import OneLineParser, count, run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch

    from crnet.model.crnet import SupportPrompt
    from crnet.model.inputs import check_episode, check_images, check_prompt

SIZE, CHANNELS = 321, 256


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=count(1, 10**7), default=20000, help="calls timed (default 20000)")
    args = parser.parse_args()
    query, supports = torch.randn(1, 3, SIZE, SIZE), torch.randn(1, 1, 3, SIZE, SIZE)
    masks = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.long)
    masks[..., 100:200, 100:200] = 1
    prompt = SupportPrompt(torch.zeros(1, CHANNELS), torch.zeros(1, CHANNELS))
    off_cpu = masks.to("meta")  # as a GPU's masks: shapes only
    cases = {
        "episode, masks off the CPU": lambda: check_episode(query, supports, off_cpu, SIZE),
        "episode, masks on the CPU": lambda: check_episode(query, supports, masks, SIZE),
        "cached-prompt query": lambda: (check_images(query, size=SIZE), check_prompt(prompt, 1)),
    }
    print(f"| checks | us per call ({args.calls} calls) |\n|---|---|")
    for name, call in cases.items():
        print(f"| {name} | {timeit.timeit(call, number=args.calls) / args.calls * 1e6:.2f} |")


if __name__ == "__main__":
    run(main)
