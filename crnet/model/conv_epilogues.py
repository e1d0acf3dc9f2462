"""Convolutions with their bias, residual add and ReLU fused into one cuDNN kernel, for inference on CUDA.

After BatchNorm folding (fold.py) most convolutions of CRNet are followed by a bias, often a ReLU and, at the
end of each bottleneck, a residual add. PyTorch runs each of these as its own pass over the feature map, and
inductor peels the bias off cuDNN's convolution and fuses it with the rest into one pass
(torch/_inductor/kernel/conv.py, `convolution`: "peel off the bias, cudnn is slower with it"). cuDNN can
apply all of it in the convolution's own epilogue, relu(conv(x) + bias + residual): no pass at all
(`aten::cudnn_convolution_relu` and `aten::cudnn_convolution_add_relu`, the ops TorchScript's frozen-graph
fusion rewrites conv-ReLU and conv-add-ReLU into: torch/csrc/jit/passes/frozen_conv_add_relu_fusion_cuda.cpp).
Each pass reads and writes a whole feature map: 440 MB for one of layer3's
1024-channel outputs at batch 64 (128 images of 41x41, FP16), and at batch 1 a few microseconds of launch
and memory time, for each of the encoder's 41 convolutions that end in a ReLU. Whether cuDNN's fused kernels
are as fast as its plain ones is measured, not assumed: `+cudnn-epilogues` is a runtime option of its own.

`crnet::conv_bias_relu` is a custom op, so that torch.compile traces it (its fake impl gives the output's
shape and layout) and CUDA graphs capture it; off CUDA it computes the same with plain PyTorch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crnet.model.backbone import Bottleneck, Encoder, Neck, ResNetTrunk
from crnet.model.conv_twin import conv_twin, layout_of
from crnet.model.refinement import ASPP, Refinement
from crnet.model.space_to_depth import SpaceToDepthConv


def _output_shape(x, weight, stride, padding, dilation) -> list[int]:
    spatial = [
        (size + 2 * pad - dil * (kernel - 1) - 1) // step + 1
        for size, kernel, step, pad, dil in zip(
            x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True
        )
    ]
    return [x.shape[0], weight.shape[0], *spatial]


@torch.library.custom_op("crnet::conv_bias_relu", mutates_args=())
def conv_bias_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> torch.Tensor:
    """relu(conv2d(x, weight) + bias [+ residual]); one cuDNN kernel on CUDA, plain PyTorch elsewhere."""
    return _unfused(x, weight, bias, residual, stride, padding, dilation)


def _unfused(x, weight, bias, residual, stride, padding, dilation) -> torch.Tensor:
    out = F.conv2d(x, weight, bias, stride, padding, dilation)
    if residual is not None:
        out = out + residual
    # The output channels-last when the input or the weight is: cuDNN's own choice, on every path here.
    return F.relu(out).contiguous(memory_format=layout_of(x, weight))


# cuDNN's fused engines are built for channels-last maps with whole 16-byte vectors of channels (8 FP16 ones)
# in and out; elsewhere (an NCHW model, the stem's 3-channel images) the plain path runs rather than risk "no
# engine" for one convolution.
ALIGNED_CHANNELS = 8


@conv_bias_relu.register_kernel("cuda")
def _conv_bias_relu_cuda(x, weight, bias, residual, stride, padding, dilation):
    aligned = weight.shape[0] % ALIGNED_CHANNELS == 0 and weight.shape[1] % ALIGNED_CHANNELS == 0
    fusable = aligned and layout_of(x, weight) == torch.channels_last
    if not (fusable and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled):
        return _unfused(x, weight, bias, residual, stride, padding, dilation)
    if residual is None:
        out = torch.ops.aten.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, 1)
    else:
        out = torch.ops.aten.cudnn_convolution_add_relu(
            x, weight, residual, 1.0, bias, stride, padding, dilation, 1
        )
    return out.contiguous(memory_format=layout_of(x, weight))


@conv_bias_relu.register_fake
def _conv_bias_relu_fake(x, weight, bias, residual, stride, padding, dilation):
    shape = _output_shape(x, weight, stride, padding, dilation)
    return x.new_empty(shape).contiguous(memory_format=layout_of(x, weight))


def _require_folded(norms: list[nn.Module]) -> None:
    """The epilogues fused here are a convolution's bias: a BatchNorm still after one would come too late."""
    if not all(isinstance(norm, nn.Identity) for norm in norms):
        raise ValueError("fuse the epilogues of a BatchNorm-folded model (crnet.model.fold)")


