"""crnet::refine_loop against the float64 PyTorch loop: every backend, dtype, shape and the early exit.

Tolerances (on logits, relative to the largest reference logit of the case):
- float64 op: 1e-9. Winograd F(4x4, 3x3) rounds differently from a direct convolution, but in float64 that
  stays far below this.
- float32 op: 2e-4. Winograd's transforms scale values by up to 8 (A^T) and 1/24 (G), costing a few bits;
  measured worst cases over these shapes are around 1e-5.
- float32 on CUDA where PyTorch lets cuDNN use TF32 (torch.backends.cudnn.allow_tf32, on by default): 2e-3.
  The op's convolutions are PyTorch's (at::conv2d), so an FP32 model on a GPU computes as PyTorch's own FP32
  convolutions do there: with TF32's 10-bit mantissa on tensor cores. Seen on the H200: up to 6e-4 on the
  channels-last path (the NCHW path's kernels stayed within 2e-4).
- float16 (CUDA): 2e-2, half precision's 2^-11 over five iterations of 9 convolutions.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from crnet import ops
from crnet.model.refinement import Refinement

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, "tf32": 2e-3, torch.float16: 2e-2}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_case(channels=16, batch=2, height=17, width=17, dilations=(6, 12, 18), previous=False, seed=0):
    """A refinement module with random weights and inputs. The default init barely feeds the probabilities
    back and keeps logits near zero; scaled up, masks move between iterations as in a trained model."""
    torch.manual_seed(seed)
    module = Refinement(channels, dilations, fused=False).double().eval()
    with torch.no_grad():
        module.feedback[1].weight[:, channels:] *= 30
        module.classifier.weight *= 10
    x = torch.randn(batch, channels, height, width, dtype=torch.float64)
    prev = torch.softmax(torch.randn(batch, 2, height, width, dtype=torch.float64), 1) if previous else None
    return module, x, prev


def run_native(module, x, previous, iterations, dtype, device="cpu", exit_fraction=0.0):
    weights = [w.detach().to(device, dtype) for w in module.op_weights()]
    prev = None if previous is None else previous.to(device, dtype)
    logits, used = torch.ops.crnet.refine_loop(
        x.to(device, dtype), prev, weights, list(module.dilations), iterations, exit_fraction
    )
    return logits.double().cpu(), used.cpu()


def reference(module, x, previous, iterations, exit_fraction=0.0):
    weights = [w.detach() for w in module.op_weights()]
    with torch.no_grad():
        return ops.refine_loop_reference(x, previous, weights, module.dilations, iterations, exit_fraction)


def assert_close(actual, expected, dtype, device="cpu"):
    if dtype == torch.float32 and device == "cuda" and torch.backends.cudnn.allow_tf32:
        dtype = "tf32"
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} > {TOLERANCE[dtype]} x {scale:.3g}"


def test_native_library_is_built():
    assert ops.AVAILABLE, ops.MISSING
    assert torch._C._dispatch_has_kernel_for_dispatch_key("crnet::refine_loop", "CPU")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iterations", [1, 3, 5])
@pytest.mark.parametrize(
    "batch, height, width, dilations",
    [(1, 17, 17, (6, 12, 18)), (3, 9, 13, (2, 3, 5)), (2, 23, 19, (6, 12, 18)), (1, 41, 41, (6, 12, 18))],
)
def test_cpu_matches_float64_reference(dtype, iterations, batch, height, width, dilations):
    # 41x41 is the r50 head: Winograd for dilations 1, 6, 12, the direct path for 18.
    module, x, _ = make_case(batch=batch, height=height, width=width, dilations=dilations)
    expected, expected_used = reference(module, x, None, iterations)
    logits, used = run_native(module, x, None, iterations, dtype)
    assert_close(logits, expected, dtype)
    assert used.tolist() == expected_used.tolist() == [iterations] * batch


def test_cpu_starts_from_given_probabilities():
    module, x, previous = make_case(previous=True)
    expected, _ = reference(module, x, previous, 3)
    logits, _ = run_native(module, x, previous, 3, torch.float64)
    assert_close(logits, expected, torch.float64)
    assert (logits - reference(module, x, None, 3)[0]).abs().max() > 1e-6  # the start state matters


def test_reference_is_the_modules_loop():
    module, x, previous = make_case(previous=True)
    module.hoist = False  # the loop as written (the hoisted inference loop: tests/model/test_crnet.py)
    with torch.no_grad():
        assert torch.equal(module(x, 4, previous), reference(module, x, previous, 4)[0])


@pytest.mark.parametrize("fraction", [0.02, 0.2, 1.0])
def test_early_exit_matches_reference(fraction):
    module, x, _ = make_case(batch=4, channels=8)
    expected, expected_used = reference(module, x, None, 5, fraction)
    logits, used = run_native(module, x, None, 5, torch.float64, exit_fraction=fraction)
    assert used.tolist() == expected_used.tolist()
    assert_close(logits, expected, torch.float64)


def test_early_exit_rule():
    module, x, _ = make_case(batch=3, channels=8)
    # Off: every sample runs T iterations. Fraction 1: a sample stops at t = 2 unless every pixel changed.
    assert run_native(module, x, None, 5, torch.float64, exit_fraction=0.0)[1].tolist() == [5, 5, 5]
    assert run_native(module, x, None, 5, torch.float64, exit_fraction=1.0)[1].tolist() == [2, 2, 2]
    # An exited sample keeps the logits of the iteration it stopped at.
    logits, used = run_native(module, x, None, 5, torch.float64, exit_fraction=1.0)
    assert torch.allclose(logits, reference(module, x, None, 2)[0], rtol=0, atol=1e-9)
    # A sample whose mask moves less than the fraction stops; one that moves more continues.
    first, second = reference(module, x, None, 1)[0], reference(module, x, None, 2)[0]
    changed = ((first[:, 1] > first[:, 0]) != (second[:, 1] > second[:, 0])).flatten(1).float().mean(1)
    low, high = sorted(set(changed.tolist()))[:2]  # a threshold between two samples' changes
    fraction = (low + high) / 2
    _, used = run_native(module, x, None, 5, torch.float64, exit_fraction=fraction)
    assert [u == 2 for u in used.tolist()] == (changed < fraction).tolist()


def test_batch_composition_does_not_change_a_sample():
    module, x, _ = make_case(batch=4, channels=8)
    together, used = run_native(module, x, None, 5, torch.float64, exit_fraction=0.3)
    for i in range(4):
        alone, alone_used = run_native(module, x[i : i + 1], None, 5, torch.float64, exit_fraction=0.3)
        assert alone_used.item() == used[i].item()
        assert_close(alone[0], together[i], torch.float64)


def test_opcheck():
    module, x, previous = make_case(channels=8, height=9, width=11, previous=True)
    weights = [w.detach().float() for w in module.op_weights()]
    for prev in (None, previous.float()):
        torch.library.opcheck(
            torch.ops.crnet.refine_loop.default, (x.float(), prev, weights, list(module.dilations), 3, 0.0)
        )
    torch.library.opcheck(
        torch.ops.crnet.refine_loop.default, (x.float(), None, weights, list(module.dilations), 3, 0.0, True)
    )


def test_cudnn_epilogues_change_nothing_on_a_cpu():
    """The switch is the channels-last CUDA path's; the CPU backend takes it and computes the same."""
    module, x, previous = make_case(channels=8, height=9, width=11, previous=True)
    args = (x, previous, [w.detach() for w in module.op_weights()], list(module.dilations), 3, 0.0)
    plain, switched = torch.ops.crnet.refine_loop(*args), torch.ops.crnet.refine_loop(*args, True)
    assert torch.equal(plain[0], switched[0]) and torch.equal(plain[1], switched[1])


