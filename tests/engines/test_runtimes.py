"""Every runtime behind one interface, against the PyTorch model itself."""

from __future__ import annotations

import gc
import weakref
from unittest.mock import patch

import pytest
import torch
import torch._inductor.freezing as inductor_freezing

from crnet import checkpoint
from crnet.bundle import load_bundle
from crnet.engines import DEPLOYED_GPU, RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.errors import CRNetError, NoSupportError
from crnet.model import chunked_neck as chunking
from crnet.model.conv_epilogues import BareNeck
from crnet.model.crnet import upsample

# Tolerances on logits (O(0.1) for the untrained micro model). FP32 runtimes differ from eager PyTorch in
# summation order only; FP16 keeps ~3 significant digits, BF16 ~2, through a dozen layers.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
SPECS = ["torch:fp32", "torch:bf16+channels-last", "onnxruntime:fp32", "onnxruntime:fp16"]


def episode(shots: int, batch: int = 2, size: int = 33):
    generator = torch.Generator().manual_seed(shots)
    query = torch.randn(batch, 3, size, size, generator=generator)
    supports = torch.randn(batch, shots, 3, size, size, generator=generator)
    masks = (torch.rand(batch, shots, size, size, generator=generator) > 0.6).long()
    masks[:, :, :2] = 255  # an ignore band counts as background
    return query, supports, masks


@pytest.fixture(params=SPECS)
def runtime(request, micro_checkpoint, micro_bundle):
    with open_runtime(
        RuntimeSpec.parse(request.param),
        checkpoint=micro_checkpoint,
        bundle=load_bundle(micro_bundle),
        threads=1,
    ) as opened:
        yield opened


@pytest.mark.parametrize("shots", [1, 3])
def test_episode_matches_the_model(runtime, micro_checkpoint, shots) -> None:
    model = checkpoint.load_model(micro_checkpoint)
    query, supports, masks = episode(shots)
    with torch.no_grad():
        expected = upsample(model(query, supports, masks).query, (33, 33))
    logits = runtime.episode(query, supports, masks)
    assert logits.shape == (2, 2, 33, 33) and logits.dtype == torch.float32
    tolerance = TOLERANCE[runtime.precision]
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)


