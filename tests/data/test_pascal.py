"""PASCAL-5i on a VOC tree: folds, layout checks, split ids, the per-class index and its disk cache, and
image/label validation on load. Compared against the hand-built tree in tests/fake_voc.py."""

from __future__ import annotations

import json
import os
import stat
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crnet.data import pascal
from crnet.data.pascal import VOCTree, base_classes, fold_classes
from crnet.errors import CRNetError, DataError, ImageReadError, MaskError, NotAVOCTreeError
from tests.fake_voc import BY_ID, IMAGES, TRUTH, ids, make_fake_voc, save_label, truth

LAYOUT = ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores file permission bits
VAL_ID = "2008_000009"  # a 40x30 val image with classes 1, 2, 3 inside an ignore frame


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_fake_voc(tmp_path / "voc")


def forbid_label_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path):
        raise AssertionError(f"label {path} was read although the index cache should have been used")

    monkeypatch.setattr(pascal, "read_label", fail)


def count_label_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    original = pascal.read_label

    def counting(path):
        reads.append(path)
        return original(path)

    monkeypatch.setattr(pascal, "read_label", counting)
    return reads


# ---------------------------------------------------------------- folds


@pytest.mark.parametrize("fold", range(4))
def test_fold_classes(fold: int) -> None:
    novel, base = fold_classes(fold), base_classes(fold)
    assert novel == tuple(range(5 * fold + 1, 5 * fold + 6))
    assert len(base) == 15 and not set(novel) & set(base)
    assert sorted(novel + base) == list(range(1, 21))


def test_folds_partition_the_classes() -> None:
    novel = [c for fold in range(4) for c in fold_classes(fold)]
    assert sorted(novel) == list(range(1, 21))  # every class is novel in exactly one fold


@pytest.mark.parametrize("fold", [-1, 4, 10])
@pytest.mark.parametrize("function", [fold_classes, base_classes])
def test_bad_fold(function, fold: int) -> None:
    # A CRNetError (so the CLI reports it in one line) that is still a ValueError for library callers.
    with pytest.raises(ValueError, match="fold must be in 0..3") as error:
        function(fold)
    assert isinstance(error.value, CRNetError)


# ---------------------------------------------------------------- layout and split ids


def test_empty_dir_is_not_a_voc_tree(tmp_path: Path) -> None:
    with pytest.raises(NotAVOCTreeError) as error:
        VOCTree(tmp_path)
    assert isinstance(error.value, DataError)
    for part in LAYOUT:
        assert part in str(error.value)


