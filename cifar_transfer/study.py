"""The seed's training claims at full scale: every preprocessing, trained and served, in three regimes.

    python -m cifar_transfer.study --data-dir ../shared/datasets/cifar10-jpeg            # all cells, resumable
    python -m cifar_transfer.study --data-dir ../shared/datasets/cifar10-jpeg --estimate # time a few steps, project the total
    python -m cifar_transfer.study --summary                                             # tables and verdicts, markdown

For the correct contract and every wrong variant, a pretrained backbone is fine-tuned on the whole training
set *with that preprocessing* and scored on the whole test set with the same preprocessing, in three regimes
(same budget and hyper-parameters for every cell of a regime):

* ``frozen``: a linear head on pooled features; every stage and its batch-norm statistics frozen. The network
  cannot adapt to a wrong input.
* ``partial``: the shipped recipe's cut: stem and the first four stages frozen with their batch-norm
  statistics, later stages trained (batch-norm in training mode); a shorter budget than the recipe.
* ``full``: every layer trained, batch-norm in training mode.

The correctly trained model of each regime is then also served every wrong variant (the train/serve mismatch).
Each finished cell is appended, atomically, to ``cells.jsonl`` in the output folder; a rerun skips the cells it
holds, so the study resumes cell by cell. ``results/study`` holds the shipped run; by default a run writes to a
fresh ``runs/study-<UTC time>``. The quick, small-scale version is ``python -m cifar_transfer.experiment``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cli import HelpFormatter
from .contract import CORRECT_KEY, WRONG_VARIANTS, NormalizationContract, variant_contracts, variant_title

FORMAT = "cifar_transfer.study/1"
# The shipped results in a checkout of the repository; installed (no pyproject.toml beside the package), the
# folder `--output results/study` fills when run from the current directory (issue 10).
_CHECKOUT = Path(__file__).resolve().parents[1]
RESULTS_DIR = (_CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path()) / "results" / "study"
CELLS_NAME = "cells.jsonl"
COMMAND = "python -m cifar_transfer.study --data-dir ../shared/datasets/cifar10-jpeg"
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


# Budgets sized for about 3 hours on a 2-core CPU at 32 px (see `--estimate`); the same on any device.
REGIMES: dict[str, Regime] = {r.key: r for r in (
    Regime("frozen", "Frozen backbone: linear head on pooled features, batch-norm statistics frozen",
           freeze_stages=-1, epochs=10, batch_size=256, lr=0.05, views=2),
    Regime("partial", "Partial fine-tune: stem + 4 stages frozen with their batch-norm statistics, later stages trained",
           freeze_stages=5, epochs=2, batch_size=128, lr=0.05, views=2, label_smoothing=0.1),
    Regime("full", "Full fine-tune: every layer trained, batch-norm in training mode",
           freeze_stages=0, epochs=1, batch_size=64, lr=0.005, views=0),
)}


@dataclass
class StudyConfig:
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None
    data_dir: str | None = None
    download: bool = True
    input_size: int = 32  # CIFAR's own resolution: no upsampling, and the only size whose full fine-tune fits the CPU budget
    regimes: list[str] | None = None  # None: all three
    variants: list[str] | None = None  # None: every wrong variant
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    max_per_class: int | None = None  # None: the whole training set (tests use a few images)
    max_test_per_class: int | None = None
    epochs_scale: float = 1.0  # multiplies every regime's epochs (tests: tiny budgets)
    max_batch_size: int | None = None  # caps every regime's batch size (tests: a few images)
    engine: str = "auto"  # the frozen prefix on a CPU: ONNX Runtime ("auto") or "pytorch"; training is PyTorch
    device: str = "auto"
    threads: int | None = None
    output: str | None = None
    progress: bool = True
    command: str = ""

    def setup(self, regime: Regime) -> dict:
        """What must be equal for cells of one regime to be comparable (a resumed run checks it)."""
        return {"backbone": self.backbone, "input_size": self.input_size, "max_per_class": self.max_per_class,
                "max_test_per_class": self.max_test_per_class, "epochs_scale": self.epochs_scale,
                "regime": dataclasses.asdict(regime)}

    def regime_list(self) -> list[Regime]:
        keys = self.regimes or list(REGIMES)
        unknown = [k for k in keys if k not in REGIMES]
        if unknown:
            raise StudyError(f"unknown regime(s) {unknown}; choose from {', '.join(REGIMES)}")
        cap = self.max_batch_size
        return [dataclasses.replace(REGIMES[k], batch_size=min(REGIMES[k].batch_size, cap)) if cap else REGIMES[k]
                for k in keys]


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


def _r(x: float | None, digits: int = 5) -> float | None:
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
    return {"median": _r(med), "p90": _r(finite[int(0.9 * (len(finite) - 1))]), "max": _r(finite[-1]),
            "nonfinite": len(norms) - len(finite), "spikes": sum(v > 10 * med for v in finite)}


def binned(values: list[float | None], bins: int = 100) -> list[float | None]:
    """Means of ``values`` over ``bins`` equal stretches of steps (plots; the raw series is not kept)."""
    if not values:
        return []
    out = []
    n = len(values)
    for b in range(min(bins, n)):
        chunk = [v for v in values[b * n // min(bins, n):(b + 1) * n // min(bins, n)] if v is not None]
        out.append(_r(sum(chunk) / len(chunk)) if chunk else None)
    return out


# -- probes --------------------------------------------------------------------------------------------


@torch.no_grad()
def probe(model: nn.Module, inputs: torch.Tensor) -> dict:
    """Divergence (first and all batch-norm layers) and pooled-feature norm for normalized ``inputs``, eval mode."""
    from .meter import LayerProbe, gaussian_kl

    was = model.training
    model.eval()
    norms = []
    handle = model.classifier.register_forward_pre_hook(lambda _m, args: norms.append(args[0].float().norm(dim=1)))
    try:
        with LayerProbe(model) as lp:
            for i in range(0, len(inputs), 256):
                model(inputs[i:i + 256])
        per_layer = []
        for bn, caps in zip(lp.bns, lp.captured):
            mean_b, var_b = torch.cat([c[0] for c in caps]), torch.cat([c[1] for c in caps])
            per_layer.append(gaussian_kl(mean_b, var_b, bn.running_mean.float(), bn.running_var.float()).mean(dim=1))
    finally:
        handle.remove()
        model.train(was)
    first, every = per_layer[0], torch.stack(per_layer).mean(dim=0)
    return {"first_bn": _r(first.median().item()), "all_bn": _r(every.median().item()),
            "feature_norm": _r(torch.cat(norms).mean().item())}


# -- batch sources -------------------------------------------------------------------------------------


class Batches:
    """Training batches for one cell: the frozen prefix's cached outputs, or augmented images run live."""

    def __init__(self, prefix, split, transform: nn.Module, regime: Regime, device: torch.device, seed: int):
        from . import data as data_mod

        self.labels = split.labels.to(device)
        self.device, self.seed, self.bs = device, seed, regime.batch_size
        self.cached = regime.views > 0
        self.images = split.images
        self.views: list[torch.Tensor] = []
        if self.cached:
            for v in range(regime.views):
                loader = data_mod.BatchLoader(split, 1000, augment=v > 0, seed=seed + 1000 * v)
                self.views.append(run_prefix(prefix, loader, transform, device))
        else:
            self.transform = transform

    def __len__(self) -> int:
        return len(self.labels) // self.bs

    def epoch(self, e: int):
        from .data import random_crop_flip

        g = torch.Generator().manual_seed(self.seed * 100_003 + e)
        order = torch.randperm(len(self.labels), generator=g)
        aug = torch.Generator().manual_seed(self.seed * 7_919 + e * 31 + 1)
        for i in range(len(self)):
            b = order[i * self.bs:(i + 1) * self.bs]
            if self.cached:
                yield self.views[e % len(self.views)][b.to(self.views[0].device)], self.labels[b.to(self.device)]
            else:
                x = random_crop_flip(self.images[b], aug)
                yield self.transform(x.to(self.device)), self.labels[b.to(self.device)]


