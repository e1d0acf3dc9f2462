"""The encoder's neck as two bare convolutions and one pass for their sum, bias and ReLU (`+bare-neck`): the
same function as the concatenating neck and as the fused one, from either, through the runtimes."""

import copy

import pytest
import torch

from crnet.engines import RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.model.conv_epilogues import BareNeck, FusedNeck, bare_neck, fuse_conv_epilogues
from tests.engines.test_runtimes import episode
from tests.model.test_conv_epilogues import assert_encoder_compiles_whole, folded_micro
from tests.model.test_crnet import MICRO
from tests.model.test_crnet import episode as model_episode


@pytest.mark.parametrize("fused_first", [False, True], ids=["from the plain neck", "from the fused neck"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
def test_the_bare_neck_computes_the_concatenating_neck(fused_first, layout) -> None:
    folded = folded_micro().double()
    model = copy.deepcopy(folded)
    if fused_first:
        model = fuse_conv_epilogues(model)
        assert isinstance(model.encoder.neck, FusedNeck)
    model = bare_neck(model).to(memory_format=layout)
    assert isinstance(model.encoder.neck, BareNeck)
    assert model.state_dict().keys() == folded.state_dict().keys()  # the same parameters, by name
    query, supports, masks, _ = model_episode(MICRO)
    query = query.double().contiguous(memory_format=layout)
    with torch.inference_mode():
        torch.testing.assert_close(model.encode(query), folded.encode(query), rtol=1e-10, atol=1e-10)
        got = model(query, supports.double(), masks).query
        expected = folded(query, supports.double(), masks).query
    # float64 rounding, the layouts' different orders of summation carried through the refinement loop
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    # again: the fused epilogues leave a bare neck as it is
    assert isinstance(fuse_conv_epilogues(model).encoder.neck, BareNeck)


def test_the_bare_neck_keeps_the_necks_mode_and_its_dropout() -> None:
    model = folded_micro().train()
    neck = BareNeck.of(model.encoder.neck, model.encoder.trunk.out_channels[0])
    assert neck.training and neck[2] is model.encoder.neck[2]


def test_the_runtime_option_bares_the_neck(micro_checkpoint) -> None:
    query, supports, masks = episode(1)
    with open_runtime(RuntimeSpec.parse("torch"), checkpoint=micro_checkpoint) as plain:
        expected = plain.episode(query, supports, masks)
    with open_runtime(RuntimeSpec.parse("torch+bare-neck"), checkpoint=micro_checkpoint) as bare:
        assert isinstance(bare.model.encoder.neck, BareNeck)
        assert bare.label == "torch fp32 bare-neck fused"
        logits = bare.episode(query, supports, masks)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeUnavailable, match="no rewrite of ours"):
        TorchRuntime(micro_checkpoint, anchor=True, bare_neck=True)
    with pytest.raises(RuntimeUnavailable, match="not \\+bare-neck"):
        TorchRuntime(micro_checkpoint, bare_neck=True, triton_encoder=True)


@pytest.mark.slow
def test_torch_compile_traces_the_bare_neck() -> None:
    assert_encoder_compiles_whole(bare_neck(folded_micro()))
