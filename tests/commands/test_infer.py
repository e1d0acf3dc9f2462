"""`crnet infer` and the deployment commands on the command line: outputs, and bad input as one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crnet.commands import cli
from crnet.commands.infer import infer, output_names
from crnet.errors import CRNetError, CRNetWarning, EmptySupportMaskError, MaskError
from crnet.files import OutputError
from tests.commands.test_cli import check_user_error


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "support.png")
    mask = np.zeros((40, 50), np.uint8)
    mask[10:30, 15:40] = 1
    mask[9, 15:40] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.fromarray(mask[:, :45]).save(root / "mask_wrong_size.png")
    Image.fromarray(np.zeros_like(mask)).save(root / "mask_empty.png")
    Image.fromarray(mask * 7).save(root / "mask_bad_values.png")
    speck = np.zeros((40, 50), np.uint8)
    speck[8, 1] = 1  # a pixel that nearest-neighbour resizing to 33x33 skips (row 8, column 1)
    Image.fromarray(speck).save(root / "mask_speck.png")
    between = np.zeros((40, 50), np.uint8)
    between[3:7, 3:9] = 1  # rows and columns 2 to 5 at 33x33: between the 5x5 feature grid's 0 and 8
    Image.fromarray(between).save(root / "mask_between.png")
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(root / "query.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(root / "gray.png")  # mode L
    Image.fromarray(rng.integers(0, 256, (30, 70, 4), dtype=np.uint8)).save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(root / "deep.png")  # I;16
    Image.fromarray(rng.random((20, 20), dtype=np.float32)).save(root / "float.tif")  # mode F
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "sub").mkdir()
    Image.fromarray(rgb).save(root / "sub" / "query.jpg")  # same name as another query
    return root


@pytest.mark.parametrize("engine", ["bundle", "checkpoint", "graph-file"])
def test_masks_and_overlays_at_each_query_size(engine, pictures, micro_bundle, micro_checkpoint, tmp_path):
    path = {
        "bundle": micro_bundle,
        "checkpoint": micro_checkpoint,
        "graph-file": micro_bundle / "head.fp16.onnx",
    }[engine]
    queries = [
        pictures / "query.jpg",
        pictures / "gray.png",
        pictures / "rgba.png",
        pictures / "deep.png",  # 16-bit grayscale, scaled to 8 bits
        pictures / "sub/query.jpg",
    ]
    summary = infer(
        path, [pictures / "support.png"], [pictures / "mask.png"], queries, tmp_path, batch_size=3
    )
    expected_runtime = {
        "bundle": "onnxruntime:fp32",
        "checkpoint": "torch:fp32",
        "graph-file": "onnxruntime:fp16",
    }
    assert summary["runtime"] == expected_runtime[engine] and summary["device"] == "cpu"
    for query, record in zip(queries, summary["queries"], strict=True):
        mask = np.asarray(Image.open(tmp_path / record["mask"]))
        assert mask.shape == Image.open(query).size[::-1]
        assert set(np.unique(mask)) <= {0, 1}
        overlay = Image.open(tmp_path / record["mask"].replace("_mask", "_overlay"))
        assert overlay.mode == "RGB" and overlay.size == Image.open(query).size
    assert [r["mask"] for r in summary["queries"]][-1] == "query_1_mask.png"
    assert json.loads((tmp_path / "infer.json").read_text())["runtime"] == summary["runtime"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_photos_are_read_as_viewers_show_them(pictures, micro_checkpoint, tmp_path) -> None:
    """A phone's photo is stored sideways with an EXIF orientation: the support mask drawn on the photo as
    shown pairs with it, and the query's mask and overlay come out as it is shown, not as it is stored."""
    sideways = Image.open(pictures / "support.png").transpose(Image.Transpose.ROTATE_90)  # 50 x 40 stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to show
    sideways.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "photo.jpg").size == (40, 50)  # stored: 40 wide, 50 high
    summary = infer(
        micro_checkpoint,
        [tmp_path / "photo.jpg"],
        [pictures / "mask.png"],  # drawn on the photo as shown: 50 wide, 40 high
        [tmp_path / "photo.jpg"],
        tmp_path / "out",
    )
    record = summary["queries"][0]
    assert Image.open(tmp_path / "out" / record["mask"]).size == (50, 40)
    overlay = record["mask"].replace("_mask", "_overlay")
    assert Image.open(tmp_path / "out" / overlay).size == (50, 40)


