"""The Triton head: its kernel against float64 for every epilogue, split and geometry (in Triton's
interpreter on a CPU, compiled on a GPU), the split counters left at zero, the custom op's fake, and on
CUDA the runtime with its graphs captured (what the head options share: test_head_options.py)."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

from crnet.engines import DEPLOYED_GPU, RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.engines.triton_head import (
    EagerFirst,
    TritonASPP,
    TritonClassifier,
    TritonConv,
    TritonResidualBranch,
    _library_branches,
    _library_conv,
    _library_project_classify,
    pack_weight,
    runs_library,
    sum_slots,
    triton_branches,
    triton_conv,
    triton_pooling_term,
    triton_project_classify,
)
from crnet.model.refinement import ASPP, Classifier
from tests.engines.test_runtimes import episode

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (batch, in and out channels, height, width, kernel, dilation, ReLU'd copy, ReLU, residual, bias, layout)
CASES = [
    (1, 32, 32, 9, 9, 3, 1, False, False, False, True, "NHWC"),  # plain
    (2, 32, 48, 9, 7, 3, 2, True, True, True, True, "NHWC"),  # everything, out channels past one tile
    (1, 64, 32, 11, 11, 3, 6, False, True, False, False, "NHWC"),  # wide dilation, no bias
    (2, 24, 32, 5, 5, 1, 1, True, False, True, True, "NCHW"),  # 1x1, channels short of a step, NCHW in
    (2, 32, 32, 30, 4, 3, 12, False, True, False, True, "NHWC"),  # tiles whose outer tap rows read padding
    (1, 16, 32, 14, 64, 3, 6, True, False, False, True, "NHWC"),  # tiles of exactly one row, at the edges
    (2, 2, 32, 9, 9, 3, 1, False, True, True, False, "NCHW"),  # the feedback's 2 probabilities, 16 a step too
]
# Checked in a process of its own: TRITON_INTERPRET must be set before the kernel is defined.
INTERPRETED = textwrap.dedent(
    """
    import json, sys
    import torch, torch.nn.functional as F
    from crnet.engines import triton_conv as tc
    from crnet.engines.triton_head import pack_weight

    results = []
    for case in json.loads(sys.argv[1]):
        n, c, oc, h, w, k, d, relu_copy, relu_out, res, bias, layout = case
        layout = torch.channels_last if layout == "NHWC" else torch.contiguous_format
        torch.manual_seed(0)
        x = torch.randn(n, c, h, w).contiguous(memory_format=layout)
        weight = torch.randn(oc, c, k, k) * 0.1
        b = torch.randn(oc) if bias else None
        r = torch.randn(n, oc, h, w).contiguous(memory_format=torch.channels_last) if res else None
        p = d * (k - 1) // 2
        ref = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), 1, p, d)
        ref = ref + r.double() if r is not None else ref
        ref = ref.relu() if relu_out else ref
        few = tc.FEW_CHANNEL_CONFIGS[:1] if c <= tc.FEW_CHANNELS else []
        for config in tc.CONFIGS[:4] + few:  # 64x64 split 1, 2 and 4; 32x64 split 2; 16 channels a step
            got = tc.conv2d_nhwc(x, pack_weight(weight), b, r, (k, k), (p, p), (d, d), relu_out, relu_copy,
                                 slot=3, config=config)
            assert len(got) == 1 + relu_copy
            error = (got[0].double() - ref).abs().max().item()
            if relu_copy:
                error = max(error, (got[1].double() - ref.relu()).abs().max().item())
            results.append({
                "error": error,
                "channels_last": all(g.is_contiguous(memory_format=torch.channels_last) for g in got),
                "split": config.split,
                "counters": int(tc._COUNTERS[torch.device("cpu")].abs().sum()),
            })

    # The ASPP's four pixel branches in one launch: a 1x1 (the centre tap) and dilations 2, 6 and 9, each
    # into its channels of the concatenation, against the ASPP's own terms in float64.
    from crnet.engines.triton_head import TritonASPP
    from crnet.model.refinement import ASPP, Classifier

    torch.manual_seed(0)
    aspp = ASPP(32, (2, 6, 9)).eval()
    twin = TritonASPP.of(aspp)
    geometries = [tuple(twin.geometry[i : i + 6]) for i in range(0, 24, 6)]
    x = torch.randn(2, 32, 11, 11).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = aspp.double().hoisted_terms(x.double(), torch.zeros(32, 32, 1, 1).double(), None)[0]
    for config in tc.CONFIGS[:4]:
        got = tc.branches_nhwc(x, twin.packed.float(), twin.stacked_bias.float(), None, (3, 3), geometries,
                               True, slot=4, config=config)[0]
        results.append({
            "error": (got.double() - ref).abs().max().item(),
            "channels_last": got.is_contiguous(memory_format=torch.channels_last),
            "split": config.split,
            "counters": int(tc._COUNTERS[torch.device("cpu")].abs().sum()),
        })
    print(json.dumps(results))
    """
)


def test_the_kernel_in_tritons_interpreter_is_the_convolution() -> None:
    triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
        # Seen with 3.6.0: there the compiled kernel is the CUDA tests' (and the sm_90 build's) to check.
        version = triton.__version__
        pytest.skip(f"Triton {version}'s interpreter runs no loop bounded by a program id (3.7's does)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", INTERPRETED, json.dumps(CASES)], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    few = sum(case[1] <= 16 for case in CASES)  # 16 channels a step too, for few input channels
    assert len(results) == 4 * len(CASES) + few + 4 and {r["split"] for r in results} == {1, 2, 4}
    for result in results:
        assert result["error"] < 1e-5  # FP32 products summed in FP32, against float64
        assert result["channels_last"]
        assert result["counters"] == 0  # every split tile's last part reset its counter


# The end of an iteration in one kernel, in Triton's interpreter: 2 maps of 5 x 7 (tiles across the two),
# 24 projected channels (short of a power of two) from 80 (short of a step), in both layouts, each tile
# and split; the logits against float64, the probabilities against the softmax of the logits it stored.
PROJECTION = textwrap.dedent(
    """
    import json
    import torch, torch.nn.functional as F
    from crnet.engines import triton_conv as tc, triton_project as tp
    from crnet.engines.triton_head import CLASS_COLUMNS, pack_weight

    results = []
    torch.manual_seed(0)
    for layout in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 80, 5, 7).relu().contiguous(memory_format=layout)
        weight, bias = torch.randn(24, 80, 1, 1) * 0.1, torch.randn(2, 24, 1, 1) * 0.1
        classifier, classifier_bias = torch.randn(2, 24, 1, 1), torch.randn(2)
        h = F.relu(F.conv2d(x.double(), weight.double()) + bias.double())
        ref = F.conv2d(h, classifier.double(), classifier_bias.double())
        padded = torch.zeros(24, CLASS_COLUMNS)
        padded[:, :2] = classifier[:, :, 0, 0].t()
        for config in tp.CONFIGS:
            logits, probs = tp.project_classify(x, pack_weight(weight), bias.reshape(2, 24), padded,
                                                classifier_bias, layout, slot=7, config=config)
            results.append({
                "error": (logits.double() - ref).abs().max().item(),
                "probabilities": (probs - torch.softmax(logits, dim=1)).abs().max().item(),
                "layout": all(t.is_contiguous(memory_format=layout) for t in (logits, probs)),
                "split": config.split,
                "counters": int(tc._COUNTERS[torch.device("cpu")].abs().sum()),
            })

    # The last block's column sums, from the convolution's epilogue: 2 maps of 9 x 9 (tiles across both),
    # every tile and split, out of NaN-filled memory (every slot no tile fills must be zeroed); then the
    # pooling term from them against the one from the map, in float64.
    from crnet.model.refinement import image_pooling_term
    real_empty = torch.empty
    def nan_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    weight, bias, residual = torch.randn(24, 16, 3, 3) * 0.1, torch.randn(24), torch.randn(2, 24, 9, 9)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, 1) + residual.double()
    pool = [torch.randn(24, 24, 1, 1) * 0.2, torch.randn(24) * 0.1]
    pool += [torch.randn(24, 24, 1, 1) * 0.2, torch.randn(24)]
    ref_term = image_pooling_term(ref, *(t.double() for t in pool))
    sums_results = []
    for config in tc.CONFIGS[:4]:
        torch.empty = nan_empty
        out, sums = tc.conv2d_nhwc(x, pack_weight(weight), bias, residual, (3, 3), (1, 1), (1, 1), False,
                                   slot=5, config=config, column_sums=True)
        term = tp.pooling_term(sums, 81, pack_weight(pool[0]), pool[1], pack_weight(pool[2]), pool[3])
        torch.empty = real_empty
        sums_results.append({
            "error": (sums.double().sum(dim=1) - ref.sum(dim=(2, 3))).abs().max().item(),
            "finite": bool(torch.isfinite(sums).all()),
            "slots": sums.shape[1],
            "term": (term.double() - ref_term).abs().max().item(),
            "split": config.split,
        })
    print(json.dumps({"project": results, "sums": sums_results}))
    """
)


def test_the_projection_kernel_in_tritons_interpreter_is_the_heads_end() -> None:
    triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(
            f"Triton {triton.__version__}'s interpreter runs no loop bounded by a program id (3.7's does)"
        )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", PROJECTION], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    everything = json.loads(run.stdout.strip().splitlines()[-1])
    results = everything["project"]
    assert {r["split"] for r in results} == {1, 2, 4} and len(results) == 2 * 5
    for result in results:
        assert result["error"] < 1e-4 and result["probabilities"] < 1e-6, result
        assert result["layout"] and result["counters"] == 0, result
    sums = everything["sums"]
    assert {r["split"] for r in sums} == {1, 2, 4} and {r["slots"] for r in sums} == {81 // 32 + 2}
    for result in sums:
        assert result["finite"] and result["error"] < 1e-4 and result["term"] < 1e-4, result


# What the launcher's arguments look like to Triton's JIT: FP16 maps, FP32 split parts, int32 counters and
# geometry, pointers and the channel-sized numbers 16-aligned (256 channels).
POINTERS = {"x_ptr": "*fp16", "w_ptr": "*fp16", "bias_ptr": "*fp16", "res_ptr": "*fp16", "out_ptr": "*fp16"}
POINTERS |= {"copy_ptr": "*fp16"}
POINTERS |= {"sums_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32", "geometry_ptr": "*i32"}
ALIGNED = {"C", "OC", "sxn", "sxh", "sxw", "srn", "srh", "srw", "son", "soh", "sow"}


def ptxas_report(triton, ptx: str) -> str | None:
    """`ptxas -v` for sm_90a on `ptx`, by the ptxas that Triton compiled it with: once inductor has compiled
    a kernel in this process, that is torch's own (inductor sets TRITON_PTXAS_PATH), and Triton's bundled
    one may not read the newer PTX it then writes. None where neither exists."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptxas = Path(os.environ.get("TRITON_PTXAS_PATH") or bundled)
    if not ptxas.exists():
        return None
    with tempfile.TemporaryDirectory() as folder:
        source_file = Path(folder) / "kernel.ptx"
        source_file.write_text(ptx)
        command = [str(ptxas), "-v", "--gpu-name=sm_90a", str(source_file), "-o", os.devnull]
        return subprocess.run(command, capture_output=True, text=True, check=True).stderr


