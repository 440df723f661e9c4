"""The contract meter: does a network's input look like what its batch-norm layers were trained on?

A pretrained batch-norm layer stores the running mean and variance of its
input. Feed inputs that break the normalization contract and the statistics
entering the layers drift away from them. The first layer sees only the loud
mistakes (raw 0-255 pixels); subtle ones (another model's mean and std, the
dataset's statistics, no normalization) show deeper in the network.

**Calibrated meter** (:class:`MeterCalibration`, :class:`LayerProbe`). Per image
and per batch-norm layer in the calibration's ``layers`` it reads three numbers:
the mean over channels of the Gaussian KL divergence between the image's
per-channel statistics and the running ones (its log), the mean standardized
shift of the channel means, and the mean log ratio of the variances. From that
feature vector it computes, for every known normalization mistake, a linear
discriminant (shrinkage LDA, fitted on *training* images) standardized on
correctly preprocessed training images; the meter's score is the largest of
them. Thresholds come from training images held out of everything else (split-conformal for single
images; predictive draws of one class at a time for batches, see :func:`derive_thresholds`). A second, paired
check compares the input with its own channel-swapped
twin (both in the same forward pass): an RGB network's deeper layers fit the
right channel order better than the swapped one on most images, which is the
only signal for channel order we found (the features of a single input are
near chance for it). Everything the meter needs (layers, directions,
thresholds, how they were derived and what was measured on held-out training
images) lives in ``meter_calibration.json`` beside the checkpoint; it is keyed
to the model's batch-norm layers (count, widths and a hash of the running
statistics), so a file made for another model is refused. Build it with::

    python -m cifar_transfer.meter CHECKPOINT_DIR --data-dir ../shared/datasets/cifar10-jpeg

**First-layer divergence** (:class:`BatchNormProbe`, :func:`first_layer_reading`):
the older, uncalibrated reading of the first batch-norm layer alone, kept for
models without a calibration (the doctor on a bare backbone) and the experiment.

    D = mean_c 0.5 * (var_b/var_r + (mu_b - mu_r)^2/var_r - 1 - ln(var_b/var_r))
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import CALIBRATION_NAME, batchnorm_layers, fingerprint, first_batchnorm

# First-layer readings (upper bounds of D per image), for models WITHOUT a calibration only. Measured on 200
# CIFAR-10 test images with the ImageNet EfficientNet-Lite0 weights at 96 px: correct D per image had median 0.34,
# max 1.11; raw 0-255 input about 15,000. They catch raw 0-255 pixels and little else (see the README).
WITHIN = 1.2
DRIFTING = 10.0

CALIBRATION_FILE = CALIBRATION_NAME
CALIBRATION_VERSION = 1
#: "ok", "drifting", "broken": where an input's statistics sit (against the correct panel of the same picture in the
#: app, else against the training images); "unusual": only the app's correct panel, the reference, when the picture
#: itself is unlike the training images; "unknown": no calibration, cannot judge.
LEVELS = ("ok", "drifting", "broken", "unusual", "unknown")
COLOURS = {"ok": "#2e7d32", "drifting": "#f9a825", "broken": "#c62828", "unusual": "#1565c0", "unknown": "#757575"}


@dataclass(frozen=True)
class MeterReading:
    divergence: float  # this input's own score (calibrated meter: largest standardized discriminant; else first-layer D)
    level: str  # one of LEVELS
    colour: str
    words: str
    channel_order: float | None = None  # this input against its channel-swapped twin (positive: fits the order it was given)
    reliability: dict | None = None  # what was measured for this kind of input (set by the Predictor per panel)
    #: Paired readings (the app's wrong panels) only, both against the correct panel of the same picture: the largest
    #: increase of a mistake's standardized discriminant (the level's number), and the channel-order evidence of this
    #: panel against that panel (negative: the correct panel's channel order fits the network better; None: not judged).
    shift: float | None = None
    channel_shift: float | None = None

    def to_dict(self) -> dict:
        d = {"divergence": self.divergence, "level": self.level, "colour": self.colour, "words": self.words}
        for key in ("channel_order", "reliability", "shift", "channel_shift"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


def first_layer_reading(divergence: float) -> MeterReading:
    """Uncalibrated reading of the first batch-norm layer's D (models without a calibration)."""
    if divergence <= WITHIN:
        return MeterReading(divergence, "unknown", COLOURS["unknown"],
                            "Cannot judge: no meter calibration for this model. The first batch-norm layer looks "
                            "normal, which rules out raw 0-255 pixels but not the subtler mistakes.")
    if divergence <= DRIFTING:
        return MeterReading(divergence, "drifting", COLOURS["drifting"], "Drifting: the first batch-norm layer sees shifted statistics.")
    return MeterReading(divergence, "broken", COLOURS["broken"], "Far outside the contract: the first batch-norm layer sees statistics it never saw in training.")


#: Kept for callers of the first-layer meter (the doctor's fallback); same as :func:`first_layer_reading`.
reading = first_layer_reading


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


# -- the calibrated meter ------------------------------------------------------------------------

FEATURES = ("log_kl", "shift", "log_var_ratio")  # per layer, in this order (see the module doc)


class CalibrationError(RuntimeError):
    """No calibration, or one made for another model; the message says what to do."""