def test_export_keeps_the_op():
    module, x, _ = make_case(channels=8, height=9, width=11)
    module = module.float()
    module.fused = True

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.refinement = module

        def forward(self, features):
            return self.refinement(features, 3)

    with torch.no_grad():  # inference export: with gradients the module runs the PyTorch loop
        program = torch.export.export(Head(), (x.float(),))
    assert "crnet.refine_loop" in str(program.graph)
    with torch.no_grad():
        assert torch.equal(program.module()(x.float()), module(x.float(), 3))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "iterations": 0}, "iterations must be >= 1, got 0$"),
        (lambda a: {**a, "exit_fraction": 1.5}, r"exit_fraction must be within \[0, 1\], got 1.5$"),
        (
            lambda a: {**a, "weights": a["weights"][:-1]},
            "expected 26 weight tensors for 3 dilations, got 25$",
        ),
        (lambda a: {**a, "features": a["features"].half()}, "float32 or float64, got Half$"),
        (
            lambda a: {**a, "previous": torch.zeros(1, 2, 3, 3)},
            r"previous has shape \[1, 2, 3, 3\], expected \[1, 2, 9, 9\]$",
        ),
    ],
)
def test_bad_arguments(change, message):
    """Each refusal is a RuntimeError naming the numbers, never a crash: on one CUDA build formatting those
    numbers through iostreams segfaulted (the messages are now plain strings)."""
    module, x, _ = make_case(channels=8, batch=1, height=9, width=9)
    args = {
        "features": x,
        "previous": None,
        "weights": [w.detach() for w in module.op_weights()],
        "dilations": list(module.dilations),
        "iterations": 2,
        "exit_fraction": 0.0,
    }
    with pytest.raises(RuntimeError, match=message):
        torch.ops.crnet.refine_loop(**change(args))


