"""The built-in benchmark: layout, label semantics, ignore band, determinism, `ensure`, colour ambiguity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crnet.data import scenes, synthetic

PARAMS = {"seed": 3, "train_per_class": 4, "val_per_class": 2, "image_size": 64}
SMALL = {"seed": 1, "train_per_class": 1, "val_per_class": 1, "image_size": 48}
LISTS = {"train": "train_aug", "val": "val"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("bench") / "root", **PARAMS)


def split_ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{LISTS[split]}.txt").read_text().split()


def load_label(root: Path, image_id: str) -> np.ndarray:
    with Image.open(root / "SegmentationClassAug" / f"{image_id}.png") as image:
        assert image.mode == "L"
        return np.asarray(image)


def all_labels(root: Path) -> list[tuple[str, int, np.ndarray]]:
    """(split, main class, label) for every image, main class taken from the id's index."""
    out = []
    for split in LISTS:
        per_class = PARAMS[f"{split}_per_class"]
        for image_id in split_ids(root, split):
            index = int(image_id.rsplit("_", 1)[1])
            out.append((split, index // per_class + 1, load_label(root, image_id)))
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_class_table_and_folds() -> None:
    assert len(scenes.CLASS_NAMES) == 20 and len(set(scenes.CLASS_NAMES)) == 20
    folds = scenes.FOLDS
    assert folds == ((1, 2, 3, 4, 5), (6, 7, 8, 9, 10), (11, 12, 13, 14, 15), (16, 17, 18, 19, 20))
    pairs = {(c.shape, c.texture) for c in scenes.CLASSES}
    assert len(pairs) == 20, "every class needs its own (shape, texture) family pair"
    assert {c.shape for c in scenes.CLASSES} <= set(scenes.SHAPES)
    assert {c.texture for c in scenes.CLASSES} <= set(scenes.TEXTURES)


def test_layout_and_formats(bench: Path) -> None:
    size = PARAMS["image_size"]
    for split, prefix in (("train", "syn_train_"), ("val", "syn_val_")):
        ids = split_ids(bench, split)
        assert ids == sorted(ids) and len(ids) == len(set(ids))
        assert len(ids) == 20 * PARAMS[f"{split}_per_class"]
        assert all(i.startswith(prefix) and len(i) == len(prefix) + 6 for i in ids)
        for image_id in ids:
            with Image.open(bench / "JPEGImages" / f"{image_id}.jpg") as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (size, size))
            with Image.open(bench / "SegmentationClassAug" / f"{image_id}.png") as label:
                assert (label.format, label.mode, label.size) == ("PNG", "L", (size, size))
    meta = json.loads((bench / "synthetic.json").read_text())
    assert meta["version"] == synthetic.GENERATOR_VERSION
    assert {k: meta[k] for k in PARAMS} == PARAMS
    assert meta["class_names"] == list(scenes.CLASS_NAMES)
    n_files = sum(20 * PARAMS[f"{s}_per_class"] for s in LISTS)
    assert len(list((bench / "JPEGImages").iterdir())) == n_files
    assert len(list((bench / "SegmentationClassAug").iterdir())) == n_files


def test_labels_values_main_class_and_distractors(bench: Path) -> None:
    allowed = set(range(21)) | {255}
    with_distractor = 0
    main_share = []
    for _, main, label in all_labels(bench):
        values = set(np.unique(label).tolist())
        assert values <= allowed
        assert main in values, "the main class must be visible"
        with_distractor += bool(values - {0, 255, main})
        main_share.append((label == main).mean())
    n = len(main_share)
    assert with_distractor >= 0.5 * n
    assert with_distractor < n, "some images should show the main class alone"
    # Objects are large: the main class covers a few percent to a few tens of percent of the image.
    assert 0.04 <= float(np.median(main_share)) <= 0.4


def test_per_class_counts(bench: Path) -> None:
    for split in LISTS:
        mains = [main for s, main, _ in all_labels(bench) if s == split]
        assert np.bincount(mains, minlength=21)[1:].tolist() == [PARAMS[f"{split}_per_class"]] * 20


def test_ignore_band_covers_every_boundary(bench: Path) -> None:
    for _, _, label in all_labels(bench):
        assert (label == 255).any()
        keep = label != 255
        for a, b in ((np.s_[1:, :], np.s_[:-1, :]), (np.s_[:, 1:], np.s_[:, :-1])):
            both = keep[a] & keep[b]
            assert not (both & (label[a] != label[b])).any(), "two labelled neighbours differ: band gap"


def test_ignore_band_sits_on_boundaries() -> None:
    size = PARAMS["image_size"]
    width = scenes.band_width(size)
    assert width == 1 and scenes.band_width(128) == 1 and scenes.band_width(256) == 2
    for index in range(6):
        main = index + 1
        _, raw = scenes.render_sample(PARAMS["seed"], 0, index, main, size)
        assert 255 not in raw
        banded = scenes.ignore_band(raw, width)
        ignored = banded == 255
        near_change = np.zeros_like(ignored)
        for a, b in ((np.s_[1:, :], np.s_[:-1, :]), (np.s_[:, 1:], np.s_[:, :-1])):
            diff = raw[a] != raw[b]
            near_change[a] |= diff
            near_change[b] |= diff
        assert ignored.any()
        assert np.array_equal(ignored, near_change)  # every 255 pixel touches a label change, and vice versa
        assert np.array_equal(banded[~ignored], raw[~ignored])
    # The width grows by whole 4-neighbour steps; a straight edge gets 2 * width ignored columns.
    step = np.zeros((8, 12), np.uint8)
    step[:, 6:] = 3
    assert (scenes.ignore_band(step, 2)[0] == 255).sum() == 4


def test_written_labels_match_render(bench: Path) -> None:
    image_id = split_ids(bench, "val")[5]
    index = int(image_id.rsplit("_", 1)[1])
    image, raw = scenes.render_sample(PARAMS["seed"], 1, index, index // PARAMS["val_per_class"] + 1, 64)
    assert np.array_equal(load_label(bench, image_id), scenes.ignore_band(raw))
    with Image.open(bench / "JPEGImages" / f"{image_id}.jpg") as jpg:
        assert np.abs(np.asarray(jpg).astype(int) - image).mean() < 8  # JPEG q95 of the same pixels


def test_deterministic(bench: Path, tmp_path: Path) -> None:
    again = synthetic.generate(tmp_path / "again", **PARAMS)
    assert tree_bytes(again) == tree_bytes(bench)
    other = synthetic.generate(tmp_path / "other", **{**PARAMS, "seed": PARAMS["seed"] + 1})
    first, second = tree_bytes(bench), tree_bytes(other)
    assert first.keys() == second.keys()
    differing = [k for k in first if k.startswith("JPEGImages") and first[k] != second[k]]
    assert len(differing) == len([k for k in first if k.startswith("JPEGImages")])


def test_images_independent_of_counts() -> None:
    # An image depends only on (seed, split, index, main class), not on how many images are generated.
    a = scenes.render_sample(7, 0, 11, 4, 48)
    b = scenes.render_sample(7, 0, 11, 4, 48)
    c = scenes.render_sample(7, 1, 11, 4, 48)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_colour_alone_is_ambiguous(bench: Path) -> None:
    """Hue histograms of the classes' pixels overlap: each class shares its hues with several others."""
    bins = 12
    hist = np.zeros((21, bins))
    for split in LISTS:
        for image_id in split_ids(bench, split):
            label = load_label(bench, image_id)
            with Image.open(bench / "JPEGImages" / f"{image_id}.jpg") as jpg:
                hsv = np.asarray(jpg.convert("HSV")).reshape(-1, 3)
            hue_bin = hsv[:, 0].astype(int) * bins // 256
            coloured = hsv[:, 1] > 40  # grey pixels have no meaningful hue
            flat = label.reshape(-1)
            for c in np.unique(flat):
                if 1 <= c <= 20:
                    pick = (flat == c) & coloured
                    hist[c] += np.bincount(hue_bin[pick], minlength=bins)
    hist = hist[1:] / hist[1:].sum(1, keepdims=True)
    overlap = np.minimum(hist[:, None, :], hist[None, :, :]).sum(-1)  # histogram intersection, 1 = same
    np.fill_diagonal(overlap, 0)
    partners = (overlap >= 0.3).sum(1)
    assert partners.min() >= 2, f"classes with fewer than 2 hue partners: {np.flatnonzero(partners < 2) + 1}"
    # ... and no class's hues are spread evenly over the wheel either (colour is characteristic, not random).
    assert hist.max(1).min() >= 1.5 / bins


def test_ensure_generates_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data" / "bench"
    assert synthetic.ensure(root, **SMALL) == root
    assert json.loads((root / "synthetic.json").read_text())["seed"] == SMALL["seed"]
    assert [p.name for p in root.parent.iterdir()] == ["bench"], "no temporary directory left behind"
    umask = os.umask(0o022)
    os.umask(umask)
    assert root.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700
    before = tree_bytes(root)

    def fail(*args, **kwargs):
        raise AssertionError("ensure regenerated a complete benchmark")

    monkeypatch.setattr(synthetic, "generate", fail)
    assert synthetic.ensure(root, **SMALL) == root
    assert tree_bytes(root) == before


@pytest.mark.parametrize(
    "gone",
    [
        "JPEGImages/syn_val_000003.jpg",
        "SegmentationClassAug/syn_train_000000.png",
        "ImageSets/Segmentation/val.txt",
    ],
)
def test_ensure_names_a_benchmark_with_files_missing(tmp_path: Path, gone: str) -> None:
    """A complete marker, a file deleted since: it said "benchmark ready", and eval failed on the file."""
    root = synthetic.ensure(tmp_path / "bench", **SMALL)
    (root / gone).unlink()
    with pytest.raises(synthetic.BenchmarkRootError, match=f"1 of its files missing \\(first: .*{gone}\\)"):
        synthetic.ensure(root, **SMALL)
    assert (root / "synthetic.json").is_file()  # nothing removed on the user's behalf


@pytest.mark.parametrize("edit", ["fewer", "another id", "a folder for a label"])
def test_ensure_names_a_benchmark_edited_since(tmp_path: Path, edit: str) -> None:
    """A list edited (eval then ran on another benchmark) or a label turned into a folder."""
    root = synthetic.ensure(tmp_path / "bench", **SMALL)
    listed = root / "ImageSets/Segmentation/val.txt"
    ids = listed.read_text().split()
    if edit == "fewer":
        listed.write_text("\n".join(ids[6:]) + "\n")
    elif edit == "another id":
        listed.write_text("\n".join([*ids[:-1], "syn_val_999999"]) + "\n")
    else:
        label = root / "SegmentationClassAug" / f"{ids[0]}.png"
        label.unlink()
        label.mkdir()
    expected = "missing" if edit == "a folder for a label" else "does not list its split's"
    with pytest.raises(synthetic.BenchmarkRootError, match=expected):
        synthetic.ensure(root, **SMALL)


def test_ensure_refuses_other_parameters(tmp_path: Path) -> None:
    root = synthetic.ensure(tmp_path / "bench", **SMALL)
    with pytest.raises(ValueError, match="different parameters"):
        synthetic.ensure(root, **{**SMALL, "seed": 2})
    meta = json.loads((root / "synthetic.json").read_text())
    (root / "synthetic.json").write_text(json.dumps({**meta, "version": 0}))
    with pytest.raises(synthetic.BenchmarkRootError):
        synthetic.ensure(root, **SMALL)
    with pytest.raises(TypeError):
        synthetic.ensure(root, colour=True)


def test_ensure_replaces_only_generator_leftovers(tmp_path: Path) -> None:
    # An interrupted run: some generator files, no marker. It is replaced by a complete tree.
    root = tmp_path / "bench"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "JPEGImages" / "syn_train_000000.jpg").write_bytes(b"truncated")
    synthetic.ensure(root, **SMALL)
    assert (root / "synthetic.json").is_file()
    with Image.open(root / "JPEGImages" / "syn_train_000000.jpg") as image:
        assert image.size == (48, 48)

    # A directory holding anything else is user data: refused and left untouched.
    user = tmp_path / "user"
    (user / "JPEGImages").mkdir(parents=True)
    (user / "JPEGImages" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        synthetic.ensure(user, **SMALL)
    assert (user / "JPEGImages" / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench", "user"]


@pytest.mark.parametrize("start", ["empty", "leftovers"])
def test_files_put_into_the_root_while_it_generates_are_kept(start, tmp_path, monkeypatch) -> None:
    """The root was checked once, before minutes of generating, then removed: a user's files added to it
    meanwhile went with it."""
    root = tmp_path / "bench"
    (root / "JPEGImages").mkdir(parents=True)
    if start == "leftovers":
        (root / "JPEGImages" / "syn_train_000000.jpg").write_bytes(b"truncated")
    generate = synthetic.generate

    def user_adds_a_file(*args, **kwargs):
        generate(*args, **kwargs)
        (root / "notes.txt").write_text("the user's")

    monkeypatch.setattr(synthetic, "generate", user_adds_a_file)
    with pytest.raises(synthetic.BenchmarkRootError, match="received other files"):
        synthetic.ensure(root, **SMALL)
    assert (root / "notes.txt").read_text() == "the user's"
    assert [p.name for p in tmp_path.iterdir()] == ["bench"]


def test_invalid_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate(tmp_path / "x", image_size=8)
    with pytest.raises(ValueError, match="train_per_class"):
        synthetic.ensure(tmp_path / "x", train_per_class=-1)
    with pytest.raises(ValueError, match="main_class"):
        scenes.render_sample(0, 0, 0, 21)
    assert not (tmp_path / "x").exists()


def test_a_linked_root_is_written_where_it_points(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    synthetic.ensure(tmp_path / "link", **SMALL)
    assert (tmp_path / "link").is_symlink() and (target / "synthetic.json").is_file()
    synthetic.ensure(tmp_path / "link", **SMALL)  # and found there again


def test_a_root_below_a_file_is_one_line(tmp_path: Path) -> None:
    from crnet.files import OutputError

    (tmp_path / "a_file").write_text("the user's")
    with pytest.raises(OutputError, match="a_file is a file, not a directory"):
        synthetic.ensure(tmp_path / "a_file" / "bench", **SMALL)
    assert (tmp_path / "a_file").read_text() == "the user's"
