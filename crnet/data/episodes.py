"""Few-shot episodes: which images form an episode, and the tensors a model sees.

An episode is (class c, query image, k support images of c); masks are binary for c with the ignore label
kept: 1 = class c, 0 = anything else, 255 = ignore. Episode i depends only on (seed, i), so a fixed test set
is the same for every model and a resumed training run draws the same episodes it would have drawn.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from crnet.config import IMAGENET_MEAN, IMAGENET_STD
from crnet.data.pascal import IGNORE_LABEL, VOCTree, fold_classes
from crnet.errors import CRNetWarning, DataError, MaskError


@dataclass(frozen=True)
class EpisodeSpec:
    class_id: int
    query: str
    supports: tuple[str, ...]
    query_flip: bool = False
    support_flips: tuple[bool, ...] = ()
    hue_turn: float = 0.0  # radians; one colour rotation for every image of the episode (training only)


class SampleIndex:
    """The (image, class) pairs of a split restricted to some classes, grouped by class."""

    def __init__(
        self,
        tree: VOCTree,
        split: str,
        classes: Sequence[int],
        min_pixels: int = 1,
        exclude_images_with: Sequence[int] = (),
    ):
        self.pairs = tree.samples(split, tuple(classes), min_pixels)
        if exclude_images_with:  # e.g. drop training images that show a novel class labelled as background
            pixels, excluded = tree.class_pixels(split), set(exclude_images_with)
            self.pairs = [(image, c) for image, c in self.pairs if excluded.isdisjoint(pixels[image])]
        self.position = {pair: i for i, pair in enumerate(self.pairs)}
        self.images = {c: [image for image, pc in self.pairs if pc == c] for c in classes}
        thin = [c for c, images in self.images.items() if len(images) < 2]
        if thin:
            # Say whether the small-object rule is what left them short: the classes are there, but smaller
            shown = [c for counts in tree.class_pixels(split).values() for c, n in counts.items() if n > 0]
            rule = (
                f"; it counts only objects of at least {min_pixels} pixels (--min-object-pixels)"
                if min_pixels > 1 and any(shown.count(c) >= 2 for c in thin)
                else ""
            )
            raise DataError(
                f"{tree.root} ({split}) has fewer than 2 images of classes {thin}{rule}: "
                "an episode needs a query and a different support"
            )

    def draw(
        self,
        rng: np.random.Generator,
        class_id: int,
        shots: int,
        query: str | None = None,
        flips: bool = False,
        hue_turns: bool = False,
    ) -> EpisodeSpec:
        images = self.images[class_id]
        if query is None:
            query = images[rng.integers(len(images))]
        others = [image for image in images if image != query]
        chosen = rng.choice(len(others), size=shots, replace=len(others) < shots)
        supports = tuple(others[i] for i in chosen)
        flip = rng.random(shots + 1) < 0.5 if flips else np.zeros(shots + 1, dtype=bool)
        turn = float(rng.uniform(-np.pi, np.pi)) if hue_turns else 0.0  # drawn last: other streams unchanged
        return EpisodeSpec(class_id, query, supports, bool(flip[0]), tuple(bool(f) for f in flip[1:]), turn)


def fixed_episodes(index: SampleIndex, shots: int, count: int = 1000, seed: int = 0) -> list[EpisodeSpec]:
    """The fixed evaluation episodes, as hsnet walks its test list (data/pascal.py: `idx %= len(...)`,
    no shuffling): episode i queries the fold's (image, class) pair i modulo their number, in sorted
    order, so every pair is a query before any repeats; its k supports are other images of the class,
    drawn from numpy's generator seeded with (seed, i) (the same on every machine)."""
    few = sorted(c for c, images in index.images.items() if 0 < len(images) - 1 < shots)
    if few:  # drawn with replacement there: a k-shot episode with fewer than k different supports
        named = f"class {few[0]} has" if len(few) == 1 else f"classes {', '.join(map(str, few))} have"
        warnings.warn(f"{named} fewer than {shots} other images: supports repeat", CRNetWarning, stacklevel=2)
    episodes = []
    for i in range(count):
        query, class_id = index.pairs[i % len(index.pairs)]
        episodes.append(index.draw(np.random.default_rng([seed, i]), class_id, shots, query=query))
    return episodes


class TrainingEpisodes(Sequence):
    """An unbounded stream of training episodes: class uniform over the base classes, random flips and,
    if asked, a random hue turn shared by the episode's images."""

    def __init__(
        self,
        index: SampleIndex,
        shots: int,
        seed: int,
        flips: bool = True,
        length: int = 2**62,
        hue_turns: bool = False,
    ):
        self.index, self.shots, self.seed, self.flips, self.length = index, shots, seed, flips, length
        self.hue_turns = hue_turns
        self.classes = sorted(index.images)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> EpisodeSpec:
        rng = np.random.default_rng([self.seed, i])
        class_id = self.classes[rng.integers(len(self.classes))]
        return self.index.draw(rng, class_id, self.shots, flips=self.flips, hue_turns=self.hue_turns)