def test_every_candidate_compiles_for_hopper() -> None:
    """Triton's own compiler, to sm_90 machine code, on a CPU: what the interpreter cannot see (types,
    layouts, shared memory); each tile with a full epilogue and each epilogue with one split tile. Hopper's
    tensor-core instructions (wgmma; mma.sync for 32-row tiles) and asynchronous copies (cp.async) must be
    in the code, and ptxas must not serialize the wgmma (its warning C7515, which a ReLU of the left operand
    in registers caused)."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from crnet.engines import triton_conv as tc

    params = list(inspect.signature(tc._conv_kernel.fn).parameters)
    signature = {p: POINTERS.get(p, "i32") for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in params if p in POINTERS or p in ALIGNED}
    # (bias, residual, relu out, relu copy): a block's first convolution, the ASPP's and the encoder's; a
    # block's second, and the last; the neck's layer2 half (bare) and its layer3 half; the condition's fuse.
    flags = [(True, False, True, False), (True, True, False, True), (True, True, False, False)]
    flags += [(False, False, False, False), (True, True, True, False), (True, False, False, True)]
    builds = [(config, flags[1], 3) for config in tc.CONFIGS] + [(tc.CONFIGS[1], f, 3) for f in flags]
    builds += [(tc.CONFIGS[1], flags[0], 1), (tc.CONFIGS[0], flags[4], 1)]  # the encoder's 1x1 ones
    builds = [(*build, False) for build in builds]
    builds += [(config, flags[2], 3, True) for config in tc.SMALL_MAP_CONFIGS]  # the last block's, with sums
    for config, (has_bias, has_res, relu_out, relu_copy), side, sums in builds:
        constexprs = dict(HAS_BIAS=has_bias, HAS_RES=has_res, RELU_OUT=relu_out, RELU_COPY=relu_copy)
        constexprs |= dict(TAPS=side * side, KW=side, COLUMN_SUMS=sums)
        constexprs |= dict(IEEE=False, BM=config.bm, BN=config.bn, BK=config.bk, SPLIT=config.split)
        source = ASTSource(
            fn=tc._conv_kernel,
            signature={p: "constexpr" if p in constexprs else t for p, t in signature.items()},
            constexprs={(params.index(k),): v for k, v in constexprs.items()},
            attrs=attrs,
        )
        options = {"num_warps": config.warps, "num_stages": config.stages}
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        ptx = kernel.asm["ptx"]
        tensor_cores = "wgmma" in ptx if config.bm >= 64 else "mma.sync" in ptx  # a warpgroup's is 64 rows
        assert tensor_cores and "cp.async" in ptx, (config, has_bias, has_res, relu_out, relu_copy)
        assert kernel.metadata.shared <= 227 * 1024  # an H100's or H200's shared memory per block
        report = ptxas_report(triton, ptx)
        if report is not None:
            assert "C7515" not in report, (config, has_bias, has_res, relu_out, relu_copy, report)


def test_the_projection_kernel_compiles_for_hopper() -> None:
    """The end-of-iteration kernel, each tile and split, to sm_90 machine code as above: a 64-row tile of
    all 256 channels (and the classifier's product in the epilogue) on tensor cores, loads pipelined, within
    an H100's shared memory, no serialized wgmma."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from crnet.engines import triton_project as tp

    pointers = {f"{name}_ptr": "*fp16" for name in ("x", "w", "bias", "cw", "cb", "logits", "probs")}
    pointers |= {"part_ptr": "*fp32", "count_ptr": "*i32"}
    aligned = {"K", "C", "sxn", "sxh", "sxw", "son"}
    params = list(inspect.signature(tp._project_classify_kernel.fn).parameters)
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in params if p in pointers or p in aligned}
    for config in tp.CONFIGS:
        constexprs = dict(IEEE=False, BM=config.bm, BN=256, BK=config.bk, SPLIT=config.split, COLUMNS=16)
        source = ASTSource(
            fn=tp._project_classify_kernel,
            signature={p: "constexpr" if p in constexprs else pointers.get(p, "i32") for p in params},
            constexprs={(params.index(k),): v for k, v in constexprs.items()},
            attrs=attrs,
        )
        options = {"num_warps": config.warps, "num_stages": config.stages}
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        ptx = kernel.asm["ptx"]
        tensor_cores = "wgmma" in ptx if config.bm >= 64 else "mma.sync" in ptx
        assert tensor_cores and "cp.async" in ptx, config
        assert kernel.metadata.shared <= 227 * 1024, (config, kernel.metadata.shared)
        report = ptxas_report(triton, ptx)
        if report is not None:
            assert "C7515" not in report, (config, report)


