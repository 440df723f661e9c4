"""The pictures the doctor reads: a folder's images drawn round-robin over its subfolders, the built-in examples,
or procedural scenes.

Folders are sorted by class more often than not, and one class's colours and contrast move the evidence, so a
folder's images are drawn round-robin over its subfolders (seeded), not its first files in sorted order. Every
picture goes through the one image pipeline (:mod:`cifar_transfer.images`).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from .contract import NormalizationContract
from .images import IMAGE_EXTENSIONS, REDUCE_MARGIN, ImageInputError, decode, square_pixels


class DoctorError(RuntimeError):
    """Bad model reference, image folder or batch; the message says what to do (the doctor's one error class,
    defined in the lowest of its modules that raises it)."""


def _examples_dir() -> Path:
    """The app's example images: installed, the package's copy (``cifar_transfer/examples``, shipped from the
    repository's ``examples/`` by pyproject's package-data); in a checkout of the repository, ``examples/`` itself."""
    here = Path(__file__).resolve().parent
    installed = here / "examples"
    return installed if installed.is_dir() else here.parent / "examples"


EXAMPLES_DIR = _examples_dir()
DEFAULT_SEED = 0
#: Pixels: without a calibration pictures are read no larger than they are, but not below this (the total stride of
#: EfficientNet and ResNet: a smaller input leaves the deepest layers no feature map).
MIN_SIDE = 32


def pick_images(folder: str | Path, max_images: int = 64, seed: int = DEFAULT_SEED) -> list[tuple[Path, str]]:
    """Up to ``max_images`` image files under ``folder`` (recursively), each with its subfolder (relative to
    ``folder``; "." for its own files), sorted by path.

    Drawn round-robin over the subfolders, in a seeded order, each subfolder's files in a seeded order: a folder
    sorted by class gives every class its share, where its first files in sorted order would all be one class.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DoctorError(f"image folder not found: {folder}")
    groups: dict[str, list[Path]] = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            groups.setdefault(p.parent.relative_to(folder).as_posix(), []).append(p)
    rng = random.Random(seed)
    queues = {g: rng.sample(files, len(files)) for g, files in groups.items()}
    turn = rng.sample(sorted(queues), len(queues))
    picked: list[tuple[Path, str]] = []
    while len(picked) < max_images and any(queues.values()):
        for g in turn:
            if queues[g] and len(picked) < max_images:
                picked.append((queues[g].pop(), g))
    if len(picked) < 2:
        raise DoctorError(f"{folder} holds {len(picked)} image(s) ({', '.join(IMAGE_EXTENSIONS)}); the doctor needs at least 2")
    return sorted(picked)


def describe_pick(folder: str | Path, picked: list[tuple[Path, str]], seed: int) -> str:
    """Where :func:`pick_images`'s images came from, for the report ("... from 10 folders of DIR ...")."""
    n = len({g for _, g in picked})
    return f"{n} folders of {folder} (drawn round-robin, seed {seed})" if n > 1 else f"{folder} (seed {seed})"


def read_images(paths: list[Path], size: int, contract: NormalizationContract | None = None,
                enlarge: bool = True) -> torch.Tensor:
    """``paths`` as ``(N, 3, size, size)`` uint8, read by the one image pipeline (:func:`cifar_transfer.images.decode`,
    then :func:`cifar_transfer.images.square_pixels` with ``contract``'s resize policy; default: centre crop,
    bilinear): with ``enlarge``, the pixels the dataset stores and the app reads for the same files at that size.

    ``enlarge=False``: ``size`` is lowered to the smallest picture's shorter side (not below ``MIN_SIDE``), so no
    picture is enlarged (see :func:`cifar_transfer.doctor.diagnose`: the first batch-norm layer reads enlarged
    pictures' blur as low contrast).
    """
    decoded = []
    for p in paths:
        try:
            decoded.append(decode(p, reduce_to=REDUCE_MARGIN * size))
        except ImageInputError as exc:
            raise DoctorError(f"cannot read image {p}: {exc}") from None
    if not enlarge:
        size = max(MIN_SIDE, min(size, *(min(a.shape[:2]) for a in decoded)))
    return torch.stack([square_pixels(a, size, contract) for a in decoded])


def load_images(folder: str | Path, size: int, max_images: int = 64, contract: NormalizationContract | None = None,
                seed: int = DEFAULT_SEED, enlarge: bool = True) -> torch.Tensor:
    """:func:`pick_images`'s images under ``folder``, read by :func:`read_images`, in path order."""
    return read_images([p for p, _ in pick_images(folder, max_images, seed)], size, contract, enlarge)


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


def builtin_images(size: int, contract: NormalizationContract | None = None,
                   enlarge: bool = True) -> tuple[torch.Tensor, str]:
    """The app's example images (:data:`EXAMPLES_DIR`) when present, else procedural ones."""
    if EXAMPLES_DIR.is_dir() and len([p for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]) >= 2:
        return load_images(EXAMPLES_DIR, size, contract=contract, enlarge=enlarge), f"the built-in examples ({EXAMPLES_DIR})"
    return procedural_images(size=size), "16 procedurally generated images"
