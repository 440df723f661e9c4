"""The contract doctor: which input normalization do these weights expect?

    python -m cifar_transfer.doctor efficientnet_lite0
    python -m cifar_transfer.doctor resnet18 --backbone-weights resnet18-f37072fd.pth
    python -m cifar_transfer.doctor checkpoints/efficientnet_lite0-cifar10 my_images/

A pretrained batch-norm layer remembers the mean and variance of its input over
the pretraining data. The doctor feeds a batch of images through the network
under every candidate normalization (the presets and the wrong variants of
:mod:`cifar_transfer.contract`) and ranks them by the calibrated contract
meter's misfit (:mod:`cifar_transfer.meter`: every batch-norm layer, and the
paired channel-order check), averaged over the images. Its confidence is the
share of bootstrap resamples of the images on which the winner stays first; it
says "disagrees" only when that share is at least ``CONFIDENT`` with at least
``MIN_IMAGES`` images, and otherwise asks for more images. A model without a
meter calibration is ranked by the first batch-norm layer alone (the loud
mistakes only). :func:`check_batch` checks a tensor your own pipeline produced.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .cli import HelpFormatter
from .contract import PRESETS, WRONG_VARIANTS, NormalizationContract
from .images import IMAGE_EXTENSIONS, ImageInputError, pixel_side, read_square, resize_side
from .meter import (BatchNormProbe, CalibrationError, MeterCalibration, find_calibration, first_layer_reading,
                    meter_features)



def _examples_dir() -> Path:
    """The app's example images: installed, the package's copy (``cifar_transfer/examples``, shipped from the
    repository's ``examples/`` by pyproject's package-data); in a checkout of the repository, ``examples/`` itself."""
    here = Path(__file__).resolve().parent
    installed = here / "examples"
    return installed if installed.is_dir() else here.parent / "examples"


EXAMPLES_DIR = _examples_dir()
#: Fewer images than this: the doctor ranks but asks for more and never says "disagrees".
MIN_IMAGES = 8
#: Share of bootstrap resamples on which the winner must stay first for a confident answer.
CONFIDENT = 0.95
BOOTSTRAP = 400


class DoctorError(RuntimeError):
    """Bad model reference, image folder or batch; the message says what to do."""


# -- candidates and scoring -------------------------------------------------------------------


def candidate_contracts(reference: NormalizationContract) -> dict[str, NormalizationContract]:
    """The presets, then every wrong variant of ``reference``; duplicates keep the first name.

    All candidates use ``reference.input_size`` and interpolation, so only the normalization differs.
    """
    out: dict[str, NormalizationContract] = {}
    pool = [(name, c) for name, c in PRESETS.items()] + [(k, v.apply(reference)) for k, v in WRONG_VARIANTS.items()]
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
        names.append("declared")
    return [n for n in dict.fromkeys(names) if n != name]


@torch.no_grad()
def batch_divergence(model: nn.Module, normalized: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(divergence pooled over the batch, divergence per image) at the first batch-norm layer, eval mode."""
    was_training = model.training
    model.eval()
    try:
        with BatchNormProbe(model) as probe:
            model(normalized)
        return probe.divergence(per_image=False).item(), probe.divergence(per_image=True)
    finally:
        model.train(was_training)


def misfits(model: nn.Module, normalized: torch.Tensor, calibration: MeterCalibration | None,
            features: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, str]:
    """Per-image misfit of ``normalized`` inputs, and the meter's level for them as one batch.

    Misfit: the calibrated meter's score, or its channel-swap evidence when larger (the negated paired channel
    score); without a calibration, the log of the first batch-norm divergence. ``features``: the meter's
    features and twin features of ``normalized``, when already measured.
    """
    if calibration is None:
        pooled, per_image = batch_divergence(model, normalized)
        return per_image.clamp_min(1e-12).log(), first_layer_reading(pooled).level
    f, twin = features if features is not None else meter_features(model, normalized, calibration.layers)
    s = calibration.scores(f, twin)
    score, channel = calibration.batch_scores(s)
    return torch.maximum(s.score, -s.channel), calibration.reading(score, channel, len(normalized)).level


