"""Episode pictures: a mask stays visible on a red object, and the sheet names every row."""

from __future__ import annotations

import numpy as np
from PIL import Image

from crnet.commands.visualize import DIM, episode_sheet, mask_iou, overlay


def red_square() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((32, 32, 3), 90, dtype=np.uint8)
    image[8:24, 8:24] = (230, 20, 20)  # a red object, where a red tint would vanish
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 1
    mask[0, :] = 255  # an ignore strip
    return image, mask


def test_overlay_keeps_the_object_dims_the_rest_and_outlines_the_edge() -> None:
    image, mask = red_square()
    out = overlay(image, mask)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[12:20, 12:20] == image[12:20, 12:20]).all()  # the object's interior is untouched
    assert (out[30, 30] == (image[30, 30] * DIM).astype(np.uint8)).all()
    assert (out[0, 16] == out[30, 30]).all()  # ignore pixels are dimmed like the background
    assert (out[8, 8:24] == 255).all() and (out[23, 8:24] == 255).all()  # white on the object's edge
    assert (out[7, 8:24] == 0).all() and (out[24, 8:24] == 0).all()  # black just outside it


def test_overlay_of_an_empty_mask_only_dims() -> None:
    image, _ = red_square()
    out = overlay(image, np.zeros((32, 32), dtype=np.uint8))
    assert (out == (image * DIM).astype(np.uint8)).all()


def test_mask_iou_leaves_ignore_pixels_out() -> None:
    truth = np.array([[1, 1, 0, 255]], dtype=np.uint8)
    assert mask_iou(np.array([[1, 0, 0, 1]]), truth) == 50.0  # the 1 on the ignore pixel does not count
    assert mask_iou(np.zeros((1, 4)), np.zeros((1, 4), dtype=np.uint8)) is None


def test_sheet_has_a_row_per_episode_and_enlarged_tiles(tmp_path) -> None:
    image, mask = red_square()
    rows = [(image, mask, image, mask, image, mask)] * 2
    path = episode_sheet(
        rows, ("support", "truth", "prediction"), ["1: aeroplane", "2: bicycle"], tmp_path / "s.png"
    )
    sheet = np.asarray(Image.open(path))
    assert sheet.shape[0] > 2 * 224 and sheet.shape[1] > 3 * 224  # 32 px tiles enlarged to >= 224
    left = sheet[:, :40]
    assert (left < 128).any()  # the row labels are drawn in the left margin
