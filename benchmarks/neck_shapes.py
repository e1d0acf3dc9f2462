"""The encoder's neck alone, in each form, at each number of encoded images: where does cuDNN leave its sm90
kernels for the layer3 half, and which form is the faster on each side of that point?

    python benchmarks/neck_shapes.py [--images 2 --images 128] [--preset r50] [--device cuda] [--no-compile]

On the H200 (2026-11-27, docs/BENCHMARKS.md) the deployed row's neck ran its layer3 half, a 3x3 convolution
over 1024 channels (dilation 2), on cuDNN's sm80 kernel with 128 images (a batch-64 episode), 2.5 ms, and on
an sm90 one with 2 (batch 1). `+split-neck` (two 512-channel pieces, each a copy of its channel slice) was
0.9% faster an episode at batch 64 and 1.9% slower at batch 1. Forms, on random FP16 channels-last levels
(FP32 on a CPU, a check of the script):
- fused (deployed): the layer2 half bare, the layer3 half with cuDNN's add-ReLU epilogue (FusedNeck);
- bare: both halves bare, their sum, bias and ReLU in one pass (`+bare-neck`);
- split: the bare form over pieces of at most 512 input channels (`+split-neck`);
- in chunks of at most C images: the fused form on each chunk of the batch (`+chunked-neck`, 16 images;
  a batch slice of a channels-last map is dense: no copy in), the chunks' outputs joined (one copy out).
Each form is captured as a CUDA graph and timed in GPU time per replay, in turns; `--kernels` lists, per
form and image count, the convolution kernels one replay ran (sm80 or sm90). The max difference is against
the concatenating neck in float64.
"""

from __future__ import annotations

import copy

from crnet.commands.script_args import count, run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch
    from layer_bench import script_parser
    from torch import nn

    from crnet.commands.timer import Timer, medians_in_turns
    from crnet.config import MAX_BATCH, preset
    from crnet.device import resolve_device
    from crnet.engines.cuda_graphs import CapturedCalls
    from crnet.model.backbone import Neck
    from crnet.model.chunked_neck import ChunkedNeck
    from crnet.model.conv_epilogues import BareNeck, FusedNeck

CHUNKS = (8, 16, 32, 64)  # images per chunk
DEPLOYED = "fused (deployed)"


def forms(neck: Neck, layer2_channels: int, images: int) -> dict[str, nn.Module]:
    fused, piece = FusedNeck(neck, layer2_channels), BareNeck.SPLIT_CHANNELS
    table = {
        DEPLOYED: fused,
        "bare": BareNeck.of(neck, layer2_channels),
        f"split, pieces of {piece}": BareNeck.of(neck, layer2_channels, piece),
    }
    for chunk in CHUNKS:
        if chunk < images:
            table[f"fused, chunks of {chunk} images"] = ChunkedNeck(fused, chunk)
    return table


def convolution_kernels(call) -> list[str]:
    """The convolution and matrix-product kernels one call ran, in order (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    marks = ("xmma", "gemm", "conv", "nvjet", "cutlass", "Slice")
    return [n[:90] for n in names if any(m in n for m in marks)]


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--images", type=count(1, 2 * MAX_BATCH), action="append", help="images per call")
    parser.add_argument("--preset", choices=["r50", "tiny"], default="r50", help="whose neck")
    parser.add_argument("--repeats", type=count(1), default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="eager forms only")
    parser.add_argument("--kernels", action="store_true", help="list each form's convolution kernels")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = preset(args.preset)
    torch.manual_seed(0)
    trunk = (config.width * 8, config.width * 16)  # layer2's and layer3's channels
    neck = Neck(
        nn.Conv2d(sum(trunk), config.channels, 3, padding=2, dilation=2), nn.ReLU(), nn.Identity()
    ).eval()
    # The weights rounded once to the timed dtype, and the reference computed from those in float64.
    neck = neck.to(device, dtype).to(memory_format=torch.channels_last)
    double = copy.deepcopy(neck).to(torch.float64)
    side = config.feature_size
    timer = Timer(device)
    cuda = device.type == "cuda"
    print(f"{args.preset} neck, {trunk[0]} + {trunk[1]} -> {config.channels} channels, {side} x {side} maps,")
    print(f"{dtype}, channels-last, on {device}")
    print("| images | form | ms per call | TFLOP/s | vs fused (deployed) | max abs difference |")
    print("|---|---|---|---|---|---|")
    for images in args.images or [2, 8, 32, 64, 128]:
        levels = [torch.randn(images, c, side, side, device=device, dtype=dtype) for c in trunk]
        levels = [x.contiguous(memory_format=torch.channels_last) for x in levels]
        with torch.no_grad():
            reference = double(*(x.double() for x in levels))
        table = {name: m.eval() for name, m in forms(neck, trunk[0], images).items()}
        with torch.inference_mode():
            calls, outputs, kernels = {}, {}, {}
            for name, module in table.items():
                function = module if args.no_compile else torch.compile(module, dynamic=False)
                if cuda:  # one CUDA graph per form, as the deployed row captures its episode
                    function = CapturedCalls(function, device)
                for _ in range(3):  # warm-up (compilation, capture)
                    outputs[name] = function(*levels)
                calls[name] = lambda f=function, x=levels: f(*x)
                if cuda and args.kernels:
                    kernels[name] = convolution_kernels(calls[name])
            ms = medians_in_turns(calls, timer, args.repeats, gpu=True)
        flops = 2 * images * side * side * config.channels * sum(trunk) * 9
        for name in table:
            error = (outputs[name].double() - reference).abs().max().item()
            print(
                f"| {images} | {name} | {ms[name]:.4f} | {flops / ms[name] / 1e9:.3g} | "
                f"{ms[DEPLOYED] / ms[name]:.2f}x | {error:.1e} |",
                flush=True,
            )
        for name, names in kernels.items():
            print(f"  {images} images, {name}: {', '.join(names)}")


if __name__ == "__main__":
    run(main)
