"""What hoisting the iteration-invariant terms out of the PyTorch refinement loop saves: the loop as the paper
writes it against the hoisted inference loop (crnet/model/refinement.py), at the r50 head's shapes (256
channels, 41x41, T=5), with random weights, calls alternating so both see the same machine state.

Rows: FLOPs (counted); on the CPU torch eager and ONNX Runtime (each loop exported as a graph of its own);
on a GPU (`--device cuda`) torch FP16 channels-last eager and compiled with CUDA graphs, in GPU time.

    python benchmarks/hoisting.py [--device cpu|cuda] [--batch 1] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from crnet.commands.script_args import OneLineParser, count, run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from crnet.commands.timer import Timer, medians_in_turns
    from crnet.config import MAX_BATCH, MAX_ITERATIONS
    from crnet.device import resolve_device
    from crnet.engines.cuda_graphs import CapturedCalls
    from crnet.model.refinement import Refinement

CHANNELS, SIDE, DILATIONS = 256, 41, (6, 12, 18)


class Loop(torch.nn.Module):
    """One refinement loop, hoisted or as written, as a module to export."""

    def __init__(self, refinement: Refinement, hoist: bool, iterations: int):
        super().__init__()
        self.refinement, self.hoist, self.iterations = refinement, hoist, iterations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.refinement.hoist = self.hoist
        return self.refinement(x, self.iterations)


def side_by_side(calls: dict, timer: Timer, repeats: int, gpu: bool = False) -> dict[str, float]:
    """Median ms of each call, alternating after two warm-up calls each; GPU time where asked for."""
    for call in calls.values():
        call()
        call()
    return medians_in_turns(calls, timer, repeats, gpu=gpu)


def row(label: str, medians: dict[str, float]) -> str:
    ratio = medians["literal"] / medians["hoisted"]
    return f"| {label} | {medians['literal']:.2f} | {medians['hoisted']:.2f} | {ratio:.2f}x |"


@torch.no_grad()
def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=count(1, MAX_BATCH), default=1)
    parser.add_argument("--iterations", type=count(1, MAX_ITERATIONS), default=5)
    parser.add_argument("--repeats", type=count(1), default=10)
    parser.add_argument("--threads", type=count(1, 1024), default=2)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    refinement = Refinement(CHANNELS, DILATIONS, fused=False).eval()
    x = torch.randn(args.batch, CHANNELS, SIDE, SIDE)
    loops = {name: Loop(refinement, name == "hoisted", args.iterations) for name in ("literal", "hoisted")}
    error = (loops["literal"](x) - loops["hoisted"](x)).abs().max().item()

    print(f"refinement loop, {CHANNELS}x{SIDE}x{SIDE}, batch {args.batch}, T={args.iterations}")
    print("| runtime | as written (ms) | hoisted (ms) | saving |")
    print("|---|---|---|---|")
    flops = {}
    for name, loop in loops.items():
        with FlopCounterMode(display=False) as counter:
            loop(x)
        flops[name] = counter.get_total_flops() / 1e9
    ratio = flops["literal"] / flops["hoisted"]
    print(f"| GFLOP (counted) | {flops['literal']:.1f} | {flops['hoisted']:.1f} | {ratio:.2f}x |")
    if device.type == "cpu":
        cpu_rows(loops, x, args.threads, args.repeats)
    else:
        gpu_rows(refinement, loops, x, device, args.repeats)
    print(f"max |logit difference| FP32 CPU, as written vs hoisted: {error:.2e}")


def cpu_rows(loops: dict[str, Loop], x: torch.Tensor, threads: int, repeats: int) -> None:
    timer = Timer(torch.device("cpu"))
    eager = {name: (lambda loop=loop: loop(x)) for name, loop in loops.items()}
    print(row(f"torch fp32 eager, CPU ({threads} threads)", side_by_side(eager, timer, repeats)))
    try:
        import onnxruntime as ort
    except ImportError:
        print("| onnxruntime | not installed | | |")
        return
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sessions = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, loop in loops.items():
            path = Path(folder) / f"{name}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # exporter chatter
                program = torch.onnx.export(
                    loop, (x,), input_names=["x"], opset_version=18, dynamo=True, verbose=False
                )
            program.save(str(path))
            sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    calls = {name: (lambda s=session: s.run(None, feed)) for name, session in sessions.items()}
    print(row(f"onnxruntime fp32, CPU ({threads} threads)", side_by_side(calls, timer, repeats)))


def gpu_rows(
    refinement: Refinement, loops: dict[str, Loop], x: torch.Tensor, device: torch.device, repeats: int
):
    timer = Timer(device)
    refinement.to(device, torch.float16).to(memory_format=torch.channels_last)
    x = x.to(device, torch.float16).contiguous(memory_format=torch.channels_last)
    eager = {name: (lambda loop=loop: loop(x)) for name, loop in loops.items()}
    print(row("torch fp16 channels-last eager (GPU time)", side_by_side(eager, timer, repeats, True)))
    compiled = {}
    for name, loop in loops.items():  # as the deployed rows run: inductor's code, captured as one graph
        graph = CapturedCalls(torch.compile(loop, dynamic=False), torch.device(device))
        compiled[name] = lambda graph=graph: graph(x)
    medians = side_by_side(compiled, timer, repeats, True)
    print(row("torch fp16 channels-last compiled + CUDA graphs (GPU time)", medians))


if __name__ == "__main__":
    run(main)
