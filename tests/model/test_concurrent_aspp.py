"""The ASPP's branches on streams of their own compute the hoisted loop's very terms: the twin, the custom
op and its fake, the streams, and on CUDA inside a captured graph and the runtime (what the head options
share: tests/engines/test_head_options.py)."""

import pytest
import torch
from torch import nn

from crnet.engines import RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.model.banded_conv import band_aspp
from crnet.model.concurrent_aspp import ConcurrentASPP, _side_streams, aspp_terms, concurrent_aspp
from crnet.model.refinement import ASPP
from tests.engines.test_runtimes import episode
from tests.model.test_conv_epilogues import folded_micro
from tests.model.test_crnet import MICRO

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def terms_arguments(aspp: ASPP, x: torch.Tensor) -> tuple:
    channels = x.shape[1]
    project = aspp.project
    return (
        x,
        aspp.image_pool.weight,
        aspp.image_pool.bias,
        project.weight[:, :channels],
        project.bias,
        [branch.weight for branch in aspp.branches],
        [branch.bias for branch in aspp.branches],
        [branch.dilation[0] for branch in aspp.branches],
        False,
    )


def test_the_twin_shares_the_aspps_modules_and_keeps_its_forward() -> None:
    aspp = folded_micro().refinement.aspp
    twin = ConcurrentASPP.of(aspp)
    assert twin.branches is aspp.branches and twin.project is aspp.project
    assert twin.image_pool is aspp.image_pool
    assert not any(p.is_meta for p in twin.parameters())
    x = torch.randn(2, aspp.image_pool.in_channels, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), aspp(x), rtol=0, atol=0)  # training's path is the ASPP's own


def test_the_op_and_its_fake_agree() -> None:
    """Schema, fake impl (shapes and strides, which torch.compile trusts) and the real op, in both layouts."""
    aspp = folded_micro().refinement.aspp
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, aspp.image_pool.in_channels, 9, 9).contiguous(memory_format=layout)
        arguments = [a.detach() if isinstance(a, torch.Tensor) else a for a in terms_arguments(aspp, x)]
        arguments[5:7] = [[w.detach() for w in arguments[5]], [b.detach() for b in arguments[6]]]
        torch.library.opcheck(aspp_terms, arguments)


def test_only_the_aspps_own_convolutions_run_concurrently() -> None:
    model = band_aspp(folded_micro(), (MICRO.feature_size, MICRO.feature_size))
    with pytest.raises(ValueError, match="size-keeping stride-1 convolutions"):
        concurrent_aspp(model)
    aspp = folded_micro().refinement.aspp
    aspp.branches[2] = nn.Conv2d(16, 16, 3, padding=1, dilation=2)
    with pytest.raises(ValueError, match="size-keeping"):
        ConcurrentASPP.of(aspp)


class PooledStream:
    """A stand-in for torch.cuda.Stream on any machine: a pool of 8 streams handed out in turn, as PyTorch
    hands out its 32."""

    handed_out = 0

    def __init__(self, device=None) -> None:
        self.id = PooledStream.handed_out % 8
        PooledStream.handed_out += 1

    def __eq__(self, other) -> bool:
        return isinstance(other, PooledStream) and other.id == self.id

    def __hash__(self) -> int:
        return self.id


def test_the_side_streams_stay_distinct_when_the_pool_comes_round_again(monkeypatch) -> None:
    """A new stream may be one the list holds already, or the caller's: five branches still get five
    streams, none the caller's (on the H200 two branches once shared one)."""
    import crnet.model.concurrent_aspp as concurrent

    monkeypatch.setattr(concurrent.torch.cuda, "Stream", PooledStream)
    monkeypatch.setattr(concurrent, "_STREAMS", {})
    for _ in range(40):
        main = PooledStream()
        streams = _side_streams(torch.device("cuda", 0), main, 5)
        assert len(set(streams)) == 5 and main not in streams


@pytest.mark.cuda
@CUDA
def test_the_side_streams_are_never_the_callers() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    for _ in range(40):  # past the 32 streams of PyTorch's pool, so that one of them is drawn again
        main = torch.cuda.Stream(device)
        streams = _side_streams(device, main, 5)
        assert len(set(streams)) == 5 and main not in streams


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "cuDNN's fused ReLU"])
def test_the_concurrent_terms_on_cuda_eager_and_replayed(fused) -> None:
    torch.manual_seed(0)
    aspp = ASPP(64, (6, 12, 18)).cuda().half().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 64, 41, 41, device="cuda", dtype=torch.half).contiguous(
        memory_format=torch.channels_last
    )
    arguments = (*terms_arguments(aspp, x)[:-1], fused)
    with torch.inference_mode():
        expected = aspp.hoisted_terms(x, arguments[3], arguments[4])
        eager = aspp_terms(*arguments)
        # cuDNN's fused ReLU is another kernel than conv-then-ReLU: a few FP16 roundings apart.
        for got, want in zip(eager, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-3)
        assert eager[0].stride() == expected[0].stride()  # channels-last, as the concatenation's
        aspp_terms(*arguments)  # warm up outside the capture, as CapturedCalls does
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = aspp_terms(*arguments)
        x.mul_(0.5)  # a new input in the same buffer
        graph.replay()
        torch.cuda.synchronize()
        expected = aspp.hoisted_terms(x, arguments[3], arguments[4])
    for got, want in zip(replayed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-3)


@pytest.mark.cuda
@CUDA
def test_the_runtime_with_concurrent_branches_matches_the_plain_one(micro_checkpoint) -> None:
    query, supports, masks = (x.cuda() for x in episode(1))
    base = "torch:fp16+channels-last+cudnn-epilogues+cuda-graphs+torch-loop"
    with open_runtime(RuntimeSpec.parse(base), checkpoint=micro_checkpoint, device="cuda") as plain:
        expected = plain.episode(query, supports, masks)
    spec = RuntimeSpec.parse(base + "+concurrent-aspp")
    with open_runtime(spec, checkpoint=micro_checkpoint, device="cuda") as concurrent:
        assert type(concurrent.model.refinement.aspp) is ConcurrentASPP
        for _ in range(2):  # the capture, then a replay
            logits = concurrent.episode(query, supports, masks)
            torch.testing.assert_close(logits, expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeUnavailable, match="add \\+torch-loop"):
        TorchRuntime(micro_checkpoint, device="cuda", precision="fp16", concurrent_aspp=True, fused=True)
    with pytest.raises(RuntimeUnavailable, match="not \\+banded-aspp"):
        TorchRuntime(micro_checkpoint, device="cuda", concurrent_aspp=True, banded_aspp=True)
