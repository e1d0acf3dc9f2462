"""Every shape the Triton options run, alone, in the two ways they choose between on its first call: the
library's (cuDNN's convolutions with their fused epilogues, PyTorch's matrix products: what the deployed row
runs) and our Triton kernel, its tile and split chosen by timing (engines/triton_conv.py,
engines/triton_project.py). The r50 model at 321 x 321, 1-shot, T = 5: the encoder's size-keeping
convolutions and its neck (`+triton-encoder`), 2 maps per episode at batch 1 (support and query) and 128 at
batch 64; the condition module's convolutions and each refinement iteration's (`+triton-head`), 1 and 64.
The last column is what the episode gains from the shape if the faster way runs (its calls per episode x
the difference): what the options are meant to collect, shape by shape.

    python benchmarks/triton_shapes.py [--batch 1 --batch 64] [--device cuda] [--repeats 20]

On a GPU each way is captured as a CUDA graph and timed in GPU time per replay, in turns; on a CPU (a check
of the script, with TRITON_INTERPRET=1 and a small --size) in wall time. Random FP16 channels-last weights
and maps (FP32 on a CPU); the max difference is against float64.
"""

from __future__ import annotations

from dataclasses import dataclass

from crnet.commands.script_args import run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch
    import torch.nn.functional as F
    from layer_bench import layer_bench_arguments

    from crnet.commands.timer import Timer, medians_in_turns
    from crnet.engines.cuda_graphs import CapturedCalls
    from crnet.engines.triton_head import (
        CLASS_COLUMNS,
        _library_branches,
        _library_conv,
        _library_project_classify,
        pack_weight,
        sum_slots,
    )
    from crnet.model.refinement import image_pooling_term

ASPP_DILATIONS = (6, 12, 18)


@dataclass(frozen=True)
class Conv:
    """A size-keeping convolution: channels, kernel side, map side as a multiple of the features' (2:
    layer1's 81 for 41), dilation, and its epilogue: ReLU, residual add, ReLU'd copy, each image's column
    sums (the last block's, for the ASPP's pooling term)."""

    cin: int
    cout: int
    kernel: int = 3
    scale: int = 1
    dilation: int = 1
    relu: bool = False
    residual: bool = False
    copy: bool = False
    sums: bool = False


# name, what, calls per episode: the encoder's per image (support and query), the rest per query.
ENCODER = [
    ("layer1 1x1 in, first block", Conv(64, 64, kernel=1, scale=2, relu=True), 1),
    ("layer1 1x1 in", Conv(256, 64, kernel=1, scale=2, relu=True), 2),
    ("layer1 3x3", Conv(64, 64, scale=2, relu=True), 3),
    ("layer1 1x1 out, + skip", Conv(64, 256, kernel=1, scale=2, relu=True, residual=True), 3),
    ("layer2 1x1 in, first block (81 x 81)", Conv(256, 128, kernel=1, scale=2, relu=True), 1),
    ("layer2 1x1 in", Conv(512, 128, kernel=1, relu=True), 3),
    ("layer2 3x3 (not the strided one)", Conv(128, 128, relu=True), 3),
    ("layer2 1x1 out, + skip", Conv(128, 512, kernel=1, relu=True, residual=True), 4),
    ("layer3 1x1 in, first block", Conv(512, 256, kernel=1, relu=True), 1),
    ("layer3 1x1 in", Conv(1024, 256, kernel=1, relu=True), 5),
    ("layer3 3x3, first block", Conv(256, 256, relu=True), 1),
    ("layer3 3x3, dilated", Conv(256, 256, dilation=2, relu=True), 5),
    ("layer3 1x1 out, + skip", Conv(256, 1024, kernel=1, relu=True, residual=True), 6),
    ("neck, layer2 half (bare)", Conv(512, 256, dilation=2), 1),
    ("neck, layer3 half (+ layer2 half, ReLU)", Conv(1024, 256, dilation=2, relu=True, residual=True), 1),
]
HEAD = [
    ("condition: fuse (and its ReLU'd copy)", Conv(512, 256, dilation=2, copy=True), 1),
    ("feedback's probability term (+ feature term, ReLU)", Conv(2, 256, relu=True, residual=True), 4),
    ("3x3, ReLU (blocks' first; condition's)", Conv(256, 256, relu=True), 11),
    ("3x3, + skip, ReLU'd copy (blocks' second)", Conv(256, 256, residual=True, copy=True), 10),
    ("3x3, + skip (condition's)", Conv(256, 256, residual=True), 1),
    ("3x3, + skip, column sums (last block's)", Conv(256, 256, residual=True, sums=True), 5),
    ("image-pooling term (Triton: from those sums)", "pooling", 5),
    ("ASPP's 4 pixel branches", "branches", 5),
    ("projection, ReLU, classifier, softmax", "project", 5),
]
SHAPES = [(f"encoder: {name}", what, calls, False) for name, what, calls in ENCODER]
SHAPES += [
    (name if name.startswith("condition") else f"head: {name}", what, calls, True)
    for name, what, calls in HEAD
]


