"""The demo on the built-in benchmark: trained tiny model -> evaluation on its fold -> pictures -> export
(FP32 + FP16 ONNX) -> bench of torch against ONNX Runtime (on CUDA: the GPU rows that run there, the
deployed path and the anchor among them) -> tables."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from crnet import checkpoint as checkpoints
from crnet.bundle import is_replaceable_bundle
from crnet.commands.evaluate import BASELINE, CRNetPredictor, PrototypeBaseline, evaluate
from crnet.commands.train import LAST, train, unsaved_run
from crnet.commands.visualize import denormalise, episode_sheet
from crnet.config import TINY, TrainConfig
from crnet.data.episodes import fixed_episode_loader
from crnet.data.pascal import VOCTree
from crnet.engines import deployed_gpu
from crnet.files import StagedDirectory, check_output_dir, holds_only, parse_json, write_text
from crnet.model.crnet import CRNet, upsample

# The committed checkpoint checkpoints/tiny_fold0.pt is this recipe's result, reproduced by
#   crnet train --out runs/tiny-fold0 --steps 4000 --batch-size 4 --optimizer adamw --lr 1e-3 \
#       --weight-decay 1e-4 --precision bf16 --exclude-novel-images --min-object-pixels 1 \
#       --checkpoint-every 500
# on the built-in benchmark (docs/BENCHMARKS.md records the run: 10 minutes on 2 CPU cores, and a rerun
# that gave bit-identical weights).
RECIPE = TrainConfig(
    fold=0,
    steps=4000,
    batch_size=4,
    optimizer="adamw",
    lr=1e-3,
    weight_decay=1e-4,
    precision="bf16",
    exclude_novel_images=True,
    min_object_pixels=1,  # trained before the small-object rule: every object counted
    checkpoint_every=500,
    seed=0,
)


COMMITTED = "tiny_fold0.pt"


def committed_checkpoint() -> Path | None:
    """The committed tiny model: inside the installed package (a wheel ships it), else in the source tree
    the package runs from (a clone, an editable install); None where neither holds it."""
    package = Path(__file__).resolve().parents[1]
    if (package / "checkpoints" / COMMITTED).is_file():
        return package / "checkpoints" / COMMITTED
    source = package.parent
    if (source / "pyproject.toml").is_file() and (source / "checkpoints" / COMMITTED).is_file():
        return source / "checkpoints" / COMMITTED
    return None


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, and
    the recipe ran 11x slower in bf16 than in fp32 (docs/BENCHMARKS.md, CPU-2b)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: not known, so the safe choice
        return False
    return not flags.isdisjoint({"avx512_bf16", "amx_bf16"})


def recipe_for(device: torch.device) -> TrainConfig:
    """RECIPE, in fp32 on a CPU without native bfloat16."""
    return RECIPE if device.type != "cpu" or native_bf16() else RECIPE.replace(precision="fp32")


def train_recipe(out: Path, root: Path, device: torch.device, progress: bool, notice) -> Path:
    """Train the recipe into OUT/train, resuming an interrupted demo run; the model checkpoint."""
    run = out / "train"
    config = recipe_for(device)
    if config != RECIPE:
        notice(
            "this CPU has no native bfloat16 (AVX512-BF16 or AMX): the recipe trains in fp32 (emulated bf16 "
            "ran 11x slower), so its weights differ from the committed model's"
        )
    return train(
        TINY,
        config,
        root,
        run,
        resume=(run / "last.pt").exists(),
        device=str(device),
        progress=progress,
        notice=notice,
        how_to_continue="run the demo again with the same --out to continue",  # it has no --resume
    )


RESULTS = "results.json"


# What one demo run writes into OUT, replaced together when a later run ends (its first name says what OUT
# is), and the training run beside them, which a later run resumes or reuses.
RESULT_NAMES = (RESULTS, "episodes.png", "bench.json", "bench.png", "bundle")
OUTPUTS = (*RESULT_NAMES, "train")


def is_demo_output(out: Path) -> bool:
    """An earlier demo's folder: its results.json, or the training run of a demo stopped before it wrote
    results, and nothing but the demo's outputs."""
    try:
        earlier = {"checkpoint", "results"} <= parse_json((out / RESULTS).read_text()).keys()
    except (OSError, ValueError, TypeError, AttributeError):
        run = out / "train"  # a demo stopped while training: a checkpoint, or the log of its first steps
        earlier = not os.path.lexists(out / RESULTS) and ((run / LAST).is_file() or unsaved_run(run))
    return earlier and holds_only(out, OUTPUTS) and _results_replaceable(out)


def _results_replaceable(out: Path) -> bool:
    """Whether the earlier results that a rerun replaces are as the demo wrote them: files, and a bundle to
    which nothing was added (holds_only counts a named folder with all it holds)."""
    for name in RESULT_NAMES:
        path = out / name
        if not os.path.lexists(path):
            continue
        if path.is_symlink():
            return False
        if not (is_replaceable_bundle(path) if name == "bundle" else path.is_file()):
            return False
    return True


def check_demo_out(out: Path, inputs: Sequence[Path] = ()) -> None:
    """OUT must be new, empty, or an earlier demo's, so that no other file there is replaced."""
    check_output_dir(out, what="demo", ours=is_demo_output, replaces_own=True, inputs=inputs)


