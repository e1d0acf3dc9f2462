"""Every number crnet reports about masks and logits, in one place.

    IoUMeter        mIoU and FB-IoU against ground truth (the PASCAL-5i protocol)
    Agreement       a runtime's logits against the reference runtime's (crnet bench)
    output_errors   an exported graph's outputs against PyTorch's (crnet export's check)

mIoU: per class, intersection and union summed over all its episodes, then the mean over all the fold's
classes, a class without episodes counting 0 (hsnet common/logger.py clamps the union to 1 and averages the
fold's classes; PFENet test.py divides by the number of classes). FB-IoU: foreground and background IoU,
each summed over all episodes, then their mean. Both are measured at the label's own resolution, with
ignore pixels (255) left out. Results are percentages.
"""

from __future__ import annotations

import numpy as np
import torch

from crnet.data.pascal import IGNORE_LABEL


class IoUMeter:
    """Accumulates intersections and unions per class and for foreground/background."""

    def __init__(self, classes: tuple[int, ...]):
        self.classes = classes
        self.intersection = dict.fromkeys(classes, 0)
        self.union = dict.fromkeys(classes, 0)
        self.episodes = dict.fromkeys(classes, 0)
        self.fb_intersection = [0, 0]  # background, foreground
        self.fb_union = [0, 0]

    def update(self, prediction: torch.Tensor, label: torch.Tensor, class_id: int) -> None:
        """prediction (H, W) bool foreground; label (H, W) with 0, 1 and 255."""
        prediction = prediction.bool()  # `~` below must be logical, not bitwise
        valid = label != IGNORE_LABEL
        self.episodes[class_id] += 1
        for value, predicted in ((0, ~prediction), (1, prediction)):
            target = label == value
            intersection = int((predicted & target).sum())
            union = int(((predicted & valid) | target).sum())
            self.fb_intersection[value] += intersection
            self.fb_union[value] += union
            if value == 1:
                self.intersection[class_id] += intersection
                self.union[class_id] += union

    def result(self) -> dict:
        per_class = {c: 100.0 * self.intersection[c] / max(self.union[c], 1) for c in self.classes}
        fb = [100.0 * i / u for i, u in zip(self.fb_intersection, self.fb_union, strict=True) if u]
        return {
            "miou": sum(per_class.values()) / len(per_class) if per_class else float("nan"),
            "fbiou": sum(fb) / len(fb) if fb else float("nan"),
            "per_class": {str(c): round(v, 3) for c, v in per_class.items()},
            "classes_without_episodes": [c for c in self.classes if not self.episodes[c]],
        }


class Agreement:
    """A runtime's logits against the reference's, both at input resolution: how many pixels get the same
    label, the IoU of the two foregrounds, and the absolute logit error."""

    def __init__(self):
        self.same = self.pixels = self.intersection = self.union = 0
        self.max_abs = 0.0
        self.abs_sum = 0.0
        self.values = 0

    def update(self, logits: torch.Tensor, reference: torch.Tensor) -> None:
        error = (logits.double() - reference.double()).abs()
        self.max_abs = max(self.max_abs, float(error.max()))
        self.abs_sum += float(error.sum())
        self.values += error.numel()
        mask, expected = logits.argmax(1).bool(), reference.argmax(1).bool()
        self.same += int((mask == expected).sum())
        self.pixels += mask.numel()
        self.intersection += int((mask & expected).sum())
        self.union += int((mask | expected).sum())

    def result(self) -> dict:
        return {
            "pixel_agreement": 100.0 * self.same / self.pixels,
            "mask_iou": 100.0 * self.intersection / self.union if self.union else 100.0,
            "max_abs_logit_error": self.max_abs,
            "mean_abs_logit_error": self.abs_sum / self.values,
        }


def output_errors(
    names: tuple[str, ...], outputs: list[np.ndarray], reference: tuple[torch.Tensor, ...]
) -> dict:
    """Per named output: max and mean absolute error against the reference and the reference's scale;
    for `logits` also the share of pixels whose argmax (the mask) agrees."""
    result = {}
    for name, output, expected in zip(names, outputs, reference, strict=True):
        error = np.abs(output.astype(np.float64) - expected.double().numpy())
        result[name] = {
            "max_abs": float(error.max()),
            "mean_abs": float(error.mean()),
            "reference_max_abs": float(expected.abs().max()),
        }
        if name == "logits":  # the decision that matters: which pixels are foreground
            same = output.argmax(1) == expected.argmax(1).numpy()
            result[name]["mask_agreement"] = float(same.mean())
    return result
