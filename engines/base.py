"""The one interface every runtime implements: encode, prompt, segment, close.

Tensors in and out are torch tensors on the runtime's device, FP32:
    encode(images (N, 3, S, S) normalised)                        -> features (N, C, s, s)
    prompt(features (B, K, C, s, s), masks (B, K, S, S) {0,1,255}) -> SupportPrompt, the k shots averaged
    segment(features (B, C, s, s), prompt)                         -> logits (B, 2, S, S) at input size
    episode(query, supports, masks) and query(images, prompt): the whole episode, the cached-prompt query
A runtime that cannot load raises RuntimeUnavailable with a one-line reason.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from crnet.errors import CRNetError
from crnet.model.crnet import SupportPrompt
from crnet.model.inputs import check_episode, check_features, check_images, check_prompt, check_support_masks


class RuntimeUnavailable(CRNetError):
    """This runtime cannot run here: a missing library, device or engine."""


class Runtime(ABC):
    name: str  # "torch", "onnxruntime", "tensorrt"
    precision: str  # "fp32" or "fp16"
    device: torch.device
    input_size: int
    iterations: int
    max_batch: int | None = None  # engines built for a batch range refuse more

    @property
    def label(self) -> str:
        """How tables name this runtime, e.g. 'onnxruntime fp16'."""
        return f"{self.name} {self.precision}"

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised images -> (N, C, s, s) features (implementations call check_images)."""

    @abstractmethod
    def prompt_per_shot(
        self, features: torch.Tensor, foreground: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, s, s) features, (N, 1, S, S) float foreground -> (N, C) vectors and prototypes."""

    @abstractmethod
    def segment(self, features: torch.Tensor, prompt: SupportPrompt) -> torch.Tensor:
        """(B, C, s, s) query features and a prompt (of batch B, or 1 for every query) -> (B, 2, S, S)
        logits at input size, channel 1 the object (implementations call check_segment)."""

    def check_images(self, images: torch.Tensor, name: str = "images") -> None:
        self.check_open()
        check_images(images, name, self.input_size)

    def check_segment(self, features: torch.Tensor, prompt: SupportPrompt) -> None:
        self.check_open()
        check_features(features, "B, C, s, s", "query features")
        check_prompt(prompt, *features.shape[:2])

    closed = False

    def close(self) -> None:
        """Release sessions, engines, weights and device memory; every later call is refused."""
        self.closed = True

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"this {self.label} runtime is closed: open another")

    def prompt(self, features: torch.Tensor, masks: torch.Tensor) -> SupportPrompt:
        """(B, K, C, s, s) support features and (B, K, S, S) masks of 0/1/255 -> the k-shot prompt."""
        self.check_open()
        check_features(features, "B, K, C, s, s", "support features")
        check_support_masks(features, masks, self.input_size, side=features.shape[-1])
        return SupportPrompt.of_shots(self.prompt_per_shot, features, masks)

    def episode(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Query (B, 3, S, S), supports (B, K, 3, S, S), masks (B, K, S, S) -> logits (B, 2, S, S).
        Supports and queries are encoded in one call (one launch sequence instead of two) where the
        runtime's batch limit allows."""
        self.check_open()
        check_episode(query, supports, masks, self.input_size)
        return self._run_episode(query, supports, masks)

    def _run_episode(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """`episode` on checked arguments."""
        batch, shots = supports.shape[:2]
        images = supports.flatten(0, 1)
        if self.max_batch is None or len(images) + batch <= self.max_batch:
            features = self.encode(torch.cat([images, query]))
            support_features, query_features = features[: len(images)], features[len(images) :]
        else:
            support_features, query_features = self.encode(images), self.encode(query)
        # the masks are checked: the prompt straight from the shots
        prompt = SupportPrompt.of_shots(
            self.prompt_per_shot, support_features.unflatten(0, (batch, shots)), masks
        )
        return self.segment(query_features, prompt)

    def query(self, images: torch.Tensor, prompt: SupportPrompt) -> torch.Tensor:
        """The deployed path: query images (B, 3, S, S) against a prompt computed once -> logits."""
        self.check_images(images)
        check_prompt(prompt, len(images))
        return self._run_query(images, prompt)

    def _run_query(self, images: torch.Tensor, prompt: SupportPrompt) -> torch.Tensor:
        """`query` on checked arguments."""
        return self.segment(self.encode(images), prompt)

    def check_batch(self, n: int) -> None:
        if self.max_batch is not None and n > self.max_batch:
            raise CRNetError(
                f"{self.label} engine was built for batches of at most {self.max_batch}, asked for {n} "
                "(re-export with a larger --batch-range MIN:OPT:MAX)"
            )

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def per_query(prompt: SupportPrompt, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's vector and prototype, one row per query: graphs and engines take one per query, and a
    prompt of batch 1 serves them all (expanded, not copied)."""
    return prompt.vector.expand(batch, -1), prompt.prototype.expand(batch, -1)
