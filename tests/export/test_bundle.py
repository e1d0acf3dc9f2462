"""Bundles: manifest and checksum validation, atomic writes, the TensorRT-less export."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from crnet.bundle import (
    FORMAT,
    BatchRange,
    BundleError,
    graph_metadata,
    is_replaceable_bundle,
    load_bundle,
)
from crnet.errors import CRNetError
from crnet.export import build
from crnet.export.build import export_bundle

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture
def copy(micro_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(micro_bundle, tmp_path / "bundle"))


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_good_bundle_loads(micro_bundle) -> None:
    bundle = load_bundle(micro_bundle)
    assert bundle.model_config.input_size == 33
    assert bundle.graph("fp16", "head").is_file()
    assert load_bundle(bundle.graph("fp32", "encoder")).root == bundle.root  # a file inside one


def test_graphs_carry_what_the_manifest_lists(micro_bundle) -> None:
    onnx = pytest.importorskip("onnx")
    bundle = load_bundle(micro_bundle)
    for precision in ("fp32", "fp16"):
        for graph in ("encoder", "prompt", "head"):
            path = bundle.graph(precision, graph)
            metadata = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            source = bundle.manifest["checkpoint"]["sha256"]
            assert metadata == graph_metadata(graph, precision, bundle.iterations, source)
            bundle.check_metadata(path, graph, precision, metadata)
    assert graph_metadata("head", "fp16", 5)["crnet.iterations"] == "5"
    bundle.check_metadata(path, "head", "fp16", {})  # a graph of an older export carries nothing
    older = {k: v for k, v in metadata.items() if k != "crnet.checkpoint"}
    bundle.check_metadata(path, "head", "fp16", older)  # nor, before 2026-11-27, the checkpoint
    with pytest.raises(BundleError, match="exported with crnet.iterations 4, but"):
        bundle.check_metadata(path, "head", "fp16", metadata | {"crnet.iterations": "4"})
    # a graph of another checkpoint's bundle, with the checksums recomputed, passed as this bundle's
    with pytest.raises(BundleError, match="exported with crnet.checkpoint 0000, but"):
        bundle.check_metadata(path, "head", "fp16", metadata | {"crnet.checkpoint": "0000"})


def test_an_engine_s_source_graph_is_checked_against_the_manifest(copy) -> None:
    """TensorRT engines carry no metadata: the graph each was built from answers for it."""
    pytest.importorskip("onnx")
    from crnet.bundle import sha256
    from crnet.engines.tensorrt_runtime import check_engine_source

    def add_engines(manifest: dict) -> None:
        manifest["engines"]["fp16"] = {}
        for graph in ("encoder", "prompt", "head"):
            plan = copy / f"{graph}.fp16.plan"
            plan.write_bytes(b"an engine")
            entry = {"file": plan.name, "sha256": sha256(plan), "source": f"{graph}.fp32.onnx"}
            manifest["engines"]["fp16"][graph] = entry

    edit_manifest(copy, add_engines)
    check_engine_source(load_bundle(copy), "fp16", "head")
    edit_manifest(copy, lambda m: m.update(iterations=m["iterations"] + 1))
    with pytest.raises(BundleError, match="head.fp32.onnx was exported with crnet.iterations"):
        check_engine_source(load_bundle(copy), "fp16", "head")


def test_a_changed_graph_fails_its_checksum(copy) -> None:
    graph = copy / "head.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its checksum"):
        load_bundle(copy)


def test_a_missing_graph_is_named(copy) -> None:
    (copy / "prompt.fp16.onnx").unlink()
    with pytest.raises(BundleError, match="prompt.fp16.onnx but the file is missing"):
        load_bundle(copy)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format="crnet-bundle-99"), "this crnet reads"),
        (lambda m: m.pop("iterations"), "incomplete or malformed"),
        (lambda m: m["model_config"].update(width="wide", blocks=None), "incomplete or malformed"),
        (lambda m: m["graphs"]["fp32"]["head"].pop("sha256"), "incomplete or malformed"),
        (lambda m: m.update(input_size=33.0), "incomplete or malformed"),  # equal to 33, but no size
        (lambda m: m.update(iterations=True), "incomplete or malformed"),
        (lambda m: m["batch"].update(min=True), "incomplete or malformed"),
        (lambda m: m.update(preset="r50"), "preset 'r50' contradicts"),
        (lambda m: m["normalization"].update(mean=[0.5, 0.5, 0.5]), "not the one its runtimes use"),
        (lambda m: m.pop("normalization"), "incomplete or malformed"),
        (lambda m: m.update(opset="18"), "not an ONNX opset"),
        # a graph outside the bundle ran as if it were the bundle's
        (lambda m: m["graphs"]["fp32"]["head"].update(file="../other/head.fp32.onnx"), "not a file of"),
        (lambda m: m["graphs"]["fp32"]["head"].update(file="/tmp/head.fp32.onnx"), "not a file of"),
        (lambda m: m["batch"].update(max=10**9), "max <= 4096"),
    ],
    ids=[
        "foreign-format",
        "no-iterations",
        "bad-model-config",
        "entry-without-checksum",
        "float-size",
        "flag-iterations",
        "flag-batch",
        "other-preset",
        "other-normalization",
        "no-normalization",
        "text-opset",
        "file-outside",
        "absolute-file",
        "endless-batch",
    ],
)
def test_a_bad_manifest_is_refused(copy, change, message) -> None:
    edit_manifest(copy, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_not_a_bundle(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(tmp_path)
    # JSON that Python's reader refuses other than as a decode error: nesting past its recursion limit, an
    # integer of more digits than it converts.
    for text in ["[" * 100_000 + "]" * 100_000, '{"opset": 1' + "0" * 5000 + "}"]:
        (tmp_path / "manifest.json").write_text(text)
        with pytest.raises(BundleError, match="cannot read"):
            load_bundle(tmp_path)
        assert not is_replaceable_bundle(tmp_path)
    with pytest.raises(BundleError, match="not a crnet bundle"):
        load_bundle(tmp_path / "..")
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_a_missing_precision_says_how_to_get_it(micro_bundle) -> None:
    with pytest.raises(BundleError, match="no fp32 TensorRT engines"):
        load_bundle(micro_bundle).engine("fp32", "head")


# int() takes underscores, signs, spaces and other scripts' digits; no engine needs a batch past 4096
@pytest.mark.parametrize(
    "text",
    [
        *("1:4", "a:b:c", "0:1:2", "4:2:8", "1:8:4", "1_0:1_0:1_0", "+1:+1:+1", " 1:1:2", "١:١:١"),
        "1:1:4097",
        "1:1:" + "9" * 5000,  # int() raised its own ValueError: a traceback
    ],
)
def test_batch_range_parse_refuses(text) -> None:
    with pytest.raises(CRNetError, match="--batch-range"):
        BatchRange.parse(text)


def test_batch_range_parse() -> None:
    assert BatchRange.parse("1:4:32") == BatchRange(1, 4, 32)
    assert BatchRange.parse("0001:0004:00032") == BatchRange(1, 4, 32)


def test_existing_output_needs_overwrite(micro_checkpoint, micro_bundle) -> None:
    with pytest.raises(CRNetError, match="already exists; pass --overwrite"):
        export_bundle(micro_checkpoint, micro_bundle)


def test_a_failed_export_leaves_nothing(micro_checkpoint, tmp_path, monkeypatch) -> None:
    calls = []

    def fail_on_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("simulated exporter failure")
        return original(*args)

    original = build.export_onnx
    monkeypatch.setattr(build, "export_onnx", fail_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(micro_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no bundle, no partial directory


def test_an_fp32_graph_that_disagrees_fails_the_export(micro_checkpoint, tmp_path, monkeypatch) -> None:
    real = build.verify_graph

    def skewed(*args):
        errors = real(*args)
        for figures in errors.values():
            figures["max_abs"] = 1.0
        return errors

    monkeypatch.setattr(build, "verify_graph", skewed)
    with pytest.raises(build.ExportVerificationError, match="disagrees with PyTorch on the fp32 encoder"):
        export_bundle(micro_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_onnxruntime_that_cannot_load_the_graphs_is_one_line(micro_checkpoint, tmp_path, monkeypatch):
    """onnxruntime 1.17 refuses IR version 10: the export's own check raised its traceback."""
    ort = pytest.importorskip("onnxruntime")

    def refuse(*args, **kwargs):
        raise ort.capi.onnxruntime_pybind11_state.Fail("Unsupported model IR version: 10, max supported: 9")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    with pytest.raises(build.ExportVerificationError, match="cannot load the exported encoder graph .*IR "):
        export_bundle(micro_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("precision", "error", "fails"),
    [
        ("fp32", 2e-3, True),
        ("fp32", 5e-4, False),
        ("fp32", float("nan"), True),  # NaN > limit is false: a graph of NaNs passed
        ("fp16", 0.5, True),  # FP16 graphs were not checked at all: an overflow was committed
        ("fp16", float("inf"), True),
        ("fp16", 0.045, False),  # rounding, as the tiny model's FP16 logits
    ],
)
def test_the_export_checks_each_precision(precision, error, fails) -> None:
    spec = next(s for s in build.SPECS if s.name == "head")
    errors = {"logits": {"max_abs": error, "mean_abs": 0.0, "reference_max_abs": 0.5}}
    if fails:
        with pytest.raises(build.ExportVerificationError, match=f"on the {precision} head/logits"):
            build._check_agreement(spec, precision, errors)
    else:
        build._check_agreement(spec, precision, errors)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the export without TensorRT; it is installed here")
