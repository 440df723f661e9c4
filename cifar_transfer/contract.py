"""The normalization contract: what a pretrained model expects of its input.

This module is the single owner of every mean/std in the project. Training,
evaluation, the app, the doctor and the deliberately *wrong* variants all build
their preprocessing through :class:`NormalizationContract` and
:func:`wrong_variants`; no other file holds a copy of these numbers.

A contract is a small, typed, JSON-serializable value that travels with the
weights (it is stored in every checkpoint's ``config.json``). The transform is
resolved from it, and any deviation is an explicit, named override.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

CHANNEL_ORDERS = ("RGB", "BGR")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROP_MODES = ("center", "squash")  # timm's crop_mode values this project implements


class ContractError(ValueError):
    """A contract description is malformed (bad JSON, wrong field, bad value)."""


@dataclass(frozen=True)
class NormalizationContract:
    """What a model expects: ``((pixels / 255 * pixel_scale)[order] - mean) / std``.

    Fields
    ------
    name: short identifier (``"imagenet"``, ``"minus_one_one"``, ...).
    mean, std: per-channel statistics, in the channel order the model expects.
    pixel_scale: value range before normalization; 1.0 means pixels in [0, 1],
        255.0 means raw 0-255 values.
    channel_order: ``"RGB"`` or ``"BGR"``.
    input_size: side in pixels of the square image the network is fed.
    interpolation: how images are resized to ``input_size``.
    crop_pct, crop_mode: as timm's ``pretrained_cfg``: the image is resized to
        ``floor(input_size / crop_pct)`` (``"center"``: its shorter side, keeping the
        aspect ratio; ``"squash"``: both sides), then the central
        ``input_size`` square is cut out. 1.0 / ``"center"`` keeps a square image whole.
    times: how often ``(x - mean) / std`` is applied (1; 2 is the
        "normalized twice" bug, kept representable so it can be demonstrated).
    description: one plain-words sentence.
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_scale: float = 1.0
    channel_order: str = "RGB"
    input_size: int = 224
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    times: int = 1
    description: str = ""

    def __post_init__(self) -> None:
        for key in ("mean", "std"):
            value = getattr(self, key)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError) as exc:
                raise ContractError(f"contract field {key!r} must be 3 numbers, got {value!r}") from exc
            if len(value) != 3:
                raise ContractError(f"contract field {key!r} must have 3 values (one per channel), got {len(value)}")
            object.__setattr__(self, key, value)
        if any(s <= 0 for s in self.std):
            raise ContractError(f"contract std must be positive, got {self.std}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ContractError(f"channel_order must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ContractError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.crop_mode not in CROP_MODES:
            raise ContractError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        if not (isinstance(self.crop_pct, (int, float)) and 0 < self.crop_pct <= 1):
            raise ContractError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if not (isinstance(self.input_size, int) and self.input_size > 0):
            raise ContractError(f"input_size must be a positive integer, got {self.input_size!r}")
        if not (isinstance(self.times, int) and self.times >= 0):
            raise ContractError(f"times must be a non-negative integer, got {self.times!r}")
        if float(self.pixel_scale) <= 0:
            raise ContractError(f"pixel_scale must be positive, got {self.pixel_scale!r}")
        object.__setattr__(self, "pixel_scale", float(self.pixel_scale))

    # -- serialization -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NormalizationContract":
        if not isinstance(data, dict):
            raise ContractError(f"a contract must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(f"unknown contract field(s): {', '.join(unknown)}")
        missing = [k for k in ("name", "mean", "std") if k not in data]
        if missing:
            raise ContractError(f"contract is missing field(s): {', '.join(missing)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "NormalizationContract":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ContractError(f"contract is not valid JSON: {exc}") from exc

    # -- derived -------------------------------------------------------
    def replace(self, **overrides: Any) -> "NormalizationContract":
        """A copy with explicit overrides (the only way to deviate from a contract)."""
        return dataclasses.replace(self, **overrides)

    def transform(self) -> "ContractTransform":
        return ContractTransform(self)

    def value_range(self) -> tuple[float, float]:
        """Min and max a pixel can take after this contract (over all channels)."""
        lo, hi = 0.0, self.pixel_scale
        los, his = [], []
        for m, s in zip(self.mean, self.std):
            a, b = lo, hi
            for _ in range(self.times):
                a, b = (a - m) / s, (b - m) / s
            los.append(a)
            his.append(b)
        return min(los), max(his)

    def same_normalization(self, other: "NormalizationContract") -> bool:
        """True when both map pixels identically (names and text aside)."""
        keys = ("mean", "std", "pixel_scale", "channel_order", "times")
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    # -- timm's pretrained_cfg ---------------------------------------------
    def timm_inexpressible(self) -> list[str]:
        """What timm's ``pretrained_cfg`` cannot say about this contract (timm feeds RGB in [0, 1], normalized once)."""
        return [f"{k}={getattr(self, k)!r}" for k, v in (("channel_order", "RGB"), ("pixel_scale", 1.0), ("times", 1))
                if getattr(self, k) != v]

    def timm_data_config(self) -> dict[str, Any]:
        """The contract as timm's data config (the preprocessing fields of ``pretrained_cfg``)."""
        bad = self.timm_inexpressible()
        if bad:
            raise ContractError(f"timm's pretrained_cfg cannot express contract {self.name!r} ({', '.join(bad)}): "
                                "a timm user would preprocess its inputs differently, without an error")
        return {"input_size": (3, self.input_size, self.input_size), "interpolation": self.interpolation,
                "mean": self.mean, "std": self.std, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}

    def timm_disagreements(self, pretrained_cfg: dict[str, Any]) -> list[str]:
        """Fields where a timm ``pretrained_cfg`` says something other than this contract (empty: they agree)."""
        ours = self.timm_data_config()
        out = []
        for key, value in ours.items():
            theirs = pretrained_cfg.get(key)
            same = theirs is not None and (
                tuple(float(v) for v in theirs) == tuple(float(v) for v in value) if isinstance(value, tuple) else theirs == value)
            if not same:
                out.append(f"{key}: pretrained_cfg has {theirs!r}, the contract {list(value) if isinstance(value, tuple) else value!r}")
        return out


class ContractTransform(nn.Module):
    """Batched tensor preprocessing resolved from a contract.

    Input: a ``(N, 3, H, W)`` tensor of RGB pixel values in 0..255 (``uint8`` or
    float). Output: ``(N, 3, input_size, input_size)`` float tensor ready for the
    network. Runs on whatever device the input is on.
    """

    def __init__(self, contract: NormalizationContract):
        super().__init__()
        self.contract = contract
        self.register_buffer("mean", torch.tensor(contract.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(contract.std).view(1, 3, 1, 1), persistent=False)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        """Resize and centre-crop to ``input_size`` as timm's eval transform does (``crop_pct``, ``crop_mode``)."""
        c = self.contract
        size, (h, w) = c.input_size, x.shape[-2:]
        scale = math.floor(size / c.crop_pct)
        if c.crop_mode == "squash" or h == w:
            target = (scale, scale)
        else:  # shorter side to `scale`, as torchvision's Resize(int)
            target = (scale, int(scale * w / h)) if h < w else (int(scale * h / w), scale)
        if (h, w) != target:
            kwargs = {} if c.interpolation == "nearest" else {"align_corners": False, "antialias": True}
            x = F.interpolate(x, size=target, mode=c.interpolation, **kwargs)
        top, left = int(round((target[0] - size) / 2.0)), int(round((target[1] - size) / 2.0))
        return x[..., top:top + size, left:left + size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) batch of RGB pixels, got shape {tuple(x.shape)}")
        dtype = x.dtype if x.is_floating_point() else torch.float32
        x = self.resize(x.to(dtype))
        if self.contract.interpolation == "bicubic":
            x = x.clamp(0, 255)
        x = x * (self.contract.pixel_scale / 255.0)
        if self.contract.channel_order == "BGR":
            x = x.flip(1)
        mean, std = self.mean.to(x), self.std.to(x)
        for _ in range(self.contract.times):
            x = (x - mean) / std
        return x

    def extra_repr(self) -> str:
        return f"contract={self.contract.name!r}, mean={self.contract.mean}, std={self.contract.std}"


def to_display(x: torch.Tensor, expected: NormalizationContract, clip: bool = True) -> torch.Tensor:
    """Map a network input back to [0, 1] RGB *as the model's contract reads it*: the one inverse of
    :class:`ContractTransform`'s normalization (resizing is not undone).

    The correct contract round-trips to the original picture; a wrong variant
    shows what the network effectively perceives (washed out, saturated,
    colour-swapped), clipped to the displayable range (``clip=False``: not clipped,
    for asking which contract could have produced ``x``).
    """
    mean = torch.tensor(expected.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(expected.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    for _ in range(expected.times):
        x = x * std + mean
    x = x / expected.pixel_scale
    if expected.channel_order == "BGR":
        x = x.flip(1)
    return x.clamp(0, 1) if clip else x


# -- presets -----------------------------------------------------------------

IMAGENET = NormalizationContract(
    name="imagenet",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    input_size=224,
    description="ImageNet statistics, as torchvision's IMAGENET1K_V1 ResNets were trained with.",
)

MINUS_ONE_ONE = NormalizationContract(
    name="minus_one_one",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    input_size=224,
    description="Pixels scaled to [-1, 1], as the TensorFlow EfficientNet-Lite weights were trained with.",
)

# Per-channel mean/std of the 50,000 CIFAR-10 training images in [0, 1]
# (population std; the often-copied (0.2023, 0.1994, 0.2010) is a different,
# mistaken figure). Re-measured on the JPEG copy by tests/test_contract.py.
CIFAR10_STATS = NormalizationContract(
    name="cifar10_stats",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    input_size=32,
    description="CIFAR-10 training-set statistics.",
)

PRESETS: dict[str, NormalizationContract] = {c.name: c for c in (IMAGENET, MINUS_ONE_ONE, CIFAR10_STATS)}


def preset(name: str, **overrides: Any) -> NormalizationContract:
    try:
        base = PRESETS[name]
    except KeyError:
        raise ContractError(f"unknown contract preset {name!r}; known: {', '.join(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base


# -- wrong variants ------------------------------------------------------------


@dataclass(frozen=True)
class WrongVariant:
    """A deliberate, named way to break a correct contract."""

    key: str
    title: str
    explanation: str
    build: Callable[[NormalizationContract], NormalizationContract] = field(repr=False)

    def apply(self, correct: NormalizationContract) -> NormalizationContract:
        wrong = self.build(correct)
        return wrong.replace(name=self.key, description=self.explanation)


def _other_model(correct: NormalizationContract) -> NormalizationContract:
    other = MINUS_ONE_ONE if correct.mean == IMAGENET.mean and correct.std == IMAGENET.std else IMAGENET
    return correct.replace(mean=other.mean, std=other.std)


WRONG_VARIANTS: dict[str, WrongVariant] = {
    v.key: v
    for v in (
        WrongVariant(
            "no_normalization",
            "No normalization ([0, 1] input)",
            "Pixels are only divided by 255, so every value is positive and the model sees a dim, low-contrast image.",
            lambda c: c.replace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        ),
        WrongVariant(
            "raw_0_255",
            "Raw 0-255 pixels",
            "Pixels are fed as 0-255 numbers, about 100 times larger than the model was trained on, so it sees a blown-out image.",
            lambda c: c.replace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), pixel_scale=255.0),
        ),
        WrongVariant(
            "other_model_stats",
            "Another model's statistics",
            "The mean and std of a different pretrained model (ImageNet vs. [-1, 1]) are used, so brightness and contrast are subtly off.",
            _other_model,
        ),
        WrongVariant(
            "cifar10_stats",
            "CIFAR-10 statistics instead of pretraining ones",
            "The dataset's own mean and std are used instead of those the weights were pretrained with, shifting every channel a little.",
            lambda c: c.replace(mean=CIFAR10_STATS.mean, std=CIFAR10_STATS.std),
        ),
        WrongVariant(
            "bgr",
            "BGR channel order",
            "Red and blue are swapped (as OpenCV loads images), so a blue sky looks orange to the model.",
            lambda c: c.replace(channel_order="BGR" if c.channel_order == "RGB" else "RGB"),
        ),
        WrongVariant(
            "normalized_twice",
            "Normalized twice",
            "The normalization is applied a second time, stretching contrast and shifting colours far beyond what the model knows.",
            lambda c: c.replace(times=c.times + 1),
        ),
    )
}

#: The three variants the demo shows by default: the most instructive contrast
#: between silent-but-small and catastrophic failures.
DEFAULT_DEMO_VARIANTS = ("no_normalization", "raw_0_255", "bgr")

CORRECT_KEY = "correct"
CORRECT_TITLE = "Correct (the model's contract)"
CORRECT_EXPLANATION = "Preprocessing exactly as the pretrained weights expect."


def variant_contracts(correct: NormalizationContract, keys: list[str] | tuple[str, ...] | None = None) -> dict[str, NormalizationContract]:
    """``{"correct": correct, <wrong key>: <wrong contract>, ...}`` in a stable order."""
    keys = list(WRONG_VARIANTS) if keys is None else list(keys)
    out = {CORRECT_KEY: correct}
    for key in keys:
        if key == CORRECT_KEY:
            continue
        if key not in WRONG_VARIANTS:
            raise ContractError(f"unknown variant {key!r}; known: {', '.join(WRONG_VARIANTS)}")
        out[key] = WRONG_VARIANTS[key].apply(correct)
    return out


def variant_title(key: str) -> str:
    return CORRECT_TITLE if key == CORRECT_KEY else WRONG_VARIANTS[key].title


def variant_explanation(key: str) -> str:
    return CORRECT_EXPLANATION if key == CORRECT_KEY else WRONG_VARIANTS[key].explanation