@pytest.mark.parametrize("missing", LAYOUT)
def test_missing_layout_part_is_named(root: Path, missing: str) -> None:
    for path in sorted((root / missing).rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    (root / missing).rmdir()
    with pytest.raises(NotAVOCTreeError) as error:
        VOCTree(root)
    message = str(error.value)
    assert f"missing {missing}/" in message
    assert all(other not in message for other in LAYOUT if other != missing)


def test_a_file_is_not_a_voc_tree(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotAVOCTreeError):
        VOCTree(tmp_path / "file")


@pytest.mark.parametrize("split", ["train", "val"])
def test_ids_sorted_and_unique(root: Path, split: str) -> None:
    # The fake split files list ids in reverse order, train_aug.txt with one duplicate line.
    assert VOCTree(root).ids(split) == ids(split)


def test_train_falls_back_to_train_txt(tmp_path: Path) -> None:
    root = make_fake_voc(tmp_path / "voc", train_file="train.txt")
    assert not (root / "ImageSets/Segmentation/train_aug.txt").exists()
    assert VOCTree(root).ids("train") == ids("train")
    assert VOCTree(root).class_pixels("train") == truth("train")


def test_train_aug_preferred_over_train_txt(root: Path) -> None:
    (root / "ImageSets/Segmentation/train.txt").write_text(ids("train")[0] + "\n")
    assert VOCTree(root).ids("train") == ids("train")


@pytest.mark.parametrize("split, name", [("train", "train_aug.txt or train.txt"), ("val", "val.txt")])
def test_missing_split_file(root: Path, split: str, name: str) -> None:
    (root / "ImageSets/Segmentation" / ("train_aug.txt" if split == "train" else "val.txt")).unlink()
    with pytest.raises(NotAVOCTreeError, match=name):
        VOCTree(root).ids(split)


def test_unknown_split(root: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        VOCTree(root).ids("test")


# ---------------------------------------------------------------- per-class index and its cache


@pytest.mark.parametrize("split", ["train", "val"])
def test_class_pixels_match_the_hand_built_truth(root: Path, split: str) -> None:
    pixels = VOCTree(root).class_pixels(split)
    assert pixels == truth(split)
    # Spot checks written out by hand: 10x8 + 6x5 + 4x4 rectangles; ignore frame and background not counted.
    if split == "val":
        assert pixels["2008_000009"] == {1: 80, 2: 30, 3: 16}
        assert pixels["2008_000013"] == {}


def test_index_cache_is_reused_by_a_new_tree(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = VOCTree(root).class_pixels("val")
    assert (root / ".crnet_index_val.json").is_file()
    forbid_label_reads(monkeypatch)
    assert VOCTree(root).class_pixels("val") == first == truth("val")


def test_index_cache_is_per_split(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    VOCTree(root).class_pixels("val")
    reads = count_label_reads(monkeypatch)
    assert VOCTree(root).class_pixels("train") == truth("train")
    assert len(reads) == len(ids("train"))  # the val cache did not answer for train


@pytest.mark.parametrize("change", ["fewer ids", "same size, new mtime"])
def test_index_cache_rebuilt_when_split_file_changes(
    root: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    VOCTree(root).class_pixels("val")
    split_file = root / "ImageSets/Segmentation/val.txt"
    old = split_file.stat()
    # "same size": swap one id for a train id of the same length, so only the mtime tells the change.
    kept = ids("val")[:2] if change == "fewer ids" else [*ids("val")[:-1], ids("train")[0]]
    split_file.write_text("\n".join(reversed(kept)) + "\n")
    # Force a distinct mtime: two writes within the file system's timestamp granularity could share one.
    os.utime(split_file, ns=(old.st_atime_ns, old.st_mtime_ns + 5_000_000_000))
    if change != "fewer ids":
        assert split_file.stat().st_size == old.st_size
    reads = count_label_reads(monkeypatch)
    assert VOCTree(root).class_pixels("val") == {i: TRUTH[i] for i in kept}
    assert len(reads) == len(kept)


def test_index_cache_rebuilt_when_a_label_is_edited_in_place(root: Path) -> None:
    """The list file unchanged, one label rewritten (a class painted out): the cached counts must not
    answer, or episodes keep drawing the class from an image that no longer has it."""
    VOCTree(root).class_pixels("val")
    label_path = root / "SegmentationClassAug" / "2008_000009.png"
    label = np.array(Image.open(label_path))
    old = label_path.stat()
    label[label == 2] = 0
    Image.fromarray(label).save(label_path)
    os.utime(label_path, ns=(old.st_atime_ns, old.st_mtime_ns + 5_000_000_000))  # a distinct mtime
    assert VOCTree(root).class_pixels("val")["2008_000009"] == {1: 80, 3: 16}


@pytest.mark.parametrize("how", ["dated back", "renamed over"])
def test_index_cache_rebuilt_when_a_label_is_replaced_by_an_older_file(root: Path, how: str) -> None:
    """A corrected label set restored with its old dates (`cp -p`, `rsync -a`, `tar x`): the newest mtime
    does not change, the counts must all the same."""
    VOCTree(root).class_pixels("val")
    label_path = root / "SegmentationClassAug" / "2008_000009.png"
    label = np.array(Image.open(label_path))
    past = label_path.stat().st_mtime_ns - 86_400 * 10**9
    label[label == 2] = 0
    target = label_path if how == "dated back" else root / "corrected.png"
    Image.fromarray(label).save(target)
    os.utime(target, ns=(past, past))
    if how == "renamed over":
        target.replace(label_path)
    assert VOCTree(root).class_pixels("val")["2008_000009"] == {1: 80, 3: 16}


@pytest.mark.parametrize(
    "damage",
    [b"{not json", b"\xff\xfe\x00\x80 binary", b"[]", b'{"stamp": "0:0:0", "pixels": {}}', b""],
    ids=["truncated", "not-utf8", "list", "stale-stamp", "empty"],
)
def test_damaged_index_cache_is_rebuilt(root: Path, damage: bytes) -> None:
    VOCTree(root).class_pixels("val")
    cache = root / ".crnet_index_val.json"
    cache.write_bytes(damage)
    assert VOCTree(root).class_pixels("val") == truth("val")
    assert json.loads(cache.read_text())["pixels"] == {
        k: {str(c): n for c, n in v.items()} for k, v in truth("val").items()
    }


def test_damaged_cache_with_current_stamp_is_rebuilt(root: Path) -> None:
    VOCTree(root).class_pixels("val")
    cache = root / ".crnet_index_val.json"
    stored = json.loads(cache.read_text())
    for counts in ({"one": 3}, {"1": "444"}, {"1": None}, {"1": 2.5}):
        cache.write_text(json.dumps({"stamp": stored["stamp"], "pixels": {VAL_ID: counts}}))
        assert VOCTree(root).class_pixels("val") == truth("val")


def _cache_files(base: Path) -> list[Path]:
    return sorted((base / "crnet").glob("index_*_val.json")) if (base / "crnet").is_dir() else []


def _check_cache_outside(root: Path, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert VOCTree(root).class_pixels("val") == truth("val")
    assert not list(root.glob(".crnet_index_*"))
    assert len(_cache_files(base)) == 1
    forbid_label_reads(monkeypatch)
    assert VOCTree(root).class_pixels("val") == truth("val")  # reused from the user cache


def _deny_write(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running as root, permission bits do not stop writes, so "unwritable" is simulated at os.access."""
    real_access = os.access
    monkeypatch.setattr(
        pascal.os, "access", lambda p, mode: False if Path(p) == root else real_access(p, mode)
    )


def test_unwritable_root_caches_in_xdg_cache_home(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _deny_write(root, monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    _check_cache_outside(root, tmp_path / "xdg", monkeypatch)


@pytest.mark.parametrize("xdg", [None, "", "relative/cache"])  # the last two: ignored, as the XDG rule says
def test_unwritable_root_without_xdg_uses_home_cache(
    xdg: str | None, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _deny_write(root, monkeypatch)
    monkeypatch.chdir(tmp_path)
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Path.home() reads HOME on POSIX
    _check_cache_outside(root, tmp_path / "home/.cache", monkeypatch)


def test_read_only_root_caches_in_xdg_cache_home(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.places import make_read_only, release

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if not make_read_only(root):
        pytest.skip("root writes anywhere, and this machine lets the test mount nothing read-only")
    try:
        _check_cache_outside(root, tmp_path / "xdg", monkeypatch)
    finally:
        release(root)


def test_two_roots_get_distinct_user_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_fake_voc(tmp_path / "a"), make_fake_voc(tmp_path / "b")
    (b / "ImageSets/Segmentation/val.txt").write_text(ids("val")[0] + "\n")
    monkeypatch.setattr(pascal.os, "access", lambda p, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert VOCTree(a).class_pixels("val") == truth("val")
    assert VOCTree(b).class_pixels("val") == {ids("val")[0]: TRUTH[ids("val")[0]]}
    assert len(_cache_files(tmp_path / "xdg")) == 2


# ---------------------------------------------------------------- samples


@pytest.mark.parametrize("min_pixels", [1, 5, 10, 50, 100])
@pytest.mark.parametrize(
    "split, classes", [("val", (1, 2, 3, 4, 5)), ("val", (2, 5, 6)), ("train", (6, 7, 19))]
)
def test_samples(root: Path, split: str, classes: tuple[int, ...], min_pixels: int) -> None:
    expected = sorted(
        (image_id, c)
        for image_id, counts in truth(split).items()
        for c, n in counts.items()
        if c in classes and n >= min_pixels
    )
    assert VOCTree(root).samples(split, classes, min_pixels) == expected


def test_samples_min_pixels_by_hand(root: Path) -> None:
    # Val class 5: 4 px in 2008_000010, 50 px in 2008_000011, 64 px in 2008_000012.
    tree = VOCTree(root)
    assert tree.samples("val", (5,)) == [("2008_000010", 5), ("2008_000011", 5), ("2008_000012", 5)]
    assert tree.samples("val", (5,), min_pixels=5) == [("2008_000011", 5), ("2008_000012", 5)]
    assert tree.samples("val", (5,), min_pixels=51) == [("2008_000012", 5)]
    assert tree.samples("val", (5,), min_pixels=65) == []


# ---------------------------------------------------------------- load and validation


@pytest.mark.parametrize("image_id", [image.id for image in IMAGES])
def test_load_returns_image_and_label(root: Path, image_id: str) -> None:
    image, label = VOCTree(root).load(image_id)
    spec = BY_ID[image_id]
    assert image.dtype == np.uint8 and image.shape == (*spec.shape, 3)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, spec.label())  # PNG is lossless; "P" labels keep their indices
    # JPEG is lossy: the picture comes back only approximately. Quality 95 without chroma subsampling
    # measured a mean absolute error under 2 grey levels; 6 leaves room for other libjpeg builds while a
    # mirrored or different picture is off by tens.
    assert np.abs(image.astype(int) - spec.image().astype(int)).mean() < 6


def _jpeg_bytes(tmp_path: Path) -> bytes:
    Image.fromarray(BY_ID[VAL_ID].image()).save(tmp_path / "x.jpg")
    return (tmp_path / "x.jpg").read_bytes()


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "empty", "directory", "missing"])
def test_unreadable_image(root: Path, tmp_path: Path, damage: str) -> None:
    path = root / "JPEGImages" / f"{VAL_ID}.jpg"
    good = _jpeg_bytes(tmp_path)
    path.unlink()
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "directory":
        path.mkdir()
    with pytest.raises(ImageReadError, match=VAL_ID):
        VOCTree(root).load(VAL_ID)


@pytest.mark.skipif(IS_ROOT, reason="root can read a file without read permission")
def test_image_without_read_permission(root: Path) -> None:
    path = root / "JPEGImages" / f"{VAL_ID}.jpg"
    path.chmod(0)
    try:
        with pytest.raises(ImageReadError):
            VOCTree(root).load(VAL_ID)
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit gray pixels, with almost no data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("damage", ["missing", "random bytes", "billions of pixels", "a bad PGM header"])
def test_unreadable_label(root: Path, damage: str) -> None:
    path = root / "SegmentationClassAug" / f"{VAL_ID}.png"
    path.unlink()
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif damage == "billions of pixels":  # PIL's DecompressionBombError
        path.write_bytes(_png_claiming(100_000, 100_000))
    elif damage == "a bad PGM header":  # PIL's ValueError
        path.write_bytes(b"P5\n64 64\n25a\n" + bytes(4096))
    with pytest.raises(ImageReadError, match=VAL_ID):
        VOCTree(root).load(VAL_ID)


def test_a_list_saved_with_a_byte_order_mark_reads_its_first_id(root: Path) -> None:
    """Windows' Notepad starts a UTF-8 file with a BOM: it is no part of the first image id."""
    path = root / "ImageSets/Segmentation/val.txt"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert VOCTree(root).ids("val") == ids("val")


def test_a_list_with_a_nul_byte_is_one_error(root: Path) -> None:
    path = root / "ImageSets/Segmentation/val.txt"
    path.write_text(path.read_text() + "bad\0id\n")
    with pytest.raises(NotAVOCTreeError, match="NUL byte"):
        VOCTree(root).class_pixels("val")


def test_missing_label_fails_the_index_scan(root: Path) -> None:
    (root / "SegmentationClassAug" / f"{VAL_ID}.png").unlink()
    with pytest.raises(ImageReadError, match="label not found"):
        VOCTree(root).class_pixels("val")


@pytest.mark.parametrize("shape", [(31, 40), (30, 41), (40, 30)])
def test_label_of_the_wrong_size(root: Path, shape: tuple[int, int]) -> None:
    # The image is 40 wide, 30 high; (40, 30) is the transposed size.
    save_label(np.zeros(shape, np.uint8), root / "SegmentationClassAug" / f"{VAL_ID}.png")
    with pytest.raises(MaskError, match="40x30"):
        VOCTree(root).load(VAL_ID)


@pytest.mark.parametrize("value", [21, 100, 254])
@pytest.mark.parametrize("palette", [False, True])
def test_label_values_outside_the_classes(root: Path, value: int, palette: bool) -> None:
    label = BY_ID[VAL_ID].label()
    label[5, 5] = value
    save_label(label, root / "SegmentationClassAug" / f"{VAL_ID}.png", palette=palette)
    with pytest.raises(MaskError, match=str(value)):
        VOCTree(root).load(VAL_ID)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "I;16"])
def test_label_that_is_not_single_channel_8_bit(root: Path, mode: str) -> None:
    label = BY_ID[VAL_ID].label()
    if mode == "I;16":
        image = Image.fromarray(label.astype(np.uint16))
    else:
        image = Image.fromarray(label).convert(mode)  # class ids kept in every channel: still refused
    assert image.mode == mode
    image.save(root / "SegmentationClassAug" / f"{VAL_ID}.png")
    with pytest.raises(MaskError, match=f"mode {mode}"):
        VOCTree(root).load(VAL_ID)


@pytest.mark.parametrize(
    "mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG")]
)
def test_image_modes_convert_to_rgb(root: Path, mode: str, fmt: str) -> None:
    rgb = BY_ID[VAL_ID].image()
    source = Image.fromarray(rgb).convert(mode)
    # PIL opens by content, so a PNG stored under the .jpg name is a valid test of the conversion.
    source.save(root / "JPEGImages" / f"{VAL_ID}.jpg", format=fmt)
    image, label = VOCTree(root).load(VAL_ID)
    assert image.dtype == np.uint8 and image.shape == (30, 40, 3)
    if mode in ("L", "LA"):
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    if fmt == "PNG":  # lossless: exactly PIL's own conversion of what was written (RGBA: alpha dropped)
        np.testing.assert_array_equal(image, np.asarray(source.convert("RGB")))
    np.testing.assert_array_equal(label, BY_ID[VAL_ID].label())


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path) -> None:
    from PIL import Image

    from crnet.data.pascal import read_image

    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (1, 4, 3) and image.dtype == np.uint8
    assert image[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_images_are_refused(tmp_path) -> None:
    from PIL import Image

    from crnet.data.pascal import read_image
    from crnet.errors import ImageReadError

    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match="mode F"):
        read_image(tmp_path / "float.tif")


def test_small_object_rule_per_tree(root: Path, tmp_path: Path) -> None:
    """PASCAL: 2048 pixels, as PFENet and BAM; the built-in benchmark: the same share of its image."""
    from crnet.data import synthetic

    tree = VOCTree(root)
    assert tree.min_object_pixels == 2 * 32 * 32
    assert tree.object_threshold(None) == 2048 and tree.object_threshold(1) == 1
    # The fake tree's objects are all far below 2048 pixels: under the rule it has no sample at all.
    assert tree.samples("val", fold_classes(0), tree.min_object_pixels) == []
    bench = synthetic.generate(tmp_path / "syn", seed=0, train_per_class=2, val_per_class=2, image_size=128)
    assert VOCTree(bench).min_object_pixels == round(2048 * 128 * 128 / (500 * 375)) == 179


def test_a_very_large_image_is_one_crnet_warning(tmp_path, monkeypatch) -> None:
    """Between PIL's limit and twice it: one crnet warning (a `warning:` line in the CLI), not PIL's two
    lines of source; above twice the limit: an ImageReadError."""
    import warnings

    from crnet.errors import CRNetWarning

    Image.fromarray(np.zeros((11, 11, 3), np.uint8)).save(tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 121 pixels: over the limit, under twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pascal.read_image(tmp_path / "large.png").shape == (11, 11, 3)
    assert [(w.category, str(w.message)) for w in caught] == [
        (CRNetWarning, f"{tmp_path / 'large.png'} has 121 pixels: reading it takes much memory")
    ]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        pascal.read_image(tmp_path / "large.png")


def _picture(tmp_path: Path) -> Image.Image:
    rng = np.random.default_rng(0)  # noise: PNG and deflate cannot compress it away
    return Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))


def _damaged(path: Path) -> Path:
    """The file with 8 bytes of its compressed pixels inverted, three quarters of the way into them."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".png":
        at = data.index(b"IDAT") + 4
        start, length = at, int.from_bytes(data[at - 8 : at - 4], "big")
    else:  # TIFF: the first strip
        with Image.open(path) as image:
            start, length = image.tag_v2[273][0], image.tag_v2[279][0]
    at = start + length * 3 // 4
    data[at : at + 8] = bytes(b ^ 0xFF for b in data[at : at + 8])
    damaged = path.with_name(f"damaged_{path.name}")
    damaged.write_bytes(bytes(data))
    return damaged


@pytest.mark.parametrize("as_shown", [True, False])
@pytest.mark.parametrize("suffix, options", [(".png", {}), (".tif", {"compression": "tiff_deflate"})])
def test_a_damaged_image_is_refused_not_read_half_black(tmp_path, capfd, suffix, options, as_shown) -> None:
    """Read as shown (infer's supports and queries), a PNG or TIFF damaged three quarters of the way in was
    taken with its rest black, exit 0: turning it by its EXIF orientation decoded it and swallowed the error.
    libtiff's own stderr line came beside the error line."""
    _picture(tmp_path).save(tmp_path / f"full{suffix}", **options)
    damaged = _damaged(tmp_path / f"full{suffix}")
    with pytest.raises(ImageReadError, match=f"cannot read image {damaged}"):
        pascal.read_image(damaged, as_shown=as_shown)
    Image.fromarray(np.asarray(_picture(tmp_path))[:, :, 0] % 2).save(tmp_path / f"mask{suffix}", **options)
    with pytest.raises(ImageReadError, match="cannot read mask"):
        pascal.read_label(_damaged(tmp_path / f"mask{suffix}"), as_shown=as_shown, binary=True)
    assert capfd.readouterr().err == ""


def test_a_png_with_a_damaged_chunk_or_frames_is_one_error(tmp_path) -> None:
    """PIL raises SyntaxError for a damaged chunk type and IndexError or TypeError for a truncated animation's
    frames: tracebacks, which ImageReadError's list did not name."""
    pixels = np.asarray(_picture(tmp_path))
    rows = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in pixels))  # filter 0 before each row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = chunk(b"IHDR", (96).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0]))
    # the pixels in two IDAT chunks, the second's type damaged
    body = header + chunk(b"IDAT", rows[:100]) + chunk(b"\x01\x02\x03\x04", rows[100:]) + chunk(b"IEND", b"")
    path = tmp_path / "chunk.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    with pytest.raises(ImageReadError, match="chunk"):
        pascal.read_image(path, as_shown=True)
    picture = _picture(tmp_path)
    for suffix in (".gif", ".tif"):
        picture.save(tmp_path / f"one{suffix}")
        whole = tmp_path / f"frames{suffix}"
        picture.save(whole, save_all=True, append_images=[picture.rotate(90), picture.rotate(180)])
        # a GIF cut inside its second frame's header, a TIFF's first frame without the tags that follow it
        keep = (tmp_path / "one.gif").stat().st_size + 100 if suffix == ".gif" else whole.stat().st_size // 2
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(whole.read_bytes()[:keep])
        with pytest.raises(
            ImageReadError, match=f"cannot read image {cut}: a frame after the first is damaged"
        ):
            pascal.read_image(cut, as_shown=True)


