"""The demo end to end on a micro checkpoint (evaluation, pictures, export, bench, tables and JSON), and the
committed checkpoint against the recipe that trains it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from crnet.commands import cli
from crnet.commands.demo import DEMO_RUNTIMES, RECIPE, demo_runtimes
from crnet.config import TINY, ModelConfig, TrainConfig
from crnet.engines import deployed_gpu
from crnet.errors import CRNetError

COMMITTED = Path(__file__).parents[2] / "checkpoints" / "tiny_fold0.pt"


def test_demo_runs_every_stage(micro_checkpoint, bench_root, tmp_path, monkeypatch, capsys) -> None:
    """On a checkpoint trained on fold 2, the demo tests fold 2 (it scored fold 0's classes, which trained
    it, as novel)."""
    from crnet.checkpoint import load, save_atomic

    checkpoint = save_atomic(load(micro_checkpoint) | {"train_config": {"fold": 2}}, tmp_path / "fold2.pt")
    out = tmp_path / "demo"
    args = ["demo", "--checkpoint", str(checkpoint), "--data", str(bench_root), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["crnet", *args, "--episodes", "4", "--no-progress"])
    cli.main()
    printed = capsys.readouterr().out
    document = json.loads((out / "results.json").read_text())
    results = document["results"]
    assert document["trained_fold"] == 2
    assert [r["shots"] for r in results] == [1, 1, 5] and {r["fold"] for r in results} == {2}
    assert (out / "episodes.png").is_file() and (out / "bundle" / "manifest.json").is_file()
    bench = json.loads((out / "bench.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what --device auto picks
    assert [row["spec"] for row in bench["runtimes"]] == list(demo_runtimes(device))
    assert all(row["status"] == "ok" for row in bench["runtimes"])
    assert "CRNet" in printed
    if device.type == "cpu":
        assert "onnxruntime fp16" in printed
    assert bench["settings"]["bundle"] == str(out / "bundle")  # where it landed, not where it was staged
    assert bench["settings"]["fold"] == 2
    assert sorted(tmp_path.iterdir()) == [out, checkpoint]

    # A rerun stopped partway leaves the first run's outputs as they were: no new results.json beside the
    # old bench.json (it used to write each output as its stage ended).
    import crnet.commands.demo as demo

    def files(folder: Path) -> dict:
        paths = [path for path in folder.rglob("*") if path.is_file()]
        return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns) for path in paths}

    before = files(out)

    def stopped(checkpoint, stage, *rest, **options):
        (stage / "bench.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "export_and_bench", stopped)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 130
    assert files(out) == before and sorted(tmp_path.iterdir()) == [out, checkpoint]


def test_committed_checkpoint_is_the_recipes() -> None:
    # demo.RECIPE is the documented command that reproduces the committed checkpoint: they must not drift.
    stored = torch.load(COMMITTED, weights_only=True)
    assert TrainConfig.from_dict(stored["train_config"]) == RECIPE
    assert ModelConfig.from_dict(stored["model_config"]) == TINY
    assert stored["step"] == RECIPE.steps


def readme_command(start: str) -> list[str]:
    """The README's shell command that begins with `start`, continuation lines joined, as arguments."""
    lines = (COMMITTED.parents[1] / "README.md").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    command = []
    for line in lines[first:]:
        command.append(line.split("#")[0].strip().rstrip("\\"))
        if not line.rstrip().endswith("\\"):
            break
    return " ".join(command).split()


def test_readme_train_example_is_the_recipe(monkeypatch, tmp_path) -> None:
    """A newcomer who runs the README's training example trains the committed checkpoint's recipe."""
    import crnet.commands.train as training

    seen = {}
    monkeypatch.setattr(
        training, "train", lambda model, config, *a, **k: seen.update(model=model, config=config)
    )
    args = readme_command("crnet train --out runs/tiny --preset tiny")
    monkeypatch.setattr(sys, "argv", [*args, "--data", str(tmp_path), "--device", "cpu"])
    cli.main()
    assert seen["model"] == TINY and seen["config"] == RECIPE


@pytest.mark.parametrize(
    "args, default_exists, trains, message",
    [
        ([], True, False, None),  # the committed checkpoint: no training
        ([], False, True, "the committed tiny model is not installed: training the tiny recipe first"),
        (["--train"], True, True, None),  # asked for
    ],
)
def test_demo_trains_only_when_asked_or_when_the_default_is_absent(
    args, default_exists, trains, message, micro_checkpoint, tmp_path, monkeypatch, capsys
) -> None:
    import crnet.commands.demo as demo

    monkeypatch.chdir(tmp_path)
    committed = micro_checkpoint if default_exists else None
    monkeypatch.setattr(demo, "committed_checkpoint", lambda: committed)
    used = {}
    monkeypatch.setattr(demo, "train_recipe", lambda *a, **k: used.setdefault("trained", micro_checkpoint))

    def stop_after_choosing(checkpoint, *rest):
        used["evaluated"] = checkpoint
        raise CRNetError("stop here")  # the rest of the demo is test_demo_runs_every_stage's

    monkeypatch.setattr(demo, "run_demo", stop_after_choosing)
    (tmp_path / "data").mkdir()  # beside runs/demo: an --out inside the data is refused
    argv = ["crnet", "demo", "--data", str(tmp_path / "data"), "--no-progress", *args]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        cli.main()
    assert ("trained" in used) == trains
    assert used["evaluated"] == micro_checkpoint  # the committed one, or the one trained
    stderr = capsys.readouterr().err
    assert (message in stderr) if message else "training" not in stderr


