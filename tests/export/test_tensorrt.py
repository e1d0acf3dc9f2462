"""The TensorRT builder path. Without TensorRT, a recording stand-in for its Python API checks what we
ask of it (network flags, FP16 route per major version, profiles, workspace, timing cache); with TensorRT
and a GPU, real engines are built and compared with PyTorch."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import onnx
import pytest
import torch

from crnet import checkpoint
from crnet.bundle import BatchRange, load_bundle
from crnet.export import tensorrt as tensorrt_builder
from crnet.export.build import export_bundle


def fake_tensorrt(version: str) -> types.ModuleType:
    """Just enough of the tensorrt module for export/tensorrt.py, recording every request."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds = []
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    flags = {"FP16": "fp16"} if version.startswith("10.") else {}  # 11 removed weak typing
    trt.BuilderFlag = types.SimpleNamespace(**flags)

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.source = flags, [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            model = onnx.load(path)
            for value in model.graph.input:
                dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
                self.network.inputs.append(types.SimpleNamespace(name=value.name, shape=dims))
            self.network.source = path
            return True

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles, self.cache = set(), {}, [], None

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, data):  # caches are runs of "+"; "other-gpu" ones timed elsewhere
            if data.strip(b"+") and not data.startswith(b"other-gpu"):
                return None  # bytes it cannot read
            return types.SimpleNamespace(data=data, serialize=lambda: data + b"+")

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data.startswith(b"other-gpu") and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile(dict):
        def set_shape(self, name, low, opt, high):
            self[name] = (low, opt, high)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record = {
                "source": network.source.rsplit("/", 1)[-1],
                "strongly_typed": bool(network.flags & (1 << 5)),
                "flags": sorted(config.flags),
                "workspace": config.pools["workspace"],
                "profile": {k: list(map(list, v)) for k, v in config.profiles[0].items()},
                "cache_in": config.cache.data.decode(),
            }
            trt.builds.append(record)
            return json.dumps(record).encode()

    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


def use_tensorrt(monkeypatch, trt) -> None:
    """The builder imports tensorrt through `require`; the exporter itself must not see the stand-in."""
    real = tensorrt_builder.require
    monkeypatch.setattr(
        tensorrt_builder, "require", lambda name, why: trt if name == "tensorrt" else real(name, why)
    )


@pytest.fixture
def pretend_gpu(monkeypatch):
    monkeypatch.setattr(tensorrt_builder, "cuda_device_name", lambda: "Pretend GPU")


@pytest.mark.parametrize(
    "version, fp16_source, strongly_typed, flags",
    [("10.16.1", "fp32", False, ["fp16"]), ("11.4.0", "fp16", True, [])],
    ids=["tensorrt-10-fp16-flag", "tensorrt-11-strongly-typed"],
)
def test_engine_builds_follow_the_tensorrt_version(
    micro_checkpoint, tmp_path, monkeypatch, pretend_gpu, version, fp16_source, strongly_typed, flags
) -> None:
    trt = fake_tensorrt(version)
    use_tensorrt(monkeypatch, trt)
    cache = tmp_path / "timing.cache"
    batch = BatchRange(1, 4, 32)
    result = export_bundle(
        micro_checkpoint, tmp_path / "b", fp16=True, tensorrt=True, batch=batch, timing_cache=cache
    )
    assert result.tensorrt_skipped is None
    bundle = load_bundle(result.bundle)  # engine files are in the manifest with their checksums
    fp32 = [b for b in trt.builds if b["source"].endswith(".fp32.onnx") and not b["flags"]]
    fp16 = trt.builds[3:]
    assert len(trt.builds) == 6 and len(fp32) >= 3
    for record in trt.builds[:3]:  # FP32 engines: the FP32 graphs, typed
        assert record["source"].endswith(".fp32.onnx") and record["flags"] == []
        assert record["strongly_typed"]
    for record in fp16:
        assert record["source"].endswith(f".{fp16_source}.onnx")
        assert record["strongly_typed"] is strongly_typed and record["flags"] == flags
    head = next(r for r in fp16 if r["source"].startswith("head"))
    assert head["profile"]["features"] == [[1, 16, 5, 5], [4, 16, 5, 5], [32, 16, 5, 5]]
    assert head["profile"]["vector"] == [[1, 16], [4, 16], [32, 16]]
    assert all(r["workspace"] == 4 << 30 for r in trt.builds)
    # One timing cache, read by every build after the first and grown by each.
    assert trt.builds[0]["cache_in"] == "" and trt.builds[-1]["cache_in"] == "+" * 5
    assert cache.read_bytes() == b"+" * 6
    engine = json.loads(bundle.engine("fp16", "head").read_bytes())
    assert engine["source"] == head["source"]
    assert bundle.manifest["engines"]["fp16"]["head"]["tensorrt_version"] == version


