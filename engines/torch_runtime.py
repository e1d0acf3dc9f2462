"""PyTorch eager (the reference), optionally FP16/BF16, channels-last, torch.compile and CUDA graphs; and the
plain-PyTorch anchor every GPU bench is measured against.

An episode is one function (supports and query encoded as one batch, prompt, head) and a cached-prompt
query another (encode, head). `+compile` compiles each with inductor; `+cuda-graphs` captures each as one
CUDA graph per input shape, replayed from static buffers (engines/cuda_graphs.py): a new shape compiles and
captures once, every later call is one replay. `+cudnn-epilogues` (CUDA) runs each convolution's bias,
residual add and ReLU inside cuDNN's convolution kernel (crnet/model/conv_epilogues.py). `+space-to-depth`
runs the stem's strided 7x7 convolution over 3 colours as a 4x4 one over 2x2 pixel blocks, 16 channels
(crnet/model/space_to_depth.py). `+bare-neck` runs the encoder's neck as two bare convolutions, one per
level, and leaves their sum, bias and ReLU to one pass (inductor's, compiled) where `+cudnn-epilogues`
gives them to cuDNN's add-ReLU epilogue (crnet/model/conv_epilogues.py); `+split-neck` the same with each
convolution in pieces of at most 512 input channels (cuDNN's kernels for the 1024-channel layer3 half ran at
half the rate of the 512-channel layer2 half's on the H200), `+grouped-neck` with layer3's two pieces as one
grouped convolution over the whole map (no copies of its channel slices). `+chunked-neck` runs the neck,
in whichever form, on chunks of at most 16 images (cuDNN picked a slower kernel for its layer3 half at 128
images than at 16 on the H200; crnet/model/chunked_neck.py). `+banded-aspp` computes the
ASPP's dilated branches in blocks of output pixels that read the map with the same taps, skipping the taps
that read zero padding
(crnet/model/banded_conv.py). `+concurrent-aspp` (CUDA, PyTorch's loop) runs the ASPP's independent
branches each on a CUDA stream of its own, so that the captured graph may run them side by side
(crnet/model/concurrent_aspp.py). `+triton-head` (CUDA, PyTorch's loop) runs the head's 3x3 convolutions (the
condition module's and the loop's) as Triton kernels of ours, with their ReLUs and residual adds inside and
the reduction split where the map is small, and the end of each iteration (the ASPP's pooling term, its
projection, the classifier, the softmax) as two kernels; `+triton-encoder` (CUDA, with `+cudnn-epilogues`) the
encoder's size-keeping 1x1 and 3x3 convolutions and its neck; each of these convolutions runs cuDNN instead
where, timed on its first call, cuDNN is the faster for its shape; compiled, each new shape runs once
eagerly first, so that those choices are made before the trace, which leaves cuDNN's shapes to inductor
(engines/triton_head.py). `+cudnn-benchmark`
lets cuDNN time its algorithms for each convolution of this runtime's graphs and keep the fastest, instead of
its heuristics' choice; it captures on a thread of its own, where PyTorch keeps those choices apart from other
runtimes' (engines/cuda_graphs.py).
`freeze=True` compiles with inductor's freezing too (weights as constants); off by default: it gained
nothing measurable on a CPU or on the H200 (benchmarks/freezing.py, docs/BENCHMARKS.md).

`+anchor` is what a user writes with torch.compile alone: the checkpoint's model as it is (no folding of
ours, PyTorch's refinement loop as the paper writes it, not hoisted, no native op), channels-last, compiled
with inductor's freezing (which folds BatchNorm and constant weights) and, on a GPU,
mode="reduce-overhead" (CUDA graphs).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from crnet import checkpoint, ops
from crnet.engines.base import Runtime, RuntimeUnavailable
from crnet.engines.cuda_graphs import CapturedCalls, CaptureOnOwnThread
from crnet.model.banded_conv import band_aspp
from crnet.model.chunked_neck import chunked_neck as chunked_neck_of
from crnet.model.concurrent_aspp import concurrent_aspp as concurrent_aspp_of
from crnet.model.conv_epilogues import BareNeck, fuse_conv_epilogues
from crnet.model.conv_epilogues import bare_neck as bare_neck_of
from crnet.model.crnet import SupportPrompt
from crnet.model.fold import fold_batchnorm
from crnet.model.space_to_depth import space_to_depth_stem

# bf16 is torch-only: on CPUs with AVX512-BF16 or AMX (oneDNN) it is the fast CPU path.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_mode(reduce_overhead: bool, max_autotune: bool) -> str:
    """torch.compile's mode for a row. The anchor's CUDA graphs are torch.compile's own (reduce-overhead), as
    a plain user gets them; ours are captured by CapturedCalls, so inductor compiles without them. With
    max-autotune, inductor times its Triton templates for each matrix product and convolution against
    cuBLAS's and cuDNN's, in the graph it compiles, and where a template wins it fuses the bias, residual
    and ReLU into it (channels-last 1x1 convolutions become matrix products; dilated ones stay cuDNN's)."""
    if reduce_overhead:
        return "reduce-overhead"
    return "max-autotune-no-cudagraphs" if max_autotune else "default"


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
        anchor: bool = False,
        freeze: bool = False,
        cudnn_epilogues: bool = False,
        space_to_depth: bool = False,
        bare_neck: bool = False,
        split_neck: bool = False,
        grouped_neck: bool = False,
        chunked_neck: bool = False,
        banded_aspp: bool = False,
        concurrent_aspp: bool = False,
        triton_head: bool = False,
        triton_encoder: bool = False,
        cudnn_benchmark: bool = False,
        max_autotune: bool = False,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable("torch runtime on cuda: torch sees no CUDA GPU")
        if self.device.type == "cuda" and self.device.index is None:  # the GPU current now, for good
            self.device = torch.device("cuda", torch.cuda.current_device())
        if anchor:
            fused, channels_last, compile = False, True, True
            cuda_graphs = self.device.type == "cuda"
        elif cuda_graphs and self.device.type != "cuda":
            raise RuntimeUnavailable("CUDA graphs need --device cuda")
        if cudnn_epilogues and (anchor or self.device.type != "cuda"):
            raise RuntimeUnavailable("cuDNN's fused epilogues need --device cuda (and are not the anchor's)")
        if cudnn_benchmark and (anchor or self.device.type != "cuda"):
            raise RuntimeUnavailable("cuDNN's benchmark mode needs --device cuda (and is not the anchor's)")
        if cudnn_benchmark and not cuda_graphs:
            raise RuntimeUnavailable("cuDNN's benchmark mode chooses at capture: add +cuda-graphs")
        if max_autotune and (anchor or not compile or self.device.type != "cuda"):
            raise RuntimeUnavailable(
                "+max-autotune is inductor's choice of GPU kernels: it needs +compile and --device cuda"
                " (and is not the anchor's)"
            )
        necks = [
            name for name, on in (("bare", bare_neck), ("split", split_neck), ("grouped", grouped_neck)) if on
        ]
        if (
            space_to_depth
            or necks
            or chunked_neck
            or banded_aspp
            or concurrent_aspp
            or triton_head
            or triton_encoder
        ) and anchor:
            raise RuntimeUnavailable(
                "the anchor is plain PyTorch: no rewrite of ours (stem, encoder, ASPP or head)"
            )
        if necks and triton_encoder:
            raise RuntimeUnavailable(
                f"+triton-encoder runs the neck's own convolutions: not +{necks[0]}-neck"
            )
        if len(necks) > 1:
            raise RuntimeUnavailable(
                f"+{necks[0]}-neck and +{necks[1]}-neck are forms of one neck: one of them"
            )
        if concurrent_aspp and self.device.type != "cuda":
            raise RuntimeUnavailable("the concurrent ASPP runs on CUDA streams: it needs --device cuda")
        if triton_head:
            _require_triton("+triton-head", self.device)
            if banded_aspp or concurrent_aspp:
                raise RuntimeUnavailable(
                    "+triton-head runs the ASPP's own convolutions: not with another ASPP option"
                )
        if triton_encoder:
            _require_triton("+triton-encoder", self.device)
            if not cudnn_epilogues:
                raise RuntimeUnavailable(
                    "+triton-encoder takes the fused epilogues' encoder: add +cudnn-epilogues"
                )
        if concurrent_aspp and banded_aspp:
            raise RuntimeUnavailable("+concurrent-aspp runs the ASPP's own convolutions: not +banded-aspp")
        if precision not in DTYPES:
            raise RuntimeUnavailable(f"torch runtime precision must be fp32, fp16 or bf16, got {precision!r}")
        self.precision, self.dtype = precision, DTYPES[precision]
        # BatchNorm folded into the convolutions once, at load: inference never updates its statistics.
        # (The anchor leaves that to inductor's freezing, as a plain-PyTorch user would.)
        model = checkpoint.load_model(checkpoint_path, self.device)
        model = model if anchor else fold_batchnorm(model)
        if space_to_depth:  # the stem over 2x2 pixel blocks (model/space_to_depth.py)
            model = space_to_depth_stem(model)
        if cudnn_epilogues:  # bias, residual and ReLU in cuDNN's convolutions (model/conv_epilogues.py)
            model = fuse_conv_epilogues(model)
        # after the epilogues: the neck's sum leaves cuDNN (model/conv_epilogues.py)
        if necks:
            pieces = None if bare_neck else BareNeck.SPLIT_CHANNELS
            model = bare_neck_of(model, pieces, grouped=grouped_neck)
        if banded_aspp:  # after the epilogues: a branch with its ReLU keeps it in each block
            size = model.config.feature_size
            model = band_aspp(model, (size, size))
        if concurrent_aspp:  # after the epilogues: each branch keeps its fused ReLU
            model = concurrent_aspp_of(model)
        if triton_head:  # after the epilogues: its twins take the convolutions in the form they left
            from crnet.engines.triton_head import triton_head as triton_head_of

            model = triton_head_of(model)
        if triton_encoder:  # after the epilogues: the fused bottlenecks and neck are what it rewrites
            from crnet.engines.triton_head import triton_encoder as triton_encoder_of

            model = triton_encoder_of(model)
        if chunked_neck:  # last: it wraps the neck in whichever form the options above left it
            model = chunked_neck_of(model)
        self.model = model.to(self.dtype)
        # The native refinement op by default where it has a kernel for this device and dtype (CPU: FP32).
        try:
            fused = ops.use_native(torch.empty(0, device=self.device, dtype=self.dtype), fused)
        except ops.NativeOpUnavailable as error:
            raise RuntimeUnavailable(f"fused refinement: {error}") from None
        if (concurrent_aspp or triton_head) and fused:
            option = "+concurrent-aspp" if concurrent_aspp else "+triton-head"
            raise RuntimeUnavailable(f"{option} is in PyTorch's refinement loop: add +torch-loop")
        self.model.refinement.fused = fused
        self.model.refinement.hoist = not anchor
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_size = model.config.input_size
        self.iterations = model.config.refinement_iterations(iterations)
        self._encode, self._segment = self._encoder_forward, self._head_forward
        self._episode = self._query = None
        functions = [self._encoder_forward, self._head_forward, self._episode_forward, self._query_forward]
        if compile:
            mode = compile_mode(anchor and cuda_graphs, max_autotune)
            compiled = [torch.compile(f, mode=mode, dynamic=False) for f in functions]
            if triton_head or triton_encoder:  # each shape's choices timed eagerly, then traced as made
                from crnet.engines.triton_head import EagerFirst

                compiled = [EagerFirst(f, c) for f, c in zip(functions, compiled, strict=True)]
            functions = compiled
        # cuDNN's timed choices are made on a thread of this runtime's own, and kept there (cuda_graphs.py).
        self._capture_thread = CaptureOnOwnThread(_cudnn_benchmark) if cudnn_benchmark else None
        if cuda_graphs and not anchor:  # each call's result a tensor of the caller's: FP32 features, logits
            finishes = [_fp32_copy, torch.clone, torch.clone, torch.clone]
            functions = [
                CapturedCalls(f, self.device, self._capture_thread, finish)
                for f, finish in zip(functions, finishes, strict=True)
            ]
        if compile or cuda_graphs:
            self._encode, self._segment, self._episode, self._query = functions
        self.anchor, self.freeze = anchor, freeze or anchor
        self.options = {
            "compile": compile,
            "cuda_graphs": cuda_graphs,
            "channels_last": channels_last,
            "cudnn_epilogues": cudnn_epilogues,
            "space_to_depth": space_to_depth,
            "bare_neck": bare_neck,
            "split_neck": split_neck,
            "grouped_neck": grouped_neck,
            "chunked_neck": chunked_neck,
            "banded_aspp": banded_aspp,
            "concurrent_aspp": concurrent_aspp,
            "triton_head": triton_head,
            "triton_encoder": triton_encoder,
            "cudnn_benchmark": cudnn_benchmark,
            "max_autotune": max_autotune,
            "fused": fused,
        }

    @property
    def label(self) -> str:
        if self.anchor:
            return f"anchor: plain torch {self.precision} compiled" + (
                " + graphs" if self.options["cuda_graphs"] else ""
            )
        extras = [name.replace("_", "-") for name, on in self.options.items() if on]
        return " ".join([self.name, self.precision, *extras])

    def _compiling(self) -> contextlib.AbstractContextManager:
        """Inductor's freezing, read when a new shape compiles."""
        return torch._inductor.config.patch(freezing=True) if self.freeze else contextlib.nullcontext()

    def _encoder_forward(self, images: torch.Tensor) -> torch.Tensor:
        # on the runtime's device whatever the caller's: as the ONNX Runtime and TensorRT runtimes take them
        images = images.to(self.device, self.dtype)
        return self.model.encode(images.contiguous(memory_format=self.memory_format))

    def _head_forward(self, features: torch.Tensor, vector: torch.Tensor, prototype: torch.Tensor):
        size = (self.input_size, self.input_size)
        vector, prototype = vector.to(self.device, self.dtype), prototype.to(self.device, self.dtype)
        prompt = SupportPrompt(vector=vector, prototype=prototype)
        return self.model.segment(features, prompt, self.iterations, output_size=size).float()

    def _episode_forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Supports then queries as one batch of images, (B, K, S, S) masks -> (B, 2, S, S) FP32 logits."""
        batch, shots = masks.shape[:2]
        features = self._encoder_forward(images)
        support = features[: batch * shots].unflatten(0, (batch, shots))
        prompt = SupportPrompt.of_shots(self.model.shot_prompts, support, masks.to(self.device))
        return self._head_forward(features[batch * shots :], prompt.vector, prompt.prototype)

    def _query_forward(self, images: torch.Tensor, vector: torch.Tensor, prototype: torch.Tensor):
        return self._head_forward(self._encoder_forward(images), vector, prototype)

    @torch.inference_mode()
    def _run_episode(self, query: torch.Tensor, supports: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self._episode is None:
            return super()._run_episode(query, supports, masks)
        with self._compiling():
            return self._owned(self._episode(torch.cat([supports.flatten(0, 1), query]), masks))

    @torch.inference_mode()
    def _run_query(self, images: torch.Tensor, prompt: SupportPrompt) -> torch.Tensor:
        if self._query is None:
            return super()._run_query(images, prompt)
        with self._compiling():
            return self._owned(self._query(images, prompt.vector, prompt.prototype))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        # FP32 out, as every runtime (the conversion also copies CUDA-graph outputs, which the next replay
        # overwrites while callers may still hold them).
        self.check_images(images)
        with self._compiling():
            features = self._encode(images)
        return features.float() if features.dtype != torch.float32 else self._owned(features)

    def close(self) -> None:
        for function in (self._encode, self._segment, self._episode, self._query):
            if isinstance(function, CapturedCalls):
                function.release()
        if self._capture_thread is not None:
            self._capture_thread.close()
        # the weights too: a closed runtime that the caller still holds keeps no device memory of its own
        self.model = self._encode = self._segment = self._episode = self._query = None
        super().close()

    def _owned(self, tensor: torch.Tensor) -> torch.Tensor:
        """The anchor's outputs are its CUDA graphs' own, overwritten by the next replay (CapturedCalls
        hands back copies)."""
        return tensor.clone() if self.anchor and self.options["cuda_graphs"] else tensor

    @torch.inference_mode()
    def prompt_per_shot(self, features: torch.Tensor, foreground: torch.Tensor):
        self.check_open()
        features, foreground = features.to(self.device, self.dtype), foreground.to(self.device)
        vector, prototype = self.model.shot_prompts(features, foreground)
        return vector.float(), prototype.float()

    @torch.inference_mode()
    def segment(self, features: torch.Tensor, prompt: SupportPrompt) -> torch.Tensor:
        self.check_segment(features, prompt)
        with self._compiling():
            features = features.to(self.device, self.dtype)
            return self._owned(self._segment(features, prompt.vector, prompt.prototype))


def _fp32_copy(features: torch.Tensor) -> torch.Tensor:
    """A captured encoder's result as the runtimes return features: FP32, and a copy either way."""
    return features.float() if features.dtype != torch.float32 else features.clone()


def _require_triton(option: str, device: torch.device) -> None:
    """Where a Triton option can run (the anchor's refusal comes first): CUDA, with Triton installed."""
    if device.type != "cuda":
        raise RuntimeUnavailable(f"{option} runs Triton kernels of ours: it needs --device cuda")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise RuntimeUnavailable(f"{option} needs Triton: pip install triton") from None


@contextlib.contextmanager
def _cudnn_benchmark():
    """torch.backends.cudnn.benchmark on for one runtime's captures, as it was after them: the flag is global,
    and the other rows of a bench run in the same process."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
