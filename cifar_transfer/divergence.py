"""The batch-norm divergence D: how far the statistics entering a batch-norm layer sit from its running ones.

A pretrained batch-norm layer stores the running mean and variance of its input over the pretraining data. Per
channel, the Gaussian KL divergence of the statistics an input brings (its mean and population variance over the
feature map) from the running ones; D is its mean over the channels:

    D = mean_c 0.5 * (var_b/var_r + (mu_b - mu_r)^2/var_r - 1 - ln(var_b/var_r))

This module is the one place that computes D (:func:`bn_divergence`), per image or for a whole batch. Its readers:
the meter's probes (:class:`cifar_transfer.meter.LayerProbe`, and the first layer alone for models without a
calibration), the doctor, the app's :class:`cifar_transfer.predictor.Predictor` (from the statistics its engine
measures), the study's and the experiment's probes. The calibrated meter's vectorized features
(:func:`cifar_transfer.meter.layer_features`) apply :func:`gaussian_kl` to all layers at once.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoint import first_batchnorm

Stats = tuple[torch.Tensor, torch.Tensor]  # (mean, variance) per channel: (N, C) per image, or (C,) for a batch


def gaussian_kl(mean_b: torch.Tensor, var_b: torch.Tensor, mean_r: torch.Tensor, var_r: torch.Tensor) -> torch.Tensor:
    """Per-channel KL(N(mean_b, var_b) || N(mean_r, var_r)); broadcasting over leading dims."""
    var_b = var_b.clamp_min(1e-12)
    var_r = var_r.clamp_min(1e-12)
    ratio = var_b / var_r
    return 0.5 * (ratio + (mean_b - mean_r) ** 2 / var_r - 1 - torch.log(ratio))


def channel_stats(x: torch.Tensor, pooled: bool = False) -> Stats:
    """Per-channel mean and population variance of an ``(N, C, H, W)`` layer input, float32: per image (``(N, C)``
    each), or over the whole batch (``pooled``: ``(C,)`` each)."""
    x = x.detach().float()
    dims = (0, 2, 3) if pooled else (2, 3)
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def pooled_stats(per_image: Stats) -> Stats:
    """A batch's statistics from its images' own (:func:`channel_stats`), for images of equal size: the mean of the
    means, and the mean variance plus the variance of the means."""
    mean_b, var_b = per_image
    return mean_b.mean(0), var_b.mean(0) + mean_b.var(0, unbiased=False)


def running_stats(bn: nn.BatchNorm2d) -> Stats:
    """The layer's running mean and variance, float32."""
    return bn.running_mean.detach().float(), bn.running_var.detach().float()


def bn_divergence(stats: Stats, running: Stats) -> torch.Tensor:
    """D of ``stats`` (a layer input's, :func:`channel_stats`) against ``running`` (the layer's, :func:`running_stats`,
    or a copy taken earlier): one per image for ``(N, C)`` statistics, one number for ``(C,)``."""
    (mean_b, var_b), (mean_r, var_r) = stats, running
    return gaussian_kl(mean_b, var_b, mean_r.to(mean_b), var_r.to(mean_b)).mean(dim=-1)


class _Stop(Exception):
    """Raised by a stopping :class:`BatchNormProbe` once it has captured: the rest of the network is not needed."""


class BatchNormProbe:
    """Context manager capturing the input of a model's first batch-norm layer.

    ``stop``: the forward pass ends at that layer (the probe's ``with`` block swallows the stop), for callers that
    need nothing but D."""

    def __init__(self, model: nn.Module, stop: bool = False):
        self.bn = first_batchnorm(model)
        self.stop = stop
        self.inputs: list[torch.Tensor] = []
        self._handle = None

    def _capture(self, _module, args) -> None:
        self.inputs.append(args[0].detach().float())
        if self.stop:
            raise _Stop

    def __enter__(self) -> "BatchNormProbe":
        self._handle = self.bn.register_forward_pre_hook(self._capture)
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        if self._handle is not None:
            self._handle.remove()
        return exc_type is _Stop

    def divergence(self, per_image: bool = True) -> torch.Tensor:
        """D per image (``per_image``) or over the whole captured batch (one number)."""
        if not self.inputs:
            raise RuntimeError("no forward pass was captured")
        return bn_divergence(channel_stats(torch.cat(self.inputs), pooled=not per_image), running_stats(self.bn))


@torch.no_grad()
def first_layer_divergence(model: nn.Module, normalized: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(D pooled over the batch, D per image) at the first batch-norm layer, eval mode; the forward pass stops at
    that layer."""
    was_training = model.training
    model.eval()
    try:
        with BatchNormProbe(model, stop=True) as probe:
            model(normalized)
        return probe.divergence(per_image=False).item(), probe.divergence(per_image=True)
    finally:
        model.train(was_training)
