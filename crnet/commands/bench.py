"""`crnet bench`: every runtime on the same episodes, latency and accuracy, one table.

Accuracy: each runtime segments the same fixed episodes as PyTorch FP32 (the reference); mIoU / FB-IoU are
against ground truth (logits at input resolution, resized to the label), agreement is against the reference
(pixel agreement and mask IoU of the predicted foreground, absolute logit error at input resolution).

Latency: on one batch of episodes, after warm-up, with the device synchronised inside every timed region,
the runtimes taking turns call by call (so that machine noise falls on all of them alike):
    episode  encode supports + encode query + prompt + segment (nothing cached)
    query    encode query + segment, against a prompt computed once (the deployed path)
    encoder  one encode of the query batch
Reported as median, p90, p99 (ms) and throughput (episodes or queries per second). On a GPU each call is
also timed by CUDA events on the stream (GPU time: the span from the first kernel's start to the last's end,
which launch gaps still count in, without the host's final synchronisation).

Against the FLOP floor (crnet.commands.floor): the FLOPs of each kind of call are counted once and the
device's best matmul rate measured once per run; a row's share of the floor is floor time / its median.
A row `torch:<precision>+anchor` (plain torch.compile) gives every other row its ratio to the anchor.
A runtime that cannot open is reported as unavailable, one whose call raises (a compile or a graph capture
that fails, say) as failed, each with its reason: the other rows are measured all the same. A bench
interrupted in its timed rounds (Ctrl-C, or `timeout -s INT` at a deadline) reports the whole rounds done,
and says that it was interrupted.
JSON schema: SCHEMA.
"""

from __future__ import annotations

import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from crnet.bundle import Bundle, load_bundle
from crnet.commands.contention import OTHERS_WARN, OtherGPUProcesses, OtherProcesses
from crnet.commands.floor import checkpoint_flops, floor_ms, matmul_rate
from crnet.commands.timer import Timer
from crnet.data.episodes import fixed_episode_loader
from crnet.data.pascal import fold_classes
from crnet.engines import RuntimeSpec, open_runtime
from crnet.engines.base import Runtime, RuntimeUnavailable
from crnet.errors import CRNetError, ZeroPromptWarning
from crnet.files import atomic_file, parse_json
from crnet.metrics import Agreement, IoUMeter
from crnet.model.crnet import upsample
from crnet.optional import require

SCHEMA = "crnet-bench-2"
CHART_SOURCE = "crnet bench"  # the latency chart's PNG "Source" text: how a rerun knows the file is its own
REFERENCE = RuntimeSpec("torch", "fp32")

# The JSON `crnet bench` writes (also documented in docs/BENCHMARKS.md):
#   schema            "crnet-bench-2"
#   machine           {cpu, threads, device, gpu, torch, onnxruntime, tensorrt, platform,
#                      other_processes_cpu_share: of the CPUs bench may run on, while the rounds were
#                      timed (None: unknown), other_gpu_processes: how many other processes held a
#                      context on the GPU at the start or end of those rounds (None: unknown or no GPU)}
#   settings          {checkpoint, bundle, data, fold, trained_fold, shots, episodes, batch, warmup, repeats,
#                      repeats_done, iterations, input_size}
#   interrupted       true when an interrupt ended the timed rounds early (repeats_done < repeats)
#   floor             {flops: {episode, query, encoder}, matmul_tflop_per_s: {precision: rate},
#                      best_precision, floor_ms: {episode, query, encoder}}
#   runtimes: [ {
#     spec, label, status ("ok" | "unavailable" | "failed"), reason (when not ok; "failed": a call raised),
#     latency_ms: {episode|query|encoder: {median, p90, p99, mean, min, samples}},
#     gpu_ms: {episode|query|encoder: median GPU time by CUDA events} (on a GPU; else absent),
#     throughput: {episodes_per_s, queries_per_s},
#     latency_vs_reference: this episode median / the reference episode median (lower is faster),
#     latency_vs_anchor: this episode median / the anchor row's (when the run has an anchor row),
#     floor_share: {episode, query}: floor time / this median (1.0 = every FLOP at the matmul rate),
#     prompt_cache_saving: (episode - query) / encoder, the share of one encoder pass a cached prompt saves,
#     first_calls_s: seconds of the row's first calls, which compile and capture,
#     accuracy: {miou, fbiou, per_class},
#     agreement: {pixel_agreement, mask_iou, max_abs_logit_error, mean_abs_logit_error}
#   } ]
#   triton_choices    [{shape, choice}] where a Triton row ran: each shape's pick on its first call


