"""The contract doctor: which input normalization do these weights expect?

    python -m cifar_transfer.doctor efficientnet_lite0
    python -m cifar_transfer.doctor resnet18 --backbone-weights resnet18-f37072fd.pth
    python -m cifar_transfer.doctor checkpoints/efficientnet_lite0-cifar10 my_images/

A pretrained batch-norm layer remembers the mean and variance of its input over
the pretraining data. The doctor feeds a batch of images through the network
under every candidate normalization (the presets, the declared contract and the
wrong variants of :mod:`cifar_transfer.contract`) and ranks them by the
calibrated contract meter's misfit (:mod:`cifar_transfer.meter`: every
batch-norm layer, and the paired channel-order check), averaged over the images.
A model without a meter calibration is ranked by the first batch-norm layer
alone, on the pictures no larger than they are: that layer reads an enlarged
picture's blur as low contrast, which favours a larger gain.

Images from a folder are drawn round-robin over its subfolders (seeded), not the
first files in sorted order: folders are sorted by class more often than not,
and one class's colours and contrast move the evidence. A candidate counts as
*separated* from the first only when the first beats it on the evidence twice
over: on at least ``CONFIDENT`` of bootstrap resamples (subfolders, then images
within them), and by at least ``CONTENT_SPREAD`` standard deviations of the
per-image differences (content, not only sampling, must not explain it).
Channel order (the declared contract against its BGR twin) is judged on evidence
with each picture's colour cast held fixed (:func:`colour_cast_exchanged`): a
blue-sky folder otherwise "fits" BGR. The verdict: "DISAGREES" only when the
declared contract is separated from the first, with at least ``MIN_IMAGES``
images; "agrees" when every other candidate is; else "not sure", naming the
candidates the images could not separate (often only the channel order).
Batch-norm statistics never trained (running mean 0, variance 1) give "cannot
judge". :func:`check_batch` checks a tensor your own pipeline produced.

The evidence (candidates, misfits, the bootstrap and separation) is
:mod:`cifar_transfer.doctor_evidence`; which pictures are read,
:mod:`cifar_transfer.doctor_images`; this module holds the report, its verdict,
:func:`check_batch` and the command line.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbones import BACKBONES, BackboneError
from .checkpoint import CheckpointError, batchnorm_layers, read_metrics
from .cli import HelpFormatter
from .contract import WRONG_VARIANTS, NormalizationContract, to_display
from .divergence import first_layer_divergence
# The evidence and the pictures, and the names tests and benchmarks have always imported from here.
from .doctor_evidence import (BOOTSTRAP, CONFIDENT, CONTENT_SPREAD, DECLARED, aliases,  # noqa: F401
                              bootstrap_confidence, candidate_contracts, channel_margins, colour_cast_exchanged,
                              first_shares, measure_all, resample_weights, separated, untrained_layers)
from .doctor_images import (DEFAULT_SEED, EXAMPLES_DIR, DoctorError, builtin_images, describe_pick,  # noqa: F401
                            load_images, pick_images, procedural_images, read_images)
from .hub import resolve_checkpoint
from .hub_refs import REPO_ID
from .images import pixel_side, resize_side
from .meter import CALIBRATION_FILE, CalibrationError, MeterCalibration, find_calibration, first_layer_reading, meter_features
from .model import CifarTransferModel

#: Fewer images than this: the doctor ranks but asks for more and never says "disagrees".
MIN_IMAGES = 8


@dataclass
class Score:
    name: str
    contract: NormalizationContract
    divergence: float  # mean misfit over the images (lower fits better)
    aliases: list[str] = field(default_factory=list)
    level: str = ""
    separated: bool = False  # the first fits clearly better (see ``separated``); False for the first itself
    wins: float = 0.0  # share of bootstrap resamples on which the first beats it
    effect: float = 0.0  # the first's mean per-image margin over it, in standard deviations of those margins

    def to_dict(self) -> dict:
        return {"name": self.name, "divergence": self.divergence, "aliases": self.aliases, "level": self.level,
                "separated": self.separated, "wins": self.wins, "effect": self.effect,
                "contract": self.contract.to_dict()}


@dataclass
class DoctorReport:
    model: str
    declared: NormalizationContract | None
    ranking: list[Score]  # best first; empty when the statistics cannot be judged
    n_images: int
    images: str
    confidence: float = 1.0  # share of bootstrap resamples on which the best is first of all
    calibrated: bool = True
    untrained: list[str] = field(default_factory=list)  # probed batch-norm layers whose statistics were never trained

    @property
    def best(self) -> Score | None:
        return self.ranking[0] if self.ranking else None

    @property
    def unresolved(self) -> list[Score]:
        """The first, and every candidate the images could not separate from it."""
        return [s for i, s in enumerate(self.ranking) if i == 0 or not s.separated]

    @property
    def confident(self) -> bool:
        return bool(self.ranking) and self.n_images >= MIN_IMAGES and len(self.unresolved) == 1

    @property
    def close_runner_up(self) -> Score | None:
        if self.confident or len(self.ranking) < 2:
            return None
        return self.unresolved[1] if len(self.unresolved) > 1 else self.ranking[1]

    def _is_declared(self, s: Score) -> bool:
        return self.declared is not None and self.declared.same_normalization(s.contract)

    @property
    def agrees_with_declared(self) -> bool | None:
        """True: the declared contract ranks first; False: the first is separated from it (enough images); None: no
        declared one, cannot judge, or not separated."""
        if self.declared is None or not self.ranking:
            return None
        if self._is_declared(self.best):
            return True
        if self.n_images >= MIN_IMAGES and not any(self._is_declared(s) for s in self.unresolved):
            return False
        return None

    @property
    def verdict(self) -> str:
        """"cannot judge", "DISAGREES", "agrees" (declared), "most likely" (none declared) or "not sure"."""
        if not self.ranking:
            return "cannot judge"
        agrees = self.agrees_with_declared
        if agrees is False:
            return "DISAGREES"
        if self.confident:
            return "agrees" if agrees else "most likely"
        return "not sure"

    def _names(self, scores: list[Score]) -> str:
        names = [s.name + (" (declared)" if self._is_declared(s) and s.name != DECLARED else "") for s in scores]
        return " and ".join(names) if len(names) == 2 else ", ".join(names)

    def headline(self) -> str:
        """The verdict in one line."""
        v = self.verdict
        if v == "cannot judge":
            return "cannot judge: these batch-norm statistics were never trained (running mean 0, variance 1)"
        if v == "DISAGREES":
            return (f"DISAGREES with the declared contract {self.declared.name!r}: these weights fit "
                    f"{self._names(self.unresolved)} clearly better")
        if v == "agrees":
            return f"agrees with the declared contract {self.declared.name!r}: every other candidate fits clearly worse"
        if v == "most likely":
            return f"most likely {self.best.name}: every other candidate fits clearly worse"
        if self.n_images < MIN_IMAGES:
            return f"not sure: too few images ({self.n_images}); give at least {MIN_IMAGES}"
        if self._channel_order_only():
            return (f"not sure of the channel order: {self._names(self.unresolved)} fit these images alike; "
                    "every other candidate fits clearly worse")
        return (f"not sure: these images cannot separate {self._names(self.unresolved)}"
                + ("; nothing contradicts the declared contract" if self.declared is not None else ""))

    def _channel_order_only(self) -> bool:
        """The images separate every candidate but two that differ in channel order alone."""
        if len(self.unresolved) != 2:
            return False
        a, b = (s.contract for s in self.unresolved)
        return a.channel_order != b.channel_order and a.same_normalization(b.replace(channel_order=a.channel_order))

    def to_dict(self) -> dict:
        return {"model": self.model, "images": self.images, "n_images": self.n_images,
                "declared": self.declared.to_dict() if self.declared else None, "verdict": self.verdict,
                "headline": self.headline(), "most_likely": self.best.name if self.best else None,
                "agrees_with_declared": self.agrees_with_declared, "unresolved": [s.name for s in self.unresolved],
                "confidence": self.confidence, "confident": self.confident, "calibrated": self.calibrated,
                "untrained_layers": self.untrained,
                "close_runner_up": self.close_runner_up.name if self.close_runner_up else None,
                "ranking": [s.to_dict() for s in self.ranking]}

    def format(self) -> str:
        lines = [self.headline(), f"model: {self.model}", f"images: {self.n_images} from {self.images}"]
        if not self.ranking:
            shown = ", ".join(self.untrained[:3]) + (f" and {len(self.untrained) - 3} more" if len(self.untrained) > 3 else "")
            return "\n".join(lines + [f"never trained: {shown} (the batch-norm layers the doctor reads); no ranking"])
        what = "calibrated meter misfit" if self.calibrated else "first batch-norm layer's log divergence"
        lines += ["", f"{'rank':>4}  {'candidate':<18} {'score':>10}  {'separated':<16} {'meter (batch)':<13}  also known as"]
        for i, s in enumerate(self.ranking, start=1):
            apart = "(first)" if i == 1 else f"{'yes' if s.separated else 'no'} ({s.effect:+.1f} sd)"
            lines.append(f"{i:>4}  {s.name:<18} {s.divergence:>10.4g}  {apart:<16} {s.level:<13}  {', '.join(s.aliases)}")
        c = self.best.contract
        lines += ["", f"first: {self.best.name} = ((pixels/255*{c.pixel_scale:g})[{c.channel_order}] - {list(c.mean)}) / "
                      f"{list(c.std)}" + (f", applied {c.times}x" if c.times != 1 else ""),
                  f"score: mean {what} per image (lower fits better); first on {100 * self.confidence:.0f}% of "
                      f"{BOOTSTRAP} bootstrap resamples (subfolders, then images)",
                  f"separated: the first fits better on {100 * CONFIDENT:.0f}%+ of the resamples and by {CONTENT_SPREAD:g}+ "
                  "standard deviations (sd) of the per-image differences; channel order with each picture's colour "
                  "cast held fixed"]
        if not self.calibrated:
            lines.append("note: no meter calibration for this model: ranked by the first batch-norm layer alone, on the "
                         "pictures no larger than they are (value range and contrast; channel order only by colour).")
        return "\n".join(lines)


def _calibration_or_none(model: nn.Module, calibration: MeterCalibration | None) -> MeterCalibration | None:
    if not batchnorm_layers(model):
        raise DoctorError("the model has no batch-norm layer; the doctor reads batch-norm statistics")
    if calibration is not None:
        calibration.check(model)
        return calibration
    try:
        return find_calibration(model)
    except CalibrationError:
        return None


def diagnose(model: nn.Module, pixels: torch.Tensor, *, reference: NormalizationContract | None = None,
             name: str = "model", images: str = "given batch", calibration: MeterCalibration | None = None,
             groups: list | None = None, seed: int = DEFAULT_SEED) -> DoctorReport:
    """Rank candidate normalizations of RGB ``pixels`` (N, 3, H, W, 0..255) by mean meter misfit, best first, and
    mark those the images separate from the first. ``groups``: each image's subfolder (the bootstrap draws
    subfolders, then images); ``seed``: the bootstrap's."""
    _check_pixels(pixels)
    if groups is not None and len(groups) != len(pixels):
        raise DoctorError(f"groups names {len(groups)} subfolders for {len(pixels)} images")
    declared = getattr(model, "contract", None)
    reference = reference or declared
    if reference is None:
        raise DoctorError("the model declares no contract; pass reference= (e.g. contract.IMAGENET) to set the input size")
    cal = _calibration_or_none(model, calibration)
    never = untrained_layers(model, cal.layers if cal is not None else [0])
    if never:
        return DoctorReport(name, declared, [], len(pixels), images, 0.0, cal is not None, never)
    if cal is None:  # the first batch-norm layer reads an enlarged picture's blur as low contrast: not enlarged
        reference = reference.replace(input_size=min(reference.input_size, max(pixels.shape[-2:])))
    candidates = candidate_contracts(reference)
    names = list(candidates)
    own = next(i for i, c in enumerate(candidates.values()) if c.same_normalization(reference))
    twin_contract = WRONG_VARIANTS["bgr"].apply(reference)
    twin = next(i for i, c in enumerate(candidates.values()) if c.same_normalization(twin_contract))
    exchanged = colour_cast_exchanged(pixels)
    batches = [c.transform()(pixels.float()) for c in candidates.values()]
    batches += [candidates[names[own]].transform()(exchanged), candidates[names[twin]].transform()(exchanged)]
    measured = measure_all(model, batches, cal)
    per_image = torch.stack([m for m, _ in measured[:len(names)]])
    weights = resample_weights(len(pixels), groups, BOOTSTRAP, seed)
    order = per_image.double().mean(dim=1).argsort().tolist()
    first = order[0]
    margins = per_image.double() - per_image[first].double()
    if first in (own, twin):  # own order against the other, at equal colour cast
        channel = channel_margins(per_image[own], per_image[twin], measured[-2][0], measured[-1][0]).double()
        margins[twin if first == own else own] = channel if first == own else -channel
    apart, wins, effect = separated(margins, weights)
    scores = [Score(names[i], candidates[names[i]], float(per_image[i].mean()), aliases(names[i], candidates, reference),
                    measured[i][1], bool(apart[i]) and i != first, float(wins[i]), float(effect[i])) for i in order]
    return DoctorReport(name, declared, scores, len(pixels), images, float(first_shares(per_image, weights)[first]),
                        cal is not None)


