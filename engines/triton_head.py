"""`+triton-head` and `+triton-encoder`: the model's 3x3 convolutions as the Triton kernels of triton_conv.py,
for inference on CUDA. What `+triton-head` changes, per iteration of the hoisted loop
(crnet/model/refinement.py):

- the feedback block's first convolution, whose share of the features is hoisted, is one kernel over the
  2 probability channels that adds the hoisted share and applies the ReLU in its epilogue;
- each residual block, relu(h) -> conv -> relu -> conv -> + h, is two kernels: the first convolution
  writes its ReLU'd output, the second adds its bias and h in its epilogue and writes the block's output
  twice, as it is (the next skip) and ReLU'd (the next block's input): no elementwise pass between blocks;
- the ASPP's four pixel branches (the 1x1 as the centre tap of a 3x3) are one kernel launch, every
  branch's tiles at once, each writing its ReLU'd output straight into its channels of the concatenation
  the projection reads: no stream to fork, no copy to concatenate;
- the last block's second convolution also writes each image's sums of its output over its pixels, and
  the ASPP's image-pooling term comes from those sums in two launches of one kernel, a program per
  image and block of output channels (no pass over the map for the mean);
- the ASPP's projection, its per-sample bias (the pooled branch) and ReLU, the classifier and the softmax
  the next iteration reads are one kernel (triton_project.py): the projected map is never written;
- and, once per query, the condition module's three convolutions the same way.
`+triton-encoder` does the same for each bottleneck's size-keeping 1x1 and 3x3 convolutions and the
encoder's neck.

`crnet::triton_conv`, `crnet::triton_branches`, `crnet::triton_pooling_term` and
`crnet::triton_project_classify` are custom ops, so torch.compile traces each as one call (its fake impl gives
the output's shape and layout) and CUDA graphs capture its launch. On CUDA each shape runs whichever was
faster, timed on its first call: our kernel or the library's way (`_library_conv`, `_library_branches`,
`_library_pooling_term`, `_library_project_classify`: cuDNN's convolutions with their fused epilogues,
PyTorch's matrix products); off CUDA, the library's way.

Compiled, a call site whose shape chose the library's way is not the op: an opaque op runs that way eagerly,
each step a kernel of its own, where inductor would have fused the adds, ReLUs and concatenation with their
neighbours (on the H200, batch 64, that cost `+triton-head` 4.3 ms an episode: docs/BENCHMARKS.md). So
TorchRuntime runs each new shape once eagerly (EagerFirst), where every op times its choice, and the trace
that follows writes the library's way in plain PyTorch at the call sites where it won (runs_library).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from crnet import ops
from crnet.engines.cuda_graphs import signature_of
from crnet.model.backbone import Encoder
from crnet.model.condition import Condition
from crnet.model.conv_epilogues import ConvReLU, FusedBottleneck, FusedNeck, conv_bias_relu
from crnet.model.conv_twin import conv_twin, keeps_size, layout_of
from crnet.model.refinement import ASPP, Classifier, Refinement, ResidualBranch, pooling_term_of_mean

# The classifier's 2 columns, padded with zeros to a tensor-core product's least width (triton_project.py).
CLASS_COLUMNS = 16
# The column sums' slots per image (triton_conv.py): one per tile of the smallest candidate tile's pixels
# in an image, plus one, whatever tile is chosen, so that the op's output shape does not depend on it.
SUM_TILE = 32
_SLOTS = itertools.count()  # each convolution its own split counters (triton_conv.py)


def sum_slots(height: int, width: int) -> int:
    """The column sums' slots per image of an H x W map."""
    return -(-height * width // SUM_TILE) + 1


@torch.compiler.assume_constant_result
def runs_library(slot: int, shape: tuple[int, ...]) -> bool:
    """Whether the op at call site `slot` chose the library's way for inputs of `shape` on an earlier call (on
    CUDA, where it times). torch.compile calls this while it traces and keeps the answer as a constant."""
    chosen = sys.modules.get("crnet.engines.triton_conv")  # not imported: nothing was chosen
    return chosen is not None and chosen.chose_library(slot, tuple(shape))


class EagerFirst:
    """`compiled`, except that each new input signature runs `eager` once first: there the Triton ops time
    their choices for its shapes, before torch.compile traces it (runs_library)."""

    def __init__(self, eager: Callable[..., torch.Tensor], compiled: Callable[..., torch.Tensor]):
        self.eager, self.compiled = eager, compiled
        self.seen: set[tuple] = set()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        signature = signature_of(inputs)
        if signature not in self.seen:
            self.eager(*inputs)
            self.seen.add(signature)
        return self.compiled(*inputs)


@torch.library.custom_op("crnet::triton_conv", mutates_args=())
def triton_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    padding: list[int],
    dilation: list[int],
    relu_out: bool,
    relu_copy: bool,
    slot: int,
    column_sums: bool = False,
) -> list[torch.Tensor]:
    """[out = relu?(conv2d(x, weight, bias, stride 1) + residual)], then relu(out) with `relu_copy`, both
    channels-last, then with `column_sums` each image's sums of out over its pixels as (N, sum_slots(H, W),
    OC) FP32 slots to be added up; `packed` is the weight as pack_weight lays it out, read by the CUDA
    kernel. Off CUDA, the library's convolution."""
    return _library_conv(x, weight, bias, residual, padding, dilation, relu_out, relu_copy, column_sums)