def test_fallback_is_announced_once(monkeypatch):
    monkeypatch.setattr(ops, "AVAILABLE", False)
    monkeypatch.setattr(ops, "MISSING", "the native library is not built (test)")
    monkeypatch.setattr(ops, "_announced", set())
    module, x, _ = make_case(channels=8)
    expected = reference(module, x, None, 3)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the once-per-reason rule is crnet's, not the warning filter's
        for _ in range(2):
            logits, _ = ops.refine_loop(x, None, module.op_weights(), module.dilations, 3)
            assert torch.equal(logits, expected)
    assert [(w.category, str(w.message)) for w in caught] == [
        (
            ops.NativeFallbackWarning,
            "refinement runs as a PyTorch loop: the native library is not built (test)",
        )
    ]


def test_asking_for_the_op_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setattr(ops, "AVAILABLE", False)
    monkeypatch.setattr(ops, "MISSING", "the native library is not built (test)")
    module, x, _ = make_case(channels=8)
    with pytest.raises(ops.NativeOpUnavailable, match="not built"):
        ops.refine_loop(x, None, module.op_weights(), module.dilations, 3, native=True)
    assert not ops.use_native(x, False)


def test_module_uses_the_op_only_without_gradients():
    module, x, _ = make_case(channels=8)
    module = module.float()
    module.fused = True
    x = x.float()
    with torch.no_grad():
        fused = module(x, 3)
    eager = module(x, 3)  # parameters require grad: the PyTorch loop, so training can backpropagate
    assert eager.requires_grad and not fused.requires_grad
    assert_close(fused.double(), eager.detach().double(), torch.float32)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch, height, width, iterations", [(1, 41, 41, 5), (3, 23, 19, 3), (2, 17, 17, 1)])
