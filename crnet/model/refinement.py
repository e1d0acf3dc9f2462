"""Mask refinement: iterate y_t = softmax(classifier(ASPP(h(X, y_{t-1})))) from y_0 = 0.

At inference the PyTorch loop computes once what does not change across iterations (`Refinement.hoisted`):
the first feedback convolution sees concat(X, y), and ReLU-then-convolution splits over the concatenation,
conv(relu([X, y])) = conv_X(relu(X)) + conv_y(relu(y)), so the X half (256 of 258 input channels) is
computed once per call instead of once per iteration; and the ASPP image-pooling branch is constant over
the pixels, so its share of the 1x1 projection is a per-sample bias, not 256 input channels of every pixel.
Both are exact rewrites (only rounding differs); the native op does the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crnet import ops


def image_pooling_term(
    x: torch.Tensor,
    pool_weight: torch.Tensor,
    pool_bias: torch.Tensor | None,
    share_weight: torch.Tensor,
    share_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The ASPP's image-pooling branch as its share of the projection, a per-sample bias (N, C, 1, 1):
    conv(relu(image_pool(mean(x))), share_weight, share_bias), image_pool a 1x1 convolution."""
    return pooling_term_of_mean(ops.spatial_mean(x), pool_weight, pool_bias, share_weight, share_bias)


def pooling_term_of_mean(
    mean: torch.Tensor,
    pool_weight: torch.Tensor,
    pool_bias: torch.Tensor | None,
    share_weight: torch.Tensor,
    share_bias: torch.Tensor | None,
) -> torch.Tensor:
    """image_pooling_term from the (N, C, 1, 1) mean of x, where it is already known."""
    return F.conv2d(F.relu(F.conv2d(mean, pool_weight, pool_bias)), share_weight, share_bias)


