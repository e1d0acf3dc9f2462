"""What the inference options that rewrite the refinement head share: the model through each transform
computes what the folded model does (both layouts, with and without cuDNN's fused epilogues, the hoisted
loop and the paper's), torch.compile traces each in one graph, and each runtime option says where it cannot
run. Each option's own checks: tests/model/test_concurrent_aspp.py, tests/engines/test_triton_head.py."""

import copy

import pytest
import torch

from crnet.engines import RuntimeSpec, RuntimeUnavailable, open_runtime
from crnet.engines.torch_runtime import TorchRuntime
from crnet.engines.triton_head import (
    TritonASPP,
    TritonClassifier,
    TritonCondition,
    TritonConv,
    TritonResidualBranch,
    triton_head,
)
from crnet.model.concurrent_aspp import ConcurrentASPP, concurrent_aspp
from crnet.model.conv_epilogues import fuse_conv_epilogues
from tests.model.test_conv_epilogues import folded_micro
from tests.model.test_crnet import MICRO
from tests.model.test_crnet import episode as model_episode


def concurrent_in_place(model, epilogues: bool) -> None:
    assert type(model.refinement.aspp) is ConcurrentASPP


def triton_in_place(model, epilogues: bool) -> None:
    refinement = model.refinement
    assert all(isinstance(getattr(refinement, n), TritonResidualBranch) for n in ("residual2", "feedback"))
    assert isinstance(refinement.residual3[1], TritonConv) and type(refinement.aspp) is TritonASPP
    assert type(model.condition) is TritonCondition and isinstance(model.condition.fuse, TritonConv)
    assert type(refinement.classifier) is TritonClassifier


# option: (transform, the runtime's keyword, a check of where the transform put its modules)
OPTIONS = {
    "concurrent-aspp": (concurrent_aspp, "concurrent_aspp", concurrent_in_place),
    "triton-head": (triton_head, "triton_head", triton_in_place),
}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("epilogues", [False, True], ids=["plain", "fused epilogues"])
@pytest.mark.parametrize("option", OPTIONS)
def test_the_transformed_model_computes_what_the_folded_model_does(option, layout, epilogues) -> None:
    """Off CUDA each option's op is plain PyTorch: this checks where the transform puts each ReLU and skip."""
    transform, _, in_place = OPTIONS[option]
    folded = folded_micro()
    folded.refinement.fused = False  # the PyTorch loop, which these options rewrite
    base = fuse_conv_epilogues(copy.deepcopy(folded)) if epilogues else folded
    model = transform(copy.deepcopy(base)).to(memory_format=layout)
    base = base.to(memory_format=layout)
    in_place(model, epilogues)
    assert model.state_dict().keys() == folded.state_dict().keys()  # the same parameters, by name
    query, supports, masks, _ = model_episode(MICRO)
    query = query.contiguous(memory_format=layout)
    with torch.inference_mode():  # the hoisted loop
        torch.testing.assert_close(model(query, supports, masks).query, base(query, supports, masks).query)
    model.train(), base.train()
    with torch.no_grad():  # the loop as the paper writes it, through the modules' forward
        torch.testing.assert_close(model(query, supports, masks).query, base(query, supports, masks).query)


@pytest.mark.parametrize("option", OPTIONS)
def test_the_runtime_option_says_where_it_cannot_run(option, micro_checkpoint) -> None:
    with pytest.raises(RuntimeUnavailable, match="needs --device cuda"):
        open_runtime(RuntimeSpec.parse(f"torch+{option}+torch-loop"), checkpoint=micro_checkpoint)
    with pytest.raises(RuntimeUnavailable, match="no rewrite of ours"):
        TorchRuntime(micro_checkpoint, anchor=True, **{OPTIONS[option][1]: True})


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS)
def test_torch_compile_traces_the_transformed_loop_in_one_graph(option) -> None:
    refinement = fuse_conv_epilogues(folded_micro()).refinement.to(memory_format=torch.channels_last)
    refinement.fused = False
    transformed = OPTIONS[option][0](copy.deepcopy(refinement))
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(transformed.hoisted, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x, 3), refinement.hoisted(x, 3), rtol=1e-5, atol=1e-5)
