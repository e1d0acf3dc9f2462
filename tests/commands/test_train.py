"""Training: loss goes down, exact resume after an interruption, DDP with two gloo processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crnet import checkpoint
from crnet.commands.train import (
    LAST,
    METRICS,
    RECORD_KEYS,
    PredictionCache,
    dropout_seed,
    episode_indices,
    train,
)
from crnet.config import TrainConfig
from crnet.data.episodes import SampleIndex, TrainingEpisodes
from crnet.data.pascal import VOCTree, base_classes, fold_classes
from crnet.errors import CRNetError
from tests.commands.test_cli import check_user_error
from tests.ddp_worker import MICRO
from tests.ddp_worker import config as worker_config

CONFIG = TrainConfig(steps=6, batch_size=2, checkpoint_every=3, log_every=1, workers=0)


def same_state(a, b) -> bool:
    """Exact equality of nested checkpoint values (dicts, lists, tensors, numbers)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def sigint_at_loss(monkeypatch, n: int):
    """SIGINT to this process at training's `n`th loss (two a step: query and support); returns the real
    loss function."""
    import crnet.commands.train as training

    calls, real_loss = {"n": 0}, training.episode_loss

    def interrupt(*args):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args)

    monkeypatch.setattr(training, "episode_loss", interrupt)
    return real_loss


@pytest.fixture(scope="module")
def straight_run(bench_root, tmp_path_factory):
    return train(MICRO, CONFIG, bench_root, tmp_path_factory.mktemp("straight"), progress=False, device="cpu")


@pytest.mark.parametrize("how", ["signal", "mid-step"])
def test_resume_after_interruption_continues_the_same_run(
    bench_root, straight_run, tmp_path, monkeypatch, how
):
    """SIGINT stops after the current step; an exception inside step 5 undoes the step's side effects."""
    import crnet.commands.train as training

    calls = {"n": 0}
    real_loss = training.episode_loss

    def interrupt(*args):
        calls["n"] += 1
        if how == "signal" and calls["n"] == 7:  # two losses per step: the 7th is in step 4
            os.kill(os.getpid(), signal.SIGINT)
        if how == "mid-step" and calls["n"] == 9:  # step 5, after its forward pass moved BatchNorm stats
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(training, "episode_loss", interrupt)
    said = []
    with pytest.raises(KeyboardInterrupt):
        train(
            MICRO, CONFIG, bench_root, tmp_path / "resumed", progress=False, device="cpu", notice=said.append
        )
    assert said == [f"interrupted at step 4/6; saved {tmp_path / 'resumed' / LAST}, continue with --resume"]
    assert checkpoint.load(tmp_path / "resumed" / LAST)["step"] == 4
    monkeypatch.setattr(training, "episode_loss", real_loss)
    with pytest.raises(CRNetError, match="already holds a run"):
        train(MICRO, CONFIG, bench_root, tmp_path / "resumed", progress=False, device="cpu")
    with pytest.raises(CRNetError, match="settings differ"):
        train(MICRO, CONFIG.replace(lr=1.0), bench_root, tmp_path / "resumed", resume=True, progress=False)
    # another --workers and --checkpoint-every may resume the run: they do not change what it computes
    resumed = CONFIG.replace(workers=1, checkpoint_every=1)
    train(MICRO, resumed, bench_root, tmp_path / "resumed", resume=True, progress=False, device="cpu")

    a = checkpoint.load(straight_run.parent / LAST)
    b = checkpoint.load(tmp_path / "resumed" / LAST)
    for key in ("model", "optimizer", "cache", "rng"):
        assert same_state(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / METRICS).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_an_error_after_the_update_saves_it_as_its_steps(bench_root, tmp_path, monkeypatch):
    """A RuntimeError after optimizer.step() (the caches' gather failing, say) saved the updated weights with
    the step before: a resume applied that update twice. They are saved as the step's own, as a stop after
    that step saves them."""
    import crnet.commands.train as training

    real_loss = sigint_at_loss(monkeypatch, 5)  # the 5th loss is in step 3
    with pytest.raises(KeyboardInterrupt):
        train(MICRO, CONFIG, bench_root, tmp_path / "stopped", progress=False, device="cpu")
    monkeypatch.setattr(training, "episode_loss", real_loss)
    writes, real_write = {"n": 0}, PredictionCache.write

    def fail_in_step_3(self, *args):
        writes["n"] += 1
        if writes["n"] == 3:
            raise RuntimeError("the gather failed")
        return real_write(self, *args)

    monkeypatch.setattr(PredictionCache, "write", fail_in_step_3)
    with pytest.raises(RuntimeError, match="the gather failed"):
        train(MICRO, CONFIG, bench_root, tmp_path / "failed", progress=False, device="cpu")
    a, b = checkpoint.load(tmp_path / "stopped" / LAST), checkpoint.load(tmp_path / "failed" / LAST)
    assert a["step"] == b["step"] == 3
    for key in ("model", "optimizer", "rng"):  # the cache lacks the failed step's predictions
        assert same_state(a[key], b[key]), key
    monkeypatch.setattr(PredictionCache, "write", real_write)
    train(MICRO, CONFIG, bench_root, tmp_path / "failed", resume=True, progress=False, device="cpu")
    assert checkpoint.load(tmp_path / "failed" / LAST)["step"] == 6