@dataclass(frozen=True)
class BenchSettings:
    checkpoint: Path
    bundle: Path | None
    data_root: Path
    fold: int = 0
    trained_fold: int | None = None  # the checkpoint's, where it says: another fold's classes are not novel
    shots: int = 1
    episodes: int = 1000
    batch: int = 1
    warmup: int = 5
    repeats: int = 30
    threads: int = 2
    device: str = "cpu"
    eval_batch: int = 16
    fused: bool | None = None  # torch runtimes: the native refinement op (None: when it is built)
    min_object_pixels: int | None = None  # None: the data's small-object rule


def percentile_summary(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000.0
    return {
        "median": float(np.median(ms)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "samples": len(samples),
    }


def episode_loader(settings: BenchSettings, input_size: int, count: int, batch: int) -> DataLoader:
    return fixed_episode_loader(
        settings.data_root,
        fold=settings.fold,
        shots=settings.shots,
        count=count,
        input_size=input_size,
        batch_size=batch,
        min_object_pixels=settings.min_object_pixels,
    )


def open_all(
    specs: list[RuntimeSpec], settings: BenchSettings, bundle: Bundle | None
) -> tuple[list, dict[RuntimeSpec, str]]:
    opened, unavailable = [], {}
    # The torch runtimes run the T the bundle was exported with, so that agreement compares like with like.
    iterations = None if bundle is None else bundle.iterations
    for spec in dict.fromkeys([REFERENCE, *specs]):  # reference first, each runtime once (in any order)
        try:
            opened.append(
                (
                    spec,
                    open_runtime(
                        spec,
                        checkpoint=settings.checkpoint,
                        bundle=bundle,
                        device=settings.device,
                        threads=settings.threads,
                        iterations=iterations,
                        fused=settings.fused,
                    ),
                )
            )
        except RuntimeUnavailable as error:
            if spec == REFERENCE:
                raise
            unavailable[spec] = str(error)
    return opened, unavailable


def failure(error: Exception) -> str:
    """One line for a runtime whose call raised: the table and JSON keep the other rows."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def guarded(spec: RuntimeSpec, failed: dict, call, *args):
    """`call(*args)`, or None when it raised and `spec` joined `failed`. User errors (a batch an engine
    refuses) and the reference's failures still end the bench."""
    try:
        return call(*args)
    except CRNetError:
        raise  # the user's settings: one error line, as everywhere
    except Exception as error:
        if spec == REFERENCE:
            raise
        failed[spec] = failure(error)
        return None


def first_calls(
    runtimes: list[tuple[RuntimeSpec, Runtime]], data: dict, device: torch.device, notice=None
) -> tuple[dict, dict]:
    """Every call kind once on each runtime (each compiles and captures here), so that one that raises is
    reported as failed instead of ending the bench; and the seconds each runtime's first calls took (a
    compiled row's start-up), said as each ends, so that a bench stopped midway says which row it was at."""
    query = data["query_image"].to(device)
    supports, masks = data["support_images"].to(device), data["support_masks"].to(device)

    def every_kind(runtime: Runtime) -> None:
        runtime.check_batch(supports.shape[0] * supports.shape[1])
        runtime.episode(query, supports, masks)
        features = runtime.encode(supports.flatten(0, 1)).unflatten(0, supports.shape[:2])
        runtime.query(query, runtime.prompt(features, masks))
        runtime.encode(query)  # timed too: of B images, not B K as the supports' with --shots > 1

    failed, seconds = {}, {}
    for spec, runtime in runtimes:
        start = time.perf_counter()
        guarded(spec, failed, every_kind, runtime)
        seconds[spec] = time.perf_counter() - start
        if notice is not None and spec not in failed:
            notice(f"{spec}: first calls (compiling, capturing) took {seconds[spec]:.1f} s")
    return failed, seconds


def measure_accuracy(
    runtimes: list[tuple[RuntimeSpec, Runtime]], settings: BenchSettings, progress, failed: dict
) -> dict:
    """mIoU, FB-IoU and agreement with the reference for every runtime, on the same episodes; a runtime
    whose call raises joins `failed`."""
    reference = runtimes[0][1]
    batch = min(
        [settings.eval_batch] + [rt.max_batch // settings.shots for _, rt in runtimes if rt.max_batch]
    )
    loader = episode_loader(settings, reference.input_size, settings.episodes, max(1, batch))
    classes = fold_classes(settings.fold)
    meters = {spec: IoUMeter(classes) for spec, _ in runtimes}
    agreements = {spec: Agreement() for spec, _ in runtimes}
    device = torch.device(settings.device)
    # The protocol's episodes, as `crnet eval` runs them: one whose support object misses the pooling grid
    # is kept (eval counts them), not warned of.
    with progress(settings.episodes, "accuracy") as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroPromptWarning)
        for data in loader:
            query = data["query_image"].to(device)
            supports, masks = data["support_images"].to(device), data["support_masks"].to(device)
            expected = None
            for spec, runtime in runtimes:
                if spec in failed:
                    continue
                logits = guarded(spec, failed, runtime.episode, query, supports, masks)
                if logits is None:
                    continue
                logits = logits.float().cpu()
                expected = logits if expected is None else expected
                agreements[spec].update(logits, expected)
                for i, label in enumerate(data["query_label"]):
                    resized = upsample(logits[i : i + 1], tuple(label.shape))
                    meters[spec].update(resized.argmax(1)[0].bool(), label, int(data["class_id"][i]))
            bar(len(data["query_label"]))
    return {
        spec: {"accuracy": meters[spec].result(), "agreement": agreements[spec].result()}
        for spec in meters
        if spec not in failed
    }


def measure_latency(
    runtimes: list[tuple[RuntimeSpec, Runtime]], data: dict, settings: BenchSettings, bar, stop_early=False
) -> tuple[dict, int, float | None, int | None]:
    """Every runtime timed in turns: each round times one call of each kind on each runtime, so a slow
    spell of the machine lands on all runtimes alike and the ratios stay fair. Returns the results, the
    number of timed rounds, the share of the CPUs other processes took meanwhile and, on a GPU, how many
    other processes held a context on it (None: unknown); with `stop_early`, an
    interrupt (Ctrl-C, `timeout -s INT`) after at least one timed round ends the rounds there, and the
    whole rounds done so far are the result."""
    device = torch.device(settings.device)
    query = data["query_image"].to(device)
    supports, masks = data["support_images"].to(device), data["support_masks"].to(device)
    timer = Timer(device)
    work = {}
    for spec, runtime in runtimes:
        runtime.check_batch(supports.shape[0] * supports.shape[1])
        features = runtime.encode(supports.flatten(0, 1)).unflatten(0, supports.shape[:2])
        prompt = runtime.prompt(features, masks)
        work[spec] = {
            "episode": lambda r=runtime: r.episode(query, supports, masks),
            "query": lambda r=runtime, p=prompt: r.query(query, p),
            "encoder": lambda r=runtime: r.encode(query),
        }
    rounds = []  # the timed rounds, each {spec: {kind: (seconds, gpu seconds)}}, whole rounds only
    others, gpu_others = OtherProcesses(), OtherGPUProcesses(device)
    try:
        for round_ in range(settings.warmup + settings.repeats):
            timed = {
                spec: {kind: timer(call) for kind, call in calls.items()} for spec, calls in work.items()
            }
            if round_ >= settings.warmup:
                rounds.append(timed)
            bar(1)
    except KeyboardInterrupt:
        if not (stop_early and rounds):
            raise
    sharing, gpu_sharing = others.share(), gpu_others.count()
    results = {}
    for spec, kinds in work.items():
        walls = {kind: [r[spec][kind][0] for r in rounds] for kind in kinds}
        latency = {kind: percentile_summary(values) for kind, values in walls.items()}
        episode, query_ms, encoder = (latency[k]["median"] for k in ("episode", "query", "encoder"))
        results[spec] = {
            "latency_ms": latency,
            "throughput": {
                "episodes_per_s": settings.batch * 1000.0 / episode,
                "queries_per_s": settings.batch * 1000.0 / query_ms,
            },
            "prompt_cache_saving": (episode - query_ms) / encoder,
        }
        if timer.cuda:
            gpu = {kind: float(np.median([r[spec][kind][1] for r in rounds])) * 1000.0 for kind in kinds}
            results[spec]["gpu_ms"] = gpu
    return results, len(rounds), sharing, gpu_sharing


def latency_batch(settings: BenchSettings, input_size: int) -> dict:
    """The first `batch` fixed episodes (repeated when the fold has fewer) as one batch."""
    loader = episode_loader(settings, input_size, settings.batch, settings.batch)
    return next(iter(loader))


def machine(settings: BenchSettings) -> dict:
    info = {
        "cpu": _cpu_name(),
        "threads": settings.threads,
        "device": settings.device,
        "gpu": torch.cuda.get_device_name(settings.device) if settings.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for module in ("onnxruntime", "tensorrt"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure_floor(settings: BenchSettings, iterations: int) -> dict:
    """FLOPs of each kind of call at the bench's shape, and the device's best matmul rate."""
    device = torch.device(settings.device)
    flops = checkpoint_flops(settings.checkpoint, device, settings.batch, settings.shots, iterations)
    # On a CPU half precision is often emulated (0.6 GFLOP/s against 65 in FP32 on CPU-2b): FP32 only.
    precisions = ("fp32", "fp16", "bf16") if device.type == "cuda" else ("fp32",)
    rates = {precision: matmul_rate(device, precision) for precision in precisions}
    best = max(rates, key=rates.get)
    return {
        "flops": flops.as_dict(),
        "matmul_tflop_per_s": {precision: rate / 1e12 for precision, rate in rates.items()},
        "best_precision": best,
        "floor_ms": {kind: floor_ms(n, rates[best]) for kind, n in flops.as_dict().items()},
    }


def run_bench(
    specs: list[RuntimeSpec], settings: BenchSettings, progress, notice=print, *, stop_early: bool = False
) -> dict:
    """Open every runtime, measure accuracy (unless episodes == 0) and latency; the JSON document. With
    `stop_early`, an interrupt during the timed rounds ends them, and the document has the rounds done
    (its `interrupted` is then true): a bench stopped at a deadline still gives its table."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _bench(specs, settings, progress, notice, stop_early)
    finally:
        torch.set_num_threads(threads)  # as the caller had it: CPU sums depend on the number of threads


def _bench(specs: list[RuntimeSpec], settings: BenchSettings, progress, notice, stop_early: bool) -> dict:
    bundle = None if settings.bundle is None else load_bundle(settings.bundle)
    if bundle is not None:
        bundle.check_checkpoint(settings.checkpoint)
    runtimes, unavailable = open_all(specs, settings, bundle)
    for spec, reason in unavailable.items():
        notice(f"skipping {spec}: {reason}")
    try:
        data = latency_batch(settings, runtimes[0][1].input_size)
        failed, start_up = first_calls(runtimes, data, torch.device(settings.device), notice)
        accuracy = measure_accuracy(runtimes, settings, progress, failed) if settings.episodes > 0 else {}
        unscored = next(iter(accuracy.values()), {}).get("accuracy", {}).get("classes_without_episodes")
        if unscored:  # as crnet eval says it
            notice(
                f"warning: classes {unscored} of fold {settings.fold} got no episode in {settings.episodes}: "
                "they count 0 in the mIoU (give more --episodes)"
            )
        for spec, reason in failed.items():
            notice(f"{spec} failed: {reason}")
        measured = [(spec, runtime) for spec, runtime in runtimes if spec not in failed]
        # Before the timed rounds, so that an interrupt there leaves only the writing to do.
        floor = measure_floor(settings, runtimes[0][1].iterations)
        with progress(settings.warmup + settings.repeats, "latency") as bar:
            latency, timed, sharing, gpu_sharing = measure_latency(measured, data, settings, bar, stop_early)
    finally:
        for _, runtime in runtimes:
            runtime.close()
    if timed < settings.repeats:
        notice(f"interrupted: {timed} of {settings.repeats} timed rounds done; the results are theirs")
    if sharing is not None and sharing > OTHERS_WARN:
        notice(
            f"warning: other processes used {sharing:.0%} of the CPUs while the rounds were timed: these "
            "latencies include the sharing; time on a quiet machine"
        )
    if gpu_sharing:
        notice(
            f"warning: {gpu_sharing} other process{'es' if gpu_sharing > 1 else ''} held the GPU while the "
            "rounds were timed: work they ran there is in these latencies; time on a GPU of its own"
        )
    reference_ms = latency[REFERENCE]["latency_ms"]["episode"]["median"]
    anchor = next((spec for spec, _ in measured if "anchor" in spec.options), None)
    rows = []
    for spec, runtime in measured:
        row = {"spec": str(spec), "label": runtime.label, "status": "ok", **latency[spec]}
        row["first_calls_s"] = start_up.get(spec)
        medians = {kind: row["latency_ms"][kind]["median"] for kind in ("episode", "query")}
        row["latency_vs_reference"] = medians["episode"] / reference_ms
        if anchor is not None:
            row["latency_vs_anchor"] = medians["episode"] / latency[anchor]["latency_ms"]["episode"]["median"]
        row["floor_share"] = {kind: floor["floor_ms"][kind] / ms for kind, ms in medians.items()}
        row.update(accuracy.get(spec, {}))
        rows.append(row)
    rows += [
        {"spec": str(s), "label": r.label, "status": "failed", "reason": failed[s]}
        for s, r in runtimes
        if s in failed
    ]
    rows += [
        {"spec": str(s), "label": str(s), "status": "unavailable", "reason": r}
        for s, r in unavailable.items()
    ]
    result = {
        "schema": SCHEMA,
        "machine": machine(settings)
        | {"other_processes_cpu_share": sharing, "other_gpu_processes": gpu_sharing},
        "settings": {
            "checkpoint": str(settings.checkpoint),
            "bundle": None if settings.bundle is None else str(settings.bundle),
            "data": str(settings.data_root),
            "fold": settings.fold,
            "trained_fold": settings.trained_fold,
            "shots": settings.shots,
            "episodes": settings.episodes,
            "batch": settings.batch,
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "repeats_done": timed,
            "iterations": runtimes[0][1].iterations,
            "input_size": runtimes[0][1].input_size,
        },
        "floor": floor,
        "runtimes": rows,
        "interrupted": timed < settings.repeats,
    }
    triton_conv = sys.modules.get("crnet.engines.triton_conv")  # loaded only where a Triton row ran
    if triton_conv is not None:
        result["triton_choices"] = triton_conv.choices()
    return result


def _fmt(value, digits=1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _seen(settings: dict) -> str:
    """What the table says when the fold tested is not the one the checkpoint was trained on."""
    trained = settings.get("trained_fold")  # JSONs of 2026-11-26 and before lack it
    if trained is None or trained == settings["fold"]:
        return ""
    return f" (trained on fold {trained}: classes seen in training, not few-shot)"


def format_table(result: dict) -> str:
    """The results as a Markdown table (it reads in a terminal and pastes into docs). On a GPU a column of
    GPU time; with an anchor row a column of ratios to it."""
    settings, machine_info, floor = result["settings"], result["machine"], result["floor"]
    where = machine_info["gpu"] or f"{machine_info['cpu']}, {machine_info['threads']} threads"
    ok = [row for row in result["runtimes"] if row["status"] == "ok"]
    gpu = any("gpu_ms" in row for row in ok)
    anchor = any("latency_vs_anchor" in row for row in ok)
    rate = floor["matmul_tflop_per_s"][floor["best_precision"]]
    columns = ["runtime", "episode ms (median / p90 / p99)"]
    columns += ["episode GPU ms"] if gpu else []
    columns += ["query ms, cached prompt", "episodes/s", "latency vs torch fp32"]
    columns += ["latency vs anchor"] if anchor else []
    columns += ["% of FLOP floor", "mIoU", "FB-IoU", "pixel agreement %", "mask IoU %"]
    columns += ["max / mean abs logit error"]
    lines = [
        f"{settings['input_size']}x{settings['input_size']}, {settings['shots']}-shot, "
        f"T={settings['iterations']}, batch {settings['batch']}, on {where}; accuracy on "
        f"{settings['episodes']} episodes of fold {settings['fold']}{_seen(settings)}; agreement vs torch "
        "fp32; FLOP floor "
        f"{floor['flops']['episode'] / 1e9:.3g} GFLOP per call at {rate:.3g} TFLOP/s "
        f"({floor['best_precision']} matmul) = {floor['floor_ms']['episode']:.3g} ms"
        + (
            f"; INTERRUPTED after {settings['repeats_done']} of {settings['repeats']} timed rounds"
            if result.get("interrupted")
            else ""
        ),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in result["runtimes"]:
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | {row['status']}: {row['reason']} |" + "|" * (len(columns) - 2))
            continue
        episode, query = row["latency_ms"]["episode"], row["latency_ms"]["query"]
        accuracy, agreement = row.get("accuracy", {}), row.get("agreement", {})
        error = (
            f"{agreement['max_abs_logit_error']:.2g} / {agreement['mean_abs_logit_error']:.2g}"
            if agreement
            else "-"
        )
        cells = [row["label"], f"{episode['median']:.2f} / {episode['p90']:.2f} / {episode['p99']:.2f}"]
        cells += [f"{row['gpu_ms']['episode']:.2f}"] if gpu else []
        cells += [
            f"{query['median']:.2f}",
            f"{row['throughput']['episodes_per_s']:.1f}",
            f"{row['latency_vs_reference']:.2f}",
        ]
        cells += [f"{row['latency_vs_anchor']:.2f}"] if anchor else []
        cells += [
            f"{100 * row['floor_share']['episode']:.1f}",
            _fmt(accuracy.get("miou")),
            _fmt(accuracy.get("fbiou")),
            _fmt(agreement.get("pixel_agreement"), 2),
            _fmt(agreement.get("mask_iou"), 2),
            error,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_latency(result: dict, path: Path, replaces=None) -> None:
    """Bar chart of episode and cached-prompt query latency per runtime (MissingDependencyError without
    matplotlib); `replaces` as crnet.files.atomic_file takes it."""
    matplotlib = require("matplotlib", "the latency chart")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in result["runtimes"] if row["status"] == "ok"]
    labels = [row["label"] for row in rows]
    positions = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    for offset, kind in ((-0.2, "episode"), (0.2, "query")):
        medians = [row["latency_ms"][kind]["median"] for row in rows]
        p90 = [row["latency_ms"][kind]["p90"] - m for row, m in zip(rows, medians, strict=True)]
        axis.bar(positions + offset, medians, 0.4, yerr=[[0] * len(rows), p90], capsize=3, label=kind)
    axis.set_xticks(positions, labels, rotation=20, ha="right")
    axis.set_ylabel("latency, ms (median, bar to p90)")
    axis.set_title(f"crnet bench: {result['settings']['input_size']}px, batch {result['settings']['batch']}")
    axis.legend()
    figure.tight_layout()
    with atomic_file(path, replaces) as temporary:
        figure.savefig(temporary, dpi=120, format="png", metadata={"Source": CHART_SOURCE})
    plt.close(figure)


def is_bench_json(path: Path) -> bool:
    """Whether `path` holds a JSON this command wrote (any schema version), which a rerun may replace."""
    try:
        return str(parse_json(path.read_text()).get("schema", "")).startswith("crnet-bench-")
    except (OSError, ValueError, AttributeError):
        return False


def is_complete_bench_json(path: Path) -> bool:
    """Whether `path` holds the JSON of a bench that ran all its rounds: an interrupted bench keeps it."""
    try:
        return is_bench_json(path) and parse_json(path.read_text()).get("interrupted") is False
    except (OSError, ValueError, AttributeError):
        return False


def is_bench_chart(path: Path) -> bool:
    """Whether `path` is a latency chart this command drew (its PNG text says so)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Source") == CHART_SOURCE
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


__all__ = [
    "SCHEMA",
    "BenchSettings",
    "format_table",
    "is_bench_chart",
    "is_bench_json",
    "is_complete_bench_json",
    "plot_latency",
    "run_bench",
]
