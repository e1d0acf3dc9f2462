"""`crnet bench` harness: the JSON it promises, a table, a chart, unavailable runtimes reported."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from crnet.commands.bench import (
    SCHEMA,
    BenchSettings,
    format_table,
    percentile_summary,
    plot_latency,
    run_bench,
)
from crnet.commands.timer import Timer
from crnet.engines import RuntimeSpec


@contextlib.contextmanager
def no_bar(total, what):
    yield lambda n: None


@pytest.fixture(scope="module")
def result(micro_checkpoint, micro_bundle, bench_root):
    settings = BenchSettings(
        checkpoint=micro_checkpoint,
        bundle=micro_bundle,
        data_root=bench_root,
        episodes=6,
        batch=2,
        warmup=1,
        repeats=3,
        threads=1,
        eval_batch=4,
    )
    specs = [RuntimeSpec.parse(s) for s in ("onnxruntime:fp32", "onnxruntime:fp16", "tensorrt:fp16")]
    notices, threads = [], []
    # The caller's thread count is other than the bench's, and each notice notes what the bench ran with.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = run_bench(
            specs,
            settings,
            no_bar,
            notice=lambda n: (notices.append(n), threads.append(torch.get_num_threads())),
        )
        result["threads_after"] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    result["notices"], result["threads_during"] = notices, threads
    return result


def rows(result):
    return {row["spec"]: row for row in result["runtimes"]}


def test_bench_pins_its_threads_and_gives_the_callers_back(result) -> None:
    """A bench run inside a longer process (demo, tests) leaves that process's CPU threads as they were: CPU
    sums depend on their number, so a changed count changes later results."""
    assert result["threads_during"] and set(result["threads_during"]) == {1}
    assert result["threads_after"] == 2


def test_schema(result) -> None:
    assert result["schema"] == SCHEMA
    assert result["machine"]["threads"] == 1 and result["machine"]["torch"] == torch.__version__
    assert result["settings"]["episodes"] == 6 and result["settings"]["batch"] == 2
    reference = rows(result)["torch:fp32"]  # always measured, first
    assert result["runtimes"][0] is reference or result["runtimes"][0]["spec"] == "torch:fp32"
    for row in result["runtimes"]:
        if row["status"] != "ok":
            continue
        for kind in ("episode", "query", "encoder"):
            figures = row["latency_ms"][kind]
            assert figures["samples"] == 3
            assert 0 < figures["min"] <= figures["median"] <= figures["p90"] <= figures["p99"]
        assert row["throughput"]["episodes_per_s"] == pytest.approx(
            2000 / row["latency_ms"]["episode"]["median"]
        )
        assert set(row["accuracy"]) >= {"miou", "fbiou", "per_class"}
        # each row's start-up (its first calls, which compile and capture), timed and said as it ended
        assert row["first_calls_s"] > 0
        said = f"{row['spec']}: first calls (compiling, capturing) took {row['first_calls_s']:.1f} s"
        assert said in result["notices"]
        assert set(row["agreement"]) == {
            "pixel_agreement",
            "mask_iou",
            "max_abs_logit_error",
            "mean_abs_logit_error",
        }
    floor = result["floor"]
    assert floor["flops"]["episode"] > floor["flops"]["query"] > floor["flops"]["encoder"] > 0
    assert set(floor["matmul_tflop_per_s"]) == (
        {"fp32", "fp16", "bf16"} if result["machine"]["device"].startswith("cuda") else {"fp32"}
    )
    for row in result["runtimes"]:
        if row["status"] == "ok":
            episode_ms = row["latency_ms"]["episode"]["median"]
            assert row["floor_share"]["episode"] == pytest.approx(floor["floor_ms"]["episode"] / episode_ms)
            on_gpu = result["machine"]["device"].startswith("cuda")
            assert ("gpu_ms" in row) == on_gpu and "latency_vs_anchor" not in row
    json.dumps(result)  # serialisable as written


def test_reference_agrees_with_itself_and_onnxruntime_with_it(result) -> None:
    table = rows(result)
    reference = table["torch:fp32"]
    assert (
        reference["agreement"]["pixel_agreement"] == 100.0
        and reference["agreement"]["max_abs_logit_error"] == 0
    )
    assert reference["latency_vs_reference"] == 1.0
    fp32 = table["onnxruntime:fp32"]
    assert fp32["agreement"]["pixel_agreement"] >= 99.9
    assert fp32["agreement"]["max_abs_logit_error"] < 1e-3
    assert fp32["accuracy"]["miou"] == pytest.approx(reference["accuracy"]["miou"], abs=0.5)


def test_unavailable_runtime_is_reported_not_fatal(result) -> None:
    if torch.cuda.is_available():
        pytest.skip("tensorrt may be available on a CUDA machine")
    row = rows(result)["tensorrt:fp16"]
    assert row["status"] == "unavailable" and "CUDA" in row["reason"]
    assert any("skipping tensorrt:fp16" in line for line in result["notices"])


def test_table_and_chart(result, tmp_path) -> None:
    table = format_table(result)
    assert table.count("\n| ") == len(result["runtimes"]) + 1  # header + one row per runtime
    assert "onnxruntime fp16" in table and "unavailable" in table
    pytest.importorskip("matplotlib")
    plot_latency(result, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_anchor_row_gives_every_row_its_ratio(micro_checkpoint, bench_root) -> None:
    settings = BenchSettings(
        checkpoint=micro_checkpoint, bundle=None, data_root=bench_root, episodes=2, warmup=1, repeats=2
    )
    result = run_bench([RuntimeSpec.parse("torch:fp32+anchor")], settings, no_bar)
    table = rows(result)
    anchor = table["torch:fp32+anchor"]
    assert anchor["latency_vs_anchor"] == 1.0 and anchor["agreement"]["pixel_agreement"] > 99
    reference = table["torch:fp32"]
    assert reference["latency_vs_anchor"] == pytest.approx(
        reference["latency_ms"]["episode"]["median"] / anchor["latency_ms"]["episode"]["median"]
    )
    assert "latency vs anchor" in format_table(result).splitlines()[2]


def test_a_runtime_named_twice_in_another_order_runs_once(micro_checkpoint, bench_root) -> None:
    """`torch+torch-loop+channels-last` is `torch+channels-last+torch-loop`: one row, not two of one label."""
    settings = BenchSettings(
        checkpoint=micro_checkpoint, bundle=None, data_root=bench_root, episodes=0, warmup=0, repeats=1
    )
    names = ("torch+channels-last+torch-loop", "torch+torch-loop+channels-last")
    result = run_bench([RuntimeSpec.parse(name) for name in names], settings, no_bar)
    benched = [row["spec"] for row in result["runtimes"]]
    assert benched == ["torch:fp32", "torch:fp32+channels-last+torch-loop"]


def test_percentiles() -> None:
    figures = percentile_summary([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert figures["median"] == pytest.approx(50.5)
    assert figures["p90"] == pytest.approx(90.1)
    assert figures["p99"] == pytest.approx(99.01)


def test_reference_runs_the_bundles_iterations(micro_checkpoint, bench_root, tmp_path) -> None:
    from crnet.export.build import export_bundle

    bundle = export_bundle(micro_checkpoint, tmp_path / "t2", iterations=2).bundle
    settings = BenchSettings(
        checkpoint=micro_checkpoint, bundle=bundle, data_root=bench_root, episodes=4, warmup=0, repeats=1
    )
    result = run_bench([RuntimeSpec("onnxruntime")], settings, no_bar)
    assert result["settings"]["iterations"] == 2
    assert rows(result)["onnxruntime:fp32"]["agreement"]["max_abs_logit_error"] < 1e-3


@pytest.mark.parametrize("when", ["first call", "accuracy"])
def test_a_runtime_whose_call_raises_is_reported_not_fatal(micro_checkpoint, bench_root, monkeypatch, when):
    """A row that fails (a capture a driver refuses, say) costs its own row only: the others are measured."""
    import crnet.commands.bench as bench

    def breaking(spec, **options):
        runtime = bench_open_runtime(spec, **options)
        if spec.options == ("channels-last",):

            def episode(*args):
                raise RuntimeError("operation not permitted when stream is capturing\nsecond line")

            runtime.episode = episode
        return runtime

    bench_open_runtime = bench.open_runtime
    monkeypatch.setattr(bench, "open_runtime", breaking)
    settings = BenchSettings(
        checkpoint=micro_checkpoint, bundle=None, data_root=bench_root, episodes=4, eval_batch=2, repeats=2
    )
    if when == "accuracy":
        monkeypatch.setattr(bench, "first_calls", lambda *args: ({}, {}))  # the accuracy pass meets it first
    notices = []
    specs = [RuntimeSpec.parse(s) for s in ("torch:fp32+channels-last", "torch:fp32+torch-loop")]
    result = run_bench(specs, settings, no_bar, notice=notices.append)
    table = rows(result)
    broken = table["torch:fp32+channels-last"]
    assert broken["status"] == "failed"
    assert broken["reason"] == "RuntimeError: operation not permitted when stream is capturing"
    assert table["torch:fp32"]["status"] == table["torch:fp32+torch-loop"]["status"] == "ok"
    assert any("torch:fp32+channels-last failed" in line for line in notices)
    assert "| torch fp32 channels-last fused | failed: RuntimeError" in format_table(result)


class InterruptingTimer:
    """bench's Timer, but the `at`-th timed call (counting from 1) is a Ctrl-C."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, device):
        timer = Timer(device)

        def timed(work):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
            return timer(work)

        timed.cuda = timer.cuda
        return timed


