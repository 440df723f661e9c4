"""The normalization contract: math, variants, serialization."""

import json

import pytest
import torch

from cifar_transfer import contract as C


def solid(r, g, b, size=8):
    return torch.tensor([r, g, b], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, size, size).contiguous()


def half_black_half_white(size=8):
    x = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    x[..., : size // 2] = 255
    return x


def channel_stats(x):
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3), unbiased=False)


def test_imagenet_contract_on_a_known_pixel():
    # (255, 0, 51) -> ((1 - .485)/.229, (0 - .456)/.224, (.2 - .406)/.225), worked out by hand
    out = C.IMAGENET.replace(input_size=8).transform()(solid(255, 0, 51))
    assert out[0, :, 0, 0].tolist() == pytest.approx([2.24891, -2.03571, -0.91556], abs=1e-4)


def test_minus_one_one_maps_black_and_white_to_minus_one_and_one():
    out = C.MINUS_ONE_ONE.replace(input_size=8).transform()(half_black_half_white())
    assert out.min().item() == pytest.approx(-1.0)
    assert out.max().item() == pytest.approx(1.0)
    mean, std = channel_stats(out)
    assert mean.tolist() == pytest.approx([0, 0, 0], abs=1e-6)
    assert std.tolist() == pytest.approx([1, 1, 1], abs=1e-6)


