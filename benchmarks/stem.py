"""The trunk's stem alone: the strided 7x7 convolution over 3 colours against the same convolution over 2x2
pixel blocks (crnet/model/space_to_depth.py), eager and compiled, GPU time per call from CUDA events.

    python benchmarks/stem.py [--batch 2 --batch 128] [--device cuda]

A batch counts images (an episode of batch B, 1 shot, encodes 2B). Random weights and images, FP16 (FP32 on
a CPU), channels-last, the folded stem's bias; the max difference is against the strided convolution in
float64.
"""

from __future__ import annotations

import torch
from layer_bench import layer_bench_arguments
from torch import nn

from crnet.model.space_to_depth import SpaceToDepthConv


def gpu_ms(call, device: torch.device, repeats: int) -> float:
    """Median milliseconds per call (CUDA events on a GPU, wall time on a CPU), after warm-up."""
    import statistics
    import time

    for _ in range(3):
        call()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            call()
            samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


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
                ms = gpu_ms(lambda m=module, x=images: m(x), device, args.repeats)
                error = (module(images).double() - reference).abs().max().item()
            base = base or ms
            print(f"| {batch} | {name} | {ms:.3f} | {base / ms:.2f}x | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
