"""The contract doctor: which input normalization do these weights expect?

    python -m cifar_transfer.doctor efficientnet_lite0
    python -m cifar_transfer.doctor resnet18 --backbone-weights resnet18-f37072fd.pth
    python -m cifar_transfer.doctor checkpoints/efficientnet_lite0-cifar10 my_images/

A pretrained batch-norm layer remembers the mean and variance of its input over
the pretraining data. The doctor feeds a batch of images through the network
under every candidate normalization (the presets and the wrong variants of
:mod:`cifar_transfer.contract`) and ranks them by how closely the statistics
entering the first batch-norm layer match that memory (the Gaussian KL
divergence of :mod:`cifar_transfer.meter`, pooled over the batch, as the running
statistics were). The best match is the normalization the weights most likely
expect. :func:`check_batch` checks a tensor your own pipeline produced.
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
from .data import IMAGE_EXTENSIONS
from .meter import BatchNormProbe, reading

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
#: The runner-up is called "close" when its score is within this factor of the best.
CLOSE_FACTOR = 1.5


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


@dataclass
class Score:
    name: str
    contract: NormalizationContract
    divergence: float
    aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "divergence": self.divergence, "aliases": self.aliases,
                "level": reading(self.divergence).level, "contract": self.contract.to_dict()}


@dataclass
class DoctorReport:
    model: str
    declared: NormalizationContract | None
    ranking: list[Score]  # best first
    n_images: int
    images: str

    @property
    def best(self) -> Score:
        return self.ranking[0]

    @property
    def close_runner_up(self) -> Score | None:
        if len(self.ranking) > 1 and self.ranking[1].divergence <= CLOSE_FACTOR * max(self.best.divergence, 1e-12):
            return self.ranking[1]
        return None

    @property
    def agrees_with_declared(self) -> bool | None:
        return None if self.declared is None else self.declared.same_normalization(self.best.contract)

    def to_dict(self) -> dict:
        return {"model": self.model, "images": self.images, "n_images": self.n_images,
                "declared": self.declared.to_dict() if self.declared else None,
                "most_likely": self.best.name, "agrees_with_declared": self.agrees_with_declared,
                "close_runner_up": self.close_runner_up.name if self.close_runner_up else None,
                "ranking": [s.to_dict() for s in self.ranking]}

    def format(self) -> str:
        c = self.best.contract
        lines = [f"model: {self.model}", f"images: {self.n_images} from {self.images}", "",
                 f"{'rank':>4}  {'candidate':<20} {'divergence':>12}  reading   also known as"]
        for i, s in enumerate(self.ranking, start=1):
            lines.append(f"{i:>4}  {s.name:<20} {s.divergence:>12.4g}  {reading(s.divergence).level:<8}  {', '.join(s.aliases)}")
        lines += ["", f"most likely: {self.best.name}: ((pixels/255*{c.pixel_scale:g})[{c.channel_order}] - {list(c.mean)}) "
                      f"/ {list(c.std)}" + (f", applied {c.times}x" if c.times != 1 else "")]
        if self.close_runner_up:
            r = self.close_runner_up
            lines.append(f"note: {r.name} scores within {CLOSE_FACTOR}x of it; first-layer statistics barely tell these "
                         "apart (channel order is the usual case), so confirm on labelled data.")
        if self.declared is not None:
            verdict = "agrees with" if self.agrees_with_declared else "DISAGREES with"
            lines.append(f"this {verdict} the declared contract {self.declared.name!r}")
        return "\n".join(lines)


def diagnose(model: nn.Module, pixels: torch.Tensor, *, reference: NormalizationContract | None = None,
             name: str = "model", images: str = "given batch") -> DoctorReport:
    """Rank candidate normalizations of RGB ``pixels`` (N, 3, H, W, 0..255) by first-BN divergence, best first."""
    _check_pixels(pixels)
    declared = getattr(model, "contract", None)
    reference = reference or declared
    if reference is None:
        raise DoctorError("the model declares no contract; pass reference= (e.g. contract.IMAGENET) to set the input size")
    candidates = candidate_contracts(reference)
    scores = [Score(key, c, batch_divergence(model, c.transform()(pixels))[0], aliases(key, candidates, reference))
              for key, c in candidates.items()]
    scores.sort(key=lambda s: s.divergence)
    return DoctorReport(name, declared, scores, len(pixels), images)


def _check_pixels(pixels: torch.Tensor) -> None:
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise DoctorError(f"expected a (N, 3, H, W) batch of RGB pixels, got {shape}")
    if len(pixels) < 2:
        raise DoctorError("need at least 2 images to estimate batch statistics")


# -- checking a user's own batch ------------------------------------------------------------------


@dataclass
class BatchCheck:
    divergence: float  # pooled over the batch
    per_image: list[float]
    level: str
    words: str
    value_range: tuple[float, float]
    expected_range: tuple[float, float] | None
    consistent_with: list[str]  # candidates whose inverse maps the batch back to plausible 0..255 pixels

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def format(self) -> str:
        lines = [f"first batch-norm divergence: {self.divergence:.4g} ({self.level}): {self.words}",
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


def check_batch(model: nn.Module, normalized_batch: torch.Tensor) -> BatchCheck:
    """Check a batch your pipeline produced (already normalized, ``(N, 3, H, W)``) against ``model``'s first BN layer."""
    x = normalized_batch
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DoctorError(f"expected a normalized (N, 3, H, W) float batch, got {shape}")
    if not x.is_floating_point():
        raise DoctorError(f"expected a float batch (after normalization), got dtype {x.dtype}: is this raw uint8 pixels?")
    if len(x) < 2:
        raise DoctorError("need at least 2 images to estimate batch statistics")
    x = x.to(next(model.parameters()).device)
    pooled, per_image = batch_divergence(model, x)
    r = reading(pooled)
    contract = getattr(model, "contract", None)
    return BatchCheck(pooled, [round(v, 6) for v in per_image.tolist()], r.level, r.words,
                      (x.min().item(), x.max().item()), contract.value_range() if contract else None,
                      plausible_origins(x, contract) if contract else [])


