"""benchmarks/unreached_tests.py, the GPU machine's second call: which tests a suite cut off at its deadline
left to run, the failed ones again, the slow and GPU ones first."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "unreached_tests.py"


def benchmark_script(path: Path):
    """A script of benchmarks/ as a module (the folder is no package), run anew."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def unreached():
    return benchmark_script(SCRIPT)


LOG = """\
tests/a.py::test_one
[gw3] [ 41%] PASSED tests/a.py::test_one
[gw1] [ 42%] FAILED tests/a.py::test_two[x y]
tests/b.py::test_three SKIPPED [ 50%]
tests/b.py::test_started_then_cut_off
"""


def test_outcomes_reads_both_verbose_forms(unreached) -> None:
    assert unreached.outcomes(LOG) == {
        "tests/a.py::test_one": "PASSED",
        "tests/a.py::test_two[x y]": "FAILED",
        "tests/b.py::test_three": "SKIPPED",
    }


def test_the_rest_is_the_failed_and_the_unreached_slow_ones_first(unreached, tmp_path, monkeypatch) -> None:
    log = tmp_path / "pytest.log"
    log.write_text(LOG)
    every = ["tests/a.py::test_one", "tests/a.py::test_two[x y]", "tests/b.py::test_three"]
    every += ["tests/b.py::test_started_then_cut_off", "tests/c.py::test_slow_compile"]
    slow = ["tests/c.py::test_slow_compile"]
    monkeypatch.setattr(unreached, "collected", lambda *marks: [slow if m else every for m in marks])
    ran = []
    monkeypatch.setattr(unreached.pytest, "main", lambda args: ran.append(args) or 0)
    monkeypatch.setattr(unreached.sys, "argv", ["unreached_tests.py", str(log), "--", "-n", "14"])
    # its sweep of cut-short objects in a folder of the test's: the shared cache may be mid-compile in
    # another test's process, whose file a sweep there could remove before it is loaded
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert unreached.main() == 0
    (args,) = ran
    assert args[-5:-3] == ["-n", "14"]
    assert args[-3:] == [
        "tests/c.py::test_slow_compile",
        "tests/a.py::test_two[x y]",
        "tests/b.py::test_started_then_cut_off",
    ]


def test_a_missing_log_is_one_error_line(unreached, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(unreached.sys, "argv", ["unreached_tests.py", str(tmp_path / "none.log")])
    assert unreached.main() == 2
    assert capsys.readouterr().err.startswith("error: no pytest log at ")
