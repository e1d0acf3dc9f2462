"""The refinement head's 3x3 convolutions alone (256 -> 256 channels on the r50 head's 41 x 41 map, bias and
ReLU), in each form PyTorch offers, to see whether any runs them faster than the cuDNN kernels the deployed
row captures. On the H200 at batch 1, convolutions and matrix products take 0.98 of the episode's 1.09 ms
of kernel time; the largest entry is 36 calls of a 64x64-tile cuDNN kernel, which has 27 x 4 = 108 tiles
for 1681 pixels x 256 channels, on 132 SMs (docs/BENCHMARKS.md).

    python benchmarks/head_convs.py [--batch 1 --batch 64] [--device cuda] [--no-compile]

Forms, for one dilation-1 convolution and for the ASPP's three dilated branches (6, 12, 18):
- cuDNN with its fused ReLU, as the deployed row runs them (crnet/model/conv_epilogues.py);
- the same with the plans cuDNN's timing chose (benchmark mode, on a capture thread of its own);
- im2col, then one cuBLAS(Lt) matrix product with the bias and ReLU in its epilogue (the three ASPP
  branches as one batched product), eager and compiled by inductor;
- inductor with max-autotune (its Triton convolution templates against ATen's), one convolution only;
- the three branches with the image-pooling term, written into one concatenation, on one stream and each
  on a CUDA stream of its own (`+concurrent-aspp`, crnet/model/concurrent_aspp.py): both do the same
  work, a little more than the deployed form's (the pooling term and the copies into the concatenation);
- our Triton kernel (`+triton-head`, engines/triton_conv.py), its tile and split chosen by timing; the
  three branches as one launch, each into its channels of one output.
On a GPU each form is captured as a CUDA graph and timed in GPU time per replay, in turns. On a CPU (a
check of the script) they are timed in wall time, and "cuDNN" is PyTorch's CPU convolution. Random FP16
channels-last weights and features (FP32 on a CPU); the max difference is against float64.
"""

from __future__ import annotations

import contextlib

from crnet.commands.script_args import run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch
    import torch.nn.functional as F
    from layer_bench import layer_bench_arguments
    from torch import nn

    from crnet.commands.timer import Timer, medians_in_turns
    from crnet.engines.cuda_graphs import CapturedCalls, CaptureOnOwnThread
    from crnet.engines.torch_runtime import _cudnn_benchmark
    from crnet.engines.triton_head import pack_weight
    from crnet.model.concurrent_aspp import _terms, aspp_terms
    from crnet.model.conv_epilogues import ConvReLU

DILATIONS = (6, 12, 18)  # the r50 preset's
DEPLOYED = "cuDNN, fused ReLU (deployed)"


def im2col(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, 9*C): each output pixel's 3x3 taps (row-major), channels innermost."""
    height, width = x.shape[2:]
    padded = F.pad(x, (dilation,) * 4).contiguous(memory_format=torch.channels_last)
    taps = [
        padded[:, :, i * dilation : i * dilation + height, j * dilation : j * dilation + width]
        for i in range(3)
        for j in range(3)
    ]
    columns = torch.cat(taps, dim=1).contiguous(memory_format=torch.channels_last)  # (N, H, W, 9C) in memory
    return columns.permute(0, 2, 3, 1).reshape(-1, 9 * x.shape[1])


