"""What the app runs: read any image safely, then classify it under every chosen variant in one pass.

:func:`load_image` turns a file, bytes, PIL image or array into ``(3, H, W)``
uint8 RGB pixels (EXIF orientation applied, alpha composited on white,
16-bit scaled, first frame of an animation, centre-cropped to a square) or
raises :class:`ImageInputError` with a message meant for the person who sent
it. :class:`Predictor` stacks the correct contract and the chosen wrong
variants into one batch, runs the network once, and reads the contract meter
on the same pass. No Gradio here: the app wraps it.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .contract import CORRECT_KEY, DEFAULT_DEMO_VARIANTS, WRONG_VARIANTS, to_display, variant_contracts, variant_explanation, variant_title
from .meter import BatchNormProbe, MeterReading, reading

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 25 * 1024 * 1024
SUPPORTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"


class ImageInputError(ValueError):
    """The input is not an image we can classify; the message says why, in plain words."""


class VariantError(ValueError):
    """An unknown variant key was asked for."""


MAX_VARIANT_ITEMS = 2 * (len(WRONG_VARIANTS) + 1)  # every key twice over is still a sensible request


def shorten(value: Any, limit: int = 40) -> str:
    """``repr`` of what a caller sent, cut to ``limit`` characters (never echo a megabyte back)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- reading images ------------------------------------------------------------------


def load_image(source: Any, work_size: int = 384, notes: list[str] | None = None) -> torch.Tensor:
    """``(3, S, S)`` uint8 RGB pixels from a path, bytes, PIL image or ``(H, W[, C])`` array.

    Large images are centre-cropped to a square and reduced (box filter) to at
    most about ``2 * work_size`` pixels a side; the contract's own resize comes
    later. Messages about what was done (first frame of an animation, ...) are
    appended to ``notes``.
    """
    notes = notes if notes is not None else []
    if source is None:
        raise ImageInputError("No image was given. Upload a photo, take one with the camera or paste one.")
    if isinstance(source, np.ndarray):
        img = _from_array(source)
    elif isinstance(source, Image.Image):
        img = source
    else:
        img = _open(source)
    img = _first_frame(img, notes)
    if img.format == "JPEG":
        img.draft(None, (work_size, work_size))
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(f"The image file is truncated or corrupt and cannot be decoded ({exc}).") from None
    img = _upright(img, notes)
    img = to_rgb(img)
    return _square_pixels(img, work_size)