def _check_pixels(pixels: torch.Tensor) -> None:
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise DoctorError(f"expected a (N, 3, H, W) batch of RGB pixels, got {shape}")
    if len(pixels) < 2:
        raise DoctorError("need at least 2 images to estimate batch statistics")

# -- checking a user's own batch ------------------------------------------------------------------


@dataclass
class BatchCheck:
    divergence: float  # the meter's score for the whole batch (calibrated), else the pooled first-layer divergence
    per_image: list[float]
    level: str
    words: str
    value_range: tuple[float, float]
    expected_range: tuple[float, float] | None
    consistent_with: list[str]  # candidates whose inverse maps the batch back to plausible 0..255 pixels
    channel_order: float | None = None  # paired channel-order score of the batch (positive: fits its own order)
    calibrated: bool = True

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def format(self) -> str:
        what = "contract meter" if self.calibrated else "first batch-norm divergence (no meter calibration)"
        lines = [f"{what}: {self.divergence:.4g} ({self.level}): {self.words}",
                 f"batch values in [{self.value_range[0]:.3g}, {self.value_range[1]:.3g}]"
                 + (f"; the model's contract gives [{self.expected_range[0]:.3g}, {self.expected_range[1]:.3g}]" if self.expected_range else "")]
        if self.consistent_with:
            lines.append("the values look like: " + ", ".join(self.consistent_with))
        return "\n".join(lines)


