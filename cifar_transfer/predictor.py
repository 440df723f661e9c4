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

import dataclasses
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
from .engine import make_engine
from .meter import (CalibrationError, MeterCalibration, MeterReading, batchnorm_layers, channel_swap, find_calibration,
                    first_layer_reading, gaussian_kl, layer_features)

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

    Files and bytes are decoded only as one of :data:`ALLOWED_FORMATS` (never
    EPS, which Pillow would hand to Ghostscript, nor any other format), and
    images with more than ``Image.MAX_IMAGE_PIXELS`` pixels are refused from
    their header, before their pixels are allocated. Every failure, whatever
    Pillow raised, becomes an :class:`ImageInputError` with a plain message
    that quotes neither Pillow's internals nor a server path.
    """
    notes = notes if notes is not None else []
    if source is None:
        raise ImageInputError("No image was given. Upload a photo, take one with the camera or paste one.")
    try:
        if isinstance(source, np.ndarray):
            img = _from_array(source)
        elif isinstance(source, Image.Image):
            img = source
        else:
            img = _open(source)
        img = _first_frame(img, notes)
        _check_pixels(img)
        tiff = img.format == "TIFF"
        orientation = _orientation(img, notes) if tiff else None  # Pillow applies a TIFF's own while decoding
        if img.format in ("JPEG", "MPO"):
            img.draft(None, (work_size, work_size))
        img.load()
        if not tiff:
            orientation = _orientation(img, notes)  # after load: a PNG's EXIF may follow its pixels
        img = _upright(img, orientation, notes)
        img = to_rgb(img)
        return _square_pixels(img, work_size)
    except ImageInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises, the cause is the file a visitor sent
        raise ImageInputError(_decode_failure(exc, "The image file")) from None


ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # Pillow format ids; nothing else is ever decoded
_FORMAT_LABELS = {"WEBP": "WebP"}
# Formats Pillow can recognise from the first bytes (its plugins' ``_accept`` checks, no decoding), as told to a visitor.
_FORMAT_NAMES = {
    "EPS": "an EPS (PostScript) file", "ICO": "a Windows icon (ICO) file", "CUR": "a Windows cursor (CUR) file",
    "PSD": "a Photoshop (PSD) document", "PPM": "a Netpbm (PPM/PGM/PBM) image", "JPEG2000": "a JPEG 2000 image",
    "AVIF": "an AVIF image", "ICNS": "a macOS icon (ICNS) file", "DDS": "a DirectDraw (DDS) texture",
    "QOI": "a QOI image", "PCX": "a PCX image", "DCX": "a DCX image", "SGI": "an SGI image", "FITS": "a FITS file",
    "XBM": "an XBM bitmap", "XPM": "an XPM pixmap", "WMF": "a Windows metafile (WMF/EMF)", "MPEG": "an MPEG video",
    "FLI": "an FLI/FLC animation", "BLP": "a BLP texture",
}
_NO_NAMING = {"DIB"}  # its header check is too loose to name a file after it
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs")
_METADATA_TOO_LARGE = ("The image's embedded metadata (a text or colour-profile chunk) is too large to read safely. "
                       "Please save the picture again without metadata, or send another one.")


def _open(source: Any) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        name = "The uploaded data"
    else:
        path = Path(source)
        name = f"The file {_shown_name(path.name)}"
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
            warnings.simplefilter("ignore")  # DecompressionBombWarning (checked below), corrupt-EXIF warnings
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageInputError(_unreadable(name, data)) from None
    except Exception as exc:  # noqa: BLE001 - see load_image
        raise ImageInputError(_decode_failure(exc, name, data)) from None


def _shown_name(name: str, limit: int = 60) -> str:
    """A visitor's file name as quoted in a message: ``repr`` (control characters escaped), long ones shortened."""
    if len(name) > limit:
        name = name[: limit - 16] + "…" + name[-15:]
    return repr(name)


def _header_format(data: bytes, formats: Iterable[str]) -> str | None:
    """The first of ``formats`` whose Pillow plugin accepts the file's first bytes (a header check, no decoding)."""
    Image.init()
    prefix = data[:16]
    for fmt in formats:
        factory_accept = Image.OPEN.get(fmt)
        accept = factory_accept[1] if factory_accept else None
        try:
            if accept is not None and accept(prefix) is True:
                return fmt
        except Exception:  # noqa: BLE001, S112 - a header check that fails names nothing
            continue
    return None