def test_prompt_averages_the_shots(runtime, micro_checkpoint) -> None:
    model = checkpoint.load_model(micro_checkpoint)
    _, supports, masks = episode(3)
    features = runtime.encode(supports.flatten(0, 1)).unflatten(0, (2, 3))
    prompt = runtime.prompt(features, masks)
    with torch.no_grad():
        expected = model.prompt(model.encode(supports.flatten(0, 1)).unflatten(0, (2, 3)), masks)
    tolerance = TOLERANCE[runtime.precision]
    torch.testing.assert_close(prompt.vector, expected.vector, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(prompt.prototype, expected.prototype, atol=tolerance, rtol=tolerance)


def test_a_cached_prompt_serves_other_queries(runtime) -> None:
    query, supports, masks = episode(1)
    features = runtime.encode(supports.flatten(0, 1)).unflatten(0, (2, 1))
    prompt = runtime.prompt(features, masks)
    cached = runtime.segment(runtime.encode(query), prompt)
    torch.testing.assert_close(cached, runtime.episode(query, supports, masks))


def test_every_output_is_fp32_whatever_the_precision(runtime) -> None:
    """The runtime contract (engines/base.py): FP32 in and out, so callers never see a bf16 or fp16 tensor."""
    query, supports, masks = episode(1)
    features = runtime.encode(query)
    prompt = runtime.prompt(runtime.encode(supports.flatten(0, 1)).unflatten(0, (2, 1)), masks)
    outputs = {"features": features, "vector": prompt.vector, "prototype": prompt.prototype}
    outputs["logits"] = runtime.segment(features, prompt)
    assert {name: x.dtype for name, x in outputs.items()} == dict.fromkeys(outputs, torch.float32)


@pytest.mark.parametrize("text", SPECS)
def test_a_closed_runtime_refuses_every_call_and_lets_its_weights_go(
    text, micro_checkpoint, micro_bundle
) -> None:
    """close() released the CUDA graphs but not the torch runtime's weights, and a later call on any
    runtime captured again or failed with a KeyError of its own."""
    query, supports, masks = episode(1)
    opened = open_runtime(
        RuntimeSpec.parse(text), checkpoint=micro_checkpoint, bundle=load_bundle(micro_bundle), threads=1
    )
    features = opened.encode(supports.flatten(0, 1))
    prompt = opened.prompt(features.unflatten(0, (2, 1)), masks)
    weights = weakref.ref(opened.model) if isinstance(opened, TorchRuntime) else None
    opened.close()
    opened.close()  # twice is once
    calls = [
        lambda: opened.encode(query),
        lambda: opened.prompt(features.unflatten(0, (2, 1)), masks),
        lambda: opened.prompt_per_shot(features, masks[:, 0, None].float()),
        lambda: opened.segment(features, prompt),
        lambda: opened.episode(query, supports, masks),
        lambda: opened.query(query, prompt),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=f"this {opened.label} runtime is closed"):
            call()
    if weights is not None:
        gc.collect()
        assert weights() is None


def test_zero_shots_is_refused(runtime) -> None:
    with pytest.raises(NoSupportError):
        runtime.prompt(torch.zeros(1, 0, 16, 5, 5), torch.zeros(1, 0, 33, 33, dtype=torch.long))


@pytest.mark.parametrize(
    "text, message",
    [
        ("caffe", "unknown runtime 'caffe'"),
        ("onnxruntime:bf16", "must be one of fp32, fp16"),
        ("torch:int4", "must be one of fp32, fp16, bf16"),
        ("torch:fp32+turbo", "has no option 'turbo'"),
        ("tensorrt:fp16+compile", "has no option 'compile'"),
        ("torch:fp16+anchor+channels-last", "anchor is plain torch.compile and takes no other option"),
        ("onnxruntime:", "no precision after it"),
        ("onnxruntime:fp16+tensorrt+cuda", "give one execution provider"),
    ],
)
def test_bad_specs(text, message) -> None:
    with pytest.raises(RuntimeUnavailable, match=message):
        RuntimeSpec.parse(text)


def test_spec_round_trip() -> None:
    assert str(RuntimeSpec.parse("torch:fp16+channels-last")) == "torch:fp16+channels-last"
    assert RuntimeSpec.parse("onnxruntime") == RuntimeSpec("onnxruntime", "fp32")
    # a bare tensorrt is fp16 in every command (bench took it as fp32, infer as fp16)
    assert RuntimeSpec.parse("tensorrt") == RuntimeSpec("tensorrt", "fp16")
    assert RuntimeSpec.parse("tensorrt:fp32").precision == "fp32"
    assert RuntimeSpec.parse("onnxruntime", defaults={"onnxruntime": "fp16"}).precision == "fp16"


def test_runtimes_name_what_they_need(micro_checkpoint, micro_bundle) -> None:
    with pytest.raises(RuntimeUnavailable, match="needs an exported bundle"):
        open_runtime(RuntimeSpec("onnxruntime"), checkpoint=micro_checkpoint)
    with pytest.raises(RuntimeUnavailable, match="needs a checkpoint"):
        open_runtime(RuntimeSpec("torch"), bundle=load_bundle(micro_bundle))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_runtimes_refuse_without_cuda(micro_checkpoint, micro_bundle) -> None:
    with pytest.raises(RuntimeUnavailable, match="needs a CUDA GPU"):
        open_runtime(RuntimeSpec("tensorrt", "fp16"), bundle=load_bundle(micro_bundle), device="cuda")
    with pytest.raises(RuntimeUnavailable, match="no CUDA GPU"):
        open_runtime(RuntimeSpec("torch"), checkpoint=micro_checkpoint, device="cuda")
    with pytest.raises(RuntimeUnavailable, match="CUDA graphs need --device cuda"):
        open_runtime(RuntimeSpec("torch", options=("cuda-graphs",)), checkpoint=micro_checkpoint)
    with pytest.raises(RuntimeUnavailable, match="fused epilogues need --device cuda"):
        open_runtime(RuntimeSpec("torch", options=("cudnn-epilogues",)), checkpoint=micro_checkpoint)


def test_cudnn_benchmark_is_one_runtimes_and_a_gpus(micro_checkpoint) -> None:
    """The flag is global: a runtime with the option turns it on for its own captures only, and puts it back
    even when one fails; off a GPU the option is refused."""
    from crnet.engines.torch_runtime import _cudnn_benchmark

    with pytest.raises(RuntimeUnavailable, match="benchmark mode needs --device cuda"):
        open_runtime(RuntimeSpec("torch", options=("cudnn-benchmark",)), checkpoint=micro_checkpoint)
    before = torch.backends.cudnn.benchmark
    with pytest.raises(ZeroDivisionError), _cudnn_benchmark():
        assert torch.backends.cudnn.benchmark
        _ = 1 / 0
    assert torch.backends.cudnn.benchmark == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudnn_benchmark_runs_the_same_episode_on_cuda(micro_checkpoint) -> None:
    query, supports, masks = (x.cuda() for x in episode(1))
    with open_runtime(
        RuntimeSpec.parse("torch:fp16+channels-last+torch-loop"), checkpoint=micro_checkpoint, device="cuda"
    ) as plain:
        expected = plain.episode(query, supports, masks)
    before = torch.backends.cudnn.benchmark
    with pytest.raises(RuntimeUnavailable, match="add \\+cuda-graphs"):
        untimed = RuntimeSpec.parse("torch:fp16+cudnn-benchmark")
        open_runtime(untimed, checkpoint=micro_checkpoint, device="cuda")
    spec = RuntimeSpec.parse("torch:fp16+channels-last+cudnn-benchmark+cuda-graphs+torch-loop")
    with open_runtime(spec, checkpoint=micro_checkpoint, device="cuda") as tuned:
        logits = tuned.episode(query, supports, masks)
        assert tuned._capture_thread.thread is not None  # captured (and timed cuDNN) on its own thread
        torch.testing.assert_close(tuned.episode(query, supports, masks), logits)  # a replay
    assert torch.backends.cudnn.benchmark == before
    torch.testing.assert_close(logits, expected, atol=2e-2, rtol=2e-2)


def test_max_autotune_is_a_compiled_gpu_rows_choice(micro_checkpoint) -> None:
    """+max-autotune is inductor's own timing of its templates against the libraries: compiled rows on a GPU
    only, never the anchor's; the anchor keeps torch.compile's CUDA graphs, our rows capture their own."""
    from crnet.engines.torch_runtime import compile_mode

    for text in ("torch:fp16+compile+max-autotune", "torch:fp16+channels-last+max-autotune"):
        with pytest.raises(RuntimeUnavailable, match="needs \\+compile and --device cuda"):
            open_runtime(RuntimeSpec.parse(text), checkpoint=micro_checkpoint)
    with pytest.raises(RuntimeUnavailable, match="takes no other option"):
        RuntimeSpec.parse("torch:fp16+anchor+max-autotune")
    assert compile_mode(reduce_overhead=True, max_autotune=False) == "reduce-overhead"
    assert compile_mode(reduce_overhead=False, max_autotune=True) == "max-autotune-no-cudagraphs"
    assert compile_mode(reduce_overhead=False, max_autotune=False) == "default"


def test_cpu_onnxruntime_cannot_take_a_gpu_provider(micro_bundle) -> None:
    with pytest.raises(RuntimeUnavailable, match="does not run on device cpu"):
        open_runtime(RuntimeSpec("onnxruntime", options=("cuda",)), bundle=load_bundle(micro_bundle))


def test_engine_batch_limit(micro_checkpoint) -> None:
    runtime = open_runtime(RuntimeSpec("torch"), checkpoint=micro_checkpoint)
    runtime.max_batch = 4  # as an engine built with --batch-range 1:1:4 reports
    with pytest.raises(CRNetError, match="at most 4, asked for 5"):
        runtime.check_batch(5)


def test_a_foreign_onnx_graph_is_refused(micro_bundle, tmp_path) -> None:
    import json
    import shutil

    from crnet.bundle import sha256

    copy = shutil.copytree(micro_bundle, tmp_path / "b")
    (copy / "head.fp32.onnx").write_bytes(b"\x08\x07 not a protobuf of a graph")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["graphs"]["fp32"]["head"]["sha256"] = sha256(copy / "head.fp32.onnx")  # checksum passes
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RuntimeUnavailable, match="ONNX Runtime cannot load .*head.fp32.onnx"):
        open_runtime(RuntimeSpec("onnxruntime"), bundle=load_bundle(copy))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "text",
    [
        "torch:fp32",
        "torch:fp16+channels-last",
        "torch:fp16+cuda-graphs",
        "torch:fp16+channels-last+compile+cuda-graphs",
        "torch:fp16+channels-last+cudnn-epilogues+cuda-graphs",
        DEPLOYED_GPU,  # compiled, captured, cuDNN's epilogues, the blocked stem
        DEPLOYED_GPU + "+bare-neck",  # the neck's sum, bias and ReLU inductor's, not cuDNN's epilogue
        DEPLOYED_GPU + "+split-neck",  # and its convolutions over channel slices (pieces of 48 here)
        DEPLOYED_GPU + "+grouped-neck",  # and layer3's pieces as one grouped convolution (2 groups here)
        DEPLOYED_GPU + "+chunked-neck",  # the neck on chunks of the batch (of 1 image here)
        DEPLOYED_GPU + "+concurrent-aspp",  # the ASPP's branches on streams of their own, inside the graph
        DEPLOYED_GPU + "+triton-head",  # the head's 3x3 convolutions as our Triton kernels
        DEPLOYED_GPU + "+triton-head+triton-encoder",  # and the encoder's
        "torch:fp16+channels-last+cudnn-epilogues+space-to-depth+banded-aspp+compile+cuda-graphs+torch-loop",
        "torch:fp16+channels-last+space-to-depth+compile+max-autotune+cuda-graphs+torch-loop",
        "torch:fp16+anchor",
        "onnxruntime:fp32+cuda",
    ],
)
def test_gpu_runtimes_match_the_model(text, micro_checkpoint, micro_bundle, monkeypatch) -> None:
    spec = RuntimeSpec.parse(text)
    monkeypatch.setattr(BareNeck, "SPLIT_CHANNELS", 48 if "split" in text else 64)  # micro's (64, 128)
    monkeypatch.setattr(chunking, "CHUNK_IMAGES", 1)  # an episode of batch 2 encodes 4 images
    if spec.name == "onnxruntime":
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDA execution provider here")
    model = checkpoint.load_model(micro_checkpoint, "cuda")
    query, supports, masks = (x.cuda() for x in episode(1))
    with torch.no_grad():
        expected = upsample(model(query, supports, masks).query, (33, 33))
    with open_runtime(
        spec, checkpoint=micro_checkpoint, bundle=load_bundle(micro_bundle), device="cuda"
    ) as runtime:
        for _ in range(3):  # CUDA graphs record on the first calls and replay after
            logits = runtime.episode(query, supports, masks)
            cached = runtime.query(query, runtime.prompt(runtime.encode(supports[:, 0])[:, None], masks))
    torch.testing.assert_close(cached, logits, atol=1e-3, rtol=1e-3)
    tolerance = 2e-2 if spec.precision == "fp16" else 1e-3  # TF32 convolutions on Ampere and later
    torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("freeze", [False, True])
