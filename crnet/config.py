"""Model and training configuration: frozen dataclasses and named presets.

`r50` is the paper's model (ResNet-50, 321x321 input, 256 feature channels). `tiny` keeps the architecture
but narrows the encoder and shrinks the input so that it trains on two CPU cores in minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from crnet.errors import CRNetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(CRNetError, ValueError):
    """A configuration value outside its limits."""


class IterationsError(ConfigError):
    """A refinement iteration count below 1."""


# The most refinement iterations a command takes: the paper's T is 5 and its masks settle within a few more;
# an exported graph holds T copies of the head, so a huge T is an export that never ends.
MAX_ITERATIONS = 50
# Episodes, queries or an engine's batch at once: past it only a typo, and minutes of building batches.
MAX_BATCH = 4096


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A CRNet's shape: preset("r50") is the paper's, preset("tiny") the CPU-sized one; .replace(...) varies
    it. The fields' comments say what each sets."""

    name: str
    input_size: int  # square input side; features are at output stride 8
    width: int  # ResNet base width: 64 is ResNet-50
    blocks: tuple[int, int, int]  # bottleneck blocks in layer1..layer3
    channels: int  # feature channels after the encoder neck and in every head module
    aspp_dilations: tuple[int, int, int] = (6, 12, 18)
    iterations: int = 5  # refinement iterations T at test time
    dropout: float = 0.5
    train_backbone: bool = False  # False: ResNet through layer3 frozen, BatchNorm in eval mode
    # Where the paper is silent, CaNet's code (icoz69/CaNet, one_shot_network.py) decides unless a measured
    # reason says otherwise (docs/BENCHMARKS.md, "CaNet's choices"). CaNet: the fusing conv `layer55` is
    # followed by ReLU and Dropout2d(0.5) and no residual block; every ASPP branch (`layer6_*`) and the
    # projection (`layer7`) by Dropout2d(0.5).
    fusion_activation: bool = False  # ReLU after the condition module's fusing conv
    fusion_dropout: float = 0.0  # Dropout2d after it
    condition_residual: bool = True  # a residual block after the fusion
    head_dropout: float = 0.0  # Dropout2d on the ASPP branches and projection

    def refinement_iterations(self, requested: int | None = None) -> int:
        """T for one call: `requested`, or this model's default when None. Zero or fewer is an error, never
        quietly the default."""
        if requested is None:
            return self.iterations
        if not 1 <= requested <= MAX_ITERATIONS:
            raise IterationsError(f"refinement iterations must be 1 to {MAX_ITERATIONS}, got {requested}")
        return requested

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed; unknown field names raise TypeError."""
        return dataclasses.replace(self, **changes)

    @property
    def feature_size(self) -> int:
        """Side of the feature map for the configured input."""
        return feature_side(self.input_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        values = dict(values)
        for key in ("blocks", "aspp_dilations"):
            values[key] = tuple(values[key])
        return cls(**values)


R50 = ModelConfig(name="r50", input_size=321, width=64, blocks=(3, 4, 6), channels=256)
# Trained from scratch (no ImageNet weights exist for this width), so its backbone is trainable. No feature
# dropout: with 64 channels, dropping half of them independently in the support and the query image blurs
# the comparison the head has to learn, and 15 CPU minutes leave no room for such a regulariser
# (docs/BENCHMARKS.md: the recipe with dropout 0.5 underfits).
TINY = ModelConfig(
    name="tiny", input_size=129, width=16, blocks=(3, 4, 6), channels=64, dropout=0.0, train_backbone=True
)


def preset(name: str) -> ModelConfig:
    """The named model preset: "r50" (the paper) or "tiny" (CPU-sized)."""
    match name:
        case "r50":
            return R50
        case "tiny":
            return TINY
    raise ValueError(f"unknown preset {name!r}; choose 'r50' or 'tiny'")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Episodic training settings, as `crnet train`'s options (the same names, with _ for -)."""

    fold: int = 0
    shots: int = 1
    steps: int = 2000
    batch_size: int = 8  # episodes per step (per process under DDP)
    optimizer: str = "sgd"  # "sgd" (the paper, frozen ImageNet trunk) or "adamw" (from-scratch tiny)
    lr: float = 2.5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    reset_probability: float = 0.3  # chance that the cached previous prediction is replaced by zeros
    # Autocast dtype of the forward pass: "auto" is bfloat16 on CUDA and float32 on CPU; "bf16" on a CPU
    # with native bfloat16 (AVX512-BF16, AMX) trains tiny about 1.4x faster per step.
    precision: str = "auto"
    flip: bool = True  # random horizontal flips
    # Drop training images in which a novel class appears (as background, since it has no label to learn),
    # as BAM does (chunbolang/BAM, util/dataset.py, make_dataset(filter_intersection=True) for training).
    # Off is PFENet's and hsnet's protocol: every image holding a base class is kept.
    exclude_novel_images: bool = False
    # Turn the hue of all images of an episode by one random angle: colour still matches between support
    # and query, but a class's own colours stop being a cue worth memorising.
    hue_turns: bool = False
    # Pixels a class needs to count in a training image; None: the data's rule (PASCAL 2048, as PFENet and
    # BAM; the built-in benchmark the same share of its image; VOCTree.min_object_pixels).
    min_object_pixels: int | None = None
    seed: int = 0
    log_every: int = 20
    checkpoint_every: int = 200
    workers: int = 1

    def __post_init__(self):
        """The same limits the CLI states in its help; a config built in Python is held to them too."""
        problems = [
            f"{name} must be {rule}, got {getattr(self, name)!r}"
            for name, ok, rule in (
                ("fold", 0 <= self.fold <= 3, "in 0..3"),
                ("shots", self.shots >= 1, ">= 1"),
                ("steps", self.steps >= 1, ">= 1"),
                ("batch_size", self.batch_size >= 1, ">= 1"),
                ("optimizer", self.optimizer in ("sgd", "adamw"), "'sgd' or 'adamw'"),
                ("lr", self.lr > 0, "> 0"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"),
                ("reset_probability", 0 <= self.reset_probability <= 1, "within [0, 1]"),
                ("precision", self.precision in ("auto", "fp32", "bf16"), "'auto', 'fp32' or 'bf16'"),
                ("log_every", self.log_every >= 1, ">= 1"),
                ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
                ("workers", self.workers >= 0, ">= 0"),
                ("min_object_pixels", self.min_object_pixels is None or self.min_object_pixels >= 1, ">= 1"),
            )
            if not ok
        ]
        if problems:
            raise ConfigError("; ".join(problems))

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        # Runs saved before the small-object rule existed counted every object: they resume as they ran.
        return cls(**{"min_object_pixels": 1, **values})


def feature_side(input_size: int) -> int:
    """Side of the encoder's feature map for a square input (stem /4, layer2 /2, layer3 dilated)."""
    side = (input_size + 1) // 2  # conv1, stride 2, padding 3
    side = (side + 1) // 2  # max-pool, stride 2, padding 1
    return (side + 1) // 2  # layer2, stride 2