def engines_of(bundle, timing_cache=None) -> dict:
    """build_engines on an exported bundle's graphs (no export of its own: the tests stay short)."""
    manifest = load_bundle(bundle).manifest
    return tensorrt_builder.build_engines(
        bundle,
        manifest,
        fp16=False,
        batch=BatchRange(),
        workspace_bytes=1 << 20,
        timing_cache=timing_cache,
        progress=lambda line: None,
    )


@pytest.mark.parametrize("content", [b"my notes", b"other-gpu+++"], ids=["not-a-cache", "another-gpus"])
def test_a_timing_cache_tensorrt_refuses_is_never_replaced(
    micro_bundle, tmp_path, monkeypatch, pretend_gpu, content
) -> None:
    """--timing-cache notes.txt passed every check, and the build would have replaced the file with a cache
    (and a cache of another GPU with one of this GPU): refused before the export, the file as it was."""
    use_tensorrt(monkeypatch, fake_tensorrt("10.16.1"))
    cache = tmp_path / "notes.txt"
    cache.write_bytes(content)
    with pytest.raises(tensorrt_builder.EngineBuildError, match="is not a timing cache of TensorRT 10.16.1"):
        tensorrt_builder.check_timing_cache(cache)
    copy = Path(shutil.copytree(micro_bundle, tmp_path / "b"))
    with pytest.raises(tensorrt_builder.EngineBuildError, match="would replace it"):
        engines_of(copy, cache)
    assert cache.read_bytes() == content and not list(copy.glob("*.plan"))


def test_crnets_own_timing_cache_starts_afresh_when_tensorrt_refuses_it(
    micro_bundle, tmp_path, monkeypatch, pretend_gpu
) -> None:
    trt = fake_tensorrt("10.16.1")
    use_tensorrt(monkeypatch, trt)
    monkeypatch.setattr(tensorrt_builder, "DEFAULT_TIMING_CACHE", tmp_path / "cache")
    default = tmp_path / "cache" / "timing-10.16.1-Pretend_GPU.cache"
    default.parent.mkdir()
    default.write_bytes(b"other-gpu")  # timed by another GPU of the same name, or damaged
    engines_of(Path(shutil.copytree(micro_bundle, tmp_path / "b")))
    assert trt.builds[0]["cache_in"] == "" and default.read_bytes() == b"+++"


def test_a_timing_cache_behind_a_link_is_updated_where_it_lies(
    micro_bundle, tmp_path, monkeypatch, pretend_gpu
) -> None:
    use_tensorrt(monkeypatch, fake_tensorrt("10.16.1"))
    real = tmp_path / "caches" / "trt.cache"
    real.parent.mkdir()
    real.write_bytes(b"+")
    link = tmp_path / "link.cache"
    link.symlink_to(real)
    engines_of(Path(shutil.copytree(micro_bundle, tmp_path / "b")), link)
    assert link.is_symlink() and real.read_bytes() == b"++++"


def test_no_builder_is_one_error(monkeypatch, pretend_gpu) -> None:
    """The runtime-only ("lean") packages have no Builder: found before any work."""
    runtime_only = types.ModuleType("tensorrt")
    runtime_only.__version__ = "10.16.1"
    use_tensorrt(monkeypatch, runtime_only)
    with pytest.raises(tensorrt_builder.TensorRTUnavailable, match="has no builder"):
        tensorrt_builder.builder_here()


def test_no_gpu_skips_engines_but_writes_the_bundle(micro_checkpoint, tmp_path, monkeypatch) -> None:
    use_tensorrt(monkeypatch, fake_tensorrt("10.16.1"))
    monkeypatch.setattr(tensorrt_builder, "cuda_device_name", lambda: None)
    result = export_bundle(micro_checkpoint, tmp_path / "b", tensorrt=True)
    assert "needs a CUDA GPU" in result.tensorrt_skipped
    assert load_bundle(result.bundle).manifest["engines"] == {}


@pytest.mark.tensorrt
@pytest.mark.cuda
def test_real_engines_match_pytorch(micro_checkpoint, tmp_path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    from crnet.engines import RuntimeSpec, open_runtime

    result = export_bundle(micro_checkpoint, tmp_path / "b", fp16=True, tensorrt=True)
    model = checkpoint.load_model(micro_checkpoint, "cuda")
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 33, 33, generator=generator).cuda()
    supports = torch.randn(2, 1, 3, 33, 33, generator=generator).cuda()
    masks = (torch.rand(2, 1, 33, 33, generator=generator) > 0.5).long().cuda()
    with torch.no_grad():
        expected = model(query, supports, masks).query
        expected = torch.nn.functional.interpolate(
            expected, size=(33, 33), mode="bilinear", align_corners=True
        )
    for precision, tolerance in (("fp32", 1e-3), ("fp16", 3e-2)):  # TF32/FP16 kernels round
        with open_runtime(
            RuntimeSpec("tensorrt", precision), bundle=load_bundle(result.bundle), device="cuda"
        ) as runtime:
            logits = runtime.episode(query, supports, masks)
        torch.testing.assert_close(logits, expected, atol=tolerance, rtol=tolerance)
