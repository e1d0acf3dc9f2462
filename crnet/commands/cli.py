"""`crnet` command line: synth, train, eval, export, infer, bench, demo.

Every option is checked here, once, before any work starts, with its limits in its help text; outputs are
checked for writability before a long run. User errors print one `error:` line and exit with code 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Literal

import typer

from crnet.commands.entry import silence_stdout
from crnet.commands.script_args import empty_argument
from crnet.config import MAX_BATCH, MAX_ITERATIONS
from crnet.errors import CRNetError, CRNetWarning, interrupted, one_line, torch_start_failure
from crnet.files import check_not_input, check_writable_file, parse_json
from crnet.optional import MissingDependencyError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="CRNet few-shot segmentation: train, evaluate, export, infer, bench, demo.",
)


def _default_data() -> Path:
    from crnet.data.synthetic import GENERATOR_VERSION

    return Path.home() / ".cache" / "crnet" / f"synthetic-v{GENERATOR_VERSION}"


MAX_LEARNING_RATE = 10.0
MAX_WEIGHT_DECAY = 10.0
MAX_WORKSPACE_GIB = 1024  # above any GPU's memory; TensorRT takes the limit as a 64-bit byte count
DEFAULT_DATA = _default_data()  # versioned: a newer generator never meets an older tree


def _positive(value: float | None) -> float | None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise typer.BadParameter(f"must be > 0 and finite, got {value}")
    return value


def _learning_rate(value: float) -> float:
    # Above this no optimiser here trains (and near float32's limit the update itself overflows).
    if not (0 < value <= MAX_LEARNING_RATE):
        raise typer.BadParameter(f"must be > 0 and at most {MAX_LEARNING_RATE:g}, got {value}")
    return value


def _fraction(value: float) -> float:
    if not 0 <= value <= 1:  # NaN too, which click's range let through to a message about its upper bound
        raise typer.BadParameter(f"must be 0 to 1, got {value}")
    return value


def _weight_decay(value: float) -> float:
    # past float32's range the optimizer's step overflows; far below it, training only diverges
    if not (0 <= value <= MAX_WEIGHT_DECAY):
        raise typer.BadParameter(f"must be >= 0 and at most {MAX_WEIGHT_DECAY:g}, got {value}")
    return value


def _workspace(value: float) -> float:
    _positive(value)
    if value > MAX_WORKSPACE_GIB:
        raise typer.BadParameter(f"must be at most {MAX_WORKSPACE_GIB} GiB, got {value}")
    return value


def _runtime_spec(value: str | None) -> str | None:
    from crnet.engines import RuntimeSpec

    if value is not None:
        try:
            RuntimeSpec.parse(value)
        except CRNetError as error:
            raise typer.BadParameter(str(error)) from None
    return value


def _runtime_specs(values: list[str] | None) -> list[str] | None:
    for value in values or []:
        _runtime_spec(value)
    return values


def _batch_range(value: str) -> str:
    from crnet.bundle import BatchRange

    try:
        BatchRange.parse(value)
    except CRNetError as error:
        raise typer.BadParameter(str(error)) from None
    return value


# Options shared by several commands, with their limits.
DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data", file_okay=False, help="VOC-layout root (default: the built-in benchmark, made on first use)"
    ),
]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="show progress bars")]
FoldOption = Annotated[int, typer.Option(min=0, max=3, help="PASCAL-5i fold: its 15 base classes train")]
TestFoldOption = Annotated[
    int | None, typer.Option(min=0, max=3, help="fold to test (default: the fold it was trained on)")
]
ShotsOption = Annotated[int, typer.Option(min=1, max=100, help="labelled support images per episode")]
SeedOption = Annotated[int, typer.Option(min=0, max=2**64 - 1, help="random seed")]  # torch's seeds: 64 bits
IterationsOption = Annotated[
    int | None,
    typer.Option(
        min=1, max=MAX_ITERATIONS, help=f"refinement iterations T, <= {MAX_ITERATIONS} (default: the model's)"
    ),
]
# Bounds on sizes that only a typo reaches: past them a command would build lists and batches for minutes and
# die of memory, instead of saying so.
MAX_EPISODES = 1_000_000
CheckpointArgument = Annotated[Path, typer.Argument(help="model checkpoint (model.pt or last.pt)")]
MinObjectOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="pixels a class needs to count in an image (default: 2048 on PASCAL, as PFENet and BAM; the "
        "same share of the image on the built-in benchmark; 1 counts every object)",
    ),
]


def data_root(path: Path | None, say: bool = True) -> Path:
    """The given root, or the built-in benchmark (generated on first use)."""
    if path is not None:
        return path
    from crnet.data import synthetic

    if say:
        typer.echo(f"using the built-in benchmark at {DEFAULT_DATA}", err=True)
    return synthetic.ensure(DEFAULT_DATA)


def is_eval_json(path: Path) -> bool:
    """Whether `path` holds results `crnet eval` wrote, which a rerun may replace."""
    try:
        return {"checkpoint", "data", "results"} <= parse_json(path.read_text()).keys()
    except (OSError, ValueError, AttributeError):
        return False


def write_json(values: dict, path: Path, replaces=None) -> None:
    from crnet.files import write_text

    write_text(path, json.dumps(values, indent=2) + "\n", replaces)
    typer.echo(f"wrote {path}", err=True)


def replacing_only(ours, what: str, option: str):
    """For write_json / plot_latency: at the rename, a file at the path is replaced only when `ours` says
    it is an earlier `what` (as check_writable_file said at the start)."""
    from crnet.files import check_replaceable_file

    return lambda path: check_replaceable_file(path, ours, what, option)


@app.command()
def synth(
    root: Annotated[Path, typer.Argument(help="where to write the benchmark")] = DEFAULT_DATA,
    seed: SeedOption = 0,
    train_per_class: Annotated[int, typer.Option(min=2, max=100_000, help="training images per class")] = 120,
    val_per_class: Annotated[int, typer.Option(min=2, max=100_000, help="test images per class")] = 60,
    image_size: Annotated[int, typer.Option(min=32, max=2048, help="image side in pixels")] = 128,
) -> None:
    """Generate the built-in few-shot benchmark (20 classes, 4 folds, VOC layout)."""
    from crnet.data import synthetic

    synthetic.ensure(
        root, seed=seed, train_per_class=train_per_class, val_per_class=val_per_class, image_size=image_size
    )
    typer.echo(f"benchmark ready at {root}")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="run directory: last.pt, model.pt, metrics.jsonl")],
    preset: Annotated[Literal["tiny", "r50"], typer.Option(help="model preset")] = "tiny",
    data: DataOption = None,
    fold: FoldOption = 0,
    steps: Annotated[int, typer.Option(min=1, help="optimiser steps")] = 2000,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH, help="episodes per step (per process under DDP)")
    ] = 8,
    optimizer: Annotated[Literal["sgd", "adamw"], typer.Option(help="optimiser")] = "sgd",
    lr: Annotated[
        float,
        typer.Option(
            callback=_learning_rate, help=f"peak learning rate, > 0, <= {MAX_LEARNING_RATE:g} (poly decay)"
        ),
    ] = 2.5e-3,
    weight_decay: Annotated[
        float, typer.Option(callback=_weight_decay, help=f"weight decay, 0 to {MAX_WEIGHT_DECAY:g}")
    ] = 5e-4,
    reset_probability: Annotated[
        float,
        typer.Option(
            callback=_fraction, help="chance, 0 to 1, that the cached previous prediction is zeroed"
        ),
    ] = 0.3,
    precision: Annotated[
        Literal["auto", "fp32", "bf16"],
        typer.Option(help="forward autocast: auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16"),
    ] = "auto",
    exclude_novel_images: Annotated[
        bool, typer.Option(help="drop training images in which a novel class of the fold appears")
    ] = False,
    hue_turns: Annotated[
        bool, typer.Option(help="turn the hue of each training episode's images by one random angle")
    ] = False,
    min_object_pixels: MinObjectOption = None,
    seed: SeedOption = 0,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="steps between checkpoints (last.pt)")] = 200,
    workers: Annotated[
        int, typer.Option(min=0, max=64, help="data loader processes (0: in the main one)")
    ] = 1,
    backbone_weights: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="torchvision resnet50 state-dict file")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue the run saved in --out (same options; --workers and --checkpoint-every may change)"
        ),
    ] = False,
    device: DeviceOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """Episodic training on the base classes of a fold (DDP when launched by torchrun)."""
    from crnet.commands.train import follower_rank
    from crnet.commands.train import train as run_training
    from crnet.config import TrainConfig
    from crnet.config import preset as model_preset
    from crnet.device import resolve_device

    model_config = model_preset(preset)
    config = TrainConfig(
        fold=fold,
        steps=steps,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        reset_probability=reset_probability,
        precision=precision,
        exclude_novel_images=exclude_novel_images,
        hue_turns=hue_turns,
        min_object_pixels=min_object_pixels,
        seed=seed,
        checkpoint_every=checkpoint_every,
        workers=workers,
    )
    if out.exists() and not out.is_dir():
        raise CRNetError(f"--out {out} is a file; training writes a run directory there")
    check_not_input(out, [data or DEFAULT_DATA] + ([backbone_weights] if backbone_weights else []))
    if resume and backbone_weights is not None:  # last.pt's weights would replace them at once
        raise CRNetError("--backbone-weights starts a new run; a resumed run continues from its last.pt")
    quiet = follower_rank()  # under torchrun, rank 0 says each line once; the other ranks, their errors
    if quiet:
        warnings.filterwarnings("ignore", category=CRNetWarning)
    if model_config.name == "r50" and backbone_weights is None and not resume and not quiet:
        typer.echo("warning: r50 without --backbone-weights freezes a randomly initialised trunk", err=True)
    resolved = resolve_device(device)
    try:
        final = run_training(
            model_config,
            config,
            data_root(data, say=not quiet),
            out,
            backbone_weights=backbone_weights,
            resume=resume,
            device=None if device == "auto" else str(resolved),
            progress=progress,
            notice=(lambda line: None) if quiet else (lambda line: typer.echo(line, err=True)),
        )
    except KeyboardInterrupt:
        if quiet:  # every rank stops at the same step, and rank 0 says so
            raise SystemExit(130) from None
        raise
    if not quiet:
        typer.echo(f"saved {final}")


@app.command("eval")
def evaluate_command(
    checkpoint: CheckpointArgument,
    data: DataOption = None,
    fold: TestFoldOption = None,
    shots: ShotsOption = 1,
    strategy: Annotated[
        Literal["average", "finetune"], typer.Option(help="k-shot strategy (with --shots >= 2)")
    ] = "average",
    episodes: Annotated[int, typer.Option(min=1, max=MAX_EPISODES, help="fixed test episodes")] = 1000,
    seed: SeedOption = 0,
    iterations: IterationsOption = None,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="episodes per forward pass")] = 16,
    finetune_steps: Annotated[int, typer.Option(min=1, help="finetune strategy: steps per episode")] = 10,
    finetune_lr: Annotated[
        float,
        typer.Option(
            callback=_learning_rate, help=f"finetune strategy: learning rate, > 0, <= {MAX_LEARNING_RATE:g}"
        ),
    ] = 1e-3,
    exit_fraction: Annotated[
        float,
        typer.Option(
            callback=_fraction,
            help="early exit, 0 to 1: stop refining a query once less than this share of it changes (0: off)",
        ),
    ] = 0.0,
    baseline: Annotated[bool, typer.Option(help="also run the training-free prototype baseline")] = False,
    min_object_pixels: MinObjectOption = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="where to write the results (default: beside the checkpoint)"),
    ] = None,
    device: DeviceOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """mIoU and FB-IoU on the novel classes of a fold, on fixed seeded episodes."""
    from crnet import checkpoint as checkpoints
    from crnet.commands.evaluate import BASELINE, CRNetPredictor, PrototypeBaseline, evaluate
    from crnet.device import flush_denormals_for_inference, resolve_device

    if strategy == "finetune" and shots < 2:
        raise CRNetError(
            "--strategy finetune needs --shots 2 or more: it trains on the supports, each in turn the "
            "query of the others"
        )
    resolved = resolve_device(device)
    flush_denormals_for_inference(resolved)
    state = checkpoints.load(checkpoint)
    model = checkpoints.model_from_state(state, checkpoint, resolved)
    fold, seen = checkpoints.fold_to_test(fold, state, checkpoint)
    suffix = f"fold{fold}_{shots}shot" + (f"_{strategy}" if shots > 1 else "")
    json_out = json_out or checkpoint.parent / f"eval_{suffix}.json"
    inputs = [checkpoint, data or DEFAULT_DATA]
    check_writable_file(json_out, inputs, "--json", is_eval_json, "eval results JSON")
    root = data_root(data)
    common = dict(
        fold=fold,
        shots=shots,
        input_size=model.config.input_size,
        episodes=episodes,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        min_object_pixels=min_object_pixels,
        notice=lambda line: typer.echo(f"warning: {line}", err=True),
    )
    predictor = CRNetPredictor(
        model, resolved, strategy, iterations, finetune_steps, finetune_lr, exit_fraction
    )
    results = [
        {"method": "CRNet", "strategy": strategy if shots > 1 else "-", **evaluate(predictor, root, **common)}
    ]
    if baseline:
        results.append(
            {
                "method": BASELINE,
                "strategy": "average" if shots > 1 else "-",
                **evaluate(PrototypeBaseline.untrained(model.config, resolved), root, **common),
            }
        )
    if seen:  # after the run, so that a user error stays one line
        typer.echo(f"warning: {seen}", err=True)
    trained = checkpoints.trained_fold(state)
    write_json(
        {"checkpoint": str(checkpoint), "trained_fold": trained, "data": str(root), "results": results},
        json_out,
        replacing_only(is_eval_json, "eval results JSON", "--json"),
    )
    # the table after the file: a reader that quits early (`| head`) costs only the table
    print_results(results, novel=not seen)


def print_results(results: list[dict], novel: bool = True) -> None:
    """The evaluation results as a Markdown table: full width in a terminal, a pipe or a file alike.
    `novel`: the fold's classes were unseen in training (else a fold the checkpoint was not trained on)."""
    iterations = any("mean_iterations" in r for r in results)
    columns = ["method", "fold", "shots", "k-shot", "episodes", "mIoU", "FB-IoU", "seconds"]
    columns += ["iterations"] if iterations else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        row = [r["method"], str(r["fold"]), str(r["shots"]), r["strategy"], str(r["episodes"])]
        row += [f"{r['miou']:.1f}", f"{r['fbiou']:.1f}", f"{r['seconds']:.0f}"]
        if iterations:
            row.append(f"{r['mean_iterations']:.2f}" if "mean_iterations" in r else "-")
        lines.append("| " + " | ".join(row) + " |")
    typer.echo(
        "few-shot segmentation, novel classes" if novel else "segmentation of classes seen in training"
    )
    typer.echo("\n".join(lines))
    if any(r["method"] == "baseline" for r in results):
        typer.echo("baseline: cosine matching to support prototypes on the untrained encoder (no learning)")


