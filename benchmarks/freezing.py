"""Does inductor's freezing pay for crnet's compiled torch rows? Each spec is opened twice, compiled with and
without freezing, and the two time the same random episode alternately (wall time; GPU time on a GPU).

    python benchmarks/freezing.py CHECKPOINT --spec torch:fp32+compile [--spec ...] [--device cuda|cpu]
        [--batch 1] [--repeats 20]
"""

from __future__ import annotations

from crnet.commands.script_args import OneLineParser, count, run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch

    from crnet.checkpoint import load
    from crnet.commands.timer import Timer, medians_in_turns
    from crnet.config import MAX_BATCH
    from crnet.device import resolve_device
    from crnet.engines import RuntimeSpec, torch_options
    from crnet.engines.torch_runtime import TorchRuntime


def open_twice(spec: RuntimeSpec, checkpoint: str, device: str) -> dict[str, TorchRuntime]:
    options = torch_options(spec)
    return {
        name: TorchRuntime(checkpoint, device=device, freeze=name == "frozen", **options)
        for name in ("frozen", "plain")
    }


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--spec", action="append", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=count(1, MAX_BATCH), default=1)
    parser.add_argument("--repeats", type=count(1), default=20)
    args = parser.parse_args()
    device = resolve_device(args.device)
    specs = [RuntimeSpec.parse(text) for text in args.spec]  # bad input before the table starts
    load(args.checkpoint)
    timer = Timer(device)
    print(f"episode median ms, batch {args.batch}, 1-shot, {device}")
    print("| spec | plain | frozen | plain / frozen | max logit difference |")
    print("|---|---|---|---|---|")
    for text, spec in zip(args.spec, specs, strict=True):
        runtimes = open_twice(spec, args.checkpoint, str(device))
        size = runtimes["plain"].input_size
        torch.manual_seed(0)
        query = torch.randn(args.batch, 3, size, size, device=device)
        supports = torch.randn(args.batch, 1, 3, size, size, device=device)
        masks = (torch.rand(args.batch, 1, size, size, device=device) > 0.5).long()
        # Frozen first: dynamo would serve a frozen runtime the unfrozen graph compiled before it (its guards
        # do not see the setting), while a frozen graph's guards on its weights keep it to its own runtime.
        results = {
            name: [runtime.episode(query, supports, masks) for _ in range(3)][-1]
            for name, runtime in runtimes.items()
        }  # compile, capture, warm
        calls = {
            name: (lambda r=runtime, e=(query, supports, masks): r.episode(*e))
            for name, runtime in runtimes.items()
        }
        medians = medians_in_turns(calls, timer, args.repeats, gpu=True)
        plain, frozen = medians["plain"], medians["frozen"]
        error = (results["plain"] - results["frozen"]).abs().max().item()
        print(f"| {text} | {plain:.2f} | {frozen:.2f} | {plain / frozen:.2f}x | {error:.1e} |")


if __name__ == "__main__":
    run(torch.inference_mode()(main))
