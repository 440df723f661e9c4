"""One image pipeline: any input to RGB pixels, then the model's contract for everything else.

Every path that turns an image file into a network input -- the class-folder
dataset (training and evaluation), the app's :class:`~cifar_transfer.predictor.Predictor`
and the doctor -- goes through the same two steps::

    source --decode()--> (H, W, 3) uint8 RGB --square_pixels(side, contract)--> (3, S, S) uint8 --ContractTransform--> network input
            \\___________________________ read_square(source, side, contract) ___________/

* :func:`decode` is decoding only: a path, bytes, PIL image or ``(H, W[, C])``
  array becomes upright 8-bit RGB (EXIF orientation applied, transparency
  composited on white, 16-bit and float samples scaled, palette expanded, first
  frame of an animation), or :class:`ImageInputError` with a message meant for
  the person who sent it. Files and bytes are decoded only as one of
  :data:`ALLOWED_FORMATS`, decompression bombs are refused from their header,
  and so are oversized metadata and NaN/infinite samples. The one geometric
  step it may take is for safety and speed: given ``reduce_to``, a huge picture
  is reduced (a JPEG by its decoder's DCT scaling, then a box filter of an
  integer factor) while its shorter side stays at least ``reduce_to`` pixels.
  :func:`read_square` always asks for ``REDUCE_MARGIN * side``, so the
  reduction is the same on every path.
* :func:`square_pixels` brings the picture to the ``S x S`` uint8 square the
  dataset stores, by the contract's own resize policy at ``S``
  (:meth:`ContractTransform.resize <cifar_transfer.contract.ContractTransform.resize>`
  with ``input_size=S``: its ``crop_mode`` and ``interpolation``; ``crop_pct``
  is left to the network-size step, so it is applied once). A picture already
  ``S x S`` (every CIFAR-10 image) is kept exactly as decoded.
* The model's :class:`~cifar_transfer.contract.ContractTransform` then resizes
  ``S`` to ``input_size`` (``crop_pct``, ``crop_mode``) and normalizes.

``S`` is :func:`pixel_side`: the side of the images the model was trained on
(``image_size`` in its metrics' ``train_config``, 32 for CIFAR-10). Because the
dataset stores exactly ``read_square(file, S, contract)``, a file gives the
same network input when it is a training or test image and when it is
uploaded to the app. A model that records no training size (another project's
timm classifier) gets the decoded picture itself, and the contract's transform
does all the geometry, as timm's eval transform would (:func:`read_pixels`).
"""

from __future__ import annotations