@app.command()
def demo(
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="trained tiny model (default: the committed checkpoints/tiny_fold0.pt, which the package "
            "installs; trained first where it is missing)"
        ),
    ] = None,
    train_first: Annotated[
        bool,
        typer.Option(
            "--train",
            help="first train the tiny recipe into OUT/train (resumed if interrupted); default: off",
        ),
    ] = False,
    out: Annotated[Path, typer.Option(help="results, pictures, bundle and any training run go here")] = Path(
        "runs/demo"
    ),
    data: DataOption = None,
    episodes: Annotated[int, typer.Option(min=1, max=MAX_EPISODES, help="fixed test episodes")] = 1000,
    device: DeviceOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """Built-in benchmark end to end: tiny model, evaluation on its fold, pictures, export, runtime bench."""
    from crnet.commands.bench import format_table, plot_latency
    from crnet.commands.demo import (
        RESULT_NAMES,
        check_demo_out,
        committed_checkpoint,
        export_and_bench,
        run_demo,
        staged_demo,
        train_recipe,
    )
    from crnet.device import flush_denormals_for_inference, resolve_device
    from crnet.files import write_text

    if checkpoint is not None and train_first:
        raise CRNetError("--checkpoint and --train exclude each other: use a trained model or train one")
    if checkpoint is not None and not checkpoint.is_file():
        raise CRNetError(
            f"checkpoint not found: {checkpoint} (omit --checkpoint to use or train the default)"
        )
    check_demo_out(out, [data or DEFAULT_DATA] + ([checkpoint] if checkpoint else []))
    resolved = resolve_device(device)
    notice = lambda line: typer.echo(line, err=True)  # noqa: E731
    if checkpoint is None and not train_first:
        checkpoint = committed_checkpoint()
        if checkpoint is None:
            notice(
                "the committed tiny model is not installed: training the tiny recipe first (about 10 min on "
                "2 CPU cores with native bfloat16)"
            )
    root = data_root(data)
    if checkpoint is None:
        checkpoint = train_recipe(out, root, resolved, progress, notice)
    flush_denormals_for_inference(resolved)  # after training, which stays bit-identical to `crnet train`
    reader = Reader()
    with staged_demo(out, [root]) as stage:  # the results land together, or not at all
        results, picture, trained = run_demo(checkpoint, stage.root, root, episodes, resolved, progress)
        reader.show(print_results, results)
        bench = export_and_bench(
            checkpoint, stage.root, root, trained, episodes, resolved, _bar(progress), notice
        )
        bench["settings"]["bundle"] = str(out / "bundle")  # where it will be
        reader.show(typer.echo, format_table(bench))
        write_text(stage.root / "bench.json", json.dumps(bench, indent=2) + "\n")  # said at the end
        with contextlib.suppress(MissingDependencyError):  # the chart is optional; the table and JSON are not
            plot_latency(bench, stage.root / "bench.png")
        stage.commit_into(RESULT_NAMES)
    reader.show(typer.echo, f"episodes drawn in {out / picture.name}; results, bundle and bench in {out}")
    reader.check()


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="model checkpoint (model.pt)")],
    out: Annotated[
        Path, typer.Option(help="bundle directory to write (absent, empty, or a bundle to replace)")
    ],
    fp16: Annotated[bool, typer.Option(help="also write FP16 graphs (FP32 inputs and outputs)")] = False,
    tensorrt: Annotated[
        bool, typer.Option(help="also build TensorRT engines (needs tensorrt and a GPU)")
    ] = False,
    batch_range: Annotated[
        str,
        typer.Option(
            callback=_batch_range,
            help="batch sizes MIN:OPT:MAX, 1 <= MIN <= OPT <= MAX, the engines are built for (a smaller "
            "batch is padded to MIN)",
        ),
    ] = "1:1:16",
    iterations: IterationsOption = None,
    triton: Annotated[
        Path | None, typer.Option(help="also write a Triton model repository here (absent or empty)")
    ] = None,
    workspace_gib: Annotated[
        float,
        typer.Option(
            callback=_workspace, help=f"TensorRT builder workspace limit, GiB, > 0, <= {MAX_WORKSPACE_GIB}"
        ),
    ] = 4.0,
    timing_cache: Annotated[
        Path | None, typer.Option(dir_okay=False, help="TensorRT timing cache file, read and updated")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="replace an existing bundle (and Triton repository); nothing else")
    ] = False,
) -> None:
    """Checkpoint -> bundle: encoder, prompt and head ONNX graphs (+ FP16, TensorRT engines), checked."""
    from crnet.bundle import BatchRange
    from crnet.export.build import export_bundle

    if timing_cache is not None and not tensorrt:
        raise CRNetError("--timing-cache is for TensorRT's builder: add --tensorrt, or leave it out")
    if timing_cache is not None:  # read, then rewritten: never the checkpoint, nor in a folder written whole
        check_writable_file(timing_cache, [checkpoint], "--timing-cache")
        cache = Path(os.path.realpath(timing_cache))
        for option, folder in (("--out", out), ("--triton", triton)):
            if folder is not None and Path(os.path.realpath(folder)) in cache.parents:
                raise CRNetError(
                    f"--timing-cache {timing_cache} is inside {option} {folder}, which is written whole; "
                    "keep the cache outside it"
                )
    if triton is not None:  # checked before the export, so that a bad --triton costs nothing
        from crnet.export.triton import check_engine_batches, check_repository_out

        if tensorrt:
            check_engine_batches(BatchRange.parse(batch_range).min)

        bundle, repository = os.path.realpath(out), os.path.realpath(triton)
        if os.path.commonpath([bundle, repository]) in (bundle, repository):
            raise CRNetError(f"--triton {triton} and --out {out} overlap; give each a folder of its own")
        check_repository_out(triton, overwrite, [checkpoint])
    if tensorrt:  # after the arguments, before the export: a missing builder or GPU costs nothing
        from crnet.export.tensorrt import builder_here, check_timing_cache

        builder_here()
        if timing_cache is not None:
            check_timing_cache(timing_cache)
    result = export_bundle(
        checkpoint,
        out,
        fp16=fp16,
        tensorrt=tensorrt,
        batch=BatchRange.parse(batch_range),
        iterations=iterations,
        overwrite=overwrite,
        workspace_gib=workspace_gib,
        timing_cache=timing_cache,
        progress=lambda message: typer.echo(message, err=True),
    )
    typer.echo(f"wrote bundle {result.bundle}")
    if triton is not None:
        from crnet.bundle import load_bundle
        from crnet.export.triton import write_repository

        repository = write_repository(load_bundle(result.bundle), triton, overwrite=overwrite)
        typer.echo(f"wrote Triton model repository {repository}")
    if result.tensorrt_skipped:  # checked above: only a machine that changed during the export
        raise CRNetError(f"no TensorRT engines: {result.tensorrt_skipped}; the rest of the bundle is written")


