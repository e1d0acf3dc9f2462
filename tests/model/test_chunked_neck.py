"""The encoder's neck on chunks of the batch (`+chunked-neck`): the same function as one call, for every form
of the neck and either layout, through the runtimes."""

import copy

import pytest
import torch

from crnet.engines import RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.model import chunked_neck as chunking
from crnet.model.chunked_neck import ChunkedNeck, chunked_neck
from crnet.model.conv_epilogues import BareNeck, FusedNeck, bare_neck, fuse_conv_epilogues
from tests.engines.test_runtimes import episode
from tests.model.test_conv_epilogues import assert_encoder_compiles_whole, folded_micro
from tests.model.test_crnet import MICRO

FORMS = {
    "concatenating": lambda model: model,
    "fused": fuse_conv_epilogues,
    "split": lambda model: bare_neck(model, 48),
}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "images, chunk", [(5, 2), (4, 2), (3, 3), (2, 16)], ids=["5 by 2", "4 by 2", "3 by 3", "2"]
)
def test_the_chunked_neck_computes_the_neck(form, layout, images, chunk) -> None:
    model = FORMS[form](folded_micro().double())
    reference = copy.deepcopy(model)
    model = chunked_neck(model, chunk).to(memory_format=layout)
    neck = model.encoder.neck
    assert isinstance(neck, ChunkedNeck) and neck.images == chunk
    assert isinstance(neck.neck, type(reference.encoder.neck))  # whichever form it was, wrapped
    generator = torch.Generator().manual_seed(images)
    x = torch.randn(images, 3, MICRO.input_size, MICRO.input_size, generator=generator, dtype=torch.float64)
    x = x.contiguous(memory_format=layout)
    with torch.inference_mode():
        got, expected = model.encode(x), reference.encode(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=layout)  # the joined chunks keep the layout
    assert chunked_neck(model, chunk).encoder.neck is neck  # once: a second wrap would change nothing


def test_each_chunk_is_one_call_of_the_neck() -> None:
    calls = []

    def neck(a, b):
        calls.append(len(a))
        return a + b

    torch.testing.assert_close(
        ChunkedNeck(neck, 4)(torch.ones(10, 1), torch.ones(10, 1)), torch.full((10, 1), 2.0)
    )
    assert calls == [4, 4, 2]
    with pytest.raises(ValueError, match="at least one image"):
        ChunkedNeck(neck, 0)


def test_the_runtime_option_chunks_the_neck(micro_checkpoint, monkeypatch) -> None:
    monkeypatch.setattr(chunking, "CHUNK_IMAGES", 3)  # an episode of batch 2 encodes 4 images
    query, supports, masks = episode(1)
    with open_runtime(RuntimeSpec.parse("torch"), checkpoint=micro_checkpoint) as plain:
        expected = plain.episode(query, supports, masks)
    with open_runtime(RuntimeSpec.parse("torch+split-neck+chunked-neck"), checkpoint=micro_checkpoint) as cut:
        neck = cut.model.encoder.neck
        assert isinstance(neck, ChunkedNeck) and neck.images == 3 and isinstance(neck.neck, BareNeck)
        assert cut.label == "torch fp32 split-neck chunked-neck fused"
        logits = cut.episode(query, supports, masks)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeUnavailable, match="no rewrite of ours"):
        TorchRuntime(micro_checkpoint, anchor=True, chunked_neck=True)


@pytest.mark.slow
def test_torch_compile_traces_the_chunked_neck() -> None:
    model = chunked_neck(fuse_conv_epilogues(folded_micro()), 1)  # two images: two chunks
    assert isinstance(model.encoder.neck.neck, FusedNeck)
    assert_encoder_compiles_whole(model)
