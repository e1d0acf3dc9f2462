"""Episodic training on the base classes of a fold: poly LR, cached previous predictions, atomic
checkpoints with exact resume, DDP when launched by torchrun.

Previous-prediction cache (CaNet's history mask: icoz69/CaNet, train.py stores each sample's softmax in
dataset.history_mask_list, dataset_mask_train.py feeds it back): each training (image, class) pair
remembers the model's last foreground probability for it; the refinement is trained for one step from that
cached prediction, or from zeros with probability `reset_probability`, so one step learns to improve any
earlier mask.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext, suppress
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from crnet import checkpoint
from crnet.config import ModelConfig, TrainConfig
from crnet.data.episodes import EpisodeDataset, SampleIndex, TrainingEpisodes, collate
from crnet.data.pascal import VOCTree, base_classes, fold_classes
from crnet.device import resolve_device
from crnet.errors import CRNetError, InputError, TrainingDiverged
from crnet.files import (
    FolderBusyError,
    OutputError,
    check_not_input,
    explain,
    only_writer,
    parse_json,
    write_text,
)
from crnet.model.crnet import build_model
from crnet.model.loss import episode_loss

LAST = "last.pt"  # full training state, for resume
FINAL = "model.pt"  # model only, for eval and export
METRICS = "metrics.jsonl"


class PredictionCache:
    """Last foreground probability per training (image, class) pair, stored unflipped at feature size."""

    def __init__(self, pairs: int, size: int):
        self.probability = torch.zeros(pairs, size, size, dtype=torch.float16)
        self.seen = torch.zeros(pairs, dtype=torch.bool)

    def read(self, index: torch.Tensor, flip: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
        """(N,) pair indices -> (N, 2, h, w) previous probabilities; zeros for unseen or reset pairs."""
        foreground = self.probability[index].float()
        foreground = torch.where(flip[:, None, None], foreground.flip(-1), foreground)
        keep = (self.seen[index] & ~reset).float()[:, None, None]
        foreground = foreground * keep
        return torch.stack([(1 - foreground) * keep, foreground], dim=1)

    def write(self, index: torch.Tensor, flip: torch.Tensor, logits: torch.Tensor) -> None:
        foreground = torch.softmax(logits.detach().float(), dim=1)[:, 1].cpu()
        foreground = torch.where(flip[:, None, None], foreground.flip(-1), foreground)
        self.probability[index] = foreground.half()
        self.seen[index] = True

    def state_dict(self) -> dict:
        return {"probability": self.probability, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.probability.copy_(state["probability"])
        self.seen.copy_(state["seen"])


def episode_indices(step: int, batch: int, rank: int, world: int) -> list[int]:
    """Global episode indices of one step on one process: disjoint across processes and steps."""
    start = (step * world + rank) * batch
    return list(range(start, start + batch))


class StepBatches:
    """Batch sampler from a start step: resuming at step s draws exactly the batches s, s+1, ..."""

    def __init__(self, start: int, steps: int, batch: int, rank: int, world: int):
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield episode_indices(step, self.batch, self.rank, self.world)

    def __len__(self) -> int:
        return self.steps - self.start


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def poly_lr(config: TrainConfig, step: int) -> float:
    return config.lr * (1 - step / config.steps) ** config.poly_power


def forward_precision(precision: str, device: torch.device) -> str:
    """What --precision makes of the forward pass on this device: "bf16" or "fp32" (auto: bf16 on CUDA)."""
    return "bf16" if precision == "bf16" or (precision == "auto" and device.type == "cuda") else "fp32"


def training_autocast(forward: str, device: torch.device):
    """The forward pass's autocast context for its precision (forward_precision); the loss, gradients and
    weights stay FP32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if forward == "bf16" else nullcontext()


def reset_flags(config: TrainConfig, indices: list[int], shots: int) -> torch.Tensor:
    """Per episode (query, supports...) whether the cached prediction is replaced by zeros."""
    draws = [np.random.default_rng([config.seed, i, 1]).random(shots + 1) for i in indices]
    return torch.from_numpy(np.stack(draws) < config.reset_probability)