def test_the_pooling_term_kernel_compiles_for_hopper() -> None:
    """The pooling term's small kernel (a program an image and output block, a 256 x CB slice of a product
    on CUDA cores), both its steps, builds to sm_90 machine code within an H100's shared memory, without
    spilling registers."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from crnet.engines import triton_project as tp

    params = list(inspect.signature(tp._pooling_step_kernel.fn).parameters)
    for from_sums in (True, False):
        pointers = {f"{name}_ptr": "*fp16" for name in ("src", "w", "b", "dst")}
        pointers |= {"src_ptr": "*fp32"} if from_sums else {}
        for config in tp.POOLING_CONFIGS:
            constexprs = {"FROM_SUMS": from_sums, "BN": 256, "CB": config.cb}
            types = {"scale": "fp32", **pointers}
            source = ASTSource(
                fn=tp._pooling_step_kernel,
                signature={p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params},
                constexprs={(params.index(k),): v for k, v in constexprs.items()},
            )
            options = {"num_warps": config.warps}
            kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            assert kernel.metadata.shared <= 227 * 1024
            report = ptxas_report(triton, kernel.asm["ptx"])
            if report is not None:
                assert "0 bytes spill stores" in report, (from_sums, config, report)


def test_the_checks_use_the_ptxas_that_triton_compiled_with() -> None:
    """The pooling kernel's check in a process whose Triton compiles with a newer ptxas than its own, as it
    does once inductor has set torch's (on the H200, CUDA 13's PTX 9.0, which Triton's ptxas 12.8 refused).
    A process of its own: Triton keeps the ptxas version it saw first."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    if shutil.which("ptxas") is None:
        pytest.skip("no CUDA toolkit's ptxas on PATH")
    code = "import tests.engines.test_triton_head as t; t.test_the_pooling_term_kernel_compiles_for_hopper()"
    environment = os.environ | {"TRITON_PTXAS_PATH": shutil.which("ptxas")}
    root = Path(__file__).parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_each_shape_runs_the_faster_of_the_kernel_and_the_library(monkeypatch) -> None:
    """The choice on the first call for a shape: every Triton candidate and the library's function timed, the
    fastest remembered; the library's then runs in place of the kernel. Timings faked, the logic real."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from crnet.engines import triton_conv as tc

    configs = tc.SMALL_MAP_CONFIGS[:3]
    ran = []

    def bench(timings):
        def gpu_time(fn):
            fn()
            return timings[ran[-1]]

        return gpu_time

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda = torch.device("cuda")
    for timings, expected in [
        ({configs[0]: 3.0, configs[1]: 2.0, configs[2]: 4.0, "library": 2.5}, configs[1]),
        ({configs[0]: 3.0, configs[1]: 2.0, configs[2]: 4.0, "library": 1.5}, tc.LIBRARY),
    ]:
        monkeypatch.setattr(tc, "_gpu_time", bench(timings))
        key = ("a shape", expected)
        choice = tc._choose(key, configs, ran.append, lambda: ran.append("library"), cuda)
        assert choice == expected and tc._CHOSEN.pop(key) == expected
    assert tc._choose("without", configs, ran.append, None, cuda) == configs[1]  # no library offered
    assert ran.count("library") == 2

    # A candidate this Triton cannot build is no choice, with a warning; with none left, its error.
    def builds_not(config):
        if config == configs[1]:
            raise RuntimeError("PassManager::run failed")
        ran.append(config)

    with pytest.warns(RuntimeWarning, match="could not build a candidate"):
        assert tc._choose("unbuilt", configs, builds_not, None, cuda) == configs[0]
    with pytest.raises(RuntimeError, match="PassManager"):
        tc._choose("none built", configs[1:2], builds_not, None, cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tc._choose("capturing", configs, ran.append, None, cuda) == configs[0]  # nothing timed
    assert "capturing" not in tc._CHOSEN

    # Once the library is chosen for a shape, its function runs and the kernel does not launch.
    monkeypatch.setattr(tc, "_choose", lambda *args: tc.LIBRARY)
    monkeypatch.setattr(tc, "_conv_kernel", None)  # a launch would fail
    x = torch.randn(1, 8, 5, 5)
    marker = [torch.zeros(1)]
    got = tc.conv2d_nhwc(
        x, torch.randn(72, 8), None, None, (3, 3), (1, 1), (1, 1), False, library=lambda: marker
    )
    assert got is marker


def test_each_launch_and_timing_runs_on_its_tensors_device(monkeypatch) -> None:
    """Triton launches on the current CUDA device: with the tensors on cuda:1 and cuda:0 current, the
    kernels went to cuda:0's stream. Every launch, and the timing of the candidates, happens inside
    on_device(the tensors' device). Kernels and timing faked, the calls real."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from crnet.engines import triton_conv as tc
    from crnet.engines import triton_project as tp

    second = tc.on_device(torch.device("cuda", 1))
    assert isinstance(second, torch.cuda.device) and second.idx == 1
    assert isinstance(tc.on_device(torch.device("cpu")), contextlib.nullcontext)
    current, seen = [], []

    @contextlib.contextmanager
    def recorded(device):
        current.append(device)
        yield
        current.pop()

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((self.name, list(current)))

    def choose(key, configs, run, library, device):
        seen.append(("choose", list(current)))
        return configs[0]

    for module in (tc, tp):
        monkeypatch.setattr(module, "on_device", recorded)
        monkeypatch.setattr(module, "_choose", choose)
    monkeypatch.setattr(tc, "_CHOSEN", {})
    monkeypatch.setattr(tp, "_CHOSEN", {})
    for name in ("_conv_kernel", "_project_classify_kernel", "_pooling_step_kernel"):
        monkeypatch.setattr(tc if name == "_conv_kernel" else tp, name, Kernel(name))
    monkeypatch.setattr(tc, "candidates", lambda *args: tc.CONFIGS[:1])
    monkeypatch.setattr(tp, "candidates", lambda *args: tp.CONFIGS[:1])
    x, cpu = torch.randn(1, 8, 5, 5), torch.device("cpu")
    tc.conv2d_nhwc(x, torch.randn(72, 8), None, None, (3, 3), (1, 1), (1, 1), False)
    tp.project_classify(
        x, torch.randn(8, 4), torch.randn(1, 4), torch.randn(4, 16), torch.randn(2), torch.channels_last
    )
    tp.pooling_term(
        torch.randn(1, 2, 4), 25, torch.randn(4, 4), torch.randn(4), torch.randn(4, 4), torch.randn(4)
    )
    pooling = "_pooling_step_kernel"  # two steps: the pooling convolution, then its share of the projection
    assert [name for name, _ in seen] == [
        "choose", "_conv_kernel", "choose", "_project_classify_kernel", "choose", pooling, pooling
    ]  # fmt: skip
    assert all(devices == [cpu] for _, devices in seen), seen


def test_the_bench_json_says_what_each_shape_ran(monkeypatch) -> None:
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from crnet.engines import triton_conv as tc

    chosen = {((1, 256, 41, 41), 4, torch.device("cuda"), True): tc.CONFIGS[1], ("project", (1,)): tc.LIBRARY}
    monkeypatch.setattr(tc, "_CHOSEN", chosen)
    assert tc.choices() == [
        {"shape": "(1, 256, 41, 41) 4 True", "choice": str(tc.CONFIGS[1])},
        {"shape": "project (1,)", "choice": "library"},
    ]


def test_the_op_and_its_fake_agree() -> None:
    torch.manual_seed(0)
    conv = TritonConv.of(torch.nn.Conv2d(8, 6, 3, padding=2, dilation=2))
    x = torch.randn(2, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 6, 7, 7)
    for res, flags in [(None, (True, False)), (residual, (False, True))]:
        for sums in (False, True):
            args = (x, conv.weight.detach(), conv.packed, conv.bias.detach(), res, [2, 2], [2, 2], *flags)
            torch.library.opcheck(triton_conv, (*args, conv.slot, sums))
    sums = torch.randn(2, sum_slots(7, 7), 8)
    pool = [torch.randn(8, 8, 1, 1), torch.randn(8), torch.randn(8, 8, 1, 1), torch.randn(8)]
    packs = (pack_weight(pool[0]), pack_weight(pool[2]))
    torch.library.opcheck(triton_pooling_term, (sums, 49, *pool, *packs))
    aspp = TritonASPP.of(ASPP(8, (2, 3, 4)).eval())
    weights, biases = [b.weight.detach() for b in aspp.branches], [b.bias.detach() for b in aspp.branches]
    args = (x, weights, aspp.packed, biases, aspp.stacked_bias, aspp.geometry, aspp.slot)
    torch.library.opcheck(triton_branches, args)
    classifier = TritonClassifier.of(Classifier(8, 2, 1), torch.nn.Conv2d(40, 8, 1))
    branches = torch.randn(2, 32, 7, 7).contiguous(memory_format=torch.channels_last)
    for layout in (torch.channels_last, torch.contiguous_format):
        args = (branches.contiguous(memory_format=layout), torch.randn(8, 32, 1, 1), classifier.packed)
        args += (torch.randn(2, 8, 1, 1), classifier.weight.detach(), classifier.bias.detach())
        torch.library.opcheck(triton_project_classify, (*args, classifier.packed_classifier, classifier.slot))


def test_the_loop_takes_the_pooling_mean_from_the_last_blocks_sums(monkeypatch) -> None:
    """On maps of at least one tile per slot the ASPP's pooling term comes from the last block's column
    sums (here their library form, as off CUDA): the loop still computes what the folded one does."""
    import copy

    import crnet.engines.triton_head as th
    from crnet.model.conv_epilogues import fuse_conv_epilogues
    from tests.model.test_conv_epilogues import folded_micro

    refinement = fuse_conv_epilogues(folded_micro()).refinement
    refinement.fused = False
    transformed = th.triton_head(copy.deepcopy(refinement))
    calls = []
    library = th._library_pooling_term
    monkeypatch.setattr(th, "_library_pooling_term", lambda *args: calls.append(1) or library(*args))
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(transformed.hoisted(x, 3), refinement.hoisted(x, 3))
    assert len(calls) == 3  # an iteration each
    with torch.inference_mode():  # 5 x 5 maps: fewer pixels than a tile per slot, the ASPP's own mean
        small = torch.randn(2, 16, 5, 5)
        torch.testing.assert_close(transformed.hoisted(small, 2), refinement.hoisted(small, 2))
    assert len(calls) == 3


def test_a_call_site_remembers_whether_the_library_won_for_its_shape(monkeypatch) -> None:
    """What runs_library reads: a call site's choice once made for good, by slot and shape; not the
    first candidate that a CUDA graph capture runs unremembered, nor a config a test forces."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    from crnet.engines import triton_conv as tc

    monkeypatch.setattr(tc, "_LIBRARY_AT", {})
    monkeypatch.setattr(tc, "_conv_kernel", None)  # a launch would fail: only the library's way runs
    x, packed = torch.randn(1, 8, 5, 5), torch.randn(72, 8)
    args = (x, packed, None, None, (3, 3), (1, 1), (1, 1), False)
    monkeypatch.setattr(tc, "_choose", lambda key, *rest: tc._CHOSEN.setdefault(key, tc.LIBRARY))
    tc.conv2d_nhwc(*args, slot=7, library=lambda: [x])
    assert tc.chose_library(7, (1, 8, 5, 5)) and runs_library(7, (1, 8, 5, 5))
    assert not tc.chose_library(7, (2, 8, 5, 5)) and not tc.chose_library(8, (1, 8, 5, 5))
    tc._CHOSEN.clear()
    monkeypatch.setattr(tc, "_choose", lambda *rest: tc.CONFIGS[0])  # a capture's pick: not remembered
    monkeypatch.setattr(tc, "_conv_kernel", NoLaunch())
    tc.conv2d_nhwc(*args, slot=9, library=lambda: [x])
    assert (9, (1, 8, 5, 5)) not in tc._LIBRARY_AT
    tc.conv2d_nhwc(*args, slot=10, config=tc.CONFIGS[0])
    assert (10, (1, 8, 5, 5)) not in tc._LIBRARY_AT


class NoLaunch:
    """A kernel stand-in whose launches do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def graph_ops(function, *inputs) -> tuple[torch.Tensor, set[str]]:
    """`function(*inputs)` compiled by dynamo, and the names of the operators its traced graph calls."""
    names = set()

    def backend(graph, example_inputs):
        names.update(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward

    torch._dynamo.reset()
    return torch.compile(function, backend=backend, dynamic=False, fullgraph=True)(*inputs), names


def test_call_sites_where_the_library_won_are_traced_as_plain_pytorch(monkeypatch) -> None:
    """Compiled, a call site whose shape chose the library's way is that way in plain PyTorch, which
    inductor fuses with its neighbours, not the opaque op (which would run it eagerly); the others stay ops.
    The loop computes the same either way."""
    pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")
    import copy

    import crnet.engines.triton_head as th
    from crnet.engines import triton_conv as tc
    from crnet.model.conv_epilogues import fuse_conv_epilogues
    from tests.model.test_conv_epilogues import folded_micro

    refinement = fuse_conv_epilogues(folded_micro()).refinement
    refinement.fused = False
    transformed = th.triton_head(copy.deepcopy(refinement))
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = refinement.hoisted(x, 2)
        op_names = ("crnet.triton_conv", "crnet.triton_branches", "crnet.triton_project_classify")
        _, names = graph_ops(transformed.hoisted, x, 2)
        assert all(any(op in name for name in names) for op in op_names), names
        monkeypatch.setattr(tc, "chose_library", lambda slot, shape: True)
        got, names = graph_ops(transformed.hoisted, x, 2)
        assert not any("crnet.triton" in name and "pooling" not in name for name in names), names
        torch.testing.assert_close(got, expected)
        aspp = transformed.aspp.slot  # only the ASPP's branches went the library's way
        monkeypatch.setattr(tc, "chose_library", lambda slot, shape: slot == aspp)
        got, names = graph_ops(transformed.hoisted, x, 2)
        assert not any("triton_branches" in name for name in names)
        assert any("crnet.triton_conv" in name for name in names)
        torch.testing.assert_close(got, expected)
    torch._dynamo.reset()


def test_each_new_shape_runs_eagerly_once_before_the_compiled_function() -> None:
    """EagerFirst: a new signature (shape, dtype, strides) runs the eager function once, for the Triton ops
    to time their choices before the compiled function traces; every call runs the compiled one."""
    calls = []

    def eager(x):
        calls.append(("eager", x.shape))

    def compiled(x):
        calls.append(("compiled", x.shape))

    first = EagerFirst(eager, compiled)
    a, b = torch.zeros(1, 3), torch.zeros(2, 3)
    for x in (a, a, b, a, b, a.t()):
        first(x)
    assert calls == [
        ("eager", (1, 3)), ("compiled", (1, 3)), ("compiled", (1, 3)),
        ("eager", (2, 3)), ("compiled", (2, 3)), ("compiled", (1, 3)), ("compiled", (2, 3)),
        ("eager", (3, 1)), ("compiled", (3, 1)),
    ]  # fmt: skip


@pytest.mark.cuda
@CUDA
def test_every_configuration_on_cuda_is_the_convolution() -> None:
    """The r50 head's shape, FP16 channels-last, each tile and split compiled for this GPU."""
    pytest.importorskip("triton")
    from crnet.engines import triton_conv as tc

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(256, 256, 3, padding=12, dilation=12).cuda().half()
    x = torch.randn(1, 256, 41, 41, device="cuda", dtype=torch.half).contiguous(
        memory_format=torch.channels_last
    )
    residual = torch.randn_like(x)
    with torch.inference_mode():
        expected = conv(x) + residual
    for config in tc.CONFIGS:
        with torch.inference_mode():
            got, relu_got = tc.conv2d_nhwc(
                x, pack_weight(conv.weight), conv.bias, residual, (3, 3), (12, 12), (12, 12), False, True,
                slot=5, config=config,
            )  # fmt: skip
            torch.cuda.synchronize()
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2, msg=lambda m, c=config: f"{c}: {m}")
        torch.testing.assert_close(relu_got, expected.relu(), rtol=1e-2, atol=1e-2)
        assert int(tc._COUNTERS[got.device].abs().sum()) == 0
        with torch.inference_mode():  # the last block's form: each image's column sums, in slots
            got, sums = tc.conv2d_nhwc(
                x, pack_weight(conv.weight), conv.bias, residual, (3, 3), (12, 12), (12, 12), False,
                slot=5, config=config, column_sums=True,
            )  # fmt: skip
        torch.testing.assert_close(sums.sum(dim=1), got.float().sum(dim=(2, 3)), rtol=1e-3, atol=1e-1)
    # The library's way, which a shape runs where cuDNN is the faster: with and without its fused ReLU.
    args = (x, conv.weight, conv.bias, residual, [12, 12], [12, 12])
    with torch.inference_mode():
        got, relu_got = _library_conv(*args, False, True)
        fused = _library_conv(*args, True, False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(relu_got, expected.relu(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fused, expected.relu(), rtol=1e-2, atol=1e-2)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (got, relu_got, fused))


@pytest.mark.cuda
@CUDA
def test_the_aspps_four_branches_in_one_launch_on_cuda() -> None:
    """The r50 ASPP's 1x1 and dilated (6, 12, 18) branches, FP16 channels-last, each tile and split."""
    pytest.importorskip("triton")
    from crnet.engines import triton_conv as tc

    torch.manual_seed(0)
    aspp = ASPP(256, (6, 12, 18)).cuda().half().eval()
    twin = TritonASPP.of(aspp)
    geometries = [tuple(twin.geometry[i : i + 6]) for i in range(0, 24, 6)]
    x = torch.randn(1, 256, 41, 41, device="cuda", dtype=torch.half).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        expected = aspp.hoisted_terms(x, aspp.project.weight[:, :256], None)[0]
    for config in tc.CONFIGS:
        with torch.inference_mode():
            got = tc.branches_nhwc(
                x,
                twin.packed,
                twin.stacked_bias,
                None,
                (3, 3),
                geometries,
                True,
                slot=6,
                config=config,
            )[0]
            torch.cuda.synchronize()
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2, msg=lambda m, c=config: f"{c}: {m}")
        assert int(tc._COUNTERS[got.device].abs().sum()) == 0
    with torch.inference_mode():  # the library's way: a cuDNN convolution per branch, then the concatenation
        weights, biases = [b.weight for b in aspp.branches], [b.bias for b in aspp.branches]
        got = _library_branches(x, weights, biases, twin.geometry)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@CUDA
def test_the_projection_kernel_on_cuda_is_the_heads_end() -> None:
    """The r50 head's end of an iteration, FP16 channels-last, each tile and split, against the library's."""
    pytest.importorskip("triton")
    from crnet.engines import triton_conv as tc
    from crnet.engines import triton_project as tp

    torch.manual_seed(0)
    project = torch.nn.Conv2d(1280, 256, 1).cuda().half()
    classifier = TritonClassifier.of(Classifier(256, 2, 1).cuda().half(), project)
    like = dict(device="cuda", dtype=torch.half)
    branches = torch.randn(1, 1024, 41, 41, **like).relu().contiguous(memory_format=torch.channels_last)
    pool_bias = torch.randn(1, 256, 1, 1, **like) * 0.1
    branch_weight = project.weight[:, 256:]
    with torch.inference_mode():
        expected = _library_project_classify(
            branches, branch_weight, pool_bias, classifier.weight, classifier.bias
        )
        for config in tp.CONFIGS:
            logits, probs = tp.project_classify(
                branches, classifier.packed, pool_bias.reshape(1, 256), classifier.packed_classifier,
                classifier.bias, torch.channels_last, slot=9, config=config,
            )  # fmt: skip
            torch.cuda.synchronize()
            torch.testing.assert_close(
                logits, expected[0], rtol=2e-2, atol=2e-2, msg=lambda m, c=config: f"{c}: {m}"
            )
            torch.testing.assert_close(probs, expected[1], rtol=1e-2, atol=1e-2)
            assert int(tc._COUNTERS[logits.device].abs().sum()) == 0


@pytest.mark.cuda
@CUDA
def test_the_pooling_term_kernel_on_cuda_is_the_librarys() -> None:
    """The r50 ASPP's pooling term from column sums (2 images of 41 x 41, 256 channels), each config."""
    pytest.importorskip("triton")
    from crnet.engines import triton_project as tp
    from crnet.engines.triton_head import _library_pooling_term, sum_slots

    torch.manual_seed(0)
    like = dict(device="cuda", dtype=torch.half)
    h = torch.randn(2, 256, 41, 41, device="cuda")
    sums = torch.zeros(2, sum_slots(41, 41), 256, device="cuda")
    sums[:, 0], sums[:, 3] = h[..., :20, :].sum(dim=(2, 3)), h[..., 20:, :].sum(dim=(2, 3))  # two slots
    weights = [torch.randn(256, 256, 1, 1, **like) / 16 for _ in range(2)]
    biases = [torch.randn(256, **like) / 10 for _ in range(2)]
    expected = _library_pooling_term(sums, 41 * 41, weights[0], biases[0], weights[1], biases[1])
    for config in tp.POOLING_CONFIGS:
        args = (pack_weight(weights[0]), biases[0], pack_weight(weights[1]), biases[1])
        got = tp.pooling_term(sums, 41 * 41, *args, config=config)
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2, msg=lambda m, c=config: f"{c}: {m}")


