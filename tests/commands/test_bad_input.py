"""Bad input of every kind, on every command: one `error:` line, exit code 2, no traceback, nothing of the
user's changed or removed, no temporary file left (anywhere under the scratch root or HOME).

Kinds: zero, negative, out of range, wrong type, unknown choice; missing file, file instead of directory and
back; a read-only place; an output that is an input or a foreign directory; a damaged bundle, and bundles
that pass their checksums but lie (files swapped, sizes edited, exported from another checkpoint). The
valid parts of each command line are real (a fake VOC tree, a micro checkpoint and its bundle), so a case
fails for its one bad value only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crnet.bundle import FORMAT, sha256
from crnet.checkpoint import save_atomic
from crnet.commands import cli
from crnet.model.crnet import build_model
from tests.commands.test_cli import EVERY_OBJECT, check_user_error, written_to_home
from tests.ddp_worker import MICRO
from tests.fake_voc import make_fake_voc
from tests.places import leftovers, read_only_place, release

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@dataclass(frozen=True)
class World:
    root: Path
    voc: Path  # a fake VOC tree, valid for fold 0
    voc_bad_label: Path  # the same with the value 42 in one label
    checkpoint: Path  # micro model
    other_checkpoint: Path  # another micro model (other weights)
    bundle: Path  # exported from `checkpoint`
    swapped: Path  # encoder and head graphs swapped, checksums recomputed
    resized: Path  # input size edited in the manifest (model config too), checksums valid
    inconsistent: Path  # top-level input size edited, model config not
    damaged: Path  # one byte of a graph changed
    support: Path
    mask: Path
    query: Path
    a_file: Path  # an ordinary file of the user's
    a_pickle: Path  # a pickle file of the user's, not a checkpoint (torch.load warns about its protocol)
    folder: Path  # an ordinary directory of the user's, with files in it
    bundle_with_checkpoint: Path  # a bundle directory that also holds the checkpoint it came from
    bundle_with_notes: Path  # a bundle directory to which the user added a file
    manifest_only: Path  # a user's folder whose only crnet file is a manifest naming the bundle format
    users_infer_json: Path  # a user's folder with a file of their own called infer.json
    users_results_json: Path  # a user's folder with a results.json that has a "results" key
    voc_damaged_marker: Path  # the fake VOC tree with an unreadable synthetic.json
    voc_infinite_side: Path  # ... with a synthetic.json whose image_size is Infinity
    voc_huge_side: Path  # ... whose image_size is 100000
    broken_link: Path  # a symbolic link to nothing
    link_to_folder: Path  # a symbolic link to an empty folder
    read_only: Path | None  # a read-only place, where one can be made
    pipe: Path  # a named pipe, not a regular file
    earlier_infer: Path  # an earlier infer's --out: infer.json, query_mask.png, query_overlay.png
    endless: Path  # a bundle whose manifest asks for a billion iterations, checksums valid
    retold: Path  # the manifest's T edited (the head graph unrolls another), checksums valid
    crossed: Path  # the fp32 and fp16 head graphs swapped, checksums recomputed


def _rewrite(bundle: Path, change: Callable[[dict], None]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    for per_precision in manifest["graphs"].values():
        for entry in per_precision.values():
            entry["sha256"] = sha256(bundle / entry["file"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _swapped(bundle: Path, copy: Path, first: str, second: str) -> Path:
    """A copy of the bundle with two of its files swapped, the checksums recomputed."""
    copy = Path(shutil.copytree(bundle, copy))
    a, b = copy / first, copy / second
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    _rewrite(copy, lambda m: None)
    return copy


def benchmark_of_side(voc: Path, root: Path, side: str) -> Path:
    """A copy of the fake VOC tree marked as a built-in benchmark of 20 classes, its image side `side` as
    written in the JSON (Infinity: Python's reader takes it)."""
    root = Path(shutil.copytree(voc, root))
    names = json.dumps([f"class {i}" for i in range(1, 21)])
    (root / "synthetic.json").write_text(f'{{"class_names": {names}, "image_size": {side}}}')
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, micro_checkpoint, micro_bundle):
    root = tmp_path_factory.mktemp("bad-input")
    voc = make_fake_voc(root / "voc")
    bad_label = Path(shutil.copytree(voc, root / "voc_bad_label"))
    label_path = bad_label / "SegmentationClassAug" / "2008_000011.png"
    label = np.array(Image.open(label_path))
    label[0, 0] = 42
    Image.fromarray(label).save(label_path)
    checkpoint = Path(shutil.copy(micro_checkpoint, root / "micro.pt"))
    torch.manual_seed(1)
    other = save_atomic(
        {"model_config": MICRO.to_dict(), "model": build_model(MICRO).state_dict()}, root / "o.pt"
    )
    bundle = Path(shutil.copytree(micro_bundle, root / "bundle"))
    swapped = _swapped(micro_bundle, root / "swapped", "encoder.fp32.onnx", "head.fp32.onnx")
    resized = Path(shutil.copytree(micro_bundle, root / "resized"))

    def resize(manifest: dict) -> None:
        manifest["model_config"]["input_size"] = manifest["input_size"] = 65
        manifest["feature_size"] = 9

    _rewrite(resized, resize)
    inconsistent = Path(shutil.copytree(micro_bundle, root / "inconsistent"))
    _rewrite(inconsistent, lambda m: m.update(input_size=65))
    damaged = Path(shutil.copytree(micro_bundle, root / "damaged"))
    data = bytearray((damaged / "head.fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "head.fp32.onnx").write_bytes(bytes(data))
    pictures = root / "pictures"
    pictures.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(pictures / "support.png")
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 15:40] = 1
    Image.fromarray(mask).save(pictures / "mask.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(pictures / "query.jpg")
    (root / "notes.txt").write_text("a file of the user's")
    (root / "list.pkl").write_bytes(pickle.dumps([1, 2], protocol=4))
    folder = root / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"not really a picture, but the user's")
    holder = Path(shutil.copytree(micro_bundle, root / "holder"))
    shutil.copy(micro_checkpoint, holder / "model.pt")
    with_notes = Path(shutil.copytree(micro_bundle, root / "with_notes"))
    (with_notes / "NOTES.txt").write_text("the user's notes on this export")
    manifest_only = root / "manifest_only"
    manifest_only.mkdir()
    (manifest_only / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    (manifest_only / "precious.txt").write_text("the user's")
    users_infer = root / "users_infer"
    users_infer.mkdir()
    (users_infer / "infer.json").write_text('{"my": "config"}')
    (users_infer / "photo.txt").write_text("the user's")
    users_results = root / "users_results"
    users_results.mkdir()
    (users_results / "results.json").write_text('{"results": []}')
    (users_results / "bench.json").write_text("the user's")
    damaged_marker = Path(shutil.copytree(voc, root / "voc_damaged_marker"))
    (damaged_marker / "synthetic.json").write_text("{bad")
    (root / "broken_link").symlink_to(root / "nowhere")
    (root / "empty").mkdir()
    (root / "link_to_folder").symlink_to(root / "empty")
    (root / "devices").mkdir()
    os.mkfifo(root / "devices" / "pipe")
    earlier_infer = root / "earlier_infer"
    earlier_infer.mkdir()
    shutil.copy(pictures / "mask.png", earlier_infer / "query_mask.png")  # a mask the user may reuse
    shutil.copy(pictures / "support.png", earlier_infer / "query_overlay.png")
    (earlier_infer / "infer.json").write_text(json.dumps({"queries": [{"mask": "query_mask.png"}]}))
    endless = Path(shutil.copytree(micro_bundle, root / "endless"))
    _rewrite(endless, lambda m: m.update(iterations=10**9))
    retold = Path(shutil.copytree(micro_bundle, root / "retold"))
    _rewrite(retold, lambda m: m.update(iterations=m["iterations"] - 1))
    crossed = _swapped(micro_bundle, root / "crossed", "head.fp32.onnx", "head.fp16.onnx")
    made = World(
        root=root,
        voc=voc,
        voc_bad_label=bad_label,
        checkpoint=checkpoint,
        other_checkpoint=other,
        bundle=bundle,
        swapped=swapped,
        resized=resized,
        inconsistent=inconsistent,
        damaged=damaged,
        support=pictures / "support.png",
        mask=pictures / "mask.png",
        query=pictures / "query.jpg",
        a_file=root / "notes.txt",
        a_pickle=root / "list.pkl",
        folder=folder,
        bundle_with_checkpoint=holder,
        bundle_with_notes=with_notes,
        manifest_only=manifest_only,
        users_infer_json=users_infer,
        users_results_json=users_results,
        voc_damaged_marker=damaged_marker,
        voc_infinite_side=benchmark_of_side(voc, root / "voc_infinite_side", "Infinity"),
        voc_huge_side=benchmark_of_side(voc, root / "voc_huge_side", "100000"),
        broken_link=root / "broken_link",
        link_to_folder=root / "link_to_folder",
        read_only=read_only_place(root / "read-only"),
        pipe=root / "devices" / "pipe",
        earlier_infer=earlier_infer,
        endless=endless,
        retold=retold,
        crossed=crossed,
    )
    yield made
    release(made.read_only)


def new(w: World, name: str = "new") -> str:
    """A path under the scratch root that does not exist (a failed command must not create it)."""
    return str(w.root / "absent" / name)


def synth(*extra):
    return lambda w: [
        "synth",
        new(w),
        "--train-per-class",
        "2",
        "--val-per-class",
        "2",
        "--image-size",
        "32",
        *extra,
    ]


def train(*extra, out=new):
    return lambda w: [
        "train",
        "--out",
        str(out(w)),
        "--data",
        str(w.voc),
        *EVERY_OBJECT,
        "--no-progress",
        *extra,
    ]


def evaluate(*extra, checkpoint=lambda w: w.checkpoint, data=lambda w: w.voc):
    return lambda w: [
        "eval",
        str(checkpoint(w)),
        "--data",
        str(data(w)),
        *EVERY_OBJECT,
        "--no-progress",
        "--episodes",
        "2",
        *extra,
    ]


def export(*extra, checkpoint=lambda w: w.checkpoint, out=new):
    return lambda w: ["export", str(checkpoint(w)), "--out", str(out(w)), *extra]


def infer(*extra, engine=lambda w: w.bundle, out=new):
    def build(w: World) -> list[str]:
        args = [
            "infer",
            "--engine",
            str(engine(w)),
            "--support",
            str(w.support),
            "--support-mask",
            str(w.mask),
        ]
        return [*args, "--query", str(w.query), "--out", str(out(w)), "--no-progress", *extra]

    return build


def bench(*extra, checkpoint=lambda w: w.checkpoint, bundle=lambda w: w.bundle):
    def build(w: World) -> list[str]:
        args = [
            "bench",
            str(checkpoint(w)),
            "--bundle",
            str(bundle(w)),
            "--data",
            str(w.voc),
            *EVERY_OBJECT,
            "--episodes",
            "2",
        ]
        return [
            *args,
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            new(w, "bench.json"),
            "--no-progress",
            *extra,
        ]

    return build


def demo(*extra):
    return lambda w: ["demo", "--data", str(w.voc), "--episodes", "2", "--no-progress", *extra]


def read_only(w: World, name: str = "out") -> str:
    return str(w.read_only / name)


# id -> (arguments, text the one error line must contain)
CASES: dict[str, tuple[Callable[[World], list[str]], str]] = {
    # synth
    "synth-image-size-zero": (synth("--image-size", "0"), "'--image-size'"),
    "synth-image-size-too-small": (synth("--image-size", "8"), "'--image-size'"),
    "synth-negative-per-class": (synth("--train-per-class", "-5"), "'--train-per-class'"),
    "synth-empty-benchmark": (synth("--train-per-class", "0", "--val-per-class", "0"), "'--train-per-class'"),
    "synth-negative-seed": (synth("--seed", "-1"), "'--seed'"),
    "synth-wrong-type": (synth("--image-size", "big"), "'--image-size'"),
    "synth-root-is-a-file": (lambda w: ["synth", str(w.a_file)], "is not a directory"),
    "synth-root-is-a-users-folder": (lambda w: ["synth", str(w.folder)], "refusing to overwrite"),
    # train
    "train-zero-steps": (train("--steps", "0"), "'--steps'"),
    "train-zero-batch": (train("--batch-size", "0"), "'--batch-size'"),
    "train-huge-batch": (train("--batch-size", "100000000000"), "'--batch-size'"),  # was a MemoryError
    "train-seed-past-64-bits": (train("--seed", str(2**64)), "'--seed'"),  # torch's seeds are 64-bit
    "train-negative-lr": (train("--lr", "-1"), "'--lr': must be > 0"),
    "train-zero-lr": (train("--lr", "0"), "'--lr': must be > 0"),
    "train-infinite-lr": (train("--lr", "inf"), "'--lr': must be > 0 and at most 10"),
    "train-nan-lr": (train("--lr", "nan"), "'--lr': must be > 0 and at most 10"),
    "train-negative-weight-decay": (train("--weight-decay", "-1"), "'--weight-decay'"),
    "train-infinite-weight-decay": (
        train("--weight-decay", "inf"),
        "'--weight-decay': must be >= 0 and at most 10",
    ),
    "train-nan-weight-decay": (train("--weight-decay", "nan"), "'--weight-decay': must be >= 0"),
    "train-weight-decay-past-float32": (  # the optimizer's step overflowed, after the run folder was made
        train("--weight-decay", "1e308"),
        "'--weight-decay': must be >= 0 and at most 10",
    ),
    "train-reset-probability-above-one": (train("--reset-probability", "1.5"), "'--reset-probability'"),
    "train-reset-probability-nan": (
        train("--reset-probability", "nan"),
        "'--reset-probability': must be 0 to 1",
    ),
    "train-zero-checkpoint-every": (train("--checkpoint-every", "0"), "'--checkpoint-every'"),
    "train-negative-workers": (train("--workers", "-1"), "'--workers'"),
    "train-fold-out-of-range": (train("--fold", "4"), "'--fold'"),
    "train-unknown-preset": (train("--preset", "r101"), "'--preset'"),
    "train-unknown-optimizer": (train("--optimizer", "adam"), "'--optimizer'"),
    "train-unknown-precision": (train("--precision", "fp16"), "'--precision'"),
    "train-steps-not-a-number": (train("--steps", "many"), "'--steps'"),
    "train-missing-backbone-weights": (train("--backbone-weights", "/nowhere/r50.pth"), "does not exist"),
    "train-resume-with-backbone-weights": (
        lambda w: [*train("--resume", "--backbone-weights", str(w.checkpoint))(w)],
        "--backbone-weights starts a new run",
    ),
    "train-out-is-a-file": (train(out=lambda w: w.a_file), "is a file"),
    "train-out-is-a-users-folder": (train(out=lambda w: w.folder), "holds other files"),
    "train-data-is-a-file": (lambda w: [*train()(w), "--data", str(w.a_file)], "'--data'"),
    "train-data-missing": (lambda w: [*train()(w), "--data", new(w, "voc")], "is not a VOC tree"),
    "train-resume-nothing": (train("--resume"), "nothing to resume"),
    "train-huge-lr": (train("--lr", "1e308"), "'--lr': must be > 0 and at most 10"),
    "train-out-inside-the-data": (train(out=lambda w: w.voc / "run"), "is inside the input"),
    "train-device-cuda": (train("--device", "cuda"), "no usable CUDA GPU"),
    # eval
    "eval-zero-batch": (evaluate("--batch-size", "0"), "'--batch-size'"),
    "eval-zero-iterations": (evaluate("--iterations", "0"), "'--iterations'"),
    "eval-negative-iterations": (evaluate("--iterations", "-1"), "'--iterations'"),
    "eval-negative-finetune-steps": (evaluate("--finetune-steps", "-3"), "'--finetune-steps'"),
    "eval-zero-finetune-lr": (evaluate("--finetune-lr", "0"), "'--finetune-lr': must be > 0"),
    "eval-infinite-finetune-lr": (
        evaluate("--finetune-lr", "inf"),
        "'--finetune-lr': must be > 0 and at most 10",
    ),
    "eval-exit-fraction-above-one": (evaluate("--exit-fraction", "2"), "'--exit-fraction'"),
    "eval-exit-fraction-nan": (
        evaluate("--exit-fraction", "nan"),
        "'--exit-fraction': must be 0 to 1, got nan",
    ),
    "eval-too-many-iterations": (evaluate("--iterations", "51"), "'--iterations'"),
    "eval-huge-finetune-lr": (
        evaluate("--shots", "2", "--strategy", "finetune", "--finetune-lr", "1e308"),
        "'--finetune-lr': must be > 0 and at most 10",
    ),
    "eval-json-is-a-users-file": (
        lambda w: [*evaluate()(w), "--json", str(w.a_file)],
        "exists and is not an earlier eval results JSON",
    ),
    "eval-json-is-a-users-picture": (
        lambda w: [*evaluate()(w), "--json", str(w.support)],
        "exists and is not an earlier eval results JSON",
    ),
    "eval-json-is-a-pipe": (lambda w: [*evaluate()(w), "--json", str(w.pipe)], "is not a regular file"),
    "eval-json-is-a-link": (
        lambda w: [*evaluate()(w), "--json", str(w.broken_link)],
        "is a symbolic link",
    ),
    "eval-zero-shots": (evaluate("--shots", "0"), "'--shots'"),
    "eval-zero-episodes": (evaluate("--episodes", "0"), "'--episodes'"),
    "eval-huge-episodes": (evaluate("--episodes", "1000000000000"), "'--episodes'"),  # built a list for hours
    "eval-unknown-strategy": (evaluate("--strategy", "vote"), "'--strategy'"),
    "eval-fold-out-of-range": (evaluate("--fold", "7"), "'--fold'"),
    "eval-finetune-one-shot": (evaluate("--strategy", "finetune"), "needs --shots 2 or more"),
    "eval-checkpoint-is-a-folder": (evaluate(checkpoint=lambda w: w.folder), "is a directory"),
    "eval-checkpoint-missing": (evaluate(checkpoint=lambda w: new(w, "x.pt")), "checkpoint not found"),
    "eval-checkpoint-not-torch": (evaluate(checkpoint=lambda w: w.a_file), "cannot read checkpoint"),
    "eval-checkpoint-a-plain-pickle": (evaluate(checkpoint=lambda w: w.a_pickle), "cannot read checkpoint"),
    "eval-json-is-the-checkpoint": (
        lambda w: [*evaluate()(w), "--json", str(w.checkpoint)],
        "would replace the input",
    ),
    "eval-json-is-a-folder": (lambda w: [*evaluate()(w), "--json", str(w.folder)], "is a directory"),
    "eval-json-under-a-file": (lambda w: [*evaluate()(w), "--json", str(w.a_file / "r.json")], "is a file"),
    "eval-label-value-42": (evaluate(data=lambda w: w.voc_bad_label), "has values [42]"),
    "eval-json-inside-the-data": (
        lambda w: [*evaluate()(w), "--json", str(w.voc / "ImageSets" / "results.json")],
        "is inside the input",
    ),
    "eval-damaged-benchmark-marker": (  # without --min-object-pixels: the tree's own rule is read
        lambda w: ["eval", str(w.checkpoint), "--data", str(w.voc_damaged_marker), "--episodes", "2"],
        "synthetic.json is damaged",
    ),
    "eval-benchmark-of-infinite-side": (  # was an OverflowError
        lambda w: ["eval", str(w.checkpoint), "--data", str(w.voc_infinite_side), "--episodes", "2"],
        "synthetic.json is damaged (cannot convert float infinity to integer)",
    ),
    "eval-benchmark-of-huge-side": (
        lambda w: ["eval", str(w.checkpoint), "--data", str(w.voc_huge_side), "--episodes", "2"],
        "image_size 100000 is not from 32 to 2048",
    ),
    # export
    "export-zero-iterations": (export("--iterations", "0"), "'--iterations'"),
    "export-endless-iterations": (export("--iterations", "100000"), "'--iterations'"),
    "export-batch-range-decreasing": (export("--batch-range", "4:2:8"), "'--batch-range'"),
    "export-batch-range-not-numbers": (export("--batch-range", "a:b:c"), "'--batch-range'"),
    "export-zero-workspace": (export("--workspace-gib", "0"), "'--workspace-gib': must be > 0"),
    "export-infinite-workspace": (
        export("--workspace-gib", "inf"),
        "'--workspace-gib': must be > 0 and finite",
    ),
    "export-huge-workspace": (export("--workspace-gib", "1e300"), "'--workspace-gib': must be at most"),
    "export-timing-cache-is-the-checkpoint": (
        lambda w: [*export("--tensorrt")(w), "--timing-cache", str(w.checkpoint)],
        "would replace the input",
    ),
    "export-timing-cache-without-tensorrt": (  # it was ignored without a word
        lambda w: [*export()(w), "--timing-cache", str(w.root / "t.cache")],
        "--timing-cache is for TensorRT's builder",
    ),
    "export-timing-cache-inside-the-bundle": (  # the bundle is written whole: the cache would be lost
        lambda w: [
            *export("--tensorrt", out=lambda w: w.root / "b")(w),
            "--timing-cache",
            str(w.root / "b/t"),
        ],
        "is inside --out",
    ),
    "export-overwrite-a-bundle-the-user-added-to": (
        export("--overwrite", out=lambda w: w.bundle_with_notes),
        "holds other files too",
    ),
    "export-overwrite-a-folder-with-only-a-manifest": (
        export("--overwrite", out=lambda w: w.manifest_only),
        "not a crnet bundle",
    ),
    "export-out-is-the-checkpoint": (
        export("--overwrite", out=lambda w: w.checkpoint),
        "would replace the input",
    ),
    "export-out-holds-the-checkpoint": (
        export(
            "--overwrite",
            checkpoint=lambda w: w.bundle_with_checkpoint / "model.pt",
            out=lambda w: w.bundle_with_checkpoint,
        ),
        "would replace the input",
    ),
    "export-overwrite-a-users-folder": (export("--overwrite", out=lambda w: w.folder), "not a crnet bundle"),
    "export-overwrite-a-file": (export("--overwrite", out=lambda w: w.a_file), "is a file"),
    "export-out-is-a-file": (export(out=lambda w: w.a_file), "is a file"),
    "export-existing-bundle": (export(out=lambda w: w.bundle), "already exists; pass --overwrite"),
    "export-triton-is-the-out": (lambda w: export("--triton", new(w))(w), "overlap"),
    "export-triton-inside-the-out": (lambda w: export("--triton", new(w, "new/triton"))(w), "overlap"),
    "export-triton-users-folder": (
        lambda w: export("--overwrite", "--triton", str(w.folder))(w),
        "not a crnet Triton repository",
    ),
    "export-triton-engines-from-batch-2": (
        lambda w: export("--tensorrt", "--batch-range", "2:4:8", "--triton", new(w, "triton"))(w),
        "engines built for batches of at least 2 cannot serve a Triton model",
    ),
    "export-tensorrt-not-installed": (  # found before the graphs were exported, not after (27 s on tiny)
        lambda w: export("--tensorrt", out=lambda w: new(w, "b"))(w),
        "--tensorrt needs tensorrt, which is not installed",
    ),
    "export-checkpoint-missing": (export(checkpoint=lambda w: new(w, "x.pt")), "checkpoint not found"),
    "export-timing-cache-is-a-folder": (
        lambda w: [*export("--tensorrt")(w), "--timing-cache", str(w.folder)],
        "'--timing-cache'",
    ),
    # infer
    "infer-zero-batch": (infer("--batch-size", "0"), "'--batch-size'"),
    "infer-two-precisions": (infer("--runtime", "onnxruntime:fp16:fp32"), "'--runtime'"),
    "infer-unknown-runtime": (infer("--runtime", "caffe"), "'--runtime'"),
    "infer-engine-missing": (infer(engine=lambda w: new(w, "bundle")), "engine not found"),
    "infer-engine-is-a-users-folder": (infer(engine=lambda w: w.folder), "is not a crnet bundle"),
    "infer-engine-is-an-image": (infer(engine=lambda w: w.support), "is neither a crnet checkpoint"),
    "infer-swapped-graphs": (infer(engine=lambda w: w.swapped), "does not fit bundle"),
    "infer-edited-input-size": (infer(engine=lambda w: w.resized), "does not fit bundle"),
    "infer-inconsistent-manifest": (infer(engine=lambda w: w.inconsistent), "contradict its model config"),
    "infer-edited-iterations": (infer(engine=lambda w: w.retold), "exported with crnet.iterations"),
    "infer-precisions-crossed": (
        infer("--runtime", "onnxruntime:fp16", engine=lambda w: w.crossed),
        "head.fp16.onnx was exported with crnet.precision fp32",
    ),
    "infer-damaged-bundle": (infer(engine=lambda w: w.damaged), "does not match its checksum"),
    "infer-damaged-bundle-with-progress": (  # the progress bar was drawn before the error line
        lambda w: [a for a in infer(engine=lambda w: w.damaged)(w) if a != "--no-progress"],
        "does not match its checksum",
    ),
    "infer-out-is-a-file": (infer(out=lambda w: w.a_file), "is a file"),
    "infer-out-is-a-broken-link": (infer(out=lambda w: w.broken_link), "is a symbolic link"),
    "export-out-is-a-link": (export(out=lambda w: w.link_to_folder), "is a symbolic link"),
    "infer-out-is-a-link": (infer(out=lambda w: w.link_to_folder), "is a symbolic link"),
    "infer-out-is-a-users-folder": (infer(out=lambda w: w.folder), "holds other files"),
    "infer-out-holds-a-support-mask": (  # the earlier mask would be removed as stale
        lambda w: [
            *infer(out=lambda w: w.earlier_infer)(w),
            "--support",
            str(w.support),
            "--support-mask",
            str(w.earlier_infer / "query_mask.png"),
        ],
        "would replace the input",
    ),
    "infer-bundle-asks-for-a-billion-iterations": (
        infer(engine=lambda w: w.endless),
        "iterations 1000000000 is not a count from 1 to 50",
    ),
    "infer-out-holds-a-users-infer-json": (infer(out=lambda w: w.users_infer_json), "holds other files"),
    "infer-query-is-a-folder": (lambda w: [*infer()(w), "--query", str(w.folder)], "cannot read image"),
    "infer-support-missing": (
        lambda w: [*infer()(w), "--support", new(w, "s.png"), "--support-mask", str(w.mask)],
        "image not found",
    ),
    # bench
    "bench-zero-shots": (bench("--shots", "0"), "'--shots'"),
    "bench-zero-batch": (bench("--batch-size", "0"), "'--batch-size'"),
    "bench-zero-repeats": (bench("--repeats", "0"), "'--repeats'"),
    "bench-zero-threads": (bench("--threads", "0"), "'--threads'"),
    "bench-negative-warmup": (bench("--warmup", "-1"), "'--warmup'"),
    "bench-negative-episodes": (bench("--episodes", "-1"), "'--episodes'"),
    "bench-unknown-runtime": (bench("--runtime", "onnxruntime:int8"), "'--runtime'"),
    "bench-an-option-twice": (bench("--runtime", "torch+compile+compile"), "option 'compile' twice"),
    "bench-bundle-of-another-checkpoint": (
        bench(checkpoint=lambda w: w.other_checkpoint),
        "exported from another checkpoint",
    ),
    # On the CPU: on a GPU machine with onnxruntime's CPU build the row is unavailable, and says why, before
    # any graph is loaded (a bench times every row on one device).
    "bench-swapped-graphs": (
        bench("--runtime", "onnxruntime", "--device", "cpu", bundle=lambda w: w.swapped),
        "does not fit bundle",
    ),
    "bench-edited-iterations": (  # else torch's rows run the manifest's T, the graph its own
        bench("--runtime", "onnxruntime", "--device", "cpu", bundle=lambda w: w.retold),
        "exported with crnet.iterations",
    ),
    "bench-edited-input-size": (
        bench("--runtime", "onnxruntime", "--device", "cpu", bundle=lambda w: w.resized),
        "does not fit bundle",
    ),
    "bench-json-is-the-checkpoint": (
        lambda w: [*bench()(w), "--json", str(w.checkpoint)],
        "would replace the input",
    ),
    "bench-chart-is-a-folder": (lambda w: [*bench()(w), "--chart", str(w.folder)], "is a directory"),
    "bench-json-is-a-users-file": (
        lambda w: [*bench()(w), "--json", str(w.a_file)],
        "exists and is not an earlier bench JSON",
    ),
    "bench-json-is-a-pipe": (lambda w: [*bench()(w), "--json", str(w.pipe)], "is not a regular file"),
    "bench-json-is-the-current-folder": (lambda w: [*bench()(w), "--json", "."], "is a directory"),
    "bench-json-is-empty": (lambda w: [*bench()(w), "--json", ""], "an empty argument after --json"),
    "bench-default-chart-is-a-users-picture": (  # --json support.json: the chart would be support.png
        lambda w: [*bench()(w), "--json", str(w.support.with_suffix(".json"))],
        "exists and is not an earlier bench chart",
    ),
    "bench-chart-is-a-users-picture": (
        lambda w: [*bench()(w), "--chart", str(w.mask)],
        "exists and is not an earlier bench chart",
    ),
    "bench-bundle-is-a-file": (bench(bundle=lambda w: w.a_file), "is not in a crnet bundle"),
    "bench-chart-is-the-json": (
        lambda w: [*bench()(w), "--chart", new(w, "bench.json")],
        "is the --json file",
    ),
    "bench-json-named-like-its-chart": (  # no --chart: the message names the default, not an option
        lambda w: [*bench()(w), "--json", new(w, "b.png")],
        "the chart's default name",
    ),
    "bench-chart-inside-the-data": (
        lambda w: [*bench()(w), "--chart", str(w.voc / "JPEGImages" / "chart.png")],
        "is inside the input",
    ),
    # demo
    "demo-checkpoint-typo": (demo("--checkpoint", "tiny_fodl0.pt"), "checkpoint not found"),
    "demo-checkpoint-and-train": (
        lambda w: [*demo("--train")(w), "--checkpoint", str(w.checkpoint)],
        "exclude each other",
    ),
    "demo-out-is-a-users-folder": (
        lambda w: [*demo("--checkpoint", str(w.checkpoint))(w), "--out", str(w.folder)],
        "holds other files",
    ),
    "demo-out-holds-a-users-results-json": (
        lambda w: [*demo("--checkpoint", str(w.checkpoint))(w), "--out", str(w.users_results_json)],
        "holds other files",
    ),
    "demo-out-is-a-file": (
        lambda w: [*demo("--checkpoint", str(w.checkpoint))(w), "--out", str(w.a_file)],
        "is a file",
    ),
    "demo-zero-episodes": (demo("--episodes", "0"), "'--episodes'"),
    "demo-out-inside-the-data": (
        lambda w: [*demo("--checkpoint", str(w.checkpoint))(w), "--out", str(w.voc / "demo")],
        "is inside the input",
    ),
}
READ_ONLY_CASES = {
    "synth-into-read-only": (lambda w: ["synth", read_only(w), "--image-size", "32"], "cannot write"),
    "train-into-read-only": (train(out=lambda w: read_only(w)), "cannot write"),
    "eval-json-into-read-only": (
        lambda w: [*evaluate()(w), "--json", read_only(w, "r.json")],
        "cannot write",
    ),
    "export-into-read-only": (export(out=lambda w: read_only(w)), "cannot write"),
    "export-triton-into-read-only": (  # found before the bundle is written, not after
        lambda w: export("--triton", read_only(w, "triton"))(w),
        "cannot write",
    ),
    "infer-into-read-only": (infer(out=lambda w: read_only(w)), "cannot write"),
    "bench-json-into-read-only": (lambda w: [*bench()(w), "--json", read_only(w, "b.json")], "cannot write"),
}
NEEDS_NO_CUDA = {"train-device-cuda"}
NEEDS_NO_TENSORRT = {"export-tensorrt-not-installed"}
NO_TENSORRT = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here"
)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for directories); index caches beside data excluded."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
        if ".crnet_index" not in p.name
    }