def bootstrap_confidence(per_image: torch.Tensor, resamples: int = BOOTSTRAP, seed: int = 0) -> torch.Tensor:
    """For ``(C, N)`` per-image misfits of C candidates: the share of image resamples on which each ranks first."""
    c, n = per_image.shape
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    means = per_image.double()[:, idx].mean(dim=2)  # (C, resamples)
    wins = torch.bincount(means.argmin(dim=0), minlength=c)
    return wins.double() / resamples


def decide(names: list[str], per_image: torch.Tensor) -> tuple[list[int], float]:
    """Order of candidates (best first, by mean misfit) and the confidence in the first (bootstrap share)."""
    order = per_image.double().mean(dim=1).argsort().tolist()
    return order, float(bootstrap_confidence(per_image)[order[0]])


@dataclass
class Score:
    name: str
    contract: NormalizationContract
    divergence: float  # mean misfit over the images (lower fits better)
    aliases: list[str] = field(default_factory=list)
    level: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "divergence": self.divergence, "aliases": self.aliases,
                "level": self.level, "contract": self.contract.to_dict()}


@dataclass
class DoctorReport:
    model: str
    declared: NormalizationContract | None
    ranking: list[Score]  # best first
    n_images: int
    images: str
    confidence: float = 1.0  # share of bootstrap resamples on which the best stays first
    calibrated: bool = True

    @property
    def best(self) -> Score:
        return self.ranking[0]

    @property
    def confident(self) -> bool:
        return self.n_images >= MIN_IMAGES and self.confidence >= CONFIDENT

    @property
    def close_runner_up(self) -> Score | None:
        return None if self.confident or len(self.ranking) < 2 else self.ranking[1]

    @property
    def agrees_with_declared(self) -> bool | None:
        """True: the best is the declared contract; False: confidently another; None: no declared one, or not sure."""
        if self.declared is None:
            return None
        if self.declared.same_normalization(self.best.contract):
            return True
        return False if self.confident else None

    def to_dict(self) -> dict:
        return {"model": self.model, "images": self.images, "n_images": self.n_images,
                "declared": self.declared.to_dict() if self.declared else None,
                "most_likely": self.best.name, "agrees_with_declared": self.agrees_with_declared,
                "confidence": self.confidence, "confident": self.confident, "calibrated": self.calibrated,
                "close_runner_up": self.close_runner_up.name if self.close_runner_up else None,
                "ranking": [s.to_dict() for s in self.ranking]}

    def format(self) -> str:
        c = self.best.contract
        what = "calibrated meter misfit" if self.calibrated else "first-BN log divergence"
        lines = [f"model: {self.model}", f"images: {self.n_images} from {self.images}",
                 f"score: mean {what} per image (lower fits better)", "",
                 f"{'rank':>4}  {'candidate':<20} {'score':>12}  meter (whole batch)  also known as"]
        for i, s in enumerate(self.ranking, start=1):
            lines.append(f"{i:>4}  {s.name:<20} {s.divergence:>12.4g}  {s.level:<19}  {', '.join(s.aliases)}")
        lines += ["", f"most likely: {self.best.name}: ((pixels/255*{c.pixel_scale:g})[{c.channel_order}] - {list(c.mean)}) "
                      f"/ {list(c.std)}" + (f", applied {c.times}x" if c.times != 1 else ""),
                  f"confidence: first on {100 * self.confidence:.0f}% of {BOOTSTRAP} bootstrap resamples of the images"]
        if self.n_images < MIN_IMAGES:
            lines.append(f"too few images ({self.n_images}): give at least {MIN_IMAGES} (32 for a confident answer on "
                         "channel order) before trusting this ranking.")
        elif not self.confident:
            r = self.ranking[1]
            lines.append(f"not confident: {r.name} comes first on some resamples"
                         + (" (channel order is the hardest to see)" if {r.contract.channel_order, c.channel_order} == {"RGB", "BGR"} else "")
                         + "; add more images.")
        if not self.calibrated:
            lines.append("note: no meter calibration for this model; ranked by the first batch-norm layer alone, which "
                         "sees raw 0-255 pixels but barely the subtler mistakes (channel order not at all).")
        if self.declared is not None:
            agrees = self.agrees_with_declared
            verdict = ("agrees with" if agrees else "DISAGREES with" if agrees is False
                       else "is not sure enough to contradict")
            lines.append(f"this {verdict} the declared contract {self.declared.name!r}")
        return "\n".join(lines)