def test_torch_compile_matches_eager(micro_checkpoint, freeze) -> None:
    """torch.compile (inductor, CPU C++ codegen here) fuses elementwise work, with or without freezing the
    weights into constants; the numbers stay eager's."""
    query, supports, masks = episode(1)
    with open_runtime(RuntimeSpec("torch"), checkpoint=micro_checkpoint) as eager:
        expected = eager.episode(query, supports, masks)
    torch._dynamo.reset()  # an unfrozen graph compiled earlier in this process would be reused as it is
    with TorchRuntime(micro_checkpoint, compile=True, freeze=freeze) as compiled:
        assert compiled.label == "torch fp32 compile fused"  # the native op runs inside the compiled graph
        with patch("torch._inductor.freezing.freeze", wraps=inductor_freezing.freeze) as freezing:
            logits = compiled.episode(query, supports, masks)
        assert freezing.called == freeze
        prompt = compiled.prompt(compiled.encode(supports[:, 0])[:, None], masks)
        cached = compiled.query(query, prompt)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_anchor_is_plain_torch_compile(micro_checkpoint) -> None:
    """The anchor row: the checkpoint's model untouched by crnet (BatchNorm kept for inductor's freezing to
    fold, PyTorch's loop), compiled whole; the numbers stay eager's."""
    query, supports, masks = episode(2)
    with open_runtime(RuntimeSpec("torch"), checkpoint=micro_checkpoint) as eager:
        expected = eager.episode(query, supports, masks)
    with open_runtime(RuntimeSpec.parse("torch:fp32+anchor"), checkpoint=micro_checkpoint) as anchor:
        assert anchor.label == "anchor: plain torch fp32 compiled"  # no CUDA graphs on a CPU
        assert not anchor.model.refinement.fused and anchor.options["channels_last"]
        assert not anchor.model.refinement.hoist  # the loop as the paper writes it
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in anchor.model.modules())
        logits = anchor.episode(query, supports, masks)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_torch_runtime_fused_switch(micro_checkpoint) -> None:
    """--no-fused runs the PyTorch loop; the default and --fused run the native op, within its tolerance."""
    query, supports, masks = episode(2)
    results = {}
    for fused in (None, True, False):
        with open_runtime(RuntimeSpec("torch"), checkpoint=micro_checkpoint, fused=fused) as runtime:
            assert runtime.model.refinement.fused == (fused is not False)
            assert runtime.label == "torch fp32" + ("" if fused is False else " fused")
            results[fused] = runtime.episode(query, supports, masks)
    assert torch.equal(results[None], results[True])
    torch.testing.assert_close(results[True], results[False], atol=1e-4, rtol=1e-4)
    # +torch-loop: one row of a bench runs PyTorch's loop while the others keep the op
    loop = RuntimeSpec.parse("torch+torch-loop")
    with open_runtime(loop, checkpoint=micro_checkpoint, fused=True) as runtime:
        assert not runtime.model.refinement.fused and runtime.label == "torch fp32"
        assert torch.equal(runtime.episode(query, supports, masks), results[False])


def test_torch_runtime_refuses_fused_without_a_kernel(micro_checkpoint) -> None:
    with pytest.raises(RuntimeUnavailable, match="no cpu kernel for torch.bfloat16"):
        open_runtime(RuntimeSpec.parse("torch:bf16"), checkpoint=micro_checkpoint, fused=True)


def test_the_deployed_path_runs_without_the_packages_crnet_does_not_require(monkeypatch) -> None:
    """A deployed path with a Triton option drops it where Triton is not installed, rather than fail."""
    import importlib.util

    import crnet.engines as engines

    monkeypatch.setattr(
        engines, "DEPLOYED_GPU", "torch:fp16+channels-last+triton-head+compile+triton-encoder"
    )
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "triton" else real(name))
    assert engines.deployed_gpu() == "torch:fp16+channels-last+compile"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert engines.deployed_gpu() == "torch:fp16+channels-last+triton-head+compile+triton-encoder"
    monkeypatch.undo()
    assert engines.deployed_gpu() == engines.DEPLOYED_GPU  # today's has no optional package
