"""The command line of `python -m crnet.commands.bench_ops` and of the scripts in benchmarks/: crnet's rules
for them too. Bad arguments get one `error:` line and exit 2; a JSON output replaces only an earlier one of
the same script (the scripts stamp theirs with their name, bench_ops its with a schema); Ctrl-C and SIGTERM
end with "interrupted", 130."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from crnet.errors import CRNetError, one_line, torch_start_failure
from crnet.files import check_writable_file, parse_json, write_text


def empty_argument(arguments: list[str]) -> str | None:
    """Where an empty string is given, which no crnet option or argument takes: as a path it would mean
    the current folder (`--data ""` was refused as an output inside the input ".")."""
    for index, argument in enumerate(arguments):
        name, equals, value = argument.partition("=")
        if argument.startswith("--") and equals and not value:
            return f"{name} has an empty value"
        if argument == "":
            return f"an empty argument after {arguments[index - 1]}" if index else "an empty argument"
    return None


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments as crnet's commands say them: one `error:` line, exit 2 (argparse prints its usage)."""

    def parse_args(self, args=None, namespace=None):
        if empty := empty_argument(sys.argv[1:] if args is None else list(args)):
            self.error(f"{empty} (an unset shell variable?); give a path or a value")
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], refused in one line otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high if high is not None else ''}")
        return value

    return parse


def is_script_json(path: Path, script: str, legacy: Callable[[object], bool] | None = None) -> bool:
    """Whether `path` is an earlier JSON of `script` (stamped with its name, or one `legacy` recognises)."""
    try:
        document = parse_json(path.read_text())
    except (OSError, ValueError):
        return False
    stamped = isinstance(document, dict) and document.get("script") == script
    return stamped or (legacy is not None and legacy(document))


def check_json_output(
    path: Path | None,
    script: str,
    inputs=(),
    option: str = "--json",
    legacy: Callable[[object], bool] | None = None,
) -> None:
    """Before the run, not after minutes of it: `path` can be written and holds nothing but an earlier
    JSON of this script (stamped, or one `legacy` recognises as written before the stamp)."""
    if path is not None:
        ours = lambda p: is_script_json(p, script, legacy)  # noqa: E731 - a predicate, named by its use
        check_writable_file(path, inputs, option, ours, f"{script} JSON")


def write_json(path: Path, script: str, document: dict) -> None:
    """The document, stamped with the script's name, written whole or not at all."""
    write_text(path, json.dumps({"script": script} | document, indent=1) + "\n")


@contextmanager
def starting_torch() -> Iterator[None]:
    """Around a script's imports: PyTorch failing to start (its TORCH_LOGS, TORCH_LOGS_OUT and PYTORCH_JIT
    are read at import) is one `error:` line and exit 2, as in crnet's commands."""
    try:
        yield
    except Exception as error:
        if failure := torch_start_failure(error):
            print(f"error: {failure}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


def _interrupted(number, frame) -> NoReturn:
    raise KeyboardInterrupt


def run(main: Callable[[], object]) -> None:
    """Run a script's main as crnet runs a command: a CRNetError is its one `error:` line (exit 2), Ctrl-C
    and SIGTERM print "interrupted" (exit 130)."""
    previous = signal.signal(signal.SIGTERM, _interrupted)
    try:
        main()
    except CRNetError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
