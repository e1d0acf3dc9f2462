"""CRNet: Siamese encoder -> cross-reference -> condition -> iterative refinement, for support and query.

Inference is split at the support prompt: since the common vector c acts channel-wise,
prototype(F_s * c) = c * prototype(F_s), so a query needs only two C-vectors per support set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from crnet.config import ModelConfig
from crnet.errors import InputError, NoSupportError
from crnet.model.backbone import Encoder, load_torchvision_weights
from crnet.model.condition import Condition, foreground, masked_average_pool, weighted_average_pool
from crnet.model.cross_reference import CrossReference
from crnet.model.inputs import (
    check_exit_fraction,
    check_features,
    check_images,
    check_prompt,
    check_support_masks,
)
from crnet.model.refinement import Refinement

# (N, C, h, w) features, (N, 1, H, W) float foreground -> (N, C) support vectors and prototypes
ShotPrompts = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SupportPrompt:
    """What a query needs from its supports, averaged over the k shots."""

    vector: torch.Tensor  # (B, C) support channel importance v_s
    prototype: torch.Tensor  # (B, C) masked average of the support features (before reweighting by c)

    @classmethod
    def of_shots(
        cls, shot_prompts: ShotPrompts, features: torch.Tensor, masks: torch.Tensor
    ) -> SupportPrompt:
        """(B, K, C, h, w) support features and (B, K, H, W) masks {0, 1, 255} -> the k-shot prompt: the
        mean over the K shots of what `shot_prompts` (the model's, or a runtime's) gives for each shot."""
        shots = features.shape[1]
        if shots == 0:
            raise NoSupportError("an episode needs at least one support image")
        vector, prototype = shot_prompts(features.flatten(0, 1), foreground(masks.flatten(0, 1)))
        return cls(
            vector=vector.unflatten(0, (-1, shots)).mean(1),
            prototype=prototype.unflatten(0, (-1, shots)).mean(1),
        )


@dataclass(frozen=True)
class Prediction:
    """Logits at feature resolution: query (B, 2, h, w); support (B, K, 2, h, w) in training, else None."""

    query: torch.Tensor
    support: torch.Tensor | None


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Feature-resolution logits -> image resolution (bilinear, corners aligned, as CaNet's train.py)."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def _checking() -> bool:
    """Whether to check arguments: not while torch.compile, torch.export or torch.jit traces the model (the
    checks would add guards on sizes the graphs leave free, or tracer warnings)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