def _calibration_or_none(model: nn.Module, calibration: MeterCalibration | None) -> MeterCalibration | None:
    if calibration is not None:
        calibration.check(model)
        return calibration
    try:
        return find_calibration(model)
    except CalibrationError:
        return None


def diagnose(model: nn.Module, pixels: torch.Tensor, *, reference: NormalizationContract | None = None,
             name: str = "model", images: str = "given batch", calibration: MeterCalibration | None = None) -> DoctorReport:
    """Rank candidate normalizations of RGB ``pixels`` (N, 3, H, W, 0..255) by mean meter misfit, best first."""
    _check_pixels(pixels)
    declared = getattr(model, "contract", None)
    reference = reference or declared
    if reference is None:
        raise DoctorError("the model declares no contract; pass reference= (e.g. contract.IMAGENET) to set the input size")
    cal = _calibration_or_none(model, calibration)
    candidates = candidate_contracts(reference)
    names = list(candidates)
    batches = [c.transform()(pixels.float()) for c in candidates.values()]
    feats = [None] * len(batches)
    if cal is not None:  # every candidate through one meter_features call: one engine, not one per candidate
        f, twin = meter_features(model, torch.cat(batches), cal.layers)
        n = len(pixels)
        feats = [(f[i * n:(i + 1) * n], twin[i * n:(i + 1) * n]) for i in range(len(batches))]
    measured = [misfits(model, b, cal, fe) for b, fe in zip(batches, feats)]
    per_image = torch.stack([m for m, _ in measured])
    order, confidence = decide(names, per_image)
    scores = [Score(names[i], candidates[names[i]], float(per_image[i].mean()), aliases(names[i], candidates, reference),
                    measured[i][1]) for i in order]
    return DoctorReport(name, declared, scores, len(pixels), images, confidence, cal is not None)


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


