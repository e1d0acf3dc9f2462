"""The ASPP's independent branches side by side on the GPU, each on a CUDA stream of its own.

In each refinement iteration the ASPP's 1x1 branch, its three dilated 3x3 branches and its image-pooling
term all read the same map h, and only the projection joins them. On one stream they run one after another.
At batch 1 that leaves most of a large GPU idle: on the H200 the head's 3x3 convolutions ran as 64x64-tile
kernels, whose 108 tiles on a 41x41 map with 256 channels fill at most 108 of its 132 SMs once, for about
9 microseconds each (docs/BENCHMARKS.md). Forked onto streams of their own and joined before the
projection, the branches become parallel branches of the captured CUDA graph, and the GPU may run their
kernels at the same time. At batch 64 one convolution fills the GPU alone, and the fork and join are a few
graph edges. Whether the branches do overlap, and what that saves, is measured: `+concurrent-aspp`.

`crnet::aspp_terms` is a custom op, so that torch.compile traces it as one opaque call (its fake impl gives
the outputs' shapes and layouts) rather than break its graph at the streams; the CUDA graph that captures the
compiled code captures the streams inside. Off CUDA it computes the same terms one after another. The
results are the hoisted loop's own (`ASPP.hoisted_terms`), the same operations in the same order per branch.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

from crnet.model.conv_epilogues import ConvReLU, conv_bias_relu
from crnet.model.conv_twin import keeps_size, layout_of
from crnet.model.refinement import ASPP, image_pooling_term


def _terms(
    x, pool_weight, pool_bias, share_weight, share_bias, weights, biases, dilations, fused, forks
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image-pooling term and each branch inside its own context of `forks` (streams, or nothing), each
    written into its place in outputs made beforehand, on the caller's stream."""
    n, _, height, width = x.shape
    channels = sum(w.shape[0] for w in weights)
    branches = torch.empty(
        (n, channels, height, width),
        dtype=x.dtype,
        device=x.device,
        memory_format=layout_of(x, weights[0]),
    )
    pooled = x.new_empty((n, share_weight.shape[0], 1, 1))
    with forks[0]:
        pooled.copy_(image_pooling_term(x, pool_weight, pool_bias, share_weight, share_bias))
    start = 0
    for fork, weight, bias, dilation in zip(forks[1:], weights, biases, dilations, strict=True):
        padding = [dilation * (weight.shape[-1] - 1) // 2] * 2
        with fork:
            if fused:
                out = conv_bias_relu(x, weight, bias, None, [1, 1], padding, [dilation, dilation])
            else:
                out = F.relu(F.conv2d(x, weight, bias, 1, padding, dilation))
            branches[:, start : start + weight.shape[0]].copy_(out)
        start += weight.shape[0]
    return branches, pooled


@torch.library.custom_op("crnet::aspp_terms", mutates_args=())
def aspp_terms(
    x: torch.Tensor,
    pool_weight: torch.Tensor,
    pool_bias: torch.Tensor | None,
    share_weight: torch.Tensor,
    share_bias: torch.Tensor | None,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    dilations: list[int],
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ASPP.hoisted_terms as one call: relu(conv(x)) of every pixel branch (stride 1, padding that keeps the
    size; `fused`: as crnet::conv_bias_relu) concatenated, and the image-pooling term
    conv(relu(image_pool(mean(x))), share_weight, share_bias). Off CUDA, one branch after another."""
    forks = [contextlib.nullcontext()] * (len(weights) + 1)
    return _terms(
        x, pool_weight, pool_bias, share_weight, share_bias, weights, biases, dilations, fused, forks
    )


@aspp_terms.register_kernel("cuda")
def _aspp_terms_cuda(x, pool_weight, pool_bias, share_weight, share_bias, weights, biases, dilations, fused):
    main = torch.cuda.current_stream(x.device)
    streams = _side_streams(x.device, main, len(weights) + 1)
    for stream in streams:  # each branch starts after what the caller queued (h itself)
        stream.wait_stream(main)
    forks = [torch.cuda.stream(stream) for stream in streams]
    out = _terms(
        x, pool_weight, pool_bias, share_weight, share_bias, weights, biases, dilations, fused, forks
    )
    for stream in streams:  # and the caller's next kernel (the projection) after every branch
        main.wait_stream(stream)
    return out


@aspp_terms.register_fake
def _aspp_terms_fake(x, pool_weight, pool_bias, share_weight, share_bias, weights, biases, dilations, fused):
    n, _, height, width = x.shape
    channels = sum(w.shape[0] for w in weights)
    layout = layout_of(x, weights[0])
    branches = x.new_empty((n, channels, height, width)).contiguous(memory_format=layout)
    return branches, x.new_empty((n, share_weight.shape[0], 1, 1))


# Side streams per device, made once and kept. torch.cuda.Stream() hands out the 32 streams of a pool in
# turn, so a new one may be one the list holds already (two branches would share it: seen on the H200) or
# the caller's own (a capture's stream is one of the pool's too): both are passed over.
_STREAMS: dict[int, list[torch.cuda.Stream]] = {}
_STREAMS_LOCK = threading.Lock()


def _side_streams(device: torch.device, main: torch.cuda.Stream, count: int) -> list[torch.cuda.Stream]:
    with _STREAMS_LOCK:
        pool = _STREAMS.setdefault(device.index, [])
        while len([s for s in pool if s != main]) < count:
            stream = torch.cuda.Stream(device)
            if stream not in pool:
                pool.append(stream)
        return [s for s in pool if s != main][:count]


class ConcurrentASPP(ASPP):
    """An ASPP (the same parameters, the same state-dict keys) whose hoisted terms are one crnet::aspp_terms
    call; its forward, which training and the plain loop use, is the ASPP's own."""

    @classmethod
    def of(cls, aspp: ASPP) -> ConcurrentASPP:
        """The concurrent twin of `aspp`, sharing its modules and so its parameters."""
        pool = aspp.image_pool
        if type(pool) is not nn.Conv2d or pool.kernel_size != (1, 1) or pool.padding != (0, 0):
            raise ValueError(f"the concurrent ASPP takes a 1x1 image-pooling convolution, not {pool}")
        for branch in aspp.branches:
            square = len(set(branch.dilation)) == 1 and len(set(branch.kernel_size)) == 1
            if not (type(branch) in (nn.Conv2d, ConvReLU) and square and keeps_size(branch)):
                raise ValueError(
                    f"the concurrent ASPP takes size-keeping stride-1 convolutions, not {branch}"
                )
        return cls.sharing(aspp)

    def hoisted_terms(
        self,
        x: torch.Tensor,
        pool_weight: torch.Tensor,
        bias: torch.Tensor | None,
        sums: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ASPP.hoisted_terms (the pooling term its own: the other branches run beside it)."""
        return aspp_terms(
            x,
            self.image_pool.weight,
            self.image_pool.bias,
            pool_weight,
            bias,
            [branch.weight for branch in self.branches],
            [branch.bias for branch in self.branches],
            [branch.dilation[0] for branch in self.branches],
            isinstance(self.branches[0], ConvReLU),
        )


def concurrent_aspp(model: nn.Module) -> nn.Module:
    """Give every ASPP of `model` concurrent hoisted terms, in place; an inference transform like folding,
    applied after conv_epilogues.fuse_conv_epilogues where both are. Returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is ASPP:
                setattr(module, name, ConcurrentASPP.of(child))
    return model
