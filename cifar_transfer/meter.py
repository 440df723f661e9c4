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
images; predictive draws of one class at a time for batches, see :func:`cifar_transfer.meter_fit.derive_thresholds`). A second, paired
check compares the input with its own channel-swapped
twin (both in the same forward pass): an RGB network's deeper layers fit the
right channel order better than the swapped one on most images, which is the
only signal for channel order we found (the features of a single input are
near chance for it). Everything the meter needs (layers, directions,
thresholds, how they were derived and what was measured on held-out training
images) lives in ``meter_calibration.json`` beside the checkpoint; it is keyed
to the model's batch-norm layers (count, widths and a hash of the running
statistics), so a file made for another model is refused. Build it (``meter_fit.py``, the fitting) with::

    python -m cifar_transfer.meter CHECKPOINT_DIR --data-dir ../shared/datasets/cifar10-jpeg

In the app every panel of one picture is read against the correct panel of the same
picture (:meth:`MeterCalibration.paired_thresholds`, ``reference_reading``); readings
without such a reference (``check_batch``, the doctor) stay absolute.

This module is longer than the project's ~500 lines: the calibration value, its
scoring and the words of every reading stay together so that each level's rule sits
next to the words that state it (``tests/test_meter_words.py`` holds them to each other).

**First-layer reading** (:func:`first_layer_reading`): the older, uncalibrated reading of
the first batch-norm layer's divergence D alone (:mod:`cifar_transfer.divergence` computes
D), kept for models without a calibration (the doctor on a bare backbone).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CALIBRATION_NAME, batchnorm_layers, fingerprint
from .divergence import bn_divergence, channel_stats, gaussian_kl, running_stats
from .engine import make_engine

# First-layer readings (upper bounds of D per image), for models WITHOUT a calibration only. Measured on 200
# CIFAR-10 test images with the ImageNet EfficientNet-Lite0 weights at 96 px: correct D per image had median 0.34,
# max 1.11; raw 0-255 input about 15,000. They catch raw 0-255 pixels and little else (see docs/meter-and-doctor.md).
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
            self.captured[slot].append(channel_stats(args[0]))
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

    def stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the per-image ``(mean, variance)`` of its input over every captured pass."""
        if not self.captured or not self.captured[0]:
            raise RuntimeError("no forward pass was captured")
        return [(torch.cat([m for m, _ in caps]), torch.cat([v for _, v in caps])) for caps in self.captured]

    def features(self) -> torch.Tensor:
        """``(N, 3 * L)``: for each layer, log mean-KL, mean standardized shift, mean log variance ratio."""
        return layer_features(self.bns, self.stats())

    def divergences(self) -> list[torch.Tensor]:
        """Per layer, D per image (:func:`cifar_transfer.divergence.bn_divergence`)."""
        return [bn_divergence(s, running_stats(bn)) for bn, s in zip(self.bns, self.stats())]


def layer_features(bns: list[nn.BatchNorm2d], stats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The meter's ``(N, 3 * L)`` features from each layer's per-image ``(mean, variance)`` of its input, however
    they were measured (:class:`LayerProbe`'s hooks, or the extra outputs of an ONNX export, see engine.py).

    Per layer, in this order: log of D (the mean per-channel Gaussian KL divergence from the layer's running
    statistics, :func:`cifar_transfer.divergence.bn_divergence`), the mean standardized shift of the channel means,
    and the mean log variance ratio. Computed for all layers at once (one pass over the concatenated channels, then
    a per-layer average): the app runs this on every request, and a loop over 49 layers cost more than the
    arithmetic."""
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


if __name__ == "__main__":  # python -m cifar_transfer.meter builds a checkpoint's calibration (meter_fit.main)
    from .meter_fit import main  # here: meter_fit builds on this module, so this module imports it only as a command

    main()