@pytest.mark.parametrize(
    "key, expected_mean, expected_std",
    [
        # half black, half white image: pixel mean 0.5, std 0.5 in [0, 1] units
        ("correct", [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
        ("no_normalization", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        ("raw_0_255", [127.5, 127.5, 127.5], [127.5, 127.5, 127.5]),
        # ImageNet statistics: ((0.5 - m) / s, 0.5 / s)
        ("other_model_stats", [0.06550, 0.19643, 0.41778], [2.18341, 2.23214, 2.22222]),
        ("cifar10_stats", [0.03482, 0.07310, 0.20451], [2.02429, 2.05339, 1.91131]),
        ("bgr", [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]),
        # second pass of (x - 0.5) / 0.5 on mean 0, std 1: mean -1, std 2
        ("normalized_twice", [-1.0, -1.0, -1.0], [2.0, 2.0, 2.0]),
    ],
)
def test_each_variant_produces_the_expected_channel_statistics(key, expected_mean, expected_std):
    correct = C.MINUS_ONE_ONE.replace(input_size=8)
    contract = C.variant_contracts(correct)[key]
    mean, std = channel_stats(contract.transform()(half_black_half_white()))
    assert mean.tolist() == pytest.approx(expected_mean, abs=1e-4)
    assert std.tolist() == pytest.approx(expected_std, abs=1e-4)


def test_bgr_swaps_red_and_blue():
    correct = C.IMAGENET.replace(input_size=4)
    rgb = correct.transform()(solid(200, 100, 10))
    bgr = C.variant_contracts(correct, ["bgr"])["bgr"].transform()(solid(10, 100, 200))
    assert torch.allclose(rgb, bgr)


def test_other_model_stats_swaps_imagenet_and_minus_one_one():
    assert C.WRONG_VARIANTS["other_model_stats"].apply(C.IMAGENET).mean == C.MINUS_ONE_ONE.mean
    assert C.WRONG_VARIANTS["other_model_stats"].apply(C.MINUS_ONE_ONE).std == C.IMAGENET.std


def test_every_wrong_variant_differs_from_the_correct_contract_and_explains_itself():
    for correct in (C.IMAGENET, C.MINUS_ONE_ONE):
        variants = C.variant_contracts(correct)
        assert list(variants)[0] == C.CORRECT_KEY and len(variants) == 1 + len(C.WRONG_VARIANTS)
        for key, wrong in list(variants.items())[1:]:
            assert not wrong.same_normalization(correct), key
            assert wrong.input_size == correct.input_size
            assert wrong.description.endswith(".") and len(wrong.description.split()) > 6


def test_transform_resizes_to_the_contract_input_size():
    out = C.IMAGENET.replace(input_size=64).transform()(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32


def test_transform_rejects_non_rgb_batches():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        C.IMAGENET.transform()(torch.zeros(3, 32, 32))


def test_display_round_trips_the_correct_contract_and_saturates_raw_input():
    correct = C.IMAGENET.replace(input_size=8)
    img = solid(200, 100, 10)
    shown = C.to_display(correct.transform()(img), correct)
    assert torch.allclose(shown * 255, img.float(), atol=1e-3)
    raw = C.variant_contracts(correct, ["raw_0_255"])["raw_0_255"].transform()(img)
    assert C.to_display(raw, correct).min().item() == 1.0  # blown out to white


def test_json_round_trip_is_lossless():
    for c in list(C.PRESETS.values()) + list(C.variant_contracts(C.IMAGENET).values()):
        again = C.NormalizationContract.from_json(c.to_json())
        assert again == c
        assert json.loads(c.to_json())["mean"] == list(c.mean)


@pytest.mark.parametrize(
    "payload, message",
    [
        ("{not json", "not valid JSON"),
        ('{"name": "x", "mean": [0.5, 0.5], "std": [1, 1, 1]}', "3 values"),
        ('{"name": "x", "mean": [0, 0, 0], "std": [1, 0, 1]}', "positive"),
        ('{"name": "x", "mean": [0, 0, 0], "std": [1, 1, 1], "channel_order": "GBR"}', "channel_order"),
        ('{"name": "x", "mean": [0, 0, 0], "std": [1, 1, 1], "colour": 1}', "unknown contract field"),
        ('{"mean": [0, 0, 0], "std": [1, 1, 1]}', "missing"),
        ("[1, 2, 3]", "JSON object"),
    ],
)
def test_malformed_contracts_are_rejected_with_a_clear_message(payload, message):
    with pytest.raises(C.ContractError, match=message):
        C.NormalizationContract.from_json(payload)


def test_unknown_variant_is_named():
    with pytest.raises(C.ContractError, match="unknown variant 'grayscale'"):
        C.variant_contracts(C.IMAGENET, ["grayscale"])


def test_cifar10_statistics_match_the_shared_training_set(shared_data):
    from cifar_transfer.data import load_dataset

    images = load_dataset(shared_data).train.images.double() / 255
    mean, std = channel_stats(images)
    # the JPEG copy differs slightly from the original pixels the constants come from
    assert mean.tolist() == pytest.approx(list(C.CIFAR10_STATS.mean), abs=3e-3)
    assert std.tolist() == pytest.approx(list(C.CIFAR10_STATS.std), abs=3e-3)


# -- value range, bicubic clamp, crop: what the transform really does ---------------------------------


def black_and_white(size=8):
    """Pixels at both ends of the range in every channel: the transform's output spans its whole value range."""
    return half_black_half_white(size)


@pytest.mark.parametrize("correct", [C.IMAGENET, C.MINUS_ONE_ONE, C.CIFAR10_STATS], ids=lambda c: c.name)
def test_value_range_is_what_the_transform_produces(correct):
    for key, contract in C.variant_contracts(correct.replace(input_size=8)).items():
        out = contract.transform()(black_and_white())
        lo, hi = contract.value_range()
        assert (out.min().item(), out.max().item()) == pytest.approx((lo, hi), rel=1e-5, abs=1e-5), key


def test_value_range_of_known_contracts():
    assert C.MINUS_ONE_ONE.value_range() == pytest.approx((-1.0, 1.0))
    assert C.IMAGENET.value_range() == pytest.approx(((0 - 0.485) / 0.229, (1 - 0.406) / 0.225))
    raw = C.WRONG_VARIANTS["raw_0_255"].apply(C.MINUS_ONE_ONE)
    assert raw.value_range() == pytest.approx((0.0, 255.0))
    twice = C.WRONG_VARIANTS["normalized_twice"].apply(C.MINUS_ONE_ONE)
    assert twice.value_range() == pytest.approx((-3.0, 1.0))  # (-1 - .5) / .5 and (1 - .5) / .5


def test_bicubic_upscaling_stays_inside_the_pixel_range():
    edge = black_and_white(8).float()
    overshoot = torch.nn.functional.interpolate(edge, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert overshoot.min() < 0 and overshoot.max() > 255  # what bicubic does to a hard edge, unclamped
    contract = C.MINUS_ONE_ONE.replace(input_size=32, interpolation="bicubic")
    out = contract.transform()(black_and_white(8))
    assert out.min().item() == pytest.approx(-1.0) and out.max().item() == pytest.approx(1.0)


def columns(h, w):
    """(1, 3, h, w) uint8 image whose every pixel holds its column index."""
    return torch.arange(w, dtype=torch.uint8).view(1, 1, 1, w).expand(1, 3, h, w).contiguous()


def test_center_crop_keeps_the_middle_of_a_wide_image():
    c = C.NormalizationContract("id", (0, 0, 0), (1, 1, 1), pixel_scale=255.0, input_size=32, crop_mode="center")
    out = c.transform()(columns(32, 64))  # shorter side already 32: no resize, the middle 32 columns are kept
    assert out.shape == (1, 3, 32, 32) and out[0, 0, 0].tolist() == list(range(16, 48))


def test_squash_resizes_both_sides_and_crop_pct_cuts_the_border():
    squash = C.NormalizationContract("id", (0, 0, 0), (1, 1, 1), pixel_scale=255.0, input_size=32, crop_mode="squash",
                                     interpolation="nearest")
    assert squash.transform()(columns(32, 64))[0, 0, 0].tolist() == list(range(0, 64, 2))
    cropped = squash.replace(crop_mode="center", crop_pct=0.5)  # 64 px image: no resize, keep the central 32
    assert cropped.transform()(columns(64, 64))[0, 0, 0].tolist() == list(range(16, 48))


def test_timm_reads_the_same_preprocessing_from_pretrained_cfg():
    import timm
    from timm.data import resolve_data_config

    c = C.MINUS_ONE_ONE.replace(input_size=128, crop_pct=0.9)
    net = timm.create_model("tf_efficientnet_lite0", num_classes=3, pretrained_cfg_overlay=c.timm_data_config())
    cfg = resolve_data_config(model=net)
    assert cfg == {"input_size": (3, 128, 128), "interpolation": "bilinear", "mean": c.mean, "std": c.std,
                   "crop_pct": 0.9, "crop_mode": "center"}
    assert c.timm_disagreements(cfg) == []
    assert c.replace(std=C.IMAGENET.std).timm_disagreements(cfg) == [
        f"std: pretrained_cfg has {c.std!r}, the contract {list(C.IMAGENET.std)!r}"]


@pytest.mark.parametrize("key", ["raw_0_255", "bgr", "normalized_twice"])
def test_what_timm_cannot_express_is_refused_not_dropped(key):
    wrong = C.WRONG_VARIANTS[key].apply(C.IMAGENET)
    with pytest.raises(C.ContractError, match="cannot express"):
        wrong.timm_data_config()
