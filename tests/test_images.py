"""One image pipeline (issue 10): the dataset, the app and the doctor read a file to the same network input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_transfer import doctor
from cifar_transfer.contract import CORRECT_KEY, MINUS_ONE_ONE
from cifar_transfer.data import BatchLoader, _decode, load_dataset
from cifar_transfer.images import (ImageInputError, decode, pixel_side, read_pixels, read_square, resize_side,
                                   square_pixels)


def awkward_png() -> bytes:
    """48x30 RGBA PNG: a transparent left third, red top / blue bottom, and an EXIF orientation (6: rotate 90 CW)."""
    arr = np.zeros((30, 48, 4), dtype=np.uint8)
    arr[:15, :, :] = (220, 20, 20, 255)
    arr[15:, :, :] = (20, 20, 220, 255)
    arr[:, :16, :] = (0, 160, 0, 0)  # fully transparent, with a colour under it that must not show
    arr[:, 16:24, 3] = 128  # half transparent
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG", exif=exif)
    return buf.getvalue()


@pytest.fixture
def folder_dataset(tmp_path):
    """train/ and test/ with classes a (the awkward PNG) and b (a plain 32x32 JPEG)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        (tmp_path / split / "b").mkdir(parents=True)
        (tmp_path / split / "a" / "awkward.png").write_bytes(awkward_png())
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / split / "b" / "plain.jpg")
    return tmp_path


def test_decode_applies_exif_and_composites_alpha_on_white():
    notes = []
    px = decode(awkward_png(), notes)
    assert px.shape == (48, 30, 3) and px.dtype == np.uint8  # rotated upright: 30 wide, 48 tall
    assert (px[:16] == 255).all()  # the transparent third (now on top) is white, not the green under it
    assert (px[30:, :12] == (20, 20, 220)).all() and (px[30:, 18:] == (220, 20, 20)).all()  # blue left, red right
    assert any("EXIF" in n for n in notes)


def test_dataset_and_app_give_the_same_network_input(folder_dataset, predictor):
    """A non-square RGBA PNG with an EXIF orientation: the dataset loader (no augmentation) + the model's transform
    gives exactly what the app's Predictor feeds the network for the same file."""
    path = folder_dataset / "test" / "a" / "awkward.png"
    assert predictor.image_size == 32  # the shipped checkpoint was trained on 32x32 images
    app_input = predictor.network_input(predictor.read(str(path)), [CORRECT_KEY])
    assert app_input.shape == (1, 3, predictor.contract.input_size, predictor.contract.input_size)
    for contract in (None, predictor.contract):  # without a contract the default policy is the same (centre, bilinear)
        ds = load_dataset(folder_dataset, image_size=predictor.image_size, contract=contract)
        images, labels = next(iter(BatchLoader(ds.test, batch_size=len(ds.test), augment=False)))
        dataset_input = predictor.model.contract.transform()(images[labels == 0])
        assert torch.equal(dataset_input, app_input)
    # not equal by accident: the white (transparent) top and the red/blue halves are what the network sees
    seen = predictor.predict_pixels(predictor.read(path.read_bytes()), [CORRECT_KEY]).variants[0].seen
    assert seen[:12].min() >= 250 and seen[-20:, :30, 2].min() > 180 and seen[-20:, -30:, 0].min() > 180


def test_doctor_reads_the_same_pixels_as_the_dataset_and_the_app(folder_dataset, predictor):
    side = predictor.image_size
    ds = load_dataset(folder_dataset, image_size=side)
    files = [folder_dataset / "train" / "a" / "awkward.png", folder_dataset / "train" / "b" / "plain.jpg"]
    got = doctor.load_images(folder_dataset / "train", side, contract=predictor.contract)
    assert torch.equal(got, ds.train.images)
    assert torch.equal(got, torch.stack([predictor.read(p) for p in files]))


def test_a_square_image_of_the_stored_size_is_kept_exactly_as_decoded(tmp_path):
    """CIFAR-10's case: a 32x32 RGB JPEG is stored as PIL decodes it, with no resampling (nothing changed there)."""
    rng = np.random.default_rng(1)
    path = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path, quality=90)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(_decode(path, 32).permute(1, 2, 0).numpy(), expected)
    assert np.array_equal(read_square(path.read_bytes(), 32).permute(1, 2, 0).numpy(), expected)


@pytest.mark.shared_data
def test_cifar10_jpegs_decode_as_before(shared_data):
    """The old loader (PIL open + convert("RGB"), no resize at 32 px) and the pipeline agree on CIFAR-10 JPEGs."""
    files = [p for c in sorted((shared_data / "test").iterdir()) for p in sorted(c.iterdir())[:20]]
    for p in files:
        with Image.open(p) as im:
            assert np.array_equal(_decode(p, 32).permute(1, 2, 0).numpy(), np.asarray(im.convert("RGB"))), p


def test_the_square_step_is_the_contracts_resize_policy():
    arr = np.tile(np.arange(64, dtype=np.uint8), (32, 1))[..., None].repeat(3, axis=2)  # 32 x 64, columns 0..63
    centre = square_pixels(arr, 32, MINUS_ONE_ONE)  # shorter side already 32: the middle 32 columns, no resampling
    assert centre[0, 0].tolist() == list(range(16, 48))
    squash = square_pixels(arr, 32, MINUS_ONE_ONE.replace(crop_mode="squash", interpolation="nearest"))
    assert squash[0, 0].tolist() == list(range(0, 64, 2))
    cropped = MINUS_ONE_ONE.replace(crop_pct=0.5)  # crop_pct is the network-size step's, not the stored square's
    assert torch.equal(square_pixels(arr, 32, cropped), centre)


