"""Run the tests that a suite run cut off at its deadline did not reach, and again those that failed in it:
every test pytest collects whose node id has no outcome, or FAILED or ERROR, in that run's verbose log (a
suite stopped at its deadline prints no failure's traceback), the slow and GPU ones first. Verbose itself,
so that its own log, cut off at a deadline, still names what ended. For a GPU machine's second, shorter
call after benchmarks/gpu_check.sh, which keeps its log where this looks first.

    python benchmarks/unreached_tests.py [LOG] [-- PYTEST ARGS...]
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DEFAULT_LOG = Path("/tmp/crnet_gpu_check_pytest.log")
# pytest -v with xdist: "[gw3] [ 41%] PASSED tests/x.py::test[a b]",
# without: "tests/x.py::test[a b] PASSED [ 41%]"
OUTCOME = re.compile(r"^(?:\[gw\d+\] \[\s*\d+%\] )?(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (tests/.+?)\s*$")
OUTCOME_AFTER = re.compile(r"^(tests/.+?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?: +\[\s*\d+%\])?\s*$")


def outcomes(log: str) -> dict[str, str]:
    """Each node id with an outcome in a verbose pytest log, and that outcome."""
    found = {}
    for line in log.splitlines():
        if match := OUTCOME.match(line):
            found[match.group(2)] = match.group(1)
        elif match := OUTCOME_AFTER.match(line):
            found[match.group(1)] = match.group(2)
    return found


def collected(*selections: str | None) -> list[list[str]]:
    """The node ids pytest collects from tests/ for each selection (a -m expression; None: every test), the
    collections run side by side: each takes seconds of the rerun's deadline."""
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
            + (["-m", marks] if marks else [])
            + ["tests"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for marks in selections
    ]
    found = []
    for marks, run in zip(selections, runs, strict=True):
        out = run.communicate()[0]
        if marks is None and run.returncode:  # a selection may match nothing (exit 5); every test may not
            raise subprocess.CalledProcessError(run.returncode, run.args, out)
        found.append([line.strip() for line in out.splitlines() if "::" in line])
    return found


def main() -> int:
    args = sys.argv[1:]
    extra = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    log = Path(args[0]) if args else DEFAULT_LOG
    if not log.is_file():
        print(f"error: no pytest log at {log} (run benchmarks/gpu_check.sh, or name one)", file=sys.stderr)
        return 2
    done = outcomes(log.read_text(errors="replace"))
    failed = [node for node, outcome in done.items() if outcome in ("FAILED", "ERROR")]
    every, slow = collected(None, "slow or cuda")
    rest = [node for node in every if done.get(node, "FAILED") in ("FAILED", "ERROR")]
    # The slow ones first, so that they start at once on the workers: the sixth GPU run's rerun hit its
    # deadline with seven compiling tests started last and still running.
    first = set(slow)
    rest.sort(key=lambda node: node not in first)
    print(f"{len(done)} tests reached in {log}, {len(failed)} of them failed; running those and the", end=" ")
    print(f"{len(rest) - len(failed)} not reached", flush=True)
    # The suite's compiles that its deadline killed mid-write: built again rather than loaded cut short.
    sys.path.insert(0, str(Path(__file__).parent))
    from cut_short_objects import cache_folder, remove_cut_short

    if removed := remove_cut_short(cache_folder()):
        print(f"removed {len(removed)} cut-short shared objects from inductor's cache", flush=True)
    return int(pytest.main(["-p", "no:cacheprovider", "-v", "-rfE", *extra, *rest])) if rest else 0


if __name__ == "__main__":
    sys.exit(main())
