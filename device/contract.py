"""The model's contract: everything the agent needs to turn frames into masks.

The contract is stored as JSON under one key of the ONNX ``metadata_props`` so that the agent,
which has only onnxruntime, reads it from the model file itself (``custom_metadata_map``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, Optional

from .errors import ModelError

METADATA_KEY = "edgeseg.contract"
# set by edgeseg export on a model that failed validation: {"ok": false, "failures": [...]}
VALIDATION_KEY = "edgeseg.validation"
SCHEMA = 1

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
ACTIVATIONS = ("sigmoid", "softmax", "none")
RESIZES = ("bilinear", "nearest", "bicubic", "cv2-linear")

# Preprocessing presets: the contract fields each one sets (``normalize`` computes
# ``(pixel * scale - mean) / std`` per channel, channels in ``color_order``).
PRESETS = {
    # RGB, /255, ImageNet mean/std, Pillow bilinear resize.
    "default": {"color_order": "RGB", "scale": 1.0 / 255.0, "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "resize": "bilinear"},
    # pytorch-nested-unet's input pipeline: cv2.imread (BGR), cv2.resize INTER_LINEAR (the
    # albumentations default), albumentations Normalize() on 0..255 values in BGR order
    # ((x - 255 * mean) / (255 * std), so mean 0.485 / std 0.229 go to the blue channel), then
    # its dataset divides by 255 again: ((x - 255 m) / (255 s)) / 255 = (x / 255 - m) / (255 s).
    "pytorch-nested-unet": {"color_order": "BGR", "scale": 1.0 / 255.0,
                            "mean": list(IMAGENET_MEAN),
                            "std": [s * 255.0 for s in IMAGENET_STD], "resize": "cv2-linear"},
}


@dataclass
class Contract:
    """Preprocessing, postprocessing and provenance of one exported model."""

    input_name: str = "input"
    output_name: str = "logits"
    input_size: List[int] = field(default_factory=lambda: [256, 256])  # [H, W]
    layout: str = "NCHW"
    channels: int = 3
    color_order: str = "RGB"  # order of the channels fed to the network: RGB, BGR or GRAY
    scale: float = 1.0 / 255.0  # applied to 0..255 pixel values before mean/std
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    resize: str = "bilinear"
    activation: str = "sigmoid"
    threshold: float = 0.5
    num_classes: int = 1
    class_names: List[str] = field(default_factory=lambda: ["foreground"])
    dynamic_hw: bool = False
    preset: str = "default"
    precision: str = "fp32"
    arch: str = ""
    edgeseg_version: str = ""
    versions: Dict[str, str] = field(default_factory=dict)
    schema: int = SCHEMA

    def to_metadata(self) -> Dict[str, str]:
        """The ``metadata_props`` entries that carry this contract."""
        return {METADATA_KEY: json.dumps(asdict(self), sort_keys=True)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Contract":
        known = {f.name for f in fields(cls)}
        contract = cls(**{k: v for k, v in data.items() if k in known})
        contract.check()
        return contract

    @classmethod
    def from_metadata(cls, metadata: Dict[str, str], source: str = "the model") -> "Contract":
        raw = metadata.get(METADATA_KEY)
        if raw is None:
            raise ModelError(
                "{} has no edgeseg contract (metadata key '{}').".format(source, METADATA_KEY),
                "Export it with 'edgeseg export', which embeds input size, colour order, "
                "normalisation, activation and threshold in the ONNX file.",
            )
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ModelError("{} has an unreadable edgeseg contract: {}.".format(source, exc),
                             "Re-export the model with 'edgeseg export'.")
        if data.get("schema", 0) > SCHEMA:
            raise ModelError(
                "{} was written by a newer edgeseg (contract schema {}, this agent reads {}).".format(
                    source, data.get("schema"), SCHEMA),
                "Deploy the agent of the same edgeseg version as the exporter.")
        return cls.from_dict(data)

    def check(self) -> None:
        """Refuse contracts the agent could not honour."""
        problems = []
        if self.layout != "NCHW":
            problems.append("layout {!r} (only NCHW)".format(self.layout))
        if self.color_order not in ("RGB", "BGR", "GRAY"):
            problems.append("color_order {!r}".format(self.color_order))
        if self.resize not in RESIZES:
            problems.append("resize {!r}".format(self.resize))
        if self.activation not in ACTIVATIONS:
            problems.append("activation {!r}".format(self.activation))
        if self.color_order == "GRAY" and self.channels != 1:
            problems.append("GRAY colour order with {} channels".format(self.channels))
        if self.color_order != "GRAY" and self.channels != 3:
            problems.append("{} colour order with {} channels".format(self.color_order, self.channels))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            problems.append("mean/std lengths do not match {} channels".format(self.channels))
        if len(self.input_size) != 2 or min(self.input_size) <= 0:
            problems.append("input_size {!r}".format(self.input_size))
        if problems:
            raise ModelError("The model's edgeseg contract is invalid: " + "; ".join(problems) + ".",
                             "Re-export the model with 'edgeseg export'.")

    @property
    def height(self) -> int:
        return int(self.input_size[0])

    @property
    def width(self) -> int:
        return int(self.input_size[1])

    def logit_threshold(self) -> Optional[float]:
        """The raw-logit cut equivalent to ``sigmoid(x) > threshold`` (None if not sigmoid)."""
        import math

        if self.activation != "sigmoid":
            return None
        t = min(max(self.threshold, 1e-7), 1 - 1e-7)
        return math.log(t / (1.0 - t))
