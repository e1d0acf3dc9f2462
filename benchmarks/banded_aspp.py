"""The ASPP's three dilated branches alone (dilations 6, 12, 18 on the r50 head's 256 x 41 x 41 map): the
padded convolutions against the banded ones that skip the taps reading only padding
(crnet/model/banded_conv.py), each with its ReLU (cuDNN's fused epilogue on a GPU, as in the deployed row),
eager and compiled, and each branch alone (eager); GPU time per call on a GPU, wall time on a CPU, timed in
turns.

    python benchmarks/banded_aspp.py [--batch 1 --batch 64] [--device cuda]

Random weights and features, FP16 channels-last (FP32 on a CPU). The max difference is against the padded
convolutions in float64.
"""

from __future__ import annotations

from crnet.commands.script_args import count, run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch
    from layer_bench import layer_bench_arguments, script_parser
    from torch import nn

    from crnet.commands.timer import Timer, medians_in_turns
    from crnet.model.banded_conv import BandedConv
    from crnet.model.conv_epilogues import ConvReLU

DILATIONS = (6, 12, 18)  # the r50 preset's


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--channels", type=count(1, 4096), default=256)
    args, device, dtype = layer_bench_arguments(__doc__, "feature maps per call (repeatable)", 41, parser)
    torch.manual_seed(0)
    size, channels = (args.size, args.size), args.channels
    padded = [nn.Conv2d(channels, channels, 3, padding=d, dilation=d).to(device) for d in DILATIONS]
    fused = [ConvReLU.of(conv) for conv in padded]
    banded = [BandedConv.of(conv, size) for conv in fused]
    branches = {"padded": nn.ModuleList(fused), "banded": nn.ModuleList(banded)}
    branches = {
        name: m.to(dtype).to(memory_format=torch.channels_last).eval() for name, m in branches.items()
    }
    # name: (call on the features, the branches it computes, the row it is compared with)
    variants = {
        name: (lambda x, m=m: [branch(x) for branch in m], [0, 1, 2], "padded")
        for name, m in branches.items()
    }
    if not args.no_compile:
        variants |= {
            f"{name}, compiled": (torch.compile(f, dynamic=False), which, "padded")
            for name, (f, which, _) in list(variants.items())
        }
    for i, dilation in enumerate(DILATIONS):  # each branch alone, eager: what the padding costs each
        for name, m in branches.items():
            variants[f"dilation {dilation} alone, {name}"] = (
                lambda x, b=m[i]: [b(x)],
                [i],
                f"dilation {dilation} alone, padded",
            )
    timer = Timer(device)
    print(f"ASPP dilated branches (6, 12, 18), {channels} x {args.size} x {args.size}, {dtype}, on {device}")
    print("| batch | variant | ms per call | vs padded | max abs difference |")
    print("|---|---|---|---|---|")
    for batch in args.batch or [1, 64]:
        features = torch.randn(batch, channels, *size, device=device)
        with torch.no_grad():
            reference = [
                nn.functional.conv2d(
                    features.double(), c.weight.double(), c.bias.double(), 1, c.padding, c.dilation
                ).relu()
                for c in padded
            ]
        features = features.to(dtype).contiguous(memory_format=torch.channels_last)
        calls = {name: (lambda f=f, x=features: f(x)) for name, (f, _, _) in variants.items()}
        with torch.inference_mode():
            for call in calls.values():  # warm-up (and compilation)
                for _ in range(3):
                    call()
            ms = medians_in_turns(calls, timer, args.repeats, gpu=True)
            for name, (f, which, baseline) in variants.items():
                outs = f(features)
                error = max(
                    (out.double() - reference[i]).abs().max().item()
                    for out, i in zip(outs, which, strict=True)
                )
                print(
                    f"| {batch} | {name} | {ms[name]:.3f} | {ms[baseline] / ms[name]:.2f}x | {error:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    run(main)
