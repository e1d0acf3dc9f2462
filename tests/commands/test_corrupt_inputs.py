"""Damaged files and environments that a crash, a hand edit or a stray shell variable leave behind: each is
one `error:` line and exit code 2, never a traceback, and a failed command changes nothing of the user's.

Cases: a run's metrics log with a bad line; a model-only checkpoint as a run's last.pt; a dataset list file
that is not UTF-8; a checkpoint whose stored configs were edited to wrong types or values; torchrun's
environment variables set by hand.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from crnet.checkpoint import save_atomic
from crnet.commands import cli
from tests.commands.test_cli import EVERY_OBJECT, check_user_error, snapshot, tiny_state
from tests.fake_voc import make_fake_voc

# The run the fixture trains, and every resume of it: --resume needs the same settings.
RUN_OPTIONS = ["--steps", "1", "--batch-size", "1", "--workers", "0", "--device", "cpu", "--no-progress"]


@dataclass(frozen=True)
class World:
    voc: Path  # a fake VOC tree, valid for fold 0
    run: Path  # a finished one-step training run: last.pt, model.pt, metrics.jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("corrupt")
    voc = make_fake_voc(root / "voc")
    run = root / "run"
    args = ["train", "--out", str(run), "--data", str(voc), *EVERY_OBJECT, *RUN_OPTIONS]
    hook = sys.excepthook
    try:
        assert cli.app(args, standalone_mode=False) in (None, 0)
    finally:
        sys.excepthook = hook  # typer installs its own
    assert {p.name for p in run.iterdir()} >= {"last.pt", "model.pt", "metrics.jsonl"}
    return World(voc=voc, run=run)


def fails_with(
    args: list[str], expected: str, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> str:
    """Run the CLI in-process: exit code 2 and exactly one `error:` line holding `expected`, returned."""
    home.mkdir(exist_ok=True)  # isolated, not checked: importing onnxruntime (export) writes a cache file
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setattr(sys, "argv", ["crnet", *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer installs its own hook
    with pytest.raises(SystemExit) as exit_info:  # any other exception would be a traceback for the user
        cli.main()
    stdout, stderr = capsys.readouterr()
    check_user_error(exit_info.value.code, stdout, stderr, expected)
    return stderr


def resume(run: Path, voc: Path) -> list[str]:
    return ["train", "--out", str(run), "--data", str(voc), *EVERY_OBJECT, *RUN_OPTIONS, "--resume"]


@pytest.mark.parametrize(
    "damage",
    [b"garbage{\n", b'{"loss": 1.0}\n', b"\xff\xfe"],
    ids=["not-json", "no-step", "not-utf8"],
)
def test_resume_with_damaged_metrics_log(
    damage: bytes,
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    run = shutil.copytree(world.run, tmp_path / "run")
    with open(run / "metrics.jsonl", "ab") as log:  # the one good line of the finished run, then this
        log.write(damage)
    before = snapshot(run)
    fails_with(
        resume(run, world.voc),
        "metrics.jsonl line 2 is not a metrics record",
        tmp_path / "home",
        monkeypatch,
        capsys,
    )
    assert snapshot(run) == before


def test_resume_from_model_only_checkpoint(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run = shutil.copytree(world.run, tmp_path / "run")
    shutil.copyfile(run / "model.pt", run / "last.pt")  # weights and configs, but no optimizer state
    before = snapshot(run)
    fails_with(
        resume(run, world.voc), "last.pt is not a training state", tmp_path / "home", monkeypatch, capsys
    )
    assert snapshot(run) == before


def test_resume_with_another_number_of_processes(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A run saved by two torchrun processes, resumed by one: each process resumes its own random state,
    so it says how many to start (one more than saved raised an IndexError)."""
    run = shutil.copytree(world.run, tmp_path / "run")
    state = torch.load(run / "last.pt", weights_only=False)
    save_atomic({**state, "rng": state["rng"] * 2}, run / "last.pt")
    before = snapshot(run)
    line = fails_with(
        resume(run, world.voc), "was saved by 2 training processes", tmp_path / "home", monkeypatch, capsys
    )
    assert "torchrun --nproc_per_node 2" in line
    assert snapshot(run) == before


