"""Episode pictures: support with its mask, query with the ground truth, query with the prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from crnet.config import IMAGENET_MEAN, IMAGENET_STD

OBJECT_COLOUR = np.array([255, 40, 40], dtype=np.float32)
IGNORE_COLOUR = np.array([255, 255, 255], dtype=np.float32)


def denormalise(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8."""
    array = image.permute(1, 2, 0).cpu().numpy() * IMAGENET_STD + IMAGENET_MEAN
    return (array.clip(0, 1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Tint object pixels (1) red and ignore pixels (255) white."""
    out = image.astype(np.float32)
    for value, colour in ((1, OBJECT_COLOUR), (255, IGNORE_COLOUR)):
        selected = mask == value
        out[selected] = (1 - alpha) * out[selected] + alpha * colour
    return out.astype(np.uint8)


def episode_sheet(rows: list[tuple[np.ndarray, ...]], titles: tuple[str, ...], path: str | Path) -> Path:
    """Save a grid: one row per episode, one column per (image, mask) pair, titles on top."""
    tile = rows[0][0].shape[0]
    columns = len(rows[0]) // 2
    header = 16
    sheet = Image.new("RGB", (columns * (tile + 4), header + len(rows) * (tile + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((c * (tile + 4) + 2, 2), title, fill="black")
    for r, row in enumerate(rows):
        for c in range(columns):
            picture = overlay(row[2 * c], row[2 * c + 1])
            sheet.paste(Image.fromarray(picture), (c * (tile + 4), header + r * (tile + 4)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
