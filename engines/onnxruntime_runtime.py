"""ONNX Runtime over a bundle's graphs: CPU, or the CUDA / TensorRT execution providers with IO binding."""

from __future__ import annotations

import numpy as np
import torch

from crnet.bundle import GRAPHS, Bundle, BundleError
from crnet.engines.base import Runtime, RuntimeUnavailable, per_query
from crnet.model.crnet import SupportPrompt
from crnet.optional import require

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        *,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        provider: str | None = None,
        threads: int | None = None,
    ):
        ort = require("onnxruntime", "the onnxruntime runtime")
        self.bundle = bundle
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            # one GPU for the sessions and the IO binding: "cuda" is torch's current device, not always 0
            self.device = torch.device("cuda", torch.cuda.current_device())
        provider = provider or ("cuda" if self.device.type == "cuda" else "cpu")
        if provider not in PROVIDERS:
            choices = ", ".join(PROVIDERS)
            raise RuntimeUnavailable(f"unknown ONNX Runtime provider {provider!r}; choose {choices}")
        if (provider == "cpu") != (self.device.type == "cpu"):
            raise RuntimeUnavailable(f"ONNX Runtime provider {provider} does not run on device {self.device}")
        wanted = PROVIDERS[provider][0]
        if wanted not in ort.get_available_providers():
            raise RuntimeUnavailable(
                f"this onnxruntime has no {wanted} (install onnxruntime-gpu for CUDA/TensorRT providers)"
            )
        self.precision, self.provider = precision, provider
        self.input_size = self.bundle.model_config.input_size
        self.iterations = self.bundle.iterations
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # No spin-waiting: an episode runs three sessions in turn, and each session's idle threads would spin
        # on the cores the next one needs (measured: tiny episode 34 -> 12 ms, docs/BENCHMARKS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:  # pinned, so a benchmark states what it measured
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = PROVIDERS[provider]
        if provider != "cpu":
            index = self.device.index or 0
            providers = [
                name if name == "CPUExecutionProvider" else (name, {"device_id": index}) for name in providers
            ]
        self.sessions = {}
        for graph in GRAPHS:
            path = self.bundle.graph(precision, graph)
            try:
                self.sessions[graph] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as error:  # ORT raises its own exception types per failure
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise RuntimeUnavailable(f"ONNX Runtime cannot load {path}: {first}") from None
            session = self.sessions[graph]
            self.bundle.check_tensors(
                path,
                graph,
                [(x.name, x.shape) for x in session.get_inputs()],
                [(y.name, y.shape) for y in session.get_outputs()],
            )
            try:
                metadata = session.get_modelmeta().custom_metadata_map
            except UnicodeDecodeError:
                raise BundleError(f"{path} carries metadata that is not UTF-8 text: not crnet's") from None
            self.bundle.check_metadata(path, graph, precision, metadata)

    @property
    def label(self) -> str:
        provider = "" if self.provider == "cpu" else f" ({self.provider} EP)"
        return f"{self.name} {self.precision}{provider}"

    def _run(self, graph: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        session = self.sessions[graph]
        # the graphs take FP32: converted here on the host, as _run_bound does on the device
        if self.device.type == "cpu":
            feeds = {
                name: x.detach().to("cpu", torch.float32).contiguous().numpy() for name, x in inputs.items()
            }
            return [torch.from_numpy(y) for y in session.run(None, feeds)]
        return self._run_bound(session, inputs)

    def _run_bound(self, session, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """GPU: IO binding on torch CUDA tensors, so nothing is copied through the host."""
        binding = session.io_binding()
        index = self.device.index or 0  # as the sessions were given
        batch = next(iter(inputs.values())).shape[0]
        for name, x in inputs.items():  # on the device first: a host pointer bound as CUDA memory is garbage
            x = x.detach().to(self.device, torch.float32).contiguous()
            inputs[name] = x  # keep alive until the run ends
            binding.bind_input(name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        outputs = []
        for meta in session.get_outputs():
            shape = [batch if not isinstance(d, int) else d for d in meta.shape]
            y = torch.empty(shape, dtype=torch.float32, device=self.device)
            binding.bind_output(meta.name, "cuda", index, np.float32, tuple(y.shape), y.data_ptr())
            outputs.append(y)
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # ORT runs on its own stream; torch reads the outputs next
        return outputs

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        (features,) = self._run("encoder", {"images": images})
        return features

    def prompt_per_shot(self, features: torch.Tensor, foreground: torch.Tensor):
        self.check_open()
        vector, prototype = self._run("prompt", {"features": features, "foreground": foreground})
        return vector, prototype

    def segment(self, features: torch.Tensor, prompt: SupportPrompt) -> torch.Tensor:
        self.check_segment(features, prompt)
        vector, prototype = per_query(prompt, len(features))
        (logits,) = self._run("head", {"features": features, "vector": vector, "prototype": prototype})
        return logits

    def close(self) -> None:
        self.sessions.clear()
        super().close()