class Distributed:
    """Process group from torchrun's environment; a single process is world size 1."""

    def __init__(self, device: str | None, notice: Callable[[str], None] = lambda line: None):
        self.world = _environment_number("WORLD_SIZE", "1", 1, MAX_WORLD)
        self.rank = _environment_number("RANK", "0", 0, MAX_WORLD)
        local_rank = _environment_number("LOCAL_RANK", "0", 0, MAX_WORLD)
        if self.rank >= self.world:
            raise CRNetError(f"RANK={self.rank} with WORLD_SIZE={self.world}: RANK must be below WORLD_SIZE")
        # init_process_group reads the rendezvous address from these, and fails with a traceback without them
        unset = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if self.world > 1 and unset and not dist.is_initialized():
            raise CRNetError(
                f"WORLD_SIZE={self.world} but {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} "
                "not set: start multi-process training with torchrun"
            )
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = resolve_device(str(device))  # "cuda" without a GPU: one line, not torch's assertion
        if self.world > 1 and self.device.type == "cuda":
            # One GPU a process, the one torchrun numbers on its machine: "cuda" put every rank on cuda:0
            # (NCCL does not take one device as several ranks), and the object collectives of the
            # checkpoints run on the current device, which torch.distributed leaves to torch.cuda.set_device.
            if self.device.index is None:
                self.device = resolve_device(f"cuda:{local_rank}")
            elif self.device.index != local_rank:
                raise CRNetError(
                    f"--device {self.device} under torchrun: each process takes the GPU of its LOCAL_RANK "
                    f"(cuda:{local_rank} for this one); pass --device cuda"
                )
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            _rendezvous("nccl" if self.device.type == "cuda" else "gloo", self.world, notice)
        self.active = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a tensor from every rank in rank order (the tensor itself when single-process)."""
        if not self.active:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def gather_objects(self, value) -> list:
        if not self.active:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


MAX_WORLD = 2**20  # processes: far past any cluster, inside the int32 that torch's store takes
RENDEZVOUS_NOTICE_S = 10  # a rendezvous slower than this is said: a stray WORLD_SIZE would wait in silence


def follower_rank() -> bool:
    """Whether this process is a torchrun rank other than 0: rank 0 speaks for the run, the others say only
    their errors (every rank printed the same lines). A stray value is Distributed's to report."""
    try:
        return int(os.environ.get("RANK", "0")) > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _environment_number(name: str, default: str, least: int, most: int) -> int:
    """A whole number that torchrun puts in the environment; a user's stray value is an error line."""
    text = os.environ.get(name, default)
    try:
        value = int(text)
    except ValueError:
        raise CRNetError(f"{name}={text!r} is not a number; crnet train reads it from torchrun") from None
    if not least <= value <= most:
        raise CRNetError(f"{name}={value} must be {least} to {most}; crnet train reads it from torchrun")
    return value


def _rendezvous(backend: str, world: int, notice: Callable[[str], None]) -> None:
    """init_process_group, with the rendezvous address checked first and Ctrl-C heard while it waits: it
    blocks in C++ (for up to 30 minutes while a process is missing), where Python's signal handlers do not
    run, so it waits in a thread of its own and this one keeps listening."""
    import socket

    address, port = os.environ["MASTER_ADDR"], _environment_number("MASTER_PORT", "", 1, 65535)
    try:
        socket.getaddrinfo(address, None)
    except (OSError, UnicodeError):
        raise CRNetError(
            f"MASTER_ADDR={address!r} does not resolve; start multi-process training with torchrun"
        ) from None
    failed: list[BaseException] = []

    def start() -> None:
        try:
            dist.init_process_group(backend)
        except BaseException as error:  # reported by the waiting thread
            failed.append(error)

    thread = threading.Thread(target=start, name="crnet-rendezvous", daemon=True)
    thread.start()
    said = time.monotonic() + RENDEZVOUS_NOTICE_S
    while thread.is_alive():
        thread.join(0.2)  # a signal's handler runs between these waits
        if said is not None and time.monotonic() > said:
            notice(
                f"waiting for all {world} processes (WORLD_SIZE) to join at {address}:{port}; Ctrl-C stops"
            )
            said = None
    if failed:
        lines = str(failed[0]).strip().splitlines() or [type(failed[0]).__name__]
        raise CRNetError(f"the process group did not start at {address}:{port}: {lines[0]}") from None