def test_a_resumed_run_logs_the_same_losses(bench_root, tmp_path, monkeypatch):
    """Records every 3 steps, stopped at step 4: the resumed run's record at step 6 averages steps 4 to 6,
    as the straight run's does, not only the steps since the resume."""
    import crnet.commands.train as training

    config = CONFIG.replace(log_every=3)
    train(MICRO, config, bench_root, tmp_path / "straight", progress=False, device="cpu")
    real_loss = sigint_at_loss(monkeypatch, 7)  # the 7th loss is in step 4
    with pytest.raises(KeyboardInterrupt):
        train(MICRO, config, bench_root, tmp_path / "resumed", progress=False, device="cpu", notice=print)
    assert len(checkpoint.load(tmp_path / "resumed" / LAST)["window_losses"]) == 1  # step 4's
    monkeypatch.setattr(training, "episode_loss", real_loss)
    train(MICRO, config, bench_root, tmp_path / "resumed", resume=True, progress=False, device="cpu")

    def losses(run: Path) -> list[tuple]:
        records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
        return [(r["step"], r["loss"], r["query_loss"], r["support_loss"]) for r in records]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert [step for step, *_ in losses(tmp_path / "straight")] == [3, 6]


def test_window_losses_of_a_training_state(tmp_path):
    from crnet.commands.train import _window_losses

    config = CONFIG.replace(log_every=3)  # steps 6: records at 3 and 6
    assert _window_losses({"step": 4}, tmp_path, config) == []  # saved before the window was kept
    window = [(1.0, 2, 0.5)]
    assert _window_losses({"step": 4, "window_losses": window}, tmp_path, config) == [(1.0, 2.0, 0.5)]
    assert _window_losses({"step": 6, "window_losses": []}, tmp_path, config) == []
    one = [1.0, 1.0, 1.0]
    for step, bad in [
        (4, "x"),
        (4, [[1.0, 2.0]]),
        (4, [[True, 1.0, 1.0]]),
        (4, [None]),
        (4, [["1", 2, 3]]),
        (4, [[float("nan"), 1.0, 1.0]]),
        (4, [[-1.0, 1.0, 1.0]]),
        (4, [one] * 5000),  # not the steps since the record at 3
        (5, [one]),
        (3, [one]),
    ]:
        with pytest.raises(CRNetError, match="holds no window_losses of its"):
            _window_losses({"step": step, "window_losses": bad}, tmp_path, config)


def test_out_as_a_link_to_nothing_is_named(bench_root, tmp_path):
    (tmp_path / "runs").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CRNetError, match="is a symbolic link to .*elsewhere, which does not exist"):
        train(MICRO, CONFIG, bench_root, tmp_path / "runs", progress=False, device="cpu")
    assert not (tmp_path / "elsewhere").exists()


