"""PyTorch eager (the reference), optionally FP16/BF16, channels-last, torch.compile and CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import torch

from crnet import checkpoint, ops
from crnet.model.crnet import SupportPrompt
from engines.base import Runtime, RuntimeUnavailable

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
        model = checkpoint.load_model(checkpoint_path, self.device)
        self.model = model.to(self.dtype)
        # The native refinement op by default where it has a kernel for this device and dtype (CPU: FP32).
        reason = ops.native_reason(torch.empty(0, device=self.device, dtype=self.dtype))
        if fused and reason is not None:
            raise RuntimeUnavailable(f"fused refinement: {reason}")
        if fused is None and not ops.AVAILABLE:
            ops.announce(reason)
        fused = fused is not False and reason is None
        self.model.refinement.fused = fused
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_size = model.config.input_size
        self.iterations = iterations or model.config.iterations
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
        features = self._encode(images)
        # CUDA-graph outputs are overwritten by the next replay; callers may hold on to features.
        return features.clone() if self.options["cuda_graphs"] else features

    @torch.inference_mode()
    def prompt_per_shot(self, features: torch.Tensor, foreground: torch.Tensor):
        vector, prototype = self.model.shot_prompts(features.to(self.dtype), foreground)
        return vector.float(), prototype.float()

    @torch.inference_mode()
    def segment(self, features: torch.Tensor, prompt: SupportPrompt) -> torch.Tensor:
        logits = self._segment(features.to(self.dtype), prompt.vector, prompt.prototype)
        return logits.clone() if self.options["cuda_graphs"] else logits
