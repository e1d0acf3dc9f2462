"""The FLOP floor: counted FLOPs agree with an independent count by hand, and scale as an episode does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crnet.commands.floor import episode_flops, floor_ms, matmul_rate
from crnet.model.crnet import build_model
from tests.ddp_worker import MICRO


def convolution_flops(model: nn.Module, images: torch.Tensor) -> int:
    """2 x multiply-adds of every Conv2d the encoder runs, from each layer's weight and output shape."""
    total = 0

    def count(module, _inputs, output):
        nonlocal total
        out_channels, per_group, kh, kw = module.weight.shape
        total += 2 * output.numel() * per_group * kh * kw

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.encode(images)
    finally:
        for hook in hooks:
            hook.remove()
    return total


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(MICRO, fused=False).eval()


def test_encoder_flops_are_its_convolutions(model) -> None:
    flops = episode_flops(model, batch=2, shots=1, iterations=2)
    images = torch.randn(2, 3, MICRO.input_size, MICRO.input_size)
    assert flops.encoder == convolution_flops(model, images) > 0


def test_flops_scale_as_an_episode_does(model) -> None:
    one, two = (episode_flops(model, batch=b, shots=1, iterations=2) for b in (1, 2))
    assert two.episode == 2 * one.episode and two.query == 2 * one.query
    # Each refinement iteration costs the same; the episode is the query plus K encodes and the prompt.
    t1, t2, t3 = (episode_flops(model, batch=1, shots=1, iterations=t).query for t in (1, 2, 3))
    assert t3 - t2 == t2 - t1 > 0
    five = episode_flops(model, batch=1, shots=5, iterations=2)
    assert five.query == one.query
    assert five.episode - five.query > 4 * one.encoder and one.episode > one.query > one.encoder


def test_matmul_rate_and_floor() -> None:
    rate = matmul_rate(torch.device("cpu"), "fp32", size=256, repeats=2)
    assert 1e6 < rate < 1e14  # between a megaFLOP/s and a hundred teraFLOP/s on any CPU
    assert floor_ms(2 * 10**9, 1e12) == pytest.approx(2.0)
