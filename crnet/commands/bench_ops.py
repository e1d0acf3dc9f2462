"""Time crnet::refine_loop against the eager PyTorch loop, side by side in one run.

    python -m crnet.commands.bench_ops [--batch 1] [--iterations 5] [--repeats 20] [--threads 2] [--json F]

Shapes are the r50 head's (256 channels, 41x41, dilations 6/12/18) with random weights; the feedback and
classifier weights are scaled up so that masks move between iterations as in a trained model. Eager and
fused calls alternate, so both see the same machine state. On CUDA (when present) it also runs FP16 and
batch 16. Reports medians, the speed-up, whether the masks are identical, and the largest logit error.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from crnet import ops
from crnet.files import write_text
from crnet.model.refinement import Refinement

CHANNELS, SIDE, DILATIONS = 256, 41, (6, 12, 18)


def head(device: str, dtype: torch.dtype, seed: int = 0) -> Refinement:
    torch.manual_seed(seed)
    module = Refinement(CHANNELS, DILATIONS, fused=False).eval()
    with torch.no_grad():
        module.feedback[1].weight[:, CHANNELS:] *= 30
        module.classifier.weight *= 10
    return module.to(device, dtype)


def timed(call, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(device: str, dtype: torch.dtype, batch: int, iterations: int, repeats: int, warmup: int) -> dict:
    module = head(device, dtype)
    torch.manual_seed(1)
    x = torch.randn(batch, CHANNELS, SIDE, SIDE).to(device, dtype)
    weights = module.op_weights()

    def eager():
        return module.run(x, iterations, fused=False)[0]

    def fused():
        return ops.refine_loop(x, None, weights, DILATIONS, iterations)[0]

    with torch.no_grad():
        for _ in range(warmup):
            eager(), fused()
        times = {"eager": [], "fused": []}
        for _ in range(repeats):
            times["eager"].append(timed(eager, device))
            times["fused"].append(timed(fused, device))
        reference = eager().float()
        result = fused().float()
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    masks_equal = torch.equal(reference.argmax(1), result.argmax(1))
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "iterations": iterations,
        "eager_ms": round(median["eager"], 2),
        "fused_ms": round(median["fused"], 2),
        "speedup": round(median["eager"] / median["fused"], 2),
        "masks_identical": masks_equal,
        "mask_agreement": (reference.argmax(1) == result.argmax(1)).float().mean().item(),
        "max_logit_error": (reference - result).abs().max().item(),
        "max_logit": reference.abs().max().item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not ops.AVAILABLE:
        raise SystemExit(f"error: {ops.MISSING}")
    torch.set_num_threads(args.threads)
    runs = [compare("cpu", torch.float32, args.batch, args.iterations, args.repeats, args.warmup)]
    if torch.cuda.is_available():
        for dtype in (torch.float16, torch.float32):
            for batch in (1, 16):
                runs.append(compare("cuda", dtype, batch, args.iterations, args.repeats * 5, args.warmup * 5))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    print(f"refinement loop, {CHANNELS}x{SIDE}x{SIDE}, T={args.iterations}; {args.threads} CPU threads")
    print("| device | dtype | batch | eager ms | fused ms | speed-up | masks identical | max logit error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        masks = "yes" if r["masks_identical"] else f"no ({r['mask_agreement']:.4%})"
        print(
            f"| {r['device']} | {r['dtype']} | {r['batch']} | {r['eager_ms']:.2f} | {r['fused_ms']:.2f} | "
            f"{r['speedup']:.2f}x | {masks} | "
            f"{r['max_logit_error']:.2e} (of {r['max_logit']:.2f}) |"
        )
    if args.json:
        write_text(args.json, json.dumps({"machine": machine, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