def test_training_reduces_the_loss(bench_root, tmp_path):
    config = CONFIG.replace(steps=40, batch_size=4, log_every=10, checkpoint_every=1000, lr=5e-3)
    train(MICRO, config, bench_root, tmp_path, progress=False, device="cpu")
    losses = [json.loads(line)["loss"] for line in (tmp_path / METRICS).read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_a_run_that_diverges_stops_and_saves_nothing_non_finite(bench_root, tmp_path, monkeypatch, what):
    """A NaN loss (too high a learning rate), or weights gone non-finite before a checkpoint: one error,
    the checkpoint before it kept as it was, no model.pt. It ended with exit 0 and a model of NaNs."""
    import crnet.commands.train as training

    calls, episode_loss = [], training.episode_loss

    def loss_at(prediction, target):
        calls.append(1)
        loss = episode_loss(prediction, target)
        if what == "loss" and len(calls) > 8:  # two losses a step: step 5 of 6
            return loss * float("nan")
        return loss

    monkeypatch.setattr(training, "episode_loss", loss_at)
    if what == "weights":  # an infinite gradient: the step's loss is finite, the next weights are not
        step = torch.optim.SGD.step

        def step_to_infinity(self, *args, **kwargs):
            result = step(self, *args, **kwargs)
            if len(calls) > 10:  # the last step's: its loss was finite
                with torch.no_grad():
                    self.param_groups[0]["params"][0].fill_(float("inf"))
            return result

        monkeypatch.setattr(torch.optim.SGD, "step", step_to_infinity)
    expected = "at step 5: the loss is" if what == "loss" else "at step 6: the weights are no longer finite"
    with pytest.raises(training.TrainingDiverged, match=f"training diverged {expected}") as stopped:
        train(MICRO, CONFIG.replace(optimizer="sgd"), bench_root, tmp_path, progress=False, device="cpu")
    assert "lower --lr or --weight-decay" in str(stopped.value)
    state = checkpoint.load(tmp_path / LAST)
    assert state["step"] == 3 and all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (tmp_path / "model.pt").exists()


def test_training_without_novel_images(bench_root, tmp_path):
    config = CONFIG.replace(steps=2, exclude_novel_images=True, hue_turns=True)
    train(MICRO, config, bench_root, tmp_path, progress=False, device="cpu")
    state = checkpoint.load(tmp_path / LAST)
    tree = VOCTree(bench_root)
    rule = tree.min_object_pixels
    every = SampleIndex(tree, "train", base_classes(0), rule)
    kept = SampleIndex(tree, "train", base_classes(0), rule, exclude_images_with=fold_classes(0))
    # The run's prediction cache has one slot per kept (image, class) pair: the index it trained on.
    assert len(state["cache"]["seen"]) == len(kept.pairs) < len(every.pairs)
    assert TrainConfig.from_dict(state["train_config"]) == config


def test_training_applies_the_small_object_rule(bench_root, tmp_path):
    """By default a class counts in a training image from the data's rule (25 pixels on this 48-pixel
    benchmark, 2048 at PASCAL's size); --min-object-pixels 1 counts every object."""
    tree = VOCTree(bench_root)
    assert tree.min_object_pixels == round(2048 * 48 * 48 / (500 * 375)) == 25
    slots = {}
    for threshold in (None, 1):
        out = tmp_path / str(threshold)
        train(MICRO, CONFIG.replace(steps=1, min_object_pixels=threshold), bench_root, out, device="cpu")
        slots[threshold] = len(checkpoint.load(out / LAST)["cache"]["seen"])
    base = base_classes(0)
    assert slots[None] == len(SampleIndex(tree, "train", base, 25).pairs) < slots[1]
    assert slots[1] == len(SampleIndex(tree, "train", base, 1).pairs)


def test_prediction_cache_round_trip_with_flips():
    cache = PredictionCache(pairs=3, size=4)
    logits = torch.randn(2, 2, 4, 4)
    index, flips = torch.tensor([0, 2]), torch.tensor([False, True])
    none = torch.tensor([False, False])
    assert torch.equal(cache.read(index, flips, none), torch.zeros(2, 2, 4, 4))  # unseen: zeros
    cache.write(index, flips, logits)
    read = cache.read(index, flips, none)
    expected = torch.softmax(logits, 1)
    torch.testing.assert_close(read, expected, atol=1e-3, rtol=0)  # stored as float16
    assert torch.equal(cache.read(index, flips, torch.tensor([True, False]))[0], torch.zeros(2, 4, 4))
    unflipped = cache.read(index, torch.tensor([False, False]), none)[1]
    torch.testing.assert_close(unflipped, expected[1].flip(-1), atol=1e-3, rtol=0)


def two_ddp_workers(args: list, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """tests/ddp_worker.py ARGS under torchrun, 2 gloo processes, with `env` added to the environment."""
    repo = Path(__file__).parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), **env}
    # --standalone: torchrun picks a free rendezvous port itself, so no other process can take it first.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "tests.ddp_worker", *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=repo)


