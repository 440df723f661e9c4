"""The calibrated contract meter and the doctor built on it (issue 11).

Uses the shipped checkpoint, its ``meter_calibration.json`` and the eight shipped example images (CIFAR-10 test
images, never used for calibration), no ``../shared``. Each test names the part of the calibration it guards:
break the file (a threshold, the layer list, a direction, the fingerprint) and one of these goes red.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cifar_transfer import doctor, meter, meter_fit
from cifar_transfer.contract import CORRECT_KEY, WRONG_VARIANTS, variant_contracts
from cifar_transfer.predictor import Predictor, load_image

from .conftest import APP_CHECKPOINT, EXAMPLES

COSTLY = ("no_normalization", "raw_0_255", "other_model_stats", "cifar10_stats", "normalized_twice")  # bgr: channel check


@pytest.fixture(scope="module")
def calibration(embedded_model):
    return meter.MeterCalibration.load(APP_CHECKPOINT / meter.CALIBRATION_FILE)


@pytest.fixture(scope="module")
def example_pixels():
    paths = sorted(p for p in EXAMPLES.iterdir() if p.suffix == ".png")
    assert len(paths) == 8
    return torch.stack([load_image(p) for p in paths])


@pytest.fixture(scope="module")
def example_scores(embedded_model, calibration, example_pixels):
    """Per variant: calibrated scores of the 8 examples (inputs as the Predictor builds them, twin in the same pass)."""
    model, _ = embedded_model
    contracts = variant_contracts(model.contract, list(WRONG_VARIANTS))
    base = contracts[CORRECT_KEY].transform().resize(example_pixels.float())
    out = {}
    for key, c in contracts.items():
        f, twin = meter.meter_features(model, c.transform()(base), calibration.layers)
        out[key] = calibration.scores(f, twin)
    return out


def test_shipped_calibration_is_keyed_to_the_checkpoint_and_reads_every_batchnorm_layer(embedded_model, calibration):
    model, _ = embedded_model
    calibration.check(model)
    layers = meter.batchnorm_layers(model)
    assert calibration.layers == list(range(len(layers)))  # the layer choice: all of them, in module order
    assert calibration.layer_names == [name for name, _ in layers]
    assert all(len(d) == len(meter.FEATURES) * len(layers) for d in calibration.directions)
    assert calibration.mistakes == list(meter_fit.MISTAKES)
    assert "train split" in calibration.derivation["images"]  # calibrated on training images only


def test_thresholds_follow_their_recorded_derivation(calibration):
    t, d, m = calibration.thresholds, calibration.derivation, calibration.measured
    assert 0 < t["drifting"] < t["broken"] and t["channel"] < 0
    # each per-mistake score is standardized (mean 0, std 1) on held-out correct images and the meter takes the
    # largest of them, so the score's drifting_quantile cannot sit below one Gaussian score's (2.05 for 0.98)
    gaussian = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(d["drifting_quantile"])).item()
    assert t["drifting"] >= gaussian
    # held-out correct images: the recorded false-alarm shares are what the quantiles promise
    assert m[CORRECT_KEY]["score_flag_rate"] == pytest.approx(1 - d["drifting_quantile"], abs=0.01)
    assert m[CORRECT_KEY]["channel_flag_rate"] == pytest.approx(d["channel_quantile"], abs=0.01)
    assert m[CORRECT_KEY]["flag_rate"] <= 0.05
    for key in COSTLY:
        assert m[key]["flag_rate"] >= 0.8, key
    assert m["bgr"]["flag_rate"] >= 0.6  # best effort: the paired channel check


def test_meter_passes_correct_examples_and_flags_every_costly_mistake(calibration, example_scores):
    t = calibration.thresholds
    correct = example_scores[CORRECT_KEY]
    assert (correct.score <= t["drifting"]).sum() >= 7  # at most one false alarm in 8
    assert (correct.channel >= t["channel"]).sum() >= 7
    for key in COSTLY:
        assert (example_scores[key].score > t["drifting"]).sum() >= 7, key
    assert (example_scores["raw_0_255"].score > t["broken"]).all()
    assert not (example_scores["no_normalization"].score > t["broken"]).any()  # subtle, not "broken"
    # channel order: invisible to the single-input score, seen by the paired check on a batch
    assert (example_scores["bgr"].score <= t["drifting"]).sum() >= 7
    assert calibration.batch_scores(example_scores["bgr"])[1] < t["channel"] < calibration.batch_scores(correct)[1]


def test_a_threshold_moved_by_a_third_breaks_the_examples(calibration, example_scores):
    """The thresholds sit where one third either way changes what the meter says on these 8 images."""
    correct_max = example_scores[CORRECT_KEY].score.max().item()
    subtle_min = min(example_scores[k].score.median().item() for k in ("other_model_stats", "cifar10_stats", "no_normalization"))
    assert correct_max < calibration.thresholds["drifting"] * 1.5 and subtle_min > calibration.thresholds["drifting"] / 1.5


def test_calibration_for_other_weights_is_refused(embedded_model, calibration, tmp_path):
    model, metrics = embedded_model
    other = copy.deepcopy(calibration)
    other.fingerprint = dict(other.fingerprint, running_stats_sha256="0" * 64)
    with pytest.raises(meter.CalibrationError, match="other weights"):
        other.check(model)
    fewer = copy.deepcopy(calibration)
    fewer.fingerprint = dict(fewer.fingerprint, batchnorm_layers=fewer.fingerprint["batchnorm_layers"] - 1)
    with pytest.raises(meter.CalibrationError, match="number of batch-norm layers"):
        fewer.check(model)
    broken = json.loads((APP_CHECKPOINT / meter.CALIBRATION_FILE).read_text())
    broken["layers"] = broken["layers"][1:]
    (tmp_path / meter.CALIBRATION_FILE).write_text(json.dumps(broken))
    with pytest.raises(meter.CalibrationError, match="do not match"):
        meter.MeterCalibration.load(tmp_path)
    with pytest.raises(meter.CalibrationError, match="no meter calibration"):
        meter.MeterCalibration.load(tmp_path / "missing")
    # the Predictor then says it cannot judge instead of "ok"
    p = Predictor(model, metrics, channels_last=False, calibration=other)
    assert p.calibration is None and "other weights" in p.calibration_problem
    pixels = load_image(sorted(EXAMPLES.glob("*.png"))[0])
    reading = p.predict_pixels(pixels, [CORRECT_KEY, "bgr"]).variants[1].meter
    assert reading.level == "unknown" and "Cannot judge" in reading.words


def test_predictor_panels_carry_the_calibrated_reading_and_its_reliability(predictor, calibration, example_pixels):
    assert predictor.calibration is not None
    result = predictor.predict_pixels(example_pixels[0], [CORRECT_KEY, *WRONG_VARIANTS])
    by_key = {v.key: v.meter for v in result.variants}
    assert by_key["raw_0_255"].level == "broken"
    for key, m in by_key.items():
        d = m.to_dict()
        assert {"divergence", "level", "colour", "words", "reliability"} <= set(d)
        assert d["reliability"]["flag_rate"] == calibration.measured[key]["flag_rate"]
        # the correct panel is the reference (its own channel check); every other panel is read against it
        assert ("channel_order" in d) == (key == CORRECT_KEY) and ("shift" in d) == (key != CORRECT_KEY), key
    assert "channel-swapped input" in by_key["bgr"].reliability["words"]
    assert "never calls it drifting or broken" in by_key[CORRECT_KEY].reliability["words"]
    assert by_key[CORRECT_KEY].level == "ok" and "The reference" in by_key[CORRECT_KEY].words


def test_check_batch_on_a_users_pipeline(embedded_model, example_pixels):
    model, _ = embedded_model
    contracts = variant_contracts(model.contract, list(WRONG_VARIANTS))
    x = contracts[CORRECT_KEY].transform()(example_pixels.float())
    good = doctor.check_batch(model, x)
    assert good.calibrated and good.level == "ok" and good.channel_order > 0
    for key in (*COSTLY, "bgr"):
        bad = doctor.check_batch(model, contracts[key].transform()(example_pixels.float()))
        assert bad.level in ("drifting", "broken"), key
    assert "swapped" in doctor.check_batch(model, contracts["bgr"].transform()(example_pixels.float())).words


def test_doctor_ranks_the_contract_first_on_eight_examples_and_asks_for_more_on_three(embedded_model, example_pixels):
    model, _ = embedded_model
    report = doctor.diagnose(model, example_pixels)
    assert report.calibrated and report.best.name == "minus_one_one"
    # every mistake but the channel order separated (8 pictures cannot settle that, issue 20)
    assert report.agrees_with_declared is True and [s.name for s in report.unresolved] in (["minus_one_one"], ["minus_one_one", "bgr"])
    assert report.ranking[-1].name == "raw_0_255"
    few = doctor.diagnose(model, example_pixels[:3])
    assert not few.confident and few.agrees_with_declared in (True, None)
    assert "too few images" in few.format() and "DISAGREES" not in few.format()


def test_bootstrap_confidence_and_decision():
    per = torch.tensor([[0.0, 0.1, 0.0, 0.1], [5.0, 5.0, 5.0, 5.0], [0.05, 0.05, 0.05, 0.05]])
    shares = doctor.bootstrap_confidence(per)
    assert shares[1] == 0 and 0 < shares.max() < 1  # the clearly worst never ranks first; the close two share it
    assert shares.sum().item() == pytest.approx(1.0)


def test_thresholds_are_recomputed_from_the_recorded_held_out_scores(calibration):
    """The shipped thresholds are what derive_thresholds gives on the recorded held-out scores: change the derivation
    (code or recorded parameters), or a threshold, without regenerating the file and this goes red."""
    d, h = calibration.derivation, calibration.held_out_scores
    assert d["drifting_quantile"] == meter_fit.DRIFTING_QUANTILE and d["channel_quantile"] == meter_fit.CHANNEL_QUANTILE
    assert d["broken_factor"] == meter_fit.BROKEN_FACTOR and d["batch_draws"] == meter_fit.BATCH_DRAWS
    assert d["batch_sizes"] == list(meter_fit.BATCH_SIZES) and d["split"] == meter_fit.SPLIT
    assert d["batch_draws_from"] == "one class" and len(set(h["class"])) == 10
    n = d["held_out_images"]
    assert len(h["per_mistake"]) == len(h["channel"]) == len(h["class"]) == n
    assert d["fit_images"] + d["standardize_images"] + n == d["n_images"] >= 2000
    recomputed = meter_fit.derived_thresholds(calibration)
    assert set(recomputed) == set(calibration.thresholds)
    for key in ("drifting", "broken", "channel"):
        assert recomputed[key] == pytest.approx(calibration.thresholds[key], abs=2e-4), key
    assert recomputed["batch"].keys() == calibration.thresholds["batch"].keys()
    for size, row in recomputed["batch"].items():
        for key, value in row.items():
            assert value == pytest.approx(calibration.thresholds["batch"][size][key], abs=2e-4), (size, key)
    # the recorded scores are the held-out part's: standardized on the other part, so near (not exactly) mean 0, std 1
    z = torch.tensor(h["per_mistake"])
    assert z.mean(0).abs().max() < 0.2 and ((z.std(0) - 1).abs() < 0.25).all()


def test_conformal_thresholds_are_finite_sample_order_statistics():
    scores = torch.arange(1.0, 100.0)  # 99 scores: (n + 1) * 0.98 = 98 -> the 98th smallest
    assert meter_fit.conformal_upper(scores, 0.98) == 98.0  # a plain 98th percentile would be 97.04
    assert meter_fit.conformal_lower(scores, 0.02) == 2.0  # (n + 1) * 0.02 = 2 -> the 2nd smallest
    assert meter_fit.conformal_upper(scores[torch.randperm(99)], 0.98) == 98.0  # order does not matter
    with pytest.raises(ValueError, match="too few"):
        meter_fit.conformal_upper(scores[:10], 0.98)
    with pytest.raises(ValueError, match="too few"):
        meter_fit.conformal_lower(scores[:10], 0.02)
    # the promise: a new exchangeable score crosses the threshold with probability at most 1 - level
    g = torch.Generator().manual_seed(0)
    cal, new = torch.randn(2000, 60, generator=g), torch.randn(2000, generator=g)
    t = torch.tensor([meter_fit.conformal_upper(c, 0.98) for c in cal])
    assert (new > t).float().mean().item() <= 0.02 + 0.005


def test_batch_thresholds_include_the_centre_error_and_the_class_spread():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 1, generator=g, dtype=torch.float64)
    z = (z - z.mean()) / z.std()
    stat = meter_fit.predictive_batch_statistics(z, 32, 20000, seed=0)[:, 0]
    # a new batch of 32 against a centre known from 64 images: variance 1 + 32/64, not 1 (nor the 1 - 32/64 of
    # batches drawn without replacement from the same 64)
    assert stat.std().item() == pytest.approx(1.5 ** 0.5, rel=0.05)
    assert torch.quantile(stat, 0.98).item() == pytest.approx(1.5 ** 0.5 * 2.054, rel=0.06)
    # one class per draw: two classes whose means sit +-0.5 apart from the overall mean (sqrt(32) * 0.5 = 2.8)
    two = torch.cat([z + 0.5, z - 0.5])
    groups = torch.cat([torch.zeros(64), torch.ones(64)])
    grouped = meter_fit.predictive_batch_statistics(two, 32, 20000, seed=0, groups=groups)[:, 0]
    mixed = meter_fit.predictive_batch_statistics(two, 32, 20000, seed=0)[:, 0]
    assert torch.quantile(grouped, 0.98).item() > torch.quantile(mixed, 0.98).item() + 2.0
    # half the draws from each class: the upper one's 96th percentile (1.751 standard deviations)
    assert torch.quantile(grouped, 0.98).item() == pytest.approx(32 ** 0.5 * 0.5 + 1.5 ** 0.5 * 1.751, rel=0.05)


def test_layer_features_match_the_per_layer_definition():
    """The vectorized features equal the definition computed layer by layer: log mean KL, mean standardized
    shift, mean log variance ratio (swap two columns, drop the log or average over the wrong layer: red)."""
    g = torch.Generator().manual_seed(0)
    bns = [torch.nn.BatchNorm2d(c) for c in (3, 8, 5)]
    for bn in bns:
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.1)
    stats = [(torch.randn(4, bn.num_features, generator=g) * 2, torch.rand(4, bn.num_features, generator=g) * 3)
             for bn in bns]
    expected = []
    for bn, (m, v) in zip(bns, stats):
        mr, vr = bn.running_mean, bn.running_var
        kl = (0.5 * (v / vr + (m - mr) ** 2 / vr - 1 - torch.log(v / vr))).mean(1)
        expected += [kl.clamp_min(1e-6).log(), ((m - mr) / vr.sqrt()).mean(1), (v / vr).log().mean(1)]
    got = meter.layer_features(bns, stats)
    assert got.shape == (4, 9)
    torch.testing.assert_close(got, torch.stack(expected, dim=1), rtol=1e-5, atol=1e-5)


def test_each_example_receives_the_level_its_panel_calls_for(predictor, example_pixels):
    """The levels the app's panels RECEIVE on the 8 shipped examples (CIFAR-10 test images): the correct panel "ok",
    every costly mistake flagged on every example (raw 0-255 "broken"), BGR on some (the paired channel check)."""
    received = {}
    for pixels in example_pixels:
        for v in predictor.predict_pixels(pixels, [CORRECT_KEY, *WRONG_VARIANTS]).variants:
            received.setdefault(v.key, []).append(v.meter.level)
    assert received[CORRECT_KEY] == ["ok"] * 8
    for key in COSTLY:
        assert set(received[key]) <= {"drifting", "broken"}, (key, received[key])
    assert received["raw_0_255"] == ["broken"] * 8
    assert set(received["no_normalization"]) == {"drifting"}  # subtle: never "broken"
    assert 3 <= received["bgr"].count("drifting") < 8 and "broken" not in received["bgr"]


def test_an_unusual_picture_is_judged_against_its_correct_panel(calibration):
    """Synthetic features of one picture's panels: content that moves every mistake's discriminant far up (the
    correct panel's own score twice the drifting threshold), a wrong panel with that content plus one mistake's
    shift, and one with that content only. Read on their own, all three are flagged; read against the correct
    panel (as the app reads them), the correct one is "unusual", the mistake is flagged and the content alone is
    "ok". Take the pairing out of panel_readings and the last one reads "drifting"."""
    w = torch.tensor(calibration.directions, dtype=torch.float64)
    centres = torch.tensor(calibration.centres, dtype=torch.float64)
    scales = torch.tensor(calibration.scales, dtype=torch.float64)
    inverse = torch.linalg.pinv(w)

    def features(z: torch.Tensor) -> torch.Tensor:
        """A feature vector whose standardized discriminant for each mistake is ``z``."""
        return inverse @ (centres + scales * z)

    t, paired = calibration.thresholds, calibration.paired_thresholds()
    m = len(calibration.mistakes)
    content = torch.full((m,), 2 * t["drifting"], dtype=torch.float64)
    mistake = torch.zeros(m, dtype=torch.float64)
    mistake[calibration.mistakes.index("cifar10_stats")] = paired["drifting"] + 1.0
    panels = torch.stack([features(content), features(content + mistake), features(content + 0.1)])
    wc = torch.tensor(calibration.channel_direction, dtype=torch.float64)
    twin = panels[0] - wc * calibration.channel_scale / wc.dot(wc)  # the correct panel's channel score: +1
    s = calibration.scores(panels)
    assert torch.allclose(s.per_mistake[0], content) and (s.score > t["drifting"]).all()
    assert [calibration.reading(float(v), None).level for v in s.score] == ["drifting"] * 3  # alone: all flagged
    correct, wrong, content_only = calibration.panel_readings(panels, twin)
    assert correct.level == "unusual" and correct.channel_order == pytest.approx(1.0)
    assert "not its preprocessing" in correct.words
    assert wrong.level in ("drifting", "broken") and wrong.shift == pytest.approx(paired["drifting"] + 1.0)
    assert content_only.level == "ok" and content_only.shift == pytest.approx(0.1)
