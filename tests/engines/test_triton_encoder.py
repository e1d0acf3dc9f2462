"""`+triton-encoder`: the encoder's size-keeping 3x3 convolutions and its neck as the Triton kernel of
triton_conv.py (the kernel itself: test_triton_head.py). Off CUDA its op is the library's convolution, so
this checks where the transform puts each convolution, ReLU and residual; on CUDA, the runtime row."""

import copy

import pytest
import torch

from crnet.engines import DEPLOYED_GPU, RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.engines.triton_head import TritonConvReLU, TritonNeck, triton_encoder
from crnet.model.conv_epilogues import ConvReLU, FusedBottleneck, fuse_conv_epilogues
from tests.engines.test_runtimes import episode
from tests.model.test_conv_epilogues import folded_micro
from tests.model.test_crnet import MICRO
from tests.model.test_crnet import episode as model_episode

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
def test_the_transformed_encoder_computes_what_the_fused_model_does(layout) -> None:
    base = fuse_conv_epilogues(folded_micro())
    model = triton_encoder(copy.deepcopy(base)).to(memory_format=layout)
    base = base.to(memory_format=layout)
    blocks = [m for m in model.encoder.trunk.modules() if isinstance(m, FusedBottleneck)]
    converted = [type(b.conv2) is TritonConvReLU for b in blocks]
    strided = [b.conv2.stride != (1, 1) for b in blocks]
    assert converted == [not s for s in strided] and any(strided) and any(converted)  # strided ones stay
    assert all(type(b.conv2) is ConvReLU for b, s in zip(blocks, strided, strict=True) if s)
    assert all(type(b.conv1) is TritonConvReLU and type(b.conv3) is TritonConvReLU for b in blocks)  # 1x1s
    assert any(b.downsample is not None for b in blocks)  # a joint bias, through with_weights
    assert type(model.encoder.neck) is TritonNeck
    assert model.state_dict().keys() == base.state_dict().keys()  # the same parameters, by name
    query, supports, masks, _ = model_episode(MICRO)
    query = query.contiguous(memory_format=layout)
    with torch.inference_mode():
        torch.testing.assert_close(model.encode(query), base.encode(query))
        torch.testing.assert_close(model(query, supports, masks).query, base(query, supports, masks).query)


def test_it_takes_the_fused_epilogues_encoder() -> None:
    with pytest.raises(ValueError, match="fuse them first"):
        triton_encoder(folded_micro())


def test_the_runtime_option_says_where_it_cannot_run(micro_checkpoint) -> None:
    with pytest.raises(RuntimeUnavailable, match="needs --device cuda"):
        open_runtime(RuntimeSpec.parse("torch+triton-encoder"), checkpoint=micro_checkpoint)
    with pytest.raises(RuntimeUnavailable, match="no rewrite of ours"):
        TorchRuntime(micro_checkpoint, anchor=True, triton_encoder=True)


@pytest.mark.slow
def test_torch_compile_traces_the_transformed_encoder_in_one_graph() -> None:
    base = fuse_conv_epilogues(folded_micro()).to(memory_format=torch.channels_last)
    model = triton_encoder(copy.deepcopy(base))
    images = torch.randn(2, 3, MICRO.input_size, MICRO.input_size).contiguous(
        memory_format=torch.channels_last
    )
    torch._dynamo.reset()
    compiled = torch.compile(model.encode, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(images), base.encode(images), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@CUDA
def test_the_triton_encoder_on_cuda_captured_and_replayed(micro_checkpoint) -> None:
    pytest.importorskip("triton")
    query, supports, masks = (x.cuda() for x in episode(1))
    with open_runtime(RuntimeSpec.parse(DEPLOYED_GPU), checkpoint=micro_checkpoint, device="cuda") as plain:
        expected = plain.episode(query, supports, masks)
    spec = RuntimeSpec.parse(DEPLOYED_GPU + "+triton-encoder")
    with open_runtime(spec, checkpoint=micro_checkpoint, device="cuda") as runtime:
        assert type(runtime.model.encoder.neck) is TritonNeck
        for _ in range(3):  # the timing and capture, then replays
            got = runtime.episode(query, supports, masks)
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeUnavailable, match="add \\+cudnn-epilogues"):
        TorchRuntime(micro_checkpoint, device="cuda", precision="fp16", triton_encoder=True)


def test_the_transforms_make_their_buffers_where_the_model_is() -> None:
    """The runtime transforms a model already on its device: every buffer a transform packs must be made
    there too (on the meta device here, which no CPU default would match)."""
    from crnet.engines.triton_head import triton_head

    model = fuse_conv_epilogues(folded_micro()).to("meta")
    model = triton_encoder(triton_head(model))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
