"""The `crnet` command's first code: Ctrl-C and SIGTERM are handled before anything slow is imported.

Without this, a signal in the first seconds (typer, then torch, loading) was a traceback or a bare exit 143.
"""

import signal
import sys


def _terminated(number, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (`timeout`, a job scheduler) as Ctrl-C: temporaries are cleaned up


def main() -> None:
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        try:
            from crnet.commands.cli import main as run_command
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        run_command()
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
