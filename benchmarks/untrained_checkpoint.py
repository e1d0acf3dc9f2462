"""Write a checkpoint of an untrained model of a preset (seed 0), for latency benchmarks that need the
preset's shapes but not its accuracy, e.g. r50 at 321x321 without ImageNet weights:

    python benchmarks/untrained_checkpoint.py --preset r50 --out runs/r50_untrained.pt
"""

from __future__ import annotations

import argparse

import torch

from crnet.checkpoint import save_atomic
from crnet.config import preset
from crnet.model.crnet import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="r50", choices=["r50", "tiny"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = preset(args.preset)
    torch.manual_seed(args.seed)
    model = build_model(config)
    print(save_atomic({"model_config": config.to_dict(), "model": model.state_dict()}, args.out))


if __name__ == "__main__":
    main()
