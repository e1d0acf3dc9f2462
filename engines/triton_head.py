"""`+triton-head`: the refinement loop's convolutions as the Triton kernels of triton_conv.py, for inference
on CUDA. What changes, per iteration of the hoisted loop (crnet/model/refinement.py):

- each residual block, relu(h) -> conv -> relu -> conv -> + h, is two kernels: the first convolution reads
  relu(h) and writes its ReLU'd output, the second adds its bias and h in its epilogue;
- the feedback block's second convolution reads relu of the first one's output and adds X;
- the ASPP's 3x3 branches each apply their ReLU in their epilogue.

`crnet::triton_conv` is a custom op, so torch.compile traces it as one call (its fake impl gives the output's
shape and layout) and CUDA graphs capture its launch; off CUDA it computes the same with plain PyTorch ops.
The 1x1 convolutions stay PyTorch's (matrix products, cuBLAS's with cuDNN's epilogues).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from crnet.model.conv_epilogues import ConvReLU
from crnet.model.conv_twin import conv_twin
from crnet.model.refinement import ASPP, Refinement, ResidualBranch

_SLOTS = itertools.count()  # each convolution its own split counters (triton_conv.py)


@torch.library.custom_op("crnet::triton_conv", mutates_args=())
def triton_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    padding: list[int],
    dilation: list[int],
    relu_in: bool,
    relu_out: bool,
    slot: int,
) -> torch.Tensor:
    """relu?(conv2d(relu?(x), weight, bias, stride 1) + residual), channels-last; `packed` is the weight as
    triton_conv.pack_weight lays it out, read by the CUDA kernel. Off CUDA, plain PyTorch."""
    x = F.relu(x) if relu_in else x
    out = F.conv2d(x, weight, bias, 1, padding, dilation)
    out = out + residual if residual is not None else out
    return (F.relu(out) if relu_out else out).contiguous(memory_format=torch.channels_last)


@triton_conv.register_kernel("cuda")
def _triton_conv_cuda(x, weight, packed, bias, residual, padding, dilation, relu_in, relu_out, slot):
    from crnet.engines.triton_conv import conv2d_nhwc

    kernel = tuple(weight.shape[2:])
    return conv2d_nhwc(
        x, packed, bias, residual, kernel, tuple(padding), tuple(dilation), relu_in, relu_out, slot
    )


@triton_conv.register_fake
def _triton_conv_fake(x, weight, packed, bias, residual, padding, dilation, relu_in, relu_out, slot):
    height, width = (
        size + 2 * pad - dil * (k - 1)
        for size, pad, dil, k in zip(x.shape[2:], padding, dilation, weight.shape[2:], strict=True)
    )
    shape = (x.shape[0], weight.shape[0], height, width)
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


class TritonConv(nn.Conv2d):
    """A stride-1 Conv2d (same parameters, same state-dict keys) run by crnet::triton_conv, with the ReLU of
    its input and, after its bias, a residual add and a ReLU as the caller asks."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> TritonConv:
        if (
            conv.stride != (1, 1)
            or conv.groups != 1
            or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)
        ):
            raise ValueError(f"the Triton convolution takes plain stride-1 convolutions, not {conv}")
        twin = conv_twin(cls, conv)
        # The weight as the kernel reads it, made once like the fold's (later weight updates do not reach it).
        twin.register_buffer("packed", _pack(conv.weight), persistent=False)
        twin.slot = next(_SLOTS)
        return twin

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        relu_in: bool = False,
        relu_out: bool = False,
    ) -> torch.Tensor:
        padding, dilation = list(self.padding), list(self.dilation)
        return triton_conv(
            x, self.weight, self.packed, self.bias, residual, padding, dilation, relu_in, relu_out, self.slot
        )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """triton_conv.pack_weight, spelled here so that the module imports without Triton."""
    return weight.detach().permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


class TritonResidualBranch(ResidualBranch):
    """A ResidualBranch (same keys) whose blocks are two Triton convolutions each, the ReLUs and the skip
    inside them."""

    @classmethod
    def of(cls, branch: ResidualBranch) -> TritonResidualBranch:
        twin = cls.__new__(cls)
        nn.Sequential.__init__(
            twin, nn.Identity(), TritonConv.of(branch[1]), nn.Identity(), TritonConv.of(branch[3])
        )
        return twin.train(branch.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[3](self[1](x, relu_in=True, relu_out=True))

    def residual_block(self, x: torch.Tensor) -> torch.Tensor:
        return self[3](self[1](x, relu_in=True, relu_out=True), x)

    def tail(self, first: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self[3](first, skip, relu_in=True)


class ReLUTritonConv(TritonConv):
    """A TritonConv that applies its ReLU after the bias: an ASPP branch, its branch_relu inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x, relu_out=True)


def triton_head(model: nn.Module) -> nn.Module:
    """Run the refinement loop's 3x3 convolutions of `model` as Triton kernels, in place; an inference
    transform like folding (after conv_epilogues.fuse_conv_epilogues where both are). Returns the model."""
    for module in list(model.modules()):
        if isinstance(module, Refinement):
            for name in ("feedback", "residual2", "residual3"):
                setattr(module, name, TritonResidualBranch.of(getattr(module, name)))
        elif isinstance(module, ASPP):
            if not all(type(b) in (nn.Conv2d, ConvReLU) for b in module.branches):
                raise ValueError("the Triton head takes the ASPP's own convolutions (not banded ones)")
            relu_in_branch = isinstance(module.branches[0], ConvReLU)
            module.branches = nn.ModuleList(
                ReLUTritonConv.of(b) if b.kernel_size != (1, 1) or not relu_in_branch else b
                for b in module.branches
            )
            module.branch_relu = nn.Identity()
    return model