def test_legal_images_read_without_pil_s_warnings(tmp_path) -> None:
    """A 16-bit PGM (PIL opens it as 32-bit integers) was refused as "32-bit"; a palette PNG with its
    transparency as bytes printed PIL's two-line warning."""
    import warnings

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(">u2")
    (tmp_path / "deep.pgm").write_bytes(b"P5 64 64 65535\n" + ramp.tobytes())
    image = pascal.read_image(tmp_path / "deep.pgm")
    assert np.array_equal(image[:, :, 0], (ramp.astype(np.uint32) >> 8).astype(np.uint8))
    palette = _picture(tmp_path).convert("P")
    palette.save(tmp_path / "clear.png", transparency=bytes([0, 128] + [255] * 254))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pascal.read_image(tmp_path / "clear.png", as_shown=True).shape == (96, 96, 3)


def _with_tag(path: Path, page: int, tag: int, value: int) -> Path:
    """A copy of a little-endian TIFF with a SHORT tag of one page set to `value`."""
    data = bytearray(path.read_bytes())
    ifd = int.from_bytes(data[4:8], "little")
    for _ in range(page):  # each page's directory: a count, 12 bytes an entry, then the next's offset
        count = int.from_bytes(data[ifd : ifd + 2], "little")
        ifd = int.from_bytes(data[ifd + 2 + 12 * count : ifd + 6 + 12 * count], "little")
    for entry in range(int.from_bytes(data[ifd : ifd + 2], "little")):
        at = ifd + 2 + 12 * entry
        if int.from_bytes(data[at : at + 2], "little") == tag:
            data[at + 8 : at + 10] = value.to_bytes(2, "little")
    edited = path.with_name(f"{tag}_{value}_{path.name}")
    edited.write_bytes(bytes(data))
    return edited


