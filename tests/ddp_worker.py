"""A short training run of the micro model on CPU, run by tests/commands/test_train.py as a process of its
own: under torchrun (DDP with gloo), or alone to be killed with SIGKILL.

    python -m tests.ddp_worker ROOT OUT STEPS [CHECKPOINT_EVERY [WORKERS]]

With HOLD_AFTER_FIRST_CHECKPOINT=1 in its environment the run waits after its first checkpoint, to be
killed there: on a loaded machine the killer may otherwise see that checkpoint only after the last one.
"""

import os
import sys
import time

from crnet import checkpoint
from crnet.commands.train import LAST, train
from crnet.config import TINY, TrainConfig

MICRO = TINY.replace(input_size=33, width=8, blocks=(1, 1, 1), channels=16)


def config(steps: int, checkpoint_every: int = 2, workers: int = 0) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=2, checkpoint_every=checkpoint_every, log_every=1, workers=workers
    )


def hold_after_first_checkpoint() -> None:
    save = checkpoint.save_atomic

    def save_then_hold(state, path):
        written = save(state, path)
        if os.path.basename(path) == LAST:
            time.sleep(600)  # killed here; the sleep only bounds a run nobody kills
        return written

    checkpoint.save_atomic = save_then_hold


if __name__ == "__main__":
    if os.environ.get("HOLD_AFTER_FIRST_CHECKPOINT") == "1":
        hold_after_first_checkpoint()
    root, out, *numbers = sys.argv[1:]
    train(MICRO, config(*map(int, numbers)), root, out, device="cpu", progress=False)