# Two rows (the reference and one) and three kinds of call: six timed calls a round.
CALLS_PER_ROUND = 6


@pytest.mark.parametrize("stop_early", [True, False])
def test_an_interrupt_in_the_timed_rounds_keeps_the_rounds_done(
    micro_checkpoint, bench_root, monkeypatch, stop_early
) -> None:
    """A bench stopped at a deadline (`timeout -s INT`) gives the table of its whole timed rounds, and says
    so; without stop_early (the demo) the interrupt goes on up."""
    import crnet.commands.bench as bench

    # Round 4 of 1 warm-up + 5 timed is cut in its third call: timed rounds 2 and 3 are whole.
    monkeypatch.setattr(bench, "Timer", InterruptingTimer(3 * CALLS_PER_ROUND + 3))
    settings = BenchSettings(
        checkpoint=micro_checkpoint, bundle=None, data_root=bench_root, episodes=0, warmup=1, repeats=5
    )
    notices = []
    specs = [RuntimeSpec.parse("torch:fp32+channels-last")]
    if not stop_early:
        with pytest.raises(KeyboardInterrupt):
            run_bench(specs, settings, no_bar, notice=notices.append)
        return
    result = run_bench(specs, settings, no_bar, notice=notices.append, stop_early=True)
    assert result["interrupted"] and result["settings"]["repeats_done"] == 2
    for row in result["runtimes"]:
        assert row["status"] == "ok"
        assert {figures["samples"] for figures in row["latency_ms"].values()} == {2}
    assert "interrupted: 2 of 5 timed rounds done; the results are theirs" in notices
    assert "INTERRUPTED after 2 of 5 timed rounds" in format_table(result).splitlines()[0]


