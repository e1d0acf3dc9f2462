"""Which module and op launched each GPU kernel of an episode, with its time: the profile of a compiled row
names kernels (`sm80_xmma_..._indexed_...`: 2.54 ms at batch 64), not the convolution they belong to.

    python benchmarks/kernel_owners.py CHECKPOINT [--spec SPEC] [--batch 64] [--calls 3] [--json F]

The spec is run eagerly: without +compile and +cuda-graphs, whatever it says, so that each kernel has the
CPU op that launched it and the module around that op (a profiler range per module call). cuDNN gets the
same calls as in the compiled graph where our custom op makes them (`crnet::conv_bias_relu`: every
convolution with a fused epilogue); inductor calls plain convolutions without their bias, so those
kernels may differ. Random inputs: time does not depend on content. Prints the kernels by time, each with
its owner; --json writes every one.
"""

from __future__ import annotations

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
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    from crnet.config import MAX_BATCH
    from crnet.device import resolve_device
    from crnet.engines import DEPLOYED_GPU, RuntimeSpec, open_runtime

SCRIPT = "kernel_owners"

EAGER_ONLY = {"compile", "cuda-graphs", "max-autotune", "cudnn-benchmark"}
MODULE_PREFIX = "module: "


def eager(spec: RuntimeSpec) -> RuntimeSpec:
    return RuntimeSpec(spec.name, spec.precision, tuple(o for o in spec.options if o not in EAGER_ONLY))


def name_module_calls(model: torch.nn.Module) -> list:
    """A profiler range around every module call, named by the module's path in the model."""
    handles, open_ranges = [], []

    def enter(name):
        def hook(module, args):
            open_ranges.append(record_function(MODULE_PREFIX + name))
            open_ranges[-1].__enter__()

        return hook

    def leave(module, args, output):
        open_ranges.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name or "model")))
        handles.append(module.register_forward_hook(leave))
    return handles


def launches(prof, device: str):
    """(CPU event, kernel name, microseconds) of each kernel: on a GPU each kernel and the runtime call that
    launched it; on a CPU (a check of the script) each op's own time, as its own launch."""
    for event in prof.events():
        if device != "cpu":
            for kernel in event.kernels:  # on the runtime call that launched it (or on its op)
                yield event, kernel.name, kernel.duration
        elif "::" in event.name and event.self_cpu_time_total > 0:
            yield event, event.name, event.self_cpu_time_total


def owner(event) -> tuple[str, str, str]:
    """(module path, innermost op, its first two input shapes) of a kernel's op and what it runs in."""
    op, shapes, module, parent = "", "", "", event
    while parent is not None:
        if parent.name.startswith(MODULE_PREFIX):
            module = module or parent.name[len(MODULE_PREFIX) :]
        elif not op and "::" in parent.name:
            op = parent.name
            shapes = " ".join("x".join(map(str, s)) for s in parent.input_shapes[:2] if s)
        parent = parent.cpu_parent
    return module or "-", op or "-", shapes


def kernel_owners(checkpoint: str, text: str, batch: int, calls: int, device: str = "cuda") -> dict:
    spec = eager(RuntimeSpec.parse(text))
    runtime = open_runtime(spec, checkpoint=checkpoint, device=device)
    size = runtime.input_size
    query = torch.randn(batch, 3, size, size, device=device)
    supports = torch.randn(batch, 1, 3, size, size, device=device)
    masks = (torch.rand(batch, 1, size, size, device=device) > 0.5).long()
    for _ in range(2):  # cuDNN's plans, the allocator's blocks
        runtime.episode(query, supports, masks)
    handles = name_module_calls(runtime.model)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(calls):
            runtime.episode(query, supports, masks)
        sync()
    for handle in handles:
        handle.remove()
    runtime.close()
    time_ms, count = defaultdict(float), defaultdict(int)
    for event, kernel, us in launches(prof, device):
        key = (*owner(event), kernel)
        time_ms[key] += us / 1000.0 / calls
        count[key] += 1
    rows = [
        {"module": m, "op": o, "shapes": s, "kernel": k, "ms": ms, "calls": count[(m, o, s, k)] / calls}
        for (m, o, s, k), ms in sorted(time_ms.items(), key=lambda kv: -kv[1])
    ]
    total = sum(time_ms.values())
    return {"spec": str(spec), "batch": batch, "kernel_ms_per_episode": total, "kernels": rows}


def report(result: dict, top: int) -> str:
    lines = [
        f"== {result['spec']}, batch {result['batch']}, eager: "
        f"{result['kernel_ms_per_episode']:.3f} ms in kernels per episode"
    ]
    if not result["kernels"]:
        lines.append("no kernel was linked to the call that launched it (the profiler's correlation ids)")
    for row in result["kernels"][:top]:
        lines.append(
            f"{row['ms']:8.3f} ms x{row['calls']:<3.0f} {row['module'][:40]:40} {row['op'][:32]:32} "
            f"{row['shapes'][:36]:36} {row['kernel'][:70]}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--spec", default=DEPLOYED_GPU)
    parser.add_argument("--batch", type=count(1, MAX_BATCH), default=64)
    parser.add_argument("--calls", type=count(1), default=3)
    parser.add_argument("--top", type=count(1), default=40)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help="cpu only to check the script: no kernels there")
    args = parser.parse_args()
    shape = {"spec", "batch", "kernel_ms_per_episode", "kernels"}  # what it wrote before the name stamp
    earlier = lambda d: isinstance(d, dict) and d.keys() == shape  # noqa: E731
    check_json_output(args.json, SCRIPT, inputs=[args.checkpoint], legacy=earlier)
    device = resolve_device(args.device)
    result = kernel_owners(args.checkpoint, args.spec, args.batch, args.calls, device.type)
    print(report(result, args.top), flush=True)
    if args.json:
        write_json(args.json, SCRIPT, result)


if __name__ == "__main__":
    run(main)