def _library_conv(
    x, weight, bias, residual, padding, dilation, relu_out, relu_copy, column_sums=False
) -> list[torch.Tensor]:
    """What crnet::triton_conv computes, by PyTorch's convolution: on CUDA cuDNN's, with its fused epilogue
    where there is a ReLU (conv_epilogues.conv_bias_relu), the sums (if asked) in the first slot. The CUDA
    kernel times this beside its own tiles and runs it for the shapes where it is the faster."""
    if relu_out:
        out = conv_bias_relu(x, weight, bias, residual, [1, 1], padding, dilation)
    else:
        out = F.conv2d(x, weight, bias, 1, padding, dilation)
        out = out + residual if residual is not None else out
    out = out.contiguous(memory_format=torch.channels_last)
    outputs = [out, F.relu(out)] if relu_copy else [out]
    if column_sums:
        sums = out.new_zeros((out.shape[0], sum_slots(*out.shape[2:]), out.shape[1]), dtype=torch.float32)
        sums[:, 0] = out.float().sum(dim=(2, 3))
        outputs.append(sums)
    return outputs


@triton_conv.register_kernel("cuda")
def _triton_conv_cuda(
    x, weight, packed, bias, residual, padding, dilation, relu_out, relu_copy, slot, column_sums=False
):
    from crnet.engines.triton_conv import conv2d_nhwc

    def library():
        args = (padding, dilation, relu_out, relu_copy, column_sums)
        return _library_conv(x, weight, bias, residual, *args)

    kernel, padding, dilation = tuple(weight.shape[2:]), tuple(padding), tuple(dilation)
    args = (kernel, padding, dilation, relu_out, relu_copy, slot)
    return conv2d_nhwc(x, packed, bias, residual, *args, library=library, column_sums=column_sums)


@triton_conv.register_fake
def _triton_conv_fake(
    x, weight, packed, bias, residual, padding, dilation, relu_out, relu_copy, slot, column_sums=False
):
    shape = (x.shape[0], weight.shape[0], *x.shape[2:])  # the convolutions keep the map's size
    outputs = [x.new_empty(shape).contiguous(memory_format=torch.channels_last) for _ in range(1 + relu_copy)]
    if column_sums:
        slots = sum_slots(*x.shape[2:])
        outputs.append(x.new_empty((x.shape[0], slots, weight.shape[0]), dtype=torch.float32))
    return outputs


@torch.library.custom_op("crnet::triton_branches", mutates_args=())
def triton_branches(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    packed: torch.Tensor,
    biases: list[torch.Tensor],
    stacked_bias: torch.Tensor,
    geometry: list[int],
    slot: int,
) -> torch.Tensor:
    """concat(relu(conv2d(x, weights[b], biases[b], dilation of branch b, the padding that keeps the size)))
    over the branches b, channels-last; `packed` and `stacked_bias` are what the CUDA kernel reads, and
    `geometry` six numbers per branch (triton_conv.branches_nhwc). Off CUDA, the library's convolutions."""
    return _library_branches(x, weights, biases, geometry)


