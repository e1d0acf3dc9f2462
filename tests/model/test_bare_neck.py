"""The encoder's neck as two bare convolutions and one pass for their sum, bias and ReLU (`+bare-neck`), or
as more, each over a piece of a level's channels (`+split-neck`), or with a level's equal pieces as one
grouped convolution (`+grouped-neck`): the same function as the concatenating neck and as the fused one,
from either, through the runtimes."""

import copy

import pytest
import torch
from torch import nn

from crnet.engines import RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.model.backbone import Neck
from crnet.model.conv_epilogues import BareNeck, FusedNeck, bare_neck, fuse_conv_epilogues
from tests.engines.test_runtimes import episode
from tests.model.test_conv_epilogues import assert_encoder_compiles_whole, folded_micro
from tests.model.test_crnet import MICRO
from tests.model.test_crnet import episode as model_episode

# micro's levels have 64 and 128 channels: pieces of 48 are 48 + 16 and 48 + 48 + 32. Each piece is
# (level, first channel, last + 1, groups); grouped, a level cut evenly is one convolution of those groups.
PIECES = {
    (None, False): [(0, 0, 64, 1), (1, 0, 128, 1)],
    (64, False): [(0, 0, 64, 1), (1, 0, 64, 1), (1, 64, 128, 1)],
    (48, False): [(0, 0, 48, 1), (0, 48, 64, 1), (1, 0, 48, 1), (1, 48, 96, 1), (1, 96, 128, 1)],
    (32, True): [(0, 0, 64, 2), (1, 0, 128, 4)],
    (64, True): [(0, 0, 64, 1), (1, 0, 128, 2)],
}
PIECES[48, True] = PIECES[48, False]  # 64 and 128 do not cut evenly into 48s: slices
IDS = ["a level each", "pieces of 64", "pieces of 48", "4 groups of 32", "2 groups of 64", "48s ungrouped"]


@pytest.mark.parametrize("fused_first", [False, True], ids=["from the plain neck", "from the fused neck"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("form", PIECES, ids=IDS)
def test_the_bare_neck_computes_the_concatenating_neck(fused_first, layout, form) -> None:
    folded = folded_micro().double()
    model = copy.deepcopy(folded)
    if fused_first:
        model = fuse_conv_epilogues(model)
        assert isinstance(model.encoder.neck, FusedNeck)
    model = bare_neck(model, *form).to(memory_format=layout)
    assert isinstance(model.encoder.neck, BareNeck)
    assert model.encoder.neck.pieces == PIECES[form]
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
    with pytest.raises(RuntimeUnavailable, match="not \\+grouped-neck"):
        TorchRuntime(micro_checkpoint, grouped_neck=True, triton_encoder=True)
    with pytest.raises(RuntimeUnavailable, match="\\+bare-neck and \\+split-neck are forms of one neck"):
        TorchRuntime(micro_checkpoint, bare_neck=True, split_neck=True)
    with pytest.raises(RuntimeUnavailable, match="\\+split-neck and \\+grouped-neck are forms of one neck"):
        TorchRuntime(micro_checkpoint, split_neck=True, grouped_neck=True)


@pytest.mark.parametrize("option, form", [("split-neck", (64, False)), ("grouped-neck", (64, True))])
def test_the_runtime_options_cut_the_neck_in_pieces(micro_checkpoint, monkeypatch, option, form) -> None:
    monkeypatch.setattr(BareNeck, "SPLIT_CHANNELS", 64)  # micro's levels are narrower than 512
    query, supports, masks = episode(1)
    with open_runtime(RuntimeSpec.parse("torch"), checkpoint=micro_checkpoint) as plain:
        expected = plain.episode(query, supports, masks)
    with open_runtime(RuntimeSpec.parse(f"torch+{option}"), checkpoint=micro_checkpoint) as cut:
        assert cut.model.encoder.neck.pieces == PIECES[form]
        assert cut.label == f"torch fp32 {option} fused"
        logits = cut.episode(query, supports, masks)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeUnavailable, match="no rewrite of ours"):
        TorchRuntime(micro_checkpoint, anchor=True, **{option.replace("-", "_"): True})


def test_r50s_neck_cuts_into_convolutions_of_512_channels() -> None:
    neck = Neck(nn.Conv2d(512 + 1024, 256, 3, padding=2, dilation=2), nn.ReLU(), nn.Dropout2d(0.5))
    split = BareNeck.of(neck, 512, BareNeck.SPLIT_CHANNELS)
    assert split.pieces == [(0, 0, 512, 1), (1, 0, 512, 1), (1, 512, 1024, 1)]
    torch.testing.assert_close(split.piece2_weight, neck[0].weight[:, 1024:].detach())
    grouped = BareNeck.of(neck, 512, BareNeck.SPLIT_CHANNELS, grouped=True)
    assert grouped.pieces == [(0, 0, 512, 1), (1, 0, 1024, 2)]
    # group g's 256 output channels read layer3's channels g*512..: its weight rows are that piece's
    assert grouped.piece1_weight.shape == (512, 512, 3, 3)
    torch.testing.assert_close(grouped.piece1_weight[256:], neck[0].weight[:, 1024:].detach())


@pytest.mark.slow
@pytest.mark.parametrize("form", [(None, False), (48, False), (64, True)], ids=["level", "48s", "grouped"])
def test_torch_compile_traces_the_bare_neck(form) -> None:
    assert_encoder_compiles_whole(bare_neck(folded_micro(), *form))
