"""The doctor's evidence: candidate normalizations, each image's misfit under them, and which the images separate.

Every candidate (the presets, the declared contract, the wrong variants of :mod:`cifar_transfer.contract`) is
scored per image by the calibrated contract meter's misfit (:mod:`cifar_transfer.meter`), or without a
calibration by the first batch-norm layer's divergence (:mod:`cifar_transfer.divergence`). A candidate counts as
*separated* from the first only when the first beats it on the evidence twice over: on at least ``CONFIDENT`` of
bootstrap resamples (subfolders, then images within them), and by at least ``CONTENT_SPREAD`` standard deviations
of the per-image differences (content, not only sampling, must not explain it). Channel order (a contract against
its BGR twin) is judged with each picture's colour cast held fixed (:func:`colour_cast_exchanged`): a blue-sky
folder otherwise "fits" BGR. :mod:`cifar_transfer.doctor` turns this into the verdict.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import batchnorm_layers
from .contract import PRESETS, WRONG_VARIANTS, NormalizationContract
from .divergence import first_layer_divergence
from .meter import MeterCalibration, first_layer_reading, meter_features

#: Share of bootstrap resamples on which the first must beat a candidate for the two to count as separated.
CONFIDENT = 0.95
BOOTSTRAP = 400
#: The first must also beat a candidate by this many standard deviations of the per-image differences, so that most
#: single images agree: a folder of other content, as far from this one as its images are from each other, would
#: still rank them the same. Sampling noise (the bootstrap) shrinks with more images; one class's colours do not.
#: On the design folders (``python benchmarks/doctor_accuracy.py --split train``: CIFAR-10 train class folders and
#: the design photographs) the evidence against the correct contract reached 0.35, the wrong normalizations 0.97 and
#: more, the shipped checkpoint's channel order 0.30-0.85 (reported as not settled).
CONTENT_SPREAD = 1.0
#: Running statistics within this of mean 0, variance 1 count as never trained (PyTorch's initial values).
UNTRAINED_ATOL = 1e-6
DECLARED = "declared"


def candidate_contracts(reference: NormalizationContract) -> dict[str, NormalizationContract]:
    """The presets, ``reference`` itself (as "declared", when no preset is it), then every wrong variant of
    ``reference``; duplicates keep the first name.

    All candidates use ``reference.input_size`` and interpolation, so only the normalization differs.
    """
    out: dict[str, NormalizationContract] = {}
    pool = ([(name, c) for name, c in PRESETS.items()] + [(DECLARED, reference)]
            + [(k, v.apply(reference)) for k, v in WRONG_VARIANTS.items()])
    for name, contract in pool:
        contract = contract.replace(input_size=reference.input_size, interpolation=reference.interpolation)
        if not any(contract.same_normalization(seen) for seen in out.values()):
            out[name] = contract
    return out


def aliases(name: str, candidates: dict[str, NormalizationContract], reference: NormalizationContract) -> list[str]:
    """Other names for the same normalization (``other_model_stats`` may be ``imagenet``, and so on)."""
    target = candidates[name]
    names = [n for n, c in PRESETS.items() if c.same_normalization(target)]
    names += [k for k, v in WRONG_VARIANTS.items() if v.apply(reference).same_normalization(target)]
    if reference.same_normalization(target):
        names.append(DECLARED)
    return [n for n in dict.fromkeys(names) if n != name]


def misfits(model: nn.Module, normalized: torch.Tensor, calibration: MeterCalibration | None,
            features: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, str]:
    """Per-image misfit of ``normalized`` inputs, and the meter's level for them as one batch.

    Misfit: the calibrated meter's score, or its channel-swap evidence when larger (the negated paired channel
    score); without a calibration, the log of the first batch-norm divergence. ``features``: the meter's
    features and twin features of ``normalized``, when already measured.
    """
    if calibration is None:
        pooled, per_image = first_layer_divergence(model, normalized)
        return per_image.clamp_min(1e-12).log(), first_layer_reading(pooled).level
    f, twin = features if features is not None else meter_features(model, normalized, calibration.layers)
    s = calibration.scores(f, twin)
    score, channel = calibration.batch_scores(s)
    return torch.maximum(s.score, -s.channel), calibration.reading(score, channel, len(normalized)).level


def measure_all(model: nn.Module, batches: list[torch.Tensor],
                calibration: MeterCalibration | None) -> list[tuple[torch.Tensor, str]]:
    """:func:`misfits` of each of ``batches`` (equal sizes); calibrated, all through one :func:`meter_features` call
    (one engine, not one per batch)."""
    feats = [None] * len(batches)
    if calibration is not None:
        f, twin = meter_features(model, torch.cat(batches), calibration.layers)
        n = len(batches[0])
        feats = [(f[i * n:(i + 1) * n], twin[i * n:(i + 1) * n]) for i in range(len(batches))]
    return [misfits(model, b, calibration, fe) for b, fe in zip(batches, feats)]


def resample_weights(n: int, groups: list | None = None, resamples: int = BOOTSTRAP, seed: int = 0) -> torch.Tensor:
    """``(resamples, n)`` bootstrap weights of ``n`` images: their subfolders drawn with replacement, then the images
    within each drawn subfolder (``groups``: one label per image; None: one folder, a plain bootstrap of images)."""
    g = torch.Generator().manual_seed(seed)
    codes = {v: i for i, v in enumerate(dict.fromkeys(groups))} if groups is not None else {None: 0}
    labels = torch.tensor([codes[v] for v in groups]) if groups is not None else torch.zeros(n, dtype=torch.long)
    k = len(codes)
    folders = torch.zeros(resamples, k).scatter_add_(1, torch.randint(k, (resamples, k), generator=g), torch.ones(resamples, k))
    weights = torch.zeros(resamples, n, dtype=torch.float64)
    for f in range(k):
        idx = torch.nonzero(labels == f).flatten()
        draws = torch.randint(len(idx), (resamples, len(idx)), generator=g)
        counts = torch.zeros(resamples, len(idx)).scatter_add_(1, draws, torch.ones(resamples, len(idx)))
        weights[:, idx] = (counts * folders[:, f:f + 1]).double()
    return weights


def first_shares(per_image: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """For ``(C, N)`` per-image misfits of C candidates: the share of resamples (``weights``) on which each ranks first."""
    means = per_image.double() @ weights.T / weights.sum(dim=1)  # (C, resamples)
    return torch.bincount(means.argmin(dim=0), minlength=len(per_image)).double() / len(weights)


def bootstrap_confidence(per_image: torch.Tensor, resamples: int = BOOTSTRAP, seed: int = 0,
                         groups: list | None = None) -> torch.Tensor:
    """For ``(C, N)`` per-image misfits of C candidates: the share of resamples (:func:`resample_weights`) on which
    each ranks first."""
    return first_shares(per_image, resample_weights(per_image.shape[1], groups, resamples, seed))


def separated(margins: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``(K, N)`` per-image margins (a candidate's misfit minus the first's: positive where the first fits
    better) and ``(R, N)`` bootstrap weights: (separated, share of resamples the first wins, effect size), per row.

    Separated: the first wins on at least ``CONFIDENT`` of the resamples and by at least ``CONTENT_SPREAD``
    standard deviations of the per-image margins."""
    m = margins.double()
    wins = ((m @ weights.T) > 0).double().mean(dim=1)
    mean, sd = m.mean(dim=1), m.std(dim=1)
    effect = torch.where(sd > 0, mean / sd.clamp_min(1e-300), torch.zeros_like(mean))
    return (wins >= CONFIDENT) & (mean > 0) & (effect >= CONTENT_SPREAD), wins, effect