@app.command("infer")
def infer_command(
    engine: Annotated[
        Path, typer.Option(help="bundle directory, a graph/engine in one, or a .pt checkpoint")
    ],
    support: Annotated[list[Path], typer.Option(help="support image (repeat for k shots)")],
    support_mask: Annotated[
        list[Path], typer.Option(help="its mask PNG: 0 background, 1 object, 255 ignore")
    ],
    query: Annotated[list[Path], typer.Option(help="query image (repeat for more)")],
    out: Annotated[
        Path, typer.Option(help="folder for masks, overlays and infer.json (new, empty, or an earlier --out)")
    ],
    runtime: Annotated[
        str | None,
        typer.Option(
            callback=_runtime_spec,
            help="NAME[:PRECISION][+OPTION] as in bench, e.g. onnxruntime:fp16 (default: the best the engine "
            "and device allow)",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="queries per forward pass")] = 8,
    device: DeviceOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """Segment queries against k labelled supports; the support prompt is computed once."""
    from tqdm import tqdm

    from crnet.commands.infer import infer
    from crnet.device import resolve_device

    resolved = resolve_device(device)  # checked here; "auto" lets the runtime pick (engines.runtime_device)
    bars = []  # the bar opens once the inputs are checked: an error is then the only line

    def advance(count: int) -> None:
        if not bars:
            bar = tqdm(total=len(query), disable=not progress, desc="infer", unit="query", dynamic_ncols=True)
            bars.append(bar)
        bars[0].update(count)

    try:
        summary = infer(
            engine,
            support,
            support_mask,
            query,
            out,
            runtime=runtime,
            device=None if device == "auto" else resolved,
            batch_size=batch_size,
            progress=advance,
        )
    finally:
        for bar in bars:
            bar.close()
    count, seconds = len(summary["queries"]), summary["seconds"]
    typer.echo(f"{summary['runtime']} on {summary['device']}: {count} masks in {out} ({seconds:.2f} s)")


@app.command("bench")
def bench_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="model checkpoint: the torch runtimes and the reference")
    ],
    bundle: Annotated[
        Path | None, typer.Option(help="bundle exported from this checkpoint, for onnxruntime / tensorrt")
    ] = None,
    runtime: Annotated[
        list[str] | None,
        typer.Option(
            callback=_runtime_specs,
            help="NAME[:PRECISION][+OPTION...], repeatable, e.g. onnxruntime:fp16, torch:fp16+compile "
            "(default: torch:fp32, with --bundle also onnxruntime:fp32 and :fp16; on CUDA "
            "torch:fp16+channels-last, the deployed path and the anchor, with --bundle also "
            "onnxruntime:fp32+cuda and tensorrt:fp16)",
        ),
    ] = None,
    data: DataOption = None,
    fold: TestFoldOption = None,
    shots: ShotsOption = 1,
    episodes: Annotated[
        int, typer.Option(min=0, max=MAX_EPISODES, help="accuracy episodes (0: latency only)")
    ] = 1000,
    min_object_pixels: MinObjectOption = None,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH, help="episodes per timed call")] = 1,
    warmup: Annotated[int, typer.Option(min=0, help="untimed rounds first")] = 5,
    repeats: Annotated[int, typer.Option(min=1, help="timed rounds")] = 30,
    threads: Annotated[int, typer.Option(min=1, max=1024, help="CPU threads, pinned for every runtime")] = 2,
    json_out: Annotated[Path, typer.Option("--json", help="results JSON")] = Path("runs/bench/bench.json"),
    chart: Annotated[
        Path | None, typer.Option(help="latency bar chart PNG (default: beside the JSON)")
    ] = None,
    fused: Annotated[
        bool | None,
        typer.Option(
            "--fused/--no-fused", help="torch runtimes: native refinement op (default: where it is built)"
        ),
    ] = None,
    device: DeviceOption = "auto",
    progress: ProgressOption = True,
) -> None:
    """Latency and IoU of every runtime on the same episodes, with agreement to PyTorch FP32."""
    from crnet import checkpoint as checkpoints
    from crnet.commands.bench import (
        BenchSettings,
        format_table,
        is_bench_chart,
        is_bench_json,
        is_complete_bench_json,
        plot_latency,
        run_bench,
    )
    from crnet.device import flush_denormals_for_inference, resolve_device
    from crnet.engines import RuntimeSpec, deployed_gpu

    resolved = resolve_device(device)
    flush_denormals_for_inference(resolved)
    state = checkpoints.load(checkpoint)  # here for its fold; the runtimes load it again
    fold, seen = checkpoints.fold_to_test(fold, state, checkpoint)
    # the bundle's rows only with a bundle: without one, a plain `crnet bench model.pt` benches torch
    default = ["torch:fp32"] + (["onnxruntime:fp32", "onnxruntime:fp16"] if bundle else [])
    if resolved.type == "cuda":
        default = ["torch:fp16+channels-last", deployed_gpu(), "torch:fp16+anchor"]
        default += ["onnxruntime:fp32+cuda", "tensorrt:fp16"] if bundle else []
    specs = [RuntimeSpec.parse(text) for text in runtime or default]
    if any(spec.name != "torch" for spec in specs) and bundle is None:
        raise CRNetError("onnxruntime and tensorrt runtimes need --bundle (make one with `crnet export`)")
    inputs = [checkpoint, data or DEFAULT_DATA] + ([bundle] if bundle else [])
    # First: "." has no suffix to swap for the chart's name.
    check_writable_file(json_out, inputs, "--json", is_bench_json, "bench JSON")
    named = chart is not None
    chart = chart or json_out.with_suffix(".png")
    if os.path.realpath(chart) == os.path.realpath(json_out):
        if not named:  # no --chart given: say so, not blame an option the user did not write
            raise CRNetError(
                f"--json {json_out}: the chart's default name (the JSON's, as .png) is the same; "
                "give --json a .json name or --chart another"
            )
        raise CRNetError(f"--chart {chart} is the --json file; give the chart another name")
    check_writable_file(chart, inputs, "--chart", is_bench_chart, "bench chart")
    settings = BenchSettings(
        checkpoint=checkpoint,
        bundle=bundle,
        data_root=data_root(data),
        fold=fold,
        trained_fold=checkpoints.trained_fold(state),
        shots=shots,
        episodes=episodes,
        batch=batch_size,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
        device=str(resolved),
        fused=fused,
        min_object_pixels=min_object_pixels,
    )

    notice = lambda line: typer.echo(line, err=True)  # noqa: E731
    result = run_bench(specs, settings, _bar(progress), notice=notice, stop_early=True)
    if seen and episodes:  # after the run, so that a user error stays one line
        typer.echo(f"warning: {seen}", err=True)
    if result["interrupted"] and is_complete_bench_json(json_out):  # a whole result is not given up for part
        kept = f"kept {json_out} and its chart: they hold a whole run; these rounds are not saved"
        typer.echo(kept, err=True)
        typer.echo(format_table(result))
        raise typer.Exit(130)
    # the files first: a reader that quits early (`| head`) costs only the table
    write_json(result, json_out, replacing_only(is_bench_json, "bench JSON", "--json"))
    try:  # interrupted too: the chart of the rounds done, as the JSON has them (an earlier one stays else)
        plot_latency(result, chart, replacing_only(is_bench_chart, "bench chart", "--chart"))
        typer.echo(f"wrote {chart}", err=True)
    except MissingDependencyError as error:  # the chart is optional; the table and JSON are written
        typer.echo(f"no latency chart: {error}", err=True)
    typer.echo(format_table(result))
    if result["interrupted"]:  # Ctrl-C's exit code, after the rounds done
        raise typer.Exit(130)