def test_damaged_tiffs_are_one_error_with_their_reason(tmp_path, capfd) -> None:
    """A later page's unknown compression was a KeyError traceback; PIL logged "More samples per pixel than
    can be decoded" to stderr beside the error line (which said only "cannot identify image file"); libtiff's
    reasons named "tempfile.tif", PIL's name for every file it hands libtiff."""
    picture = _picture(tmp_path)
    pages = tmp_path / "pages.tif"
    picture.save(pages, save_all=True, append_images=[picture.rotate(90)], compression="tiff_lzw")
    with pytest.raises(ImageReadError, match="a frame after the first is damaged \\(an unknown value 0"):
        pascal.read_image(_with_tag(pages, 1, 259, 0), as_shown=True)  # 259: Compression
    picture.save(tmp_path / "one.tif", compression="tiff_lzw")
    with pytest.raises(ImageReadError, match="More samples per pixel than can be decoded: 255"):
        pascal.read_image(_with_tag(tmp_path / "one.tif", 0, 277, 255))  # 277: SamplesPerPixel
    with pytest.raises(ImageReadError) as damaged:
        pascal.read_image(_damaged(tmp_path / "one.tif"))
    assert "tempfile" not in str(damaged.value)
    assert capfd.readouterr().err == ""


def test_training_list_sharing_images_with_val_is_refused(root: Path) -> None:
    """Nothing compared the lists: a train list holding a val image trained on a test query in silence."""
    listed = root / "ImageSets/Segmentation/train_aug.txt"
    listed.write_text(listed.read_text() + ids("val")[0] + "\n")
    with pytest.raises(NotAVOCTreeError, match=f"image is in both .* \\(such as {ids('val')[0]}\\)"):
        VOCTree(root).check_training_list()
    (root / "ImageSets/Segmentation/val.txt").unlink()  # a tree to train on only: nothing to compare
    assert VOCTree(root).check_training_list() is None


def test_training_from_vocs_own_train_txt_is_said(tmp_path: Path) -> None:
    """The fallback to VOC's 1464-image train.txt was silent; on the built-in benchmark it is not one."""
    root = make_fake_voc(tmp_path / "voc", train_file="train.txt")
    assert "VOC's own list" in VOCTree(root).check_training_list()
    (root / "synthetic.json").write_text(
        json.dumps({"class_names": [f"c{i}" for i in range(20)], "image_size": 64})
    )
    assert VOCTree(root).check_training_list() is None


def test_training_from_train_aug_says_nothing(root: Path) -> None:
    assert VOCTree(root).check_training_list() is None
