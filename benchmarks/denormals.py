"""Does flushing denormal floats change the torch runtime's CPU speed here? Encode the same random images
in fresh processes, with and without `torch.set_flush_denormal(True)` (the order swapped every round: the
second process of a pair runs slower), and print the medians.

    python benchmarks/denormals.py [--checkpoint checkpoints/tiny_fold0.pt] [--rounds 4] [--calls 5]
"""

from __future__ import annotations

import statistics
import subprocess
import sys

from crnet.commands.script_args import OneLineParser, count, run, starting_torch

with starting_torch():  # a bad TORCH_LOGS or PYTORCH_JIT: one line, not torch's traceback
    from crnet.checkpoint import load

CHILD = """
import sys, time, torch
from crnet.engines import RuntimeSpec, open_runtime
torch.set_flush_denormal(sys.argv[2] == "flush")
torch.set_num_threads(2)
runtime = open_runtime(RuntimeSpec.parse("torch:fp32"), checkpoint=sys.argv[1])
size = runtime.input_size
torch.manual_seed(0)
images = torch.randn(2, 3, size, size)
runtime.encode(images)  # warm-up
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    runtime.encode(images)
    print((time.perf_counter() - start) * 1000)
"""


def main() -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/tiny_fold0.pt")
    parser.add_argument("--rounds", type=count(1), default=4)
    parser.add_argument("--calls", type=count(1), default=5)
    args = parser.parse_args()
    load(args.checkpoint)  # a missing or foreign checkpoint in one line, not in the child's traceback
    times = {"plain": [], "flush": []}
    for round_ in range(args.rounds):
        for mode in ("plain", "flush")[:: 1 if round_ % 2 == 0 else -1]:  # the second of a pair runs slower
            out = subprocess.run(
                [sys.executable, "-c", CHILD, args.checkpoint, mode, str(args.calls)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            times[mode] += [float(line) for line in out.split()]
    for mode, values in times.items():
        print(
            f"{mode}: encode of 2 random images, median {statistics.median(values):.1f} ms over {len(values)}"
        )
    print(f"plain / flush: {statistics.median(times['plain']) / statistics.median(times['flush']):.2f}x")


if __name__ == "__main__":
    run(main)
