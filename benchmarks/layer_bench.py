"""The command line shared by the scripts that time one layer in its variants (stem.py, banded_aspp.py)."""

from __future__ import annotations

import argparse

from crnet.commands.script_args import OneLineParser, count, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch

    from crnet.config import MAX_BATCH
    from crnet.device import resolve_device


def script_parser(doc: str) -> OneLineParser:
    """A parser for a script whose docstring is its help, kept as written."""
    return OneLineParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def layer_bench_arguments(
    doc: str, batch_help: str, size: int, parser: argparse.ArgumentParser | None = None
) -> tuple[argparse.Namespace, torch.device, torch.dtype]:
    """--batch (repeatable), --size, --repeats, --device, --no-compile, and any arguments `parser` already
    has; returns them with the device and the dtype timed there (FP16 on a GPU, FP32 on a CPU)."""
    parser = parser or script_parser(doc)
    parser.add_argument("--batch", type=count(1, MAX_BATCH), action="append", help=batch_help)
    parser.add_argument("--size", type=count(1, 4096), default=size)
    parser.add_argument("--repeats", type=count(1), default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    args = parser.parse_args()
    device = resolve_device(args.device)
    return args, device, torch.float16 if device.type == "cuda" else torch.float32