class LayerProbe:
    """Context manager capturing, per image, the per-channel mean and variance entering chosen BN layers.

    ``layers`` are indices into :func:`batchnorm_layers` (default: all). After one or
    more forward passes, :meth:`features` gives the ``(N, 3 * len(layers))`` feature matrix.
    """

    def __init__(self, model: nn.Module, layers: list[int] | None = None):
        all_layers = batchnorm_layers(model)
        self.layers = list(range(len(all_layers))) if layers is None else list(layers)
        self.bns = [all_layers[i][1] for i in self.layers]
        self.captured: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.bns]
        self._handles = []

    def _hook(self, slot: int):
        def hook(_m, args):
            x = args[0].detach().float()
            self.captured[slot].append((x.mean(dim=(2, 3)), x.var(dim=(2, 3), unbiased=False)))
        return hook

    def __enter__(self) -> "LayerProbe":
        self._handles = [bn.register_forward_pre_hook(self._hook(i)) for i, bn in enumerate(self.bns)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        self.captured = [[] for _ in self.bns]

    def features(self) -> torch.Tensor:
        """``(N, 3 * L)``: for each layer, log mean-KL, mean standardized shift, mean log variance ratio."""
        if not self.captured or not self.captured[0]:
            raise RuntimeError("no forward pass was captured")
        return layer_features(self.bns, [(torch.cat([c[0] for c in caps]), torch.cat([c[1] for c in caps]))
                                         for caps in self.captured])


def layer_features(bns: list[nn.BatchNorm2d], stats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The meter's ``(N, 3 * L)`` features from each layer's per-image ``(mean, variance)`` of its input, however
    they were measured (:class:`LayerProbe`'s hooks, or the extra outputs of an ONNX export, see engine.py).

    Per layer, in this order: log of the mean per-channel Gaussian KL divergence from the layer's running
    statistics, the mean standardized shift of the channel means, and the mean log variance ratio. Computed for
    all layers at once (one pass over the concatenated channels, then a per-layer average): the app runs this on
    every request, and a loop over 49 layers cost more than the arithmetic."""
    widths = [bn.num_features for bn in bns]
    mean_b = torch.cat([m for m, _ in stats], dim=1).float().cpu()
    var_b = torch.cat([v for _, v in stats], dim=1).float().cpu().clamp_min(1e-12)
    mean_r = torch.cat([bn.running_mean.detach() for bn in bns]).float().cpu()
    var_r = torch.cat([bn.running_var.detach() for bn in bns]).float().cpu().clamp_min(1e-12)
    per_channel = torch.stack([gaussian_kl(mean_b, var_b, mean_r, var_r), (mean_b - mean_r) / var_r.sqrt(),
                               (var_b / var_r).log()], dim=2)  # (N, C, 3)
    layer = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
    sums = per_channel.new_zeros(len(mean_b), len(widths), 3).index_add_(1, layer, per_channel)
    f = sums / torch.tensor(widths, dtype=sums.dtype)[None, :, None]  # (N, L, 3): per-layer means
    f[:, :, 0] = f[:, :, 0].clamp_min(1e-6).log()
    return f.reshape(len(mean_b), 3 * len(widths))

def channel_swap(x: torch.Tensor) -> torch.Tensor:
    """The same normalized batch with its first and last channels exchanged (RGB <-> BGR)."""
    return x.flip(1)


@dataclass
class MeterScores:
    """Per-image scores of the calibrated meter."""

    score: torch.Tensor  # (N,) largest standardized discriminant over the known mistakes
    per_mistake: torch.Tensor  # (N, M) standardized discriminant per mistake, columns as calibration.mistakes
    channel: torch.Tensor | None  # (N,) paired channel-order score, standardized (None: no twin was run)


@dataclass
class MeterCalibration:
    """What the calibrated meter needs, read from / written to ``meter_calibration.json``."""

    fingerprint: dict
    layers: list[int]
    layer_names: list[str]
    mistakes: list[str]
    directions: list[list[float]]  # one per mistake, over the features of ``layers``
    centres: list[float]  # mean projection of correct calibration images, per mistake
    scales: list[float]  # their std, per mistake
    channel_direction: list[float] | None
    channel_scale: float | None
    thresholds: dict  # {"drifting": t, "broken": t, "channel": t}
    derivation: dict
    measured: dict  # on held-out calibration images: flag rate per variant, false alarms on correct
    version: int = CALIBRATION_VERSION
    held_out_scores: dict | None = None  # scores of the held-out correct images the thresholds come from

    # -- persistence ---------------------------------------------------------
    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "MeterCalibration":
        path = Path(path)
        if path.is_dir():
            path = path / CALIBRATION_FILE
        if not path.is_file():
            raise CalibrationError(f"no meter calibration at {path}; build one with "
                                   "python -m cifar_transfer.meter CHECKPOINT_DIR --data-dir DATA")
        try:
            data = json.loads(path.read_text())
            if data.get("version") != CALIBRATION_VERSION:
                raise CalibrationError(f"{path} is calibration version {data.get('version')!r}; this code reads {CALIBRATION_VERSION}")
            cal = cls(**data)
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise CalibrationError(f"{path} is not a meter calibration: {exc}") from None
        n = 3 * len(cal.layers)
        if len(cal.directions) != len(cal.mistakes) or any(len(d) != n for d in cal.directions):
            raise CalibrationError(f"{path}: directions do not match {len(cal.layers)} layers x {len(FEATURES)} features")
        return cal

    def check(self, model: nn.Module) -> None:
        """Raise :class:`CalibrationError` unless this calibration was made for ``model``'s batch-norm layers."""
        mine, theirs = self.fingerprint, fingerprint(model)
        if mine != theirs:
            what = ("a different number of batch-norm layers" if mine.get("batchnorm_layers") != theirs["batchnorm_layers"]
                    else "different layer widths" if mine.get("widths") != theirs["widths"]
                    else "different running statistics (other weights)")
            raise CalibrationError(f"the meter calibration was made for another model ({what}); rebuild it with "
                                   "python -m cifar_transfer.meter CHECKPOINT_DIR --data-dir DATA")

    def derived_thresholds(self) -> dict:
        """The thresholds recomputed from ``held_out_scores`` as ``derivation`` records (what ``thresholds`` must equal)."""
        if not self.held_out_scores:
            raise CalibrationError("this calibration does not record the held-out scores its thresholds came from")
        h = self.held_out_scores
        return derive_thresholds(torch.tensor(h["per_mistake"], dtype=torch.float64),
                                 torch.tensor(h["channel"], dtype=torch.float64) if h.get("channel") is not None else None,
                                 self.derivation, torch.tensor(h["class"]) if h.get("class") is not None else None)

    # -- scoring ---------------------------------------------------------------
    def scores(self, features: torch.Tensor, twin_features: torch.Tensor | None = None) -> MeterScores:
        f = features.double()
        w = torch.tensor(self.directions, dtype=torch.float64)
        z = (f @ w.T - torch.tensor(self.centres, dtype=torch.float64)) / torch.tensor(self.scales, dtype=torch.float64)
        channel = None if twin_features is None else self.channel_evidence(f, twin_features)
        return MeterScores(z.max(dim=1).values, z, channel)

    def channel_evidence(self, features: torch.Tensor, other: torch.Tensor) -> torch.Tensor | None:
        """``(N,)`` standardized channel-order evidence of ``features`` against ``other`` (positive: ``features``
        fit the network's channel order better). Against an input's own channel-swapped twin this is the paired
        channel score; against the correct panel of the same picture, the app's channel shift. None: not calibrated."""
        if self.channel_direction is None:
            return None
        wc = torch.tensor(self.channel_direction, dtype=torch.float64)
        return ((features.double() - other.double()) @ wc) / self.channel_scale

    def batch_scores(self, s: MeterScores) -> tuple[float, float | None]:
        """One score for a whole batch: sqrt(n) times the mean standardized discriminant (same scale as one image)."""
        n = s.per_mistake.shape[0]
        score = (s.per_mistake.mean(dim=0) * n ** 0.5).max().item()
        channel = None if s.channel is None else (s.channel.mean() * n ** 0.5).item()
        return score, channel

    def thresholds_for(self, n_images: int) -> dict:
        """Thresholds for one image, or for a batch statistic of ``n_images`` (the largest calibrated size <= n)."""
        if n_images <= 1:
            return self.thresholds
        sizes = [int(k) for k in self.thresholds.get("batch", {}) if int(k) <= n_images]
        if not sizes:
            return self.thresholds
        return dict(self.thresholds, **self.thresholds["batch"][str(max(sizes))])

    def paired_thresholds(self) -> dict:
        """Thresholds of a panel judged against the correct panel of the same picture (:meth:`paired_reading`).

        ``drifting`` and ``broken``: the single-image thresholds less the median score of the held-out correct
        images (``held_out_scores``, the images the thresholds come from): the shift that carries a typical
        correctly preprocessed image to each threshold. ``channel``: the single-image channel threshold, at most 0:
        for a panel that is its reference's channel-swapped twin the channel shift is minus the reference's channel
        score, so it falls below this as often as a correct image's channel score does (at most
        ``channel_quantile`` of them, split-conformal). A panel equal to its reference (both shifts 0) is never
        flagged."""
        if not self.held_out_scores:
            raise CalibrationError("this calibration does not record the held-out scores its thresholds came from")
        typical = statistics.median(max(row) for row in self.held_out_scores["per_mistake"])
        t = self.thresholds
        return {"drifting": t["drifting"] - typical, "broken": t["broken"] - typical, "channel": min(t["channel"], 0.0),
                "typical": typical}

    def _share(self) -> str:
        """The share of correctly preprocessed images the drifting threshold lets through above it, in words."""
        return f"{100 * (1 - self.derivation['drifting_quantile']):.0f}%"

    def reading(self, score: float, channel: float | None, n_images: int = 1) -> MeterReading:
        """The absolute reading (no reference: ``check_batch``, the doctor, a batch as a whole): ``score`` and
        ``channel`` against what correctly preprocessed training images give. Its words say so: a picture unlike
        the training images can read "drifting" here whatever its preprocessing."""
        t = self.thresholds_for(n_images)
        what = "this image" if n_images == 1 else f"these {n_images} images"
        subject = "this image fits" if n_images == 1 else f"these {n_images} images fit"
        against = ("correctly preprocessed training images" if n_images == 1 else
                   f"batches of {n_images} correctly preprocessed training images")
        if score > t["broken"]:
            return MeterReading(score, "broken", COLOURS["broken"],
                                "Far outside the contract: the batch-norm layers see statistics no correctly preprocessed "
                                f"training image came near ({_vs('score', score, 'beyond', t['broken'])}).", channel)
        if score > t["drifting"]:
            return MeterReading(score, "drifting", COLOURS["drifting"],
                                "Outside the contract, measured against correctly preprocessed training images: the "
                                f"batch-norm layers' statistics on {what} lie where at most {self._share()} of {against} "
                                f"do ({_vs('score', score, 'above', t['drifting'])}). A different normalization does "
                                "this; so can pictures unlike the training images.", channel)
        if channel is not None and channel < t["channel"]:
            return MeterReading(score, "drifting", COLOURS["drifting"],
                                f"Channel order looks swapped: {_channel_low(channel, subject)} "
                                f"({_vs('channel score', channel, 'below', t['channel'])}). Value range and "
                                f"statistics are otherwise within what {against} show "
                                f"({_vs('score', score, 'at most', t['drifting'])}).",
                                channel)
        return MeterReading(score, "ok", COLOURS["ok"],
                            "Inside the contract as far as the meter can tell: value range, mean and contrast look like "
                            f"those of {against} ({_vs('score', score, 'at most', t['drifting'])})"
                            f"{_channel_clause(channel, t['channel'], 'its swap', 'channel score')}.", channel)

    def reference_reading(self, score: float, channel: float | None) -> MeterReading:
        """The app's correct panel: the reference the other panels are judged against, never "drifting" or
        "broken". "unusual" when the picture itself is unlike the training images even under the model's own
        preprocessing (its score above the single-image drifting threshold, or its channel score below the channel
        threshold); else "ok"."""
        t = self.thresholds
        reasons = []
        if score > t["broken"]:
            reasons.append(f"its statistics are far from the training images' ({_vs('score', score, 'beyond', t['broken'])}"
                           ": no correctly preprocessed training image came near)")
        elif score > t["drifting"]:
            reasons.append(f"its statistics differ from the training images' ({_vs('score', score, 'above', t['drifting'])}"
                           f": at most {self._share()} of correctly preprocessed training images "
                           "score higher)")
        if channel is not None and channel < t["channel"]:
            reasons.append(f"{_channel_low(channel, 'it fits')} ({_vs('channel score', channel, 'below', t['channel'])})")
        if reasons:
            return MeterReading(score, "unusual", COLOURS["unusual"],
                                f"An unusual picture for this model: even under the model's own preprocessing, "
                                f"{'; and '.join(reasons)}. So the meter compares the other panels with this one: this "
                                "is about the picture, not its preprocessing.", channel)
        return MeterReading(score, "ok", COLOURS["ok"],
                            "The reference: this picture under the model's own preprocessing, which the meter compares "
                            "the other panels with. Its statistics look like those of correctly preprocessed training "
                            f"images ({_vs('score', score, 'at most', t['drifting'])})"
                            f"{_channel_clause(channel, t['channel'], 'its swap', 'channel score')}.", channel)

    def paired_reading(self, score: float, shift: float, channel_shift: float | None,
                       reference_channel: float | None, thresholds: dict | None = None) -> MeterReading:
        """A wrong panel judged against the correct panel of the same picture (:meth:`paired_thresholds`).

        ``shift``: the largest increase of a mistake's standardized discriminant over the reference's;
        ``channel_shift``: this panel's channel-order evidence against the reference; ``reference_channel``: the
        reference's own channel score (below the channel threshold, or None, the channel shift is not judged);
        ``thresholds``: :meth:`paired_thresholds` (computed when not given)."""
        t = thresholds or self.paired_thresholds()
        vs = "against the correct panel of this same picture"
        judged = (channel_shift is not None and reference_channel is not None
                  and reference_channel >= self.thresholds["channel"])

        def read(level: str, words: str) -> MeterReading:
            return MeterReading(score, level, COLOURS[level], words, None, shift=shift, channel_shift=channel_shift)

        if shift > t["broken"]:
            return read("broken", f"Far outside the contract: {vs}, the batch-norm layers' statistics moved towards a "
                                  f"normalization mistake ({_vs('shift', shift, 'beyond', t['broken'])}: enough to "
                                  "carry a typical correctly preprocessed training image far beyond any of them).")
        if shift > t["drifting"]:
            return read("drifting", f"Outside the contract: {vs}, the batch-norm layers' statistics moved towards a "
                                    f"normalization mistake ({_vs('shift', shift, 'above', t['drifting'])}: enough to "
                                    "carry a typical correctly preprocessed training image past the score at most "
                                    f"{self._share()} of them exceed).")
        moved = ("its statistics moved towards a normalization mistake, less than counts as drifting" if shift > 0 else
                 "its statistics moved towards no normalization mistake")
        moved += f" ({_vs('shift', shift, 'at most', t['drifting'])})"
        if judged and channel_shift < t["channel"]:
            evidence = _vs("channel shift", channel_shift, "below", t["channel"])
            return read("drifting", f"Channel order looks swapped: {vs}, this panel's statistics changed the way "
                                    f"exchanging red and blue changes them ({evidence}); otherwise {moved}.")
        if judged:
            channel = _channel_clause(channel_shift, t["channel"], "the correct panel's", "channel shift")
        elif reference_channel is None or channel_shift is None:
            channel = "; channel order was not judged (it needs the correct panel's channel-swapped twin)"
        else:
            channel = (f"; channel order was not judged: on this picture "
                       f"{_channel_low(reference_channel, 'even the correct panel fits')} "
                       f"({_vs('channel score', reference_channel, 'below', self.thresholds['channel'])})")
        return read("ok", f"Inside the contract as far as the meter can tell: {vs}, {moved}{channel}.")

    def panel_readings(self, features: torch.Tensor, reference_twin: torch.Tensor | None,
                       reference: int = 0) -> list[MeterReading]:
        """The app's readings of the panels of one picture, ``features`` ``(N, F)`` from one forward pass: row
        ``reference`` (the correct panel, whose channel-swapped twin's features are ``reference_twin``, ``(F,)``)
        by :meth:`reference_reading`, every other row against it by :meth:`paired_reading`."""
        s = self.scores(features)
        ref = features[reference:reference + 1]
        ref_channel = None if reference_twin is None else self.channel_evidence(ref, reference_twin[None])
        ref_channel = None if ref_channel is None else float(ref_channel[0])
        shift = (s.per_mistake - s.per_mistake[reference]).max(dim=1).values
        channel_shift = self.channel_evidence(features, ref)
        t = self.paired_thresholds()
        out = []
        for i in range(len(features)):
            if i == reference:
                out.append(self.reference_reading(float(s.score[i]), ref_channel))
            else:
                out.append(self.paired_reading(float(s.score[i]), float(shift[i]),
                                               None if channel_shift is None else float(channel_shift[i]), ref_channel, t))
        return out


def _num(x: float, decimals: int | None = None) -> str:
    """A number in the meter's words: ``decimals`` decimals (default: 2, none from 100 on), thousands separated."""
    return f"{x:,.{(0 if abs(x) >= 100 else 2) if decimals is None else decimals}f}"


def _channel_low(channel: float, subject: str) -> str:
    """What a channel score below its threshold says, true to its sign; ``subject`` with its verb ("it fits")."""
    if channel < 0:
        return f"{subject} the network better with red and blue exchanged"
    return (f"{subject} the network's channel order less clearly than correctly preprocessed images do, as when red "
            "and blue are exchanged in some of them")


def _channel_clause(channel: float | None, threshold: float, than: str, name: str) -> str:
    """The end of an "ok" reading about channel order, true to the sign of ``channel`` (not below ``threshold``)."""
    if channel is None:
        return "; channel order was not checked (it needs the channel-swapped twin)"
    if channel >= 0:
        return f", and the channel order fits at least as well as {than} ({_vs(name, channel, 'not below', threshold)})"
    return (f"; the channel order fits slightly worse than {than}, not enough to call it swapped "
            f"({_vs(name, channel, 'not below', threshold)})")


def _vs(name: str, value: float, relation: str, threshold: float) -> str:
    """"score 3.58, above 3.56": a number and the threshold it is compared with (:func:`_num`), with more decimals (up
    to 6) where unequal numbers would look equal or a number's sign would not show, so the words never read "3.56,
    above 3.56" nor call -0.00 negative."""
    dv, dt = (0 if abs(x) >= 100 else 2 for x in (value, threshold))
    while max(dv, dt) < 6 and ((value != threshold and round(value, dv) == round(threshold, dt))
                               or (value != 0 and round(value, dv) == 0)):
        dv = dt = max(dv, dt) + 1
    return f"{name} {_num(value, dv)}, {relation} {_num(threshold, dt)}"


def find_calibration(model: nn.Module, folder: str | Path | None = None) -> MeterCalibration:
    """The calibration in ``folder`` (checked against ``model``); without ``folder``, the first shipped one that fits."""
    if folder is not None:
        cal = MeterCalibration.load(folder)
        cal.check(model)
        return cal
    mine = fingerprint(model)
    for path in sorted(SHIPPED_CHECKPOINTS.glob(f"*/{CALIBRATION_FILE}")):
        try:
            cal = MeterCalibration.load(path)
        except CalibrationError:
            continue
        if cal.fingerprint == mine:
            return cal
    raise CalibrationError("no shipped meter calibration fits this model; build one with "
                           "python -m cifar_transfer.meter CHECKPOINT_DIR --data-dir DATA")


SHIPPED_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@torch.no_grad()
def meter_features(model: nn.Module, normalized: torch.Tensor, layers: list[int] | None = None,
                   twin: bool = True, batch_size: int = 64, engine: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features of ``normalized`` (and of its channel-swapped twin) in one forward pass per chunk, eval mode.

    The layer statistics come from the inference engine (``engine``: ONNX Runtime on a CPU, see engine.py)."""
    from .engine import make_engine

    was_training = model.training
    model.eval()
    chosen = batchnorm_layers(model)
    chosen = chosen if layers is None else [chosen[i] for i in layers]
    bns, widths = [bn for _, bn in chosen], [bn.num_features for _, bn in chosen]
    feats, twins = [], []
    try:
        run = make_engine(model, [name for name, _ in chosen], normalized.shape[-1], prefer=engine)
        for s in range(0, len(normalized), batch_size):
            x = normalized[s:s + batch_size]
            n = len(x)
            _, stats = run(torch.cat([x, channel_swap(x)]) if twin else x)
            f = layer_features(bns, list(zip(stats[:, 0].split(widths, dim=1), stats[:, 1].split(widths, dim=1))))
            feats.append(f[:n])
            if twin:
                twins.append(f[n:])
    finally:
        model.train(was_training)
    return torch.cat(feats), (torch.cat(twins) if twin else None)


# -- calibration ---------------------------------------------------------------------------------

#: Normalization mistakes the meter is told about (bgr is read by the paired channel check instead).
MISTAKES = ("no_normalization", "raw_0_255", "other_model_stats", "cifar10_stats", "normalized_twice")
SHRINKAGE = 0.5  # LDA covariance shrinkage towards its diagonal
DRIFTING_QUANTILE = 0.98  # conformal level of the score: a new correct image exceeds it with probability <= 2%
CHANNEL_QUANTILE = 0.02  # conformal level of the channel score: a new correct image falls below with probability <= 2%
BROKEN_FACTOR = 3.0  # broken: this many times the largest correct held-out score
BATCH_SIZES = (2, 4, 8, 16, 32, 64)  # batch statistics get their own thresholds
BATCH_DRAWS = 4000
#: Shares of the calibration images: LDA directions / centres and scales / thresholds (three disjoint parts, so the
#: threshold images are new to everything the score is made of, as a user's images are).
SPLIT = {"fit": 0.5, "standardize": 0.25, "threshold": 0.25}


def conformal_upper(scores: torch.Tensor, level: float) -> float:
    """The ``ceil((n + 1) * level)``-th smallest of ``n`` scores: a new score exchangeable with them exceeds it
    with probability at most ``1 - level`` (split-conformal finite-sample correction; a plain quantile promises
    that only as n grows)."""
    n = len(scores)
    k = math.ceil((n + 1) * level - 1e-9)
    if k > n:
        raise ValueError(f"{n} scores are too few for a level of {level}")
    return scores.double().sort().values[k - 1].item()


def conformal_lower(scores: torch.Tensor, level: float) -> float:
    """The ``floor((n + 1) * level)``-th smallest of ``n`` scores: a new exchangeable score falls below it with
    probability at most ``level``."""
    n = len(scores)
    k = math.floor((n + 1) * level + 1e-9)
    if k < 1:
        raise ValueError(f"{n} scores are too few for a level of {level}")
    return scores.double().sort().values[k - 1].item()


def predictive_batch_statistics(z: torch.Tensor, size: int, draws: int, seed: int,
                                groups: torch.Tensor | None = None) -> torch.Tensor:
    """``(draws, ...)`` simulated batch statistics ``sqrt(size) * mean`` of ``size`` NEW correct images, from the
    scores ``z`` (``(N, ...)``) of held-out correct images.

    A new batch's mean differs from the mean of the population it comes from by its own sampling noise
    (variance s^2 / size), and that population's mean is known only from the held-out images (error s^2 / N).
    Each draw adds both: ``size`` images drawn with replacement, plus the shift of a bootstrap resample of the
    population's held-out images from their mean. With ``groups`` (one label per image: the class), each draw
    takes its images from ONE random group: a batch of a single class (a data loader that does not shuffle) sits
    farther from the training mean than a mixed one, so thresholds from these draws hold for both, and leave a
    margin as large as the classes' spread for images from another source. Drawing batches from the held-out
    images alone (without replacement, without the shift, mixed classes) gives thresholds too tight for images
    never seen."""
    g = torch.Generator().manual_seed(seed)
    z = z.double()
    pools = [torch.arange(len(z))] if groups is None else [torch.nonzero(groups == v).flatten() for v in groups.unique()]
    pools = [p for p in pools if len(p) > 1]
    which = torch.randint(len(pools), (draws,), generator=g)
    out = torch.empty((draws, *z.shape[1:]), dtype=torch.float64)
    for i, pool in enumerate(pools):
        d = int((which == i).sum())
        if not d:
            continue
        zp = z[pool]
        batch = zp[torch.randint(len(pool), (d, size), generator=g)].mean(dim=1)
        shift = zp[torch.randint(len(pool), (d, len(pool)), generator=g)].mean(dim=1) - zp.mean(dim=0)
        out[which == i] = (batch + shift) * size ** 0.5
    return out


def derive_thresholds(per_mistake: torch.Tensor, channel: torch.Tensor | None, derivation: dict,
                      groups: torch.Tensor | None = None) -> dict:
    """The meter's thresholds from the scores of held-out correct images, as ``derivation`` records how.

    ``per_mistake``: ``(N, M)`` standardized discriminants; ``channel``: ``(N,)`` paired channel scores (or None);
    ``groups``: the images' classes, for batch draws of one class each (see :func:`predictive_batch_statistics`)."""
    score = per_mistake.double().max(dim=1).values
    out = {"drifting": round(conformal_upper(score, derivation["drifting_quantile"]), 4),
           "broken": round(derivation["broken_factor"] * score.max().item(), 4)}
    if channel is not None:
        out["channel"] = round(conformal_lower(channel, derivation["channel_quantile"]), 4)
    out["batch"] = {}
    for size in derivation["batch_sizes"]:
        stat = predictive_batch_statistics(per_mistake, size, derivation["batch_draws"], derivation["seed"] + size, groups)
        row = {"drifting": round(torch.quantile(stat.max(dim=1).values, derivation["drifting_quantile"]).item(), 4)}
        if channel is not None:
            chan = predictive_batch_statistics(channel[:, None], size, derivation["batch_draws"],
                                               derivation["seed"] + 1000 + size, groups)
            row["channel"] = round(torch.quantile(chan[:, 0], derivation["channel_quantile"]).item(), 4)
        out["batch"][str(size)] = row
    return out


def _lda(a: torch.Tensor, b: torch.Tensor, shrinkage: float) -> torch.Tensor:
    cov = 0.5 * (torch.cov(a.T) + torch.cov(b.T))
    cov = (1 - shrinkage) * cov + shrinkage * torch.diag(cov.diag())
    cov = cov + 1e-9 * cov.diag().mean() * torch.eye(len(cov), dtype=cov.dtype)
    return torch.linalg.solve(cov, b.mean(0) - a.mean(0))


def split_indices(n: int, seed: int, split: dict | None = None) -> dict[str, torch.Tensor]:
    """Seeded disjoint parts of ``n`` calibration images, named and sized as ``split`` (default :data:`SPLIT`)."""
    split = SPLIT if split is None else split
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for i, (name, share) in enumerate(split.items()):
        stop = n if i == len(split) - 1 else start + round(share * n)
        out[name] = perm[start:stop]
        start = stop
    return out


def fit_calibration(model: nn.Module, features: dict[str, torch.Tensor], twin_correct: torch.Tensor,
                    twin_features: dict[str, torch.Tensor] | None = None, *, source: str = "",
                    layers: list[int] | None = None, seed: int = 0,
                    groups: torch.Tensor | None = None) -> MeterCalibration:
    """Fit the meter on per-image ``features`` of training images under ``correct`` and each mistake.

    ``twin_correct``: features of the correct inputs' channel-swapped twins. ``layers`` (indices into
    :func:`batchnorm_layers`; default all): which layers' features the meter reads (``features`` hold all
    of them). Images are split in three (seeded, :data:`SPLIT`): directions from the first part, centres
    and scales from the second, thresholds (:func:`derive_thresholds`) and the recorded rates from the third.
    ``groups``: each image's class (batch thresholds then hold for batches of one class; recorded).
    """
    all_layers = batchnorm_layers(model)
    layers = list(range(len(all_layers))) if layers is None else list(layers)
    cols = torch.tensor([3 * i + j for i in layers for j in range(len(FEATURES))])
    if features["correct"].shape[1] != len(cols):
        features = {k: v[:, cols] for k, v in features.items()}
        twin_correct = twin_correct[:, cols]
        twin_features = {k: v[:, cols] for k, v in (twin_features or {}).items()}
    n = len(features["correct"])
    parts = split_indices(n, seed)
    fit, std, held = parts["fit"], parts["standardize"], parts["threshold"]
    x0 = features["correct"].double()
    directions, centres, scales = [], [], []
    for m in MISTAKES:  # direction from the fit part; centre and scale from the standardize part (no in-sample bias)
        w = _lda(x0[fit], features[m].double()[fit], SHRINKAGE)
        p = x0[std] @ w
        directions.append(w.tolist()); centres.append(p.mean().item()); scales.append(p.std().item())
    diff = x0 - twin_correct.double()
    wc = _lda(-diff[fit], diff[fit], SHRINKAGE)  # antisymmetric: a swapped input gives -diff
    channel_scale = (diff[std] @ wc).std().item()
    cal = MeterCalibration(fingerprint(model), layers, [all_layers[i][0] for i in layers], list(MISTAKES), directions,
                           centres, scales, wc.tolist(), channel_scale, {}, {}, {})
    s0 = cal.scores(x0[held], twin_correct[held])
    cal.derivation = {
        "images": source, "n_images": n, "fit_images": len(fit), "standardize_images": len(std),
        "held_out_images": len(held), "seed": seed, "split": dict(SPLIT),
        "features": list(FEATURES), "shrinkage": SHRINKAGE, "drifting_quantile": DRIFTING_QUANTILE,
        "channel_quantile": CHANNEL_QUANTILE, "broken_factor": BROKEN_FACTOR, "batch_sizes": list(BATCH_SIZES),
        "batch_draws": BATCH_DRAWS, "batch_draws_from": "one class" if groups is not None else "all held-out images",
        "how": ("Three seeded disjoint parts of the training images (split). Directions: shrinkage LDA between correct "
                "and each mistake on the fit part; each standardized (centre, scale) by the correct standardize-part "
                "images' projections; score = the largest. Channel: LDA on features(input) - features(channel-swapped "
                "input), antisymmetric, scaled on the standardize part. Thresholds from the held-out (threshold) part, "
                "new to the directions, centres and scales as a user's images are, whose scores are recorded in "
                "held_out_scores (derive_thresholds recomputes every threshold from them): drifting = the "
                "ceil((n+1) x drifting_quantile)-th smallest score and channel = the floor((n+1) x channel_quantile)-th "
                "smallest channel score (split-conformal: a new correct image crosses each with probability at most "
                "1 - drifting_quantile, resp. channel_quantile); broken = broken_factor x the largest held-out score; "
                "for a batch of n (sqrt(n) x the mean per-mistake score, the largest; sqrt(n) x the mean channel "
                "score) the same quantiles of batch_draws predictive draws: n held-out images drawn with replacement "
                "plus the shift of a bootstrap resample of their mean (the error of the centre the batch is compared "
                "with), each draw from the held-out images of one random class when batch_draws_from says so "
                "(predictive_batch_statistics)."),
    }
    cal.held_out_scores = {"per_mistake": [[round(v, 4) for v in row] for row in s0.per_mistake.tolist()],
                           "channel": [round(v, 4) for v in s0.channel.tolist()]}
    if groups is not None:
        cal.held_out_scores["class"] = [int(v) for v in torch.as_tensor(groups)[held].tolist()]
    cal.thresholds = cal.derived_thresholds()
    twin_features = twin_features or {}
    measured = {}
    for key, f in features.items():
        tw = twin_features.get(key, twin_correct if key == "correct" else None)
        s = cal.scores(f[held], None if tw is None else tw[held])
        flagged = s.score > cal.thresholds["drifting"]
        row = {"score_flag_rate": round(flagged.float().mean().item(), 4)}
        if s.channel is not None:
            row["channel_flag_rate"] = round((s.channel < cal.thresholds["channel"]).float().mean().item(), 4)
            flagged = flagged | (s.channel < cal.thresholds["channel"])
        row["flag_rate"] = round(flagged.float().mean().item(), 4)
        measured[key] = row
    cal.measured = measured
    return cal


def _training_pixels(data_dir: Path, per_class: int, seed: int, with_labels: bool = False, *, side: int = 32,
                     contract=None):
    """``per_class`` seeded training images of each class, as ``(N, 3, side, side)`` uint8 (and their class indices).

    Read by the one image pipeline (:func:`cifar_transfer.images.read_square` at ``side``, ``contract``'s resize
    policy; default: the dataset's 32 px and centre crop): the pixels the dataset stores for these files, so a
    32 x 32 CIFAR-10 image is kept exactly as decoded.
    """
    import random

    from .images import ImageInputError, read_square

    root = Path(data_dir) / "train"
    if not root.is_dir():
        raise SystemExit(f"error: no train/ folder under {data_dir}")
    rng = random.Random(seed)
    paths, labels = [], []
    for i, c in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        files = sorted((root / c).iterdir())
        chosen = rng.sample(files, min(per_class, len(files)))
        paths += chosen
        labels += [i] * len(chosen)
    arrays = []
    for p in paths:
        try:
            arrays.append(read_square(p, side, contract))
        except ImageInputError as exc:
            raise SystemExit(f"error: cannot read training image {p}: {exc}") from None
    return (torch.stack(arrays), torch.tensor(labels)) if with_labels else torch.stack(arrays)


def calibrate(model: nn.Module, pixels: torch.Tensor, source: str = "", seed: int = 0, log=print,
              cache: str | Path | None = None, labels: torch.Tensor | None = None) -> MeterCalibration:
    """Calibrate on RGB uint8 training ``pixels`` (N, 3, H, W): every variant of the model's contract, one pass each.

    ``cache``: a file for the features (read when it exists, else written), to refit without the forward passes.
    ``labels``: the images' classes (see :func:`fit_calibration`'s ``groups``).
    """
    from .contract import variant_contracts

    if cache is not None and Path(cache).is_file():
        data = torch.load(cache)
        return fit_calibration(model, data["features"], data["twins"]["correct"], data["twins"], source=source, seed=seed,
                               groups=labels)
    contracts = variant_contracts(model.contract)
    base = contracts["correct"].transform().resize(pixels.float())
    features, twins = {}, {}
    for key, c in contracts.items():
        log(f"  features under {key} ({len(pixels)} images)")
        f, t = meter_features(model, c.transform()(base), twin=key in ("correct", "bgr"))
        features[key] = f
        if t is not None:
            twins[key] = t
    if cache is not None:
        torch.save({"features": features, "twins": twins}, cache)
    return fit_calibration(model, features, twins["correct"], twins, source=source, seed=seed, groups=labels)


# -- the calibration file beside its weights, and the command that writes it ---------------------------------


def fewest_scores() -> int:
    """The fewest held-out scores the thresholds can come from: :func:`conformal_upper` at
    :data:`DRIFTING_QUANTILE` and :func:`conformal_lower` at :data:`CHANNEL_QUANTILE`, asked as the fit asks them."""
    for n in range(1, 100_000):
        try:
            conformal_upper(torch.zeros(n), DRIFTING_QUANTILE)
            conformal_lower(torch.zeros(n), CHANNEL_QUANTILE)
            return n
        except ValueError:
            continue
    raise ValueError(f"no number of scores reaches the levels {DRIFTING_QUANTILE} and {CHANNEL_QUANTILE}")


def fewest_per_class(class_sizes: list[int], seed: int = 0) -> int | None:
    """The smallest ``--per-class`` whose threshold part (:func:`split_indices`) holds :func:`fewest_scores` images,
    for classes of ``class_sizes`` images; None: all of them are too few."""
    need = fewest_scores()
    for per_class in range(1, max(class_sizes, default=0) + 1):
        if len(split_indices(sum(min(per_class, size) for size in class_sizes), seed)["threshold"]) >= need:
            return per_class
    return None


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cifar_transfer.meter",
                                description="Calibrate the contract meter of a checkpoint on CIFAR-10 training images.")
    p.add_argument("checkpoint", help="checkpoint folder; the calibration is written there as " + CALIBRATION_FILE)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 JPEG copy (its train/ class folders are read)")
    p.add_argument("--per-class", type=int, default=250,
                   help="training images per class (split in three: directions, standardization, thresholds; "
                        "the thresholds need enough of them: the minimum is checked before any work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", help="features file: read when present (refit only), else written")
    p.add_argument("--overwrite", action="store_true", help=f"replace the {CALIBRATION_FILE} already in the folder")
    args = p.parse_args(argv)
    from .model import CheckpointError, load_checkpoint

    out = Path(args.checkpoint) / CALIBRATION_FILE
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} already exists; not replacing it: pass --overwrite to rebuild it")
    train = Path(args.data_dir) / "train"
    if not train.is_dir():
        raise SystemExit(f"error: no train/ folder under {args.data_dir}")
    sizes = [sum(1 for _ in c.iterdir()) for c in train.iterdir() if c.is_dir()]
    fewest = fewest_per_class(sizes, args.seed)
    if fewest is None or args.per_class < fewest:
        have = (f"at least {fewest} per class for these {len(sizes)} classes" if fewest else
                f"more than the {sum(sizes)} images of {train}")
        p.error(f"--per-class {args.per_class} is too few: the thresholds need {fewest_scores()} held-out images "
                f"(the {SPLIT['threshold']:.0%} share of all), so {have}")
    torch.set_num_threads(args.threads)
    try:
        model = load_checkpoint(args.checkpoint).eval()
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    pixels, labels = _training_pixels(Path(args.data_dir), args.per_class, args.seed, with_labels=True)
    source = f"CIFAR-10 train split, {args.per_class} per class, seed {args.seed}"
    cal = calibrate(model, pixels, source=source, seed=args.seed, cache=args.cache, labels=labels)
    # what rebuilds this file (--cache only skips the forward passes of a previous run of the same command)
    cal.derivation["command"] = (f"python -m cifar_transfer.meter {args.checkpoint} --data-dir {args.data_dir} "
                                 f"--per-class {args.per_class} --seed {args.seed}")
    cal.save(out)
    print(f"wrote {out}: thresholds {cal.thresholds}")
    for k, v in cal.measured.items():
        print(f"  {k:<18} {v}")


if __name__ == "__main__":
    main()