def temporaries(root: Path) -> list[Path]:
    return [
        p for p in root.rglob("*") if p.name.endswith(".tmp") or ".partial-" in p.name or ".old-" in p.name
    ]


def run_case(build, expected: str, world: World, tmp_path: Path, monkeypatch, capsys) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/, checkpoints/) land in the test's own folder
    monkeypatch.setattr(sys, "argv", ["crnet", *build(world)])
    before = snapshot(world.root)
    # Recorded, not left to pytest's warning capture: each would be a line of its own before the error.
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.main()
    stdout, stderr = capsys.readouterr()
    check_user_error(exit_info.value.code, stdout, stderr, expected)
    assert [str(w.message) for w in caught] == [], "a warning besides the one error line"
    assert snapshot(world.root) == before, "a file of the user's was changed, added or removed"
    assert leftovers(world.root) == [] and leftovers(tmp_path) == []
    assert written_to_home(home) == [], "nothing may be written into HOME"


def params(cases: dict, marks=()):
    return [
        pytest.param(
            name,
            marks=[
                *marks,
                *([NO_CUDA] if name in NEEDS_NO_CUDA else []),
                *([NO_TENSORRT] if name in NEEDS_NO_TENSORRT else []),
            ],
            id=name,
        )
        for name in cases
    ]


@pytest.mark.parametrize("name", params(CASES))
def test_bad_input(name, world, tmp_path, monkeypatch, capsys) -> None:
    run_case(*CASES[name], world, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("name", params(READ_ONLY_CASES))
def test_read_only_place(name, world, tmp_path, monkeypatch, capsys) -> None:
    if world.read_only is None:
        pytest.skip("root writes anywhere, and this machine lets the test mount no read-only file system")
    run_case(*READ_ONLY_CASES[name], world, tmp_path, monkeypatch, capsys)


def test_every_command_is_covered() -> None:
    commands = {name.split("-")[0] for name in [*CASES, *READ_ONLY_CASES]}
    assert commands == {"synth", "train", "eval", "export", "infer", "bench", "demo"}
