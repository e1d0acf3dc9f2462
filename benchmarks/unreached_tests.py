"""Run the tests that a suite run cut off at its deadline did not reach: every test pytest collects whose node
id has no outcome in that run's verbose log. For a GPU machine's second, shorter call after
benchmarks/gpu_check.sh, which keeps its log where this looks first.

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
OUTCOME = re.compile(
    r"^(?:\[gw\d+\] \[\s*\d+%\] )?(?:PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS) (tests/.+?)\s*$"
)
OUTCOME_AFTER = re.compile(r"^(tests/.+?) (?:PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?: +\[\s*\d+%\])?\s*$")


def reached(log: str) -> set[str]:
    """Node ids with an outcome in a verbose pytest log."""
    ids = set()
    for line in log.splitlines():
        match = OUTCOME.match(line) or OUTCOME_AFTER.match(line)
        if match:
            ids.add(match.group(1))
    return ids


def collected() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if "::" in line]


def main() -> int:
    args = sys.argv[1:]
    extra = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    log = Path(args[0]) if args else DEFAULT_LOG
    done = reached(log.read_text(errors="replace"))
    rest = [node for node in collected() if node not in done]
    print(f"{len(done)} tests reached in {log}, {len(rest)} not", flush=True)
    return int(pytest.main(["-p", "no:cacheprovider", "-rfE", *extra, *rest])) if rest else 0


if __name__ == "__main__":
    sys.exit(main())