def _bar(enabled: bool):
    """Progress bars for the bench harness: bar(total, what) is a context giving update(n)."""

    @contextlib.contextmanager
    def bar(total: int, what: str):
        from tqdm import tqdm

        with tqdm(total=total, disable=not enabled, desc=what, dynamic_ncols=True) as handle:
            yield handle.update

    return bar


class Reader:
    """Printing while outputs are still staged (the demo): a reader that goes away (`crnet demo | head`, a
    closed pager) must not cost them. The command goes on with stdout silenced; `check` then ends it as
    click ends a command whose reader went away (exit 1, no message)."""

    def __init__(self) -> None:
        self.gone = False

    def show(self, write, *args) -> None:
        if self.gone:
            return
        try:
            write(*args)
            sys.stdout.flush()
        except BrokenPipeError:
            self.gone = True
            silence_stdout()

    def check(self) -> None:
        if self.gone:
            raise BrokenPipeError


def _compile_failure(error: Exception) -> str | None:
    """The line for torch.compile failing under a compiled runtime (inductor's BackendCompilerFailed), else
    None. Seen: a file of inductor's on-disk cache left empty ("file too short") failed every later compile
    that reads it."""
    if not type(error).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return None
    cause = getattr(error, "inner_exception", error)
    message = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
    return (
        f"torch.compile failed ({message}); if it names a file of inductor's cache "
        "(TORCHINDUCTOR_CACHE_DIR, by default /tmp/torchinductor_<user>), remove that file and run again, or "
        "use a spec that does not compile"
    )


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """crnet's own warnings as one line; others keep Python's format (they point at a bug elsewhere)."""
    if issubclass(category, CRNetWarning):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main() -> None:
    """Run one command; `crnet.commands.entry` calls this once SIGTERM is handled as Ctrl-C."""
    warnings.formatwarning = _format_warning
    for argument in sys.argv[1:]:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:  # bytes Python could not decode: ONNX, ONNX Runtime and messages need text
            typer.echo(
                f"error: {ascii(argument)} is not UTF-8 text (a name in another encoding, or a locale that "
                "is not UTF-8); rename it, or with a non-UTF-8 locale run with PYTHONUTF8=1",
                err=True,
            )
            sys.exit(2)
    if empty := empty_argument(sys.argv[1:]):
        typer.echo(f"error: {empty} (an unset shell variable?); give a path or a value", err=True)
        sys.exit(2)
    try:
        code = app(standalone_mode=False)  # not standalone: click returns an exit code, 130 for Ctrl-C
    except CRNetError as error:
        typer.echo(f"error: {one_line(error)}", err=True)
        sys.exit(2)
    except OSError as error:  # anything not caught closer to the file: still one line
        from crnet.files import DISK_FULL, explain

        if failure := torch_start_failure(error):  # TORCH_LOGS_OUT naming a file that cannot be opened
            typer.echo(f"error: {failure}", err=True)
        elif error.errno in DISK_FULL:
            typer.echo(f"error: {explain(error, error.filename or 'an output')}", err=True)
        else:
            typer.echo(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as error:
        if interrupted(error):  # SIGTERM to the process group also stops the data loader's workers
            typer.echo("interrupted", err=True)
            sys.exit(130)
        if failure := _compile_failure(error) or torch_start_failure(error):
            typer.echo(f"error: {failure}", err=True)
            sys.exit(2)
        # Usage errors (unknown option, missing argument, bad value) come from typer's bundled click, whose
        # exception classes are not public: recognise them by their interface.
        if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
            raise
        if type(error).__name__ == "Abort":
            typer.echo("interrupted", err=True)
            sys.exit(130)
        if error.format_message():  # empty when the help was shown for a bare `crnet`
            typer.echo(f"error: {' '.join(error.format_message().split())}", err=True)
        sys.exit(2)
    if code == 130:
        typer.echo("interrupted", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