def test_an_interrupt_before_a_whole_timed_round_ends_the_bench(micro_checkpoint, bench_root, monkeypatch):
    import crnet.commands.bench as bench

    monkeypatch.setattr(bench, "Timer", InterruptingTimer(CALLS_PER_ROUND + 2))  # in the first timed round
    settings = BenchSettings(
        checkpoint=micro_checkpoint, bundle=None, data_root=bench_root, episodes=0, warmup=1, repeats=5
    )
    with pytest.raises(KeyboardInterrupt):
        run_bench([RuntimeSpec.parse("torch:fp32+channels-last")], settings, no_bar, stop_early=True)


def test_a_finished_bench_is_not_interrupted(result) -> None:
    assert result["interrupted"] is False and result["settings"]["repeats_done"] == 3
    assert "INTERRUPTED" not in format_table(result)


def interrupted_bench(checkpoint, data, out, monkeypatch) -> int:
    """`crnet bench` of one torch row into `out`, interrupted after its first whole timed round of 4; its
    exit code."""
    import sys

    import crnet.commands.bench as bench
    from crnet.commands import cli

    monkeypatch.setattr(bench, "Timer", InterruptingTimer(2 * CALLS_PER_ROUND + 1))  # one timed round whole
    argv = ["crnet", "bench", str(checkpoint), "--data", str(data), "--runtime"]
    argv += ["torch:fp32+channels-last", "--episodes", "0", "--warmup", "1", "--repeats", "4"]
    argv += ["--device", "cpu", "--json", str(out), "--no-progress"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code


def test_crnet_bench_interrupted_writes_its_rounds_and_exits_130(
    micro_checkpoint, bench_root, monkeypatch, capsys, tmp_path
) -> None:
    import crnet.commands.bench as bench

    out = tmp_path / "bench.json"
    chart = out.with_suffix(".png")
    chart.write_bytes(b"an earlier run's chart")
    monkeypatch.setattr(bench, "is_bench_chart", lambda path: path == chart)
    assert interrupted_bench(micro_checkpoint, bench_root, out, monkeypatch) == 130
    stdout, stderr = capsys.readouterr()
    assert "INTERRUPTED after 1 of 4 timed rounds" in stdout and "| torch fp32 channels-last" in stdout
    lines = stderr.splitlines()
    assert "interrupted: 1 of 4 timed rounds done; the results are theirs" in lines
    written = json.loads(out.read_text())
    assert written["interrupted"] and written["settings"]["repeats_done"] == 1
    # The chart of the rounds done replaces the earlier one; without matplotlib the earlier one stays.
    try:
        import matplotlib  # noqa: F401

        assert lines[-3:] == [f"wrote {out}", f"wrote {chart}", "interrupted"]
        assert chart.read_bytes().startswith(b"\x89PNG")
    except ImportError:
        assert (
            lines[-3] == f"wrote {out}"
            and lines[-2].startswith("no latency chart")
            and lines[-1] == "interrupted"
        )
        assert chart.read_bytes() == b"an earlier run's chart"


def test_a_rerun_replaces_its_own_json_and_chart_and_nothing_else(
    micro_checkpoint, bench_root, monkeypatch, capsys, tmp_path
) -> None:
    """`crnet bench` twice into one --json: the second replaces the first's JSON and chart (recognised by
    the schema and the PNG's Source text); a file that only looks alike (a JSON of other keys, a PNG of
    the user's) is never taken for one of them."""
    import sys

    from PIL import Image

    from crnet.commands import cli
    from crnet.commands.bench import is_bench_chart, is_bench_json

    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.json"
    argv = ["crnet", "bench", str(micro_checkpoint), "--data", str(bench_root), "--runtime", "torch:fp32"]
    argv += ["--episodes", "0", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--no-progress"])
    for _ in range(2):
        cli.main()  # returns: a SystemExit here would be an error
        assert is_bench_json(out) and is_bench_chart(out.with_suffix(".png"))
    capsys.readouterr()
    (tmp_path / "other.json").write_text(json.dumps({"schema": "someone-else-1", "runtimes": []}))
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    assert not is_bench_json(tmp_path / "other.json") and not is_bench_json(tmp_path / "photo.png")
    assert not is_bench_chart(tmp_path / "photo.png") and not is_bench_chart(out)


def test_eval_json_is_recognised_by_its_keys(tmp_path) -> None:
    from crnet.commands.cli import is_eval_json

    (tmp_path / "ours.json").write_text(json.dumps({"checkpoint": "m.pt", "data": "d", "results": []}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{")
    assert is_eval_json(tmp_path / "ours.json")
    assert not any(is_eval_json(tmp_path / n) for n in ("list.json", "broken.json", "absent.json"))


def test_bench_ops_refuses_a_foreign_json_before_it_runs(tmp_path, monkeypatch, capsys) -> None:
    """The native op's developer bench wrote its --json after minutes of timing, over any file there."""
    from crnet.commands import bench_ops
    from crnet.commands.script_args import run

    monkeypatch.setattr(bench_ops, "compare", lambda *a, **k: pytest.fail("ran before checking --json"))
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG the user's")
    refused = (["--json", str(photo)], ["--json", str(tmp_path)], ["--iterations", "51"], ["--repeats", "0"])
    for args in refused:
        with pytest.raises(SystemExit) as exit_info:
            run(lambda args=args: bench_ops.main(args))
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")  # not argparse's usage block
    assert photo.read_bytes() == b"\x89PNG the user's"
    earlier = tmp_path / "ops.json"
    earlier.write_text(json.dumps({"schema": bench_ops.SCHEMA, "runs": []}))
    assert bench_ops.is_ops_json(earlier) and not bench_ops.is_ops_json(photo)


def test_bench_ops_interrupted_is_one_line() -> None:
    """Stopped in its timing (Ctrl-C, or SIGTERM as Ctrl-C): one line and exit 130, no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from crnet import ops

    if not ops.AVAILABLE:
        pytest.skip(f"the native op is not built: {ops.MISSING}")
    repo = Path(__file__).parents[2]
    # Its modules loaded first (torch takes seconds), then run as `python -m` runs it.
    script = (
        "import runpy, sys; import crnet.commands.bench_ops; print('loaded', file=sys.stderr, flush=True); "
        "sys.argv = ['bench_ops', '--repeats', '100000', '--threads', '1']; import warnings; "
        "warnings.filterwarnings('ignore', message='.*found in sys.modules');"
        "runpy.run_module('crnet.commands.bench_ops', run_name='__main__')"
    )
    for number in (signal.SIGINT, signal.SIGTERM):
        process = subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=repo,
            env={**os.environ, "PYTHONPATH": str(repo)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stderr.readline() == "loaded\n"
            time.sleep(1)  # in its timed rounds
            process.send_signal(number)
            _, stderr = process.communicate(timeout=120)
        finally:  # a run that ignored the signal would go on for hours, a core to itself, after the suite
            process.kill()
            process.wait()
        assert process.returncode == 130 and stderr.splitlines() == ["interrupted"], stderr


@pytest.mark.parametrize("fold, tested, warned", [(None, 2, False), (2, 2, False), (0, 0, True)])
def test_bench_tests_the_fold_its_checkpoint_was_trained_on(
    micro_checkpoint, bench_root, tmp_path, monkeypatch, capsys, fold, tested, warned
) -> None:
    """bench scored every checkpoint on fold 0: one trained on fold 2 on classes it had trained on, reported
    as novel. Like eval, it now tests the checkpoint's own fold unless asked, and warns about another."""
    import sys

    from crnet.checkpoint import load, save_atomic
    from crnet.commands import cli

    checkpoint = save_atomic(load(micro_checkpoint) | {"train_config": {"fold": 2}}, tmp_path / "fold2.pt")
    out = tmp_path / "bench.json"
    argv = ["crnet", "bench", str(checkpoint), "--data", str(bench_root), "--runtime", "torch:fp32"]
    argv += ["--episodes", "2", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--json", str(out)]
    argv += ["--no-progress"] + ([] if fold is None else ["--fold", str(fold)])
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    settings = json.loads(out.read_text())["settings"]
    assert settings["fold"] == tested and settings["trained_fold"] == 2
    printed, stderr = capsys.readouterr()
    lines = stderr.splitlines()
    assert len([line for line in lines if "was trained on fold 2" in line]) == warned
    # the table and the JSON say it too: a saved result must not pass for a few-shot one
    assert ("(trained on fold 2: classes seen in training, not few-shot)" in printed) == warned
    # 2 episodes for 5 classes: as eval does, bench says that the classes without one count 0 in the mIoU
    assert len([line for line in lines if "got no episode in 2: they count 0" in line]) == 1


def bench_on_cpu(monkeypatch, checkpoint, data, out, episodes: int) -> dict:
    """`crnet bench CHECKPOINT` with its default rows on the CPU, one timed round: the JSON it writes."""
    import sys

    from crnet.commands import cli

    argv = ["crnet", "bench", str(checkpoint), "--data", str(data), "--episodes", str(episodes)]
    argv += ["--warmup", "0", "--repeats", "1", "--device", "cpu", "--json", str(out), "--no-progress"]
    monkeypatch.setattr(sys, "argv", argv)
    cli.main()
    return json.loads(out.read_text())


def test_a_plain_bench_without_a_bundle_benches_torch(micro_checkpoint, bench_root, tmp_path, monkeypatch):
    """`crnet bench model.pt` failed: its default rows included ONNX Runtime's, which need --bundle."""
    result = bench_on_cpu(monkeypatch, micro_checkpoint, bench_root, tmp_path / "bench.json", episodes=2)
    assert [row["spec"] for row in result["runtimes"]] == ["torch:fp32"]


def test_a_bench_that_shared_its_cpus_says_so(micro_checkpoint, bench_root, tmp_path, monkeypatch, capsys):
    """Two benches at once on 2 cores timed torch fp32 at ~2500 ms an episode against 21 ms alone, with no
    word: the share of the CPUs other processes took during the timed rounds is in the JSON, and said."""
    from crnet.commands import bench

    monkeypatch.setattr(bench.OtherProcesses, "share", lambda self: 0.45)
    machine = bench_on_cpu(monkeypatch, micro_checkpoint, bench_root, tmp_path / "bench.json", 0)["machine"]
    assert machine["other_processes_cpu_share"] == 0.45 and machine["other_gpu_processes"] is None  # a CPU's
    assert (
        "warning: other processes used 45% of the CPUs while the rounds were timed" in capsys.readouterr().err
    )


def test_a_bench_that_shared_its_gpu_says_so(micro_checkpoint, bench_root, tmp_path, monkeypatch, capsys):
    """The GPU check's tiny bench ran beside the test suite on the same GPU, and said nothing of it."""
    from crnet.commands import bench

    monkeypatch.setattr(bench.OtherGPUProcesses, "count", lambda self: 2)
    monkeypatch.setattr(bench.OtherProcesses, "share", lambda self: 0.0)
    machine = bench_on_cpu(monkeypatch, micro_checkpoint, bench_root, tmp_path / "bench.json", 0)["machine"]
    assert machine["other_gpu_processes"] == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: 2 other processes held the GPU while the rounds were timed: work they ran there is in "
        "these latencies; time on a GPU of its own"
    ]


def test_an_interrupted_bench_keeps_an_earlier_whole_result(
    micro_checkpoint, bench_root, monkeypatch, capsys, tmp_path
) -> None:
    """An interrupt replaced a complete earlier bench.json and chart with two rounds of a new run."""
    import crnet.commands.bench as bench

    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    earlier = {"schema": bench.SCHEMA, "interrupted": False, "runtimes": []}
    out.write_text(json.dumps(earlier))
    chart.write_bytes(b"the earlier run's chart")
    monkeypatch.setattr(bench, "is_bench_chart", lambda path: path == chart)
    assert interrupted_bench(micro_checkpoint, bench_root, out, monkeypatch) == 130
    stdout, stderr = capsys.readouterr()
    assert "INTERRUPTED after 1 of 4 timed rounds" in stdout  # the table of the rounds done, still
    assert f"kept {out} and its chart: they hold a whole run; these rounds are not saved" in stderr
    assert json.loads(out.read_text()) == earlier and chart.read_bytes() == b"the earlier run's chart"
    # an earlier interrupted result is replaced, as an absent one is written
    out.write_text(json.dumps(earlier | {"interrupted": True}))
    assert interrupted_bench(micro_checkpoint, bench_root, out, monkeypatch) == 130
    assert json.loads(out.read_text())["settings"]["repeats_done"] == 1
