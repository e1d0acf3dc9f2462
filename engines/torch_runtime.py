"""PyTorch eager (the reference), optionally FP16/BF16, channels-last, torch.compile and CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import torch

from crnet import checkpoint, ops
from crnet.engines.base import Runtime, RuntimeUnavailable
from crnet.model.crnet import SupportPrompt
from crnet.model.fold import fold_batchnorm

# bf16 is torch-only: on CPUs with AVX512-BF16 or AMX (oneDNN) it is the fast CPU path.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(
        self,
        checkpoint_path: str | Path,
        *,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        iterations: int | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        channels_last: bool = False,
        fused: bool | None = None,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable("torch runtime on cuda: torch sees no CUDA GPU")
        if cuda_graphs and self.device.type != "cuda":
            raise RuntimeUnavailable("CUDA graphs need --device cuda")
        if precision not in DTYPES:
            raise RuntimeUnavailable(f"torch runtime precision must be fp32, fp16 or bf16, got {precision!r}")
        self.precision, self.dtype = precision, DTYPES[precision]
        # BatchNorm folded into the convolutions once, at load: inference never updates its statistics.
        model = fold_batchnorm(checkpoint.load_model(checkpoint_path, self.device))
        self.model = model.to(self.dtype)
        # The native refinement op by default where it has a kernel for this device and dtype (CPU: FP32).
        try:
            fused = ops.use_native(torch.empty(0, device=self.device, dtype=self.dtype), fused)
        except ops.NativeOpUnavailable as error:
            raise RuntimeUnavailable(f"fused refinement: {error}") from None
        self.model.refinement.fused = fused
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_size = model.config.input_size
        self.iterations = model.config.refinement_iterations(iterations)
        self._encode, self._segment = self._encoder_forward, self._head_forward
        if compile or cuda_graphs:
            # reduce-overhead = CUDA graphs: replays each captured shape without host launches.
            mode = "reduce-overhead" if cuda_graphs else "default"
            self._encode = torch.compile(self._encoder_forward, mode=mode, dynamic=False)
            self._segment = torch.compile(self._head_forward, mode=mode, dynamic=False)
        self.options = {
            "compile": compile,
            "cuda_graphs": cuda_graphs,
            "channels_last": channels_last,
            "fused": fused,
        }

    @property
    def label(self) -> str:
        extras = [name.replace("_", "-") for name, on in self.options.items() if on]
        return " ".join([self.name, self.precision, *extras])

    def _encoder_forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images.to(self.dtype).contiguous(memory_format=self.memory_format))

    def _head_forward(self, features: torch.Tensor, vector: torch.Tensor, prototype: torch.Tensor):
        size = (self.input_size, self.input_size)
        prompt = SupportPrompt(vector=vector.to(self.dtype), prototype=prototype.to(self.dtype))
        return self.model.segment(features, prompt, self.iterations, output_size=size).float()

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # FP32 out, as every runtime (the conversion also copies CUDA-graph outputs, which the next replay
        # overwrites while callers may still hold them).
        features = self._encode(images)
        return features.float() if features.dtype != torch.float32 else self._owned(features)

    def _owned(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone() if self.options["cuda_graphs"] else tensor

    @torch.inference_mode()
    def prompt_per_shot(self, features: torch.Tensor, foreground: torch.Tensor):
        vector, prototype = self.model.shot_prompts(features.to(self.dtype), foreground)
        return vector.float(), prototype.float()

    @torch.inference_mode()
    def segment(self, features: torch.Tensor, prompt: SupportPrompt) -> torch.Tensor:
        return self._owned(self._segment(features.to(self.dtype), prompt.vector, prompt.prototype))