def conv_ways(shape: Conv, maps: int, size: int, device, dtype, slot: int):
    """(library, triton, float64 reference, FLOPs) of one convolution on random maps."""
    from crnet.engines.triton_conv import conv2d_nhwc

    layout, d, k = {"memory_format": torch.channels_last}, shape.dilation, shape.kernel
    pad = d * (k - 1) // 2
    x = torch.randn(maps, shape.cin, size, size, device=device)
    weight = torch.randn(shape.cout, shape.cin, k, k, device=device) * (2 / (k * k * shape.cin)) ** 0.5
    bias = torch.randn(shape.cout, device=device) * 0.1
    residual = torch.randn(maps, shape.cout, size, size, device=device) if shape.residual else None
    with torch.no_grad():
        reference = F.conv2d(x.double(), weight.double(), bias.double(), 1, pad, d)
        reference = reference + residual.double() if residual is not None else reference
        reference = reference.relu() if shape.relu else reference
    x, weight, bias = x.to(dtype).contiguous(**layout), weight.to(dtype).contiguous(**layout), bias.to(dtype)
    residual = residual.to(dtype).contiguous(**layout) if residual is not None else None
    packed, epilogue = pack_weight(weight), (shape.relu, shape.copy)

    def library(x):
        return _library_conv(x, weight, bias, residual, [pad, pad], [d, d], *epilogue, shape.sums)

    def triton(x):
        args = (residual, (k, k), (pad, pad), (d, d), *epilogue, slot)
        return conv2d_nhwc(x, packed, bias, *args, column_sums=shape.sums)

    return x, library, triton, reference, 2 * maps * size * size * shape.cin * shape.cout * k * k


