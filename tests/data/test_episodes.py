"""Few-shot episodes on the hand-built tree: the sample index, seeded fixed and training episodes, the
tensors of EpisodeDataset (sizes, mask semantics, flips, full-resolution labels) and collate."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from crnet.config import IMAGENET_MEAN, IMAGENET_STD
from crnet.data.episodes import (
    EpisodeDataset,
    EpisodeSpec,
    SampleIndex,
    TrainingEpisodes,
    binary_mask,
    collate,
    fixed_episodes,
    hue_rotation,
)
from crnet.data.pascal import VOCTree, base_classes, fold_classes
from crnet.errors import CRNetWarning, DataError, MaskError
from tests.fake_voc import BY_ID, make_fake_voc, truth

NOVEL = fold_classes(0)  # 1..5: each in >= 2 val images of the fake tree
BASE = base_classes(0)  # 6..20: each in exactly 2 train images
SIZE = 33  # a small odd input side, like the paper's 321


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> VOCTree:
    # Shared read-only by every test here (only the index cache is written beside it).
    return VOCTree(make_fake_voc(tmp_path_factory.mktemp("episodes") / "voc"))


@pytest.fixture(scope="module")
def val_index(tree: VOCTree) -> SampleIndex:
    return SampleIndex(tree, "val", NOVEL)


@pytest.fixture(scope="module")
def train_index(tree: VOCTree) -> SampleIndex:
    return SampleIndex(tree, "train", BASE)


def images_of(split: str, class_id: int, min_pixels: int = 1) -> list[str]:
    return sorted(i for i, counts in truth(split).items() if counts.get(class_id, 0) >= min_pixels)


# ---------------------------------------------------------------- SampleIndex


def test_sample_index(val_index: SampleIndex) -> None:
    expected = sorted((i, c) for i, counts in truth("val").items() for c in counts if c in NOVEL)
    assert val_index.pairs == expected and len(expected) == 12  # counted by hand from fake_voc.IMAGES
    assert val_index.position == {pair: n for n, pair in enumerate(expected)}
    assert val_index.images == {c: images_of("val", c) for c in NOVEL}
    assert val_index.images[2] == ["2008_000009", "2008_000011", "2008_000012"]


@pytest.mark.parametrize(
    "classes, min_pixels, thin",
    [((1, 6), 1, 6), ((1, 7), 1, 7), ((5,), 60, 5)],
    ids=["one-image", "no-image", "min-pixels"],
)
def test_class_with_fewer_than_two_images(tree: VOCTree, classes, min_pixels: int, thin: int) -> None:
    """Val class 6 is in one image, 7 in none; class 5 has >= 60 px only in 2008_000012 (64 px). Where the
    small-object rule left a class short, the message names it (on PASCAL's default rule, every class of a
    tree of small objects was "in fewer than 2 images", with no word of --min-object-pixels)."""
    with pytest.raises(DataError, match=rf"classes \[{thin}\]") as error:
        SampleIndex(tree, "val", classes, min_pixels)
    rule = "it counts only objects of at least 60 pixels (--min-object-pixels)"
    assert (rule in str(error.value)) == (min_pixels == 60)


def test_min_pixels_drops_tiny_instances(tree: VOCTree) -> None:
    index = SampleIndex(tree, "val", (2, 5), min_pixels=5)  # drops 2 @ 1 px and 5 @ 4 px
    assert index.images == {2: ["2008_000009", "2008_000011"], 5: ["2008_000011", "2008_000012"]}


def test_exclude_images_with_a_class(tree: VOCTree) -> None:
    # Class 4 is in val images 10 and 12: 12 goes, and with it the pair (12, 2) it gave.
    plain = SampleIndex(tree, "val", (2, 3))
    kept = SampleIndex(tree, "val", (2, 3), exclude_images_with=(4, 7))
    assert plain.images[2] == ["2008_000009", "2008_000011", "2008_000012"]
    assert kept.pairs == [p for p in plain.pairs if p != ("2008_000012", 2)]
    assert kept.images == {2: ["2008_000009", "2008_000011"], 3: ["2008_000009", "2008_000011"]}
    assert kept.position == {pair: n for n, pair in enumerate(kept.pairs)}
    # Class 6 is only in image 11, which leaves class 3 a single image: too few for an episode.
    with pytest.raises(DataError, match=r"classes \[3\]"):
        SampleIndex(tree, "val", (2, 3), exclude_images_with=(6,))


# ---------------------------------------------------------------- fixed (evaluation) episodes


def check_episode(index: SampleIndex, episode: EpisodeSpec, classes, shots: int) -> None:
    assert episode.class_id in classes
    images = index.images[episode.class_id]
    assert episode.query in images
    assert len(episode.supports) == shots
    assert all(s in images and s != episode.query for s in episode.supports)


@pytest.mark.parametrize("shots", [1, 2, 5])
def test_fixed_episodes_are_valid(val_index: SampleIndex, shots: int) -> None:
    # Class 1 has 2 val images: with 5 shots its single other image is repeated, never the query, and a
    # warning says so (only then).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        episodes = fixed_episodes(val_index, shots, count=100, seed=0)
    repeats = [str(w.message) for w in caught if issubclass(w.category, CRNetWarning)]
    assert len(repeats) == (shots > 1)
    assert all(r.startswith(("class 1 has", "classes 1,")) and f"fewer than {shots}" in r for r in repeats)
    assert len(episodes) == 100
    for episode in episodes:
        check_episode(val_index, episode, NOVEL, shots)
        assert not episode.query_flip and not any(episode.support_flips)  # test episodes are never flipped


def test_fixed_episodes_walk_every_pair_in_order_before_repeating(val_index: SampleIndex) -> None:
    # As hsnet walks its test list: episode i queries pair i modulo the 12 pairs, in sorted order.
    episodes = fixed_episodes(val_index, 1, count=30, seed=0)
    assert [(e.query, e.class_id) for e in episodes] == (val_index.pairs * 3)[:30]
    assert len(set(val_index.pairs)) == 12


# The first fold-0 episodes of the fake tree, 2-shot, seed 0: (query, class, supports), image ids shortened
# to their last two digits. Pinned so that a change of the walk or of the support draw shows up, and the
# same on every machine (numpy's seeded generator is platform independent).
PINNED = [
    ("09", 1, ("10", "10")),
    ("09", 2, ("11", "12")),
    ("09", 3, ("11", "11")),
    ("10", 1, ("09", "09")),
    ("10", 4, ("12", "12")),
    ("10", 5, ("12", "11")),
    ("11", 2, ("12", "09")),
    ("11", 3, ("09", "09")),
    ("11", 5, ("10", "12")),
    ("12", 2, ("09", "11")),
    ("12", 4, ("10", "10")),
    ("12", 5, ("10", "11")),
    ("09", 1, ("10", "10")),  # the walk starts again
]


def test_fixed_episodes_are_pinned(val_index: SampleIndex) -> None:
    episodes = fixed_episodes(val_index, 2, count=len(PINNED), seed=0)
    assert [(e.query[-2:], e.class_id, tuple(s[-2:] for s in e.supports)) for e in episodes] == PINNED


def test_fixed_episodes_deterministic(tree: VOCTree, val_index: SampleIndex) -> None:
    a = fixed_episodes(val_index, 2, count=50, seed=7)
    assert a == fixed_episodes(val_index, 2, count=50, seed=7)
    # A fresh index of the same data (read from the disk cache) gives the same episodes.
    assert a == fixed_episodes(SampleIndex(VOCTree(tree.root), "val", NOVEL), 2, count=50, seed=7)
    # Episode i depends only on (seed, i): a shorter list is a prefix.
    assert a[:10] == fixed_episodes(val_index, 2, count=10, seed=7)


def test_fixed_episodes_depend_on_seed(val_index: SampleIndex) -> None:
    # 50 episodes over 12 pairs: two seeds agreeing everywhere by chance has probability ~1e-50.
    assert fixed_episodes(val_index, 1, count=50, seed=0) != fixed_episodes(val_index, 1, count=50, seed=1)


# ---------------------------------------------------------------- training episodes


def test_training_episodes_are_valid(train_index: SampleIndex) -> None:
    episodes = TrainingEpisodes(train_index, shots=2, seed=0)
    drawn = [episodes[i] for i in range(300)]
    for episode in drawn:
        check_episode(train_index, episode, BASE, 2)
        # Every base class is in exactly 2 train images, so both supports are the other one.
        (other,) = set(train_index.images[episode.class_id]) - {episode.query}
        assert episode.supports == (other, other)
        assert len(episode.support_flips) == 2
    # Classes are uniform over 15: all show up in 300 draws (missing one: probability ~1e-8).
    assert {e.class_id for e in drawn} == set(BASE)
    flips = [f for e in drawn for f in (e.query_flip, *e.support_flips)]
    assert any(flips) and not all(flips)  # fair coin flips, 900 of them


def test_training_episodes_without_flips(train_index: SampleIndex) -> None:
    episodes = TrainingEpisodes(train_index, shots=1, seed=0, flips=False)
    assert not any(f for i in range(100) for f in (episodes[i].query_flip, *episodes[i].support_flips))


def test_training_episodes_with_hue_turns(train_index: SampleIndex) -> None:
    plain = TrainingEpisodes(train_index, shots=2, seed=0)
    turned = TrainingEpisodes(train_index, shots=2, seed=0, hue_turns=True)
    turns = [turned[i].hue_turn for i in range(200)]
    # The turn is drawn after everything else: the episodes are the plain ones plus a turn.
    unturned = [dataclasses.replace(turned[i], hue_turn=0.0) for i in range(200)]
    assert unturned == [plain[i] for i in range(200)]
    assert all(-np.pi <= t <= np.pi for t in turns) and min(turns) < -2 and max(turns) > 2
    assert all(plain[i].hue_turn == 0.0 for i in range(20))


def test_training_episodes_deterministic_and_order_free(train_index: SampleIndex) -> None:
    first = TrainingEpisodes(train_index, shots=1, seed=3)
    forward = [first[i] for i in range(60)]
    second = TrainingEpisodes(train_index, shots=1, seed=3)
    backward = [second[i] for i in reversed(range(60))][::-1]
    assert forward == backward
    assert [first[i] for i in (59, 7, 7, 0)] == [forward[59], forward[7], forward[7], forward[0]]
    assert forward != [TrainingEpisodes(train_index, shots=1, seed=4)[i] for i in range(60)]
    assert len(first) == 2**62


# ---------------------------------------------------------------- tensors


def test_binary_mask() -> None:
    label = np.array([[0, 3, 5], [255, 3, 7], [3, 255, 0]], dtype=np.uint8)
    expected = np.array([[0, 1, 0], [255, 1, 0], [1, 255, 0]], dtype=np.uint8)
    mask = binary_mask(label, 3)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(binary_mask(label, 9), np.where(label == 255, 255, 0))  # absent class


@pytest.mark.parametrize("shots", [1, 3])
def test_episode_dataset_item(tree: VOCTree, val_index: SampleIndex, shots: int) -> None:
    specs = fixed_episodes(val_index, shots, count=8, seed=0)
    dataset = EpisodeDataset(tree, val_index, specs, SIZE)
    assert len(dataset) == 8
    for spec, item in zip(specs, (dataset[i] for i in range(8)), strict=True):
        assert item["query_image"].shape == (3, SIZE, SIZE) and item["query_image"].dtype == torch.float32
        assert item["query_mask"].shape == (SIZE, SIZE) and item["query_mask"].dtype == torch.int64
        assert item["support_images"].shape == (shots, 3, SIZE, SIZE)
        assert item["support_images"].dtype == torch.float32
        assert item["support_masks"].shape == (shots, SIZE, SIZE)
        assert item["support_masks"].dtype == torch.int64
        for mask in (item["query_mask"], item["support_masks"]):
            assert set(mask.unique().tolist()) <= {0, 1, 255}
        assert item["class_id"] == spec.class_id
        assert item["query_index"] == val_index.position[(spec.query, spec.class_id)]
        assert item["support_index"].tolist() == [
            val_index.position[(s, spec.class_id)] for s in spec.supports
        ]
        assert item["support_flips"].tolist() == [False] * shots and item["query_flip"] is False
        assert "query_label" not in item


def test_masks_mark_only_the_episode_class(tree: VOCTree, val_index: SampleIndex) -> None:
    # 2008_000009 (40x30, 1-px frame of 255) holds classes 1, 2 and 3; in an episode of class 2 only the
    # 6x5 box of class 2 (x 15..20, y 2..6) may be 1, and the frame stays 255.
    spec = EpisodeSpec(2, "2008_000009", ("2008_000011",))
    item = EpisodeDataset(tree, val_index, [spec], SIZE, keep_original=True)[0]
    expected = binary_mask(BY_ID["2008_000009"].label(), 2)
    np.testing.assert_array_equal(item["query_label"].numpy(), expected)
    assert item["query_label"].dtype == torch.uint8 and item["query_label"].shape == (30, 40)
    mask = item["query_mask"]
    assert (mask[0] == 255).all() and (mask[-1] == 255).all()  # the frame, nearest-resized
    assert (mask[:, 0] == 255).all() and (mask[:, -1] == 255).all()
    rows, columns = torch.nonzero(mask == 1, as_tuple=True)
    # Scaled by 33/40 across and 33/30 down the box spans x 12.4..17.3, y 2.2..7.7; nearest sampling may
    # round each edge by one pixel either way. Count: 6*33/40 = 4.95 columns by 5*33/30 = 5.5 rows, so
    # 4..6 columns by 5..6 rows.
    assert int(columns.min()) >= 11 and int(columns.max()) <= 18
    assert int(rows.min()) >= 1 and int(rows.max()) <= 8
    assert 20 <= len(rows) <= 36


@pytest.mark.parametrize("where", ["query", "support"])
def test_a_label_without_the_class_is_refused(tmp_path: Path, where: str) -> None:
    """The data changed after it was indexed: the episode is refused, not scored on an empty object."""
    tree = VOCTree(make_fake_voc(tmp_path / "voc"))
    index = SampleIndex(tree, "val", NOVEL)
    spec = EpisodeSpec(2, "2008_000009", ("2008_000011",))
    image_id = spec.query if where == "query" else spec.supports[0]
    label = BY_ID[image_id].label()
    label[label == 2] = 0
    Image.fromarray(label).save(tree.label_path(image_id))
    with pytest.raises(MaskError, match=f"{image_id}.png has no pixel of class 2.*changed after"):
        EpisodeDataset(tree, index, [spec], SIZE)[0]


def test_full_size_input_is_exact(tree: VOCTree, val_index: SampleIndex) -> None:
    # 2008_000010 is 50x50: with input_size 50 nothing is resized, so the tensors are exact.
    spec = EpisodeSpec(4, "2008_000010", ("2008_000012",))
    item = EpisodeDataset(tree, val_index, [spec], 50)[0]
    image, label = tree.load("2008_000010")
    np.testing.assert_array_equal(item["query_mask"].numpy(), binary_mask(label, 4))
    assert int((item["query_mask"] == 1).sum()) == 100  # the 10x10 box of class 4
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    restored = item["query_image"] * std + mean
    # float32 normalisation round trip: errors are ~1e-7, far below one grey level (1/255 ~ 4e-3).
    torch.testing.assert_close(restored, torch.tensor(image).permute(2, 0, 1) / 255.0, atol=1e-5, rtol=0)


def test_flip_mirrors_image_and_mask(tree: VOCTree, val_index: SampleIndex) -> None:
    plain = EpisodeSpec(1, "2008_000010", ("2008_000009", "2008_000009"))
    flipped = EpisodeSpec(1, "2008_000010", plain.supports, query_flip=True, support_flips=(True, False))
    dataset = EpisodeDataset(tree, val_index, [plain, flipped], SIZE)
    a, b = dataset[0], dataset[1]
    # Flipping after the resize is exact: same numbers, mirrored along the width.
    torch.testing.assert_close(b["query_image"], a["query_image"].flip(-1), atol=0, rtol=0)
    torch.testing.assert_close(b["query_mask"], a["query_mask"].flip(-1), atol=0, rtol=0)
    torch.testing.assert_close(b["support_images"][0], a["support_images"][0].flip(-1), atol=0, rtol=0)
    torch.testing.assert_close(b["support_masks"][0], a["support_masks"][0].flip(-1), atol=0, rtol=0)
    torch.testing.assert_close(b["support_images"][1], a["support_images"][1], atol=0, rtol=0)
    torch.testing.assert_close(b["support_masks"][1], a["support_masks"][1], atol=0, rtol=0)
    # ... and a mirror is a real change: class 1 sits in the top-left corner, the picture has a ramp.
    assert not torch.equal(b["query_mask"], a["query_mask"])
    assert not torch.equal(b["query_image"], a["query_image"])
    assert bool(a["query_mask"][0, 0] == 1) and bool(b["query_mask"][0, -1] == 1)
    assert b["query_flip"] is True and b["support_flips"].tolist() == [True, False]


def test_hue_rotation() -> None:
    torch.testing.assert_close(torch.tensor(hue_rotation(0.0)), torch.eye(3), atol=1e-6, rtol=0)
    composed = hue_rotation(0.5) @ hue_rotation(1.0)  # turns compose like angles
    torch.testing.assert_close(torch.tensor(composed), torch.tensor(hue_rotation(1.5)), atol=1e-5, rtol=0)
    grey = np.array([0.3, 0.3, 0.3], dtype=np.float32)
    np.testing.assert_allclose(hue_rotation(2.0) @ grey, grey, atol=1e-6)  # greys have no hue
    red = hue_rotation(2 * np.pi / 3) @ np.array([1.0, 0.0, 0.0])
    assert red.argmax() == 2  # a third of a turn takes red towards blue


def test_hue_turn_changes_colours_not_masks(tree: VOCTree, val_index: SampleIndex) -> None:
    plain = EpisodeSpec(1, "2008_000010", ("2008_000009",))
    turned = dataclasses.replace(plain, hue_turn=2.0)
    a, b = EpisodeDataset(tree, val_index, [plain, turned], SIZE)
    torch.testing.assert_close(b["query_mask"], a["query_mask"], atol=0, rtol=0)
    torch.testing.assert_close(b["support_masks"], a["support_masks"], atol=0, rtol=0)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rotation = torch.tensor(hue_rotation(2.0))
    for key in ("query_image", "support_images"):  # query and support get the same turn
        plain_rgb, turned_rgb = a[key] * std + mean, b[key] * std + mean
        expected = torch.einsum("ij,...jhw->...ihw", rotation, plain_rgb).clamp(0, 1)
        torch.testing.assert_close(turned_rgb, expected, atol=1e-5, rtol=0)
        assert (turned_rgb - plain_rgb).abs().max() > 0.1


def test_training_items_follow_their_specs(tree: VOCTree, train_index: SampleIndex) -> None:
    episodes = TrainingEpisodes(train_index, shots=2, seed=0)
    dataset = EpisodeDataset(tree, train_index, episodes, SIZE)
    for i in range(6):
        item, spec = dataset[i], episodes[i]
        assert item["query_flip"] == spec.query_flip
        assert item["support_flips"].tolist() == list(spec.support_flips)
        assert item["class_id"] == spec.class_id


def test_collate(tree: VOCTree, val_index: SampleIndex) -> None:
    # Queries of different sizes (40x30, 50x50, 30x40): full-resolution labels cannot be stacked.
    specs = [
        EpisodeSpec(1, "2008_000009", ("2008_000010",)),
        EpisodeSpec(4, "2008_000010", ("2008_000012",)),
        EpisodeSpec(3, "2008_000011", ("2008_000009",)),
    ]
    dataset = EpisodeDataset(tree, val_index, specs, SIZE, keep_original=True)
    batch = collate([dataset[i] for i in range(3)])
    assert isinstance(batch["query_label"], list)
    assert [tuple(label.shape) for label in batch["query_label"]] == [(30, 40), (50, 50), (40, 30)]
    assert batch["query_image"].shape == (3, 3, SIZE, SIZE)
    assert batch["query_mask"].shape == (3, SIZE, SIZE)
    assert batch["support_images"].shape == (3, 1, 3, SIZE, SIZE)
    assert batch["support_masks"].shape == (3, 1, SIZE, SIZE)
    assert batch["class_id"].tolist() == [1, 4, 3] and batch["class_id"].dtype == torch.int64
    assert batch["query_flip"].dtype == torch.bool and batch["support_flips"].shape == (3, 1)
    assert batch["query_index"].tolist() == [val_index.position[(s.query, s.class_id)] for s in specs]


def test_data_loader_batches(tree: VOCTree, val_index: SampleIndex) -> None:
    specs = fixed_episodes(val_index, 2, count=5, seed=0)
    loader = DataLoader(
        EpisodeDataset(tree, val_index, specs, SIZE, keep_original=True), batch_size=2, collate_fn=collate
    )
    batches = list(loader)
    assert [len(b["query_label"]) for b in batches] == [2, 2, 1]
    assert torch.cat([b["class_id"] for b in batches]).tolist() == [s.class_id for s in specs]


def test_episode_with_a_broken_image_raises_data_error(tmp_path: Path) -> None:
    root = make_fake_voc(tmp_path / "voc")
    tree = VOCTree(root)
    index = SampleIndex(tree, "val", NOVEL)
    (root / "JPEGImages/2008_000011.jpg").write_bytes(b"not a jpeg")
    dataset = EpisodeDataset(tree, index, [EpisodeSpec(3, "2008_000009", ("2008_000011",))], SIZE)
    with pytest.raises(DataError, match="2008_000011"):
        dataset[0]
