"""The study's cells as data: the regimes, the results file (``cells.jsonl``, one JSON cell a line, appended
atomically) and the statistics a cell records (intervals, divergence and collapse, binned series).
:mod:`cifar_transfer.study` runs cells, :mod:`cifar_transfer.study_report` reads them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_write_text

FORMAT = "cifar_transfer.study/1"
# The shipped results in a checkout of the repository; installed (no pyproject.toml beside the package), the
# folder `--output results/study` fills when run from the current directory (issue 10).
_CHECKOUT = Path(__file__).resolve().parents[1]
_RESULTS = (_CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path()) / "results"
RESULTS_DIR = _RESULTS / "study"  # the 32-px run (the small-input appendix)
RESULTS_DIR_128 = _RESULTS / "study-128px"  # the study at the shipped checkpoint's input size
CELLS_NAME = "cells.jsonl"
COMMAND = "python -m cifar_transfer.study --data-dir ../shared/datasets/cifar10-jpeg"


def study_command(input_size: int) -> str:
    """The command that runs (or resumes) the recorded study at ``input_size``."""
    return COMMAND + ("" if input_size == 128 else f" --input-size {input_size} --output results/study")
CURVE_EVALS = 8  # test-subset evaluations per cell, evenly spaced over its steps
CURVE_SUBSET = 2000  # images of the test set (every 5th) scored along the way; the final score uses all of it
PROBE_IMAGES = 512  # test images the divergence and feature-norm probes read
COLLAPSE_ACCURACY = 0.2  # below twice chance (10 classes): collapsed
COLLAPSE_CLASS_SHARE = 0.5  # or one class takes more than half of the test predictions
DEFINITIONS = {
    "diverged": "the loss or the gradient norm stopped being a finite number (training stops there), or the mean "
                "training loss over the last 10% of steps is not below the mean over the first 10%",
    "collapsed": f"final test accuracy below {COLLAPSE_ACCURACY:.0%} (twice chance) or more than "
                 f"{COLLAPSE_CLASS_SHARE:.0%} of the test predictions in one class",
    "divergence": "per image, the Gaussian KL divergence between the channel statistics entering a batch-norm layer "
                  "and that layer's running statistics, averaged over channels (the contract meter's statistic); "
                  "'first_bn' at the first layer, 'all_bn' averaged over every batch-norm layer; the median over "
                  f"{PROBE_IMAGES} test images, the model in eval mode",
    "feature_norm": "mean L2 norm of the pooled features the classifier reads",
    "ci95": "Wilson 95% interval of the test accuracy (test-set sampling only; seeds are reported separately)",
    "steps_to_target": "first curve point where the test-subset accuracy reaches 95% of the correct cell's final "
                       "test-subset accuracy in the same regime and seed (null: never within the budget)",
}


class StudyError(RuntimeError):
    """Results are missing or malformed, or a resumed run's setup differs; the message names the problem."""


# -- the regimes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Regime:
    key: str
    title: str
    freeze_stages: int  # leading stages frozen with their batch-norm statistics; -1: all but the head
    epochs: float  # passes over the 50,000 training images
    batch_size: int
    lr: float  # peak learning rate: SGD with Nesterov momentum 0.9, 5% linear warm-up, cosine to zero
    views: int  # cached views of the frozen prefix's output (view 0 plain, others crop+flip); 0: augment online
    label_smoothing: float = 0.0
    weight_decay: float = 5e-4
    flip: bool = False  # flip each cached feature map at random, as train's --cache-features does (32 px: no flip)
    channels_last: bool = False  # channels-last tensors, as train's --channels-last (speed on a CPU, same numbers)
    tta_flip: bool = False  # score the mean softmax of each test image and its mirror, as train's --tta-flip
    input_size: int | None = None  # px the network reads in this regime; None: the study's size (--input-size)


WARMUP = 0.05  # fraction of a cell's steps warming the learning rate up linearly (then cosine to zero), every regime


# Budgets sized for about 3 hours on a 2-core CPU at 32 px (see `--estimate`); the same on any device.
REGIMES: dict[str, Regime] = {r.key: r for r in (
    Regime("frozen", "Frozen backbone: linear head on pooled features, batch-norm statistics frozen",
           freeze_stages=-1, epochs=10, batch_size=256, lr=0.05, views=2),
    Regime("partial", "Partial fine-tune: stem + 4 stages frozen with their batch-norm statistics, later stages trained",
           freeze_stages=5, epochs=2, batch_size=128, lr=0.05, views=2, label_smoothing=0.1),
    Regime("full", "Full fine-tune: every layer trained, batch-norm in training mode",
           freeze_stages=0, epochs=1, batch_size=64, lr=0.005, views=0),
)}
# The budgets at 128 px, the shipped checkpoint's input size, chosen on a validation split of the training set
# (the same for every preprocessing): results/study-128px/budgets/README.md says which runs chose them.
REGIMES_128: dict[str, Regime] = {r.key: r for r in (
    # the linear probe reads the network at 160 px: at 128 it scored 81.2% on validation with 2 or 4 views, 79.8% on test
    Regime("frozen", "Frozen backbone: linear head on pooled features, batch-norm statistics frozen",
           freeze_stages=-1, epochs=10, batch_size=256, lr=0.05, views=2, tta_flip=True, input_size=160),
    Regime("partial", "Partial fine-tune: stem + 4 stages frozen with their batch-norm statistics, later stages trained",
           freeze_stages=5, epochs=4, batch_size=128, lr=0.1, views=1, label_smoothing=0.1, flip=True,
           channels_last=True, tta_flip=True),
    # one epoch at lr 0.01 reached 78.3% on validation, two at 0.03 87.8%, four at 0.03 91.7% (the floor + 1.7 points)
    Regime("full", "Full fine-tune: every layer trained, batch-norm in training mode",
           freeze_stages=0, epochs=4, batch_size=64, lr=0.03, views=0, label_smoothing=0.1, channels_last=True,
           tta_flip=True),
)}
# Regimes whose budget at a size has not yet cleared its floor on validation: the study refuses to run them there
# (cells with an unvalidated budget would have to be thrown away), and says why.
PENDING: dict[int, dict[str, str]] = {}  # none since 2026-12-07 (the full regime's 4-epoch budget cleared)
SCALES: dict[int, dict[str, Regime]] = {128: REGIMES_128, 32: REGIMES}  # input size -> its regimes
SCALE_DIRS: dict[int, Path] = {128: RESULTS_DIR_128, 32: RESULTS_DIR}