def _inverse(x: torch.Tensor, c: NormalizationContract) -> torch.Tensor:
    """Pixels 0..255 that ``c`` would have turned into ``x`` (ignores resizing)."""
    mean = torch.tensor(c.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(c.std, dtype=x.dtype).view(1, 3, 1, 1)
    for _ in range(c.times):
        x = x * std + mean
    x = x * (255.0 / c.pixel_scale)
    return x.flip(1) if c.channel_order == "BGR" else x


def plausible_origins(x: torch.Tensor, reference: NormalizationContract) -> list[str]:
    """Candidates under which ``x`` maps back to 0..255 pixels that use a fair part of that range."""
    out = []
    for name, c in candidate_contracts(reference).items():
        p = _inverse(x.detach().float().cpu(), c)
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
        pooled, per_image = batch_divergence(model, x)
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


# -- images ---------------------------------------------------------------------------------------


def load_images(folder: str | Path, size: int, max_images: int = 64,
                contract: NormalizationContract | None = None) -> torch.Tensor:
    """Up to ``max_images`` images under ``folder`` (recursively, sorted) as ``(N, 3, size, size)`` uint8.

    Read by the one image pipeline (:func:`cifar_transfer.images.read_square`: EXIF orientation, alpha on white, ...,
    then ``contract``'s resize policy at ``size``; default: centre crop, bilinear): the pixels the dataset stores
    and the app reads for the same files at that size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DoctorError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())[:max_images]
    if len(paths) < 2:
        raise DoctorError(f"{folder} holds {len(paths)} image(s) ({', '.join(IMAGE_EXTENSIONS)}); the doctor needs at least 2")
    pixels = []
    for p in paths:
        try:
            pixels.append(read_square(p, size, contract))
        except ImageInputError as exc:
            raise DoctorError(f"cannot read image {p}: {exc}") from None
    return torch.stack(pixels)


def procedural_images(n: int = 16, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Seeded synthetic scenes (smooth colour fields with a few hard-edged shapes), RGB uint8."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    for _ in range(3):
        cy, cx, r = torch.rand(3, n, 1, 1, generator=g)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < (0.1 + 0.2 * r) ** 2).unsqueeze(1)
        x = torch.where(disc, torch.rand(n, 3, 1, 1, generator=g), x)
    x = x + 0.03 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def builtin_images(size: int, contract: NormalizationContract | None = None) -> tuple[torch.Tensor, str]:
    """The app's example images (:data:`EXAMPLES_DIR`) when present, else procedural ones."""
    if EXAMPLES_DIR.is_dir() and len([p for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]) >= 2:
        return load_images(EXAMPLES_DIR, size, contract=contract), f"the built-in examples ({EXAMPLES_DIR})"
    return procedural_images(size=size), "16 procedurally generated images"


# -- models and command line ----------------------------------------------------------------------


def load_model(ref: str, backbone_weights: str | None = None):
    """A BACKBONES name (pretrained weights, new head), or a checkpoint folder or Hub repo id: this package's, or any
    timm classifier's (its declared contract then comes from its pretrained_cfg)."""
    model, name, _ = load_model_and_side(ref, backbone_weights)
    return model, name


def load_model_and_side(ref: str, backbone_weights: str | None = None):
    """:func:`load_model`, and the side at which images are read for it: a checkpoint's training image size, as the
    app reads uploads for it (:func:`cifar_transfer.images.pixel_side`), else the contract's resize side."""
    model, name, side, _ = _load(ref, backbone_weights)
    return model, name, side


def _load(ref: str, backbone_weights: str | None = None):
    """(model, name, side, checkpoint folder or None): :func:`load_model_and_side`, and where the checkpoint lies."""
    from .backbones import BACKBONES
    from .checkpoint import read_metrics
    from .hub import REPO_ID, resolve_checkpoint
    from .model import CifarTransferModel

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
    from .meter import CALIBRATION_FILE

    if folder is None or not (Path(folder) / CALIBRATION_FILE).is_file():
        return None
    return find_calibration(model, folder)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_transfer.doctor", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT",
                   help="a backbone name (e.g. efficientnet_lite0), a checkpoint folder or a Hub repo id (any timm classifier)")
    p.add_argument("images", metavar="IMAGES_DIR", nargs="?", help="folder of images (searched recursively); default: built-in examples")
    p.add_argument("--backbone-weights", metavar="FILE", help="local weights file <arch>-<sha256 prefix>.pth (ResNets offline)")
    p.add_argument("--max-images", type=int, default=64, help="use at most this many images from IMAGES_DIR")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    from .backbones import BackboneError
    from .checkpoint import CheckpointError

    args = get_args_parser().parse_args(argv)
    if args.max_images < 2:
        raise SystemExit("error: --max-images must be at least 2")
    try:
        model, name, size, folder = _load(args.model, args.backbone_weights)
        if args.images:
            pixels, source = load_images(args.images, size, args.max_images, model.contract), str(args.images)
        else:
            pixels, source = builtin_images(size, model.contract)
        report = diagnose(model, pixels, name=name, images=source, calibration=checkpoint_calibration(model, folder))
    except (DoctorError, BackboneError, CheckpointError, CalibrationError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())


if __name__ == "__main__":
    main()