def plausible_origins(x: torch.Tensor, reference: NormalizationContract) -> list[str]:
    """Candidates under which ``x`` maps back to 0..255 pixels that use a fair part of that range."""
    out = []
    for name, c in candidate_contracts(reference).items():
        p = to_display(x.detach().float().cpu(), c, clip=False) * 255  # the pixels c would have turned into x
        inside = ((p >= -1) & (p <= 256)).float().mean().item()
        if inside >= 0.99 and (p.amax() - p.amin()).item() >= 64:
            out.append(name)
    return out


def check_batch(model: nn.Module, normalized_batch: torch.Tensor, calibration: MeterCalibration | None = None) -> BatchCheck:
    """Check a batch your pipeline produced (already normalized, ``(N, 3, H, W)``) against ``model``'s contract.

    With a meter calibration (given, or the shipped one that fits ``model``) this is the calibrated meter over
    the whole batch, channel-order check included; without one, the first batch-norm layer alone.
    """
    x = normalized_batch
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DoctorError(f"expected a normalized (N, 3, H, W) float batch, got {shape}")
    if not x.is_floating_point():
        raise DoctorError(f"expected a float batch (after normalization), got dtype {x.dtype}: is this raw uint8 pixels?")
    if len(x) < 2:
        raise DoctorError("need at least 2 images to estimate batch statistics")
    x = x.to(next(model.parameters()).device)
    cal = _calibration_or_none(model, calibration)
    if cal is None:
        pooled, per_image = first_layer_divergence(model, x)
        r, channel, values = first_layer_reading(pooled), None, per_image.tolist()
    else:
        f, twin = meter_features(model, x, cal.layers)
        s = cal.scores(f, twin)
        pooled, channel = cal.batch_scores(s)
        r, values = cal.reading(pooled, channel, n_images=len(x)), s.score.tolist()
    contract = getattr(model, "contract", None)
    return BatchCheck(pooled, [round(v, 6) for v in values], r.level, r.words,
                      (x.min().item(), x.max().item()), contract.value_range() if contract else None,
                      plausible_origins(x, contract) if contract else [], channel, cal is not None)