def prefix_runner(prefix: nn.Module, input_size: int, engine: str = "auto"):
    """The frozen prefix as a function: ONNX Runtime on a CPU (engine.py: exported once per weights and size,
    3-7x eager PyTorch for this network), PyTorch elsewhere or when ``engine="pytorch"``."""
    prefix.eval()
    if next(prefix.parameters()).device.type == "cpu" and engine != "pytorch":
        from .engine import TorchEngine, make_engine

        run = make_engine(prefix, [], input_size, prefer=engine)
        if not isinstance(run, TorchEngine):
            return lambda x: run(x)[0]
    return prefix


@torch.no_grad()  # not inference_mode: the outputs are trained on (inference tensors cannot be)
def run_prefix(prefix, loader, transform: nn.Module, device: torch.device) -> torch.Tensor:
    """The frozen prefix's outputs (float32, kept on ``device``) for every batch of ``loader``."""
    if isinstance(prefix, nn.Module):
        prefix.eval()
    return torch.cat([prefix(transform(x.to(device))).float().to(device) for x, _ in loader])


# -- one cell ------------------------------------------------------------------------------------------


def _accuracy(logits_of, xs: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> tuple[float, float, torch.Tensor]:
    with torch.inference_mode():
        preds = torch.cat([logits_of(xs[i:i + batch]).argmax(1) for i in range(0, len(xs), batch)])
    acc = (preds == labels.to(preds.device)).float().mean().item()
    share = torch.bincount(preds.cpu()).max().item() / len(preds)
    return acc, share, preds


def _score(acc: float, share: float, n: int) -> dict:
    lo, hi = wilson(round(acc * n), n)
    return {"accuracy": _r(acc), "ci95": [_r(lo), _r(hi)], "n": n, "max_class_share": _r(share)}


def run_cell(initial: nn.Module, key: str, contract: NormalizationContract, regime: Regime, ds, cfg: StudyConfig,
             seed: int, device: torch.device, contracts: dict[str, NormalizationContract]) -> dict:
    """Train a copy of ``initial`` under ``contract`` in ``regime``; score it; for the correct contract also serve
    every wrong variant. Returns the cell's record (JSON-ready)."""
    from tqdm.auto import tqdm

    from .train import lr_at, make_optimizer, train_step

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = copy.deepcopy(initial).to(device)
    stages = list(model.stages)
    k = len(stages) - 1 if regime.freeze_stages < 0 else min(regime.freeze_stages, len(stages) - 1)
    prefix, body = nn.Sequential(*stages[:k]), nn.Sequential(*stages[k:])
    for p in prefix.parameters():
        p.requires_grad_(False)
    transform = contract.transform().to(device)
    test_x = ds.test.images
    probe_idx = torch.linspace(0, len(test_x) - 1, min(PROBE_IMAGES, len(test_x))).long()
    start = probe(model, transform(test_x[probe_idx].to(device)))

    if len(ds.train) < regime.batch_size:
        raise StudyError(f"the training set ({len(ds.train)} images) is smaller than one batch of {regime.batch_size}")
    run = prefix_runner(prefix, cfg.input_size, cfg.engine) if k else prefix
    batches = Batches(run, ds.train, transform, regime, device, seed)
    test_in = (run_prefix(run, [(test_x[i:i + 1000], None) for i in range(0, len(test_x), 1000)], transform, device)
               if batches.cached else None)
    test_y = ds.test.labels.to(device)
    subset = torch.arange(0, len(test_y), max(1, len(test_y) // CURVE_SUBSET))

    def test_logits(x: torch.Tensor) -> torch.Tensor:
        return body(x) if batches.cached else model(transform(x.to(device)))

    def score(index: torch.Tensor | None = None):
        body.eval()
        xs = (test_in if batches.cached else test_x) if index is None else (test_in if batches.cached else test_x)[index.to(
            test_in.device if batches.cached else "cpu")]
        ys = test_y if index is None else test_y[index.to(device)]
        return _accuracy(test_logits, xs, ys)

    steps = max(1, int(regime.epochs * cfg.epochs_scale * len(batches)))
    params = [p for p in body.parameters() if p.requires_grad]
    opt = make_optimizer(body, "sgd", regime.lr, regime.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=regime.label_smoothing)
    evals = sorted({max(1, round(steps * (i + 1) / CURVE_EVALS)) for i in range(CURVE_EVALS)})
    losses, norms, curve, stopped_at = [], [], {"step": [], "images": [], "wall_s": [], "test_subset_acc": [], "train_loss": []}, None
    t_train = time.perf_counter()

    def stream():
        e = 0
        while True:
            yield from batches.epoch(e)
            e += 1

    bar = tqdm(zip(range(1, steps + 1), stream()), total=steps, desc=f"{regime.key}/{key}/seed{seed}",
               disable=not cfg.progress, mininterval=5.0, dynamic_ncols=True, leave=False)
    for step, (xb, yb) in bar:
        lr = lr_at((step - 1) / steps, regime.lr, 0.05)
        for group in opt.param_groups:
            group["lr"] = lr
        prefix.eval()
        body.train()
        loss, _, norm = train_step(body, xb, yb, opt, loss_fn, norm_of=params)
        losses.append(_r(loss.item()))
        norms.append(_r(norm) if norm is not None else None)
        if losses[-1] is None or norms[-1] is None:
            stopped_at = step  # not a number any more: training stops here
            break
        if step in evals:
            acc, _, _ = score(subset)
            recent = [v for v in losses[-max(1, steps // CURVE_EVALS):] if v is not None]
            curve["step"].append(step)
            curve["images"].append(step * regime.batch_size)
            curve["wall_s"].append(round(time.perf_counter() - t_train, 2))
            curve["test_subset_acc"].append(_r(acc))
            curve["train_loss"].append(_r(sum(recent) / len(recent)) if recent else None)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - t_train

    model.eval()
    if stopped_at is None:
        acc, share, _ = score()
        test = _score(acc, share, len(test_y))
    else:
        test = {"accuracy": None, "ci95": None, "n": len(test_y), "max_class_share": None}
    end = probe(model, transform(test_x[probe_idx].to(device)))
    record = {
        "format": FORMAT, "key": f"{regime.key}/{key}/seed{seed}", "regime": regime.key, "variant": key, "seed": seed,
        "title": variant_title(key), "contract": contract.to_dict(), "setup": cfg.setup(regime),
        "steps": steps, "steps_done": len(losses), "batch_size": regime.batch_size,
        "test": test, "curve": curve,
        "loss_binned": binned(losses), "grad_norm_binned": binned(norms), "grad_norm": grad_stats(norms),
        "divergence": {"start": start, "end": end},
        "stopped_at": stopped_at,
        "diverged": has_diverged(losses, stopped_at),
        "collapsed": has_collapsed(test["accuracy"], test["max_class_share"]),
        "train_seconds": round(train_seconds, 1),
    }
    if key == CORRECT_KEY:  # trained right, served wrong
        served = {}
        for wrong_key, wrong in contracts.items():
            if wrong_key == CORRECT_KEY:
                continue
            wt = wrong.transform().to(device)
            acc, share, _ = _accuracy(lambda x: model(wt(x.to(device))), test_x, test_y)
            served[wrong_key] = {**_score(acc, share, len(test_y)),
                                 "divergence": probe(model, wt(test_x[probe_idx].to(device)))}
        record["served_wrong"] = served
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return record


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
    from .checkpoint import atomic_write_text

    path = Path(folder) / CELLS_NAME
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + json.dumps(cell, separators=(",", ":")) + "\n")


# -- the whole study -------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_study(cfg: StudyConfig, log=print) -> list[dict]:
    """Run every missing cell (regime x preprocessing x seed), appending each as it finishes; returns all cells."""
    from . import data as data_mod
    from .model import CifarTransferModel
    from .runtime import environment_info

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per regime: let cuDNN pick its fastest kernels
    out = Path(cfg.output or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    done = {c["key"]: c for c in read_cells(out)}
    regimes = cfg.regime_list()
    wanted = {r.key: cfg.setup(r) for r in regimes}
    for c in done.values():
        if c["regime"] in wanted and c.get("setup") != wanted[c["regime"]]:
            raise StudyError(f"{out / CELLS_NAME} holds cells of another setup ({c['key']}); use a fresh --output "
                             "or the same settings to resume")
    seeds = list(dict.fromkeys(cfg.seeds))
    keys = [CORRECT_KEY, *(cfg.variants if cfg.variants is not None else WRONG_VARIANTS)]
    todo = [(r, k, s) for s in seeds for r in regimes for k in keys if f"{r.key}/{k}/seed{s}" not in done]
    log(f"study: {len(done)} cells done, {len(todo)} to run, on {device} -> {out / CELLS_NAME}")
    if not todo:
        return list(done.values())
    from .backbones import get_backbone

    ds = data_mod.load_dataset(cfg.data_dir, download=cfg.download, contract=get_backbone(cfg.backbone).contract,
                               max_per_class=cfg.max_per_class,
                               max_test_per_class=cfg.max_test_per_class)
    log(f"data: {ds.name}: {len(ds.train)} training, {len(ds.test)} test images")
    torch.manual_seed(0)
    initial = CifarTransferModel.from_backbone(cfg.backbone, class_names=ds.classes, input_size=cfg.input_size,
                                               weights_file=cfg.backbone_weights)
    contracts = variant_contracts(initial.contract, keys)
    env = environment_info(device)
    for regime, key, seed in todo:
        cell = run_cell(initial, key, contracts[key], regime, ds, cfg, seed, device, contracts)
        cell["command"] = cfg.command
        cell["environment"] = env
        append_cell(out, cell)
        done[cell["key"]] = cell
        t = cell["test"]
        log(f"{cell['key']:<32} test {_pct(t['accuracy'])} [{_pct((t['ci95'] or [None])[0])}, "
            f"{_pct((t['ci95'] or [None, None])[1])}]  diverged={cell['diverged']} collapsed={cell['collapsed']}  "
            f"{cell['wall_seconds']:.0f} s")
    return list(done.values())


# -- the CPU-time estimate ------------------------------------------------------------------------------


def estimate(cfg: StudyConfig, log=print, steps: int = 6) -> dict:
    """Time a few training steps and prefix/eval batches of each regime on this machine; project the full study."""
    from .data import Split
    from .model import CifarTransferModel

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    n_train = 5000 * 10 if cfg.max_per_class is None else cfg.max_per_class * 10
    n_test = 1000 * 10 if cfg.max_test_per_class is None else cfg.max_test_per_class * 10
    n_cells = 1 + len(cfg.variants if cfg.variants is not None else WRONG_VARIANTS)
    model = CifarTransferModel.from_backbone(cfg.backbone, class_names=[str(i) for i in range(10)],
                                             input_size=cfg.input_size, weights_file=cfg.backbone_weights).to(device)
    transform = model.contract.transform().to(device)

    def timed(fn, repeat: int) -> float:
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / repeat

    from .train import make_optimizer, train_step

    imgs = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8)
    total, per = 0.0, {}
    full_eval = timed(lambda: _accuracy(lambda x: model(transform(x.to(device))), imgs[:500], torch.zeros(500, dtype=torch.long)), 2) / 500
    for regime in cfg.regime_list():
        stages = list(model.stages)
        k = len(stages) - 1 if regime.freeze_stages < 0 else regime.freeze_stages
        prefix, body = nn.Sequential(*stages[:k]), nn.Sequential(*stages[k:])
        x = transform(imgs[:regime.batch_size].to(device))
        run = prefix_runner(prefix, cfg.input_size, cfg.engine) if k else prefix
        prefix_s = timed(lambda: run_prefix(run, [(imgs[:500], None)], transform, device), 2) / 500 if k else 0.0
        feats = run_prefix(run, [(imgs[:regime.batch_size], None)], transform, device) if k else x
        opt = make_optimizer(body, "sgd", 1e-4, 0.0)
        y = torch.zeros(len(feats), dtype=torch.long, device=device)
        step_s = timed(lambda: train_step(body, feats, y, opt, nn.CrossEntropyLoss()), steps)
        n_steps = int(regime.epochs * cfg.epochs_scale * (n_train // regime.batch_size))
        cell = (n_steps * step_s + prefix_s * (n_train * regime.views + n_test)
                + full_eval * (PROBE_IMAGES * 2) + (full_eval if not k else 0.0) * (n_test + CURVE_EVALS * CURVE_SUBSET))
        serve = (n_cells - 1) * full_eval * (n_test + PROBE_IMAGES)
        per[regime.key] = {"step_s": _r(step_s), "steps": n_steps, "prefix_s_per_image": _r(prefix_s),
                           "cell_s": round(cell), "regime_s": round(cell * n_cells + serve)}
        total += per[regime.key]["regime_s"]
        log(f"{regime.key:<8} {n_steps} steps x {step_s * 1000:.0f} ms, ~{cell / 60:.1f} min per cell, "
            f"{per[regime.key]['regime_s'] / 60:.0f} min for {n_cells} cells + serving")
    total *= len(set(cfg.seeds))
    log(f"projected total on {device}: {total / 3600:.2f} h for {len(set(cfg.seeds))} seed(s) "
        f"(eval {full_eval * 1000:.2f} ms per image; decoding the dataset not counted)")
    return {"device": str(device), "regimes": per, "total_s": round(total)}


# -- reading the results: tables and verdicts ----------------------------------------------------------


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def index(cells: list[dict]) -> dict:
    """``{regime: {seed: {variant: cell}}}``."""
    out: dict = {}
    for c in cells:
        out.setdefault(c["regime"], {}).setdefault(c["seed"], {})[c["variant"]] = c
    return out


def steps_to_target(cell: dict, target: float | None) -> int | None:
    if target is None:
        return None
    for step, acc in zip(cell["curve"]["step"], cell["curve"]["test_subset_acc"]):
        if acc is not None and acc >= 0.95 * target:
            return step
    return None


def table_markdown(cells: list[dict]) -> str:
    """One table per regime: accuracy ± interval per seed, served-wrong accuracy, divergence, flags."""
    lines = []
    for regime_key, by_seed in index(cells).items():
        regime = REGIMES.get(regime_key)
        seeds = sorted(by_seed)
        lines += [f"**{regime.title if regime else regime_key}**", "",
                  "| preprocessing | " + " | ".join(f"trained & tested (seed {s})" for s in seeds)
                  + " | served wrong (trained right) | first-BN divergence start → end | all-BN divergence start → end"
                  " | steps to 95% of correct | diverged / collapsed |",
                  "|---|" + "---:|" * len(seeds) + "---:|---:|---:|---:|---|"]
        variants = list(dict.fromkeys(v for s in seeds for v in by_seed[s]))
        for v in variants:
            row = [variant_title(v) if v in WRONG_VARIANTS or v == CORRECT_KEY else v]
            for s in seeds:
                c = by_seed[s].get(v)
                t = c["test"] if c else None
                row.append("—" if not t or t["accuracy"] is None
                           else f"{_pct(t['accuracy'])} [{_pct(t['ci95'][0])}, {_pct(t['ci95'][1])}]")
            c0 = by_seed[seeds[0]].get(v)
            correct0 = by_seed[seeds[0]].get(CORRECT_KEY)
            served = (correct0 or {}).get("served_wrong", {}).get(v)
            row.append("(the model's own)" if v == CORRECT_KEY else (_pct(served["accuracy"]) if served else "—"))
            if c0:
                d0, d1 = c0["divergence"]["start"], c0["divergence"]["end"]
                row.append(f"{_num(d0['first_bn'])} → {_num(d1['first_bn'])}")
                row.append(f"{_num(d0['all_bn'])} → {_num(d1['all_bn'])}")
                target = ((correct0 or {}).get("curve", {}).get("test_subset_acc") or [None])[-1]
                st = steps_to_target(c0, target)
                row.append("never" if st is None else f"{st} of {c0['steps']}")
                row.append(f"{'yes' if c0['diverged'] else 'no'} / {'yes' if c0['collapsed'] else 'no'}")
            else:
                row += ["—"] * 4
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.3e}"


def verdicts(cells: list[dict]) -> list[dict]:
    """A verdict per seed claim per regime, from the cells alone: ``{"claim", "regime", "verdict", "evidence"}``."""
    out = []
    for regime_key, by_seed in index(cells).items():
        seed = min(by_seed)
        cs = by_seed[seed]
        correct = cs.get(CORRECT_KEY)
        if not correct or correct["test"]["accuracy"] is None:
            continue
        wrong = {k: c for k, c in cs.items() if k != CORRECT_KEY}
        if not wrong:
            continue
        n = correct["test"]["n"]
        pc = correct["test"]["accuracy"]

        def add(claim: str, verdict: str, evidence: str) -> None:
            out.append({"claim": claim, "regime": regime_key, "verdict": verdict, "evidence": evidence})

        # features mis-scaled
        f0 = correct["divergence"]["start"]["feature_norm"]
        ratios = {k: c["divergence"]["start"]["feature_norm"] / f0 for k, c in wrong.items()
                  if f0 and c["divergence"]["start"]["feature_norm"] is not None}
        f1 = correct["divergence"]["end"]["feature_norm"]
        ratios_end = {k: c["divergence"]["end"]["feature_norm"] / f1 for k, c in wrong.items()
                      if f1 and c["divergence"]["end"]["feature_norm"] is not None}
        off = [k for k, r in ratios.items() if not 0.8 <= r <= 1.25]
        add("Features are mis-scaled", f"yes for {len(off)} of {len(ratios)} variants before training",
            "pooled-feature norm relative to the correct contract, before → after training: " + "; ".join(
                f"{k} ×{ratios[k]:.2f} → ×{ratios_end.get(k, float('nan')):.2f}" for k in ratios)
            + " (outside ×0.8–×1.25 counts as mis-scaled)")
        # batch-norm statistics shifted: where the input enters (first layer) and over every layer
        def shift(c: dict, when: str, where: str) -> float | None:
            return c["divergence"][when][where]

        first0, first1 = shift(correct, "start", "first_bn"), shift(correct, "end", "first_bn")
        more = [k for k, c in wrong.items() if (shift(c, "start", "first_bn") or 0) > 1.5 * first0]
        still = [k for k, c in wrong.items() if (shift(c, "end", "first_bn") or 0) > 1.5 * first1]
        add("Batch-norm layers see shifted statistics",
            f"yes at the first layer for {len(more)} of {len(wrong)} variants before training; after training "
            f"{len(still)} still above 1.5× the correct model's",
            f"first-BN divergence (median per image) correct {first0:.3g} → {first1:.3g}; " + "; ".join(
                f"{k} {_num(shift(c, 'start', 'first_bn'))} → {_num(shift(c, 'end', 'first_bn'))}" for k, c in wrong.items())
            + f". Averaged over every BN layer: correct {_num(shift(correct, 'start', 'all_bn'))} → "
            f"{_num(shift(correct, 'end', 'all_bn'))}; " + "; ".join(
                f"{k} {_num(shift(c, 'start', 'all_bn'))} → {_num(shift(c, 'end', 'all_bn'))}" for k, c in wrong.items()))
        # unstable gradients
        g0 = correct["grad_norm"]
        unstable = [k for k, c in wrong.items() if c["grad_norm"]["nonfinite"] or (
            g0["p90"] and c["grad_norm"]["p90"] is not None and c["grad_norm"]["p90"] > 1.5 * g0["p90"])
            or c["grad_norm"]["spikes"] > 2 * g0["spikes"] + 2]
        add("Gradients are unstable", f"less stable for {len(unstable)} of {len(wrong)} variants",
            "gradient norm median / p90 / max / spikes above 10x the median / non-finite: correct "
            f"{_num(g0['median'])} / {_num(g0['p90'])} / {_num(g0['max'])} / {g0['spikes']} / {g0['nonfinite']}; "
            + "; ".join(f"{k} {_num(c['grad_norm']['median'])} / {_num(c['grad_norm']['p90'])} / "
                        f"{_num(c['grad_norm']['max'])} / {c['grad_norm']['spikes']} / {c['grad_norm']['nonfinite']}"
                        for k, c in wrong.items())
            + " (less stable: p90 above 1.5x the correct run's, more than twice its spikes + 2, or any non-finite)")
        # slow convergence
        target = (correct["curve"]["test_subset_acc"] or [None])[-1]
        st_c = steps_to_target(correct, target)
        slow = {k: steps_to_target(c, target) for k, c in wrong.items()}
        slower = [k for k, s in slow.items() if s is None or (st_c is not None and s > st_c)]
        add("Training converges slowly", f"slower for {len(slower)} of {len(slow)} variants",
            f"first of {CURVE_EVALS} curve points reaching 95% of the correct cell's final test-subset accuracy "
            f"({_pct(target)}): correct at step {st_c}; " + "; ".join(
                f"{k} {'never' if s is None else f'step {s}'}" for k, s in slow.items()))
        # collapse
        bad = [k for k, c in wrong.items() if c["diverged"] or c["collapsed"]]
        add("Training collapses", f"{len(bad)} of {len(wrong)} variants diverged or collapsed",
            f"correct contract: diverged={correct['diverged']}, collapsed={correct['collapsed']}; "
            + ("; ".join(f"{k}: diverged={wrong[k]['diverged']}, collapsed={wrong[k]['collapsed']}, stopped at step "
                       f"{wrong[k]['stopped_at']}" for k in bad) or "none")
            + f" (definitions: diverged = {DEFINITIONS['diverged']}; collapsed = {DEFINITIONS['collapsed']})")
        # accuracy drop, trained and tested consistently
        diffs = {}
        for k, c in wrong.items():
            p = c["test"]["accuracy"]
            diffs[k] = (None, None) if p is None else (p - pc, diff_interval(p, c["test"]["n"], pc, n))
        correct_by_seed = [by_seed[s][CORRECT_KEY]["test"]["accuracy"] for s in sorted(by_seed)
                           if CORRECT_KEY in by_seed[s] and by_seed[s][CORRECT_KEY]["test"]["accuracy"] is not None]
        spread = max(correct_by_seed) - min(correct_by_seed)  # training noise between seeds (0 with one seed)

        def seed_diffs(k: str) -> list[float]:  # the variant's difference to the correct contract in every seed
            return [by_seed[s][k]["test"]["accuracy"] - by_seed[s][CORRECT_KEY]["test"]["accuracy"] for s in by_seed
                    if k in by_seed[s] and CORRECT_KEY in by_seed[s] and by_seed[s][k]["test"]["accuracy"] is not None
                    and by_seed[s][CORRECT_KEY]["test"]["accuracy"] is not None]

        # beyond the test-sampling interval, beyond the seed spread, and the same sign in every seed
        worse = [k for k, (d, ci) in diffs.items()
                 if d is None or (ci[1] < 0 and -d > spread and all(x < 0 for x in seed_diffs(k)))]
        better = [k for k, (d, ci) in diffs.items()
                  if d is not None and ci[0] > 0 and d > spread and all(x > 0 for x in seed_diffs(k))]

        def other_seeds(k: str) -> str:
            notes = []
            for s in sorted(by_seed):
                c, ref = by_seed[s].get(k), by_seed[s].get(CORRECT_KEY)
                if s != seed and c and ref and c["test"]["accuracy"] is not None and ref["test"]["accuracy"] is not None:
                    notes.append(f"seed {s}: {_pts(c['test']['accuracy'] - ref['test']['accuracy'])}")
            return f" ({', '.join(notes)})" if notes else ""

        seeds_note = ""
        if len(by_seed) > 1:
            accs = [(s, by_seed[s][CORRECT_KEY]["test"]["accuracy"]) for s in sorted(by_seed)
                    if CORRECT_KEY in by_seed[s] and by_seed[s][CORRECT_KEY]["test"]["accuracy"] is not None]
            seeds_note = ("; the correct contract by seed: " + ", ".join(f"{_pct(a, 2)} (seed {s})" for s, a in accs)
                          + f": a spread of {100 * spread:.1f} points, which a difference must also exceed")
        add("Accuracy drops silently (trained and served the same wrong way)",
            f"a drop beyond noise for {len(worse)} of {len(diffs)} variants"
            + (f", a gain for {len(better)}" if better else ""),
            f"difference to the correct contract ({_pct(pc, 2)}, seed {seed}), points with 95% interval: " + "; ".join(
                f"{k} {'no score' if d is None else _pts(d)} [{'' if d is None else _pts(ci[0])}, "
                f"{'' if d is None else _pts(ci[1])}]{other_seeds(k)}" for k, (d, ci) in diffs.items()) + seeds_note)
        served = correct.get("served_wrong", {})
        if served:
            drops = {k: v["accuracy"] - pc for k, v in served.items() if v["accuracy"] is not None}
            add("Accuracy drops silently (trained right, served wrong)",
                f"a drop for {sum(d < 0 and diff_interval(pc + d, n, pc, n)[1] < 0 for d in drops.values())} of {len(drops)} variants",
                "points vs the correct contract: " + "; ".join(f"{k} {_pts(d)}" for k, d in drops.items()))
    return out


def verdicts_markdown(cells: list[dict]) -> str:
    rows = verdicts(cells)
    if not rows:
        return ""
    lines = ["| claim | regime | verdict | evidence |", "|---|---|---|---|"]
    for v in rows:
        lines.append(f"| {v['claim']} | {v['regime']} | {v['verdict']} | {v['evidence']} |")
    return "\n".join(lines)


def summary_markdown(cells: list[dict]) -> str:
    if not cells:
        return f"No study results yet: run `{COMMAND}`."
    seeds = sorted({c["seed"] for c in cells})
    wall = sum(c["wall_seconds"] for c in cells)
    places = {}
    for c in cells:
        env = c.get("environment", {})
        name = env.get("gpu") or (f"{env['cpu']} ({env.get('cpu_count', '?')} cores)" if env.get("cpu") else "?")
        places[name] = places.get(name, 0) + 1
    where = " and ".join(f"{name} ({n} cells)" if len(places) > 1 else name for name, n in places.items())
    head = (f"{len(cells)} cells (regime × preprocessing × seed; seeds {', '.join(map(str, seeds))}), "
            f"{cells[0]['setup']['input_size']} px, {cells[0]['test']['n']} test images each, "
            f"{wall / 60:.1f} min of training and scoring on {where}. Reproduce: `{COMMAND} --seeds "
            f"{' '.join(map(str, seeds))}` (each cell records the exact command it ran under).")
    return "\n\n".join(x for x in (head, table_markdown(cells), verdicts_markdown(cells)) if x)


def readme_table(cells: list[dict]) -> str:
    """The README's compact table: one row per preprocessing, one column group per regime (seed 0; seed 1 in
    brackets where run), then served-wrong accuracy. ``tests/test_study.py`` checks the README carries it."""
    by = index(cells)
    regimes = [r for r in REGIMES if r in by]
    head = ["preprocessing"] + [f"{r}: trained & tested" for r in regimes] + [f"{r}: served wrong" for r in regimes]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    variants = list(dict.fromkeys(v for r in regimes for v in by[r][min(by[r])]))
    for v in variants:
        row = [variant_title(v)]
        for r in regimes:
            accs = [_pct(by[r][s][v]["test"]["accuracy"]) for s in sorted(by[r]) if v in by[r][s]]
            row.append(accs[0] + (f" ({', '.join(accs[1:])})" if accs[1:] else ""))
        for r in regimes:
            served = by[r][min(by[r])].get(CORRECT_KEY, {}).get("served_wrong", {}).get(v)
            row.append("—" if v == CORRECT_KEY or not served else _pct(served["accuracy"]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- plots ------------------------------------------------------------------------------------------------


def write_plots(cells: list[dict], out: Path) -> list[Path]:
    """``accuracy.png`` (test accuracy with intervals per regime) and ``curves.png`` (test-subset accuracy and
    training loss against step, seed 0 or the lowest)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .experiment import save_png

    by = index(cells)
    regimes = list(by)
    written = []
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4.2), squeeze=False)
    for ax, r in zip(axes[0], regimes):
        s = min(by[r])
        vs = list(by[r][s])
        accs = [by[r][s][v]["test"]["accuracy"] or 0.0 for v in vs]
        lo = [a - (by[r][s][v]["test"]["ci95"] or [a, a])[0] for a, v in zip(accs, vs)]
        hi = [(by[r][s][v]["test"]["ci95"] or [a, a])[1] - a for a, v in zip(accs, vs)]
        ax.barh(range(len(vs)), [100 * a for a in accs], xerr=[[100 * x for x in lo], [100 * x for x in hi]],
                color=["#1b7837" if v == CORRECT_KEY else "#b2182b" for v in vs])
        served = by[r][s].get(CORRECT_KEY, {}).get("served_wrong", {})
        for i, v in enumerate(vs):
            if v in served and served[v]["accuracy"] is not None:
                ax.plot(100 * served[v]["accuracy"], i, "k|", markersize=14)
        ax.set_yticks(range(len(vs)), vs)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy, %")
        ax.set_title(r)
    fig.suptitle("bar: trained and tested with that preprocessing (whisker: 95% interval); "
                 "|: trained right, served that way", fontsize=10)
    fig.tight_layout()
    written.append(save_png(fig, out / "accuracy.png"))
    plt.close(fig)
    fig, axes = plt.subplots(2, len(regimes), figsize=(5 * len(regimes), 7), squeeze=False)
    for j, r in enumerate(regimes):
        s = min(by[r])
        for v, c in by[r][s].items():
            style = dict(lw=2.2 if v == CORRECT_KEY else 1.2, label=v)
            axes[0][j].plot(c["curve"]["step"], [100 * (a or 0) for a in c["curve"]["test_subset_acc"]], **style)
            lb = c["loss_binned"]
            axes[1][j].plot([(i + 0.5) * c["steps_done"] / max(1, len(lb)) for i in range(len(lb))], lb, **style)
        axes[0][j].set_title(r)
        axes[0][j].set_ylabel("test-subset accuracy, %")
        axes[1][j].set_ylabel("training loss")
        axes[1][j].set_xlabel("step")
        axes[1][j].set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    written.append(save_png(fig, out / "curves.png"))
    plt.close(fig)
    return written


# -- the app tab ------------------------------------------------------------------------------------------


def build_tab(results_dir: Path | None = None) -> bool:
    """Add the study's plots, tables and verdicts to the current ``gr.Blocks``/``gr.Tab`` context.

    Returns False (and adds nothing) when the folder holds no cells, so the caller can show something else."""
    import gradio as gr

    from .experiment import table_html

    folder = Path(results_dir or RESULTS_DIR)
    try:
        cells = read_cells(folder)
    except StudyError as exc:
        gr.Markdown(f"The study's results cannot be read: {exc}.")
        return True
    if not cells:
        return False
    head, *rest = [b.strip() for b in summary_markdown(cells).split("\n\n") if b.strip()]
    gr.Markdown("### The seed's claims at full scale\n"
                "Every preprocessing trained on all 50,000 training images *and* tested the same way on all 10,000 "
                "test images, in three regimes; the correctly trained model also served each wrong variant. "
                + head)
    for name, label in (("accuracy.png", "Test accuracy per regime and preprocessing"),
                        ("curves.png", "Test-subset accuracy and training loss against step")):
        if (folder / name).is_file():
            gr.Markdown(f"**{label}**", elem_classes=["caption", "plot-caption"])
            gr.Image(str(folder / name), type="filepath", label=label, show_label=False, interactive=False,
                     buttons=[], alt_text=label, elem_classes="plot")
    for block in rest:
        if block.startswith("| claim"):
            gr.Markdown("**Verdict per claim and regime** (computed from the cells above; seed "
                        f"{min(c['seed'] for c in cells)})")
            gr.HTML(table_html(block), elem_classes="exp-table")
        elif block.startswith("|"):
            gr.HTML(table_html(block), elem_classes="exp-table")
        else:
            gr.Markdown(block)
    gr.Markdown("Definitions: " + "; ".join(f"*{k}*: {v}" for k, v in DEFINITIONS.items()))
    return True


# -- command line -----------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(prog="python -m cifar_transfer.study", description=__doc__.split("\n\n")[0],
                                epilog="Regimes: " + "; ".join(
                                    f"{r.key}: {r.title} ({r.epochs:g} epochs, batch {r.batch_size}, lr {r.lr:g}"
                                    f"{f', {r.views} cached views' if r.views else ''})" for r in REGIMES.values()),
                                formatter_class=HelpFormatter)
    from .backbones import BACKBONES

    p.add_argument("--backbone", default=d.backbone, choices=sorted(BACKBONES), help="pretrained backbone")
    p.add_argument("--backbone-weights", metavar="FILE", help="local ImageNet weights file (offline ResNets)")
    p.add_argument("--data-dir", metavar="DIR", help="train/ + test/ class folders; default: torchvision download")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download the dataset")
    p.add_argument("--input-size", type=int, default=d.input_size,
                   help="side in pixels the network sees (32: CIFAR's own; larger sizes cost ~(size/32)^2 on a CPU)")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES), help="regimes to run (default: all)")
    p.add_argument("--variants", nargs="+", metavar="KEY", choices=list(WRONG_VARIANTS),
                   help="wrong variants to run beside the correct contract (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=d.seeds, help="seeds; each adds a full set of cells")
    p.add_argument("--max-per-class", type=int, help="training images per class (default: all; for quick checks)")
    p.add_argument("--max-test-per-class", type=int, help="test images per class (default: all)")
    p.add_argument("--epochs-scale", type=float, default=d.epochs_scale,
                   help="multiply every regime's epochs (cells of different scales never mix in one results file)")
    p.add_argument("--max-batch-size", type=int, help="cap every regime's batch size (quick checks on a few images)")
    p.add_argument("--engine", default=d.engine, choices=["auto", "onnxruntime", "pytorch"],
                   help="runs the frozen prefix (feature caching) on a CPU; auto: ONNX Runtime if installed")
    p.add_argument("--device", default=d.device, help="auto (CUDA if present), cpu, cuda, cuda:1, mps")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    p.add_argument("--output", metavar="DIR",
                   help="results folder (default: a fresh runs/study-<UTC time>/; pass results/study to resume or "
                        "extend the shipped study)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--estimate", action="store_true", help="time a few steps per regime here and print the projected total")
    p.add_argument("--summary", action="store_true", help="only print the tables and verdicts of --output (default results/study)")
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[StudyConfig, str | None]:
    p = get_args_parser()
    args = vars(p.parse_args(argv))
    summary, estimate_only = args.pop("summary"), args.pop("estimate")  # both popped: neither is a StudyConfig field
    mode = "summary" if summary else "estimate" if estimate_only else None
    if args["output"] is None:
        args["output"] = str(RESULTS_DIR) if mode == "summary" else str(
            Path("runs") / time.strftime("study-%Y%m%d-%H%M%S", time.gmtime()))
    cfg = StudyConfig(**args)
    cfg.command = "python -m cifar_transfer.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    if cfg.input_size <= 0 or cfg.epochs_scale <= 0:
        p.error("--input-size and --epochs-scale must be positive")
    return cfg, mode


def main(argv: list[str] | None = None) -> None:
    from .backbones import BackboneError
    from .data import DataError

    cfg, mode = config_from_args(argv)
    try:
        if mode == "summary":
            cells = read_cells(cfg.output)
            if not cells:
                raise StudyError(f"no study results at {Path(cfg.output) / CELLS_NAME}; run `{COMMAND}` to produce them")
            print(summary_markdown(cells))
            return
        if mode == "estimate":
            estimate(cfg)
            return
        cells = run_study(cfg)
        write_plots(cells, Path(cfg.output))
    except (StudyError, BackboneError, DataError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"\nwrote {Path(cfg.output) / CELLS_NAME}, accuracy.png and curves.png\n")
    print(summary_markdown(cells))


if __name__ == "__main__":
    main()