def test_cuda_matches_float64_reference(dtype, batch, height, width, iterations):
    module, x, previous = make_case(batch=batch, height=height, width=width, previous=True)
    expected, _ = reference(module, x, previous, iterations)
    logits, used = run_native(module, x, previous, iterations, dtype, device="cuda")
    assert_close(logits, expected, dtype)
    assert used.tolist() == [iterations] * batch


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_cuda_early_exit_matches_reference(layout):
    """Early exit drops rows mid-loop; the NHWC path must keep the rows it selects channels-last."""
    module, x, _ = make_case(batch=4, channels=8)
    expected, expected_used = reference(module, x, None, 5, 0.2)
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    logits, used = run_native(module, x, None, 5, torch.float32, device="cuda", exit_fraction=0.2)
    assert used.tolist() == expected_used.tolist()
    assert_close(logits, expected, torch.float32, "cuda")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("cudnn_epilogues", [False, True], ids=["our epilogues", "cudnn epilogues"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "batch, height, width, iterations",
    [(1, 41, 41, 5), (8, 41, 41, 2), (3, 23, 19, 3)],  # 8 x 41 x 41 pixels: ASPP branches one after another
)
def test_cuda_channels_last_matches_float64_reference(
    dtype, batch, height, width, iterations, cudnn_epilogues
):
    """A channels-last input takes the NHWC path (16 channels: whole 16-byte packs in both dtypes), with our
    epilogue kernels or cuDNN's fused convolution-bias-ReLU."""
    module, x, previous = make_case(batch=batch, height=height, width=width, previous=True)
    expected, _ = reference(module, x, previous, iterations)
    weights = [
        channels_last(w.detach().to("cuda", dtype)) if w.dim() == 4 else w.detach().to("cuda", dtype)
        for w in module.op_weights()
    ]
    features = channels_last(x.to("cuda", dtype))
    assert not features.is_contiguous()
    logits, used = torch.ops.crnet.refine_loop(
        features,
        previous.to("cuda", dtype),
        weights,
        list(module.dilations),
        iterations,
        0.0,
        cudnn_epilogues,
    )
    assert logits.is_contiguous() and logits.shape == (batch, 2, height, width)
    assert_close(logits.double().cpu(), expected, dtype, "cuda")
    assert used.tolist() == [iterations] * batch


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("cudnn_epilogues", [False, True], ids=["our epilogues", "cudnn epilogues"])
@pytest.mark.parametrize("batch", [1, 8])  # side streams for the ASPP branches at batch 1, none at 8
def test_cuda_channels_last_op_replays_in_a_cuda_graph(batch, cudnn_epilogues):
    """The whole NHWC call, side streams included, captures as one CUDA graph and replays the eager result."""
    module, x, _ = make_case(batch=batch, height=41, width=41)
    weights = [
        channels_last(w.detach().to("cuda", torch.float16))
        if w.dim() == 4
        else w.detach().to("cuda", torch.float16)
        for w in module.op_weights()
    ]
    static = channels_last(torch.zeros(batch, 16, 41, 41, device="cuda", dtype=torch.float16))
    dilations = list(module.dilations)
    call = lambda: torch.ops.crnet.refine_loop(static, None, weights, dilations, 5, 0.0, cudnn_epilogues)[0]  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: cuDNN and cuBLAS pick their kernels here
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for seed in (1, 2):  # fresh inputs each replay: the graph computes the function, not one answer
        torch.manual_seed(seed)
        static.copy_(torch.randn(batch, 16, 41, 41, device="cuda", dtype=torch.float16))
        graph.replay()
        torch.testing.assert_close(captured, call(), atol=1e-3, rtol=1e-3)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a view that starts one element into its storage: not on a 16-byte boundary."""
    view = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)[1:].view(t.shape)
    return view.copy_(t)


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("weights_layout", ["nchw", "misaligned-bias"])
def test_cuda_channels_last_input_with_other_weights(weights_layout):
    """Channels-last features with NCHW weights (converted inside the call), or with a bias that cannot be
    read in 16-byte packs (the NCHW path takes over): the same function either way."""
    module, x, _ = make_case(batch=1, height=41, width=41)
    expected, _ = reference(module, x, None, 5)
    weights = [w.detach().to("cuda", torch.float16) for w in module.op_weights()]
    if weights_layout == "misaligned-bias":
        weights[1] = misaligned(weights[1])
        assert weights[1].data_ptr() % 16 != 0
    logits, _ = torch.ops.crnet.refine_loop(
        channels_last(x.to("cuda", torch.float16)), None, weights, list(module.dilations), 5, 0.0
    )
    assert_close(logits.double().cpu(), expected, torch.float16)
