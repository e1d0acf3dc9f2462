"""Write a checkpoint of an untrained model of a preset (seed 0), for latency benchmarks that need the
preset's shapes but not its accuracy, e.g. r50 at 321x321 without ImageNet weights:

    python benchmarks/untrained_checkpoint.py --preset r50 --out runs/r50_untrained.pt
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from crnet.checkpoint import save_atomic
from crnet.commands.script_args import OneLineParser, count, run
from crnet.config import preset
from crnet.errors import CRNetError
from crnet.files import check_writable_file
from crnet.model.crnet import build_model


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="r50", choices=["r50", "tiny"])
    parser.add_argument("--out", type=Path, required=True, help="a new file (never replaced)")
    parser.add_argument("--seed", type=count(0, 2**63 - 1), default=0)
    args = parser.parse_args()
    # Any file there may be a trained checkpoint of the same name: refused, whatever it holds.
    if os.path.lexists(args.out) and not args.out.is_dir():
        raise CRNetError(f"--out {args.out} exists; give a new file name (this script replaces no file)")
    check_writable_file(args.out, option="--out")
    config = preset(args.preset)
    torch.manual_seed(args.seed)
    model = build_model(config)
    print(save_atomic({"model_config": config.to_dict(), "model": model.state_dict()}, args.out))


if __name__ == "__main__":
    run(main)
