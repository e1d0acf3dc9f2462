"""Episode pictures: support with its mask, query with the ground truth, query with the prediction.

A mask must read at a glance on objects of any colour, red ones included: the picture is dimmed outside
the object and the object's outline is traced white inside a black edge, which shows on every hue. Ignore
pixels (the band VOC draws along every object's edge, around other classes too) are dimmed like the rest:
drawn, they would outline objects that are not the episode's class.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from crnet.config import IMAGENET_MEAN, IMAGENET_STD
from crnet.files import atomic_file

IGNORE = 255
DIM = 0.35  # brightness kept outside the object
MIN_TILE = 224  # pictures are enlarged to at least this side, so thin objects and outlines stay visible
FONT_SIZE = 16


def denormalise(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8."""
    array = image.permute(1, 2, 0).cpu().numpy() * IMAGENET_STD + IMAGENET_MEAN
    return (array.clip(0, 1) * 255).astype(np.uint8)


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary dilation by a 3x3 square, `steps` times."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        h, w = mask.shape
        mask = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                mask |= padded[dy : dy + h, dx : dx + w]
    return mask


def overlay(image: np.ndarray, mask: np.ndarray, line: int = 1) -> np.ndarray:
    """Object pixels (1) at full brightness, the rest dimmed, the object's outline traced in white inside
    a black edge (`line` pixels each). Same size as the image."""
    out = image.astype(np.float32)
    inside = mask == 1
    out[~inside] *= DIM
    if inside.any():
        outer = _grow(inside, line) & ~inside  # just outside the object
        inner = inside & _grow(~inside, line)  # the object's own boundary pixels
        out[outer] = 0.0
        out[inner] = 255.0
    return out.astype(np.uint8)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (OSError, TypeError, ValueError):
        return ImageFont.load_default()


def mask_iou(prediction: np.ndarray, truth: np.ndarray) -> float | None:
    """IoU (percent) of the object in a prediction against the truth, ignore pixels left out."""
    valid = truth != IGNORE
    predicted, target = (prediction == 1) & valid, truth == 1
    union = int((predicted | target).sum())
    return 100.0 * int((predicted & target).sum()) / union if union else None


def episode_sheet(
    rows: list[tuple[np.ndarray, ...]], titles: tuple[str, ...], labels: list[str], path: str | Path
) -> Path:
    """Save a grid: one row per episode, named by `labels` on the left; one column per (image, mask) pair,
    `titles` on top. The last two pairs are taken as truth and prediction: their IoU is printed under it."""
    side = rows[0][0].shape[0]
    scale = max(1, math.ceil(MIN_TILE / side))
    tile, gap = side * scale, 6
    font, small = _font(), _font(FONT_SIZE - 2)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = 12 + max(int(measure.textlength(text, font=font)) for text in labels)
    columns = len(rows[0]) // 2
    header, footer = FONT_SIZE + 14, FONT_SIZE + 8
    height = header + len(rows) * (tile + footer + gap)
    sheet = Image.new("RGB", (label_width + columns * (tile + gap), height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((label_width + c * (tile + gap) + 2, 6), title, fill="black", font=font)
    for r, row in enumerate(rows):
        top = header + r * (tile + footer + gap)
        draw.text((4, top + tile // 2 - FONT_SIZE), labels[r], fill="black", font=font)
        for c in range(columns):
            image = np.asarray(Image.fromarray(row[2 * c]).resize((tile, tile), Image.BILINEAR))
            mask = np.asarray(
                Image.fromarray(row[2 * c + 1].astype(np.uint8)).resize((tile, tile), Image.NEAREST)
            )
            sheet.paste(Image.fromarray(overlay(image, mask, line=2)), (label_width + c * (tile + gap), top))
        iou = mask_iou(row[-1], row[-3]) if columns >= 2 else None
        if iou is not None:
            left = label_width + (columns - 1) * (tile + gap) + 2
            draw.text((left, top + tile + 3), f"IoU {iou:.0f}%", fill="black", font=small)
    with atomic_file(path) as temporary:
        sheet.save(temporary, format="PNG")
    return Path(path)