def colour_cast_exchanged(pixels: torch.Tensor) -> torch.Tensor:
    """``pixels`` (float) with the mean and standard deviation of the first and last channels exchanged, image by
    image, each channel keeping its own pattern.

    Read in the other channel order these pictures carry the originals' colour cast with red and blue's patterns
    swapped, so :func:`channel_margins` compares the two channel orders at equal cast."""
    x = pixels.double()
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(1e-3)  # a flat channel keeps its (constant) value
    swap = [2, 1, 0]
    return ((x - mean) / std * std[:, swap] + mean[:, swap]).float()


def channel_margins(own: torch.Tensor, twin: torch.Tensor, own_exchanged: torch.Tensor,
                    twin_exchanged: torch.Tensor) -> torch.Tensor:
    """Per image: how much better a contract's channel order fits than its twin's (the other order) with the colour
    cast held fixed; positive: its own order.

    ``own``/``twin``: misfits of the images under the contract and under its twin; ``*_exchanged``: of
    :func:`colour_cast_exchanged` images. ``own`` and ``twin_exchanged`` see the same channel means and spreads in
    each input channel, only the patterns differ; so do ``twin`` and ``own_exchanged``."""
    return 0.5 * ((twin_exchanged - own) + (twin - own_exchanged))


def untrained_layers(model: nn.Module, layers: list[int]) -> list[str]:
    """Names of the batch-norm layers among ``layers`` (indices into :func:`cifar_transfer.checkpoint.batchnorm_layers`)
    whose running statistics are still PyTorch's initial ones, mean 0 and variance 1: nothing was measured into them.

    ``num_batches_tracked`` is not asked alone: weights converted from another framework carry trained statistics
    with a count of 0 (the bare ``efficientnet_lite0`` does)."""
    bns = batchnorm_layers(model)
    out = []
    for i in layers:
        name, bn = bns[i]
        mean, var = bn.running_mean.detach().double(), bn.running_var.detach().double()
        if mean.abs().max() <= UNTRAINED_ATOL and (var - 1).abs().max() <= UNTRAINED_ATOL:
            out.append(name)
    return out
