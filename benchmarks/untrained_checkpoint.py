"""Write a checkpoint of an untrained model of a preset (seed 0), for latency benchmarks that need the
preset's shapes but not its accuracy, e.g. r50 at 321x321 without ImageNet weights:

    python benchmarks/untrained_checkpoint.py --preset r50 --out runs/r50_untrained.pt

--out replaces only an earlier checkpoint of this script (marked "untrained"), never a trained one.
"""

from __future__ import annotations

from pathlib import Path

from crnet.commands.script_args import OneLineParser, count, run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch

    from crnet import checkpoint
    from crnet.config import preset
    from crnet.errors import CRNetError
    from crnet.files import check_writable_file
    from crnet.model.crnet import build_model


def is_untrained_checkpoint(path: Path) -> bool:
    try:
        return "untrained" in checkpoint.load(path)
    except CRNetError:
        return False


def main() -> None:
    parser = OneLineParser(description=__doc__.split(":\n")[0] + ".")
    parser.add_argument("--preset", default="r50", choices=["r50", "tiny"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=count(0, 2**63 - 1), default=0)
    args = parser.parse_args()
    check_writable_file(args.out, option="--out", ours=is_untrained_checkpoint, what="untrained checkpoint")
    config = preset(args.preset)
    torch.manual_seed(args.seed)
    model = build_model(config)
    untrained = {"preset": args.preset, "seed": args.seed}
    state = {"model_config": config.to_dict(), "model": model.state_dict(), "untrained": untrained}
    print(checkpoint.save_atomic(state, args.out))


if __name__ == "__main__":
    run(main)
