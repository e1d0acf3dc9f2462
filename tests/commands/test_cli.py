"""The CLI on bad input: exit code 2, exactly one stderr line starting with "error:", no traceback.

Every case runs in-process through `crnet.commands.cli.main` (fast); a few also run as `python -m crnet` in a
fresh interpreter, which catches what in-process runs cannot: import-time warnings and the real entry
point. HOME points into tmp_path and --data is always given, so nothing is generated in the real home.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from crnet.checkpoint import save_atomic
from crnet.commands import cli
from crnet.config import TINY, TrainConfig
from crnet.model.crnet import build_model
from tests.fake_voc import make_fake_voc

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@dataclass(frozen=True)
class Files:
    root: Path  # a scratch directory holding everything below
    voc: Path  # the fake VOC tree (valid for fold 0)
    not_voc: Path  # an empty directory
    checkpoint: Path  # a valid tiny checkpoint (untrained)
    corrupt: Path  # random bytes
    truncated: Path  # the first half of a valid checkpoint
    foreign: Path  # a torch file that is not a crnet checkpoint
    mismatched: Path  # crnet format, but weights that do not fit the model config
    run: Path  # a run directory holding last.pt (a valid, matching checkpoint)
    empty_run: Path  # a run directory without last.pt
    corrupt_run: Path  # a run directory whose last.pt is random bytes


def tiny_state() -> dict:
    torch.manual_seed(0)
    return {
        "model_config": TINY.to_dict(),
        "train_config": TrainConfig(min_object_pixels=1).to_dict(),  # as the CLI cases train
        "step": 0,
        "model": build_model(TINY).state_dict(),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("cli")
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    checkpoint = save_atomic(tiny_state(), root / "tiny.pt")
    (root / "corrupt.pt").write_bytes(noise)
    (root / "truncated.pt").write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    save_atomic({"model_config": TINY.to_dict(), "model": {"conv.weight": torch.zeros(1)}}, root / "bad.pt")
    (root / "not_voc").mkdir()
    save_atomic(tiny_state(), root / "run/last.pt")
    (root / "empty_run").mkdir()
    (root / "corrupt_run").mkdir()
    (root / "corrupt_run/last.pt").write_bytes(noise)
    return Files(
        root=root,
        voc=make_fake_voc(root / "voc"),
        not_voc=root / "not_voc",
        checkpoint=checkpoint,
        corrupt=root / "corrupt.pt",
        truncated=root / "truncated.pt",
        foreign=root / "foreign.pt",
        mismatched=root / "bad.pt",
        run=root / "run",
        empty_run=root / "empty_run",
        corrupt_run=root / "corrupt_run",
    )


# The fake VOC tree's objects are tens of pixels, below PASCAL's 2048-pixel rule: count every object.
EVERY_OBJECT = ["--min-object-pixels", "1"]


def ev(checkpoint: Callable[[Files], Path], *extra: str) -> Callable[[Files], list[str]]:
    return lambda f: [
        "eval",
        str(checkpoint(f)),
        "--data",
        str(f.voc),
        *EVERY_OBJECT,
        "--no-progress",
        *extra,
    ]


def tr(out: Callable[[Files], Path], *extra: str) -> Callable[[Files], list[str]]:
    return lambda f: [
        "train",
        "--out",
        str(out(f)),
        "--data",
        str(f.voc),
        *EVERY_OBJECT,
        "--no-progress",
        *extra,
    ]


def valid(f: Files) -> Path:
    return f.checkpoint


# id -> (argument builder, text the error line must contain, marks)
CASES = {
    "eval-missing-checkpoint": (ev(lambda f: f.root / "missing.pt"), "checkpoint not found", ()),
    "eval-corrupt-checkpoint": (ev(lambda f: f.corrupt), "cannot read checkpoint", ()),
    "eval-truncated-checkpoint": (ev(lambda f: f.truncated), "cannot read checkpoint", ()),
    "eval-foreign-torch-file": (ev(lambda f: f.foreign), "is not a crnet checkpoint", ()),
    "eval-mismatched-weights": (ev(lambda f: f.mismatched), "does not match its model config", ()),
    "eval-checkpoint-is-dir": (ev(lambda f: f.not_voc), "checkpoint not found", ()),
    "eval-data-not-voc": (
        lambda f: [*ev(valid)(f), "--data", str(f.not_voc)],  # the last --data wins
        "is not a VOC tree",
        (),
    ),
    "eval-data-is-a-file": (lambda f: [*ev(valid)(f), "--data", str(f.corrupt)], "'--data'", ()),
    "eval-data-missing": (
        lambda f: [*ev(valid)(f), "--data", str(f.root / "nowhere")],
        "is not a VOC tree",
        (),
    ),
    # Out-of-range numbers: click words the range by version ("Input should be less than or equal to 3",
    # "7 is not in the range 0<=x<=3"), so the option's name is what these check.
    "eval-fold-out-of-range": (
        ev(valid, "--fold", "7"),
        "Invalid value for '--fold': ",
        (),
    ),
    # Fold 1's novel classes 6..10: the fake val split has class 6 once and 7..10 never.
    "eval-fold-without-images": (ev(valid, "--fold", "1"), "fewer than 2 images", ()),
    "eval-zero-shots": (
        ev(valid, "--shots", "0"),
        "Invalid value for '--shots': ",
        (),
    ),
    "eval-zero-episodes": (ev(valid, "--episodes", "0"), "Invalid value for '--episodes': ", ()),
    "eval-unknown-strategy": (
        ev(valid, "--strategy", "nope"),
        "'nope' is not one of 'average', 'finetune'",
        (),
    ),
    "eval-device-cuda": (ev(valid, "--device", "cuda"), "no usable CUDA GPU", (NO_CUDA,)),
    "eval-device-cuda-1": (ev(valid, "--device", "cuda:1"), "no usable CUDA GPU", (NO_CUDA,)),
    "eval-device-unknown": (ev(valid, "--device", "gpu0"), "unknown device", ()),
    "eval-device-unsupported": (ev(valid, "--device", "meta"), "unsupported device", ()),
    "eval-device-cpu-index": (ev(valid, "--device", "cpu:7"), "the CPU is one device here", ()),
    "train-data-not-voc": (
        lambda f: [*tr(lambda f: f.root / "new_run")(f), "--data", str(f.not_voc)],
        "is not a VOC tree",
        (),
    ),
    "train-device-cuda": (
        tr(lambda f: f.root / "new_run", "--device", "cuda"),
        "no usable CUDA GPU",
        (NO_CUDA,),
    ),
    "train-unknown-preset": (
        tr(lambda f: f.root / "new_run", "--preset", "nope"),
        "'nope' is not one of 'tiny', 'r50'",
        (),
    ),
    "train-out-holds-a-run": (tr(lambda f: f.run), "already holds a run", ()),
    "train-resume-nothing": (tr(lambda f: f.empty_run, "--resume"), "nothing to resume", ()),
    "train-resume-missing-dir": (tr(lambda f: f.root / "never", "--resume"), "nothing to resume", ()),
    "train-resume-corrupt": (tr(lambda f: f.corrupt_run, "--resume"), "cannot read checkpoint", ()),
    "train-resume-changed-settings": (
        tr(lambda f: f.run, "--resume", "--lr", "0.1"),
        "training settings differ from the checkpoint's (lr)",
        (),
    ),
    "train-fold-out-of-range": (
        tr(lambda f: f.root / "new_run", "--fold", "9"),
        "Invalid value for '--fold': ",
        (),
    ),
    "train-zero-steps": (
        tr(lambda f: f.root / "new_run", "--steps", "0"),
        "Invalid value for '--steps': ",
        (),
    ),
    # An empty path is the current folder: `--data ""` was refused as "--json inside the input ."
    "eval-empty-data": (ev(valid, "--data", ""), "an empty argument after --data", ()),
    "eval-empty-data-with-equals": (ev(valid, "--data="), "--data has an empty value", ()),
    "eval-empty-checkpoint": (ev(lambda f: ""), "an empty argument after eval", ()),
}
SUBPROCESS_CASES = [
    "eval-corrupt-checkpoint",
    "eval-data-not-voc",
    "train-unknown-preset",
    "train-device-cuda",
]


def params(names):
    return [pytest.param(name, marks=CASES[name][2], id=name) for name in names]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (the index caches beside the VOC tree excluded: writing them is fine)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".crnet_index" not in p.name
    }


def written_to_home(home: Path) -> list[str]:
    """What a command left in HOME, but for ~/.nv: the CUDA driver's kernel cache, which any process that
    touches a GPU may create."""
    return sorted(p.name for p in home.iterdir() if p.name != ".nv")


def check_user_error(code, stdout: str, stderr: str, expected: str) -> None:
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert expected in lines[0], stderr


@pytest.mark.parametrize("name", params(CASES))
def test_user_error_in_process(
    name: str, files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    build, expected, _ = CASES[name]
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["crnet", *build(files)])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer installs its own hook
    before = snapshot(files.root)
    # An exception other than SystemExit escaping main() would be a traceback for the user: the test
    # fails with it.
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    stdout, stderr = capsys.readouterr()
    check_user_error(exit_info.value.code, stdout, stderr, expected)
    # A failed command leaves no half-made run directory, eval JSON or checkpoint behind.
    assert snapshot(files.root) == before
    assert written_to_home(tmp_path) == []


def run_cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    return subprocess.run(
        [sys.executable, "-m", "crnet", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize("name", params(SUBPROCESS_CASES))
def test_user_error_subprocess(name: str, files: Files, tmp_path: Path) -> None:
    build, expected, _ = CASES[name]
    result = run_cli(build(files), tmp_path)
    check_user_error(result.returncode, result.stdout, result.stderr, expected)
    assert written_to_home(tmp_path) == []


def test_broken_image_found_during_eval_is_one_line(files: Files, tmp_path: Path) -> None:
    voc = make_fake_voc(tmp_path / "voc")
    (voc / "JPEGImages/2008_000011.jpg").write_bytes(b"not a jpeg")  # a val image of classes 2, 3, 5
    args = [
        "eval",
        str(files.checkpoint),
        "--data",
        str(voc),
        "--episodes",
        "8",
        "--batch-size",
        "8",
        *EVERY_OBJECT,
    ]
    result = run_cli([*args, "--no-progress", "--json", str(tmp_path / "out.json")], tmp_path / "home")
    check_user_error(result.returncode, result.stdout, result.stderr, "cannot read image")


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("TORCH_LOGS", "garbage", "Invalid log settings: garbage"),
        ("PYTORCH_JIT", "garbage", "Unknown setting of PYTORCH_JIT"),
        ("TORCH_LOGS_OUT", "{tmp}/no/such/folder/log.txt", "No such file or directory: {tmp}/no/such/folder"),
    ],
)
def test_torch_that_cannot_start_is_one_line(
    files: Files, tmp_path: Path, monkeypatch, variable, value, expected
):
    """PyTorch reads some settings at import and raises on a bad one: every command gave its traceback (a
    TORCH_LOGS_OUT it cannot open was one line that did not say whose path it was)."""
    monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    expected = expected.format(tmp=tmp_path)
    result = run_cli(["eval", str(files.checkpoint), "--data", str(files.voc), "--episodes", "1"], tmp_path)
    check_user_error(
        result.returncode,
        result.stdout,
        result.stderr,
        f"PyTorch cannot start in this environment: {expected}",
    )
    assert variable in result.stderr.split("(check ")[1]  # the variables set, named


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys) -> None:
    import crnet.commands.train as training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    monkeypatch.setattr(sys, "argv", ["crnet", "train", "--out", "unused_run", "--data", "unused_data"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted"]


def test_sigterm_ends_a_command_as_ctrl_c_does(micro_checkpoint, tmp_path: Path) -> None:
    """`timeout` and job schedulers stop a command with SIGTERM: it ends as Ctrl-C does, exit 130 and one
    line, and the staged bundle it was writing is removed (the default SIGTERM left it behind)."""
    import signal
    import time

    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}
    out = tmp_path / "out"
    out.mkdir()
    args = [sys.executable, "-m", "crnet", "export", str(micro_checkpoint), "--out", str(out / "bundle")]
    process = subprocess.Popen([*args, "--iterations", "50"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not list(out.glob(".bundle.partial-*")):  # the export is under way
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
        time.sleep(0.01)
    time.sleep(0.5)  # into the ONNX exporter, which wrapped an interrupt in its own error
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "interrupted"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("loaded", ["typer.colors", "torch._C"])
def test_a_signal_while_the_command_loads_is_one_line_and_exit_130(
    loaded, signal_name, micro_checkpoint, tmp_path
) -> None:
    """A signal in the first seconds, while typer (then torch) is imported, was a KeyboardInterrupt traceback
    (Ctrl-C) or a bare exit 143 (SIGTERM). `-X importtime` reports each module as it finishes loading: the
    signal is sent once `loaded` has."""
    import signal
    import time

    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}
    out = tmp_path / "out"
    out.mkdir()
    args = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "crnet",
        "export",
        str(micro_checkpoint),
        "--out",
        str(out / "b"),
    ]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    lines = []
    while not lines or lines[-1].split("|")[-1].strip() != loaded:
        lines.append(process.stderr.readline())
        assert lines[-1] and time.monotonic() < deadline, "".join(lines)
    process.send_signal(getattr(signal, signal_name))
    stderr = "".join(lines) + process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "interrupted", stderr
    assert list(out.iterdir()) == []


def test_a_reader_that_goes_away_costs_only_the_table(micro_checkpoint, bench_root, tmp_path) -> None:
    """`crnet eval ... | head` with a reader that quit before the end: eval printed its table first and lost
    the JSON; the files now come first, and the end is quiet (exit 1, as click ends such a command)."""
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}
    json_out = tmp_path / "eval.json"
    args = ["eval", str(micro_checkpoint), "--data", str(bench_root), "--episodes", "2", "--no-progress"]
    process = subprocess.Popen(
        [sys.executable, "-m", "crnet", *args, "--json", str(json_out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    process.stdout.close()  # the reader is gone before anything is printed
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 1 and "Traceback" not in stderr and "error" not in stderr, stderr
    assert json.loads(json_out.read_text())["results"][0]["method"] == "CRNet"


def test_the_demo_goes_on_when_its_reader_goes_away(monkeypatch) -> None:
    seen = []

    def gone(text):
        raise BrokenPipeError

    monkeypatch.setattr(cli, "silence_stdout", lambda: seen.append("silenced"))
    reader = cli.Reader()
    reader.show(seen.append, "first")
    reader.show(gone, "second")
    reader.show(seen.append, "third")  # not tried: stdout is gone
    assert seen == ["first", "silenced"]
    with pytest.raises(BrokenPipeError):
        reader.check()


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_closed_standard_stream_is_not_reused_for_a_file(closed: int, tmp_path) -> None:
    """With `2>&-` the next file opened took number 2, and anything written to stderr (a library's log
    line) went into it; a user error's line had nowhere to go and the exit code was 1."""
    code = (
        "import os, sys\n"
        f"os.close({closed})\n"
        "from crnet.commands.entry import _open_standard_streams\n"
        "_open_standard_streams()\n"
        "with open(sys.argv[1], 'w') as output:\n"
        "    assert output.fileno() > 2, output.fileno()\n"
        "print('to stdout'); print('to stderr', file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    process = subprocess.run(
        [sys.executable, "-m", "crnet", "eval", str(tmp_path / "missing.pt")],
        preexec_fn=lambda: os.close(closed),
        capture_output=closed == 0,
    )
    assert process.returncode == 2


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("code", [0, 2])
def test_a_signal_after_a_command_ended_keeps_its_exit_code(signal_name, code) -> None:
    """The interpreter's shutdown after a run (torch's teardown) takes a few tenths of a second; a signal
    then gave 130 or 143 with no line, though the output was complete."""
    script = (
        "import os, signal, sys, time\n"
        "import crnet.commands.cli as cli\n"
        f"cli.main = lambda: sys.exit({code}) if {code} else print('the command ran')\n"
        "from crnet.commands import entry\n"
        "try:\n"
        "    entry.main()\n"
        "finally:  # as the interpreter shuts down\n"
        f"    os.kill(os.getpid(), signal.{signal_name})\n"
        "    time.sleep(10)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stderr == "" and result.stdout == ("" if code else "the command ran\n")


def test_an_interrupt_is_found_among_an_errors_causes() -> None:
    from crnet.errors import interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'") from None
    except AttributeError as error:
        wrapped = RuntimeError("Failed to export the model")
        wrapped.__cause__ = error
    assert interrupted(wrapped)  # through __cause__, then __context__ (kept under `from None`)
    assert not interrupted(RuntimeError("a real failure"))


def test_an_interrupt_a_library_wraps_is_still_one_line_and_exit_130(monkeypatch, capsys) -> None:
    """SIGTERM to the process group stops the data loader's workers too; the loader then raises its own
    RuntimeError while the KeyboardInterrupt is handled. That is an interrupt, not a traceback."""
    import crnet.commands.train as training

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("DataLoader worker (pid 11323) is killed by signal: Terminated.")  # noqa: B904

    monkeypatch.setattr(training, "train", interrupted)
    monkeypatch.setattr(sys, "argv", ["crnet", "train", "--out", "unused_run", "--data", "unused_data"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted"]


LATE_SIGNAL = """
import os, signal, sys
import crnet.commands.cli as cli

class Late:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)

def command():
    sys.modules["__main__"].late = Late()  # torn down with __main__, after Python stopped handling signals

cli.main = command
from crnet.commands import entry
entry.main()
"""


def test_a_signal_late_in_the_shutdown_of_a_finished_command_keeps_its_exit_code() -> None:
    """Past the exit functions Python puts back the default handlers (_PySignal_Fini), and the teardown
    goes on (torch's, ONNX Runtime's): a SIGTERM there ended a finished command with 143 and no line."""
    repo = Path(__file__).parents[2]
    done = subprocess.run(
        [sys.executable, "-c", LATE_SIGNAL],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_a_removed_current_folder_is_one_line(tmp_path) -> None:
    """From a folder removed under it, torch's import failed with oneMKL's line ("cannot load")."""
    repo = Path(__file__).parents[2]
    gone = tmp_path / "gone"
    gone.mkdir()
    command = [sys.executable, "-m", "crnet", "eval", "model.pt"]
    script = f"import os, subprocess, sys; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); "
    script += f"sys.exit(subprocess.run({command!r}).returncode)"
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: the current folder no longer exists; change to another and run again"
    ]


def test_an_argument_that_is_not_utf8_is_one_line(tmp_path) -> None:
    """A file name in another encoding reached ONNX's checker, which takes only text: a traceback."""
    repo = Path(__file__).parents[2]
    out = os.fsencode(tmp_path) + b"/bundle\xff"
    done = subprocess.run(
        [sys.executable, "-m", "crnet", "export", b"model.pt", "--out", out],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not UTF-8 text" in lines[0]
    assert not os.path.lexists(out)


def test_a_failed_compile_is_one_line(monkeypatch, capsys) -> None:
    """torch.compile failing in a compiled runtime (seen: an empty file in inductor's on-disk cache, "file
    too short") was a 106-line traceback."""
    from torch._inductor.exc import InductorError

    from crnet.commands import cli

    def failing(**kwargs):
        raise InductorError(ImportError("/tmp/torchinductor_root/dx/c.main.so: file too short"), None)

    monkeypatch.setattr(cli, "app", failing)
    monkeypatch.setattr(sys, "argv", ["crnet", "infer"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: torch.compile failed (ImportError: ")
    assert "file too short" in lines[0] and "TORCHINDUCTOR_CACHE_DIR" in lines[0]


def test_a_file_written_to_the_json_path_during_eval_is_kept(
    micro_checkpoint, bench_root, tmp_path, monkeypatch, capsys
) -> None:
    """--json was checked at the start only: a file the user saved there during the run was replaced."""
    from crnet.commands import evaluate as evaluation

    json_out = tmp_path / "eval.json"

    def meanwhile(predictor, root, **options):
        json_out.write_text("my notes")  # the user, while eval runs
        return {"fold": 0, "shots": 1, "episodes": 1, "seed": 0, "miou": 1.0, "fbiou": 1.0, "per_class": {}}

    monkeypatch.setattr(evaluation, "evaluate", meanwhile)
    args = ["eval", str(micro_checkpoint), "--data", str(bench_root), "--json", str(json_out)]
    args.append("--no-progress")
    monkeypatch.setattr(sys, "argv", ["crnet", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    stdout, stderr = capsys.readouterr()
    check_user_error(exit_info.value.code, stdout, stderr, "exists and is not an earlier eval results JSON")
    assert json_out.read_text() == "my notes" and list(tmp_path.iterdir()) == [json_out]