# -- models and command line ----------------------------------------------------------------------


def load_model(ref: str, backbone_weights: str | None = None):
    """A BACKBONES name (pretrained weights, new head), or a checkpoint folder or Hub repo id: this package's, or any
    timm classifier's (its declared contract then comes from its pretrained_cfg)."""
    model, name, _, _ = _load(ref, backbone_weights)
    return model, name


def _load(ref: str, backbone_weights: str | None = None):
    """(model, name, side, checkpoint folder or None): :func:`load_model`, the side at which images are read for it
    (a checkpoint's training image size, as the app reads uploads for it, :func:`cifar_transfer.images.pixel_side`;
    else the contract's resize side), and where the checkpoint lies."""
    if Path(ref).is_dir() or (ref not in BACKBONES and REPO_ID.match(ref)):
        folder, model, note = resolve_checkpoint(ref)
        side = pixel_side(model.contract, read_metrics(folder)) or resize_side(model.contract)
        return model, f"checkpoint {ref} ({note})", side, folder
    if ref in BACKBONES:
        model = CifarTransferModel.from_backbone(ref, weights_file=backbone_weights)
        return model.eval(), f"{ref} ({BACKBONES[ref].description})", resize_side(model.contract), None
    raise DoctorError(f"{ref!r} is neither a checkpoint folder nor a backbone name (known: {', '.join(BACKBONES)}), "
                      "nor a Hub repo id USER/NAME")


