"""The FLOP floor of a bench run: how fast an episode could be if every FLOP ran at the matmul rate.

FLOPs are counted, not estimated: torch's FlopCounterMode runs the checkpoint's model once (the hoisted
PyTorch refinement loop, whose convolutions the native op computes too; the anchor's loop as written does
5 % more) on one episode of the bench's shape, and counts every convolution and matmul (2 FLOPs per
multiply-add). The rate is measured once per run: the best of a few large square matmuls in each precision
the rows use, on the bench's device. A row's share of the floor is floor time / its median time: 100 %
would be a device doing nothing but matmuls at that rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from crnet import checkpoint
from crnet.commands.timer import Timer
from crnet.engines.torch_runtime import DTYPES
from crnet.model.crnet import CRNet


@dataclass(frozen=True)
class EpisodeFlops:
    """FLOPs of one call of each timed kind, at the bench's batch and shots."""

    episode: int  # encode K supports + the query, prompt, segment
    query: int  # encode the query, segment against a cached prompt
    encoder: int  # encode the query

    def as_dict(self) -> dict:
        return {"episode": self.episode, "query": self.query, "encoder": self.encoder}


def count(work):
    """(FLOPs of `work()`, its result)."""
    with FlopCounterMode(display=False) as counter:
        result = work()
    return int(counter.get_total_flops()), result


@torch.no_grad()
def episode_flops(model: CRNet, batch: int, shots: int, iterations: int) -> EpisodeFlops:
    """Counted on random inputs of the model's input size (FLOPs do not depend on the values); `model`
    runs its PyTorch refinement loop for the count."""
    parameter = next(model.parameters())
    size = model.config.input_size
    images = torch.randn(batch * (shots + 1), 3, size, size, device=parameter.device, dtype=parameter.dtype)
    masks = torch.ones(batch, shots, size, size, device=parameter.device)
    masks[..., : size // 2, :] = 0
    supports, query = images[: batch * shots], images[batch * shots :]

    encoder, features = count(lambda: model.encode(query))
    prompt_flops, prompt = count(
        lambda: model.prompt(model.encode(supports).unflatten(0, (batch, shots)), masks)
    )
    head, _ = count(
        lambda: model.segment(features, prompt, iterations, output_size=(size, size), fused=False)
    )
    return EpisodeFlops(episode=prompt_flops + encoder + head, query=encoder + head, encoder=encoder)


def checkpoint_flops(path, device: torch.device, batch: int, shots: int, iterations: int) -> EpisodeFlops:
    model = checkpoint.load_model(path, device)
    return episode_flops(model, batch, shots, iterations)


def matmul_rate(device: torch.device, precision: str, *, size: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul in `precision` on `device` (n = 8192 on a GPU, 1024 on a CPU)."""
    n = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(DTYPES[precision])
    b = torch.randn(n, n, device=device).to(DTYPES[precision])
    torch.matmul(a, b)  # first call: library load, autotuning
    timer = Timer(device)
    times = [timer(lambda: torch.matmul(a, b)) for _ in range(repeats)]
    best = min(wall if gpu is None else gpu for wall, gpu in times)  # GPU time where there is one
    return 2.0 * n**3 / best


def floor_ms(flops: int, rate: float) -> float:
    return flops / rate * 1000.0