class ResidualBranch(nn.Sequential):
    """ReLU-conv3x3-ReLU-conv3x3: the branch of a residual block (the caller adds the skip)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__(
            nn.ReLU(),
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def residual_block(
        self, x: torch.Tensor, relu_x: torch.Tensor | None = None, *, relu_next: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole block, x + branch(x), and its ReLU or None. An inference form (engines/triton_head.py)
        writes the ReLU with the sum when `relu_next` asks, for the next block to take as `relu_x`; here
        the branch applies its own ReLU, so: None."""
        return x + self(x), None

    def last_block(
        self, x: torch.Tensor, relu_x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loop's last block, which the ASPP reads: x + branch(x), and None. An inference form
        (engines/triton_head.py) gives each image's sums of it over its pixels instead, made by the block's
        last kernel, for the ASPP's pooling branch (ASPP.hoisted_terms)."""
        return self.residual_block(x, relu_x, relu_next=False)[0], None

    def feedback_tail(
        self,
        feature_term: torch.Tensor,
        y: torch.Tensor | None,
        probability_weight: torch.Tensor,
        skip: torch.Tensor,
        *,
        relu_next: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The feedback block from its first convolution's hoisted part on: with first = feature_term +
        conv3x3(y, probability_weight) (y None: zero), skip + conv2(relu(first)), and its ReLU or None, as
        residual_block gives them."""
        first = feature_term if y is None else feature_term + F.conv2d(y, probability_weight, padding=1)
        return skip + self[3](F.relu(first)), None


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image pooling, 1x1 and three dilated 3x3 branches, fused by a 1x1."""

    def __init__(self, channels: int, dilations: tuple[int, int, int], dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout  # Dropout2d on every branch and on the projection (training only)
        self.image_pool = nn.Conv2d(channels, channels, 1)
        self.branches = nn.ModuleList(
            [nn.Conv2d(channels, channels, 1)]
            + [nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in dilations]
        )
        self.project = nn.Conv2d(channels * (len(dilations) + 2), channels, 1)
        self.branch_relu = nn.ReLU()  # an Identity once the branches apply it themselves (conv_epilogues.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self._drop(F.relu(self.image_pool(ops.spatial_mean(x)))).expand_as(x)
        outs = [pooled] + [self._drop(self.branch_relu(branch(x))) for branch in self.branches]
        return self._drop(F.relu(self.project(torch.cat(outs, dim=1))))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(x, self.dropout, self.training) if self.dropout else x

    @classmethod
    def sharing(cls, aspp: ASPP) -> ASPP:
        """An instance of this (sub)class made of `aspp`'s very modules, so its parameters and state-dict
        keys: the start of an inference form's twin."""
        dilations = tuple(branch.dilation[0] for branch in aspp.branches[1:])
        with torch.device("meta"):  # no storage: the modules are aspp's
            twin = cls(aspp.image_pool.in_channels, dilations, aspp.dropout)
        twin.image_pool, twin.branches, twin.project = aspp.image_pool, aspp.branches, aspp.project
        twin.branch_relu = aspp.branch_relu
        return twin.train(aspp.training)

    def hoisted_terms(
        self,
        x: torch.Tensor,
        pool_weight: torch.Tensor,
        bias: torch.Tensor | None,
        sums: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the hoisted loop takes of the ASPP (eval mode): the pixel branches' outputs, concatenated, and
        the image-pooling branch's share of the projection (`pool_weight`, its first input channels) with the
        projection's `bias`, as a per-sample bias (N, C, 1, 1). `sums`, each image's sums of x over its
        pixels where the block that made x gave them (ResidualBranch.last_block), is for an inference form
        that takes the mean from them; this one takes its own."""
        branches = torch.cat([self.branch_relu(branch(x)) for branch in self.branches], dim=1)
        return branches, self.pooling_term(x, pool_weight, bias)

    def pooling_term(
        self, x: torch.Tensor, pool_weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """hoisted_terms' per-sample bias (image_pooling_term with this ASPP's image-pooling convolution)."""
        return image_pooling_term(x, self.image_pool.weight, self.image_pool.bias, pool_weight, bias)


class Classifier(nn.Conv2d):
    """The 1x1 convolution to the 2 class logits (a Conv2d: same state-dict keys). `after_projection` is how
    the hoisted loop ends an iteration; an inference form (engines/triton_head.py) does all of it at once."""

    def after_projection(
        self, branches: torch.Tensor, branch_weight: torch.Tensor, pool_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ASPP's projection of its concatenated pixel branches (`branch_weight`, 1x1) with its pooled
        share and bias as the per-sample `pool_bias`, its ReLU, then the logits and their probabilities."""
        logits = self(F.relu(F.conv2d(branches, branch_weight) + pool_bias))
        return logits, ops.probabilities(logits)


class Refinement(nn.Module):
    """h = X + R1([X, y]); h += R2(h); h += R3(h); logits = classifier(ASPP(h))."""

    def __init__(
        self,
        channels: int,
        dilations: tuple[int, int, int],
        *,
        fused: bool | None = None,
        head_dropout: float = 0.0,
    ):
        super().__init__()
        self.dilations = tuple(dilations)
        # The native crnet::refine_loop op at inference (ops.use_native: None = where it can run, True =
        # required, False = never); off for export (ONNX has no such op).
        self.fused = fused
        # The PyTorch loop at inference computes the iteration-invariant terms once (`hoisted`); False runs it
        # exactly as `step` writes it, as plain PyTorch would (the anchor of GPU benches).
        self.hoist = True
        # The op's convolutions that end in a ReLU as cuDNN's fused kernels (set by conv_epilogues.py).
        self.cudnn_epilogues = False
        self.feedback = ResidualBranch(channels + 2, channels)
        self.residual2 = ResidualBranch(channels, channels)
        self.residual3 = ResidualBranch(channels, channels)
        self.aspp = ASPP(channels, dilations, head_dropout)
        self.classifier = Classifier(channels, 2, 1)

    def step(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """One iteration: conditioned features X and previous probabilities y (N, 2, h, w) -> logits."""
        h = x + self.feedback(torch.cat([x, previous], dim=1))
        h = h + self.residual2(h)
        h = h + self.residual3(h)
        return self.classifier(self.aspp(h))

    def op_weights(self) -> list[torch.Tensor]:
        """The parameters in crnet::refine_loop's order (cpp_ext/ops/schema.cpp)."""
        convs = [self.feedback[1], self.feedback[3], self.residual2[1], self.residual2[3]]
        convs += [self.residual3[1], self.residual3[3], self.aspp.image_pool, *self.aspp.branches]
        convs += [self.aspp.project, self.classifier]
        return [t for conv in convs for t in (conv.weight, conv.bias)]

    def forward(self, x: torch.Tensor, iterations: int, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Run `iterations` steps from `previous` (zeros when None); returns the last logits."""
        return self.run(x, iterations, previous)[0]

    def run(
        self,
        x: torch.Tensor,
        iterations: int,
        previous: torch.Tensor | None = None,
        exit_fraction: float = 0.0,
        *,
        fused: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, plus the iterations each sample used (fewer than T only with early exit: a sample stops
        once fewer than `exit_fraction` of its mask pixels changed between two iterations). `fused`
        overrides the module's setting for this call; with gradients the PyTorch loop runs (the op has no
        backward)."""
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        weights = self.op_weights()
        grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
        if not grad and ops.use_native(x, self.fused if fused is None else fused):
            return ops.refine_loop(
                x,
                previous,
                weights,
                self.dilations,
                iterations,
                exit_fraction,
                native=True,
                cudnn_epilogues=self.cudnn_epilogues,
            )
        if exit_fraction > 0:
            return ops.refine_loop_reference(x, previous, weights, self.dilations, iterations, exit_fraction)
        used = torch.full((x.shape[0],), iterations, dtype=torch.long, device=x.device)
        if not grad and not self.training and self.hoist:
            return self.hoisted(x, iterations, previous), used
        y = x.new_zeros(x.shape[0], 2, *x.shape[2:]) if previous is None else previous
        for _ in range(iterations):
            logits = self.step(x, y)
            y = ops.probabilities(logits)
        return logits, used

    def hoisted(self, x: torch.Tensor, iterations: int, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The inference loop (eval mode: no dropout), with the iteration-invariant terms computed once."""
        channels = x.shape[1]
        first = self.feedback[1]
        feature_weight, probability_weight = first.weight[:, :channels], first.weight[:, channels:]
        project = self.aspp.project
        pool_weight, branch_weight = project.weight[:, :channels], project.weight[:, channels:]
        feature_term = F.conv2d(F.relu(x), feature_weight, first.bias, padding=1)
        # y_0 = 0 adds nothing; a given `previous` is ReLU'd as in the concatenation, softmax needs no ReLU.
        y = None if previous is None else F.relu(previous)
        for _ in range(iterations):
            h, relu_h = self.feedback.feedback_tail(feature_term, y, probability_weight, x)
            h, relu_h = self.residual2.residual_block(h, relu_h)
            h, sums = self.residual3.last_block(h, relu_h)  # the ASPP reads h itself
            branches, pool_bias = self.aspp.hoisted_terms(h, pool_weight, project.bias, sums)
            logits, y = self.classifier.after_projection(branches, branch_weight, pool_bias)
        return logits
