"""The stem's stride-2 convolution as a stride-1 one over 2x2 pixel blocks: exact in float64 for every
geometry the rearrangement has to get right (odd and even sides, kernels odd and even, colours padded), in
both memory layouts, through the model, the runtimes and torch.compile."""

import copy

import pytest
import torch
from torch import nn

from crnet.engines import RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.model.conv_epilogues import fuse_conv_epilogues
from crnet.model.space_to_depth import SpaceToDepthConv, space_to_depth, space_to_depth_stem
from tests.engines.test_runtimes import episode
from tests.model.test_conv_epilogues import assert_encoder_compiles_whole, folded_micro
from tests.model.test_crnet import MICRO
from tests.model.test_crnet import episode as model_episode


@pytest.mark.parametrize(
    "geometry",
    [
        (3, 7, 3, 321, 321),  # r50's stem at its input size: odd sides need one more padded row
        (3, 7, 3, 320, 317),  # even and odd
        (8, 3, 1, 41, 40),  # an odd 3x3 kernel with whole channel vectors
        (5, 1, 0, 9, 8),  # 1x1: a kernel padded to 2x2 taps
        (1, 4, 1, 15, 16),  # an even kernel, one colour
    ],
    ids=["r50 stem", "odd and even sides", "3x3", "1x1", "even kernel"],
)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
def test_the_blocked_convolution_is_the_strided_one(geometry, layout) -> None:
    channels, kernel, padding, height, width = geometry
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 16, kernel, stride=2, padding=padding).double()
    blocked = SpaceToDepthConv.of(conv)
    assert blocked.blocked_weight.shape[1] % 8 == 0  # whole 16-byte vectors of FP16 channels
    x = torch.randn(2, channels, height, width, dtype=torch.double).contiguous(memory_format=layout)
    with torch.no_grad():
        expected, got = conv(x), blocked(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if channels > 1:  # a one-channel tensor is both layouts at once
        assert got.is_contiguous(memory_format=layout)


def test_space_to_depth_puts_each_block_in_the_channels() -> None:
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    blocks = space_to_depth(x, 2, 3, channels=4)
    assert blocks.shape == (1, 16, 2, 3)
    for c, p, q in [(0, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0)]:
        assert torch.equal(blocks[0, c * 4 + p * 2 + q], x[0, c, p::2, q::2])
    assert not blocks[0, 8:].any()  # the padded colours are zeros


@pytest.mark.parametrize("stride, dilation", [(1, 1), (2, 2)])
def test_only_plain_stride_2_convolutions_are_blocked(stride, dilation) -> None:
    with pytest.raises(ValueError, match="plain stride-2"):
        SpaceToDepthConv.of(nn.Conv2d(3, 8, 3, stride=stride, dilation=dilation))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
def test_a_model_with_a_blocked_stem_computes_what_the_folded_model_does(layout) -> None:
    folded = folded_micro()
    model = space_to_depth_stem(copy.deepcopy(folded)).to(memory_format=layout)
    assert isinstance(model.encoder.trunk.conv1, SpaceToDepthConv)
    assert model.state_dict().keys() == folded.state_dict().keys()  # the same parameters, by name
    query, supports, masks, _ = model_episode(MICRO)
    query = query.contiguous(memory_format=layout)
    with torch.inference_mode():
        torch.testing.assert_close(model.encode(query), folded.encode(query), rtol=1e-5, atol=1e-5)
        got, expected = model(query, supports, masks).query, folded(query, supports, masks).query
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # with the fused epilogues too: the blocked stem is already aligned and stays as it is
    fused = fuse_conv_epilogues(model)
    assert isinstance(fused.encoder.trunk.conv1, SpaceToDepthConv)
    with torch.inference_mode():
        torch.testing.assert_close(fused.encode(query), folded.encode(query), rtol=1e-5, atol=1e-5)


def test_the_runtime_option_blocks_the_stem(micro_checkpoint) -> None:
    query, supports, masks = episode(1)
    with open_runtime(RuntimeSpec.parse("torch"), checkpoint=micro_checkpoint) as plain:
        expected = plain.episode(query, supports, masks)
    with open_runtime(RuntimeSpec.parse("torch+space-to-depth"), checkpoint=micro_checkpoint) as blocked:
        assert isinstance(blocked.model.encoder.trunk.conv1, SpaceToDepthConv)
        assert blocked.label == "torch fp32 space-to-depth fused"
        logits = blocked.episode(query, supports, masks)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeUnavailable, match="no rewrite of ours"):
        TorchRuntime(micro_checkpoint, anchor=True, space_to_depth=True)


@pytest.mark.slow
def test_torch_compile_traces_the_blocked_stem() -> None:
    assert_encoder_compiles_whole(space_to_depth_stem(folded_micro()))
