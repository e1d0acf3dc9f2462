"""The ASPP's dilated convolutions without the taps that read only padding: exact in float64 for the bands
every geometry makes (the paper's 41x41 map, maps smaller than the dilation, uneven paddings, blocks that
no tap reaches), in both layouts, with the ReLU kept in each block, through the model, the runtime and
torch.compile."""

import copy

import pytest
import torch
from torch import nn

from crnet.engines import RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.model.banded_conv import BandedConv, band_aspp, tap_bands
from crnet.model.conv_epilogues import ConvReLU, fuse_conv_epilogues
from tests.engines.test_runtimes import episode
from tests.model.test_conv_epilogues import folded_micro
from tests.model.test_crnet import MICRO
from tests.model.test_crnet import episode as model_episode

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_bands_of_the_papers_widest_branch() -> None:
    # 41x41 features, dilation 18: the top 18 rows miss tap -1, the bottom 18 miss tap +1
    assert tap_bands(41, 3, 18, 18) == [(0, 18, 1, 3), (18, 23, 0, 3), (23, 41, 0, 2)]
    # a map no wider than the dilation: every output reads the centre tap only
    assert tap_bands(5, 3, 6, 6) == [(0, 5, 1, 2)]
    # no padding: every output reads every tap
    assert tap_bands(20, 5, 4, 0) == [(0, 4, 0, 5)]


def multiply_adds(size: int, kernel: int, dilation: int) -> tuple[int, int]:
    """Row-taps (per output column and channel pair) of the banded and the plain convolution, one axis."""
    bands = tap_bands(size, kernel, dilation, dilation * (kernel - 1) // 2)
    return sum((end - start) * (t1 - t0) for start, end, t0, t1 in bands), size * kernel


@pytest.mark.parametrize("dilation, share", [(6, 0.81), (12, 0.65), (18, 0.50)])
def test_the_papers_branches_skip_what_only_reads_padding(dilation, share) -> None:
    banded, plain = multiply_adds(41, 3, dilation)
    assert (banded / plain) ** 2 == pytest.approx(share, abs=0.01)


@pytest.mark.parametrize(
    "geometry",
    [
        (41, 41, 3, 18, 18),  # the paper's widest branch
        (41, 41, 3, 6, 6),
        (17, 13, 3, 12, 12),  # the tiny preset's map against a wide dilation, uneven sides
        (5, 5, 3, 18, 18),  # smaller than the dilation: the centre tap alone
        (11, 14, 3, (2, 3), (1, 5)),  # uneven dilation and padding per axis
        (6, 6, 3, 2, 9),  # padding wider than the kernel reaches: outputs that no tap reads (the bias)
        (20, 20, 5, 4, 0),  # no padding at all: one block
    ],
    ids=["d18 on 41", "d6 on 41", "d12 on 17x13", "d18 on 5", "uneven", "bias-only rows", "no padding"],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "ConvReLU"])
def test_the_banded_convolution_is_the_padded_one(geometry, layout, relu) -> None:
    height, width, kernel, dilation, padding = geometry
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, kernel, padding=padding, dilation=dilation).double()
    source = ConvReLU.of(conv) if relu else conv
    x = torch.randn(2, 8, height, width, dtype=torch.double).contiguous(memory_format=layout)
    expected = conv(x).relu() if relu else conv(x)
    for size in [(height, width), (height + 1, width)]:  # its own slices of the weight, and cut per call
        with torch.no_grad():
            got = BandedConv.of(source, size)(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert got.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("stride, groups", [(2, 1), (1, 2)])
def test_only_plain_stride_1_convolutions_are_banded(stride, groups) -> None:
    with pytest.raises(ValueError, match="plain stride-1"):
        BandedConv.of(nn.Conv2d(4, 4, 3, stride=stride, padding=6, dilation=6, groups=groups), (9, 9))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("epilogues", [False, True], ids=["plain", "fused epilogues"])
def test_a_banded_model_computes_what_the_folded_model_does(layout, epilogues) -> None:
    folded = folded_micro()
    model = copy.deepcopy(folded)
    model = fuse_conv_epilogues(model) if epilogues else model
    size = MICRO.feature_size
    model = band_aspp(model, (size, size)).to(memory_format=layout)
    branches = model.refinement.aspp.branches
    assert not isinstance(branches[0], BandedConv)  # the 1x1 branch reads no padding
    assert all(isinstance(branch, BandedConv) and branch.relu == epilogues for branch in branches[1:])
    assert model.state_dict().keys() == folded.state_dict().keys()  # the same parameters, by name
    query, supports, masks, _ = model_episode(MICRO)
    query = query.contiguous(memory_format=layout)
    with torch.inference_mode():
        got, expected = model(query, supports, masks).query, folded(query, supports, masks).query
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_runtime_option_bands_the_aspp(micro_checkpoint) -> None:
    query, supports, masks = episode(1)
    with open_runtime(RuntimeSpec.parse("torch+torch-loop"), checkpoint=micro_checkpoint) as plain:
        expected = plain.episode(query, supports, masks)
    with open_runtime(
        RuntimeSpec.parse("torch+banded-aspp+torch-loop"), checkpoint=micro_checkpoint
    ) as banded:
        assert isinstance(banded.model.refinement.aspp.branches[1], BandedConv)
        assert banded.label == "torch fp32 banded-aspp"
        logits = banded.episode(query, supports, masks)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeUnavailable, match="no rewrite of ours"):
        TorchRuntime(micro_checkpoint, anchor=True, banded_aspp=True)


@pytest.mark.slow
def test_torch_compile_traces_the_banded_aspp() -> None:
    """One graph (fullgraph: no break), with cuDNN's fused ReLU op in each block, as a deployed row would."""
    size = 9
    aspp = fuse_conv_epilogues(folded_micro()).refinement.aspp
    aspp = band_aspp(aspp, (size, size)).to(memory_format=torch.channels_last)
    x = torch.randn(2, aspp.image_pool.in_channels, size, size).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(aspp, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), aspp(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@CUDA
def test_banded_cudnn_blocks_match_the_padded_convolution_on_cuda() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=18, dilation=18).cuda().half().to(memory_format=torch.channels_last)
    banded = BandedConv.of(ConvReLU.of(conv), (41, 41))
    x = torch.randn(2, 64, 41, 41, device="cuda", dtype=torch.half).contiguous(
        memory_format=torch.channels_last
    )
    with torch.inference_mode():
        torch.testing.assert_close(banded(x), conv(x).relu(), rtol=2e-3, atol=2e-3)