def test_ddp_two_gloo_processes(bench_root, tmp_path):
    out = tmp_path / "ddp"
    result = two_ddp_workers([bench_root, out, 4], {"LOSSES_TO": str(tmp_path / "losses")}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint.load(out / LAST)
    assert state["step"] == 4 and len(state["rng"]) == 2
    # The log's losses are both processes' mean (it held rank 0's own): query and support loss, each step.
    computed = [json.loads((tmp_path / f"losses.{rank}").read_text()) for rank in (0, 1)]
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for step, record in enumerate(records):
        (q0, s0), (q1, s1) = (losses[2 * step : 2 * step + 2] for losses in computed)
        assert record["query_loss"] == pytest.approx((q0 + q1) / 2, abs=2e-5)
        assert record["support_loss"] == pytest.approx((s0 + s1) / 2, abs=2e-5)
        assert record["loss"] == pytest.approx((q0 + s0 + q1 + s1) / 2, abs=2e-5)
    assert any(abs(c0 - c1) > 1e-3 for c0, c1 in zip(*computed, strict=True))  # the ranks' losses differ

    # Rank 1's cache updates reached rank 0's checkpoint: every pair either rank drew is marked seen.
    tree = VOCTree(bench_root)
    index = SampleIndex(tree, "train", base_classes(0), tree.min_object_pixels)  # as training indexes it
    episodes = TrainingEpisodes(index, 1, seed=0)
    for rank in (0, 1):
        for step in range(4):
            for i in episode_indices(step, 2, rank, 2):
                spec = episodes[i]
                assert state["cache"]["seen"][index.position[(spec.query, spec.class_id)]]
    # The two processes trained one model on twice the data: not what one process alone produces.
    single = train(
        MICRO,
        TrainConfig(steps=4, batch_size=2, workers=0),
        bench_root,
        tmp_path / "single",
        progress=False,
        device="cpu",
    )
    ddp_weights = checkpoint.load(out / "model.pt")["model"]
    single_weights = checkpoint.load(single)["model"]
    assert not torch.equal(
        ddp_weights["refinement.classifier.weight"], single_weights["refinement.classifier.weight"]
    )


def test_a_signal_to_one_ddp_process_stops_every_process_at_one_step(bench_root, tmp_path):
    """SIGTERM to rank 1 alone: it stopped and waited in its checkpoint's collective while rank 0 waited in
    the next step's, until gloo's timeout (30 minutes). The ranks now share the stop with the loss. Through
    `crnet train`: rank 0 says each line once (every rank printed the same lines)."""
    out = tmp_path / "ddp"
    env = {"CLI": "1", "SIGTERM_RANK_1_AT_LOSS": "5"}  # in step 3
    result = two_ddp_workers([bench_root, out, 8, 100], env, timeout=240)
    assert result.returncode != 0  # interrupted
    lines = result.stderr.splitlines()
    assert lines.count(f"interrupted at step 3/8; saved {out / LAST}, continue with --resume") == 1
    assert lines.count("interrupted") == 1
    ours = result.stderr.split("distributed/elastic")[0]  # torchrun's own report and traceback follow
    assert "Traceback" not in ours and ours.count("interrupted") == 2, result.stderr
    state = checkpoint.load(out / LAST)
    assert state["step"] == 3 and len(state["rng"]) == 2


def test_each_process_draws_its_own_dropout_for_every_seed() -> None:
    """Rank 0 keeps --seed; the others' seeds are no other run's (seed + 1000 * rank gave seed 0's rank 1
    seed 1000's rank 0) and fit torch.manual_seed for every 64-bit --seed."""
    assert dropout_seed(7, 0) == 7
    seeds = {(seed, rank): dropout_seed(seed, rank) for seed in (0, 1, 1000, 2**64 - 1) for rank in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= value < 2**64 for value in seeds.values())
    assert dropout_seed(0, 1) == dropout_seed(0, 1)  # a function of (seed, rank) alone
    torch.Generator().manual_seed(dropout_seed(2**64 - 1, 3))


def test_a_data_failure_on_one_ddp_process_stops_every_process_and_saves(bench_root, tmp_path):
    """Rank 1 could not read its 5th episode (step 3): it saved alone, in a collective that rank 0, inside
    the step's all-reduce, never joined, and both waited until gloo's timeout with nothing saved. The ranks
    now share each step's fetch before the step. --seed 2**64 - 1: rank 1's seed (seed + 1000) overflowed
    torch.manual_seed with a traceback."""
    out = tmp_path / "ddp"
    env = {"CLI": "1", "DATA_FAILS_ON_RANK_1_AT_ITEM": "5", "SEED": str(2**64 - 1)}
    result = two_ddp_workers([bench_root, out, 8, 100], env, timeout=240)
    assert result.returncode != 0
    ours = result.stderr.split("distributed/elastic")[0]  # torchrun's own report and traceback follow
    assert "Traceback" not in ours, result.stderr
    lines = ours.splitlines()
    saved = f"saved {out / LAST}, continue with --resume"
    assert f"error: training process 1 could not load its data at step 2: stopped; {saved}" in lines
    assert "error: cannot read image syn_train_000008.jpg: Truncated File Read" in lines  # rank 1's own
    state = checkpoint.load(out / LAST)
    assert state["step"] == 2 and len(state["rng"]) == 2


@pytest.mark.parametrize("failure", ["unreadable image", "worker killed", "worker killed by ctrl-c"])
def test_a_data_failure_saves_the_steps_before_it(bench_root, tmp_path, monkeypatch, failure):
    """An image the loader cannot read left without saving (every step since the last checkpoint lost); a
    loader worker killed outright (out of memory) was said to be an interrupt. Both now save the state
    after the last whole step and say what stopped the run; a worker that died of a Ctrl-C is the
    interrupt it was."""
    import crnet.commands.train as training
    from crnet.data.episodes import EpisodeDataset
    from crnet.errors import ImageReadError

    calls, real_item = [0], EpisodeDataset.__getitem__

    def item(self, index):
        calls[0] += 1
        if calls[0] == 9:  # the first episode of step 5
            if failure == "unreadable image":
                raise ImageReadError("cannot read image x.jpg: Truncated File Read")
            if failure == "worker killed by ctrl-c":
                os.kill(os.getpid(), signal.SIGINT)
            raise RuntimeError("DataLoader worker (pid 7) is killed by signal: Killed. ")
        return real_item(self, index)

    monkeypatch.setattr(training.EpisodeDataset, "__getitem__", item)
    said, out = [], tmp_path / "run"
    expected = {
        "unreadable image": (CRNetError, "cannot read image x.jpg: Truncated File Read"),
        "worker killed": (CRNetError, r"the data loader failed: DataLoader worker \(pid 7\) is killed"),
        "worker killed by ctrl-c": (KeyboardInterrupt, None),
    }[failure]
    with pytest.raises(expected[0], match=expected[1]):
        train(MICRO, CONFIG, bench_root, out, progress=False, device="cpu", notice=said.append)
    how = "interrupted" if failure.endswith("ctrl-c") else "stopped"
    how += " at step 4/6" + ("" if failure.endswith("ctrl-c") else " by the error below")
    assert said == [f"{how}; saved {out / LAST}, continue with --resume"]
    assert checkpoint.load(out / LAST)["step"] == 4
    monkeypatch.setattr(training.EpisodeDataset, "__getitem__", real_item)
    train(MICRO, CONFIG, bench_root, out, resume=True, progress=False, device="cpu")
    assert checkpoint.load(out / LAST)["step"] == 6


def test_a_stop_asked_for_in_the_last_step_finishes_the_run(bench_root, tmp_path, monkeypatch):
    """Ctrl-C in the last step said "interrupted" and left no model.pt, though every step was done."""
    import crnet.commands.train as training

    calls, real_loss = [0], training.episode_loss

    def loss(*args):
        calls[0] += 1
        if calls[0] == 2 * CONFIG.steps - 1:  # in the last step
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args)

    monkeypatch.setattr(training, "episode_loss", loss)
    said = []
    out = tmp_path / "run"
    final = train(MICRO, CONFIG, bench_root, out, progress=False, device="cpu", notice=said.append)
    assert checkpoint.load(final)["step"] == CONFIG.steps and said == []


