"""Training throughput (episodes/s) of the presets on this machine, measured side by side in one run.

Random tensors stand in for data so that only the model's forward/backward/step is timed (the loader runs
in a worker process during real training). Usage: python benchmarks/train_throughput.py [--threads 2]
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

from crnet.commands.script_args import (
    OneLineParser,
    check_json_output,
    count,
    run,
    starting_torch,
    write_json,
)

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch

    from crnet.config import preset
    from crnet.model.crnet import build_model
    from crnet.model.loss import episode_loss

SCRIPT = "train_throughput"


def episodes_per_second(name: str, batch: int, steps: int, warmup: int) -> float:
    config = preset(name)
    torch.manual_seed(0)
    model = build_model(config).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    size, side = config.input_size, config.feature_size
    query = torch.randn(batch, 3, size, size)
    supports = torch.randn(batch, 1, 3, size, size)
    masks = (torch.rand(batch, 1, size, size) > 0.7).long()
    query_masks = (torch.rand(batch, size, size) > 0.7).long()
    previous = torch.softmax(torch.randn(batch, 2, side, side), 1)
    for i in range(warmup + steps):
        if i == warmup:
            started = time.perf_counter()
        prediction = model(
            query,
            supports,
            masks,
            query_masks,
            iterations=1,
            query_previous=previous,
            support_previous=previous[:, None],
        )
        loss = episode_loss(prediction.query, query_masks) + episode_loss(
            prediction.support[:, 0], masks[:, 0]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = OneLineParser(description=__doc__)
    parser.add_argument("--threads", type=count(1, 1024), default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    shape = {"threads", "torch", "episodes_per_s"}  # what it wrote before the name stamp
    earlier = lambda d: isinstance(d, dict) and d.keys() == shape  # noqa: E731
    check_json_output(args.json, SCRIPT, legacy=earlier)
    torch.set_num_threads(args.threads)
    results = {
        "tiny": episodes_per_second("tiny", batch=8, steps=20, warmup=3),
        "r50": episodes_per_second("r50", batch=2, steps=3, warmup=1),
    }
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    for name, rate in results.items():
        print(f"{name:5s} {rate:8.2f} episodes/s")
    print(f"tiny / r50: {results['tiny'] / results['r50']:.0f}x")
    if args.json:
        document = {"threads": args.threads, "torch": torch.__version__, "episodes_per_s": results}
        write_json(args.json, SCRIPT, document)


if __name__ == "__main__":
    run(main)