def test_demo_runtimes_on_a_gpu_are_ones_that_run_there(monkeypatch) -> None:
    assert demo_runtimes(torch.device("cpu")) == DEMO_RUNTIMES
    gpu = demo_runtimes(torch.device("cuda"))
    assert gpu[:4] == ("torch:fp32", "torch:fp16+channels-last", deployed_gpu(), "torch:fp16+anchor")
    assert not any(spec.startswith("onnxruntime:") and not spec.endswith("+cuda") for spec in gpu)


def test_the_demo_replaces_only_an_earlier_demos_output(tmp_path, micro_bundle) -> None:

    from crnet.commands.demo import check_demo_out

    out = tmp_path / "demo"
    out.mkdir()
    shutil.copytree(micro_bundle, out / "bundle")
    for name in ("episodes.png", "bench.json", "bench.png"):
        (out / name).write_bytes(b"ours")
    (out / "results.json").write_text(json.dumps({"checkpoint": "c.pt", "results": []}))
    check_demo_out(out)
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(CRNetError, match="holds other files"):
        check_demo_out(out)
    (out / "mine.txt").unlink()
    # The rerun replaces the bundle whole: a file added to it, or a bundle that is not one, is the user's.
    (out / "bundle" / "NOTES.txt").write_text("the user's")
    with pytest.raises(CRNetError, match="holds other files"):
        check_demo_out(out)
    (out / "bundle" / "NOTES.txt").unlink()
    (out / "episodes.png").unlink()
    (out / "episodes.png").mkdir()  # a folder under a result's name
    with pytest.raises(CRNetError, match="holds other files"):
        check_demo_out(out)
    (out / "episodes.png").rmdir()
    check_demo_out(out)
    (out / "results.json").write_text(json.dumps({"results": []}))  # a results.json of the user's
    with pytest.raises(CRNetError, match="holds other files"):
        check_demo_out(out)


def test_a_demo_stopped_while_training_can_be_run_again(tmp_path) -> None:
    """`crnet demo --train` resumes its training run: a folder holding only that run is the demo's."""
    from crnet.commands.demo import check_demo_out

    out = tmp_path / "demo"
    (out / "train").mkdir(parents=True)
    (out / "train" / "metrics.jsonl").write_text("")
    with pytest.raises(CRNetError, match="holds other files"):
        check_demo_out(out)  # no training state: not a run that can be resumed
    (out / "train" / "last.pt").write_bytes(b"state")
    check_demo_out(out)
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(CRNetError, match="holds other files"):
        check_demo_out(out)


def test_an_interrupted_demo_says_how_to_continue_it(monkeypatch, tmp_path) -> None:
    """Its training run said "continue with --resume", an option the demo does not have."""
    from crnet.commands import demo

    asked = {}
    monkeypatch.setattr(demo, "train", lambda *args, **kwargs: asked.update(kwargs))
    demo.train_recipe(tmp_path / "out", tmp_path / "data", torch.device("cpu"), False, print)
    assert asked["how_to_continue"] == "run the demo again with the same --out to continue"
    assert asked["resume"] is False


def test_a_demo_killed_before_its_first_checkpoint_is_its_own_output(tmp_path) -> None:
    """Killed outright before step 500, the demo left only train/metrics.jsonl: the rerun refused the folder
    as "other files than an earlier demo"."""
    from crnet.commands.demo import is_demo_output

    (tmp_path / "demo" / "train").mkdir(parents=True)
    record = {"step": 50, "loss": 0.7, "query_loss": 0.4, "support_loss": 0.3, "lr": 0.001}
    record |= {"episodes_per_s": 9.0, "time": 1.0}  # crnet's whole record: a few keys are not enough
    (tmp_path / "demo" / "train" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert is_demo_output(tmp_path / "demo")
    (tmp_path / "demo" / "train" / "metrics.jsonl").write_text("a user's notes\n")
    assert not is_demo_output(tmp_path / "demo")


def test_the_committed_model_is_found_from_any_folder(tmp_path, monkeypatch) -> None:
    """The default was checkpoints/tiny_fold0.pt under the current folder: from anywhere else, and always
    from a wheel, the demo trained for ten minutes (or hours without native bfloat16) instead."""
    from crnet.commands.demo import committed_checkpoint

    monkeypatch.chdir(tmp_path)
    assert committed_checkpoint() == COMMITTED  # the source tree's; .ci/wheel checks the installed one's


@pytest.mark.parametrize(
    "flags, precision", [("avx512_bf16", "bf16"), ("amx_bf16 avx2", "bf16"), ("avx2", "fp32")]
)
def test_the_recipe_trains_in_fp32_without_native_bfloat16(flags, precision, tmp_path, monkeypatch) -> None:
    import crnet.commands.demo as demo

    real_read = Path.read_text
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda path, *a, **k: (
            f"flags : fpu {flags}\n" if str(path) == "/proc/cpuinfo" else real_read(path, *a, **k)
        ),
    )
    assert demo.recipe_for(torch.device("cpu")).precision == precision
    assert demo.recipe_for(torch.device("cuda")) == demo.RECIPE
