"""crnet::conv_bias_relu and the transform that gives a folded model's convolutions their epilogues: the op's
registration (schema, fake impl against the real one, torch.compile), the transformed model against the
folded one, and on a GPU the cuDNN kernels against plain PyTorch, eagerly and under graph replay."""

import copy

import pytest
import torch
import torch.nn.functional as F

from crnet.model import conv_epilogues as epilogues
from crnet.model.backbone import Bottleneck
from crnet.model.conv_epilogues import (
    ConvReLU,
    FusedBottleneck,
    FusedNeck,
    PaddedConvReLU,
    conv_bias_relu,
    fuse_conv_epilogues,
)
from crnet.model.crnet import build_model
from crnet.model.fold import fold_batchnorm
from tests.model.test_crnet import MICRO, episode

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def arguments(device="cpu", dtype=torch.float32, residual=True, channels_last=True, bias=True, step=1):
    """8 channels in, 16 out: whole 16-byte vectors of FP16 channels, as cuDNN's fused path needs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 11, 11, generator=generator)
    weight = torch.randn(16, 8, 3, 3, generator=generator) / 8
    out = (11 + 2 * 2 - 2 * 2 - 1) // step + 1
    extra = [torch.randn(16, generator=generator) if bias else None]
    extra.append(torch.randn(2, 16, out, out, generator=generator) if residual else None)
    tensors = [t if t is None else t.to(device, dtype) for t in (x, weight, *extra)]
    if channels_last:
        tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
    return (*tensors, [step, step], [2, 2], [2, 2])  # dilated as the encoder's neck


def unfused(x, weight, bias, residual, stride, padding, dilation):
    out = F.conv2d(
        x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation
    )
    return F.relu(out if residual is None else out + residual.double())


@pytest.mark.parametrize(
    "options",
    [{}, {"residual": False}, {"channels_last": False}, {"bias": False, "residual": False}, {"step": 2}],
    ids=["residual", "no residual", "contiguous", "no bias", "strided"],
)
def test_the_op_is_registered_soundly_and_computes_relu_of_conv_bias_residual(options) -> None:
    args = arguments(**{"residual": not options.get("step"), **options})
    torch.library.opcheck(conv_bias_relu, args)  # schema, fake impl's shapes and strides, dispatch
    out = conv_bias_relu(*args)
    torch.testing.assert_close(out.double(), unfused(*args), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == options.get("channels_last", True)


def folded_micro() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(MICRO).eval()
    with torch.no_grad():  # non-trivial weights everywhere (the last BN of each block starts at zero)
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return fold_batchnorm(model)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels-last"])
@pytest.mark.parametrize("fused_loop", [False, True], ids=["PyTorch loop", "native op"])
def test_a_model_with_fused_epilogues_computes_what_the_folded_model_does(fused_loop, channels_last) -> None:
    """Channels-last input also takes the padded stem (zero channels up to 8)."""
    folded = folded_micro()
    folded.refinement.fused = fused_loop
    model = fuse_conv_epilogues(copy.deepcopy(folded))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    blocks = [m for m in model.modules() if isinstance(m, (Bottleneck, FusedBottleneck))]
    assert blocks and all(isinstance(b, FusedBottleneck) for b in blocks)
    for module in model.modules():  # no ReLU left that a convolution could have applied itself
        if isinstance(module, torch.nn.Sequential):
            pairs = zip(module, list(module)[1:], strict=False)
            assert not any(type(a) is torch.nn.Conv2d and isinstance(b, torch.nn.ReLU) for a, b in pairs)
    assert all(isinstance(branch, ConvReLU) for branch in model.refinement.aspp.branches)
    assert isinstance(model.encoder.trunk.conv1, PaddedConvReLU)
    assert isinstance(model.encoder.neck, FusedNeck)
    assert model.state_dict().keys() == folded.state_dict().keys()  # the same parameters, by name
    query, supports, masks, _ = episode(MICRO)
    query, supports = (
        query.contiguous(memory_format=layout),
        supports.flatten(0, 1).contiguous(memory_format=layout),
    )
    supports = supports.unflatten(0, (query.shape[0], -1))
    with torch.inference_mode():
        expected, got = folded(query, supports, masks).query, model(query, supports, masks).query
        features = model.encode(query)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features, folded.encode(query), rtol=1e-5, atol=1e-5)


def test_only_a_folded_model_takes_fused_epilogues() -> None:
    with pytest.raises(ValueError, match="BatchNorm-folded"):
        fuse_conv_epilogues(build_model(MICRO).eval())


def assert_encoder_compiles_whole(model: torch.nn.Module) -> None:
    """torch.compile traces the channels-last encoder of `model` as one graph (fullgraph: no graph break)
    and computes what it does eagerly."""
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, MICRO.input_size, MICRO.input_size).contiguous(
        memory_format=torch.channels_last
    )
    torch._dynamo.reset()
    compiled = torch.compile(model.encode, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(images), model.encode(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_traces_the_op() -> None:
    """Inductor sees the op through its fake impl (shape and channels-last layout) and calls it."""
    assert_encoder_compiles_whole(fuse_conv_epilogues(folded_micro()))


@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_cudnn_kernels_match_plain_pytorch(dtype, residual) -> None:
    args = arguments("cuda", dtype, residual=residual)
    out = conv_bias_relu(*args)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    # FP16: inputs and output rounded to 11 bits; FP32: cuDNN's TF32 (10-bit mantissa) convolutions.
    torch.testing.assert_close(out.double(), unfused(*args), rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@CUDA
def test_only_aligned_channels_last_convolutions_take_cudnns_fused_path() -> None:
    """NCHW maps and channel counts off whole 16-byte vectors run the plain path (no "no engine" risk)."""
    from unittest.mock import patch

    for options, fused in [({}, True), ({"channels_last": False}, False)]:
        args = arguments("cuda", torch.float16, **options)
        with patch("crnet.model.conv_epilogues._unfused", wraps=epilogues._unfused) as plain:
            out = conv_bias_relu(*args)
        assert plain.called != fused
        torch.testing.assert_close(out.double(), unfused(*args), rtol=1e-2, atol=1e-2)
    x, weight, *rest = arguments("cuda", torch.float16, residual=False)
    with patch("crnet.model.conv_epilogues._unfused", wraps=epilogues._unfused) as plain:
        conv_bias_relu(x[:, :3], weight[:, :3], *rest)  # 3 input channels, as the stem's images
    assert plain.called


@pytest.mark.cuda
@CUDA
def test_cudnn_kernels_replay_in_a_cuda_graph() -> None:
    args = arguments("cuda", torch.float16)
    x = args[0].clone()
    conv_bias_relu(x, *args[1:])  # plans found outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = conv_bias_relu(x, *args[1:])
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out.double(), unfused(x, *args[1:]), rtol=1e-2, atol=1e-2)
