"""PASCAL-5i evaluation: fixed seeded episodes on a fold's novel classes, mIoU and FB-IoU (crnet.metrics)."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from crnet.config import ModelConfig, feature_side
from crnet.data.episodes import fixed_episode_loader
from crnet.data.pascal import fold_classes
from crnet.errors import CRNetError, ZeroPromptWarning
from crnet.metrics import IoUMeter
from crnet.model.condition import masked_average_pool
from crnet.model.crnet import CRNet, build_model, upsample
from crnet.model.inputs import pooled_objects
from crnet.model.loss import episode_loss

STRATEGIES = ("average", "finetune")
BASELINE = "baseline"  # how result tables name the training-free PrototypeBaseline
Predictor = Callable[[dict], torch.Tensor]  # collated batch -> (B, 2, h, w) scores, argmax = mask


class CRNetPredictor:
    """CRNet on a batch of k-shot episodes; `finetune` adapts the heads per episode on support pairs. Puts
    the model in eval mode (BatchNorm's running statistics, no dropout)."""

    def __init__(
        self,
        model: CRNet,
        device: torch.device,
        strategy: str = "average",
        iterations: int | None = None,
        finetune_steps: int = 10,
        finetune_lr: float = 1e-3,
        exit_fraction: float = 0.0,
    ):
        if strategy not in STRATEGIES:
            raise CRNetError(f"unknown k-shot strategy {strategy!r}; choose {' or '.join(STRATEGIES)}")
        self.model, self.device, self.strategy = model.eval(), device, strategy
        self.iterations = model.config.refinement_iterations(iterations)
        self.finetune_steps, self.finetune_lr = finetune_steps, finetune_lr
        self.exit_fraction = exit_fraction
        self.iterations_used: list[int] = []  # refinement iterations per query (fewer with early exit)

    def _segment(self, query: torch.Tensor, prompt) -> torch.Tensor:
        logits, used = self.model.segment(
            query, prompt, self.iterations, exit_fraction=self.exit_fraction, return_iterations=True
        )
        self.iterations_used += used.tolist()
        return logits

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        query = self.model.encode(batch["query_image"].to(self.device))
        supports = batch["support_images"].to(self.device)
        masks = batch["support_masks"].to(self.device)
        support = self.model.encode(supports.flatten(0, 1)).unflatten(0, supports.shape[:2])
        if self.strategy == "finetune" and supports.shape[1] >= 2:
            return torch.cat(
                [self._finetuned(query[i : i + 1], support[i], masks[i]) for i in range(len(query))]
            )
        return self._segment(query, self.model.prompt(support, masks))

    def _finetuned(self, query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Fine-tune the modules after the encoder on every ordered support pair, predict, restore them."""
        heads = [self.model.cross_reference, self.model.condition, self.model.refinement]
        saved = [copy.deepcopy(module.state_dict()) for module in heads]
        shots = len(support)
        pairs = [(i, j) for i in range(shots) for j in range(shots) if i != j]
        source = torch.tensor([i for i, _ in pairs], device=support.device)
        target = torch.tensor([j for _, j in pairs], device=support.device)
        parameters = [p for module in heads for p in module.parameters()]
        optimizer = torch.optim.SGD(parameters, lr=self.finetune_lr, momentum=0.9)
        query_previous = support_previous = None  # the training recipe: one step from the last prediction
        try:
            with torch.enable_grad():
                for _ in range(self.finetune_steps):
                    prediction = self.model.heads(
                        support[target],
                        support[source][:, None],
                        masks[source][:, None],
                        masks[target],
                        iterations=1,
                        query_previous=query_previous,
                        support_previous=support_previous,
                    )
                    loss = episode_loss(prediction.query, masks[target]) + episode_loss(
                        prediction.support.flatten(0, 1), masks[source]
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    query_previous = torch.softmax(prediction.query.detach(), 1)
                    support_previous = torch.softmax(prediction.support.detach(), 2)
            with torch.no_grad():
                return self._segment(query, self.model.prompt(support[None], masks[None]))
        finally:
            for module, state in zip(heads, saved, strict=True):
                module.load_state_dict(state)


class PrototypeBaseline:
    """Training-free: cosine similarity of trunk features to foreground and background prototypes."""

    def __init__(self, model: CRNet, device: torch.device):
        self.trunk, self.device = model.encoder.trunk.eval(), device

    @classmethod
    def untrained(cls, config: ModelConfig, device: torch.device, seed: int = 0) -> PrototypeBaseline:
        """The baseline on a freshly initialised encoder of the given config (seeded, so reproducible)."""
        torch.manual_seed(seed)
        return cls(build_model(config).to(device), device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        layer2, layer3 = self.trunk(images.to(self.device))
        return torch.cat([layer2, layer3], dim=1)

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        query = self.features(batch["query_image"])
        supports = batch["support_images"]
        support = self.features(supports.flatten(0, 1))
        masks = batch["support_masks"].flatten(0, 1).to(self.device)
        background = torch.where(masks == 0, 1, 0)  # ignore pixels belong to neither prototype
        shape = (*supports.shape[:2], -1)
        foreground_prototype = masked_average_pool(support, masks).view(shape).mean(1)
        background_prototype = masked_average_pool(support, background).view(shape).mean(1)
        scores = [
            F.cosine_similarity(query, p[:, :, None, None], dim=1)
            for p in (background_prototype, foreground_prototype)
        ]
        return torch.stack(scores, dim=1)


def evaluate(
    predictor: Predictor,
    data_root: str | Path,
    *,
    fold: int,
    shots: int = 1,
    input_size: int | None = None,
    episodes: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    workers: int = 1,
    progress: bool = True,
    min_object_pixels: int | None = None,
    notice: Callable[[str], None] = lambda line: None,
) -> dict:
    """Run the predictor (CRNetPredictor, PrototypeBaseline, or any callable from a collated batch to
    (B, 2, h, w) scores) on the fold's fixed episodes, its images resized to `input_size` (by default the
    predictor's model's). Returns {fold, shots, episodes, seed, miou, fbiou, per_class,
    classes_without_episodes, seconds} (IoUs in percent), mean_iterations for a predictor that counts
    them, and for a CRNet zero_prompt_episodes (a support object between the pooling grid's points, said
    through `notice`). A class of the fold that got no episode counts 0 in the mIoU, as in hsnet and PFENet,
    and is named through `notice`. Test the fold the model was not trained on: crnet.checkpoint.fold_to_test
    says which."""
    model = getattr(predictor, "model", None)
    model_size = model.config.input_size if isinstance(model, CRNet) else None
    if input_size is None:
        if model_size is None:
            raise CRNetError("input_size is needed for a predictor without a CRNet `model`")
        input_size = model_size
    if shots < 1:
        raise CRNetError(f"shots must be >= 1, got {shots}")
    if episodes < 1:
        raise CRNetError(f"episodes must be >= 1, got {episodes}")
    from tqdm import tqdm

    loader = fixed_episode_loader(
        data_root,
        fold=fold,
        shots=shots,
        count=episodes,
        input_size=input_size,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        min_object_pixels=min_object_pixels,
    )
    meter = IoUMeter(fold_classes(fold))
    side = feature_side(input_size) if isinstance(model, CRNet) else None
    zero_prompts = 0
    started = time.perf_counter()
    bar = tqdm(total=episodes, disable=not progress, desc="eval", unit="episode", dynamic_ncols=True)
    with bar, warnings.catch_warnings():
        # The protocol keeps an episode whose support object misses the pooling grid: counted, not warned of.
        warnings.simplefilter("ignore", ZeroPromptWarning)
        for batch in loader:
            if side is not None:
                masks = batch["support_masks"]
                kept = pooled_objects(masks.flatten(0, 1), side).view(masks.shape[:2])
                zero_prompts += int((~kept).any(1).sum())
            scores = predictor(batch).float().cpu()
            for i, label in enumerate(batch["query_label"]):
                mask = upsample(scores[i : i + 1], tuple(label.shape)).argmax(1)[0].bool()
                meter.update(mask, label, int(batch["class_id"][i]))
            bar.update(len(batch["query_label"]))
    seconds = time.perf_counter() - started
    used = getattr(predictor, "iterations_used", None)
    result = meter.result()
    if result["classes_without_episodes"]:
        notice(
            f"classes {result['classes_without_episodes']} of fold {fold} got no episode in {episodes}: "
            "they count 0 in the mIoU (give more --episodes)"
        )
    if zero_prompts:
        notice(
            f"{zero_prompts} of {episodes} episodes have a support object between the points the prompt "
            f"samples on the {side}x{side} feature grid, so a zero prompt: kept, as the protocol draws them"
        )
    return {
        "fold": fold,
        "shots": shots,
        "episodes": episodes,
        "seed": seed,
        **result,
        **({"mean_iterations": sum(used) / len(used)} if used else {}),
        **({"zero_prompt_episodes": zero_prompts} if side is not None else {}),
        "seconds": round(seconds, 2),
    }
