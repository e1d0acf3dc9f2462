"""User-supplied support masks: size, allowed values {0, 1, 255}, at least one object pixel, >= 1 shot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crnet.data.masks import check_binary_mask, check_support_set, read_binary_mask
from crnet.data.pascal import read_label
from crnet.errors import CRNetError, EmptySupportMaskError, ImageReadError, MaskError, NoSupportError

H, W = 6, 8


def mask(*values: int, dtype=np.uint8) -> np.ndarray:
    """An H x W mask: background 0, then the given values written into the first pixels."""
    array = np.zeros((H, W), dtype=dtype)
    array.flat[: len(values)] = values
    return array


GOOD = {
    "object": mask(1, 1, 1),
    "object+ignore": mask(1, 255, 255, 0),
    "all object": np.ones((H, W), np.uint8),
    "one pixel": mask(0, 0, 1),
}


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("name", GOOD)
def test_good_masks_pass(name: str, as_tensor: bool) -> None:
    value = torch.from_numpy(GOOD[name]).long() if as_tensor else GOOD[name]
    check_binary_mask(value, (H, W))  # raises on failure


def test_float_mask_with_allowed_values_passes() -> None:
    check_binary_mask(torch.from_numpy(mask(1, 255)).float(), (H, W))


@pytest.mark.parametrize("shape", [(H, W + 1), (H + 1, W), (W, H), (H, W, 1)])
def test_wrong_size(shape: tuple[int, ...]) -> None:
    with pytest.raises(MaskError, match=f"its image is {W}x{H}") as error:
        check_binary_mask(np.ones(shape, np.uint8), (H, W))
    assert not isinstance(error.value, EmptySupportMaskError)


@pytest.mark.parametrize("bad", [2, 128, 254, 20])
def test_values_outside_0_1_255(bad: int) -> None:
    with pytest.raises(MaskError, match=str(bad)) as error:
        check_binary_mask(mask(1, bad), (H, W))
    assert type(error.value) is MaskError  # not reported as merely empty


def test_bad_values_reported_before_emptiness() -> None:
    # No 1 at all, but a 128: the real problem is the value (e.g. a 0/128 or 0/255 PNG from an editor).
    with pytest.raises(MaskError, match="128") as error:
        check_binary_mask(mask(128, 128), (H, W))
    assert type(error.value) is MaskError


@pytest.mark.parametrize("values", [(-1, 1), (0.5, 1)], ids=["negative", "fraction"])
def test_bad_values_in_tensors(values) -> None:
    tensor = torch.zeros(H, W)
    tensor.view(-1)[:2] = torch.tensor(values, dtype=torch.float32)
    with pytest.raises(MaskError) as error:
        check_binary_mask(tensor, (H, W))
    assert type(error.value) is MaskError


@pytest.mark.parametrize("values", [(), (255, 255), (0, 255)], ids=["all-0", "some-255", "0-and-255"])
def test_empty_mask(values) -> None:
    array = mask(*values)
    with pytest.raises(EmptySupportMaskError, match="no object pixel") as error:
        check_binary_mask(array, (H, W))
    assert isinstance(error.value, MaskError)


def test_all_ignore_is_empty() -> None:
    with pytest.raises(EmptySupportMaskError):
        check_binary_mask(np.full((H, W), 255, np.uint8), (H, W))


def test_mask_name_in_message() -> None:
    with pytest.raises(MaskError, match="^shot 3 "):
        check_binary_mask(mask(2), (H, W), name="shot 3")


# ---------------------------------------------------------------- read_binary_mask


def write(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(array)
    if mode == "P":
        image.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    elif mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


@pytest.mark.parametrize("mode", [None, "P"])
def test_read_good_mask(tmp_path: Path, mode) -> None:
    array = mask(1, 1, 255, 0, 1)
    result = read_binary_mask(write(tmp_path / "m.png", array, mode), (H, W))
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)


def test_a_one_bit_mask_reads_as_0_and_1(tmp_path: Path) -> None:
    """PIL turns a 1-bit image into 0 and 255, which would make its object "ignore"."""
    array = mask(1, 0, 1)
    Image.fromarray(array.astype(bool)).save(tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").mode == "1"
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "m.png", (H, W)), array)
    with pytest.raises(MaskError, match="label .*m.png must be a single-channel PNG"):
        read_label(tmp_path / "m.png")  # a dataset's label of 1 bit: a class 1 nobody drew, refused


@pytest.mark.parametrize(
    "array, mode, error, text",
    [
        (mask(1, 2), None, MaskError, "values"),
        (mask(0, 128), None, MaskError, "values"),
        (mask(1) * 255, None, EmptySupportMaskError, "no object pixel"),  # a 0/255 PNG has no 1
        (np.ones((H + 1, W), np.uint8), None, MaskError, f"is {W}x{H + 1} but its image is {W}x{H}"),
        (mask(1, 1), "RGB", MaskError, "mask .*m.png must be a single-channel PNG"),
        (mask(1, 1), "RGBA", MaskError, "single-channel"),
    ],
    ids=["value-2", "value-128", "0-255", "size", "rgb", "rgba"],
)
def test_read_bad_mask(tmp_path: Path, array, mode, error, text: str) -> None:
    path = write(tmp_path / "m.png", array, mode)
    with pytest.raises(error, match=text) as raised:
        read_binary_mask(path, (H, W))
    assert isinstance(raised.value, MaskError)


@pytest.mark.parametrize("content", [None, b"not a png"], ids=["missing", "corrupt"])
def test_read_unreadable_mask(tmp_path: Path, content) -> None:
    path = tmp_path / "m.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError, match="m.png"):
        read_binary_mask(path, (H, W))


def test_read_mask_warns_nothing(tmp_path: Path) -> None:
    # PIL-decoded arrays are read-only and torch warns (once per process, hence a fresh interpreter with
    # warnings as errors) when wrapping one: a stray warning line on every CLI run that reads a mask.
    path = write(tmp_path / "m.png", mask(1, 255))
    code = f"from crnet.data.masks import read_binary_mask; read_binary_mask({str(path)!r}, ({H}, {W}))"
    run = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_masks_are_checked_on_their_device() -> None:
    images, masks = support_set(2, 3)
    check_support_set(images.cuda(), masks.cuda())
    masks[0, 1] = 0
    with pytest.raises(EmptySupportMaskError):
        check_support_set(images.cuda(), masks.cuda())


def test_read_accepts_str_path(tmp_path: Path) -> None:
    path = write(tmp_path / "m.png", mask(1))
    np.testing.assert_array_equal(read_binary_mask(str(path), (H, W)), mask(1))


# ---------------------------------------------------------------- check_support_set


def support_set(batch: int = 2, shots: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(batch, shots, 3, H, W)
    masks = torch.zeros(batch, shots, H, W, dtype=torch.long)
    masks[..., 1, 2] = 1
    masks[..., 0, :] = 255
    return images, masks


@pytest.mark.parametrize("batch, shots", [(1, 1), (2, 3), (3, 5)])
def test_good_support_set(batch: int, shots: int) -> None:
    check_support_set(*support_set(batch, shots))


@pytest.mark.parametrize("batch", [1, 2])
def test_zero_shots(batch: int) -> None:
    images, masks = support_set(batch, 0)
    with pytest.raises(NoSupportError) as error:
        check_support_set(images, masks)
    assert isinstance(error.value, CRNetError) and not isinstance(error.value, MaskError)


def test_one_empty_support_mask_is_named() -> None:
    images, masks = support_set(2, 3)
    masks[1, 2] = 0
    with pytest.raises(EmptySupportMaskError, match="support mask 2 of episode 1"):
        check_support_set(images, masks)


def test_one_bad_support_mask_value_is_named() -> None:
    images, masks = support_set(2, 3)
    masks[0, 1, 3, 3] = 7
    with pytest.raises(MaskError, match=r"support mask 1 of episode 0 has values \[7\]"):
        check_support_set(images, masks)


@pytest.mark.parametrize(
    "images_shape, masks_shape",
    [
        ((2, 3, 3, H, W), (2, 2, H, W)),  # shot counts differ
        ((2, 3, 3, H, W), (1, 3, H, W)),  # batch sizes differ
        ((3, 3, H, W), (3, H, W)),  # no batch dimension
        ((2, 3, 3, H, W), (2, 3, 1, H, W)),  # masks with a channel dimension
    ],
)
def test_support_shapes_that_do_not_pair(images_shape, masks_shape) -> None:
    with pytest.raises(MaskError, match="do not pair up"):
        check_support_set(torch.zeros(images_shape), torch.ones(masks_shape, dtype=torch.long))


def test_support_mask_of_another_size() -> None:
    images = torch.zeros(1, 2, 3, H, W)
    masks = torch.ones(1, 2, H, W + 2, dtype=torch.long)
    with pytest.raises(MaskError, match=f"is {W + 2}x{H} but its image is {W}x{H}"):
        check_support_set(images, masks)


def test_a_jpeg_mask_is_read_with_a_warning(tmp_path) -> None:
    """JPEG's lossy compression changes mask pixels (an edge's 1s become 0s or other values): one warning,
    then the mask is checked as any other."""
    import contextlib

    from crnet.errors import CRNetWarning

    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    Image.fromarray(mask).save(tmp_path / "mask.jpg", quality=100)
    with pytest.warns(CRNetWarning, match="is a JPEG"), contextlib.suppress(MaskError):
        read_binary_mask(tmp_path / "mask.jpg", (32, 32))
