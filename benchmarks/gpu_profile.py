"""Where an episode's GPU time goes, per runtime: kernels grouped by kind, from torch.profiler (CUPTI records
the kernels inside CUDA-graph replays too).

    python benchmarks/gpu_profile.py CHECKPOINT --spec torch:fp16+anchor --spec ... [--batch 1] [--json F]

For each spec: warm up (compile, capture), then profile `--calls` episodes and as many cached-prompt
queries (`--calls 0`: compile and capture only); prints per call the kernel count, summed kernel time,
the groups below, and the largest kernels.
Random inputs: time does not depend on content.
"""

from __future__ import annotations

import re
from collections import defaultdict
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
    from torch.profiler import ProfilerActivity, profile

    from crnet.checkpoint import load
    from crnet.config import MAX_BATCH
    from crnet.device import resolve_device
    from crnet.engines import RuntimeSpec, open_runtime

SCRIPT = "gpu_profile"

# First match wins; the names are those of cuDNN, cuBLAS/CUTLASS, inductor's Triton kernels and ours.
GROUPS = [
    ("layout conversion", r"nchwToNhwc|nhwcToNchw|transpose|permute"),
    (
        "convolution / matmul",
        r"conv|gemm|sm90|sm80|cutlass|xmma|implicit|wgrad|dgrad|fprop|cudnn|hmma|wgmma|project_classify",
    ),
    ("native op", r"feedback|refine|crnet"),
    ("softmax", r"softmax"),
    ("pooling / reduction", r"pool|reduce|mean|red_"),
    ("copy / cast", r"copy|cast|Memcpy|Memset|cat"),
    ("fused elementwise (triton)", r"^triton_"),
    ("elementwise (aten)", r"elementwise|vectorized|unrolled|clamp|add|relu|mul"),
]


def group(name: str) -> str:
    return next((label for label, pattern in GROUPS if re.search(pattern, name, re.I)), "other")


def kernels(prof) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel and memory operation the profiler saw."""
    out = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            out.append((event.name, event.time_range.elapsed_us()))
    return out


def summarise(found: list[tuple[str, float]], calls: int) -> dict:
    by_group, by_name, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    for name, us in found:
        by_group[group(name)] += us / calls / 1000.0
        by_name[name] += us / calls / 1000.0
        counts[name] += 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {
        "kernels_per_call": len(found) / calls,
        "kernel_ms_per_call": sum(us for _, us in found) / calls / 1000.0,
        "groups_ms": dict(sorted(by_group.items(), key=lambda kv: -kv[1])),
        "top_ms": [{"name": n[:120], "ms": ms, "count_per_call": counts[n] / calls} for n, ms in top],
    }


def profile_spec(checkpoint: str, text: str, batch: int, calls: int, device: str = "cuda") -> dict:
    runtime = open_runtime(RuntimeSpec.parse(text), checkpoint=checkpoint, device=device)
    size = runtime.input_size
    query = torch.randn(batch, 3, size, size, device=device)
    supports = torch.randn(batch, 1, 3, size, size, device=device)
    masks = (torch.rand(batch, 1, size, size, device=device) > 0.5).long()
    prompt = runtime.prompt(runtime.encode(supports.flatten(0, 1)).unflatten(0, (batch, 1)), masks)
    result = {"spec": text, "label": runtime.label, "batch": batch}
    for kind, call in (
        ("episode", lambda: runtime.episode(query, supports, masks)),
        ("query", lambda: runtime.query(query, prompt)),
    ):
        for _ in range(4):  # compile, record the graph, replay
            call()
        if calls == 0:  # --calls 0: compile and capture only (fills inductor's caches for a later run)
            continue
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                call()
            sync()
        result[kind] = summarise(kernels(prof), calls)
    runtime.close()
    return result


def report(result: dict) -> str:
    tuned = ", cudnn.benchmark" if result.get("cudnn_benchmark") else ""
    lines = [f"== {result['label']} ({result['spec']}), batch {result['batch']}{tuned}"]
    for kind in [k for k in ("episode", "query") if k in result]:
        r = result[kind]
        lines.append(
            f"{kind}: {r['kernels_per_call']:.0f} kernels, {r['kernel_ms_per_call']:.3f} ms in kernels"
        )
        lines += [f"    {ms:8.3f} ms  {name}" for name, ms in r["groups_ms"].items()]
        if kind == "episode":
            lines += [
                f"      {t['ms']:7.3f} ms  x{t['count_per_call']:<5.0f} {t['name']}" for t in r["top_ms"]
            ]
    return "\n".join(lines)


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--spec", action="append", required=True)
    parser.add_argument("--batch", type=count(1, MAX_BATCH), default=1)
    parser.add_argument("--calls", type=count(0), default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help="cpu only to check the script: no kernels there")
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms for each shape first"
    )
    args = parser.parse_args()
    # Before the name stamp (2026-11-27) it wrote a bare list of profiles.
    earlier = lambda d: (  # noqa: E731
        isinstance(d, list)
        and d
        and all(isinstance(p, dict) and {"spec", "episode", "query"} <= p.keys() for p in d)
    )
    check_json_output(args.json, SCRIPT, inputs=[args.checkpoint], legacy=earlier)
    device = str(resolve_device(args.device))
    for text in args.spec:  # bad input in one line, not as a failed row
        RuntimeSpec.parse(text)
    load(args.checkpoint)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    results = []
    for text in args.spec:
        try:
            results.append(profile_spec(args.checkpoint, text, args.batch, args.calls, device))
            results[-1]["cudnn_benchmark"] = args.cudnn_benchmark
            print(report(results[-1]), flush=True)
        except Exception as error:  # one spec that fails to compile or capture must not lose the others
            print(f"== {text}: failed: {type(error).__name__}: {error}", flush=True)
        if args.json:  # after every spec: a run cut off at its deadline keeps the specs it finished
            write_json(args.json, SCRIPT, {"profiles": results})


if __name__ == "__main__":
    run(main)