def test_an_animation_is_said_to_use_its_first_frame(pictures, micro_checkpoint, tmp_path) -> None:
    frames = [Image.open(pictures / "support.png").rotate(angle) for angle in (0, 90, 180)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(CRNetWarning, match="clip.gif holds 3 frames; the first is used"):
        infer(micro_checkpoint, [pictures / "support.png"], [pictures / "mask.png"], [tmp_path / "clip.gif"],
              tmp_path / "out")  # fmt: skip


def test_k_shot_uses_every_support(pictures, micro_checkpoint, tmp_path) -> None:
    supports = [pictures / "support.png", pictures / "gray.png"]
    gray_mask = np.zeros((30, 30), np.uint8)
    gray_mask[5:25, 5:25] = 1
    Image.fromarray(gray_mask).save(tmp_path / "gray_mask.png")
    summary = infer(
        micro_checkpoint,
        supports,
        [pictures / "mask.png", tmp_path / "gray_mask.png"],
        [pictures / "query.jpg"],
        tmp_path / "out",
    )
    assert len(summary["supports"]) == 2


def test_a_second_run_replaces_only_an_earlier_infers_output(pictures, micro_checkpoint, tmp_path) -> None:
    def run():
        support, mask = [pictures / "support.png"], [pictures / "mask.png"]
        return infer(micro_checkpoint, support, mask, [pictures / "query.jpg"], tmp_path / "out")

    run()
    run()  # into its own earlier output
    (tmp_path / "out" / "notes.txt").write_text("the user's")
    with pytest.raises(CRNetError, match="holds other files"):
        run()
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's"


def test_a_second_run_leaves_none_of_the_earlier_runs_masks(pictures, micro_checkpoint, tmp_path) -> None:
    """The folder and its infer.json agree after a run into an earlier output with other queries."""
    support, mask, out = [pictures / "support.png"], [pictures / "mask.png"], tmp_path / "out"
    shutil.copy(pictures / "query.jpg", tmp_path / "other.jpg")
    infer(micro_checkpoint, support, mask, [pictures / "query.jpg", tmp_path / "other.jpg"], out)
    assert len(list(out.iterdir())) == 5
    summary = infer(micro_checkpoint, support, mask, [tmp_path / "other.jpg"], out)
    assert sorted(p.name for p in out.iterdir()) == ["infer.json", "other_mask.png", "other_overlay.png"]
    assert [r["mask"] for r in summary["queries"]] == ["other_mask.png"]
    # An infer.json edited to name a file outside the folder, or the folder itself, is not an earlier
    # output: the folder is refused and nothing is removed ("" had made every file there count as ours).
    outside = tmp_path / "keep_mask.png"
    outside.write_bytes(b"the user's")
    (out / "thesis.tex").write_text("the user's")
    for name in ("../keep_mask.png", ""):
        edited = {**summary, "queries": [*summary["queries"], {"query": "x", "mask": name, "foreground": 0}]}
        (out / "infer.json").write_text(json.dumps(edited))
        with pytest.raises(OutputError, match="holds other files"):
            infer(micro_checkpoint, support, mask, [tmp_path / "other.jpg"], out)
    assert outside.read_bytes() == b"the user's" and (out / "thesis.tex").read_text() == "the user's"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError(36, "File name too long")])