class CRNet(nn.Module):
    """CRNet (Liu et al., CVPR 2020). For inference, load a checkpoint with crnet.checkpoint.load_model
    (eval mode) and call, under torch.no_grad():

        features = model.encode(images)                  # (N, 3, H, W) normalised -> (N, C, h, w)
        prompt = model.prompt(support_features, masks)   # (B, K, C, h, w), (B, K, H, W) of 0/1/255
        logits = model.segment(query_features, prompt)   # (B, C, h, w) -> (B, 2, h, w); channel 1 = object

    Images are RGB normalised like ImageNet (crnet.data.episodes.to_model_input does it). A prompt of batch
    1 serves any number of queries. `forward` runs a whole episode (training)."""

    def __init__(self, config: ModelConfig, *, fused: bool | None = None):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.cross_reference = CrossReference(config.channels)
        self.condition = Condition(
            config.channels,
            activation=config.fusion_activation,
            dropout=config.fusion_dropout,
            residual=config.condition_residual,
        )
        self.refinement = Refinement(
            config.channels, config.aspp_dilations, fused=fused, head_dropout=config.head_dropout
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, C, h, w) features at output stride 8."""
        if _checking():
            check_images(images)
            weights = next(self.encoder.parameters()).dtype
            device = images.device.type  # autocast knows only some devices ('meta' raises)
            autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
            if images.dtype != weights and not autocast:
                raise InputError(f"images are {images.dtype} and the model's weights {weights}: convert one")
        return self.encoder(images)

    def prompt(self, support_features: torch.Tensor, support_masks: torch.Tensor) -> SupportPrompt:
        """(B, K, C, h, w) features and (B, K, H, W) masks {0, 1, 255} -> the k-shot support prompt (a mask
        without a 1 gives a zero prototype)."""
        if _checking():
            check_features(support_features, "B, K, C, h, w", "support features")
            # training's masks come from the indexed data, where a small object may vanish in the resize
            check_support_masks(
                support_features, support_masks, say_empty=not self.training, side=support_features.shape[-1]
            )
        return SupportPrompt.of_shots(self.shot_prompts, support_features, support_masks)

    def shot_prompts(
        self, features: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt per shot, before the k-shot average: (N, C, h, w) features and (N, 1, H, W) float
        foreground -> (N, C) support vectors and prototypes. The exported prompt graph is this function."""
        return self.cross_reference.support_vector(features), weighted_average_pool(features, weights)

    def segment(
        self,
        query_features: torch.Tensor,
        prompt: SupportPrompt,
        iterations: int | None = None,
        *,
        output_size: tuple[int, int] | None = None,
        previous: torch.Tensor | None = None,
        exit_fraction: float = 0.0,
        fused: bool | None = None,
        return_iterations: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) query features + support prompt -> (B, 2, h, w) logits (channel 1: the object), or
        at `output_size` when given (bilinear, corners aligned).

        exit_fraction, 0 to 1, > 0 stops a query's refinement early once its mask settles (see
        Refinement.run); `fused` overrides the model's choice of the native loop; `return_iterations` also
        returns the iterations each query used."""
        if _checking():
            check_features(query_features, "B, C, h, w", "query features")
            check_prompt(prompt, *query_features.shape[:2])
            check_exit_fraction(exit_fraction)
        common = prompt.vector * self.cross_reference.query_vector(query_features)
        x = self.condition(query_features * common[:, :, None, None], prompt.prototype * common)
        logits, used = self.refinement.run(
            x, self.config.refinement_iterations(iterations), previous, exit_fraction, fused=fused
        )
        logits = logits if output_size is None else upsample(logits, output_size)
        return (logits, used) if return_iterations else logits

    def forward(
        self,
        query_images: torch.Tensor,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        query_masks: torch.Tensor | None = None,
        *,
        iterations: int | None = None,
        query_previous: torch.Tensor | None = None,
        support_previous: torch.Tensor | None = None,
    ) -> Prediction:
        """One episode. With query masks (training) the supports are predicted too, conditioned on the query.

        Shapes: query (B, 3, H, W), supports (B, K, 3, H, W), masks (B, K, H, W) and (B, H, W);
        previous probabilities (B, 2, h, w) and (B, K, 2, h, w) seed the refinement (zeros when None).
        """
        batch, shots = support_images.shape[:2]
        if shots == 0:
            raise NoSupportError("an episode needs at least one support image")
        query_features = self.encode(query_images)
        support_features = self.encode(support_images.flatten(0, 1)).unflatten(0, (batch, shots))
        return self.heads(
            query_features,
            support_features,
            support_masks,
            query_masks,
            iterations=iterations,
            query_previous=query_previous,
            support_previous=support_previous,
        )

    def heads(
        self,
        query_features: torch.Tensor,
        support_features: torch.Tensor,
        support_masks: torch.Tensor,
        query_masks: torch.Tensor | None = None,
        *,
        iterations: int | None = None,
        query_previous: torch.Tensor | None = None,
        support_previous: torch.Tensor | None = None,
    ) -> Prediction:
        """`forward` after the encoder: everything k-shot fine-tuning updates."""
        batch, shots = support_features.shape[:2]
        prompt = self.prompt(support_features, support_masks)
        query = self.segment(query_features, prompt, iterations, previous=query_previous)
        if query_masks is None:
            return Prediction(query=query, support=None)

        # Support branch: each shot is segmented with the query as its support (the query mask exists).
        flat_support = support_features.flatten(0, 1)
        query_vector = self.cross_reference.query_vector(query_features).repeat_interleave(shots, 0)
        common = self.cross_reference.support_vector(flat_support) * query_vector
        query_prototype = masked_average_pool(query_features, query_masks).repeat_interleave(shots, 0)
        x = self.condition(flat_support * common[:, :, None, None], query_prototype * common)
        previous = None if support_previous is None else support_previous.flatten(0, 1)
        support = self.refinement(x, self.config.refinement_iterations(iterations), previous)
        return Prediction(query=query, support=support.unflatten(0, (batch, shots)))


def build_model(
    config: ModelConfig, *, backbone_weights: str | Path | None = None, fused: bool | None = None
) -> CRNet:
    """A new CRNet for the config, in training mode; `backbone_weights` is a torchvision resnet50 state-dict
    file. `fused`: run the refinement loop as the native op at inference (default: when the library is
    built). A trained model: crnet.checkpoint.load_model(path), which also puts it in eval mode."""
    model = CRNet(config, fused=fused)
    if backbone_weights is not None:
        load_torchvision_weights(model.encoder.trunk, backbone_weights)
    return model