def test_pixel_side_is_the_training_image_size_when_recorded():
    assert pixel_side(MINUS_ONE_ONE, {"train_config": {"image_size": 32}}) == 32
    assert pixel_side(MINUS_ONE_ONE, {"train_config": {}}) is None and pixel_side(MINUS_ONE_ONE) is None
    assert resize_side(MINUS_ONE_ONE.replace(input_size=224, crop_pct=0.875)) == 256


def test_without_a_training_size_the_contract_transform_does_all_the_geometry():
    """Another project's timm classifier: the decoded picture, then exactly the contract's transform (timm-like)."""
    contract = MINUS_ONE_ONE.replace(input_size=24, crop_pct=0.875, interpolation="bicubic")
    png = awkward_png()
    pixels = read_pixels(png, contract)
    assert pixels.shape == (3, 48, 30) and torch.equal(pixels, torch.from_numpy(decode(png)).permute(2, 0, 1))
    assert torch.equal(read_pixels(png, contract, 32), read_square(png, 32, contract))


def test_a_huge_picture_is_reduced_the_same_way_on_every_path(tmp_path, predictor):
    arr = np.random.default_rng(2).integers(0, 256, (1000, 1500, 3), dtype=np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(arr).save(path)
    assert decode(path, reduce_to=128).shape == (143, 215, 3)  # box-reduced by 7: the shorter side stays >= 128
    via_app = predictor.read(path)
    assert via_app.shape == (3, 32, 32)
    assert torch.equal(via_app, _decode(path, 32)) and torch.equal(via_app, read_square(arr, 32))


# -- formats and sample values a visitor sends (issue 21) --------------------------------------------------------


def _tga(mode: str, rle: bool, footer: bool) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (20, 10), 5).save(buf, "TGA", compression="tga_rle" if rle else None)
    data = buf.getvalue()
    assert data.endswith(b"TRUEVISION-XFILE.\x00")
    return data if footer else data[:-26]  # TGA 1.0: no extension/developer offsets nor signature


@pytest.mark.parametrize("mode, rle, footer", [("RGB", False, True), ("RGB", False, False), ("RGBA", True, True),
                                               ("L", False, False), ("P", False, True), ("P", True, False)])
def test_a_tga_file_is_named_tga_not_a_windows_cursor(tmp_path, predictor, mode, rle, footer):
    """An uncompressed true-colour TGA starts 00 00 02 00, a Windows cursor's signature; TGA has no magic number."""
    path = tmp_path / "picture.tga"
    path.write_bytes(_tga(mode, rle, footer))
    with pytest.raises(ImageInputError, match=r"^The file 'picture\.tga' is a TGA \(Targa\) image, a format this app "
                                              r"does not read\. Please use a PNG"):
        predictor.predict(path, [])


def test_a_tga_header_without_its_pixels_names_no_format():
    """An uncompressed 1000x1000 true-colour TGA header followed by 22 bytes is no TGA: nothing is named after it."""
    header = bytes([0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + (1000).to_bytes(2, "little") * 2 + bytes([24, 0])
    with pytest.raises(ImageInputError, match=r"^The uploaded data is not an image this app can read\."):
        decode(header + b"\x07" * 22)


def test_icons_and_cursors_are_still_named_as_such():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "ICO")
    icon = buf.getvalue()
    cursor = icon[:2] + b"\x02" + icon[3:]  # the same directory, resource type 2: a cursor
    with pytest.raises(ImageInputError, match=r"a Windows icon \(ICO\) file"):
        decode(icon)
    with pytest.raises(ImageInputError, match=r"a Windows cursor \(CUR\) file"):
        decode(cursor)


def signed_tiff(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.int32)).save(buf, "TIFF")
    return buf.getvalue()


def test_negative_samples_of_an_int32_tiff_are_stretched_from_black_to_white_with_a_note(tmp_path, predictor):
    """Not clipped to black without a word: -1000..1000 spans black..white, as an image viewer shows it."""
    ramp = np.tile(np.linspace(-1000, 1000, 51), (8, 1))
    notes: list[str] = []
    grey = decode(signed_tiff(ramp), notes)[0, :, 0].astype(int)
    assert grey[0] == 0 and grey[-1] == 255 and abs(grey[25] - 128) <= 1
    assert np.all(np.diff(grey) > 0)  # every step of the ramp, the negative half included, stays visible
    assert notes == ["The image holds negative pixel values (-1000 to 1000), which no image scale gives a colour: "
                     "its range was stretched from black (lowest) to white (highest)."]
    path = tmp_path / "signed.tiff"
    path.write_bytes(signed_tiff(ramp))
    assert predictor.predict(path, []).notes == notes  # what the app shows a visitor


def test_non_negative_int32_samples_keep_their_scale_and_get_no_note():
    notes: list[str] = []
    grey = decode(signed_tiff(np.tile(np.linspace(0, 1000, 51), (8, 1))), notes)[0, :, 0]
    assert notes == [] and grey[0] == 0 and grey[-1] == round(1000 / 257)  # 16-bit range: 1000 is dark, as before
