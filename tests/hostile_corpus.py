"""A corpus of odd and hostile image files, each with the outcome the app must give (issue 9).

``make_corpus(folder)`` writes every file (nothing binary is committed) and
returns one :class:`Case` per file:

* ``expect == "classified"``: the predictor must classify it; when ``substring``
  is set, one of the prediction's notes must contain it (``NO_NOTES`` means
  there must be no note at all);
* ``expect == "refused"``: the predictor must raise ``ImageInputError`` whose
  message contains ``substring``.

Every file is at most a few hundred kB (the bombs are bombs by what their
headers claim or by what their compressed parts expand to), so the corpus is
quick to write. ``tests/test_hostile_corpus.py`` runs it through
``Predictor.predict``; the HTTP route tests can send the same files through the
running app (``Case.path`` is the file, ``Case.name`` the name the visitor's
browser would send, which for a few hostile names is not a plain file name).

    python tests/hostile_corpus.py OUT_DIR   # write the corpus and list it
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image

CLASSIFIED: Literal["classified"] = "classified"
REFUSED: Literal["refused"] = "refused"
NO_NOTES = ""  # a classified case whose notes must be empty

# What the refusals say (substrings of the messages in cifar_transfer/predictor.py).
EMPTY = "is empty (0 bytes)"
NOT_AN_IMAGE = "is not an image this app can read"
NOT_READ = "a format this app does not read"
DAMAGED = "truncated or corrupt"
BOMB = "decompression bomb"
METADATA = "metadata"
NON_FINITE = "NaN or infinity"
# What the notes say.
FIRST_FRAME = "classified the first of its"
ROTATED = "Rotated upright"
ORIENTATION_IGNORED = "orientation tag has an invalid value"


@dataclass(frozen=True)
class Case:
    name: str  # the file's name as a visitor would send it (may hold odd characters)
    path: Path  # where make_corpus wrote it
    expect: Literal["classified", "refused"]
    substring: str | None  # refusal: part of the message; classified: part of a note (None: not checked)
    why: str  # what the file is


@dataclass(frozen=True)
class Spec:
    name: str  # relative path inside the corpus folder
    make: Callable[[], bytes]
    expect: Literal["classified", "refused"]
    substring: str | None
    why: str


# -- building blocks ---------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def picture(size=(48, 40), mode="RGB") -> Image.Image:
    """A small non-uniform picture (a red/blue split with a gradient) in ``mode``."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, :, 0] = 220
    arr[h // 2 :, :, 2] = 220
    arr[:, :, 1] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    img = Image.fromarray(arr)
    return img if mode == "RGB" else img.convert(mode)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_with_chunks(extra: list[bytes], before_idat: bool = True) -> bytes:
    """A valid small PNG with ``extra`` chunks inserted after IHDR (or before IEND)."""
    data = encode(picture(), "PNG")
    ihdr_end = 8 + 8 + 13 + 4
    iend = data.rindex(b"IEND") - 4
    if before_idat:
        return data[:ihdr_end] + b"".join(extra) + data[ihdr_end:]
    return data[:iend] + b"".join(extra) + data[iend:]


def png_header_claiming(width: int, height: int, bit_depth=1, colour_type=0) -> bytes:
    """A PNG whose IHDR claims ``width x height`` with one tiny IDAT (a pure header bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def zlib_zeros(total: int, step: int = 1 << 20) -> bytes:
    """A zlib stream of ``total`` zero bytes, built by repeating one independently coded block (cheap)."""
    co = zlib.compressobj(9)
    head = co.compress(b"\x00" * step) + co.flush(zlib.Z_FULL_FLUSH)
    block = co.compress(b"\x00" * step) + co.flush(zlib.Z_FULL_FLUSH)  # identical for every further step
    n = max(total // step - 2, 0)
    return head + block * n + co.compress(b"\x00" * step) + co.flush()


def gif_bytes(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A one-pixel GIF whose logical screen and image descriptor claim the given sizes."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return header + descriptor + b"\x02\x02\x44\x01\x00" + b"\x3b"


def tiff_header_claiming(width: int, height: int) -> bytes:
    """A little-endian 8-bit greyscale TIFF whose tags claim ``width x height``, with 64 bytes of strip data."""
    entries = [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
        (273, 4, 1, 0), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 64),
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = ifd_offset + ifd_size
    out = b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, count) + packed
    return out + struct.pack("<I", 0) + b"\x00" * 64


def bmp_header_claiming(width: int, height: int) -> bytes:
    """A 24-bit BMP whose info header claims ``width x height``, with a few bytes of pixels."""
    pixels = b"\x00" * 64
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(pixels), 0, 0, 14 + 40) + info + pixels


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 marker is patched to claim ``width x height``."""
    data = bytearray(encode(picture(), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_vp8x_claiming(width: int, height: int) -> bytes:
    """A WebP extended-format header (VP8X) claiming a ``width x height`` canvas, followed by a tiny VP8L frame."""
    small = encode(picture((4, 4)), "WEBP", lossless=True)  # RIFF....WEBPVP8L...
    vp8l = small[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def float_tiff(fill=None) -> bytes:
    arr = np.tile(np.linspace(0, 1, 48, dtype=np.float32), (40, 1))
    if fill is not None:
        arr[10:20, 10:20] = fill
    return encode(Image.fromarray(arr, mode="F"), "TIFF")


def jpeg_with_orientation(value) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return encode(picture(), "JPEG", quality=90, exif=exif)


def jpeg_with_raw_orientation(kind: int, count: int, inline: bytes) -> bytes:
    """A JPEG whose EXIF holds one orientation entry of TIFF type ``kind`` written by hand (Pillow would refuse)."""
    entry = struct.pack("<HHI", 0x0112, kind, count) + inline.ljust(4, b"\x00")
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0)
    return jpeg_with_app1(b"Exif\x00\x00" + tiff)


def jpeg_with_app1(payload: bytes) -> bytes:
    """A real JPEG with an APP1 segment holding ``payload`` (e.g. malformed EXIF) right after SOI."""
    data = encode(picture(), "JPEG", quality=90)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def animated(fmt: str, **kwargs) -> bytes:
    frames = [picture(), picture().transpose(Image.Transpose.ROTATE_180), Image.new("RGB", (48, 40), (0, 200, 0))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)


def multipage_tiff() -> bytes:
    return encode(picture(), "TIFF", save_all=True, append_images=[picture(mode="L"), picture()])


def tiff_ifd_loop() -> bytes:
    """A valid one-page TIFF whose 'next IFD' offset points back at its own IFD (an endless page chain)."""
    data = bytearray(encode(picture(), "TIFF"))
    first = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[first : first + 2])[0]
    next_at = first + 2 + 12 * count
    data[next_at : next_at + 4] = struct.pack("<I", first)
    return bytes(data)


def palette_alpha_png() -> bytes:
    img = Image.new("P", (48, 40), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (24, 0, 48, 40))
    return encode(img, "PNG", transparency=1)


def palette_alpha_gif() -> bytes:
    img = Image.new("P", (48, 40), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (24, 0, 48, 40))
    return encode(img, "GIF", transparency=1)


def lab_tiff() -> bytes:
    from PIL import ImageCms

    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    return encode(ImageCms.applyTransform(picture(), to_lab), "TIFF")


def minimal_zip(member: str, content: bytes) -> bytes:
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, content)
    return buf.getvalue()


def eps_bytes() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 48 40\n%%EndComments\n"
            b"newpath 0 0 moveto 48 40 lineto stroke\nshowpage\n%%EOF\n")


