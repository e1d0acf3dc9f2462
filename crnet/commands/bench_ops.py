"""Time crnet::refine_loop against the eager PyTorch loop, side by side in one run.

    python -m crnet.commands.bench_ops [--batch 1] [--iterations 5] [--repeats 20] [--warmup 3] [--threads 2]
        [--json F]

Shapes are the r50 head's (256 channels, 41x41, dilations 6/12/18) with random weights; the feedback and
classifier weights are scaled up so that masks move between iterations as in a trained model. Eager and
fused calls alternate, so both see the same machine state. On CUDA (when present) it also runs FP16 and
batch 16. Reports medians, the speed-up, whether the masks are identical, and the largest logit error.

On CUDA it then measures what deployment runs: GPU time per call under CUDA-graph replay (CUDA events over
many replays), FP16 channels-last, batch 1 and 64, of the native op against the eager loop compiled by
torch.compile (the best a user gets without the op), with the op's own epilogue kernels and with cuDNN's
fused convolution-bias-ReLU (`cudnn_epilogues`). A call that cannot be captured is reported, not fatal.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from crnet.commands.script_args import OneLineParser, count, run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch

    from crnet import ops
    from crnet.commands.timer import Timer, medians_in_turns
    from crnet.config import MAX_ITERATIONS
    from crnet.engines.cuda_graphs import capture_cuda_graph
    from crnet.errors import CRNetError
    from crnet.files import check_writable_file, parse_json, write_text
    from crnet.model.refinement import Refinement

CHANNELS, SIDE, DILATIONS = 256, 41, (6, 12, 18)
SCHEMA = "crnet-bench-ops-1"


def is_ops_json(path: Path) -> bool:
    """An earlier --json of this module: the only file it replaces."""
    try:
        document = parse_json(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and (
        document.get("schema") == SCHEMA or document.keys() == {"machine", "runs", "replayed"}  # schema-less
    )


def head(device: str, dtype: torch.dtype, seed: int = 0) -> Refinement:
    torch.manual_seed(seed)
    module = Refinement(CHANNELS, DILATIONS, fused=False).eval()
    with torch.no_grad():
        module.feedback[1].weight[:, CHANNELS:] *= 30
        module.classifier.weight *= 10
    return module.to(device, dtype)


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
        # wall time, launch gaps included: what an uncaptured call costs
        median = medians_in_turns({"eager": eager, "fused": fused}, Timer(torch.device(device)), repeats)
        reference = eager().float()
        result = fused().float()
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


def replayed_ms(call, x: torch.Tensor, replays: int) -> tuple[float, torch.Tensor]:
    """GPU ms per `call(x)`, captured as one CUDA graph and replayed `replays` times, and its output."""
    replay, output = capture_cuda_graph(call, [x])  # as the deployed rows capture
    replay()
    _, gpu_seconds = Timer(torch.device("cuda"))(lambda: [replay() for _ in range(replays)])
    return gpu_seconds * 1000.0 / replays, output


def compare_replayed(batch: int, iterations: int, replays: int) -> dict:
    """FP16 channels-last on CUDA: the native op against the torch.compile'd eager loop, both replayed."""
    module = head("cuda", torch.float16).to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    x = torch.randn(batch, CHANNELS, SIDE, SIDE).to("cuda", torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    weights = module.op_weights()
    compiled = torch.compile(lambda t: module.run(t, iterations, fused=False)[0], dynamic=False)
    calls = {
        "compiled_eager": compiled,
        "fused": lambda t: ops.refine_loop(t, None, weights, DILATIONS, iterations)[0],
        "fused_cudnn": lambda t: ops.refine_loop(
            t, None, weights, DILATIONS, iterations, cudnn_epilogues=True
        )[0],
    }
    result, outputs = {"batch": batch, "iterations": iterations, "replays": replays}, {}
    with torch.no_grad():
        reference = head("cuda", torch.float32).run(x.float(), iterations, fused=False)[0]  # same seed
        for name, call in calls.items():
            try:
                result[f"{name}_gpu_ms"], outputs[name] = replayed_ms(call, x, replays)
            except Exception as error:  # a capture that fails is the finding: report it
                result[f"{name}_gpu_ms"], result[f"{name}_error"] = None, f"{type(error).__name__}: {error}"
    for name, output in outputs.items():
        agree = (output.float().argmax(1) == reference.argmax(1)).float().mean().item()
        result[f"{name}_mask_agreement_with_fp32"] = agree
    for name in ("fused", "fused_cudnn"):
        if result["compiled_eager_gpu_ms"] and result[f"{name}_gpu_ms"]:
            suffix = "" if name == "fused" else "_cudnn"
            result[f"speedup{suffix}"] = result["compiled_eager_gpu_ms"] / result[f"{name}_gpu_ms"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=count(1, 1024), default=1, help="episodes per call (default 1)")
    parser.add_argument(
        "--iterations", type=count(1, MAX_ITERATIONS), default=5, help="refinement iterations T (default 5)"
    )
    parser.add_argument("--repeats", type=count(1), default=20, help="timed calls of each (default 20)")
    parser.add_argument("--warmup", type=count(0), default=3, help="untimed calls first (default 3)")
    parser.add_argument("--threads", type=count(1, 1024), default=2, help="CPU threads (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.json:  # before the run, not after minutes of it
        check_writable_file(args.json, ours=is_ops_json, what="bench_ops JSON")
    if not ops.AVAILABLE:
        raise CRNetError(ops.MISSING)
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
    replayed = []
    if torch.cuda.is_available():
        replayed = [compare_replayed(batch, args.iterations, 200) for batch in (1, 64)]
        print("\nGPU time per call under CUDA-graph replay, fp16 channels-last (200 replays)")
        print(
            "| batch | torch.compile eager loop ms | native op ms | native op, cuDNN epilogues ms | speed-up "
            "| speed-up, cuDNN epilogues | mask agreement vs fp32 |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in replayed:
            cells = [
                str(r["batch"]),
                *(
                    f"{r[f'{n}_gpu_ms']:.3f}" if r[f"{n}_gpu_ms"] else r[f"{n}_error"][:80]
                    for n in ("compiled_eager", "fused", "fused_cudnn")
                ),
                *(f"{r[k]:.2f}x" if k in r else "-" for k in ("speedup", "speedup_cudnn")),
                ", ".join(f"{r[k]:.4%}" for k in sorted(r) if k.endswith("agreement_with_fp32")),
            ]
            print("| " + " | ".join(cells) + " |")
    if args.json:
        document = {"schema": SCHEMA, "machine": machine, "runs": runs, "replayed": replayed}
        write_text(args.json, json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    run(main)
