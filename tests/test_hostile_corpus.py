"""The hostile-file corpus (tests/hostile_corpus.py) through Predictor.predict, and the decoding fixes behind it (issue 9)."""

from __future__ import annotations

import io
import unicodedata

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

from cifar_transfer.contract import CORRECT_KEY
from cifar_transfer.predictor import ImageInputError, load_image

from .hostile_corpus import (BOMB, CLASSIFIED, LONG_NAME, METADATA, NO_NOTES, NON_FINITE, NOT_READ, ORIENTATION_IGNORED,
                             REFUSED, ROTATED, SPECS, encode, float_tiff, jpeg_with_orientation, jpeg_with_raw_orientation,
                             make_corpus, picture)

# Pillow's own wording, which a visitor must never see.
INTERNALS = ("PngImagePlugin", "MAX_TEXT", "Ghostscript", "decoder", "not processed", "cannot identify", "Traceback",
             "Errno", "struct", "TiffImagePlugin")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return folder, {case.name: case for case in make_corpus(folder)}


def visible_text_is_plain(text: str, folder) -> None:
    assert str(folder) not in text and "/tmp" not in text, text
    assert not any(unicodedata.category(ch) == "Cc" for ch in text), repr(text)  # no newline or other control character
    assert not any(word in text for word in INTERNALS), text
    assert len(text) < 300, text


def test_the_corpus_is_large_and_has_both_outcomes(corpus):
    _, cases = corpus
    assert len(cases) == len(SPECS) >= 40
    assert sum(c.expect == REFUSED for c in cases.values()) >= 20
    assert sum(c.expect == CLASSIFIED for c in cases.values()) >= 20
    assert all(c.path.is_file() for c in cases.values())


@pytest.mark.parametrize("name", [s.name for s in SPECS], ids=[repr(s.name)[1:-1][:40] for s in SPECS])
def test_each_corpus_file_gives_its_expected_outcome_and_the_next_request_works(predictor, example_images, corpus, name):
    folder, cases = corpus
    case = cases[name]
    if case.expect == CLASSIFIED:
        result = predictor.predict(case.path, [])  # any exception fails the test; [] = the correct contract only
        assert result.variants[0].label in predictor.class_names
        if case.substring == NO_NOTES:
            assert result.notes == []
        elif case.substring is not None:
            assert any(case.substring in note for note in result.notes), result.notes
        for note in result.notes:
            visible_text_is_plain(note, folder)
    else:
        with pytest.raises(ImageInputError) as refused:  # anything else than ImageInputError fails the test
            predictor.predict(case.path, [])
        message = str(refused.value)
        assert case.substring is None or case.substring in message, message
        visible_text_is_plain(message, folder)
    after = predictor.predict(example_images[0], [])
    assert after.variants[0].key == CORRECT_KEY and after.notes == []


def test_bytes_of_each_refused_file_are_refused_the_same_way(corpus):
    """The pasted-data path (bytes) reads the same way as the upload path."""
    folder, cases = corpus
    for case in cases.values():
        if case.expect == REFUSED and case.substring not in (None, "is empty (0 bytes)"):
            with pytest.raises(ImageInputError, match=case.substring.replace("(", r"\(").replace(")", r"\)")):
                load_image(case.path.read_bytes())


# -- the specific findings ------------------------------------------------------------------------


def test_eps_is_never_parsed_let_alone_given_to_ghostscript(corpus, monkeypatch):
    calls = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: calls.append("open"))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append("gs"))
    _, cases = corpus
    for name in ("figure.eps", "eps-named.png"):
        with pytest.raises(ImageInputError, match=f"is an EPS \\(PostScript\\) file, {NOT_READ}"):
            load_image(cases[name].path)
    assert calls == []


@pytest.mark.parametrize("name, fmt", [("favicon.ico", "ICO"), ("picture.jp2", "JPEG 2000"), ("layers.psd", "PSD"),
                                       ("bomb-ppm.ppm", "PPM"), ("document.pdf", "PDF"), ("drawing.svg", "SVG")])
def test_other_formats_are_named_and_refused_even_when_pillow_could_decode_them(corpus, name, fmt):
    _, cases = corpus
    with pytest.raises(ImageInputError) as refused:
        load_image(cases[name].path)
    assert fmt in str(refused.value) and NOT_READ in str(refused.value) and "corrupt" not in str(refused.value)


@pytest.mark.parametrize("name", ["bomb-text-chunk.png", "bomb-text-chunk-after-idat.png", "bomb-text-memory.png",
                                  "bomb-icc-profile.png"])
