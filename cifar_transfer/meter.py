"""The contract meter: how far a network's input sits from what its first batch-norm layer expects.

A pretrained batch-norm layer stores the running mean and variance of its
input over the pretraining data. Feed inputs that break the normalization
contract and the statistics entering that layer drift away from them. We
measure the drift as the mean over channels of the KL divergence between the
observed per-channel Gaussian N(mu_b, var_b) and the stored one N(mu_r, var_r):

    D = mean_c 0.5 * (var_b/var_r + (mu_b - mu_r)^2/var_r - 1 - ln(var_b/var_r))

D is 0 when the statistics match exactly and grows without bound as they part.
Thresholds for the plain-words reading are measured on CIFAR-10 test images
under each backbone's correct contract (see ``calibrate`` and the test
``test_meter_thresholds_separate_correct_from_raw``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Readings (upper bounds of D per image). Measured on 200 CIFAR-10 test images
# (20 per class) with the ImageNet EfficientNet-Lite0 weights at 96 px: under the
# correct contract D per image had median 0.34, p95 0.84, max 1.11; raw 0-255
# input gave a median of about 15,000. WITHIN sits just above the correct maximum.
WITHIN = 1.2
DRIFTING = 10.0


@dataclass(frozen=True)
class MeterReading:
    divergence: float
    level: str  # "ok" | "drifting" | "broken"
    colour: str
    words: str

    def to_dict(self) -> dict:
        return {"divergence": self.divergence, "level": self.level, "colour": self.colour, "words": self.words}


def reading(divergence: float) -> MeterReading:
    if divergence <= WITHIN:
        return MeterReading(divergence, "ok", "#2e7d32", "Inside the contract: the first batch-norm layer sees the statistics it was trained on.")
    if divergence <= DRIFTING:
        return MeterReading(divergence, "drifting", "#f9a825", "Drifting: the first batch-norm layer sees shifted statistics.")
    return MeterReading(divergence, "broken", "#c62828", "Far outside the contract: the first batch-norm layer sees statistics it never saw in training.")


def first_batchnorm(model: nn.Module) -> nn.BatchNorm2d:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            return m
    raise ValueError("model has no BatchNorm2d layer")


def gaussian_kl(mean_b: torch.Tensor, var_b: torch.Tensor, mean_r: torch.Tensor, var_r: torch.Tensor) -> torch.Tensor:
    """Per-channel KL(N(mean_b, var_b) || N(mean_r, var_r)); broadcasting over leading dims."""
    var_b = var_b.clamp_min(1e-12)
    var_r = var_r.clamp_min(1e-12)
    ratio = var_b / var_r
    return 0.5 * (ratio + (mean_b - mean_r) ** 2 / var_r - 1 - torch.log(ratio))


class BatchNormProbe:
    """Context manager capturing the input of a model's first batch-norm layer."""

    def __init__(self, model: nn.Module):
        self.bn = first_batchnorm(model)
        self.inputs: list[torch.Tensor] = []
        self._handle = None

    def __enter__(self) -> "BatchNormProbe":
        self._handle = self.bn.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0].detach().float()))
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()

    def divergence(self, per_image: bool = True) -> torch.Tensor:
        """D per image (``per_image``) or over the whole captured batch (one number)."""
        if not self.inputs:
            raise RuntimeError("no forward pass was captured")
        x = torch.cat(self.inputs)
        mean_r = self.bn.running_mean.float()
        var_r = self.bn.running_var.float()
        if per_image:
            mean_b = x.mean(dim=(2, 3))
            var_b = x.var(dim=(2, 3), unbiased=False)
            return gaussian_kl(mean_b, var_b, mean_r, var_r).mean(dim=1)
        mean_b = x.mean(dim=(0, 2, 3))
        var_b = x.var(dim=(0, 2, 3), unbiased=False)
        return gaussian_kl(mean_b, var_b, mean_r, var_r).mean()


@torch.no_grad()
def measure(model: nn.Module, inputs: torch.Tensor, per_image: bool = True) -> torch.Tensor:
    """Run ``model`` (eval mode) on already-normalized ``inputs`` and return D (see module doc)."""
    was_training = model.training
    model.eval()
    try:
        with BatchNormProbe(model) as probe:
            model(inputs)
        return probe.divergence(per_image=per_image)
    finally:
        model.train(was_training)