def psd_header() -> bytes:
    """A Photoshop header (8BPS, version 1, 3 channels, 40x48, 8-bit RGB) with empty sections."""
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 40, 48, 8, 3) + struct.pack(">III", 0, 0, 0) + b"\x00\x00" + b"\x00" * 64


def ico_bytes() -> bytes:
    return encode(picture((32, 32)), "ICO", sizes=[(32, 32)])


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="48" height="40"><rect width="48" height="40" fill="red"/><script>alert(1)</script></svg>\n'
HTML = b"<!DOCTYPE html>\n<html><body><script>alert(document.cookie)</script></body></html>\n"
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HEIC = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic" + b"\x00" * 40


def cut(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


# -- the corpus ----------------------------------------------------------------------------

MEGABYTE_OF_ZEROS = zlib.compress(b"\x00" * 1_000_000, 9)  # just under PngImagePlugin.MAX_TEXT_CHUNK
LONG_NAME = "a" * 200 + "-very-long-name.png"  # 219 bytes: below the usual 255-byte file name limit

SPECS: list[Spec] = [
    # empty and damaged
    Spec("empty.png", lambda: b"", REFUSED, EMPTY, "zero bytes"),
    Spec("empty-no-extension", lambda: b"", REFUSED, EMPTY, "zero bytes, no extension"),
    Spec("signature-only.png", lambda: PNG_SIGNATURE, REFUSED, DAMAGED, "the 8-byte PNG signature and nothing else"),
    Spec("truncated-half.png", lambda: cut(encode(picture((64, 64)), "PNG", compress_level=0)), REFUSED, DAMAGED, "a PNG cut in half"),
    Spec("truncated-half.jpg", lambda: cut(encode(Image.effect_noise((64, 64), 80).convert("RGB"), "JPEG")), REFUSED, DAMAGED, "a JPEG cut in half"),
    Spec("truncated-header.gif", lambda: encode(picture(), "GIF")[:20], REFUSED, DAMAGED, "a GIF cut inside its colour table"),
    Spec("truncated.webp", lambda: cut(encode(picture(), "WEBP")), REFUSED, DAMAGED, "a WebP cut in half"),
    Spec("truncated.tiff", lambda: cut(encode(picture(), "TIFF"), 0.3), REFUSED, DAMAGED, "a TIFF cut before its pixels end"),
    Spec("bad-crc.png", lambda: encode(picture(), "PNG")[:29] + b"\x00\x00\x00\x00" + encode(picture(), "PNG")[33:], REFUSED, DAMAGED, "IHDR with a wrong CRC"),
    Spec("tiff-ifd-loop.tiff", tiff_ifd_loop, CLASSIFIED, None, "a TIFF whose page chain loops back on itself"),
    # bombs: refused from the header, before any large allocation
    Spec("bomb-pixels-100k.png", lambda: png_header_claiming(100_000, 100_000), REFUSED, BOMB, "PNG header claiming 10^10 pixels"),
    Spec("bomb-pixels-warn-zone.png", lambda: png_header_claiming(9_500, 9_500), REFUSED, BOMB, "90 M pixels: above Pillow's limit, below twice it (Pillow only warns)"),
    Spec("bomb-text-chunk.png", lambda: png_with_chunks([png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (4 << 20), 9))]), REFUSED, METADATA, "a zTXt chunk expanding to 4 MB"),
    Spec("bomb-text-chunk-after-idat.png", lambda: png_with_chunks([png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (4 << 20), 9))], before_idat=False), REFUSED, METADATA, "the same chunk after the pixels (read while decoding)"),
    Spec("bomb-text-memory.png", lambda: png_with_chunks([png_chunk(b"zTXt", b"k%d\x00\x00" % i + MEGABYTE_OF_ZEROS) for i in range(70)]), REFUSED, METADATA, "70 zTXt chunks of 1 MB each (above MAX_TEXT_MEMORY)"),
    Spec("bomb-icc-profile.png", lambda: png_with_chunks([png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(b"\x00" * (4 << 20), 9))]), REFUSED, METADATA, "an iCCP colour profile expanding to 4 MB"),
    Spec("bomb-idat-overrun.png", lambda: PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)) + png_chunk(b"IDAT", zlib_zeros(512 << 20)) + png_chunk(b"IEND", b""), CLASSIFIED, None, "a 64x64 PNG whose pixel stream expands to 512 MB (decoding stops when the image is full)"),
    Spec("bomb-gif-screen.gif", lambda: gif_bytes((65535, 65535), (1, 1)), REFUSED, BOMB, "GIF logical screen of 65535x65535 around a 1x1 frame"),
    Spec("bomb-gif-frame.gif", lambda: gif_bytes((1, 1), (60000, 60000)), REFUSED, BOMB, "1x1 GIF screen with a 60000x60000 frame"),
    Spec("bomb-tiff.tiff", lambda: tiff_header_claiming(100_000, 100_000), REFUSED, BOMB, "TIFF tags claiming 10^10 pixels"),
    Spec("bomb-tiff-warn-zone.tiff", lambda: tiff_header_claiming(9_500, 9_500), REFUSED, BOMB, "TIFF tags claiming 90 M pixels"),
    Spec("bomb-bmp.bmp", lambda: bmp_header_claiming(50_000, 50_000), REFUSED, BOMB, "BMP header claiming 2.5 G pixels"),
    Spec("bomb-jpeg.jpg", lambda: jpeg_claiming(65_000, 65_000), REFUSED, BOMB, "JPEG SOF claiming 65000x65000"),
    Spec("bomb-webp.webp", lambda: webp_vp8x_claiming(16_384, 16_384), REFUSED, None, "WebP VP8X canvas of 16384x16384 around a 4x4 frame"),
    Spec("bomb-ppm.ppm", lambda: b"P6\n100000 100000\n255\n" + b"\x00" * 64, REFUSED, "PPM", "PPM header claiming 10^10 pixels: a format never decoded"),
    # odd but valid pixel formats
    Spec("gray16.png", lambda: encode(Image.fromarray(np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (40, 1))), "PNG"), CLASSIFIED, NO_NOTES, "16-bit greyscale PNG"),
    Spec("gray16.tiff", lambda: encode(Image.fromarray(np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (40, 1))), "TIFF"), CLASSIFIED, NO_NOTES, "16-bit greyscale TIFF"),
    Spec("int32.tiff", lambda: encode(Image.fromarray(np.tile(np.linspace(0, 1 << 20, 48).astype(np.int32), (40, 1))), "TIFF"), CLASSIFIED, NO_NOTES, "32-bit integer TIFF"),
    Spec("float.tiff", lambda: float_tiff(), CLASSIFIED, NO_NOTES, "32-bit float TIFF with values in 0..1"),
    Spec("float-nan.tiff", lambda: float_tiff(np.nan), REFUSED, NON_FINITE, "float TIFF with a NaN patch"),
    Spec("float-inf.tiff", lambda: float_tiff(np.inf), REFUSED, NON_FINITE, "float TIFF with a +inf patch"),
    Spec("float-neg-inf.tiff", lambda: float_tiff(-np.inf), REFUSED, NON_FINITE, "float TIFF with a -inf patch"),
    Spec("float-all-nan.tiff", lambda: encode(Image.fromarray(np.full((40, 48), np.nan, np.float32), mode="F"), "TIFF"), REFUSED, NON_FINITE, "float TIFF that is all NaN"),
    Spec("cmyk.jpg", lambda: encode(picture(mode="CMYK"), "JPEG", quality=90), CLASSIFIED, NO_NOTES, "CMYK JPEG"),
    Spec("cmyk.tiff", lambda: encode(picture(mode="CMYK"), "TIFF"), CLASSIFIED, NO_NOTES, "CMYK TIFF"),
    Spec("lab.tiff", lab_tiff, CLASSIFIED, NO_NOTES, "CIE L*a*b* TIFF"),
    Spec("palette-alpha.png", palette_alpha_png, CLASSIFIED, NO_NOTES, "palette PNG with a transparent entry"),
    Spec("palette-alpha.gif", palette_alpha_gif, CLASSIFIED, NO_NOTES, "palette GIF with a transparent entry"),
    Spec("gray-alpha.png", lambda: encode(picture(mode="LA"), "PNG"), CLASSIFIED, NO_NOTES, "greyscale + alpha PNG"),
    Spec("rgba.webp", lambda: encode(picture(mode="RGBA"), "WEBP", lossless=True), CLASSIFIED, NO_NOTES, "RGBA WebP"),
    Spec("bilevel.png", lambda: encode(picture(mode="1"), "PNG"), CLASSIFIED, NO_NOTES, "1-bit PNG"),
    Spec("bilevel.bmp", lambda: encode(picture(mode="1"), "BMP"), CLASSIFIED, NO_NOTES, "1-bit BMP"),
    Spec("one-pixel.png", lambda: encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), CLASSIFIED, NO_NOTES, "a 1x1 image"),
    Spec("sliver.png", lambda: encode(Image.new("RGB", (4000, 1), (200, 100, 0)), "PNG"), CLASSIFIED, NO_NOTES, "4000x1: the centre crop is one pixel"),
    Spec("zero-width.png", lambda: png_header_claiming(0, 16, 8, 0), REFUSED, None, "IHDR with width 0"),
    # animations and pages
    Spec("animated.gif", lambda: animated("GIF"), CLASSIFIED, FIRST_FRAME, "3-frame GIF"),
    Spec("animated.webp", lambda: animated("WEBP"), CLASSIFIED, FIRST_FRAME, "3-frame WebP"),
    Spec("animated.png", lambda: animated("PNG"), CLASSIFIED, FIRST_FRAME, "3-frame APNG"),
    Spec("multipage.tiff", multipage_tiff, CLASSIFIED, FIRST_FRAME, "3-page TIFF"),
    # EXIF orientation, valid and not
    Spec("exif-orientation-1.jpg", lambda: jpeg_with_orientation(1), CLASSIFIED, NO_NOTES, "orientation 1 (as stored)"),
    Spec("exif-orientation-3.jpg", lambda: jpeg_with_orientation(3), CLASSIFIED, ROTATED, "orientation 3 (180 degrees)"),
    Spec("exif-orientation-6.jpg", lambda: jpeg_with_orientation(6), CLASSIFIED, ROTATED, "orientation 6 (90 degrees clockwise)"),
    Spec("exif-orientation-8.jpg", lambda: jpeg_with_orientation(8), CLASSIFIED, ROTATED, "orientation 8"),
    Spec("exif-orientation-0.jpg", lambda: jpeg_with_orientation(0), CLASSIFIED, ORIENTATION_IGNORED, "orientation 0 (out of range)"),
    Spec("exif-orientation-9.jpg", lambda: jpeg_with_orientation(9), CLASSIFIED, ORIENTATION_IGNORED, "orientation 9 (out of range)"),
    Spec("exif-orientation-65535.jpg", lambda: jpeg_with_orientation(65535), CLASSIFIED, ORIENTATION_IGNORED, "orientation 65535 (out of range)"),
    Spec("exif-orientation-pair.jpg", lambda: jpeg_with_raw_orientation(3, 2, struct.pack("<HH", 6, 6)), CLASSIFIED, ROTATED, "orientation stored as two values (Pillow reads the first)"),
    Spec("exif-orientation-text.jpg", lambda: jpeg_with_raw_orientation(2, 2, b"6\x00"), CLASSIFIED, ORIENTATION_IGNORED, "orientation stored as text"),
    Spec("exif-orientation-6.tiff", lambda: encode(picture(), "TIFF", tiffinfo={274: 6}), CLASSIFIED, ROTATED, "TIFF orientation tag 6"),
    Spec("exif-garbage.jpg", lambda: jpeg_with_app1(b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 16), CLASSIFIED, None, "an EXIF segment holding garbage"),
    Spec("exif-bad-offset.jpg", lambda: jpeg_with_app1(b"Exif\x00\x00II*\x00\xff\xff\xff\x7f"), CLASSIFIED, None, "EXIF whose first IFD offset points far past its end"),
    # polyglots: the pixels are what is read; what is appended is ignored
    Spec("polyglot-png-zip.png", lambda: encode(picture(), "PNG") + minimal_zip("evil.txt", b"payload"), CLASSIFIED, NO_NOTES, "PNG with a zip archive appended"),
    Spec("polyglot-png-html.png", lambda: encode(picture(), "PNG") + HTML, CLASSIFIED, NO_NOTES, "PNG with an HTML page appended"),
    Spec("gifar.gif", lambda: encode(picture(), "GIF") + minimal_zip("META-INF/MANIFEST.MF", b"Manifest-Version: 1.0\n"), CLASSIFIED, NO_NOTES, "GIFAR: a GIF that is also a Java archive"),
    Spec("polyglot-jpeg-comment-html.jpg", lambda: encode(picture(), "JPEG", comment=HTML), CLASSIFIED, NO_NOTES, "JPEG with an HTML script in its comment"),
    Spec("html-with-png-magic.png", lambda: PNG_SIGNATURE + HTML, REFUSED, DAMAGED, "PNG signature followed by HTML"),
    # wrong extensions
    Spec("jpeg-named.png", lambda: encode(picture(), "JPEG"), CLASSIFIED, NO_NOTES, "a JPEG called .png"),
    Spec("png-named.txt", lambda: encode(picture(), "PNG"), CLASSIFIED, NO_NOTES, "a PNG called .txt"),
    Spec("html-named.png", lambda: HTML, REFUSED, "an HTML page", "an HTML page called .png"),
    Spec("eps-named.png", eps_bytes, REFUSED, "EPS", "an EPS file called .png (must never reach Ghostscript)"),
    # other formats: named, never decoded
    Spec("drawing.svg", lambda: SVG, REFUSED, "an SVG drawing", "SVG with a script"),
    Spec("figure.eps", eps_bytes, REFUSED, "EPS", "Encapsulated PostScript"),
    Spec("document.pdf", lambda: PDF, REFUSED, "a PDF document", "PDF"),
    Spec("page.html", lambda: HTML, REFUSED, "an HTML page", "HTML"),
    Spec("favicon.ico", ico_bytes, REFUSED, "ICO", "Windows icon"),
    Spec("layers.psd", psd_header, REFUSED, "PSD", "Photoshop document"),
    Spec("photo.heic", lambda: HEIC, REFUSED, "HEIC", "iPhone HEIC header"),
    Spec("picture.jp2", lambda: encode(picture(), "JPEG2000"), REFUSED, "JPEG 2000", "JPEG 2000"),
    Spec("archive.zip", lambda: minimal_zip("a.png", encode(picture(), "PNG")), REFUSED, "a ZIP archive", "a zip holding a PNG"),
    Spec("notes.txt", lambda: b"just some text\n" * 20, REFUSED, NOT_AN_IMAGE, "plain text"),
    Spec("random.bin", lambda: np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8).tobytes(), REFUSED, NOT_AN_IMAGE, "random bytes"),
    # hostile file names (valid images unless said otherwise)
    Spec("ünïcødé 猫 🐱.png", lambda: encode(picture(), "PNG"), CLASSIFIED, NO_NOTES, "unicode name"),
    Spec(LONG_NAME, lambda: encode(picture(), "PNG"), CLASSIFIED, NO_NOTES, "219-character name"),
    Spec("long-" + LONG_NAME, lambda: b"", REFUSED, EMPTY, "long name in a refusal (it is shortened in the message)"),
    Spec("sub/../dot-dot.png", lambda: encode(picture(), "PNG"), CLASSIFIED, NO_NOTES, "a path with ../ in it"),
    Spec("<img src=x onerror=alert(1)>.png", lambda: b"", REFUSED, EMPTY, "HTML in the name of a refused file"),
    Spec("<script>alert(1)<\\script>.png", lambda: encode(picture(), "PNG"), CLASSIFIED, NO_NOTES, "a script tag in the name"),
    Spec("new\nline.png", lambda: b"not an image", REFUSED, NOT_AN_IMAGE, "newline in the name"),
    Spec("'quote\"s; rm -rf ~.png", lambda: b"", REFUSED, EMPTY, "quotes and shell syntax in the name"),
    Spec(".hidden", lambda: encode(picture(), "PNG"), CLASSIFIED, NO_NOTES, "dot file, no extension"),
]


def make_corpus(folder: str | Path) -> list[Case]:
    """Write every file of the corpus under ``folder`` (created); one :class:`Case` each, in order."""
    folder = Path(folder)
    cases = []
    for spec in SPECS:
        path = folder / spec.name  # kept as written: "sub/../x.png" stays un-normalized
        (folder / spec.name).parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(spec.make())
        cases.append(Case(spec.name, path, spec.expect, spec.substring, spec.why))
    return cases


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python tests/hostile_corpus.py OUT_DIR")
    for case in make_corpus(argv[1]):
        print(f"{case.expect:10} {case.path.stat().st_size:>9,} B  {case.name!r}: {case.why}")


if __name__ == "__main__":
    main(sys.argv)