@pytest.mark.parametrize("earlier", [True, False])
def test_a_run_stopped_partway_leaves_the_folder_as_it_was(
    stop, earlier, pictures, micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """Ctrl-C, or a name the file system refuses, after some masks are written: an earlier output is kept
    whole (it was left with masks of two runs), a new one is not made (it was left with loose masks that
    made the next run refuse the folder), and nothing staged is left behind."""
    import crnet.commands.infer as inferring
    from crnet.files import OutputError

    support, mask, out = [pictures / "support.png"], [pictures / "mask.png"], tmp_path / "runs" / "out"
    queries = [pictures / "query.jpg", Path(shutil.copy(pictures / "query.jpg", tmp_path / "second.jpg"))]
    if earlier:
        infer(micro_checkpoint, support, mask, queries[:1], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if earlier else None
    saved, real_save = [], inferring._save_png

    def save_then_stop(array, path):
        if len(saved) == 2:  # the first query's mask and overlay are written
            raise stop
        saved.append(path)
        real_save(array, path)

    monkeypatch.setattr(inferring, "_save_png", save_then_stop)
    with pytest.raises(KeyboardInterrupt if stop is KeyboardInterrupt else OutputError):
        infer(micro_checkpoint, support, mask, queries, out)
    assert len(saved) == 2
    if earlier:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert not (tmp_path / "runs").exists()  # not even the folder made for it
    assert [p.name for p in tmp_path.rglob("*") if ".partial-" in p.name or ".old-" in p.name] == []


def test_queries_past_the_kept_bytes_are_read_again_with_the_same_masks(
    pictures, micro_checkpoint, tmp_path, monkeypatch
) -> None:
    """Decoded queries are kept for the work only up to QueryImages.KEPT_BYTES (a folder of photos would
    otherwise all be in memory at once); the others are read a second time, with the same masks, and an
    animation's warning is given once."""
    import crnet.commands.infer as inferring

    frames = [Image.open(pictures / "support.png").rotate(angle) for angle in (0, 90)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    queries = [pictures / "query.jpg", tmp_path / "clip.gif", pictures / "gray.png"]
    support, mask = [pictures / "support.png"], [pictures / "mask.png"]
    reads, real_read = [], inferring.read_image

    def counted_read(path, **kwargs):
        if Path(path) in queries:
            reads.append(Path(path).name)
        return real_read(path, **kwargs)

    monkeypatch.setattr(inferring, "read_image", counted_read)
    infer(micro_checkpoint, support, mask, queries, tmp_path / "kept", batch_size=2)
    assert reads == ["query.jpg", "clip.gif", "gray.png"]
    reads.clear()
    monkeypatch.setattr(inferring.QueryImages, "KEPT_BYTES", 64 * 48 * 3)  # the first query's bytes alone
    with pytest.warns(CRNetWarning, match="clip.gif holds 2 frames") as caught:
        infer(micro_checkpoint, support, mask, queries, tmp_path / "read_again", batch_size=2)
    assert reads == ["query.jpg", "clip.gif", "gray.png", "clip.gif", "gray.png"]
    assert len([w for w in caught if "frames" in str(w.message)]) == 1
    names = sorted(p.name for p in (tmp_path / "kept").iterdir() if p.suffix == ".png")
    assert names == sorted(p.name for p in (tmp_path / "read_again").iterdir() if p.suffix == ".png")
    for name in names:
        kept = np.asarray(Image.open(tmp_path / "kept" / name))
        assert np.array_equal(kept, np.asarray(Image.open(tmp_path / "read_again" / name)))


def test_a_checkpoint_under_another_name_is_a_checkpoint(pictures, micro_checkpoint, tmp_path) -> None:
    renamed = Path(shutil.copy(micro_checkpoint, tmp_path / "model.PTH"))
    support, mask = [pictures / "support.png"], [pictures / "mask.png"]
    summary = infer(renamed, support, mask, [pictures / "query.jpg"], tmp_path / "out")
    assert summary["runtime"] == "torch:fp32"


def test_output_names_are_unique() -> None:
    assert output_names([Path("a/x.jpg"), Path("b/x.png"), Path("y.jpg"), Path("c/x.jpg")]) == [
        "x",
        "x_1",
        "y",
        "x_2",
    ]
    # A numbered name that is also another query's stem, either way round.
    assert output_names([Path("a/x.jpg"), Path("b/x.jpg"), Path("x_1.jpg")]) == ["x", "x_1", "x_1_1"]
    assert output_names([Path("x_1.jpg"), Path("a/x.jpg"), Path("b/x.jpg")]) == ["x_1", "x", "x_2"]


def test_output_names_fit_the_file_system() -> None:
    """A query named with 245 bytes is legal, but its `_overlay.png` is not: infer segmented every query
    and then failed, naming its hidden staging folder. Names are cut to fit, whole characters, unique."""
    long = "\u00e9" * 125  # 250 bytes: e-acute is two, and 243 of them would cut one in half
    names = output_names([Path(f"{long}.jpg"), Path(f"other/{long}.png"), Path("q.jpg")])
    assert all(len(f"{name}_overlay.png".encode()) <= 255 for name in names)
    assert names[0] == "\u00e9" * 121 and names[1] == "\u00e9" * 120 + "_1" and names[2] == "q"


@pytest.mark.parametrize(
    "mask, error, message",
    [
        ("mask_wrong_size.png", MaskError, "is 45x40 but its image is 50x40"),
        ("mask_empty.png", EmptySupportMaskError, "marks no object pixel"),
        ("mask_bad_values.png", MaskError, "has values"),
        ("mask_speck.png", EmptySupportMaskError, "vanishes at the 33x33 input"),
        # kept at the input, but its prompt was zero and infer wrote a meaningless mask
        ("mask_between.png", EmptySupportMaskError, "between the points .* 5x5 feature grid \\(one every 8"),
    ],
)
def test_bad_support_masks(mask, error, message, pictures, micro_checkpoint, tmp_path) -> None:
    with pytest.raises(error, match=message):
        infer(
            micro_checkpoint,
            [pictures / "support.png"],
            [pictures / mask],
            [pictures / "query.jpg"],
            tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()  # checked before anything is written


def deploy_cases(p: Path, bundle: Path, checkpoint: Path, tmp: Path) -> dict:
    support = ["--support", str(p / "support.png"), "--support-mask", str(p / "mask.png")]
    out = ["--out", str(tmp / "out"), "--no-progress"]

    def run(engine, *extra):
        return ["infer", "--engine", str(engine), *support, "--query", str(p / "query.jpg"), *out, *extra]

    extended = Path(shutil.copytree(bundle, tmp / "extended"))
    shutil.copyfile(bundle / "head.fp32.onnx", extended / "model.onnx")  # a graph the manifest does not list
    return {
        # its name was read as a precision: "onnxruntime precision ... must be one of fp32, fp16"
        "infer-unlisted-graph": (run(extended / "model.onnx"), "is not one of the graphs bundle"),
        "infer-missing-engine": (run(tmp / "nothing"), "engine not found"),
        "infer-foreign-file": (run(p / "query.jpg"), "is neither a crnet checkpoint nor a graph"),
        "infer-foreign-dir": (run(p), "is not a crnet bundle"),
        "infer-broken-query": (
            ["infer", "--engine", str(checkpoint), *support, "--query", str(p / "broken.jpg"), *out],
            "cannot read image",
        ),
        "infer-32-bit-query": (
            ["infer", "--engine", str(checkpoint), *support, "--query", str(p / "float.tif"), *out],
            "has no defined range",
        ),
        "infer-missing-query": (
            ["infer", "--engine", str(checkpoint), *support, "--query", str(p / "none.jpg"), *out],
            "image not found",
        ),
        "infer-mask-count": (
            [
                "infer",
                "--engine",
                str(checkpoint),
                *support,
                "--support",
                str(p / "support.png"),
                "--query",
                str(p / "query.jpg"),
                *out,
            ],
            "2 --support images but 1 --support-mask",
        ),
        "infer-empty-mask": (
            [
                "infer",
                "--engine",
                str(checkpoint),
                "--support",
                str(p / "support.png"),
                "--support-mask",
                str(p / "mask_empty.png"),
                "--query",
                str(p / "query.jpg"),
                *out,
            ],
            "marks no object pixel",
        ),
        "infer-no-tensorrt-engines": (run(bundle, "--runtime", "tensorrt"), "needs a CUDA GPU"),
        "infer-precision-not-exported": (
            run(checkpoint, "--runtime", "onnxruntime"),
            "runs on the torch runtime",
        ),
        "infer-device-cuda": (run(bundle, "--device", "cuda"), "no usable CUDA GPU"),
        "export-missing-checkpoint": (
            ["export", str(tmp / "no.pt"), "--out", str(tmp / "b")],
            "checkpoint not found",
        ),
        "export-bad-batch": (
            ["export", str(checkpoint), "--out", str(tmp / "b"), "--batch-range", "4:2:8"],
            "--batch-range",
        ),
        "export-existing-out": (["export", str(checkpoint), "--out", str(bundle)], "already exists"),
        "bench-bundle-needed": (
            ["bench", str(checkpoint), "--runtime", "onnxruntime", "--data", str(p)],
            "need --bundle",
        ),
        "bench-bad-runtime": (
            ["bench", str(checkpoint), "--runtime", "caffe", "--data", str(p)],
            "unknown runtime",
        ),
        "bench-not-a-bundle": (
            ["bench", str(checkpoint), "--bundle", str(p), "--runtime", "onnxruntime", "--data", str(p)],
            "is not a crnet bundle",
        ),
        "bench-data-not-voc": (
            ["bench", str(checkpoint), "--bundle", str(bundle), "--data", str(p)],
            "is not a VOC tree",
        ),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="some cases expect a machine without CUDA")
def test_deploy_commands_fail_in_one_line(
    pictures, micro_bundle, micro_checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, (args, expected) in deploy_cases(pictures, micro_bundle, micro_checkpoint, tmp_path).items():
        monkeypatch.setattr(sys, "argv", ["crnet", *args])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
            print(f"{name} did not fail")
        stdout, stderr = capsys.readouterr()
        try:
            assert isinstance(exit_info.value, SystemExit), f"{name} did not fail"
            check_user_error(exit_info.value.code, stdout, stderr, expected)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
        assert not (tmp_path / "out").exists(), name
        assert not (tmp_path / "b").exists(), name


def test_export_cli_writes_a_bundle_and_triton_repository(micro_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "crnet",
            "export",
            str(micro_checkpoint),
            "--out",
            str(tmp_path / "b"),
            "--triton",
            str(tmp_path / "t"),
        ],
    )
    cli.main()
    assert (tmp_path / "b/manifest.json").is_file() and (tmp_path / "t/crnet_episode/config.pbtxt").is_file()
    assert "wrote bundle" in capsys.readouterr().out


@pytest.mark.parametrize(
    "engine, runtime, expected",
    [
        ("bundle", "onnxruntime:fp16", "onnxruntime:fp16"),  # the same spec syntax as bench
        ("bundle", "onnxruntime", "onnxruntime:fp32"),
        ("graph", None, "onnxruntime:fp16"),  # a graph file fixes runtime and precision
        ("graph", "onnxruntime", "onnxruntime:fp16"),
        ("checkpoint", "torch:bf16+channels-last", "torch:bf16+channels-last"),
    ],
)
def test_infer_cli_takes_runtime_specs(
    engine, runtime, expected, pictures, micro_bundle, micro_checkpoint, tmp_path, monkeypatch
):
    path = {"bundle": micro_bundle, "graph": micro_bundle / "head.fp16.onnx", "checkpoint": micro_checkpoint}
    args = ["crnet", "infer", "--engine", str(path[engine]), "--support", str(pictures / "support.png")]
    args += ["--support-mask", str(pictures / "mask.png"), "--query", str(pictures / "query.jpg")]
    args += ["--out", str(tmp_path / "out"), "--no-progress"] + (["--runtime", runtime] if runtime else [])
    monkeypatch.setattr(sys, "argv", args)
    cli.main()
    assert json.loads((tmp_path / "out/infer.json").read_text())["runtime"] == expected


def test_a_graph_file_refuses_another_precision(pictures, micro_bundle, tmp_path) -> None:
    with pytest.raises(CRNetError, match="is a fp16 onnxruntime file"):
        infer(
            micro_bundle / "head.fp16.onnx",
            [pictures / "support.png"],
            [pictures / "mask.png"],
            [pictures / "query.jpg"],
            tmp_path,
            runtime="onnxruntime:fp32",
        )


def test_a_checkpoint_runs_the_deployed_gpu_path_by_default_on_cuda(micro_checkpoint) -> None:
    from crnet.commands.infer import choose_engine

    cpu = choose_engine(micro_checkpoint, None, torch.device("cpu")).spec
    cuda = choose_engine(micro_checkpoint, None, torch.device("cuda")).spec
    assert str(cpu) == "torch:fp32"
    deployed = "torch:fp16+channels-last+cudnn-epilogues+space-to-depth+compile+cuda-graphs+torch-loop"
    assert str(cuda) == deployed
    assert str(choose_engine(micro_checkpoint, "torch:fp32", torch.device("cuda")).spec) == "torch:fp32"


def test_auto_runs_a_bundle_on_the_cpu_where_onnxruntime_has_no_gpu(micro_bundle, monkeypatch) -> None:
    """On a GPU machine with pip's CPU build of onnxruntime, `auto` (device None) runs the bundle on the CPU
    rather than refusing; asking for CUDA still asks for it."""
    import onnxruntime

    from crnet.commands.infer import choose_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    choice = choose_engine(micro_bundle, None, None)
    assert str(choice.spec) == "onnxruntime:fp32" and choice.device == torch.device("cpu")
    assert choose_engine(micro_bundle, None, torch.device("cuda")).device == torch.device("cuda")