@pytest.mark.cuda
@CUDA
def test_the_triton_head_on_cuda_captured_and_replayed(micro_checkpoint) -> None:
    pytest.importorskip("triton")
    query, supports, masks = (x.cuda() for x in episode(1))
    base = "torch:fp16+channels-last+cudnn-epilogues+cuda-graphs+torch-loop"
    with open_runtime(RuntimeSpec.parse(base), checkpoint=micro_checkpoint, device="cuda") as plain:
        expected = plain.episode(query, supports, masks)
    with open_runtime(
        RuntimeSpec.parse(base + "+triton-head"), checkpoint=micro_checkpoint, device="cuda"
    ) as head:
        assert isinstance(head.model.refinement.residual2, TritonResidualBranch)
        for _ in range(3):  # the timing and capture, then replays
            torch.testing.assert_close(head.episode(query, supports, masks), expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeUnavailable, match="add \\+torch-loop"):
        TorchRuntime(micro_checkpoint, device="cuda", precision="fp16", triton_head=True, fused=True)
    with pytest.raises(RuntimeUnavailable, match="another ASPP option"):
        TorchRuntime(micro_checkpoint, device="cuda", triton_head=True, concurrent_aspp=True)
    assert RuntimeSpec.parse(DEPLOYED_GPU + "+triton-head")  # the row gpu_check.sh benches


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("library_wins", [True, False])
def test_compiled_the_call_sites_where_the_library_won_do_not_call_our_ops(
    micro_checkpoint, monkeypatch, library_wins
) -> None:
    """Compiled (without CUDA graphs, so that every call runs Python), after the first call of a shape: where
    the library's way won, the ops' CUDA code is not called again (inductor runs that way); where ours won,
    it is called on every call."""
    pytest.importorskip("triton")
    from crnet.engines import triton_conv as tc
    from crnet.engines import triton_project as tp

    chosen = {}  # this test's choices, faked: kept from the others'

    def choose(key, configs, *rest):
        return chosen.setdefault(key, tc.LIBRARY if library_wins else configs[0])

    for module in (tc, tp):
        monkeypatch.setattr(module, "_CHOSEN", chosen)
        monkeypatch.setattr(module, "_choose", choose)
    monkeypatch.setattr(tc, "_LIBRARY_AT", {})
    calls = []
    for module, name in [(tc, "conv2d_nhwc"), (tc, "branches_nhwc"), (tp, "project_classify")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k))
    query, supports, masks = (x.cuda() for x in episode(1))
    spec = RuntimeSpec.parse("torch:fp16+channels-last+cudnn-epilogues+compile+torch-loop+triton-head")
    with open_runtime(spec, checkpoint=micro_checkpoint, device="cuda") as runtime:
        first = runtime.episode(query, supports, masks)
        before = len(calls)
        assert before > 0  # the eager first call: every call site chose
        again = runtime.episode(query, supports, masks)
    torch.testing.assert_close(again, first)
    assert (len(calls) == before) == library_wins


@pytest.mark.cuda
@pytest.mark.slow
@CUDA
def test_the_triton_rows_on_the_tiny_checkpoint_agree_with_the_deployed_row() -> None:
    """Every Triton kernel on maps of the tiny preset (129 px images, 17 x 17 features: the pooling term from
    column sums, tiles across two images; the encoder's 33 x 33 maps), captured and replayed, against the
    deployed row."""
    pytest.importorskip("triton")
    checkpoint = Path(__file__).parents[2] / "checkpoints" / "tiny_fold0.pt"
    query, supports, masks = (x.cuda() for x in episode(1, batch=2, size=129))
    with open_runtime(RuntimeSpec.parse(DEPLOYED_GPU), checkpoint=checkpoint, device="cuda") as deployed:
        expected = deployed.episode(query, supports, masks)
    spec = RuntimeSpec.parse(DEPLOYED_GPU + "+triton-head+triton-encoder")
    with open_runtime(spec, checkpoint=checkpoint, device="cuda") as runtime:
        for _ in range(3):  # the timing and capture, then replays
            got = runtime.episode(query, supports, masks)
            torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-2)
    assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.99