# -- images ---------------------------------------------------------------------------------------


def load_images(folder: str | Path, size: int, max_images: int = 64) -> torch.Tensor:
    """Up to ``max_images`` images under ``folder`` (recursively, sorted), centre-cropped to ``size`` x ``size``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise DoctorError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())[:max_images]
    if len(paths) < 2:
        raise DoctorError(f"{folder} holds {len(paths)} image(s) ({', '.join(IMAGE_EXTENSIONS)}); the doctor needs at least 2")
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = ImageOps.fit(im.convert("RGB"), (size, size), Image.BILINEAR)
                arrays.append(torch.tensor(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DoctorError(f"cannot read image {p}: {exc}") from exc
    return torch.stack(arrays).permute(0, 3, 1, 2).contiguous()


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


def builtin_images(size: int) -> tuple[torch.Tensor, str]:
    """The app's example images when present, else procedural ones."""
    if EXAMPLES_DIR.is_dir() and len([p for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]) >= 2:
        return load_images(EXAMPLES_DIR, size), f"the built-in examples ({EXAMPLES_DIR})"
    return procedural_images(size=size), "16 procedurally generated images"


# -- models and command line ----------------------------------------------------------------------


def load_model(ref: str, backbone_weights: str | None = None):
    """A BACKBONES name (pretrained weights, new head) or a checkpoint folder."""
    from .backbones import BACKBONES
    from .model import CifarTransferModel, load_checkpoint

    if Path(ref).is_dir():
        return load_checkpoint(ref), f"checkpoint {ref}"
    if ref in BACKBONES:
        model = CifarTransferModel.from_backbone(ref, weights_file=backbone_weights)
        return model.eval(), f"{ref} ({BACKBONES[ref].description})"
    raise DoctorError(f"{ref!r} is neither a checkpoint folder nor a backbone name (known: {', '.join(BACKBONES)})")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_transfer.doctor", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT", help="a backbone name (e.g. efficientnet_lite0) or a checkpoint folder")
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
        model, name = load_model(args.model, args.backbone_weights)
        size = model.contract.input_size
        if args.images:
            pixels, source = load_images(args.images, size, args.max_images), str(args.images)
        else:
            pixels, source = builtin_images(size)
        report = diagnose(model, pixels, name=name, images=source)
    except (DoctorError, BackboneError, CheckpointError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())


if __name__ == "__main__":
    main()
