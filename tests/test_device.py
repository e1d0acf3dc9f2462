"""Device selection and the inference commands' floating-point mode."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from crnet.device import resolve_device
from crnet.errors import CRNetError

DENORMAL = 1e-39  # under float32's smallest normal number, 1.18e-38


def run(code: str) -> str:
    """Run code in a fresh interpreter: the floating-point mode is per process, and tests share one."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_cpu_inference_flushes_denormals_to_zero() -> None:
    out = run(f"""
        import torch
        from crnet.device import flush_denormals_for_inference
        x = torch.full((64,), {DENORMAL})
        before = (x * 1.0).min().item()
        flush_denormals_for_inference(torch.device("cpu"))
        print(before > 0, (x * 1.0).max().item() == 0, (torch.full((64,), 1e-30) * 1.0).min().item() > 0)
    """)
    assert out == "True True True"  # denormals read as zero after, normal numbers untouched


def test_a_gpu_device_leaves_the_cpu_mode_alone() -> None:
    out = run(f"""
        import torch
        from crnet.device import flush_denormals_for_inference
        flush_denormals_for_inference(torch.device("cuda"))
        print((torch.full((64,), {DENORMAL}) * 1.0).min().item() > 0)
    """)
    assert out == "True"


class Flushed(Exception):
    """Raised in place of the flush: the command got there."""


@pytest.mark.parametrize("command", ["eval", "bench", "infer", "demo"])
def test_inference_commands_flush_denormals(command, micro_checkpoint, bench_root, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import crnet.device
    from crnet.commands.cli import app

    def flushed(device):
        raise Flushed(device.type)

    monkeypatch.setattr(crnet.device, "flush_denormals_for_inference", flushed)
    image = tmp_path / "q.png"
    image.write_bytes(b"")
    args = {
        "eval": ["eval", str(micro_checkpoint), "--data", str(bench_root), "--device", "cpu"],
        "bench": ["bench", str(micro_checkpoint), "--data", str(bench_root), "--device", "cpu"],
        "infer": [
            "infer",
            "--engine",
            str(micro_checkpoint),
            "--support",
            str(image),
            "--support-mask",
            str(image),
            "--query",
            str(image),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
        "demo": [
            "demo",
            "--checkpoint",
            str(micro_checkpoint),
            "--data",
            str(bench_root),
            "--out",
            str(tmp_path / "demo"),
            "--device",
            "cpu",
        ],
    }[command]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, Flushed), result.output
    assert str(result.exception) == "cpu"


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(CRNetError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    assert resolve_device("cpu:0") == torch.device("cpu:0")
    with pytest.raises(CRNetError, match="the CPU is one device"):
        resolve_device("cpu:7")


def test_a_cuda_index_past_the_gpus_is_a_user_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(CRNetError, match="has 1 CUDA GPU"):
        resolve_device("cuda:1")


@pytest.mark.parametrize(
    "spec, cuda, providers, expected",
    [
        ("torch", False, None, "cpu"),
        ("torch:fp16", True, None, "cuda"),
        ("onnxruntime", True, ["CPUExecutionProvider"], "cpu"),  # pip's CPU build on a GPU machine
        ("onnxruntime", True, ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda"),
        ("onnxruntime+cuda", True, ["CPUExecutionProvider"], "cuda"),  # asked for: its runtime says why not
        ("tensorrt:fp16", True, None, "cuda"),
    ],
)
def test_auto_picks_a_device_the_runtime_can_use(spec, cuda, providers, expected, monkeypatch) -> None:
    import onnxruntime

    from crnet.engines import RuntimeSpec, runtime_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if providers is not None:
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    assert runtime_device(RuntimeSpec.parse(spec), None) == torch.device(expected)
    assert runtime_device(RuntimeSpec.parse(spec), torch.device("cpu")) == torch.device("cpu")  # asked for
