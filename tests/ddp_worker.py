"""A short training run of the micro model on CPU, run by tests/commands/test_train.py as a process of its
own: under torchrun (DDP with gloo), or alone to be killed with SIGKILL.

    python -m tests.ddp_worker ROOT OUT STEPS [CHECKPOINT_EVERY [WORKERS]]
"""

import sys

from crnet.commands.train import train
from crnet.config import TINY, TrainConfig

MICRO = TINY.replace(input_size=33, width=8, blocks=(1, 1, 1), channels=16)


def config(steps: int, checkpoint_every: int = 2, workers: int = 0) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=2, checkpoint_every=checkpoint_every, log_every=1, workers=workers
    )


if __name__ == "__main__":
    root, out, *numbers = sys.argv[1:]
    train(MICRO, config(*map(int, numbers)), root, out, device="cpu", progress=False)