def test_resume_after_the_training_data_changed(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The run's cached predictions are per training image-class pair: a list file edited since the save
    changes their number (a size mismatch deep in the cache raised before)."""
    run = shutil.copytree(world.run, tmp_path / "run")
    state = torch.load(run / "last.pt", weights_only=False)
    cache = {key: value[:-1] for key, value in state["cache"].items()}  # as if a pair had been added since
    save_atomic({**state, "cache": cache}, run / "last.pt")
    before = snapshot(run)
    fails_with(resume(run, world.voc), "the training data changed", tmp_path / "home", monkeypatch, capsys)
    assert snapshot(run) == before


BENCH_ONLY_TORCH = ["--runtime", "torch", "--device", "cpu", "--episodes", "2"]


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_list_file_not_utf8(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    voc = make_fake_voc(tmp_path / "voc")
    (voc / "ImageSets/Segmentation/val.txt").write_bytes(b"\xff\xfe garbage\n")
    checkpoint = save_atomic(tiny_state(), tmp_path / "tiny.pt")
    extra = BENCH_ONLY_TORCH if command == "bench" else []
    args = [command, str(checkpoint), "--data", str(voc), *EVERY_OBJECT, "--no-progress", *extra]
    args += ["--json", str(tmp_path / "out.json")]
    fails_with(args, "val.txt is not a text list of image ids", tmp_path / "home", monkeypatch, capsys)
    assert not (tmp_path / "out.json").exists()


def edited(section: str, field: str | None, value) -> dict:
    """tiny_state() with one stored config, or one of its fields, replaced by hand."""
    state = tiny_state()
    if field is None:
        state[section] = value
    else:
        state[section] = {**state[section], field: value}
    return state


EXPORT = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="export needs the [export] extra"
)

# id -> (command, section, field (None: the whole section), stored value, text the error line must contain)
EDITS = {
    "train-config-none": ("eval", "train_config", None, None, "train_config must be a dict of settings"),
    "fold-not-int": ("eval", "train_config", "fold", "x", "train_config.fold must be an integer, got 'x'"),
    "fold-out-of-range": ("eval", "train_config", "fold", 7, "fold must be in 0..3, got 7"),
    "input-size-zero": (
        "eval",
        "model_config",
        "input_size",
        0,
        "input_size must be an integer from 1 to 4096, got 0",
    ),
    # a typo's size: infer built 24 GB of input before the kernel killed it
    "input-size-huge": ("eval", "model_config", "input_size", 100000, "from 1 to 4096, got 100000"),
    "iterations-zero": ("eval", "model_config", "iterations", 0, "model_config.iterations"),
    "export-input-size-zero": ("export", "model_config", "input_size", 0, "input_size must be an integer"),
    # a checkpoint under another name is recognised by loading it: its own error, not "neither ... nor"
    "infer-pth-input-size-zero": ("infer", "model_config", "input_size", 0, "input_size must be an integer"),
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, id=name, marks=[EXPORT] if name.startswith("export") else []) for name in EDITS],
)
def test_checkpoint_with_edited_config(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    command, section, field, value, expected = EDITS[name]
    user = tmp_path / "user"  # the eval JSON would land beside the checkpoint, the bundle in here too
    voc = make_fake_voc(user / "voc")
    checkpoint = save_atomic(edited(section, field, value), user / "edited.pt")
    if command == "export":
        args = ["export", str(checkpoint), "--out", str(user / "bundle")]
    elif command == "infer":
        checkpoint = checkpoint.rename(user / "edited.pth")
        image = next((voc / "JPEGImages").iterdir())
        args = ["infer", "--engine", str(checkpoint), "--support", str(image), "--support-mask", str(image)]
        args += ["--query", str(image), "--out", str(user / "bundle"), "--no-progress"]
    else:
        args = ["eval", str(checkpoint), "--data", str(voc), *EVERY_OBJECT, "--no-progress"]
    before = snapshot(user)
    line = fails_with(args, expected, tmp_path / "home", monkeypatch, capsys)
    assert f"{checkpoint.name}: {section}" in line  # names the file and the config that is wrong
    assert snapshot(user) == before
    assert not (user / "bundle").exists()


RENDEZVOUS = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a number; crnet train reads it from torchrun"),
        ({"RANK": "x"}, "RANK='x' is not a number"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT are not set"),
        (
            {"WORLD_SIZE": str(10**23)},
            f"WORLD_SIZE={10**23} must be 1 to 1048576",
        ),  # was TCPStore's TypeError
        (RENDEZVOUS | {"MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not a number"),
        (RENDEZVOUS | {"MASTER_PORT": "99999"}, "MASTER_PORT=99999 must be 1 to 65535"),
        (RENDEZVOUS | {"MASTER_ADDR": "no.such.host.invalid"}, "MASTER_ADDR='no.such.host.invalid' does not"),
    ],
    ids=["world-size", "rank", "no-rendezvous", "huge-world", "port-word", "port-past-range", "no-such-host"],
)
def test_torchrun_variables_set_by_hand(
    variables: dict[str, str],
    expected: str,
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "new_run"
    args = ["train", "--out", str(out), "--data", str(world.voc), *EVERY_OBJECT, *RUN_OPTIONS]
    fails_with(args, expected, tmp_path / "home", monkeypatch, capsys)
    assert not out.exists()
    assert not torch.distributed.is_initialized()
