"""Datasets decoded once into memory as uint8, and a batched tensor loader.

Two sources:

* CIFAR-10 through torchvision (downloaded when online, or a local folder that
  holds the original ``cifar-10-batches-py``);
* any class-folder dataset with ``train/<class>/*`` and ``test/<class>/*``
  (``../shared/datasets/cifar10-jpeg`` is one).

Images are stored as ``(N, 3, S, S)`` uint8. A class-folder image is read by
the one image pipeline, :func:`cifar_transfer.images.read_square`: decoded
safely to upright RGB (EXIF orientation, transparency on white, 16-bit,
palette, first frame), then brought to ``S x S`` by the contract's own resize
policy (``contract``: the model's; default: centre crop, bilinear) -- an image
already ``S x S``, as every CIFAR-10 image, is stored exactly as decoded. The
app reads an upload the same way, so a file gives the same network input in
training, evaluation and the app. Augmentation (random crop with padding,
horizontal flip) runs on whole batches as tensor operations; resizing to the
network's input size and the normalization are applied later, by the model's
transform.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .contract import NormalizationContract
from .images import IMAGE_EXTENSIONS, ImageInputError, read_square
from .inference import mirror

DEFAULT_DOWNLOAD_ROOT = Path(os.environ.get("CIFAR_TRANSFER_DATA", Path.home() / ".cache" / "cifar_transfer" / "data"))


class DataError(RuntimeError):
    """The dataset is missing, laid out wrongly or unreadable; the message names the problem."""


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S) uint8, RGB
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split
    source: str  # where it was read from
    val: Split | None = None


# -- reading -------------------------------------------------------------------


def load_dataset(
    data_dir: str | Path | None = None,
    *,
    image_size: int = 32,
    download: bool = True,
    classes: list[str] | None = None,
    max_per_class: int | None = None,
    max_test_per_class: int | None = None,
    workers: int = 8,
    contract: NormalizationContract | None = None,
) -> Dataset:
    """Load CIFAR-10 (torchvision) or a ``train/`` + ``test/`` class-folder dataset.

    Class-folder images are stored at ``image_size`` square by :func:`cifar_transfer.images.read_square`
    (``contract``: whose resize policy brings other sizes and shapes to that square; default: centre crop, bilinear).

    ``classes`` keeps only those classes (relabelled 0..k-1 in the given order);
    ``max_per_class`` keeps the first N training images of each class (and
    ``max_test_per_class`` the first N test images): small, deterministic subsets
    for tests and quick experiments.
    """
    if data_dir is None:
        return _limit(_load_torchvision(DEFAULT_DOWNLOAD_ROOT, download=download), classes, max_per_class, max_test_per_class)
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"--data-dir must be a folder, but {root} is a file")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return _load_folder(root, image_size, classes, max_per_class, max_test_per_class, workers, contract)
    if (root / "cifar-10-batches-py").is_dir() or root.name == "cifar-10-batches-py":
        base = root.parent if root.name == "cifar-10-batches-py" else root
        return _limit(_load_torchvision(base, download=False), classes, max_per_class, max_test_per_class)
    present = sorted(p.name for p in root.iterdir())[:8]
    raise DataError(
        f"{root} has an unknown layout: expected train/ and test/ class folders (train/<class>/<image>) "
        f"or the original cifar-10-batches-py; found {present or 'nothing'}"
    )


def _load_torchvision(root: Path, download: bool) -> Dataset:
    import torchvision  # ~1.3 s to import; only torchvision's copy of CIFAR-10 needs it

    try:
        tr = torchvision.datasets.CIFAR10(str(root), train=True, download=download)
        te = torchvision.datasets.CIFAR10(str(root), train=False, download=download)
    except RuntimeError as exc:  # "Dataset not found or corrupted"
        raise DataError(f"CIFAR-10 batches not found in {root}: {exc}. Pass --data-dir to a local copy.") from exc
    except OSError as exc:  # no network
        raise DataError(
            f"cannot download CIFAR-10 into {root}: {exc}. Offline? Pass --data-dir to a local copy "
            "(the original cifar-10-batches-py or a train/ + test/ class-folder dataset)."
        ) from exc

    def split(ds) -> Split:
        return Split(torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))), torch.tensor(ds.targets, dtype=torch.int64))

    return Dataset("CIFAR-10", list(tr.classes), split(tr), split(te), source=str(root))


def _class_dirs(split_dir: Path) -> list[str]:
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{split_dir} holds no class folders (expected {split_dir}/<class>/<image>)")
    return names


def _decode(path: Path, size: int, contract: NormalizationContract | None = None) -> torch.Tensor:
    """``(3, size, size)`` uint8 RGB pixels of one file (see :func:`cifar_transfer.images.read_square`)."""
    try:
        return read_square(path, size, contract)
    except ImageInputError as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def _read_split(split_dir: Path, classes: list[str], size: int, limit: int | None, workers: int,
                contract: NormalizationContract | None = None) -> Split:
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            raise DataError(f"class folder missing: {class_dir}")
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        files = files[:limit] if limit else files
        paths += files
        labels += [label] * len(files)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pixels = list(pool.map(lambda p: _decode(p, size, contract), paths, chunksize=256))
    images = torch.stack(pixels)
    return Split(images, torch.tensor(labels, dtype=torch.int64))


def _load_folder(root: Path, size: int, classes, max_per_class, max_test_per_class, workers, contract=None) -> Dataset:
    found = _class_dirs(root / "train")
    test_found = _class_dirs(root / "test")
    if found != test_found:
        raise DataError(f"train/ and test/ in {root} have different class folders: {found} vs {test_found}")
    if classes:
        unknown = [c for c in classes if c not in found]
        if unknown:
            raise DataError(f"class(es) {unknown} not in {root}/train (found {found})")
        found = list(classes)
    train = _read_split(root / "train", found, size, max_per_class, workers, contract)
    test = _read_split(root / "test", found, size, max_test_per_class, workers, contract)
    name = "CIFAR-10 (JPEG copy)" if "cifar10" in root.name.lower().replace("-", "").replace("_", "") else root.name
    return Dataset(name, found, train, test, source=str(root))


def _limit(ds: Dataset, classes, max_per_class, max_test_per_class) -> Dataset:
    if not classes and not max_per_class and not max_test_per_class:
        return ds
    keep = list(classes) if classes else ds.classes
    unknown = [c for c in keep if c not in ds.classes]
    if unknown:
        raise DataError(f"class(es) {unknown} not in {ds.name} (known: {ds.classes})")

    def pick(split: Split, limit: int | None) -> Split:
        idx, new_labels = [], []
        for new, name in enumerate(keep):
            where = (split.labels == ds.classes.index(name)).nonzero().flatten()
            where = where[:limit] if limit else where
            idx.append(where)
            new_labels.append(torch.full((len(where),), new, dtype=torch.int64))
        index = torch.cat(idx)
        return Split(split.images[index], torch.cat(new_labels))

    return replace(ds, classes=keep, train=pick(ds.train, max_per_class), test=pick(ds.test, max_test_per_class))


def split_validation(ds: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """Carve a stratified validation split out of the training set (hyper-parameters never see the test set)."""
    if fraction <= 0:
        return ds
    if fraction >= 1:
        raise DataError(f"validation fraction must be below 1, got {fraction}")
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(len(ds.classes)):
        where = (ds.train.labels == c).nonzero().flatten()
        where = where[torch.randperm(len(where), generator=g)]
        n_val = max(1, round(len(where) * fraction))
        val_idx.append(where[:n_val])
        train_idx.append(where[n_val:])
    return replace(ds, train=ds.train.subset(torch.cat(train_idx)), val=ds.train.subset(torch.cat(val_idx)))


# -- batched augmentation and loading -----------------------------------------------


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-image random crop (zero padding ``pad``) and horizontal flip of a uint8 batch, vectorised."""
    n, c, h, w = x.shape
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
        cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
        if flip:
            flips = torch.rand(n, generator=generator) < 0.5
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        b = torch.arange(n)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    elif flip:
        flips = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flips[:, None, None, None], mirror(x), x)
    return x.contiguous()


class BatchLoader:
    """Yields ``(uint8 images, labels)`` batches from an in-memory split.

    Shuffling and augmentation are seeded per epoch (``set_epoch``) so runs are
    reproducible and resumable. With ``world_size > 1`` each rank gets a
    disjoint, equally sized shard of every epoch's permutation.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, pad: int = 4):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        self.split, self.batch_size, self.shuffle, self.augment = split, batch_size, shuffle, augment
        self.seed, self.rank, self.world_size, self.drop_last, self.pad = seed, rank, world_size, drop_last, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.split)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            per_rank = n // self.world_size
            idx = idx[: per_rank * self.world_size][self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch * 31 + self.rank + 1)
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            b = idx[start : start + self.batch_size]
            x = self.split.images[b]
            if self.augment:
                x = random_crop_flip(x, g, pad=self.pad)
            yield x, self.split.labels[b]