# Settings a resume may change: they decide how fast the data loads and how often the run is saved, not
# what it computes (an episode depends on (seed, index) alone; the loader's workers draw no randomness).
FREE_ON_RESUME = ("workers", "checkpoint_every")


def _check_same_run(stored: dict, model_config: ModelConfig, train_config: TrainConfig) -> None:
    for name, given, saved in (
        ("model", model_config.to_dict(), ModelConfig.from_dict(stored["model_config"]).to_dict()),
        ("training", train_config.to_dict(), TrainConfig.from_dict(stored["train_config"]).to_dict()),
    ):  # through the dataclasses, so fields added since the checkpoint was written take their defaults
        saved = {k: list(v) if isinstance(v, tuple) else v for k, v in saved.items()}
        given = {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}
        changed = sorted(
            k for k in set(given) | set(saved) if given.get(k) != saved.get(k) and k not in FREE_ON_RESUME
        )
        if changed:
            raise CRNetError(
                f"cannot resume: the {name} settings differ from the checkpoint's ({', '.join(changed)})"
            )


# What last.pt holds beyond a model.pt: the state that makes a resumed run continue exactly.
TRAINING_STATE = ("model_config", "train_config", "step", "model", "optimizer", "cache", "rng")


def _check_resumable(stored: dict, path: Path, model_config: ModelConfig, train_config: TrainConfig) -> None:
    """CRNetError unless `stored` is a training state of this very run (same settings) to continue."""
    if "model_config" in stored and "train_config" in stored:  # changed settings are the likelier mistake
        _check_same_run(stored, model_config, train_config)
    missing = [key for key in TRAINING_STATE if key not in stored]
    if missing:
        raise CRNetError(
            f"cannot resume: {path} is not a training state that can be resumed (it has no "
            f"{', '.join(missing)}; a model.pt holds weights only)"
        )
    step = stored["step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= train_config.steps):
        raise CRNetError(f"cannot resume: {path} has step {step!r}, not one of 0..{train_config.steps}")


def _window_losses(stored: dict, path: Path, config: TrainConfig) -> list[tuple[float, float, float]]:
    """The (loss, query, support) losses of the steps since the last metrics record, as saved: one per
    step since it, each finite and >= 0. None from a state saved before they were kept (that run's next
    record averages the steps since the resume)."""
    if "window_losses" not in stored:
        return []
    window, step = stored["window_losses"], stored["step"]
    since_record = 0 if step == config.steps else step % config.log_every
    if not (
        isinstance(window, list)
        and len(window) == since_record
        and all(
            isinstance(losses, list | tuple)
            and len(losses) == 3
            and all(type(x) in (int, float) and 0 <= x < math.inf for x in losses)
            for losses in window
        )
    ):
        raise CRNetError(
            f"cannot resume: {path} holds no window_losses of its {since_record} steps since the last "
            "metrics record (finite losses, three a step)"
        )
    return [tuple(float(x) for x in losses) for losses in window]


def _append(path: Path, line: str) -> None:
    try:
        with open(path, "a") as log:
            log.write(line)
    except OSError as error:
        raise explain(error, path) from None


def _metrics_until(path: Path, step: int) -> str | None:
    """The log's lines up to `step`, so that a resumed run's log has no duplicate steps; None without a log.
    Read before anything is written: a damaged line is an error naming it, and the run is left as it was."""
    if not path.is_file():
        return None
    kept = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode()
            if not line.strip():
                continue
            logged = parse_json(line)["step"]
            if not isinstance(logged, int | float) or isinstance(logged, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError):  # ValueError: not UTF-8, not JSON
            raise CRNetError(
                f"cannot resume: {path} line {number} is not a metrics record with a step; "
                "repair or delete that line"
            ) from None
        if logged <= step:
            kept.append(line + "\n")
    return "".join(kept)


def train(
    model_config: ModelConfig,
    config: TrainConfig,
    data_root: str | Path,
    out_dir: str | Path,
    *,
    backbone_weights: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    notice: Callable[[str], None] = lambda line: None,
    how_to_continue: str = "continue with --resume",
) -> Path:
    """Train; returns the path of the final model checkpoint. Ctrl-C or SIGTERM saves before exiting (and
    says `how_to_continue`); a run killed outright resumes from its last checkpoint exactly as if it had not
    stopped. One run at a time writes a run directory: a second is refused while the first holds it."""
    made = [p for p in (*reversed(Path(out_dir).parents), Path(out_dir)) if not p.exists()]
    try:
        with ExitStack() as held:
            return _train(
                model_config,
                config,
                data_root,
                out_dir,
                held,
                backbone_weights=backbone_weights,
                resume=resume,
                device=device,
                progress=progress,
                notice=notice,
                how_to_continue=how_to_continue,
            )
    except FolderBusyError:  # the folder is the other run's, which may not have written in it yet
        raise
    except BaseException:
        for folder in reversed(made):  # the folders this run made, where it failed before writing in them
            with suppress(OSError):
                folder.rmdir()
        raise


def _train(
    model_config: ModelConfig,
    config: TrainConfig,
    data_root: str | Path,
    out_dir: str | Path,
    held: ExitStack,
    *,
    backbone_weights: str | Path | None,
    resume: bool,
    device: str | None,
    progress: bool,
    notice: Callable[[str], None],
    how_to_continue: str,
) -> Path:
    """train(), holding the run directory's lock in `held` from when the directory exists."""
    if not (isinstance(model_config, ModelConfig) and isinstance(config, TrainConfig)):
        raise InputError(
            "train(model_config, config, ...) takes a ModelConfig (crnet.preset('tiny')) and a TrainConfig, "
            f"got {type(model_config).__name__} and {type(config).__name__}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file; training writes a run directory there")
    check_not_input(out_dir, [data_root] + ([backbone_weights] if backbone_weights else []))
    if out_dir.is_symlink() and not out_dir.exists():  # else "cannot write: File exists"
        raise OutputError(
            f"--out {out_dir} is a symbolic link to {os.readlink(out_dir)}, which does not exist; create "
            "that folder or give another --out"
        )
    # Under torchrun rank 0 writes the run directory. Locked before its state is read where it exists
    # (another run may be writing it), else once made.
    locked = _environment_number("RANK", "0", 0, MAX_WORLD) == 0 and out_dir.is_dir()
    if locked:
        held.enter_context(only_writer(out_dir, "crnet train"))
    unsaved = unsaved_run(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / LAST).exists() and not unsaved:
        raise OutputError(f"--out {out_dir} holds other files and no run; choose a new or empty folder")
    if (out_dir / LAST).exists() and not resume:
        raise CRNetError(f"{out_dir} already holds a run; pass --resume to continue it or pick another --out")
    if resume and not (out_dir / LAST).exists():
        stopped = " (its run stopped before its first checkpoint: start it again without --resume)"
        raise CRNetError(f"nothing to resume: {out_dir / LAST} does not exist{stopped if unsaved else ''}")
    stored = checkpoint.load(out_dir / LAST) if resume else None
    # the log up to the resumed step (empty: a run killed before its first checkpoint starts afresh), and
    # the losses since its last record
    metrics, window = ("" if unsaved else None), []
    if stored is not None:
        _check_resumable(stored, out_dir / LAST, model_config, config)
        metrics = _metrics_until(out_dir / METRICS, stored["step"])
        window = _window_losses(stored, out_dir / LAST, config)

    group = Distributed(device, notice)
    forward = forward_precision(config.precision, group.device)  # "bf16" or "fp32"
    saved_by = len(stored["rng"]) if stored is not None and isinstance(stored["rng"], list) else None
    if stored is not None and saved_by != group.world:  # each process resumes its own random state
        raise CRNetError(
            f"cannot resume: {out_dir / LAST} was saved by {saved_by} training processes, and this run has "
            f"{group.world}; resume it with as many (torchrun --nproc_per_node {saved_by})"
        )
    # the model first: a bad --backbone-weights file is said before the data is indexed (minutes on PASCAL)
    torch.manual_seed(config.seed)  # identical initial weights on every process
    model = build_model(model_config, backbone_weights=backbone_weights).to(group.device)
    tree = VOCTree(data_root)
    caution = tree.check_training_list()
    if caution and group.main:
        notice(f"warning: {caution}")
    excluded = fold_classes(config.fold) if config.exclude_novel_images else ()
    threshold = tree.object_threshold(config.min_object_pixels)
    index = SampleIndex(tree, "train", base_classes(config.fold), threshold, exclude_images_with=excluded)
    episodes = TrainingEpisodes(index, config.shots, config.seed, config.flip, hue_turns=config.hue_turns)
    dataset = EpisodeDataset(tree, index, episodes, model_config.input_size)
    cache = PredictionCache(len(index.pairs), model_config.feature_size)
    optimizer = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    start = 0
    if stored is not None:
        model.load_state_dict(stored["model"])
        optimizer.load_state_dict(stored["optimizer"])
        saved_pairs = len(stored["cache"]["probability"])
        if saved_pairs != len(index.pairs):  # the cached predictions are per training pair
            raise CRNetError(
                f"cannot resume: the training data changed since {out_dir / LAST} was saved ({saved_pairs} "
                f"image-class pairs then, {len(index.pairs)} now); resume it on the same data"
            )
        saved_on = stored.get("data")  # runs saved before 2026-11-27 do not say
        if group.main and saved_on is not None and saved_on != os.path.realpath(data_root):
            notice(
                f"warning: {out_dir / LAST} was trained on {saved_on}, and this resume reads {data_root}: "
                "the run goes on with the data given (its image-class pairs are as many)"
            )
        saved_forward = stored.get("forward")
        if group.main and saved_forward not in (None, forward):  # --precision auto on another device
            notice(
                f"warning: {out_dir / LAST} was trained with its forward pass in {saved_forward}, and this "
                f"resume runs it in {forward} (--precision {config.precision} on {group.device.type}): the "
                "run goes on"
            )
        cache.load_state_dict(stored["cache"])
        _set_rng_state(stored["rng"][group.rank], group.device)
        start = stored["step"]
        if group.main:
            notice(f"resuming {out_dir} at step {start} of {config.steps}")
    else:
        torch.manual_seed(dropout_seed(config.seed, group.rank))
    network = model
    if group.active:
        network = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[group.device.index] if group.device.type == "cuda" else None
        )

    def weights(step: int) -> dict:
        """What model.pt holds; last.pt holds it and the state to continue from."""
        return {
            "model_config": model_config.to_dict(),
            "train_config": config.to_dict(),
            "step": step,
            "model": model.state_dict(),
        }

    def save(step: int, rng_state: dict | None = None) -> None:
        if not all(torch.isfinite(p).all() for p in model.parameters()):  # the same on every rank
            raise diverged(step, "the weights are no longer finite")
        rng = group.gather_objects(rng_state or _rng_state(group.device))
        if group.main:
            checkpoint.save_atomic(
                {
                    **weights(step),
                    "optimizer": optimizer.state_dict(),
                    "cache": cache.state_dict(),
                    "rng": rng,
                    # The losses since the last metrics record: the next record averages its whole window.
                    "window_losses": losses,
                    "data": os.path.realpath(data_root),  # a resume on another tree is said
                    "forward": forward,  # a resume in another precision is said
                },
                out_dir / LAST,
            )
        group.barrier()

    if group.main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise explain(error, out_dir) from None
        if not locked:
            held.enter_context(only_writer(out_dir, "crnet train"))
        if metrics is not None:
            write_text(out_dir / METRICS, metrics)
    # The loader gets its own generator: drawing worker seeds from the global one would shift dropout.
    loader = DataLoader(
        dataset,
        batch_sampler=StepBatches(start, config.steps, config.batch_size, group.rank, group.world),
        num_workers=config.workers,
        generator=torch.Generator().manual_seed(config.seed),
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=4 if config.workers else None,
    )
    autocast = training_autocast(forward, group.device)
    stop = _StopRequest()
    step, window_start, window_episodes, losses = start, time.perf_counter(), 0, window
    model.train()
    bar = _progress(progress and group.main, start, config.steps)
    step_start = None  # (rng, buffers) while a step is under way: an interrupted step is redone from it
    batches = iter(loader)
    try:
        for _ in range(start, config.steps):
            batch, failure = _fetch(batches)
            # Every rank's fetch shared before the step's collectives: a rank whose data failed (an image it
            # cannot read, a loader worker that died) stops every rank here, after the last whole step; alone,
            # it waited in the checkpoint's collective while the others waited in the step's all-reduce.
            _share_failure(group, failure, stop.requested)
            step_start = (_rng_state(group.device), {k: b.clone() for k, b in model.named_buffers()})
            indices = episode_indices(step, config.batch_size, group.rank, group.world)
            reset = reset_flags(config, indices, config.shots)
            shots = config.shots
            support_index = batch["support_index"].flatten()
            support_flips = batch["support_flips"].flatten()
            query_previous = cache.read(batch["query_index"], batch["query_flip"], reset[:, 0])
            support_previous = cache.read(support_index, support_flips, reset[:, 1:].flatten())
            support_previous = support_previous.unflatten(0, (-1, shots))
            to = {"device": group.device, "non_blocking": True}
            for param_group in optimizer.param_groups:
                param_group["lr"] = poly_lr(config, step)
            with autocast:
                prediction = network(
                    batch["query_image"].to(**to),
                    batch["support_images"].to(**to),
                    batch["support_masks"].to(**to),
                    batch["query_mask"].to(**to),
                    iterations=1,
                    query_previous=query_previous.to(**to),
                    support_previous=support_previous.to(**to),
                )
            query_loss = episode_loss(prediction.query, batch["query_mask"].to(**to))
            support_loss = episode_loss(
                prediction.support.flatten(0, 1), batch["support_masks"].flatten(0, 1).to(**to)
            )
            loss = query_loss + support_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # The update is applied: from here the step counts as done, so that an error below (a failed
            # gather) saves these weights as this step's, not the last's (a resume would apply it twice).
            step, step_start = step + 1, None

            # Every process applies every process's updates in rank order: the caches stay identical.
            written = torch.cat([batch["query_index"], support_index]).to(group.device)
            flips = torch.cat([batch["query_flip"], support_flips]).to(group.device, torch.uint8)
            logits = torch.cat([prediction.query, prediction.support.flatten(0, 1)]).detach().float()
            cache.write(group.gather(written).cpu(), group.gather(flips).cpu().bool(), group.gather(logits))
            # Each rank's losses and whether a signal asked it to stop, in one gather: the log records the
            # mean over ranks (it recorded rank 0's own), and every rank stops at the same step (a rank
            # stopping alone would wait in a collective the others never join), or none does.
            asked = torch.tensor(float(stop.requested), device=group.device)
            mine = torch.stack(
                [loss.detach().float(), query_loss.detach().float(), support_loss.detach().float()]
            )
            shared = group.gather(torch.cat([mine, asked[None]])).view(-1, 4).cpu()
            every_loss, stopping = shared[:, 0], bool(shared[:, 3].any())
            losses.append(tuple(shared[:, :3].mean(0).tolist()))
            if not torch.isfinite(every_loss).all():
                bar.close()
                raise diverged(step, f"the loss is {every_loss.tolist()}")
            window_episodes += config.batch_size * group.world
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - window_start
                mean = np.mean(losses, axis=0)
                record = {
                    "step": step,
                    "loss": round(float(mean[0]), 5),
                    "query_loss": round(float(mean[1]), 5),
                    "support_loss": round(float(mean[2]), 5),
                    "lr": poly_lr(config, step - 1),
                    "episodes_per_s": round(window_episodes / elapsed, 2),
                    "time": time.time(),
                }
                if group.main:
                    _append(out_dir / METRICS, json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{mean[0]:.3f}", eps=f"{record['episodes_per_s']:.1f}")
                window_start, window_episodes, losses = time.perf_counter(), 0, []
            if stopping and step < config.steps:  # a stop asked for in the last step: the run is done
                raise KeyboardInterrupt
            if step % config.checkpoint_every == 0 and step < config.steps:
                save(step)
    except (KeyboardInterrupt, RuntimeError, _DataFailed) as error:
        # The state after the last completed step is saved before leaving, whatever stopped the run.
        rng = None
        if step_start is not None:  # a step was cut short: undo its BatchNorm statistics and RNG draws
            rng, buffers = step_start
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        save(step, rng)
        bar.close()
        saved = f"saved {out_dir / LAST}, {how_to_continue}"
        # Ctrl-C and SIGTERM also stop the loader workers: a fetch that failed while a stop was asked for
        # is that interrupt.
        if isinstance(error, _DataFailed) and not error.interrupted:
            if error.failure is None:
                raise CRNetError(
                    f"training process {error.rank} could not load its data at step {step}: stopped; {saved}"
                ) from None
            notice(f"stopped at step {step}/{config.steps} by the error below; {saved}")
            if isinstance(error.failure, CRNetError):
                raise error.failure from None
            first = (str(error.failure).strip().splitlines() or [type(error.failure).__name__])[0]
            raise CRNetError(f"the data loader failed: {first} (fewer --workers if memory ran out)") from None
        if isinstance(error, RuntimeError):
            raise
        # Said, then the interrupt goes on: the CLI's "interrupted" and exit code 130, as for any command.
        notice(f"interrupted at step {step}/{config.steps}; {saved}")
        raise KeyboardInterrupt from None
    else:  # the last step's saves under the same shield: Ctrl-C during them lost the run since its last save
        bar.close()
        save(step)
        final = out_dir / FINAL
        if group.main:
            checkpoint.save_atomic(weights(step), final)
    finally:
        stop.close()
    group.barrier()
    group.close()
    return final


def unsaved_run(out_dir: Path) -> bool:
    """Whether `out_dir` holds only the metrics log of a run stopped (killed outright) before its first
    checkpoint: crnet's own output, which a new run replaces."""
    try:
        if {path.name for path in out_dir.iterdir()} != {METRICS}:
            return False
        records = [parse_json(line) for line in (out_dir / METRICS).read_text().splitlines() if line]
    except (OSError, ValueError):
        return False
    return bool(records) and all(isinstance(r, dict) and r.keys() >= RECORD_KEYS for r in records)


# What every record of crnet's metrics log holds: another tool's log of steps and losses is not crnet's.
RECORD_KEYS = {"step", "loss", "query_loss", "support_loss", "lr", "episodes_per_s", "time"}


class _DataFailed(Exception):
    """A step's data could not be loaded on some rank: `failure`, this rank's error or None (another rank's,
    the first such `rank`); `interrupted`, whether a stop was asked for on any rank."""

    def __init__(self, failure: Exception | None, rank: int, interrupted: bool):
        super().__init__(str(failure))
        self.failure, self.rank, self.interrupted = failure, rank, interrupted


def dropout_seed(seed: int, rank: int) -> int:
    """The seed of a process's own draws (dropout), which differ across processes: rank 0 keeps --seed, the
    others a 64-bit hash of (seed, rank). seed + 1000 * rank gave seed 0's rank 1 the draws of seed 1000's
    rank 0."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def _share_failure(group, failure: Exception | None, stop_requested: bool) -> None:
    """Raise _DataFailed on every rank if some rank's fetch failed. Alone, no tensor and no device sync."""
    if not group.active:
        if failure is not None:
            raise _DataFailed(failure, group.rank, stop_requested)
        return
    votes = group.gather(
        torch.tensor([float(failure is not None), float(stop_requested)], device=group.device)
    )
    if votes[0::2].any():
        raise _DataFailed(failure, int(votes[0::2].nonzero()[0]), bool(votes[1::2].any()))


def _fetch(batches) -> tuple[dict | None, Exception | None]:
    """The next batch, or the error that loading it raised."""
    try:
        return next(batches), None
    except Exception as error:  # noqa: BLE001 - every failure is shared with the other ranks first
        return None, error


def diverged(step: int, what: str) -> TrainingDiverged:
    """Nothing non-finite is saved: the checkpoints written before stay as they were, model.pt is not made."""
    return TrainingDiverged(
        f"training diverged at step {step}: {what}; lower --lr or --weight-decay (checkpoints written "
        "before this step are kept; no model.pt was written)"
    )


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class _StopRequest:
    """Ctrl-C and SIGTERM ask the loop to stop after the current step instead of killing it mid-step."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._request)

    def _request(self, number, frame) -> None:
        self.requested = True

    def close(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _progress(enabled: bool, start: int, total: int):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True
    )
