"""The `crnet` command's first and last code: signals are handled before anything slow is imported, and
once the command has ended.

Without this, a signal in the first seconds (typer, then torch, loading) was a traceback or a bare exit
143, and one during the shutdown after a successful run was exit 130 or 143.
"""

import atexit
import contextlib
import fcntl
import os
import signal
import sys


def _open_standard_streams() -> None:
    """A closed stdin, stdout or stderr (`2>&-`), or one open only for reading, is /dev/null instead: else
    the next file opened took its number, and a library's log line written to it landed in that file."""
    for number, writes in ((0, False), (1, True), (2, True)):
        try:
            readonly = fcntl.fcntl(number, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        except OSError:  # closed
            readonly = None
        if readonly is None or (writes and readonly):
            null = os.open(os.devnull, os.O_RDWR)
            if null != number:
                os.dup2(null, number)
                os.close(null)
    if sys.stdout is None:  # Python found the stream closed at start
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


HANDLED = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and SIGTERM (`timeout`, a job scheduler) as Ctrl-C
_ENDED_WITH: list[int] = []  # the exit code, once the command has ended


def _signalled(number, frame) -> None:
    """Ctrl-C, and SIGTERM (`timeout`, a job scheduler) as Ctrl-C, while the command runs: temporaries are
    cleaned up. Once it has ended, its outputs are complete and its exit code decided: a signal during the
    interpreter's shutdown (torch's teardown takes a few tenths of a second) ends the process with that
    code; it gave 130 or 143 with no line, for a run that had succeeded."""
    if not _ENDED_WITH:
        raise KeyboardInterrupt
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(_ENDED_WITH[0])


def _ignore_signals_from_now() -> None:
    """The last exit function (registered first): past it, Python puts back the default handlers of the
    signals it handles (_PySignal_Fini), and a signal during the rest of the teardown (torch's, ONNX
    Runtime's) would end a finished command with 143 and no line. Ignored signals stay ignored."""
    if _ENDED_WITH:
        for number in HANDLED:
            signal.signal(number, signal.SIG_IGN)


def silence_stdout() -> None:
    """Point stdout at /dev/null: its reader has gone, and Python would complain when flushing at exit."""
    with contextlib.suppress(OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def main() -> None:
    _open_standard_streams()
    for number in HANDLED:
        signal.signal(number, _signalled)
    atexit.register(_ignore_signals_from_now)
    try:
        os.getcwd()
    except OSError:  # else torch's first import fails with a foreign line (oneMKL cannot load a library)
        print("error: the current folder no longer exists; change to another and run again", file=sys.stderr)
        _ENDED_WITH.append(2)
        sys.exit(2)
    try:
        from crnet.commands.cli import main as run_command

        run_command()
        _ENDED_WITH.append(0)
    except KeyboardInterrupt:  # while the command loads (typer, then torch), or just as it returns
        print("interrupted", file=sys.stderr)
        _ENDED_WITH.append(130)
        sys.exit(130)
    except SystemExit as done:
        _ENDED_WITH.append(done.code if isinstance(done.code, int) else int(done.code is not None))
        raise
    except BaseException:  # a bug: Python's traceback and exit code
        _ENDED_WITH.append(1)
        raise


if __name__ == "__main__":
    main()