def branches_ways(maps: int, size: int, device, dtype, slot: int, channels: int = 256):
    """The ASPP's 1x1 and dilated branches, their ReLU'd outputs concatenated."""
    from crnet.engines.triton_conv import branches_nhwc

    x = torch.randn(maps, channels, size, size, device=device)
    weights = [
        torch.randn(channels, channels, k, k, device=device) * (2 / (k * k * channels)) ** 0.5
        for k in (1, 3, 3, 3)
    ]
    biases = [torch.randn(channels, device=device) * 0.1 for _ in weights]
    dilations = (1, *ASPP_DILATIONS)
    with torch.no_grad():
        reference = torch.cat(
            [
                F.conv2d(x.double(), w.double(), b.double(), 1, d * (w.shape[-1] // 2), d).relu()
                for w, b, d in zip(weights, biases, dilations, strict=True)
            ],
            dim=1,
        )
    layout = {"memory_format": torch.channels_last}
    x = x.to(dtype).contiguous(**layout)
    weights = [w.to(dtype).contiguous(**layout) for w in weights]
    biases = [b.to(dtype) for b in biases]
    geometry = [1, 1, 1, 1, 4, 1] + [v for d in ASPP_DILATIONS for v in (d, d, d, d, 0, 9)]
    packed = torch.stack(
        [pack_weight(F.pad(weights[0], (1, 1, 1, 1)))] + [pack_weight(w) for w in weights[1:]]
    )
    stacked_bias, geometries = torch.stack(biases), [tuple(geometry[i : i + 6]) for i in range(0, 24, 6)]

    def library(x):
        return [_library_branches(x, weights, biases, geometry)]

    def triton(x):
        return branches_nhwc(x, packed, stacked_bias, None, (3, 3), geometries, True, False, slot)

    return x, library, triton, reference, 2 * maps * size * size * channels * channels * (1 + 27)


def pooling_ways(maps: int, size: int, device, dtype, slot: int, channels: int = 256):
    """The ASPP's image-pooling term: the library's from the map (a mean, two 1x1 convolutions and a ReLU),
    ours from the last block's column sums (one small kernel)."""
    from crnet.engines.triton_project import pooling_term

    h = torch.randn(maps, channels, size, size, device=device)
    like = {"device": device}
    weights = [torch.randn(channels, channels, 1, 1, **like) * channels**-0.5 for _ in range(2)]
    biases = [torch.randn(channels, **like) * 0.1 for _ in range(2)]
    with torch.no_grad():
        reference = image_pooling_term(h.double(), weights[0].double(), biases[0].double(),
                                       weights[1].double(), biases[1].double())  # fmt: skip
    h = h.to(dtype).contiguous(memory_format=torch.channels_last)
    weights, biases = [w.to(dtype) for w in weights], [b.to(dtype) for b in biases]
    sums = torch.zeros(maps, sum_slots(size, size), channels, device=device)
    sums[:, 0] = h.float().sum(dim=(2, 3))
    packed = [pack_weight(w) for w in weights]

    def library(x):
        return [image_pooling_term(x, weights[0], biases[0], weights[1], biases[1])]

    def triton(x):
        return [pooling_term(sums, size * size, packed[0], biases[0], packed[1], biases[1])]

    return h, library, triton, reference, 2 * maps * (size * size + 2 * channels) * channels


def project_ways(maps: int, size: int, device, dtype, slot: int, channels: int = 256):
    """The end of an iteration: projection of the 4 branches, per-sample bias, ReLU, classifier, softmax
    (the reference: the logits)."""
    from crnet.engines.triton_project import project_classify

    x = torch.randn(maps, 4 * channels, size, size, device=device).relu()
    weight = torch.randn(channels, 4 * channels, 1, 1, device=device) * (2 / (4 * channels)) ** 0.5
    pool_bias = torch.randn(maps, channels, 1, 1, device=device) * 0.1
    classifier, classifier_bias = (
        torch.randn(2, channels, 1, 1, device=device) * 0.1,
        torch.randn(2, device=device),
    )
    with torch.no_grad():
        h = F.relu(F.conv2d(x.double(), weight.double()) + pool_bias.double())
        reference = F.conv2d(h, classifier.double(), classifier_bias.double())
    layout = {"memory_format": torch.channels_last}
    x = x.to(dtype).contiguous(**layout)
    weight, pool_bias = weight.to(dtype).contiguous(**layout), pool_bias.to(dtype)
    classifier, classifier_bias = classifier.to(dtype).contiguous(**layout), classifier_bias.to(dtype)
    packed = pack_weight(weight)
    padded = torch.zeros(channels, CLASS_COLUMNS, device=device, dtype=dtype)
    padded[:, :2] = classifier[:, :, 0, 0].t()
    bias = pool_bias.reshape(maps, channels)

    def library(x):
        return _library_project_classify(x, weight, pool_bias, classifier, classifier_bias)

    def triton(x):
        return project_classify(x, packed, bias, padded, classifier_bias, torch.channels_last, slot)

    return x, library, triton, reference, 2 * maps * size * size * channels * (4 * channels + 2)


def main() -> None:
    args, device, dtype = layer_bench_arguments(__doc__, "episodes per call (repeatable)", 41)
    torch.manual_seed(0)
    timer, cuda = Timer(device), device.type == "cuda"
    print(f"the Triton options' shapes, features {args.size} x {args.size}, {dtype}, on {device}")
    print(
        "| batch | shape | maps | calls | library ms | Triton ms | TFLOP/s library, Triton "
        "| Triton vs library | episode gains ms | max abs difference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch or [1, 64]:
        total = 0.0
        for slot, (name, what, calls, per_query) in enumerate(SHAPES):
            maps = batch * (1 if per_query else 2)
            scale = what.scale if isinstance(what, Conv) else 1
            size = args.size * scale - (scale - 1)  # layer1's 81 for the features' 41
            if isinstance(what, Conv):
                x, library, triton, reference, flops = conv_ways(what, maps, size, device, dtype, slot)
            elif what == "branches":
                x, library, triton, reference, flops = branches_ways(maps, size, device, dtype, slot)
            elif what == "pooling":
                x, library, triton, reference, flops = pooling_ways(maps, size, device, dtype, slot)
            else:
                x, library, triton, reference, flops = project_ways(maps, size, device, dtype, slot)
            ways, outputs = {"library": library, "Triton": triton}, {}
            with torch.inference_mode():
                for way, function in list(ways.items()):
                    if cuda:  # one CUDA graph each, as the deployed row captures its episode
                        function = CapturedCalls(function, device)
                    for _ in range(3):  # warm-up: Triton's timed choice, compilation, capture
                        outputs[way] = function(x)
                    ways[way] = lambda f=function, x=x: f(x)
                ms = medians_in_turns(ways, timer, args.repeats, gpu=True)
            error = max((o[0].double() - reference).abs().max().item() for o in outputs.values())
            gain = calls * (ms["library"] - min(ms.values()))
            total += gain
            print(
                f"| {batch} | {name} | {maps} | {calls} | {ms['library']:.4f} | {ms['Triton']:.4f} | "
                f"{flops / ms['library'] / 1e9:.3g}, {flops / ms['Triton'] / 1e9:.3g} | "
                f"{ms['library'] / ms['Triton']:.2f}x | {gain:.4f} | {error:.1e} |",
                flush=True,
            )
        print(f"| {batch} | every shape, each the faster way | | | | | | | {total:.4f} | |", flush=True)


if __name__ == "__main__":
    run(main)
