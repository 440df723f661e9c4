"""Predictor: safe image reading (every kind of bad input) and the batched all-variant prediction."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_transfer.contract import CORRECT_KEY, DEFAULT_DEMO_VARIANTS, WRONG_VARIANTS, variant_contracts
from cifar_transfer.predictor import ImageInputError, VariantError, load_image


def png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kwargs)
    return buf.getvalue()


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def solid(colour, size=(32, 32), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


# -- bad input is refused with a clear message ----------------------------------------------


def test_non_image_file_is_refused(tmp_path):
    path = write(tmp_path, "notes.txt", b"this is not an image\n" * 10)
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(path)


def test_zero_byte_file_is_refused(tmp_path):
    with pytest.raises(ImageInputError, match="empty"):
        load_image(write(tmp_path, "empty.png", b""))
    with pytest.raises(ImageInputError, match="empty"):
        load_image(b"")


def test_missing_input_is_refused(tmp_path):
    with pytest.raises(ImageInputError, match="No image"):
        load_image(None)
    with pytest.raises(ImageInputError, match="does not exist"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused(tmp_path, fmt):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    with pytest.raises(ImageInputError, match="truncated or corrupt|damaged"):
        load_image(write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2]))


def test_decompression_bomb_at_pillows_default_limit_is_refused(tmp_path):
    assert Image.MAX_IMAGE_PIXELS is not None and 10000 * 10000 > Image.MAX_IMAGE_PIXELS
    path = write(tmp_path, "bomb.png", png_bytes(Image.new("1", (10000, 10000))))  # ~12 kB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageInputError, match="decompression bomb"):
        load_image(path)


@pytest.mark.parametrize("side", [40, 50])  # above the limit (Pillow warns), above twice the limit (Pillow raises)
def test_decompression_bomb_is_refused_in_both_of_pillows_zones(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageInputError, match="decompression bomb"):
        load_image(write(tmp_path, "bomb.png", png_bytes(solid((1, 2, 3), (side, side)))))


def test_bad_array_shape_is_refused():
    with pytest.raises(ImageInputError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))


# -- odd but valid images are converted to RGB correctly -----------------------------------


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
    path = write(tmp_path, "gray16.png", png_bytes(Image.fromarray(ramp)))
    assert Image.open(path).mode.startswith("I")
    px = load_image(path)
    assert px.dtype == torch.uint8 and px.shape == (3, 32, 32)
    assert px[0, 0, 0] == 0 and px[0, 0, -1] == 255
    assert 120 <= int(px[0, 0, 16]) <= 136  # mid-grey stays mid-grey (clipping would give 255)
    assert torch.equal(px[0], px[1]) and torch.equal(px[1], px[2])


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    buf = io.BytesIO()
    solid((0, 255, 255, 0), mode="CMYK").save(buf, "JPEG", quality=95)  # pure red in CMYK
    r, g, b = load_image(write(tmp_path, "cmyk.jpg", buf.getvalue())).float().mean(dim=(1, 2)).tolist()
    assert r > 200 and g < 60 and b < 60


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (16, 0, 32, 32))  # right half: palette index 1 (blue), made fully transparent below
    path = write(tmp_path, "palette.png", png_bytes(img, transparency=1))
    assert Image.open(path).mode == "P"
    px = load_image(path)
    assert px[:, :, :16].float().mean(dim=(1, 2)).tolist() == [255, 0, 0]
    assert px[:, :, 16:].float().mean(dim=(1, 2)).tolist() == [255, 255, 255]


def test_rgba_alpha_is_composited_on_white(tmp_path):
    img = solid((0, 0, 0, 0), mode="RGBA")
    px = load_image(write(tmp_path, "clear.png", png_bytes(img)))
    assert px.min() == 255


def test_grayscale_becomes_three_equal_channels(tmp_path):
    px = load_image(write(tmp_path, "gray.png", png_bytes(solid(77, mode="L"))))
    assert px.shape == (3, 32, 32) and set(px.unique().tolist()) == {77}


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 16, 64, 32))  # stored: red on top, blue below
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the top (red) ends up on the right
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif)
    notes = []
    px = load_image(write(tmp_path, "rotated.jpg", buf.getvalue()), notes=notes).float()
    assert px.shape == (3, 32, 32)
    left, right = px[:, :, :12].mean(dim=(1, 2)), px[:, :, 20:].mean(dim=(1, 2))
    assert left[2] > 200 and left[0] < 60, "left half should be blue"
    assert right[0] > 200 and right[2] < 60, "right half should be red"
    assert any("EXIF" in n for n in notes)


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [solid(c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    notes = []
    px = load_image(write(tmp_path, "anim.gif", buf.getvalue()), notes=notes).float().mean(dim=(1, 2))
    assert px[0] > 200 and px[1] < 60 and px[2] < 60
    assert any("3 frames" in n for n in notes)


def test_non_square_and_large_images_are_centre_cropped_and_reduced():
    arr = np.zeros((1000, 3000, 3), dtype=np.uint8)
    arr[:, 1000:2000] = 200  # the centre square
    px = load_image(arr, work_size=96)
    assert px.shape[1] == px.shape[2] and 96 <= px.shape[1] < 192
    assert px.min() == 200


# -- the predictor --------------------------------------------------------------------------


def test_bad_inputs_give_clear_errors_and_the_next_request_works(predictor, example_images, tmp_path):
    bad = [write(tmp_path, "a.txt", b"hello"), write(tmp_path, "b.png", b""), b"\x89PNG\r\n\x1a\n broken"]
    for item in bad:
        with pytest.raises(ImageInputError):
            predictor.predict(item)
    result = predictor.predict(example_images[0])
    assert result.variants[0].key == CORRECT_KEY


def test_unknown_variant_is_refused(predictor, example_images):
    with pytest.raises(VariantError, match="nonsense"):
        predictor.predict(example_images[0], ["bgr", "nonsense"])


def test_prediction_structure_and_order(predictor, example_images, embedded_model):
    _, metrics = embedded_model
    result = predictor.predict(example_images[0], ["bgr", "no_normalization", "raw_0_255"])
    keys = [v.key for v in result.variants]
    assert keys == [CORRECT_KEY, *(k for k in WRONG_VARIANTS if k in DEFAULT_DEMO_VARIANTS)]
    for v in result.variants:
        d = v.to_dict()
        assert set(d) == {"key", "title", "explanation", "label", "confidences", "meter", "accuracy", "input_range", "clipped"}
        assert list(d["confidences"])[0] == d["label"] and set(d["confidences"]) == set(predictor.class_names)
        assert sum(d["confidences"].values()) == pytest.approx(1, abs=1e-4)
        assert d["meter"]["level"] in (("ok", "unusual") if v.key == CORRECT_KEY else ("ok", "drifting", "broken"))
        assert d["accuracy"] == ((metrics or {}).get("accuracy") or {}).get(v.key)
        assert v.seen.shape == (predictor.contract.input_size, predictor.contract.input_size, 3)
        assert v.seen.dtype == np.uint8


def test_one_batched_pass_matches_the_model_called_per_variant(predictor, example_images, embedded_model):
    model, _ = embedded_model
    pixels = load_image(example_images[1])
    result = predictor.predict_pixels(pixels, [CORRECT_KEY, *WRONG_VARIANTS])
    contracts = variant_contracts(model.contract, list(WRONG_VARIANTS))
    with torch.inference_mode():
        for v in result.variants:
            direct = model.classify(pixels.unsqueeze(0), contracts[v.key]).softmax(1)[0]
            got = torch.tensor([v.confidences[c] for c in predictor.class_names])
            assert torch.allclose(got, direct, atol=1e-3), v.key


def test_repeated_inputs_are_computed_once_with_the_same_results(predictor, example_images, monkeypatch):
    """Under the [-1, 1] contract the BGR panel's input is exactly the correct panel's channel-swapped twin: the
    all-variants batch of 7 inputs + the correct panel's twin (the meter reads every other panel against the correct
    one) goes through the network as 7 rows, and every panel's probabilities and meter reading equal those of the
    batch computed in full."""
    from cifar_transfer import predictor as predictor_mod

    pixels = load_image(example_images[3])
    keys = [CORRECT_KEY, *WRONG_VARIANTS]
    engine, rows = predictor.engine, []

    def counting(batch):
        rows.append(len(batch))
        return engine(batch)

    monkeypatch.setattr(predictor, "engine", counting)
    deduped = predictor.predict_pixels(pixels, keys)
    monkeypatch.setattr(predictor_mod, "distinct_rows", lambda b: (b, torch.arange(len(b))))
    full = predictor.predict_pixels(pixels, keys)
    assert rows == [len(keys), len(keys) + 1]
    for a, b in zip(deduped.variants, full.variants):
        assert a.confidences == b.confidences and a.meter.to_dict() == b.meter.to_dict(), a.key


def test_distinct_rows_only_merges_exact_repeats():
    from cifar_transfer.predictor import distinct_rows

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4, generator=g)
    near = a.clone()
    near[2, 3, 3] += 1e-6  # same sums to float precision, not the same input
    swapped = a.flip(0)  # same sum, different order
    batch = torch.stack([a, b, a, near, swapped, b])
    unique, inverse = distinct_rows(batch)
    assert len(unique) == 4 and torch.equal(unique[inverse], batch)
    assert inverse.tolist() == [0, 1, 0, 2, 3, 1]
    same, order = distinct_rows(batch[:2])
    assert same is not None and torch.equal(same, batch[:2]) and order.tolist() == [0, 1]


def test_meter_separates_correct_from_raw_pixels(predictor, example_images):
    result = {v.key: v for v in predictor.predict(example_images[2], ["raw_0_255"]).variants}
    assert result[CORRECT_KEY].meter.level != "broken"
    assert result["raw_0_255"].meter.level == "broken"
    assert result["raw_0_255"].meter.divergence > 100 * result[CORRECT_KEY].meter.divergence
    assert result["raw_0_255"].seen.min() == 255  # the network sees a blown-out picture


def test_correct_panel_shows_the_image_itself(predictor, example_images):
    pixels = load_image(example_images[3])
    seen = predictor.predict_pixels(pixels, [CORRECT_KEY]).variants[0].seen
    resized = predictor.transforms[CORRECT_KEY].resize(pixels[None].float())[0].permute(1, 2, 0).numpy()
    assert np.abs(seen.astype(float) - resized).max() <= 1.5


def test_warning_fires_for_raw_pixels_fed_as_normalized(predictor, example_images, caplog):
    pixels = torch.stack([load_image(p) for p in example_images[:4]])
    raw = torch.nn.functional.interpolate(pixels.float(), size=predictor.contract.input_size, mode="bilinear")
    with caplog.at_level(logging.WARNING, logger="cifar_transfer.predictor"):
        meter = predictor.check_normalized(raw)  # 0-255 values where normalized ones belong
    assert meter.level == "broken"
    assert any("outside the model's contract" in r.getMessage() for r in caplog.records)


def test_warning_stays_silent_for_correctly_normalized_input(predictor, example_images, caplog):
    pixels = torch.stack([load_image(p) for p in example_images[:4]])
    with caplog.at_level(logging.WARNING, logger="cifar_transfer.predictor"):
        meter = predictor.check_normalized(predictor.transforms[CORRECT_KEY](pixels))
        result = predictor.predict(example_images[0])
    assert meter.level != "broken" and result.warning is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_each_panel_reports_the_values_it_fed_and_how_many_the_picture_clips(predictor, example_images):
    result = predictor.predict(example_images[0], list(WRONG_VARIANTS))
    by_key = {v.key: v for v in result.variants}
    lo, hi = predictor.contract.value_range()
    correct = by_key[CORRECT_KEY]
    assert lo - 1e-4 <= correct.input_range[0] < correct.input_range[1] <= hi + 1e-4 and correct.clipped == 0
    raw = by_key["raw_0_255"]
    assert raw.input_range[1] > 100 * hi and raw.clipped > 0.5  # raw 0-255 values: far outside, shown clipped
    assert by_key["no_normalization"].input_range[0] >= 0 and by_key["no_normalization"].clipped == 0


def test_an_unusual_picture_reads_unusual_on_its_correct_panel_and_its_mistakes_stay_flagged(predictor):
    """A flat red picture is unlike any CIFAR-10 training image: read alone, its correct panel would be "drifting".
    In the app that panel is the reference: "unusual", in words that blame the picture, not the preprocessing;
    the wrong panels, read against it, are still flagged."""
    red = np.full((64, 64, 3), (200, 30, 30), dtype=np.uint8)
    result = predictor.predict(red, list(WRONG_VARIANTS))
    meters = {v.key: v.meter for v in result.variants}
    correct = meters[CORRECT_KEY]
    assert predictor.calibration.reading(correct.divergence, correct.channel_order).level == "drifting"  # alone
    assert correct.level == "unusual" and "not its preprocessing" in correct.words
    assert "Outside the contract" not in correct.words and result.warning is None
    for key in ("no_normalization", "raw_0_255", "other_model_stats", "cifar10_stats", "normalized_twice"):
        assert meters[key].level in ("drifting", "broken"), (key, meters[key].words)


def test_a_picture_far_from_the_training_images_warns_about_the_picture(predictor, caplog):
    from cifar_transfer.meter import COLOURS, MeterReading

    far = predictor.calibration.thresholds["broken"] + 1
    with caplog.at_level(logging.WARNING, logger="cifar_transfer.predictor"):
        message = predictor._warning(MeterReading(far, "unusual", COLOURS["unusual"], "x"), "the correct contract")
        assert predictor._warning(MeterReading(far - 2, "unusual", COLOURS["unusual"], "x"), "the correct contract") is None
    assert message.startswith("This picture is far from anything the model was trained on") and "contract" in message
    assert "outside the model's contract" not in message and [r.getMessage() for r in caplog.records] == [message]
