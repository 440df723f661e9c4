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
