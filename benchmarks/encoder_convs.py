"""The r50 encoder's and condition module's size-keeping 3x3 convolutions alone, each in the two ways the
Triton options choose between per shape: cuDNN with its fused epilogue, as the deployed row runs them
(engines/triton_head.py `_library_conv`), and our Triton kernel, its tile and split chosen by timing
(engines/triton_conv.py). Each shape at the maps per call of an episode batch: the encoder's 2 at batch 1
(support and query) and 128 at batch 64, the condition's 1 and 64 (the queries). The last column is what
the episode gains from this shape if the faster way runs (calls per episode x the difference), which is
what `+triton-encoder` and `+triton-head` are meant to collect.

    python benchmarks/encoder_convs.py [--batch 1 --batch 64] [--device cuda]

On a GPU each way is captured as a CUDA graph and timed in GPU time per replay, in turns; on a CPU (a check
of the script, with TRITON_INTERPRET=1 and a small --size) in wall time. Random FP16 channels-last weights
and maps (FP32 on a CPU); the max difference is against float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from layer_bench import layer_bench_arguments

from crnet.commands.timer import Timer, medians_in_turns
from crnet.engines.cuda_graphs import CapturedCalls
from crnet.engines.triton_head import _library_conv, pack_weight

# name, in and out channels, map side at r50's 41 x 41 features, dilation, calls per episode, per query
# (else per image), epilogue: ReLU, residual add, ReLU'd copy.
SHAPES = [
    ("layer1 3x3", 64, 64, 2, 1, 3, False, (True, False, False)),
    ("layer2 3x3 (not the strided one)", 128, 128, 1, 1, 3, False, (True, False, False)),
    ("layer3 3x3, first block", 256, 256, 1, 1, 1, False, (True, False, False)),
    ("layer3 3x3, dilated", 256, 256, 1, 2, 5, False, (True, False, False)),
    ("neck, layer2 half (bare)", 512, 256, 1, 2, 1, False, (False, False, False)),
    ("neck, layer3 half (+ layer2 half, ReLU)", 1024, 256, 1, 2, 1, False, (True, True, False)),
    ("condition, fuse (and its ReLU'd copy)", 512, 256, 1, 2, 1, True, (False, False, True)),
    ("condition, residual block 1", 256, 256, 1, 1, 1, True, (True, False, False)),
    ("condition, residual block 2 (+ skip)", 256, 256, 1, 1, 1, True, (False, True, False)),
]


def main() -> None:
    args, device, dtype = layer_bench_arguments(__doc__, "episodes per call (repeatable)", 41)
    from crnet.engines.triton_conv import conv2d_nhwc

    torch.manual_seed(0)
    timer, cuda = Timer(device), device.type == "cuda"
    print(f"encoder and condition convolutions, features {args.size} x {args.size}, {dtype}, on {device}")
    print(
        "| batch | convolution | maps | calls | cuDNN ms | Triton ms | TFLOP/s cuDNN, Triton "
        "| Triton vs cuDNN | episode gains ms | max abs difference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in args.batch or [1, 64]:
        total = 0.0
        for slot, (name, cin, cout, scale, dilation, calls, per_query, epilogue) in enumerate(SHAPES):
            relu_out, has_residual, relu_copy = epilogue
            maps, size = batch * (1 if per_query else 2), args.size * scale - (scale - 1)  # 41 -> 81
            x = torch.randn(maps, cin, size, size, device=device)
            weight = torch.randn(cout, cin, 3, 3, device=device) * (2 / (9 * cin)) ** 0.5
            bias = torch.randn(cout, device=device) * 0.1
            residual = torch.randn(maps, cout, size, size, device=device) if has_residual else None
            with torch.no_grad():
                reference = F.conv2d(x.double(), weight.double(), bias.double(), 1, dilation, dilation)
                reference = reference + residual.double() if residual is not None else reference
                reference = reference.relu() if relu_out else reference
            layout = {"memory_format": torch.channels_last}
            x, weight = x.to(dtype).contiguous(**layout), weight.to(dtype).contiguous(**layout)
            bias = bias.to(dtype)
            residual = residual.to(dtype).contiguous(**layout) if residual is not None else None
            packed, pad = pack_weight(weight), [dilation, dilation]

            def library(x, weight=weight, bias=bias, residual=residual, pad=pad, e=epilogue):
                return _library_conv(x, weight, bias, residual, pad, pad, e[0], e[2])

            def triton(x, packed=packed, bias=bias, residual=residual, pad=pad, e=epilogue, slot=slot):
                return conv2d_nhwc(
                    x, packed, bias, residual, (3, 3), tuple(pad), tuple(pad), e[0], e[2], slot
                )

            ways, outputs = {"cuDNN": library, "Triton": triton}, {}
            with torch.inference_mode():
                for way, function in list(ways.items()):
                    if cuda:  # one CUDA graph each, as the deployed row captures its episode
                        function = CapturedCalls(function, device)
                    for _ in range(3):  # warm-up: Triton's timed choice, compilation, capture
                        outputs[way] = function(x)
                    ways[way] = lambda f=function, x=x: f(x)
                ms = medians_in_turns(ways, timer, args.repeats, gpu=True)
            error = max((o[0].double() - reference).abs().max().item() for o in outputs.values())
            flops = 2 * maps * size * size * cin * cout * 9
            gain = calls * (ms["cuDNN"] - min(ms.values()))
            total += gain
            print(
                f"| {batch} | {name} | {maps} | {calls} | {ms['cuDNN']:.4f} | {ms['Triton']:.4f} | "
                f"{flops / ms['cuDNN'] / 1e9:.3g}, {flops / ms['Triton'] / 1e9:.3g} | "
                f"{ms['cuDNN'] / ms['Triton']:.2f}x | {gain:.4f} | {error:.1e} |",
                flush=True,
            )
        print(f"| {batch} | all of them, each the faster way | | | | | | | {total:.4f} | |", flush=True)


if __name__ == "__main__":
    main()