import functools
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .contract import ContractTransform, NormalizationContract

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 25 * 1024 * 1024
SUPPORTED = "PNG, JPEG, WebP, GIF, BMP or TIFF"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: :func:`read_square` reduces a huge picture only while its shorter side stays at least this many times ``S``.
REDUCE_MARGIN = 4
#: The resize policy when no contract is given: the contract defaults (``crop_mode="center"``, bilinear).
DEFAULT_GEOMETRY = NormalizationContract("default_geometry", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


class ImageInputError(ValueError):
    """The input is not an image we can classify; the message says why, in plain words."""


# -- the pipeline ---------------------------------------------------------------------


def read_square(source: Any, side: int, contract: NormalizationContract | None = None,
                notes: list[str] | None = None) -> torch.Tensor:
    """``(3, side, side)`` uint8 RGB: :func:`decode` (reduced to ``REDUCE_MARGIN * side``), then :func:`square_pixels`.

    What the dataset stores for a file and what the app feeds the contract's transform.
    """
    return square_pixels(decode(source, notes, reduce_to=REDUCE_MARGIN * side), side, contract)


def square_pixels(pixels: np.ndarray | torch.Tensor, side: int,
                  contract: NormalizationContract | None = None) -> torch.Tensor:
    """``(H, W, 3)`` uint8 pixels to a ``(3, side, side)`` uint8 square by ``contract``'s resize policy at ``side``.

    That is :meth:`ContractTransform.resize` with ``input_size=side`` and ``crop_pct=1`` (``crop_mode`` "center":
    the shorter side to ``side``, the central square kept; "squash": both sides to ``side``), rounded to uint8.
    A ``side x side`` picture is returned unchanged.
    """
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or pixels.dtype not in (np.uint8, torch.uint8):
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {tuple(pixels.shape)} {pixels.dtype}")
    if isinstance(pixels, np.ndarray):  # (numpy's transpose copy is 4x faster than torch's for a 32 px image)
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
    else:
        x = pixels.permute(2, 0, 1).contiguous()
    if tuple(x.shape[1:]) == (side, side):
        return x
    resized = _geometry(contract or DEFAULT_GEOMETRY, side).resize(x[None].float())[0]
    return resized.round().clamp(0, 255).to(torch.uint8).contiguous()


@functools.lru_cache(maxsize=32)
def _geometry(contract: NormalizationContract, side: int) -> ContractTransform:
    return contract.replace(input_size=side, crop_pct=1.0).transform()


def pixel_side(contract: NormalizationContract, metrics: dict | None = None) -> int | None:
    """``S``: the side of the images the model was trained on, when its metrics record it; else ``None``."""
    side = ((metrics or {}).get("train_config") or {}).get("image_size")
    return side if isinstance(side, int) and not isinstance(side, bool) and side > 0 else None


def resize_side(contract: NormalizationContract) -> int:
    """The side the contract's transform resizes to before its centre crop: ``floor(input_size / crop_pct)``."""
    return math.floor(contract.input_size / contract.crop_pct)


def read_pixels(source: Any, contract: NormalizationContract, side: int | None = None,
                notes: list[str] | None = None) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB pixels that ``contract``'s transform turns into the network input.

    With ``side`` (:func:`pixel_side`): :func:`read_square`, what the dataset stores for the same file. Without:
    the decoded picture itself (reduced while its shorter side stays at least ``REDUCE_MARGIN`` times the
    contract's :func:`resize_side`).
    """
    if side:
        return read_square(source, side, contract, notes)
    pixels = decode(source, notes, reduce_to=REDUCE_MARGIN * resize_side(contract))
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def decode(source: Any, notes: list[str] | None = None, *, reduce_to: int | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 upright RGB pixels from a path, bytes, PIL image or ``(H, W[, C])`` array.

    ``reduce_to``: when given, a picture whose shorter side is at least twice that is reduced (JPEG DCT scaling,
    then a box filter of an integer factor), keeping its shorter side at least ``reduce_to`` pixels. Messages
    about what was done (first frame of an animation, EXIF rotation, ...) are appended to ``notes``.

    Files and bytes are decoded only as one of :data:`ALLOWED_FORMATS` (never EPS, which Pillow would hand to
    Ghostscript, nor any other format), and images with more than ``Image.MAX_IMAGE_PIXELS`` pixels are refused
    from their header, before their pixels are allocated. Every failure, whatever Pillow raised, becomes an
    :class:`ImageInputError` with a plain message that quotes neither Pillow's internals nor a server path.
    """
    notes = notes if notes is not None else []
    if source is None:
        raise ImageInputError("No image was given. Upload a photo, take one with the camera or paste one.")
    try:
        if isinstance(source, np.ndarray):
            img = _from_array(source, notes)
        elif isinstance(source, Image.Image):
            img = source
        else:
            img = _open(source)
        img = _first_frame(img, notes)
        _check_pixels(img)
        tiff = img.format == "TIFF"
        orientation = _orientation(img, notes) if tiff else None  # Pillow applies a TIFF's own while decoding
        if reduce_to and img.format in ("JPEG", "MPO"):
            img.draft(None, (reduce_to, reduce_to))
        img.load()
        if not tiff:
            orientation = _orientation(img, notes)  # after load: a PNG's EXIF may follow its pixels
        img = _upright(img, orientation, notes)
        img = to_rgb(img, notes)
        if reduce_to:
            factor = min(img.size) // reduce_to
            if factor >= 2:
                img = img.reduce(factor)
        return np.array(img, dtype=np.uint8)
    except ImageInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a decoder raises, the cause is the file a visitor sent
        raise ImageInputError(_decode_failure(exc, "The image file")) from None


# -- decoding safely ----------------------------------------------------------------------


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
# TGA has no magic number at its start (TGA 2.0 adds a signature at the end; every TGA has the 18-byte header checked
# here). An uncompressed true-colour TGA starts 00 00 02 00, exactly the signature of a Windows cursor (what Pillow's
# CUR header check tests), so it is recognised before that table.
_TGA_TYPES = {1: 1, 2: 1, 3: 1, 9: 0, 10: 0, 11: 0}  # image type: 1 if uncompressed (its pixels' size is known)
_TGA_DEPTHS = (8, 15, 16, 24, 32)
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
    if _is_tga(data):
        return "a TGA (Targa) image"
    fmt = _header_format(data, (f for f in Image.OPEN if f not in ALLOWED_FORMATS and f not in _NO_NAMING))
    if fmt in ("ICO", "CUR") and not int.from_bytes(data[4:6], "little"):
        return None  # their 4-byte signature, but no image in the directory: not an icon (a TGA header's start?)
    return _FORMAT_NAMES.get(fmt, f"a {fmt} file") if fmt else None


def _is_tga(data: bytes) -> bool:
    """A TGA file: an 18-byte TGA header whose fields agree (colour-map type, image type, pixel depth, a non-empty
    size and, uncompressed, enough bytes for its pixels)."""
    if len(data) < 18:
        return False
    id_length, colour_map, kind, depth = data[0], data[1], data[2], data[16]
    width, height = int.from_bytes(data[12:14], "little"), int.from_bytes(data[14:16], "little")
    map_bytes = int.from_bytes(data[5:7], "little") * -(-data[7] // 8) if colour_map == 1 else 0
    if colour_map not in (0, 1) or kind not in _TGA_TYPES or depth not in _TGA_DEPTHS or not width or not height:
        return False
    return not _TGA_TYPES[kind] or len(data) >= 18 + id_length + map_bytes + width * height * -(-depth // 8)


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


def _from_array(arr: np.ndarray, notes: list[str] | None = None) -> Image.Image:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or min(arr.shape[:2]) == 0:
        raise ImageInputError(f"An image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr.astype(np.float64), notes)
    return Image.fromarray(arr)


def _to_uint8(values: np.ndarray, notes: list[str] | None = None) -> np.ndarray:
    """Scale 16-bit, 32-bit or float samples to 0..255 (floats in [0, 1] are read as fractions).

    NaN or infinite samples are refused: they have no colour, and scaling and
    clipping them would silently give a black (or white) picture. Negative
    samples (signed data: a measurement, a difference image) have no colour in
    any of these scales either; clipping them to black would erase every
    detail below zero without a word, so the range is stretched from its
    lowest value (black) to its highest (white), as image viewers show such
    data, and a note says so.
    """
    if not np.isfinite(values).all():
        raise ImageInputError("The image holds invalid pixel values (NaN or infinity), so its colours are undefined "
                              "and it cannot be classified. Please export it again as an ordinary 8- or 16-bit image.")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0:
        if notes is not None:
            notes.append(f"The image holds negative pixel values ({lo:.6g} to {hi:.6g}), which no image scale gives a "
                         "colour: its range was stretched from black (lowest) to white (highest).")
        scale = 255.0 / (hi - lo) if hi > lo else 0.0  # one value everywhere: a uniform (black) picture
        return np.rint((values - lo) * scale).astype(np.uint8)
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


def to_rgb(img: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB: transparency composited on white, high bit depths scaled (a note in
    ``notes`` when negative values had to be stretched, :func:`_to_uint8`)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img, dtype=np.float32), notes)).convert("RGB")
    if (mode == "P" and "transparency" in img.info) or mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