class ConvReLU(nn.Conv2d):
    """A Conv2d (same parameters, same state-dict keys) that applies its ReLU, and optionally a residual
    add before it, in the convolution: forward(x, residual=None) = relu(conv(x) + residual)."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvReLU:
        """The fused twin of `conv`, sharing its parameters."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"cannot fuse {conv}: grouped, string padding or non-zero padding mode")
        return conv_twin(cls, conv)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.with_weights(x, self.weight, self.bias, residual)

    def with_weights(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This convolution's geometry (stride, padding, dilation) with other weights or another bias: a
        padded, split or jointly biased version of its own."""
        stride, padding, dilation = list(self.stride), list(self.padding), list(self.dilation)
        return conv_bias_relu(x, weight, bias, residual, stride, padding, dilation)


class PaddedConvReLU(ConvReLU):
    """A ConvReLU whose input channels are not whole 16-byte vectors (the stem's 3 colours): on channels-last
    input it pads the image and the weight with zero channels to the next multiple of 8, which adds exact
    zeros, so that cuDNN's fused path takes it. The padding is one pass over the (3-channel) input; the
    epilogue it saves is one over the (64-channel) output."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> PaddedConvReLU:
        fused = super().of(conv)
        channels = -(-conv.in_channels // ALIGNED_CHANNELS) * ALIGNED_CHANNELS
        padded = F.pad(conv.weight.detach(), (0, 0, 0, 0, 0, channels - conv.in_channels))
        fused.register_buffer("padded_weight", padded, persistent=False)  # a copy, made once, like the fold
        return fused

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if layout_of(x, self.weight) != torch.channels_last:
            return super().forward(x, residual)
        padded = torch.empty(
            (x.shape[0], self.padded_weight.shape[1], *x.shape[2:]),
            dtype=x.dtype,
            device=x.device,
            memory_format=torch.channels_last,
        )
        padded[:, x.shape[1] :].zero_()
        padded[:, : x.shape[1]].copy_(x)
        return self.with_weights(padded, self.padded_weight, self.bias, residual)


def _split_weight(neck: Neck, conv: nn.Conv2d, layer2_channels: int) -> None:
    """The neck convolution's weight as its layer2 and layer3 halves, buffers of `neck`: conv(concat(a, b),
    W) = conv(a, W_a) + conv(b, W_b). Split once, like the fold: later weight updates do not reach them."""
    weight = conv.weight.detach()
    neck.register_buffer("layer2_weight", weight[:, :layer2_channels].clone(), persistent=False)
    neck.register_buffer("layer3_weight", weight[:, layer2_channels:].clone(), persistent=False)


class FusedNeck(Neck):
    """The encoder's neck without its concatenation: conv(concat(a, b), W) = conv(a, W_a) + conv(b, W_b), so
    the layer2 half is a bare convolution whose output joins the layer3 half's fused epilogue as its
    residual. The 1536-channel concatenation was a pass of its own over the largest map of the encoder."""

    def __init__(self, neck: Neck, layer2_channels: int):
        conv = neck[0]
        super().__init__(ConvReLU.of(conv), nn.Identity(), neck[2])  # the same state-dict keys
        _split_weight(self, conv, layer2_channels)

    def forward(self, layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
        conv = self[0]
        partial = F.conv2d(layer2, self.layer2_weight, None, conv.stride, conv.padding, conv.dilation)
        return self[2](conv.with_weights(layer3, self.layer3_weight, conv.bias, partial))


class BareNeck(Neck):
    """The encoder's neck as bare convolutions, one per level, and one pass for their sum, the bias and the
    ReLU: relu(conv(a, W_a) + conv(b, W_b) + bias), the same function as relu(conv(concat(a, b), W) +
    bias). FusedNeck hands that sum to cuDNN's fused add-ReLU epilogue; this leaves it to the pass, which
    torch.compile makes one pointwise kernel, so the convolutions may take cuDNN's plain kernels
    (`+bare-neck`).

    With `piece_channels`, each level's convolution is cut along its input channels into pieces of at most
    that many, one convolution each, summed in the same pass (`+split-neck`: pieces of 512). On the H200 at
    batch 64 (2026-11-27) the layer3 half, 1024 channels, ran cuDNN's sm80 kernels at 410 to 460 TFLOP/s
    (fused 2.45 ms, bare 2.22 ms), while the layer2 half, the same convolution over 512 channels, ran an
    sm90 one at about 800 (0.63 ms). Two 512-channel halves of layer3 cost a copy of each (a channel
    slice of a channels-last map is not dense), 0.1 to 0.3 ms apiece at that size. With `grouped` too, a
    level cut into equal pieces is one grouped convolution over the whole map instead (`+grouped-neck`):
    no copies, its output's groups summed in the same pass; whether cuDNN's grouped kernels keep the pieces'
    rate is what the GPU run measures."""

    SPLIT_CHANNELS = 512  # `+split-neck`'s and `+grouped-neck`'s pieces

    @classmethod
    def of(
        cls, neck: Neck, layer2_channels: int, piece_channels: int | None = None, grouped: bool = False
    ) -> BareNeck:
        """The bare twin of a Neck or FusedNeck (same parameters, same state-dict keys)."""
        conv = neck[0]
        bare = cls(conv, nn.Identity(), neck[2])
        weight = conv.weight.detach()
        levels = [(0, 0, layer2_channels), (1, layer2_channels, weight.shape[1])]
        # (level, first channel of that level, last + 1, groups): one convolution each
        bare.pieces = []
        for level, start, stop in levels:
            step = piece_channels or stop - start
            count = -(-(stop - start) // step)
            if grouped and count > 1 and (stop - start) % step == 0:
                # the pieces' weights stacked along the output channels: group g reads channels g*step..
                pieces = [weight[:, start + g * step : start + (g + 1) * step] for g in range(count)]
                terms = [(0, stop - start, count, torch.cat(pieces))]
            else:
                bounds = [(first, min(first + step, stop - start)) for first in range(0, stop - start, step)]
                terms = [(a, b, 1, weight[:, start + a : start + b]) for a, b in bounds]
            for first, last, groups, piece in terms:
                # split once, like the fold: later weight updates do not reach them
                name = f"piece{len(bare.pieces)}_weight"
                bare.register_buffer(name, piece.clone(), persistent=False)
                bare.pieces.append((level, first, last, groups))
        return bare.train(neck.training)

    def forward(self, layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
        conv = self[0]
        geometry = (conv.stride, conv.padding, conv.dilation)
        total = None
        for i, (level, first, stop, groups) in enumerate(self.pieces):
            x = (layer2, layer3)[level]
            x = x if stop - first == x.shape[1] else x[:, first:stop]
            part = F.conv2d(x, getattr(self, f"piece{i}_weight"), None, *geometry, groups)
            width = part.shape[1] // groups
            for g in range(groups):  # a grouped convolution's outputs, one per piece, summed
                share = part[:, g * width : (g + 1) * width] if groups > 1 else part
                total = share if total is None else total + share
        if conv.bias is not None:
            total = total + conv.bias.view(1, -1, 1, 1)
        return self[2](F.relu(total))


def bare_neck(model: nn.Module, piece_channels: int | None = None, grouped: bool = False) -> nn.Module:
    """Every encoder's neck (plain or fused) as a BareNeck, in place, its levels' convolutions in pieces of
    at most `piece_channels` input channels if given (`grouped`: as one grouped convolution where a level
    cuts evenly); an inference transform. Returns the model."""
    for module in list(model.modules()):
        if isinstance(module, Encoder):
            channels = module.trunk.out_channels[0]
            module.neck = BareNeck.of(module.neck, channels, piece_channels, grouped)
    return model


class FusedBottleneck(nn.Module):
    """A BatchNorm-folded Bottleneck as three fused convolutions, the last of which adds the shortcut.

    A projection shortcut's bias joins the last convolution's, relu(conv3(y) + b3 + (proj(x) + bp)) =
    relu(conv3(y) + (b3 + bp) + proj(x)), so the projection runs without one: a bare convolution, no pass
    over its (largest-in-the-block) output for the bias."""

    def __init__(self, block: Bottleneck):
        super().__init__()
        norms = [getattr(block, f"bn{i}") for i in (1, 2, 3)]
        _require_folded(norms + ([] if block.downsample is None else [block.downsample[1]]))
        self.conv1, self.conv2, self.conv3 = (ConvReLU.of(getattr(block, f"conv{i}")) for i in (1, 2, 3))
        self.downsample = block.downsample
        if self.downsample is not None:  # computed once, like the fold: later weight updates do not reach it
            projection = self.downsample[0]
            self.register_buffer("joint_bias", (self.conv3.bias + projection.bias).detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        if self.downsample is None:
            return self.conv3(y, residual=x)
        projection = self.downsample[0]
        shortcut = F.conv2d(x, projection.weight, None, projection.stride)
        return self.conv3.with_weights(y, self.conv3.weight, self.joint_bias, shortcut)


def fuse_conv_epilogues(model: nn.Module) -> nn.Module:
    """Give every convolution of a BatchNorm-folded model that a ReLU follows its ReLU (and the bottlenecks'
    last convolution its residual add), in place; an inference transform like folding. Returns the model.

    Covered: the trunk's stem and bottlenecks, the encoder's neck (without its concatenation), every
    Sequential's conv-then-ReLU pair (the residual branches of the condition and refinement modules), the
    ASPP branches, and the same
    convolutions inside the native refinement op (`crnet::refine_loop`'s cudnn_epilogues)."""
    for module in list(model.modules()):
        if isinstance(module, ResNetTrunk):
            _require_folded([module.bn1])
            if not isinstance(module.conv1, SpaceToDepthConv):  # already aligned: its ReLU stays apart
                module.conv1, module.relu = PaddedConvReLU.of(module.conv1), nn.Identity()
        elif isinstance(module, Encoder) and not isinstance(module.neck, (FusedNeck, BareNeck)):
            module.neck = FusedNeck(module.neck, module.trunk.out_channels[0])
        elif isinstance(module, ASPP):
            module.branches = nn.ModuleList(ConvReLU.of(branch) for branch in module.branches)
            module.branch_relu = nn.Identity()
        elif isinstance(module, Refinement):  # the native op's own convolutions
            module.cudnn_epilogues = True
        if isinstance(module, nn.Sequential):
            for i in range(len(module)):
                if isinstance(module[i], Bottleneck):
                    module[i] = FusedBottleneck(module[i])
                elif (
                    type(module[i]) is nn.Conv2d
                    and i + 1 < len(module)
                    and isinstance(module[i + 1], nn.ReLU)
                ):
                    module[i], module[i + 1] = ConvReLU.of(module[i]), nn.Identity()
    return model