def _other_format(data: bytes) -> str | None:
    """What a file that is no image this app reads is, when its first bytes say so plainly; else ``None``."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "a HEIC/HEIF photo (an iPhone's default format; export it as JPEG)"
    if data.startswith(b"%PDF-"):
        return "a PDF document"
    if data.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in head and head.startswith((b"<svg", b"<?xml", b"<!doctype svg", b"<!--")):
        return "an SVG drawing"
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<script")):
        return "an HTML page"
    fmt = _header_format(data, (f for f in Image.OPEN if f not in ALLOWED_FORMATS and f not in _NO_NAMING))
    return _FORMAT_NAMES.get(fmt, f"a {fmt} file") if fmt else None


def _unreadable(name: str, data: bytes) -> str:
    """Message for a file no allowed format would open: damaged, another format, or no image at all."""
    if _header_format(data, ALLOWED_FORMATS):
        return _decode_failure(None, name, data)
    other = _other_format(data)
    if other:
        return f"{name} is {other}, a format this app does not read. Please use a {SUPPORTED} file."
    return f"{name} is not an image this app can read. Please use a {SUPPORTED} file."


def _decode_failure(exc: BaseException | None, name: str, data: bytes | None = None) -> str:
    """A plain message for a file that failed while being opened or decoded (Pillow's text goes to the log only)."""
    if exc is not None:
        log.info("image refused: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, Image.DecompressionBombError):
        return _too_many_pixels(None)
    if isinstance(exc, MemoryError):
        return "The image is too large to decode on this server. Please send a smaller image."
    if isinstance(exc, ValueError) and ("MAX_TEXT" in str(exc) or "text chunks" in str(exc)):
        return _METADATA_TOO_LARGE
    fmt = _header_format(data, ALLOWED_FORMATS) if data else None
    what = f"looks like a {_FORMAT_LABELS.get(fmt, fmt)} image but " if fmt else ""
    return f"{name} {what}is truncated or corrupt and cannot be decoded."


def _check_pixels(img: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise ImageInputError(_too_many_pixels(img.size))


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
    """Scale 16-bit, 32-bit or float samples to 0..255 (floats in [0, 1] are read as fractions).

    NaN or infinite samples are refused: they have no colour, and scaling and
    clipping them would silently give a black (or white) picture.
    """
    if not np.isfinite(values).all():
        raise ImageInputError("The image holds invalid pixel values (NaN or infinity), so its colours are undefined "
                              "and it cannot be classified. Please export it again as an ordinary 8- or 16-bit image.")
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


_ORIENTATIONS = range(2, 9)  # EXIF orientation values that mean a flip and/or rotation (1: as stored)


def _orientation(img: Image.Image, notes: list[str]) -> Any:
    """The EXIF orientation tag as stored (``None`` when the EXIF data cannot be read)."""
    try:
        return img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        notes.append("The image's EXIF data is unreadable; its orientation tag was ignored.")
        return None


def _upright(img: Image.Image, orientation: Any, notes: list[str]) -> Image.Image:
    """Apply a valid EXIF orientation (2..8); any other value is ignored, and a note says so."""
    if orientation is None or (type(orientation) is int and orientation == 1):
        return img
    if type(orientation) is not int or orientation not in _ORIENTATIONS:
        shown = f" ({orientation})" if type(orientation) is int else ""
        notes.append(f"The image's EXIF orientation tag has an invalid value{shown}; it was ignored and the "
                     "image is used as stored.")
        return img
    try:
        if img.getexif().get(0x0112) != orientation:  # Pillow applied it while decoding (TIFF) and dropped the tag
            upright = img
        else:
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
        return Image.fromarray(_to_uint8(np.asarray(img, dtype=np.float32))).convert("RGB")
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
    input_range: tuple[float, float] = (0.0, 0.0)  # min and max value of the network input
    clipped: float = 0.0  # share of input values outside the range the correct contract produces (shown clipped)

    @property
    def label(self) -> str:
        return next(iter(self.confidences))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "explanation": self.explanation, "label": self.label,
                "confidences": self.confidences, "meter": self.meter.to_dict(), "accuracy": self.accuracy,
                "input_range": list(self.input_range), "clipped": self.clipped}


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
    serialized by a lock (the meter hooks the model's batch-norm layers,
    and on a small CPU one pass at a time is also the fastest); image decoding
    runs outside it.
    """

    def __init__(self, model, metrics: dict | None = None, channels_last: bool = True,
                 calibration: MeterCalibration | str | Path | None = None, engine: str = "auto"):
        self.model = model.eval()
        self.contract = model.contract
        self.class_names = list(model.class_names)
        self.contracts = variant_contracts(self.contract, list(WRONG_VARIANTS))
        self.transforms = {k: c.transform().to(model.device) for k, c in self.contracts.items()}
        self.accuracy = dict((metrics or {}).get("accuracy") or {})
        self.test_size = (metrics or {}).get("test_size")
        self.calibration, self.calibration_problem = self._calibration(calibration)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._lock = threading.Lock()
        # The meter's layers (the calibration's, else the first), measured by the engine in the same pass as the
        # logits: ONNX Runtime on a CPU (the statistics are extra graph outputs), PyTorch elsewhere (engine.py).
        bns = batchnorm_layers(self.model)
        picked = self.calibration.layers if self.calibration is not None else [0]
        self._bns = [bns[i][1] for i in picked]
        self.engine = make_engine(self.model, [bns[i][0] for i in picked], self.contract.input_size, prefer=engine)

    def _calibration(self, calibration) -> tuple[MeterCalibration | None, str | None]:
        """The meter calibration (given, from a checkpoint folder, or the shipped one that fits); else why not."""
        try:
            if isinstance(calibration, MeterCalibration):
                calibration.check(self.model)
                return calibration, None
            return find_calibration(self.model, calibration), None
        except CalibrationError as exc:
            log.warning("contract meter cannot judge: %s", exc)
            return None, str(exc)

    def reliability(self, key: str) -> dict | None:
        """What the calibration measured on held-out training images for panel ``key``, in numbers and words."""
        cal = self.calibration
        row = cal.measured.get(key) if cal else None
        if row is None:
            return None
        rate = row["flag_rate"]
        if key == CORRECT_KEY:
            words = (f"On correctly preprocessed held-out training images the meter raised a false alarm on "
                     f"{100 * rate:.0f}% of single images.")
        elif key == "bgr":
            words = (f"Channel order is seen only by comparing the input with its channel-swapped twin: for this mistake "
                     f"the meter flagged {100 * rate:.0f}% of single held-out training images, so an \"ok\" here is "
                     "weaker evidence than for the other mistakes.")
        else:
            words = f"For this mistake the meter flagged {100 * rate:.0f}% of single held-out training images."
        return {"flag_rate": rate, "words": words}

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
        probs, readings = self._forward(batch)
        seen = (to_display(batch, self.contract) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        lo, hi = self.contract.value_range()
        flat = batch.flatten(1)
        mins, maxs = flat.amin(1).tolist(), flat.amax(1).tolist()
        clipped = ((flat < lo - 1e-4) | (flat > hi + 1e-4)).float().mean(1).tolist()
        results = []
        for i, key in enumerate(keys):
            order = probs[i].argsort(descending=True).tolist()
            results.append(VariantResult(
                key=key, title=variant_title(key), explanation=variant_explanation(key),
                confidences={self.class_names[j]: round(float(probs[i, j]), 6) for j in order},
                meter=dataclasses.replace(readings[i], reliability=self.reliability(key)), accuracy=self.accuracy.get(key), seen=seen[i],
                input_range=(round(mins[i], 4), round(maxs[i], 4)), clipped=round(clipped[i], 4)))
        return Prediction(results, warning=self._warn_if_broken(results[0].meter, "the correct contract"))

    @torch.inference_mode()
    def check_normalized(self, inputs: torch.Tensor) -> MeterReading:
        """Meter reading of an already-normalized ``(N, 3, S, S)`` batch as a whole; warns when far outside the contract."""
        _, _, meter = self._forward(inputs.to(self.model.device, torch.float32), pooled=True)
        self._warn_if_broken(meter, "an input given as already normalized")
        return meter

    def _forward(self, batch: torch.Tensor, pooled: bool = False):
        """Softmax and the meter's readings (one per image; with ``pooled``, also one for the whole batch), one pass.

        With a calibration, each input's channel-swapped twin rides in the same batch (the meter's channel check).
        """
        n, cal = len(batch), self.calibration
        if cal is not None:
            batch = torch.cat([batch, channel_swap(batch)])
        with self._lock:
            logits, stats = self.engine(batch)
        widths = [bn.num_features for bn in self._bns]
        per_layer = list(zip(stats[:, 0].split(widths, dim=1), stats[:, 1].split(widths, dim=1)))
        if cal is None:  # the first batch-norm layer's divergence, per image and over the whole batch
            bn, (mean_b, var_b) = self._bns[0], per_layer[0]
            mean_r, var_r = bn.running_mean.float().cpu(), bn.running_var.float().cpu()
            d = gaussian_kl(mean_b, var_b, mean_r, var_r).mean(dim=1)
            readings = [first_layer_reading(float(v)) for v in d]
            pooled_mean = mean_b.mean(0)  # equal-sized images: the batch's statistics from the per-image ones
            pooled_var = var_b.mean(0) + mean_b.var(0, unbiased=False)
            whole = first_layer_reading(float(gaussian_kl(pooled_mean, pooled_var, mean_r, var_r).mean()))
        else:
            f = layer_features(self._bns, per_layer)
            s = cal.scores(f[:n], f[n:])
            readings = [cal.reading(float(s.score[i]), float(s.channel[i])) for i in range(n)]
            score, channel = cal.batch_scores(s)
            whole = cal.reading(score, channel, n_images=n)
        probs = logits[:n].float().softmax(1)
        return (probs, readings, whole) if pooled else (probs, readings)

    def _warn_if_broken(self, meter: MeterReading, what: str) -> str | None:
        if meter.level != "broken":
            return None
        message = (f"The input's statistics under {what} fall far outside the model's contract "
                   f"(contract meter {meter.divergence:,.3g}); the predictions are unreliable.")
        log.warning(message)
        return message