def test_tensorrt_missing_still_writes_the_bundle(micro_checkpoint, tmp_path) -> None:
    result = export_bundle(micro_checkpoint, tmp_path / "out", tensorrt=True)
    assert "tensorrt" in result.tensorrt_skipped and "pip install tensorrt" in result.tensorrt_skipped
    bundle = load_bundle(result.bundle)
    assert bundle.manifest["format"] == FORMAT and bundle.manifest["engines"] == {}


def test_overwrite_may_replace_a_bundle_with_nothing_added(copy, tmp_path) -> None:
    from crnet.bundle import is_replaceable_bundle

    assert is_replaceable_bundle(copy)
    (copy / "head.fp16.onnx").unlink()  # damaged: still only the bundle's files
    assert is_replaceable_bundle(copy)
    (copy / "NOTES.txt").write_text("the user's notes on this export")
    assert not is_replaceable_bundle(copy)
    manifest_only = tmp_path / "manifest_only"
    manifest_only.mkdir()
    (manifest_only / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    assert not is_replaceable_bundle(manifest_only)  # it lists no files: its others cannot be the bundle's


@pytest.mark.parametrize("file", [".", "", "..", 7])
def test_a_manifest_listing_the_folder_itself_does_not_make_it_a_bundle(file, tmp_path) -> None:
    """`"file": "."` made every file beside the manifest the bundle's: export --overwrite wiped them."""
    from crnet.bundle import is_replaceable_bundle

    (tmp_path / "thesis.tex").write_text("the user's")
    graphs = {"fp32": {"encoder": {"file": file}}}
    (tmp_path / "manifest.json").write_text(json.dumps({"format": FORMAT, "graphs": graphs, "engines": {}}))
    assert not is_replaceable_bundle(tmp_path)