def test_ctrl_c_during_the_last_saves_keeps_them(bench_root, tmp_path, monkeypatch):
    """A Ctrl-C while the last step's last.pt was written lost the run since its previous save (the default
    handlers were back by then): no last.pt at all before the first periodic one."""
    import crnet.commands.train as training

    real_save = training.checkpoint.save_atomic

    def save(state, path):
        if Path(path).name == LAST and state["step"] == CONFIG.steps:
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(state, path)

    monkeypatch.setattr(training.checkpoint, "save_atomic", save)
    final = train(MICRO, CONFIG, bench_root, tmp_path / "run", progress=False, device="cpu")
    assert checkpoint.load(tmp_path / "run" / LAST)["step"] == CONFIG.steps
    assert checkpoint.load(final)["step"] == CONFIG.steps


def test_a_run_killed_before_its_first_checkpoint_starts_again(bench_root, tmp_path):
    """Killed outright before its first checkpoint, a run leaves only its metrics log: neither a rerun nor
    --resume accepted the folder ("holds other files and no run"), nor did the demo's rerun."""
    out = tmp_path / "run"
    out.mkdir()
    record = {"query_loss": 0.3, "support_loss": 0.2, "lr": 0.001, "episodes_per_s": 9.0, "time": 1.0}
    (out / METRICS).write_text("".join(json.dumps({"step": i, "loss": 0.5} | record) + "\n" for i in (1, 2)))
    with pytest.raises(CRNetError, match="stopped before its first checkpoint: start it again without"):
        train(MICRO, CONFIG, bench_root, out, resume=True, progress=False, device="cpu")
    train(MICRO, CONFIG, bench_root, out, progress=False, device="cpu")
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the stale log replaced, not appended to
    assert all(r.keys() == RECORD_KEYS for r in records)  # what tells crnet's log from another's
    (tmp_path / "mine").mkdir()
    for notes in ("my notes\n", '{"step": 1000, "loss": 0.12, "run": "my resnet"}\n'):  # not crnet's logs
        (tmp_path / "mine" / METRICS).write_text(notes)
        with pytest.raises(CRNetError, match="holds other files and no run"):
            train(MICRO, CONFIG, bench_root, tmp_path / "mine", progress=False, device="cpu")
        assert (tmp_path / "mine" / METRICS).read_text() == notes


