"""The command line shared by the scripts that time one layer in its variants (stem.py, banded_aspp.py)."""

from __future__ import annotations

import argparse

import torch


def layer_bench_arguments(
    doc: str, batch_help: str, size: int, parser: argparse.ArgumentParser | None = None
) -> tuple[argparse.Namespace, torch.device, torch.dtype]:
    """--batch (repeatable), --size, --repeats, --device, --no-compile, and any arguments `parser` already
    has; returns them with the device and the dtype timed there (FP16 on a GPU, FP32 on a CPU)."""
    parser = parser or argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, action="append", help=batch_help)
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    args = parser.parse_args()
    device = torch.device(args.device)
    return args, device, torch.float16 if device.type == "cuda" else torch.float32