def binary_mask(label: np.ndarray, class_id: int) -> np.ndarray:
    """1 where the label is the class, 255 where it is ignored, 0 elsewhere."""
    mask = (label == class_id).astype(np.uint8)
    mask[label == IGNORE_LABEL] = IGNORE_LABEL
    return mask


# RGB <-> YIQ: a hue turn is a rotation of the (I, Q) chroma plane that keeps the luma Y.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def hue_rotation(turn: float) -> np.ndarray:
    """The 3x3 RGB matrix that turns every colour's hue by `turn` radians."""
    cos, sin = np.cos(turn), np.sin(turn)
    rotate = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return (np.linalg.inv(_RGB_TO_YIQ) @ rotate @ _RGB_TO_YIQ).astype(np.float32)


def to_model_input(
    image: np.ndarray, mask: np.ndarray | None, size: int, flip: bool = False, hue_turn: float = 0.0
):
    """Resize to size x size (bilinear image, nearest mask), optionally flip and turn the hue, normalise
    like ImageNet."""
    pil = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    array = np.asarray(pil, dtype=np.float32) / 255.0
    if hue_turn:
        array = np.clip(array @ hue_rotation(hue_turn).T, 0.0, 1.0)
    if flip:
        array = array[:, ::-1]
    tensor = torch.from_numpy((array - IMAGENET_MEAN) / IMAGENET_STD).permute(2, 0, 1).float().contiguous()
    if mask is None:
        return tensor, None
    resized = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    if flip:
        resized = resized[:, ::-1]
    return tensor, torch.from_numpy(resized.astype(np.int64))


class EpisodeDataset(Dataset):
    """Tensors for episode specs. With `keep_original`, also the query's binary label at full resolution."""

    def __init__(
        self,
        tree: VOCTree,
        index: SampleIndex,
        specs: Sequence[EpisodeSpec],
        input_size: int,
        keep_original: bool = False,
    ):
        self.tree, self.index, self.specs = tree, index, specs
        self.input_size, self.keep_original = input_size, keep_original

    def __len__(self) -> int:
        return len(self.specs)

    def _load(self, image_id: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and its class mask; a label without the class the index counted in it is refused, not
        scored as an empty object (the data changed after it was indexed)."""
        image, label = self.tree.load(image_id)
        mask = binary_mask(label, class_id)
        if not (mask == 1).any():
            raise MaskError(
                f"label {self.tree.label_path(image_id)} has no pixel of class {class_id}, which the split's "
                "index counted in it: the data changed after it was indexed; run the command again"
            )
        return image, mask

    def __getitem__(self, i: int) -> dict:
        spec = self.specs[i]
        image, query_mask = self._load(spec.query, spec.class_id)
        query_image, query_target = to_model_input(
            image, query_mask, self.input_size, spec.query_flip, spec.hue_turn
        )
        flips = spec.support_flips or (False,) * len(spec.supports)
        support_images, support_masks = [], []
        for support, flip in zip(spec.supports, flips, strict=True):
            image, mask = self._load(support, spec.class_id)
            tensor, mask = to_model_input(image, mask, self.input_size, flip, spec.hue_turn)
            support_images.append(tensor)
            support_masks.append(mask)
        item = {
            "query_image": query_image,
            "query_mask": query_target,
            "support_images": torch.stack(support_images),
            "support_masks": torch.stack(support_masks),
            "class_id": spec.class_id,
            "query_index": self.index.position.get((spec.query, spec.class_id), -1),
            "support_index": torch.tensor(
                [self.index.position.get((s, spec.class_id), -1) for s in spec.supports]
            ),
            "query_flip": spec.query_flip,
            "support_flips": torch.tensor(flips),
        }
        if self.keep_original:
            item["query_label"] = torch.from_numpy(query_mask)
        return item


def collate(items: list[dict]) -> dict:
    """Stack every field; full-resolution labels differ in size, so they stay a list."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if key == "query_label":
            batch[key] = values
        elif isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.tensor(values)
    return batch


def fixed_episode_loader(
    root: str | Path,
    *,
    fold: int,
    shots: int,
    count: int,
    input_size: int,
    seed: int = 0,
    batch_size: int = 16,
    workers: int = 0,
    keep_original: bool = True,
    min_object_pixels: int | None = None,
) -> DataLoader:
    """Batches of a fold's fixed evaluation episodes (its novel classes, val split, the tree's small-object
    rule unless `min_object_pixels` is given); with `keep_original` every query's label at its own
    resolution, which the metrics are measured at."""
    tree = VOCTree(root)
    index = SampleIndex(tree, "val", fold_classes(fold), tree.object_threshold(min_object_pixels))
    specs = fixed_episodes(index, shots, count, seed)
    dataset = EpisodeDataset(tree, index, specs, input_size, keep_original=keep_original)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