def unflatten(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N*H*W, C_out) -> an (N, C_out, H, W) channels-last view."""
    batch, _, height, width = like.shape
    return rows.view(batch, height, width, -1).permute(0, 3, 1, 2)


def forms(conv: nn.Conv2d, branches: list[nn.Conv2d], compile: bool, cuda: bool) -> dict:
    """name: (call on the features, the references it computes, its group ("one" convolution or the "aspp"
    branches), a context to capture it in on a thread of its own or None)."""
    fused, fused_branches = ConvReLU.of(conv), [ConvReLU.of(b) for b in branches]
    # The weights in im2col's order, (9*C, C_out): the layout our Triton kernel reads too.
    weight, bias = pack_weight(conv.weight), conv.bias.detach()
    stacked = torch.stack([pack_weight(b.weight) for b in branches])
    stacked_bias = torch.stack([b.bias.detach() for b in branches]).unsqueeze(1)

    def gemm(x):
        return unflatten(torch._addmm_activation(bias, im2col(x, 1), weight), x)

    def batched_gemm(x):
        columns = torch.stack([im2col(x, b.dilation[0]) for b in branches])
        return [unflatten(out, x) for out in torch.baddbmm(stacked_bias, columns, stacked).relu_()]

    def cudnn_branches(x):
        return [branch(x) for branch in fused_branches]

    def plain_conv(x):
        return F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))

    one, three = "3x3 conv", "ASPP, 3 dilated"
    table = {
        f"{one}: {DEPLOYED}": (fused, [0], "one", None),
        f"{one}: im2col + cuBLAS, fused bias+ReLU": (gemm, [0], "one", None),
        f"{three}: {DEPLOYED}": (cudnn_branches, [1, 2, 3], "aspp", None),
        f"{three}: im2col + one batched GEMM": (batched_gemm, [1, 2, 3], "aspp", None),
    }
    if cuda:  # benchmark mode: its plans chosen, and kept, on a thread of its own (engines/cuda_graphs.py)
        timed = "cuDNN, fused ReLU, benchmark mode"
        table[f"{one}: {timed}"] = (fused, [0], "one", _cudnn_benchmark)
        table[f"{three}: {timed}"] = (cudnn_branches, [1, 2, 3], "aspp", _cudnn_benchmark)
        # The pooling term's two 1x1 convolutions: random, like every weight here.
        channels, like = conv.out_channels, {"device": conv.weight.device, "dtype": conv.weight.dtype}
        pool = [0.05 * torch.randn(channels, channels, 1, 1, **like) for _ in range(2)]
        terms = [pool[0], None, pool[1], None, [b.weight for b in branches], [b.bias for b in branches]]
        terms += [list(DILATIONS), True]

        def one_stream(x):
            branches_out, _ = _terms(x, *terms, forks=[contextlib.nullcontext()] * 4)
            return list(branches_out.chunk(3, dim=1))

        def own_streams(x):
            return list(aspp_terms(x, *terms)[0].chunk(3, dim=1))

        from crnet.engines.triton_conv import branches_nhwc, conv2d_nhwc

        geometries = [(d, d, d, d, 0, 9) for d in DILATIONS]

        def triton_one(x):
            return conv2d_nhwc(x, weight, bias, None, (3, 3), (1, 1), (1, 1), True, slot=0)[0]

        def triton_branches(x):  # one launch, each branch into its channels of one output
            out = branches_nhwc(x, stacked, stacked_bias[:, 0], None, (3, 3), geometries, True, slot=1)[0]
            return list(out.chunk(3, dim=1))

        table[f"{one}: Triton, split by timing"] = (triton_one, [0], "one", None)
        table[f"{three}: Triton, one launch, split by timing"] = (triton_branches, [1, 2, 3], "aspp", None)
        joined = "cuDNN, fused ReLU, with pooling term and concatenation"
        table[f"{three}: {joined}, one stream"] = (one_stream, [1, 2, 3], "aspp", None)
        table[f"{three}: {joined}, a stream each"] = (own_streams, [1, 2, 3], "aspp", None)
    if compile:
        table[f"{one}: im2col + GEMM, compiled"] = (torch.compile(gemm, dynamic=False), [0], "one", None)
        table[f"{three}: im2col + batched GEMM, compiled"] = (
            torch.compile(batched_gemm, dynamic=False),
            [1, 2, 3],
            "aspp",
            None,
        )
        if cuda:  # on a CPU max-autotune times C++ GEMM templates for minutes: not what this is for
            autotuned = torch.compile(plain_conv, mode="max-autotune-no-cudagraphs", dynamic=False)
            table[f"{one}: inductor max-autotune"] = (autotuned, [0], "one", None)
    return table


def main() -> None:
    args, device, dtype = layer_bench_arguments(__doc__, "feature maps per call (repeatable)", 41)
    torch.manual_seed(0)
    channels, size, cuda = 256, args.size, device.type == "cuda"
    conv = nn.Conv2d(channels, channels, 3, padding=1).to(device)
    branches = [nn.Conv2d(channels, channels, 3, padding=d, dilation=d).to(device) for d in DILATIONS]
    originals = [conv, *branches]
    for module in originals:
        module.to(dtype).to(memory_format=torch.channels_last).eval()
    table = forms(conv, branches, not args.no_compile, cuda)
    timer = Timer(device)
    print(f"head convolutions, {channels} x {size} x {size}, {dtype}, on {device}")
    print("| batch | form | ms per call | TFLOP/s | vs cuDNN (deployed) | max abs difference |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch or [1, 64]:
        features = torch.randn(batch, channels, size, size, device=device)
        with torch.no_grad():
            reference = [
                F.conv2d(features.double(), c.weight.double(), c.bias.double(), 1, c.padding, c.dilation)
                for c in originals
            ]
        reference = [r.relu() for r in reference]
        features = features.to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            calls, outputs = {}, {}
            for name, (function, _, _, within) in table.items():
                if cuda:  # one CUDA graph per form, as the deployed row captures its episode
                    function = CapturedCalls(function, device, CaptureOnOwnThread(within) if within else None)
                for _ in range(3):  # warm-up (compilation, capture)
                    outputs[name] = function(features)
                calls[name] = lambda f=function, x=features: f(x)
            ms = medians_in_turns(calls, timer, args.repeats, gpu=True)
            deployed = {
                group: ms[name] for name, (_, _, group, _) in table.items() if name.endswith(DEPLOYED)
            }
            for name, (_, which, group, _) in table.items():
                out = outputs[name] if isinstance(outputs[name], list) else [outputs[name]]
                error = max(
                    (o.double() - reference[i]).abs().max().item() for o, i in zip(out, which, strict=True)
                )
                flops = 2 * batch * size * size * channels * channels * 9 * len(which)
                print(
                    f"| {batch} | {name} | {ms[name]:.4f} | {flops / ms[name] / 1e9:.3g} | "
                    f"{deployed[group] / ms[name]:.2f}x | {error:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    run(main)