def test_oversized_png_metadata_gets_a_plain_message(corpus, name):
    _, cases = corpus
    with pytest.raises(ImageInputError) as refused:
        load_image(cases[name].path)
    assert str(refused.value).startswith("The image's embedded metadata") and METADATA in str(refused.value)
    assert "MAX_TEXT" not in str(refused.value) and "Decompressed" not in str(refused.value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_float_pixels_are_refused_not_turned_black(value):
    with pytest.raises(ImageInputError, match=NON_FINITE):
        load_image(float_tiff(value))
    arr = np.full((16, 16, 3), 0.5)
    arr[3, 4, 1] = value
    with pytest.raises(ImageInputError, match=NON_FINITE):
        load_image(arr)


def test_finite_float_tiff_is_scaled_as_fractions():
    px = load_image(float_tiff()).float()  # a 0..1 ramp left to right
    assert px[:, :, 0].max() < 30 and px[:, :, -1].min() > 225
    assert torch.equal(px[0], px[1]) and torch.equal(px[1], px[2])


@pytest.mark.parametrize("value", [0, 9, 65535])
def test_out_of_range_exif_orientation_is_ignored_and_said_so(value):
    stored = load_image(encode(picture(), "JPEG", quality=90))
    notes = []
    px = load_image(jpeg_with_orientation(value), notes=notes)
    assert torch.equal(px, stored)  # pixels as stored, not rotated or flipped
    assert len(notes) == 1 and ORIENTATION_IGNORED in notes[0] and f"({value})" in notes[0]
    assert not any(ROTATED in n for n in notes)


def test_orientation_stored_as_text_is_ignored_and_said_so():
    notes = []
    px = load_image(jpeg_with_raw_orientation(2, 2, b"6\x00"), notes=notes)
    assert torch.equal(px, load_image(encode(picture(), "JPEG", quality=90)))
    assert len(notes) == 1 and ORIENTATION_IGNORED in notes[0]


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_valid_orientation_rotates_and_says_so(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored = load_image(encode(picture(), fmt))
    notes = []
    px = load_image(encode(picture(), fmt, exif=exif), notes=notes)
    assert torch.equal(px, torch.rot90(stored, k=-1, dims=(1, 2)))
    assert notes == ["Rotated upright as its EXIF orientation tag says."]


def test_pixel_limit_is_checked_before_pixels_are_allocated(corpus, monkeypatch):
    """The bombs are refused from their headers: decoding is never started."""
    started = []
    monkeypatch.setattr(Image.Image, "load", lambda self: started.append(self.format))
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: started.append(self.format))
    _, cases = corpus
    for name in ("bomb-pixels-100k.png", "bomb-pixels-warn-zone.png", "bomb-gif-screen.gif", "bomb-gif-frame.gif",
                 "bomb-tiff.tiff", "bomb-tiff-warn-zone.tiff", "bomb-bmp.bmp", "bomb-jpeg.jpg"):
        with pytest.raises(ImageInputError, match=BOMB):
            load_image(cases[name].path)
    assert started == []


def test_hostile_names_are_quoted_short_and_on_one_line(corpus):
    folder, cases = corpus
    with pytest.raises(ImageInputError) as refused:
        load_image(cases["long-" + LONG_NAME].path)
    assert LONG_NAME not in str(refused.value) and "…" in str(refused.value)
    with pytest.raises(ImageInputError) as refused:
        load_image(cases["new\nline.png"].path)
    assert "'new\\nline.png'" in str(refused.value)
    visible_text_is_plain(str(refused.value), folder)


def test_decoding_errors_from_any_exception_type_become_plain_refusals(monkeypatch, example_images):
    """A decoder that raises something unexpected (here IndexError) is still a refusal, not a crash."""
    from PIL import ImageFile

    def broken(self):
        raise IndexError("list index out of range in some plugin")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    with pytest.raises(ImageInputError, match="truncated or corrupt") as refused:
        load_image(example_images[0])
    assert "index" not in str(refused.value)


def test_a_pil_image_with_nan_is_refused_too():
    img = Image.fromarray(np.full((8, 8), np.nan, np.float32), mode="F")
    with pytest.raises(ImageInputError, match=NON_FINITE):
        load_image(img)


def test_png_with_trailing_archive_reads_the_same_pixels_as_without(corpus):
    clean = load_image(io.BytesIO(encode(picture(), "PNG")).getvalue())
    _, cases = corpus
    assert torch.equal(load_image(cases["polyglot-png-zip.png"].path), clean)
    assert torch.equal(load_image(cases["polyglot-png-html.png"].path), clean)
