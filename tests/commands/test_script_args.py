"""The scripts' command line (bench_ops and benchmarks/*.py): crnet's rules for bad input and outputs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crnet.commands.script_args import (
    OneLineParser,
    check_json_output,
    count,
    is_script_json,
    run,
    write_json,
)
from crnet.errors import CRNetError

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "checkpoints" / "tiny_fold0.pt"


def test_count_refuses_in_one_line(capsys) -> None:
    parser = OneLineParser()
    parser.add_argument("--n", type=count(1, 8))
    assert parser.parse_args(["--n", "8"]).n == 8
    for text in ("0", "9", "x", "1.5"):
        with pytest.raises(SystemExit) as stopped:
            parser.parse_args(["--n", text])
        assert stopped.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: argument --n: ")


def test_a_json_replaces_only_its_own_script_s(tmp_path) -> None:
    out = tmp_path / "profile.json"
    check_json_output(out, "gpu_profile")  # nothing there yet
    write_json(out, "gpu_profile", {"profiles": []})
    assert json.loads(out.read_text()) == {"script": "gpu_profile", "profiles": []}
    assert is_script_json(out, "gpu_profile") and not is_script_json(out, "kernel_owners")
    check_json_output(out, "gpu_profile")  # an earlier one of the same script
    with pytest.raises(CRNetError, match="not an earlier kernel_owners JSON"):
        check_json_output(out, "kernel_owners")
    users = tmp_path / "notes.json"
    users.write_text('{"my": "notes"}')
    with pytest.raises(CRNetError, match="not an earlier gpu_profile JSON"):
        check_json_output(users, "gpu_profile")
    assert users.read_text() == '{"my": "notes"}'
    check_json_output(None, "gpu_profile")  # no --json: nothing to check
    before = tmp_path / "old.json"  # written before the stamp: recognised by its shape, where asked
    before.write_text('[{"spec": "torch:fp16"}]')
    check_json_output(before, "gpu_profile", legacy=lambda d: isinstance(d, list))
    with pytest.raises(CRNetError, match="not an earlier gpu_profile JSON"):
        check_json_output(before, "gpu_profile")


def test_run_says_errors_and_interrupts_in_one_line(capsys) -> None:
    def fails():
        raise CRNetError("checkpoint not found: x.pt")

    def interrupted():
        raise KeyboardInterrupt

    cases = ((fails, 2, "error: checkpoint not found: x.pt"), (interrupted, 130, "interrupted"))
    for main, code, line in cases:
        with pytest.raises(SystemExit) as stopped:
            run(main)
        assert stopped.value.code == code and capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("untrained_checkpoint.py", ["--preset", "tiny", "--out", "{precious}"], "not an earlier untrained"),
        ("train_throughput.py", ["--threads", "0"], "argument --threads: 0 is outside 1..1024"),
        ("kernel_owners.py", [str(CHECKPOINT), "--device", "cpu", "--json", "{notes}"], "not an earlier"),
        ("hoisting.py", ["--device", "gpu7"], "unknown device 'gpu7'"),
        (
            "freezing.py",
            [str(CHECKPOINT), "--spec", "torch+compile", "--device", "auto", "--batch", "0"],
            "--batch",
        ),
        ("denormals.py", ["--checkpoint", "{missing}"], "checkpoint not found"),
    ],
    ids=[
        "untrained-over-checkpoint",
        "zero-threads",
        "json-over-notes",
        "bad-device",
        "zero-batch",
        "missing-checkpoint",
    ],
)
def test_benchmark_scripts_refuse_bad_input(tmp_path, script, args, message) -> None:
    """They overwrote a trained checkpoint or a user's JSON without a word, and answered bad arguments with
    tracebacks."""
    precious, notes = tmp_path / "precious.pt", tmp_path / "notes.json"
    precious.write_bytes(CHECKPOINT.read_bytes())
    notes.write_text("the user's")
    names = {"precious": precious, "notes": notes, "missing": tmp_path / "missing.pt"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *(a.format(**names) for a in args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0]
    assert precious.read_bytes() == CHECKPOINT.read_bytes() and notes.read_text() == "the user's"


def _imports_torch(source: str) -> bool:
    return any(
        line.lstrip().startswith(("import torch", "from torch", "from crnet")) for line in source.splitlines()
    )


RUNNABLE = sorted(
    p
    for p in (REPO / "benchmarks").glob("*.py")
    if "__main__" in p.read_text() and _imports_torch(p.read_text())
) + [REPO / "crnet" / "commands" / "bench_ops.py"]


@pytest.mark.parametrize("script", RUNNABLE, ids=lambda p: p.name)
def test_scripts_import_torch_inside_starting_torch(script: Path) -> None:
    """A script that imports torch (or crnet, which does) at the top, outside `starting_torch`, gave torch's
    traceback for a bad TORCH_LOGS."""
    body = ast.parse(script.read_text()).body
    outside = [
        ast.unparse(node)
        for node in body
        if isinstance(node, ast.ImportFrom | ast.Import)
        and (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]
        in ("torch", "crnet", "layer_bench")
        and not (isinstance(node, ast.ImportFrom) and node.module == "crnet.commands.script_args")
    ]
    guarded = [
        node for node in body if isinstance(node, ast.With) and "starting_torch" in ast.unparse(node.items[0])
    ]
    assert guarded and not outside, outside


@pytest.mark.parametrize(
    "command", [["benchmarks/hoisting.py"], ["-m", "crnet.commands.bench_ops"]], ids=["script", "bench_ops"]
)
def test_scripts_say_torch_cannot_start_in_one_line(command) -> None:
    done = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "TORCH_LOGS": "garbage"},
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(
        "error: PyTorch cannot start in this environment: Invalid log settings: garbage"
    )


def test_neck_shapes_times_every_form_of_the_neck_on_a_cpu() -> None:
    """benchmarks/neck_shapes.py, for the GPU run's question (where the layer3 half leaves cuDNN's sm90
    kernels), checked on a CPU: every form of the neck is the concatenating neck's function."""
    done = subprocess.run(
        [sys.executable, "benchmarks/neck_shapes.py", "--preset", "tiny", "--images", "2", "--images", "40"]
        + ["--device", "cpu", "--no-compile", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith(("| 2 |", "| 40 |"))]
    forms = {(row[0].strip("| "), row[1]) for row in rows}
    chunked = {("40", f"fused, chunks of {n} images") for n in (8, 16, 32)}
    assert {("2", "fused (deployed)"), ("40", "split, pieces of 512")} | chunked <= forms
    assert ("2", "fused, chunks of 16 images") not in forms  # no chunk of fewer images than the batch
    assert all(float(row[5].strip(" |")) < 1e-4 for row in rows)