def staged_demo(out: Path, inputs: list[Path]) -> StagedDirectory:
    """A folder beside OUT for this run's results; `commit_into(RESULT_NAMES)` puts them in place together,
    so an interrupted run leaves OUT's earlier results as they were (and no half of a new set)."""
    return StagedDirectory(out, what="demo", ours=is_demo_output, replaces_own=True, inputs=inputs)


def draw_episodes(
    model: CRNet, root: Path, path: Path, device: torch.device, fold: int, count: int = 6
) -> Path:
    """A sheet of `count` novel-class episodes: support + mask, query + truth, query + prediction."""
    loader = fixed_episode_loader(
        root,
        fold=fold,
        shots=1,
        count=count,
        input_size=model.config.input_size,
        seed=1,
        batch_size=count,
        keep_original=False,
    )
    batch = next(iter(loader))
    with torch.no_grad():
        logits = CRNetPredictor(model, device)(batch)
        prediction = upsample(logits.float().cpu(), batch["query_mask"].shape[-2:]).argmax(1)
    rows = [
        (
            denormalise(batch["support_images"][i, 0]),
            batch["support_masks"][i, 0].numpy(),
            denormalise(batch["query_image"][i]),
            batch["query_mask"][i].numpy(),
            denormalise(batch["query_image"][i]),
            prediction[i].numpy(),
        )
        for i in range(count)
    ]
    names = VOCTree(root).class_names
    labels = [f"{int(c)}: {names[int(c) - 1]}" for c in batch["class_id"]]
    return episode_sheet(rows, ("support + mask", "query + truth", "query + CRNet"), labels, path)


def run_demo(
    checkpoint: Path, out: Path, root: Path, episodes: int, device: torch.device, progress: bool
) -> tuple[list[dict], Path]:
    """Evaluate the checkpoint on the fold it was trained on (its novel classes) and draw episodes; the
    results, the episode sheet and the fold the checkpoint says it was trained on (None if it does not)."""
    state = checkpoints.load(checkpoint)
    model = checkpoints.model_from_state(state, checkpoint, device)
    trained = checkpoints.trained_fold(state)
    fold, _ = checkpoints.fold_to_test(None, state, checkpoint)
    common = dict(fold=fold, input_size=model.config.input_size, episodes=episodes, progress=progress)
    results = [
        {
            "method": BASELINE,
            "strategy": "-",
            **evaluate(PrototypeBaseline.untrained(model.config, device), root, shots=1, **common),
        },
        {
            "method": "CRNet",
            "strategy": "-",
            **evaluate(CRNetPredictor(model, device), root, shots=1, **common),
        },
        {
            "method": "CRNet",
            "strategy": "average",
            **evaluate(CRNetPredictor(model, device), root, shots=5, **common),
        },
    ]
    document = {"checkpoint": str(checkpoint), "trained_fold": trained, "results": results}
    write_text(out / RESULTS, json.dumps(document, indent=2))
    return results, draw_episodes(model, root, out / "episodes.png", device, fold), trained


DEMO_RUNTIMES = ("torch:fp32", "torch:bf16+channels-last", "onnxruntime:fp32", "onnxruntime:fp16")


def demo_runtimes(device: torch.device) -> tuple[str, ...]:
    """The runtimes the demo benches: on a GPU only those that run there (ONNX Runtime with its CUDA
    provider and TensorRT where installed), never rows that can only say they are unavailable."""
    if device.type != "cuda":
        return DEMO_RUNTIMES
    runtimes = ["torch:fp32", "torch:fp16+channels-last", deployed_gpu(), "torch:fp16+anchor"]
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            runtimes += ["onnxruntime:fp32+cuda", "onnxruntime:fp16+cuda"]
    except ImportError:
        pass
    if importlib.util.find_spec("tensorrt") is not None:
        runtimes.append("tensorrt:fp16")
    return tuple(runtimes)


def export_and_bench(
    checkpoint: Path,
    out: Path,
    root: Path,
    trained_fold: int | None,
    episodes: int,
    device: torch.device,
    progress,
    notice,
) -> dict:
    """Export FP32 + FP16 graphs, then bench torch against ONNX Runtime on the demo's episodes (of the fold
    the checkpoint was trained on)."""
    from crnet.commands.bench import BenchSettings, run_bench
    from crnet.engines import RuntimeSpec
    from crnet.export.build import export_bundle

    runtimes = demo_runtimes(device)
    engines = "tensorrt:fp16" in runtimes
    exported = export_bundle(
        checkpoint, out / "bundle", fp16=True, tensorrt=engines, overwrite=True, progress=notice
    )
    if exported.tensorrt_skipped:
        notice(f"no TensorRT row: {exported.tensorrt_skipped}")
        runtimes = tuple(r for r in runtimes if r != "tensorrt:fp16")
    settings = BenchSettings(
        checkpoint=checkpoint,
        bundle=exported.bundle,
        data_root=root,
        fold=trained_fold or 0,
        trained_fold=trained_fold,
        episodes=episodes,
        device=str(device),
    )
    specs = [RuntimeSpec.parse(text) for text in runtimes]
    return run_bench(specs, settings, progress, notice=notice)