def checkpoint_calibration(model: nn.Module, folder: Path | None) -> MeterCalibration | None:
    """The meter calibration in a checkpoint's own folder (where the app's Predictor reads it too), checked against
    ``model``; None without one (:func:`diagnose` then looks for a shipped one that fits). An installed package has
    no shipped checkpoints beside it, so this is how it finds the calibration of ``checkpoints/...`` or a Hub repo."""
    if folder is None or not (Path(folder) / CALIBRATION_FILE).is_file():
        return None
    return find_calibration(model, folder)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_transfer.doctor", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                   help="a backbone name (e.g. efficientnet_lite0), a checkpoint folder or a Hub repo id (any timm classifier)")
    p.add_argument("images", metavar="IMAGES_DIR", nargs="?",
                   help="folder of images (searched recursively); default: built-in examples")
    p.add_argument("--backbone-weights", metavar="FILE", help="local weights file <arch>-<sha256 prefix>.pth (ResNets offline)")
    p.add_argument("--max-images", type=int, default=64,
                   help="use at most this many images from IMAGES_DIR, drawn round-robin over its subfolders")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="which images are drawn, and the bootstrap")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.max_images < 2:
        raise SystemExit("error: --max-images must be at least 2")
    try:
        model, name, size, folder = _load(args.model, args.backbone_weights)
        cal = _calibration_or_none(model, checkpoint_calibration(model, folder))
        groups = None
        if args.images:
            picked = pick_images(args.images, args.max_images, args.seed)
            pixels = read_images([p for p, _ in picked], size, model.contract, enlarge=cal is not None)
            groups, source = [g for _, g in picked], describe_pick(args.images, picked, args.seed)
        else:
            pixels, source = builtin_images(size, model.contract, enlarge=cal is not None)
        report = diagnose(model, pixels, name=name, images=source, calibration=cal, groups=groups, seed=args.seed)
    except (DoctorError, BackboneError, CheckpointError, CalibrationError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())


if __name__ == "__main__":
    main()
