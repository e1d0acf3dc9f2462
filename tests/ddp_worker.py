"""A short training run of the micro model on CPU, run by tests/commands/test_train.py as a process of its
own: under torchrun (DDP with gloo), or alone to be killed with SIGKILL.

    python -m tests.ddp_worker ROOT OUT STEPS [CHECKPOINT_EVERY [WORKERS]]

With HOLD_AFTER_FIRST_CHECKPOINT=1 in its environment the run waits after its first checkpoint, to be
killed there: on a loaded machine the killer may otherwise see that checkpoint only after the last one.
With SIGTERM_RANK_1_AT_LOSS=N, rank 1 alone sends itself SIGTERM at its Nth loss (two a step): a signal
that reaches one process of a DDP run. With DATA_FAILS_ON_RANK_1_AT_ITEM=N, rank 1's Nth episode cannot be
read (two a step). With LOSSES_TO=PATH, each rank writes the losses it computed, in order, to PATH.RANK (a
JSON list). With SEED=N, the run's --seed. With CLI=1 it runs `crnet train` on the micro model (as the
tiny preset) with the same settings, as a user's torchrun would.
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
        steps=steps,
        batch_size=2,
        checkpoint_every=checkpoint_every,
        log_every=1,
        workers=workers,
        seed=int(os.environ.get("SEED", "0")),
    )


def hold_after_first_checkpoint() -> None:
    save = checkpoint.save_atomic

    def save_then_hold(state, path):
        written = save(state, path)
        if os.path.basename(path) == LAST:
            time.sleep(600)  # killed here; the sleep only bounds a run nobody kills
        return written

    checkpoint.save_atomic = save_then_hold


def sigterm_at_loss(n: int) -> None:
    import signal

    import crnet.commands.train as training

    calls, real_loss = [0], training.episode_loss

    def loss(*args):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args)

    training.episode_loss = loss


def data_fails_at_item(n: int) -> None:
    from crnet.data.episodes import EpisodeDataset
    from crnet.errors import ImageReadError

    calls, real_item = [0], EpisodeDataset.__getitem__

    def item(self, index):
        calls[0] += 1
        if calls[0] == n:
            raise ImageReadError("cannot read image syn_train_000008.jpg: Truncated File Read")
        return real_item(self, index)

    EpisodeDataset.__getitem__ = item


def record_losses() -> list:
    import crnet.commands.train as training

    computed, real_loss = [], training.episode_loss

    def loss(*args):
        value = real_loss(*args)
        computed.append(value.item())
        return value

    training.episode_loss = loss
    return computed


if __name__ == "__main__":
    computed = record_losses() if "LOSSES_TO" in os.environ else None
    if os.environ.get("HOLD_AFTER_FIRST_CHECKPOINT") == "1":
        hold_after_first_checkpoint()
    if "SIGTERM_RANK_1_AT_LOSS" in os.environ and os.environ.get("RANK") == "1":
        sigterm_at_loss(int(os.environ["SIGTERM_RANK_1_AT_LOSS"]))
    if "DATA_FAILS_ON_RANK_1_AT_ITEM" in os.environ and os.environ.get("RANK") == "1":
        data_fails_at_item(int(os.environ["DATA_FAILS_ON_RANK_1_AT_ITEM"]))
    root, out, *numbers = sys.argv[1:]
    settings = config(*map(int, numbers))
    if os.environ.get("CLI") == "1":
        import crnet.config
        from crnet.commands.entry import main

        crnet.config.preset = lambda name: MICRO
        options = {"steps": settings.steps, "batch-size": settings.batch_size, "workers": settings.workers}
        options |= {"checkpoint-every": settings.checkpoint_every, "seed": settings.seed}
        sys.argv = ["crnet", "train", "--data", root, "--out", out, "--preset", "tiny", "--device", "cpu"]
        sys.argv += ["--no-progress"] + [f"--{name}={value}" for name, value in options.items()]
        main()
    else:
        train(MICRO, settings, root, out, device="cpu", progress=False)
    if computed is not None:
        import json

        with open(f"{os.environ['LOSSES_TO']}.{os.environ.get('RANK', '0')}", "w") as file:
            json.dump(computed, file)