def regime_setup(regime: Regime) -> dict:
    """The regime as a cell's ``setup`` records it. The fields added for the 128-px run (flip, channels-last, flip
    TTA, its own input size) are left out while off, so cells recorded before they existed still resume."""
    d = dataclasses.asdict(regime)
    return {k: v for k, v in d.items() if k not in ("flip", "channels_last", "tta_flip", "input_size") or v}


def regimes_for(input_size: int) -> dict[str, Regime]:
    """The regimes (budgets) chosen for ``input_size``; other sizes have none."""
    if input_size not in SCALES:
        raise StudyError(f"no budgets were chosen for {input_size} px; the study runs at "
                         f"{' or '.join(str(s) for s in SCALES)} px")
    return SCALES[input_size]


# -- small statistics ---------------------------------------------------------------------------------


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def diff_interval(p1: float, n1: int, p2: float, n2: int, z: float = 1.959964) -> tuple[float, float]:
    """95% interval of p1 - p2 for two independent proportions (normal approximation)."""
    half = z * math.sqrt(max(p1 * (1 - p1), 1e-12) / n1 + max(p2 * (1 - p2), 1e-12) / n2)
    return (p1 - p2 - half, p1 - p2 + half)


def round_sig(x: float | None, digits: int = 5) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def has_diverged(losses: list[float | None], stopped_at: int | None) -> bool:
    """See ``DEFINITIONS["diverged"]``."""
    if stopped_at is not None:
        return True
    finite = [v for v in losses if v is not None]
    if len(finite) < 2:
        return False
    k = max(1, len(finite) // 10)
    return sum(finite[-k:]) / k >= sum(finite[:k]) / k


def has_collapsed(accuracy: float | None, class_share: float | None) -> bool:
    """See ``DEFINITIONS["collapsed"]``."""
    return accuracy is None or accuracy < COLLAPSE_ACCURACY or (class_share or 0.0) > COLLAPSE_CLASS_SHARE


def grad_stats(norms: list[float | None]) -> dict:
    finite = sorted(v for v in norms if v is not None and math.isfinite(v))
    if not finite:
        return {"median": None, "p90": None, "max": None, "nonfinite": len(norms), "spikes": 0}
    med = finite[len(finite) // 2]
    return {"median": round_sig(med), "p90": round_sig(finite[int(0.9 * (len(finite) - 1))]), "max": round_sig(finite[-1]),
            "nonfinite": len(norms) - len(finite), "spikes": sum(v > 10 * med for v in finite)}


def binned(values: list[float | None], bins: int = 100) -> list[float | None]:
    """Means of ``values`` over ``bins`` equal stretches of steps (plots; the raw series is not kept)."""
    if not values:
        return []
    out = []
    n = len(values)
    for b in range(min(bins, n)):
        chunk = [v for v in values[b * n // min(bins, n):(b + 1) * n // min(bins, n)] if v is not None]
        out.append(round_sig(sum(chunk) / len(chunk)) if chunk else None)
    return out


# -- the results file ----------------------------------------------------------------------------------


def read_cells(folder: str | Path | None = None) -> list[dict]:
    """Every finished cell in ``folder/cells.jsonl`` (an empty list if there is none); a broken line raises."""
    path = Path(folder or RESULTS_DIR) / CELLS_NAME
    if not path.is_file():
        return []
    cells = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            cell = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StudyError(f"{path}, line {n}, is not valid JSON: {exc}") from exc
        if not isinstance(cell, dict) or cell.get("format") != FORMAT or "key" not in cell:
            raise StudyError(f"{path}, line {n}, is not a cell of this study (expected format {FORMAT!r})")
        cells.append(cell)
    return cells


def append_cell(folder: str | Path, cell: dict) -> None:
    """Append one cell to ``cells.jsonl`` atomically: the whole file is rewritten beside it and renamed."""
    path = Path(folder) / CELLS_NAME
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + json.dumps(cell, separators=(",", ":")) + "\n")
