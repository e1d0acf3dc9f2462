"""The trunk's stem alone: the strided 7x7 convolution over 3 colours against the same convolution over 2x2
pixel blocks (crnet/model/space_to_depth.py), eager and compiled, GPU time per call from CUDA events.

    python benchmarks/stem.py [--batch 2 --batch 128] [--device cuda]

A batch counts images (an episode of batch B, 1 shot, encodes 2B). Random weights and images, FP16 (FP32 on
a CPU), channels-last, the folded stem's bias; the max difference is against the strided convolution in
float64.
"""

from __future__ import annotations

import functools

from crnet.commands.script_args import run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch
    from layer_bench import layer_bench_arguments
    from torch import nn

    from crnet.commands.timer import Timer, medians_in_turns
    from crnet.model.space_to_depth import SpaceToDepthConv


def main() -> None:
    args, device, dtype = layer_bench_arguments(__doc__, "images per call (repeatable)", 321)
    torch.manual_seed(0)
    strided = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=True).to(device)
    blocked = SpaceToDepthConv.of(strided)
    strided, blocked = (m.to(dtype).to(memory_format=torch.channels_last).eval() for m in (strided, blocked))
    variants = {"strided 7x7, 3 colours": strided, "2x2 blocks, 4x4, 16 channels": blocked}
    if not args.no_compile:
        compiled = {f"{name}, compiled": torch.compile(m, dynamic=False) for name, m in variants.items()}
        variants |= compiled
    timer = Timer(device)
    print(f"stem, {args.size}x{args.size} images, {dtype}, channels-last, on {device}")
    print("| images | variant | ms per call | vs strided | max abs difference |")
    print("|---|---|---|---|---|")
    for batch in args.batch or [2, 128]:
        images = torch.randn(batch, 3, args.size, args.size, device=device)
        with torch.no_grad():
            reference = nn.functional.conv2d(
                images.double(), strided.weight.double(), strided.bias.double(), 2, 3
            )
        images = images.to(dtype).contiguous(memory_format=torch.channels_last)
        base = None
        for name, module in variants.items():
            with torch.inference_mode():
                call = functools.partial(module, images)
                for _ in range(3):  # warm-up (and compilation)
                    call()
                ms = medians_in_turns({name: call}, timer, args.repeats, gpu=True)[name]
                error = (module(images).double() - reference).abs().max().item()
            base = base or ms
            print(f"| {batch} | {name} | {ms:.3f} | {base / ms:.2f}x | {error:.1e} |", flush=True)


if __name__ == "__main__":
    run(main)