def test_a_second_run_into_a_folder_another_run_writes_is_refused(bench_root, tmp_path, monkeypatch):
    """A second `crnet train` into the --out of a run that had logged but not yet saved took the folder as
    an unsaved run: it reset the log, and the two overwrote each other's last.pt."""
    import crnet.commands.train as training

    out, refusals = tmp_path / "run", []
    real_loss = training.episode_loss

    def second_run(*args):  # the second run starts while the first is at its first step
        if not refusals:
            for resume in (False, True):
                with pytest.raises(CRNetError, match="is being written by another crnet train now") as caught:
                    train(MICRO, CONFIG, bench_root, out, resume=resume, progress=False, device="cpu")
                refusals.append(str(caught.value))
        return real_loss(*args)

    monkeypatch.setattr(training, "episode_loss", second_run)
    train(MICRO, CONFIG, bench_root, out, progress=False, device="cpu")
    assert len(refusals) == 2
    steps = [json.loads(line)["step"] for line in (out / METRICS).read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the first run's log, whole
    monkeypatch.setattr(training, "episode_loss", real_loss)  # ended: the folder is free again
    with pytest.raises(CRNetError, match="already holds a run"):
        train(MICRO, CONFIG, bench_root, out, progress=False, device="cpu")


def test_a_run_that_fails_before_writing_leaves_no_folder(bench_root, tmp_path, monkeypatch):
    """On a full disk the first write failed and the run's new, empty folder stayed behind."""
    import crnet.commands.train as training
    from crnet.files import DiskFullError

    def full(path, text):
        raise DiskFullError(f"no space left on the device writing {path}")

    monkeypatch.setattr(training, "_append", full)  # the metrics log, its first write
    with pytest.raises(DiskFullError):
        train(MICRO, CONFIG, bench_root, tmp_path / "new" / "run", progress=False, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_a_resume_on_another_data_tree_is_said(bench_root, tmp_path):
    """A resume with --data naming another tree of as many image-class pairs went on in silence: one run
    trained on two datasets. The checkpoint keeps the tree it was trained on; the resume says so."""
    import shutil

    train(MICRO, CONFIG, bench_root, tmp_path / "run", progress=False, device="cpu")
    said = []
    train(
        MICRO,
        CONFIG,
        bench_root,
        tmp_path / "run",
        resume=True,
        progress=False,
        notice=said.append,
        device="cpu",
    )
    assert not [line for line in said if "warning" in line]
    other = shutil.copytree(bench_root, tmp_path / "other")
    train(
        MICRO, CONFIG, other, tmp_path / "run", resume=True, progress=False, notice=said.append, device="cpu"
    )
    assert [line for line in said if line.startswith("warning")] == [
        f"warning: {tmp_path / 'run' / LAST} was trained on {os.path.realpath(bench_root)}, and this resume "
        f"reads {other}: the run goes on with the data given (its image-class pairs are as many)"
    ]


def test_a_resume_in_another_precision_is_said(bench_root, tmp_path):
    """--precision auto is bf16 on CUDA and fp32 on a CPU: a run resumed on the other kind of device
    changed its forward pass's precision in silence."""
    out = tmp_path / "run"
    train(MICRO, CONFIG, bench_root, out, progress=False, device="cpu")
    state = checkpoint.load(out / LAST)
    assert state["forward"] == "fp32"
    checkpoint.save_atomic({**state, "forward": "bf16"}, out / LAST)  # as a run on a GPU saves it
    said = []
    train(MICRO, CONFIG, bench_root, out, resume=True, progress=False, device="cpu", notice=said.append)
    assert [line for line in said if line.startswith("warning")] == [
        f"warning: {out / LAST} was trained with its forward pass in bf16, and this resume runs it in fp32 "
        "(--precision auto on cpu): the run goes on"
    ]


def test_ctrl_c_stops_a_rendezvous_that_waits_for_a_missing_process(bench_root, tmp_path):
    """A stray WORLD_SIZE=2 in the shell: rank 0 waits for a rank 1 that never comes. It waited in torch's
    C++ for 30 minutes, deaf to Ctrl-C and SIGTERM; now it says what it waits for, and Ctrl-C stops it."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rendezvous = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env = {**os.environ, **rendezvous, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / ".cache")}
    out = tmp_path / "run"
    command = [sys.executable, "-m", "crnet", "train", "--out", str(out), "--data", str(bench_root)]
    command += ["--steps", "1", "--batch-size", "1", "--workers", "0", "--no-progress", "--device", "cpu"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(6)  # well into the wait: loading takes a few seconds
    assert process.poll() is None, process.communicate()[1]
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=30)[1]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.splitlines()[-1] == "interrupted"
    assert not out.exists()


def test_sigkill_between_checkpoints_then_resume_is_bit_exact(bench_root, tmp_path):
    """A run killed outright (no handler runs) and resumed from its last checkpoint ends byte for byte where
    an uninterrupted run of the same seed ends: weights, BatchNorm statistics, optimizer, cache, RNG."""
    steps, every, workers = 16, 4, 1  # one loader process, as the CLI's default
    straight = train(
        MICRO, worker_config(steps, every, workers), bench_root, tmp_path / "straight", device="cpu"
    )
    run = tmp_path / "killed"
    repo = Path(__file__).parents[2]
    command = [
        sys.executable,
        "-m",
        "tests.ddp_worker",
        str(bench_root),
        str(run),
        str(steps),
        str(every),
        "1",
    ]
    # The run holds after its first checkpoint, where it is killed (between it and the next). It uses this
    # process's CPU threads: oneDNN's sums depend on their number, and a test before this one in the same
    # worker may have set it (an in-process `crnet bench` did, on the H200, under OMP_NUM_THREADS=1).
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        "HOLD_AFTER_FIRST_CHECKPOINT": "1",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    process = subprocess.Popen(command, cwd=repo, env=env)
    try:
        while not (run / LAST).exists():
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.005)
    finally:
        process.kill()  # SIGKILL
        process.wait()
    stopped_at = checkpoint.load(run / LAST)["step"]
    assert stopped_at == every
    notices = []
    resumed = train(
        MICRO,
        worker_config(steps, every, workers),
        bench_root,
        run,
        resume=True,
        device="cpu",
        notice=notices.append,
    )
    assert notices == [f"resuming {run} at step {stopped_at} of {steps}"]
    assert resumed.read_bytes() == straight.read_bytes()  # model.pt, byte for byte
    a, b = checkpoint.load(straight.parent / LAST), checkpoint.load(run / LAST)
    for key in ("model", "optimizer", "cache", "rng", "step"):
        assert same_state(a[key], b[key]), key


def test_full_disk_during_a_checkpoint_is_one_line(bench_root, small_disk, tmp_path, monkeypatch, capsys):
    """`crnet train` onto a disk that fills up at the first checkpoint: one error line naming the file,
    exit code 2, no temporary file left (it would keep the disk full)."""
    from crnet.commands import cli
    from tests.places import fill_disk_with, leftovers

    place = small_disk or tmp_path
    if small_disk is None:
        fill_disk_with(monkeypatch, limit=1024 * 1024)
    args = [
        "train",
        "--out",
        str(place / "run"),
        "--data",
        str(bench_root),
        "--steps",
        "3",
        "--batch-size",
        "2",
    ]
    args += ["--checkpoint-every", "1", "--workers", "0", "--device", "cpu", "--no-progress"]
    monkeypatch.setattr(sys, "argv", ["crnet", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    stdout, stderr = capsys.readouterr()
    check_user_error(
        exit_info.value.code, stdout, stderr, f"no space left on the device writing {place / 'run'}"
    )
    assert leftovers(place) == []


def test_a_bad_backbone_weight_file_is_said_before_the_data_is_read(tmp_path):
    """A damaged --backbone-weights file was said only after the training data was indexed (minutes on
    PASCAL): the model is built first, so here the data that does not exist is never reached."""
    (tmp_path / "resnet.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CRNetError, match="cannot read"):
        train(MICRO, CONFIG, tmp_path / "no-data", tmp_path / "run", backbone_weights=tmp_path / "resnet.pth")


def test_each_ddp_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """`--device cuda` under torchrun put every rank on cuda:0, and nothing called torch.cuda.set_device,
    on whose device the checkpoints' object collectives run. The GPU and the process group stubbed."""
    import crnet.commands.train as training

    torchrun = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost"}
    for name, value in (torchrun | {"MASTER_PORT": "29500"}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(training, "resolve_device", torch.device)  # as if the machine had two GPUs
    monkeypatch.setattr(training, "_rendezvous", lambda *args: None)
    monkeypatch.setattr(training.dist, "is_initialized", lambda: False)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    for asked in ("cuda", "cuda:1"):
        assert training.Distributed(asked).device == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)] * 2
    with pytest.raises(CRNetError, match=r"each process takes the GPU of its LOCAL_RANK \(cuda:1 for this"):
        training.Distributed("cuda:0")
    assert training.Distributed("cpu").device == torch.device("cpu") and len(current) == 2
