"""Run by tests/test_train.py under torchrun: a short DDP training run of the micro model on CPU/gloo."""

import sys

from crnet.commands.train import train
from crnet.config import TINY, TrainConfig

MICRO = TINY.replace(input_size=33, width=8, blocks=(1, 1, 1), channels=16)

if __name__ == "__main__":
    root, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = TrainConfig(steps=steps, batch_size=2, checkpoint_every=2, log_every=1, workers=0)
    train(MICRO, config, root, out, device="cpu", progress=False)