def _library_branches(x, weights, biases, geometry) -> torch.Tensor:
    """What crnet::triton_branches computes, one library convolution per branch (cuDNN's, with its fused ReLU,
    on CUDA) and their concatenation: timed on CUDA beside the one launch, as _library_conv is."""
    outs = []
    for b, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        dilation = geometry[6 * b + 2 : 6 * b + 4]
        padding = [d * (k - 1) // 2 for d, k in zip(dilation, weight.shape[2:], strict=True)]
        outs.append(conv_bias_relu(x, weight, bias, None, [1, 1], padding, dilation))
    return torch.cat(outs, dim=1).contiguous(memory_format=torch.channels_last)


@triton_branches.register_kernel("cuda")
def _triton_branches_cuda(x, weights, packed, biases, stacked_bias, geometry, slot):
    from crnet.engines.triton_conv import branches_nhwc

    def library():
        return [_library_branches(x, weights, biases, geometry)]

    geometries = [tuple(geometry[i : i + 6]) for i in range(0, len(geometry), 6)]
    return branches_nhwc(
        x, packed, stacked_bias, None, (3, 3), geometries, True, False, slot, library=library
    )[0]


@triton_branches.register_fake
def _triton_branches_fake(x, weights, packed, biases, stacked_bias, geometry, slot):
    shape = (x.shape[0], sum(w.shape[0] for w in weights), *x.shape[2:])
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("crnet::triton_project_classify", mutates_args=())
def triton_project_classify(
    branches: torch.Tensor,
    branch_weight: torch.Tensor,
    packed: torch.Tensor,
    pool_bias: torch.Tensor,
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor,
    packed_classifier: torch.Tensor,
    slot: int,
) -> list[torch.Tensor]:
    """[logits, probabilities] of Classifier.after_projection, in the branches' layout; `packed` and
    `packed_classifier` are what the CUDA kernel reads (triton_project.py). Off CUDA, the library's way."""
    return _library_project_classify(branches, branch_weight, pool_bias, classifier_weight, classifier_bias)


def _library_project_classify(branches, branch_weight, pool_bias, classifier_weight, classifier_bias):
    """What crnet::triton_project_classify computes, as the hoisted loop's four kernels; the CUDA kernel
    times this beside its own tiles and runs it for the shapes where it is the faster."""
    layout = layout_of(branches)
    h = F.relu(F.conv2d(branches, branch_weight) + pool_bias)
    logits = F.conv2d(h, classifier_weight, classifier_bias).contiguous(memory_format=layout)
    return [logits, ops.probabilities(logits).contiguous(memory_format=layout)]


@triton_project_classify.register_kernel("cuda")
def _triton_project_classify_cuda(
    branches, branch_weight, packed, pool_bias, classifier_weight, classifier_bias, packed_classifier, slot
):
    from crnet.engines.triton_project import project_classify

    def library():
        args = (branch_weight, pool_bias, classifier_weight, classifier_bias)
        return _library_project_classify(branches, *args)

    bias = pool_bias.reshape(pool_bias.shape[0], -1).contiguous()  # (N, C): a view of the (N, C, 1, 1) term
    layout = layout_of(branches)
    args = (packed, bias, packed_classifier, classifier_bias, layout, slot)
    return project_classify(branches, *args, library=library)


@triton_project_classify.register_fake
def _triton_project_classify_fake(
    branches, branch_weight, packed, pool_bias, classifier_weight, classifier_bias, packed_classifier, slot
):
    shape = (branches.shape[0], classifier_weight.shape[0], *branches.shape[2:])
    return [branches.new_empty(shape).contiguous(memory_format=layout_of(branches)) for _ in range(2)]


@torch.library.custom_op("crnet::triton_pooling_term", mutates_args=())
def triton_pooling_term(
    sums: torch.Tensor,
    pixels: int,
    pool_weight: torch.Tensor,
    pool_bias: torch.Tensor | None,
    share_weight: torch.Tensor,
    share_bias: torch.Tensor | None,
    packed_pool: torch.Tensor,
    packed_share: torch.Tensor,
) -> torch.Tensor:
    """The ASPP's image-pooling term (refinement.image_pooling_term), (N, C, 1, 1), from each image's sums
    of the map over its `pixels` pixels in slots (crnet::triton_conv's column sums) instead of the map;
    `packed_pool` and `packed_share` are what the CUDA kernel reads (triton_project.py). Off CUDA, the
    library's way."""
    return _library_pooling_term(sums, pixels, pool_weight, pool_bias, share_weight, share_bias)


def _library_pooling_term(sums, pixels, pool_weight, pool_bias, share_weight, share_bias) -> torch.Tensor:
    mean = (sums.sum(dim=1) / pixels).to(pool_weight.dtype)[:, :, None, None]
    return pooling_term_of_mean(mean, pool_weight, pool_bias, share_weight, share_bias).contiguous()


@triton_pooling_term.register_kernel("cuda")
def _triton_pooling_term_cuda(
    sums, pixels, pool_weight, pool_bias, share_weight, share_bias, packed_pool, packed_share
):
    from crnet.engines.triton_project import pooling_term

    def library():
        return _library_pooling_term(sums, pixels, pool_weight, pool_bias, share_weight, share_bias)

    if pool_bias is None or share_bias is None:  # the kernel adds both biases
        return library()
    return pooling_term(sums, pixels, packed_pool, pool_bias, packed_share, share_bias, library=library)


@triton_pooling_term.register_fake
def _triton_pooling_term_fake(
    sums, pixels, pool_weight, pool_bias, share_weight, share_bias, packed_pool, packed_share
):
    return sums.new_empty((sums.shape[0], share_weight.shape[0], 1, 1), dtype=pool_weight.dtype)


def conv_at(
    x, weight, packed, bias, residual, padding, dilation, relu_out, relu_copy, slot, column_sums=False
) -> list[torch.Tensor]:
    """crnet::triton_conv at call site `slot`, or its library's way where that won for this shape."""
    if runs_library(slot, tuple(x.shape)):
        return _library_conv(x, weight, bias, residual, padding, dilation, relu_out, relu_copy, column_sums)
    args = (padding, dilation, relu_out, relu_copy, slot, column_sums)
    return triton_conv(x, weight, packed, bias, residual, *args)


class TritonConv(nn.Conv2d):
    """A size-keeping stride-1 Conv2d (same parameters, same state-dict keys) run by crnet::triton_conv, with
    a residual add and a ReLU after its bias, and a ReLU'd copy of its output, as the caller asks."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> TritonConv:
        if not keeps_size(conv) or conv.padding_mode != "zeros":
            raise ValueError(f"the Triton convolution takes size-keeping stride-1 convolutions, not {conv}")
        twin = conv_twin(cls, conv)
        # The weight as the kernel reads it, made once like the fold's (later weight updates do not reach it).
        twin.register_buffer("packed", pack_weight(conv.weight), persistent=False)
        twin.slot = next(_SLOTS)
        return twin

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        *,
        relu_out: bool = False,
        relu_copy: bool = False,
        column_sums: bool = False,
    ) -> list[torch.Tensor]:
        padding, dilation = list(self.padding), list(self.dilation)
        args = (residual, padding, dilation, relu_out, relu_copy, self.slot, column_sums)
        return conv_at(x, self.weight, self.packed, self.bias, *args)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(OC, C, KH, KW) -> (KH * KW * C, OC): the GEMM's right-hand matrix the kernel reads, a tap's channels
    together (here, not in triton_conv.py, so that the transform runs where Triton is not installed)."""
    return weight.detach().permute(2, 3, 1, 0).reshape(-1, weight.shape[0]).contiguous()


class TritonResidualBranch(ResidualBranch):
    """A ResidualBranch (same keys) whose blocks are two Triton convolutions each: the first ReLUs its output,
    the second adds the skip and writes the block's output with its ReLU, which is the next block's input.
    So the ReLU before each block costs no pass of its own (the kernel does not ReLU what it reads: that
    would serialize Hopper's tensor-core instructions, triton_conv.py)."""

    @classmethod
    def of(cls, branch: ResidualBranch) -> TritonResidualBranch:
        twin = cls.__new__(cls)
        nn.Sequential.__init__(
            twin, nn.Identity(), TritonConv.of(branch[1]), nn.Identity(), TritonConv.of(branch[3])
        )
        # The feedback block's first convolution also reads the probabilities (its input channels past the
        # block's own): their share of its weight packed once, for feedback_tail.
        channels = branch[3].out_channels
        if branch[1].in_channels > channels:
            extra = branch[1].weight.detach()[:, channels:]
            twin.register_buffer("probability_packed", pack_weight(extra), persistent=False)
            twin.probability_slot = next(_SLOTS)
        return twin.train(branch.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[3](self.inner(x))[0]

    def inner(self, x: torch.Tensor, relu_x: torch.Tensor | None = None) -> torch.Tensor:
        """relu(conv1(relu(x))), the block's first convolution, from relu(x) where the caller has it."""
        return self[1](F.relu(x) if relu_x is None else relu_x, relu_out=True)[0]

    def residual_block(
        self, x: torch.Tensor, relu_x: torch.Tensor | None = None, *, relu_next: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        inner = self.inner(x, relu_x)
        out = self[3](inner, x, relu_copy=relu_next)
        return out[0], out[1] if relu_next else None

    def last_block(
        self, x: torch.Tensor, relu_x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block with each image's sums of its output over its pixels, from its second kernel's
        epilogue (the ASPP's pooling branch takes its mean from them, not from another pass over the map)."""
        if x.shape[2] * x.shape[3] < SUM_TILE:  # too small for a tile per slot: the ASPP takes its own mean
            return super().last_block(x, relu_x)
        inner = self.inner(x, relu_x)
        out, sums = self[3](inner, x, column_sums=True)
        return out, sums

    def feedback_tail(
        self,
        feature_term: torch.Tensor,
        y: torch.Tensor | None,
        probability_weight: torch.Tensor,
        skip: torch.Tensor,
        *,
        relu_next: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Two kernels: relu(feature_term + conv3x3(y)) as one Triton convolution over the 2 probability
        channels, feature_term its residual and the ReLU in its epilogue; then the second convolution."""
        if y is None:
            relu_first = F.relu(feature_term)
        else:
            args = (self.probability_packed, None, feature_term, [1, 1], [1, 1], True, False)
            relu_first = conv_at(y, probability_weight, *args, self.probability_slot)[0]
        out = self[3](relu_first, skip, relu_copy=relu_next)
        return out[0], out[1] if relu_next else None


class TritonASPP(ASPP):
    """An ASPP (the same parameters, the same state-dict keys) whose hoisted terms compute its four pixel
    branches as one crnet::triton_branches launch; its forward, which training and the paper's loop use, is
    the ASPP's own."""

    @classmethod
    def of(cls, aspp: ASPP) -> TritonASPP:
        for branch in aspp.branches:
            if (
                type(branch) not in (nn.Conv2d, ConvReLU)
                or not keeps_size(branch)
                or branch.kernel_size not in ((1, 1), (3, 3))
            ):
                raise ValueError(f"the Triton ASPP takes size-keeping 1x1 and 3x3 convolutions, not {branch}")
        twin = cls.sharing(aspp)
        # Every branch as a 3x3 kernel, tap-major: a 1x1 one is the centre tap, padding and dilation 1. Made
        # once, like the fold's (later weight updates do not reach it).
        stacked, geometry = [], []
        for branch in aspp.branches:
            weight = branch.weight.detach()
            if branch.kernel_size == (1, 1):
                weight = F.pad(weight, (1, 1, 1, 1))
                geometry += [1, 1, 1, 1, 4, 1]
            else:
                geometry += [*branch.padding, *branch.dilation, 0, 9]
            stacked.append(pack_weight(weight))
        biases = torch.stack([b.bias.detach() for b in aspp.branches])
        twin.register_buffer("packed", torch.stack(stacked), persistent=False)
        twin.register_buffer("stacked_bias", biases, persistent=False)
        # The pooling branch's 1x1 convolution and the projection's share of its output, as (C in, C out)
        # rows for crnet::triton_pooling_term.
        channels = aspp.image_pool.out_channels
        twin.register_buffer("packed_pool", pack_weight(aspp.image_pool.weight), persistent=False)
        share = aspp.project.weight.detach()[:, :channels]
        twin.register_buffer("packed_share", pack_weight(share), persistent=False)
        twin.geometry, twin.slot = geometry, next(_SLOTS)
        return twin

    def hoisted_terms(
        self,
        x: torch.Tensor,
        pool_weight: torch.Tensor,
        bias: torch.Tensor | None,
        sums: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ASPP.hoisted_terms; with `sums`, the pooling term is one crnet::triton_pooling_term call."""
        weights, biases = [b.weight for b in self.branches], [b.bias for b in self.branches]
        if runs_library(self.slot, tuple(x.shape)):
            branches = _library_branches(x, weights, biases, self.geometry)
        else:
            args = (self.packed, biases, self.stacked_bias, self.geometry, self.slot)
            branches = triton_branches(x, weights, *args)
        if sums is None:
            return branches, self.pooling_term(x, pool_weight, bias)
        pool = self.image_pool
        pixels = x.shape[2] * x.shape[3]
        packs = (self.packed_pool, self.packed_share)
        return branches, triton_pooling_term(sums, pixels, pool.weight, pool.bias, pool_weight, bias, *packs)


class TritonClassifier(Classifier):
    """The classifier (same parameters, same keys) whose after_projection is one call of
    crnet::triton_project_classify: the projection, its per-sample bias and ReLU, the classifier and the
    softmax in one kernel."""

    @classmethod
    def of(cls, classifier: Classifier, project: nn.Conv2d) -> TritonClassifier:
        if classifier.out_channels != 2 or classifier.kernel_size != (1, 1) or project.kernel_size != (1, 1):
            raise ValueError(
                f"the Triton classifier takes a 1x1 projection and 2-class classifier, not {classifier}"
            )
        twin = conv_twin(cls, classifier)
        # The projection's weight for its branches (its input channels past the pooled share), and the
        # classifier's 2 columns padded to the kernel's width: made once, like the fold's.
        channels = project.out_channels
        branch_weight = project.weight.detach()[:, channels:]
        twin.register_buffer("packed", pack_weight(branch_weight), persistent=False)
        padded = classifier.weight.new_zeros(channels, CLASS_COLUMNS)  # on the model's device, in its dtype
        padded[:, :2] = classifier.weight.detach()[:, :, 0, 0].t()
        twin.register_buffer("packed_classifier", padded, persistent=False)
        twin.slot = next(_SLOTS)
        return twin

    def after_projection(
        self, branches: torch.Tensor, branch_weight: torch.Tensor, pool_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if runs_library(self.slot, tuple(branches.shape)):
            args = (pool_bias, self.weight, self.bias)
            logits, probabilities = _library_project_classify(branches, branch_weight, *args)
        else:
            weights = (self.packed, pool_bias, self.weight, self.bias, self.packed_classifier, self.slot)
            logits, probabilities = triton_project_classify(branches, branch_weight, *weights)
        return logits, probabilities


class TritonCondition(Condition):
    """The condition module (same keys) as three Triton convolutions: the fusing one writes its output and
    that output's ReLU, which its residual block's first convolution reads; the second adds the skip in its
    epilogue. Training (with dropout) takes the ReLU as a pass of its own."""

    @classmethod
    def of(cls, condition: Condition) -> TritonCondition:
        twin = cls.__new__(cls)
        nn.Module.__init__(twin)
        twin.activation, twin.dropout = condition.activation, condition.dropout
        twin.fuse = TritonConv.of(condition.fuse)
        twin.residual = None if condition.residual is None else TritonResidualBranch.of(condition.residual)
        return twin.train(condition.training)

    def forward(self, features: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        tiled = prototype[:, :, None, None].expand_as(features)
        copy = self.residual is not None and not self.activation
        out = self.fuse(torch.cat([features, tiled], dim=1), relu_out=self.activation, relu_copy=copy)
        x, relu_x = out[0], out[0] if self.activation else out[-1] if copy else None
        if self.dropout and self.training:
            x, relu_x = F.dropout2d(x, self.dropout, True), None
        return x if self.residual is None else self.residual.residual_block(x, relu_x, relu_next=False)[0]


def triton_head(model: nn.Module) -> nn.Module:
    """Run the head's 3x3 convolutions (the condition module's and the refinement loop's, the ASPP's branches
    among them) of `model` as Triton kernels, in place; an inference transform like folding (after
    conv_epilogues.fuse_conv_epilogues where both are). Returns the model."""
    for module in list(model.modules()):
        if isinstance(module, Refinement):
            for name in ("feedback", "residual2", "residual3"):
                setattr(module, name, TritonResidualBranch.of(getattr(module, name)))
            if type(module.aspp) is not ASPP:
                raise ValueError(
                    f"the Triton head takes the ASPP as the model builds it, not {type(module.aspp)}"
                )
            module.aspp = TritonASPP.of(module.aspp)
            module.classifier = TritonClassifier.of(module.classifier, module.aspp.project)
    for parent in list(model.modules()):
        for name, module in list(parent.named_children()):
            if type(module) is Condition:
                setattr(parent, name, TritonCondition.of(module))
    return model


class TritonConvReLU(ConvReLU):
    """A ConvReLU (same parameters, same state-dict keys), relu(conv(x) + bias [+ residual]), run by
    crnet::triton_conv: the encoder's size-keeping convolutions, 1x1 and 3x3."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> TritonConvReLU:
        if not keeps_size(conv) or conv.padding_mode != "zeros":
            raise ValueError(f"the Triton convolution takes size-keeping stride-1 convolutions, not {conv}")
        twin = conv_twin(cls, conv)
        twin.register_buffer("packed", pack_weight(conv.weight), persistent=False)  # made once, as the fold's
        twin.slot = next(_SLOTS)
        return twin

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.with_weights(x, self.weight, self.bias, residual)

    def with_weights(self, x, weight, bias, residual=None) -> torch.Tensor:
        """Another bias (a bottleneck's joint one, conv_epilogues.FusedBottleneck) with its own weight; the
        kernel reads that weight packed, so no other."""
        if weight is not self.weight:
            raise NotImplementedError("a Triton convolution runs its own packed weight")
        padding, dilation = list(self.padding), list(self.dilation)
        args = (self.packed, bias, residual, padding, dilation, True, False, self.slot)
        return conv_at(x, weight, *args)[0]


class TritonNeck(FusedNeck):
    """The encoder's fused neck (same keys) as two Triton convolutions: the layer2 half, bare, then the layer3
    half with the bias, the layer2 half as its residual, and the ReLU in its epilogue."""

    @classmethod
    def of(cls, neck: FusedNeck) -> TritonNeck:
        conv = neck[0]
        if not keeps_size(conv):
            raise ValueError(f"the Triton neck takes a size-keeping stride-1 convolution, not {conv}")
        twin = cls.__new__(cls)
        nn.Sequential.__init__(twin, *neck)
        for half in ("layer2", "layer3"):
            weight = getattr(neck, f"{half}_weight")
            twin.register_buffer(f"{half}_weight", weight, persistent=False)
            twin.register_buffer(f"{half}_packed", pack_weight(weight), persistent=False)
        twin.slots = (next(_SLOTS), next(_SLOTS))
        return twin.train(neck.training)

    def forward(self, layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
        conv = self[0]
        padding, dilation = list(conv.padding), list(conv.dilation)
        half2, half3 = (self.layer2_weight, self.layer2_packed), (self.layer3_weight, self.layer3_packed)
        partial = conv_at(layer2, *half2, None, None, padding, dilation, False, False, self.slots[0])[0]
        out = conv_at(layer3, *half3, conv.bias, partial, padding, dilation, True, False, self.slots[1])
        return self[2](out[0])


def triton_encoder(model: nn.Module) -> nn.Module:
    """Run the encoder's size-keeping convolutions (each bottleneck's 1x1 and 3x3 ones, but the strided 3x3
    of layer2's first block) and its neck as Triton kernels, each shape where it is faster than cuDNN, in
    place: an inference transform of a model whose epilogues are fused (conv_epilogues.fuse_conv_epilogues),
    whose forms it takes. The projection shortcuts stay cuDNN's. Returns the model."""
    encoders = [m for m in model.modules() if isinstance(m, Encoder)]
    if not encoders or not all(isinstance(e.neck, FusedNeck) for e in encoders):
        raise ValueError("the Triton encoder takes the fused epilogues' encoder: fuse them first")
    for encoder in encoders:
        for module in encoder.trunk.modules():
            if isinstance(module, FusedBottleneck):
                for name in ("conv1", "conv2", "conv3"):
                    if keeps_size(getattr(module, name)):
                        setattr(module, name, TritonConvReLU.of(getattr(module, name)))
        encoder.neck = TritonNeck.of(encoder.neck)
    return model
