"""Where the paper is silent, CaNet's code or ours? One factor at a time, on the built-in benchmark.

    python benchmarks/canet_ablation.py --data ~/.cache/crnet/synthetic-v2 --out runs/ablation [--variant ...]

Each variant trains the `tiny` preset on one budget and changes one thing; every variant is then evaluated
on the same 1000 fold-0 episodes (1-shot, seed 0, the default protocol). The budget is the committed
recipe (crnet.commands.demo.RECIPE: AdamW, batch 4, novel-class images dropped) with the default
small-object rule, in fp32 and 3200 steps, so that one variant trains in under 15 minutes on 2 CPU cores
without native bfloat16 (where the recipe's bf16 is emulated and slow). A finished variant is not trained
again; an interrupted one resumes. The table and a JSON (ablation.json) go to --out.
"""

from __future__ import annotations

import time
from pathlib import Path

from crnet.commands.script_args import OneLineParser, check_json_output, count, starting_torch, write_json
from crnet.commands.script_args import run as run_script

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch

    from crnet import checkpoint
    from crnet.commands.demo import RECIPE
    from crnet.commands.evaluate import CRNetPredictor, evaluate
    from crnet.commands.train import FINAL, LAST, train
    from crnet.config import TINY

BUDGET = RECIPE.replace(steps=3200, precision="fp32", min_object_pixels=None)

# name -> (what changes, model config, training config)
SCRIPT = "canet_ablation"
VARIANTS = {
    "ours": ("crnet as committed", TINY, BUDGET),
    "canet-condition": (
        "condition as CaNet's layer55: ReLU + Dropout2d(0.5) after the fusing conv, no residual block",
        TINY.replace(fusion_activation=True, fusion_dropout=0.5, condition_residual=False),
        BUDGET,
    ),
    "canet-history": (
        "history mask kept 30% of the time, as CaNet (reset probability 0.7)",
        TINY,
        BUDGET.replace(reset_probability=0.7),
    ),
    "canet-head-dropout": (
        "Dropout2d(0.5) on every ASPP branch and the projection, as CaNet",
        TINY.replace(head_dropout=0.5),
        BUDGET,
    ),
}


def run(name: str, data: Path, out: Path, episodes: int) -> dict:
    change, model_config, train_config = VARIANTS[name]
    folder = out / name
    started = time.perf_counter()
    if not (folder / FINAL).is_file():
        resume = (folder / LAST).is_file()
        train(model_config, train_config, data, folder, resume=resume, device="cpu", progress=False)
    seconds = time.perf_counter() - started
    state = checkpoint.load(folder / FINAL)
    model = checkpoint.model_from_state(state, folder / FINAL)
    result = evaluate(
        CRNetPredictor(model, torch.device("cpu")),
        data,
        fold=train_config.fold,
        input_size=model_config.input_size,
        episodes=episodes,
        progress=False,
    )
    return {"variant": name, "change": change, "train_seconds_this_run": round(seconds, 1), **result}


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    parser.add_argument("--episodes", type=count(1), default=1000)
    args = parser.parse_args()
    # Before the name stamp it wrote a bare list of rows.
    earlier = lambda d: isinstance(d, list) and d and all(isinstance(r, dict) and "variant" in r for r in d)  # noqa: E731
    check_json_output(args.out / "ablation.json", SCRIPT, inputs=[args.data], option="--out", legacy=earlier)
    torch.set_num_threads(2)
    # Denormal floats flushed to zero, for every variant alike: without it CaNet's condition variant trained
    # at 0.4 episodes/s on the CPU without AVX-512, against 14 for ours (docs/BENCHMARKS.md).
    torch.set_flush_denormal(True)
    rows = [run(name, args.data, args.out, args.episodes) for name in args.variant or VARIANTS]
    print("| variant | change | mIoU | FB-IoU | per class |")
    print("|---|---|---|---|---|")
    for row in rows:
        per_class = ", ".join(f"{v:.1f}" for v in row["per_class"].values())
        print(
            f"| {row['variant']} | {row['change']} | {row['miou']:.1f} | {row['fbiou']:.1f} | {per_class} |"
        )
    write_json(args.out / "ablation.json", SCRIPT, {"rows": rows})


if __name__ == "__main__":
    run_script(main)