def _open(source: Any) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        name = "The uploaded data"
    else:
        path = Path(source)
        name = f"The file {path.name!r}"
        if not path.is_file():
            raise ImageInputError(f"{name} does not exist.")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageInputError(f"{name} is {size / 2**20:.0f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB.")
        data = path.read_bytes()
    if not data:
        raise ImageInputError(f"{name} is empty (0 bytes).")
    if len(data) > MAX_FILE_BYTES:
        raise ImageInputError(f"{name} is {len(data) / 2**20:.0f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageInputError(_too_many_pixels(None)) from None
    except UnidentifiedImageError:
        raise ImageInputError(f"{name} is not an image this app can read. Please use a {SUPPORTED} file.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageInputError(f"{name} looks like an image but is damaged ({exc}).") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise ImageInputError(_too_many_pixels(img.size))
    return img


def _too_many_pixels(size: tuple[int, int] | None) -> str:
    what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return (f"The image has {what}, above the safety limit of {Image.MAX_IMAGE_PIXELS:,} pixels "
            "(it could be a decompression bomb). Please send a smaller image.")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or min(arr.shape[:2]) == 0:
        raise ImageInputError(f"An image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr.astype(np.float64))
    return Image.fromarray(arr)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit, 32-bit or float samples to 0..255 (floats in [0, 1] are read as fractions)."""
    hi = float(values.max()) if values.size else 0.0
    if hi <= 1.0:
        values = values * 255.0
    elif hi > 255.0:
        values = values / 257.0 if hi <= 65535.0 else values * (255.0 / hi)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _first_frame(img: Image.Image, notes: list[str]) -> Image.Image:
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        img.seek(0)
        notes.append(f"Animated or multi-page image: classified the first of its {frames} frames.")
    return img


def _upright(img: Image.Image, notes: list[str]) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        notes.append("The image's EXIF data is unreadable; its orientation tag was ignored.")
        return img
    if orientation in (None, 1):
        return img
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        notes.append("The image's EXIF orientation could not be applied.")
        return img
    notes.append("Rotated upright as its EXIF orientation tag says.")
    return upright


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: transparency composited on white, high bit depths scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img, dtype=np.float64))).convert("RGB")
    if (mode == "P" and "transparency" in img.info) or mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _square_pixels(img: Image.Image, work_size: int) -> torch.Tensor:
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    factor = side // work_size
    if factor >= 2:
        img = img.reduce(factor)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


# -- predicting -------------------------------------------------------------------------


@dataclass
class VariantResult:
    key: str
    title: str
    explanation: str
    confidences: dict[str, float]  # every class, most likely first
    meter: MeterReading
    accuracy: float | None  # measured test accuracy from metrics.json, as a fraction
    seen: np.ndarray = field(repr=False)  # (S, S, 3) uint8: the network input read under the correct contract

    @property
    def label(self) -> str:
        return next(iter(self.confidences))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "explanation": self.explanation, "label": self.label,
                "confidences": self.confidences, "meter": self.meter.to_dict(), "accuracy": self.accuracy}


@dataclass
class Prediction:
    variants: list[VariantResult]
    warning: str | None = None  # set when the correct panel's input is far outside the contract
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"variants": [v.to_dict() for v in self.variants], "warning": self.warning, "notes": self.notes}


class Predictor:
    """Holds one loaded model; classifies an image under the correct contract and chosen wrong variants.

    All variants go through a single batched forward pass. The forward pass is
    serialized by a lock (the meter hooks the model's first batch-norm layer,
    and on a small CPU one pass at a time is also the fastest); image decoding
    runs outside it.
    """

    def __init__(self, model, metrics: dict | None = None, channels_last: bool = True):
        self.model = model.eval()
        self.contract = model.contract
        self.class_names = list(model.class_names)
        self.contracts = variant_contracts(self.contract, list(WRONG_VARIANTS))
        self.transforms = {k: c.transform().to(model.device) for k, c in self.contracts.items()}
        self.accuracy = dict((metrics or {}).get("accuracy") or {})
        self.test_size = (metrics or {}).get("test_size")
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._lock = threading.Lock()

    @staticmethod
    def variant_keys(variants: Iterable[str] | None) -> list[str]:
        """``["correct", *chosen]`` in the canonical order; ``None`` means the defaults.

        Anything else than a list of known keys raises :class:`VariantError` with a
        short message (what a caller sent is quoted at most 40 characters long).
        """
        if variants is None:
            chosen = list(DEFAULT_DEMO_VARIANTS)
        elif isinstance(variants, (list, tuple)):
            chosen = list(variants)
        else:
            raise VariantError(f"The variants must be a list of keys, e.g. [\"bgr\"], not {shorten(variants)}; "
                               f"choose from {', '.join(WRONG_VARIANTS)}.")
        if len(chosen) > MAX_VARIANT_ITEMS:
            raise VariantError(f"At most {MAX_VARIANT_ITEMS} variants can be asked for at once; got {len(chosen)}.")
        unknown = [k for k in chosen if not (isinstance(k, str) and (k in WRONG_VARIANTS or k == CORRECT_KEY))]
        if unknown:
            shown = ", ".join(shorten(k) for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise VariantError(f"Unknown variant {shown}; choose from {', '.join(WRONG_VARIANTS)}.")
        return [CORRECT_KEY, *(k for k in WRONG_VARIANTS if k in chosen)]

    def predict(self, image: Any, variants: Iterable[str] | None = None) -> Prediction:
        """Read ``image`` (see :func:`load_image`) and classify it under ``correct`` + ``variants``."""
        keys = self.variant_keys(variants)
        notes: list[str] = []
        pixels = load_image(image, work_size=4 * self.contract.input_size, notes=notes)
        prediction = self.predict_pixels(pixels, keys)
        prediction.notes = notes
        return prediction

    @torch.inference_mode()
    def predict_pixels(self, pixels: torch.Tensor, keys: list[str]) -> Prediction:
        """Classify ``(3, H, W)`` uint8 pixels under each contract in ``keys`` in one forward pass."""
        x = pixels.unsqueeze(0).to(self.model.device, torch.float32)
        base = self.transforms[CORRECT_KEY].resize(x)  # every variant shares size and interpolation
        batch = torch.cat([self.transforms[k](base) for k in keys])
        probs, divergence = self._forward(batch)
        seen = (to_display(batch, self.contract) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        results = []
        for i, key in enumerate(keys):
            order = probs[i].argsort(descending=True).tolist()
            results.append(VariantResult(
                key=key, title=variant_title(key), explanation=variant_explanation(key),
                confidences={self.class_names[j]: round(float(probs[i, j]), 6) for j in order},
                meter=reading(float(divergence[i])), accuracy=self.accuracy.get(key), seen=seen[i]))
        return Prediction(results, warning=self._warn_if_broken(results[0].meter, "the correct contract"))

    @torch.inference_mode()
    def check_normalized(self, inputs: torch.Tensor) -> MeterReading:
        """Meter reading of an already-normalized ``(N, 3, S, S)`` batch; warns when it is far outside the contract."""
        _, divergence = self._forward(inputs.to(self.model.device, torch.float32))
        meter = reading(float(divergence.mean()))
        self._warn_if_broken(meter, "an input given as already normalized")
        return meter

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._lock, BatchNormProbe(self.model) as probe:
            logits = self.model(batch)
            divergence = probe.divergence(per_image=True)
        return logits.float().softmax(1), divergence

    def _warn_if_broken(self, meter: MeterReading, what: str) -> str | None:
        if meter.level != "broken":
            return None
        message = (f"The input's statistics under {what} fall far outside the model's contract "
                   f"(first batch-norm divergence {meter.divergence:,.3g}); the predictions are unreliable.")
        log.warning(message)
        return message
