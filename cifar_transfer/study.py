"""The seed's training claims at full scale: every preprocessing, trained and served, in three regimes.

    python -m cifar_transfer.study --data-dir ../shared/datasets/cifar10-jpeg --output results/study-128px   # seed 0, resumable
    python -m cifar_transfer.study --data-dir ../shared/datasets/cifar10-jpeg --estimate   # time a few steps, project the total
    python -m cifar_transfer.study --summary       # tables and verdicts, markdown; cells in progress on stderr

For the correct contract and every wrong variant, a pretrained backbone is fine-tuned on the whole training set
*with that preprocessing* and scored on the whole test set with the same preprocessing, in three regimes (same
budget and hyper-parameters for every cell of a regime; the budgets of each input size live in
:mod:`cifar_transfer.study_results`: 128 px, the shipped checkpoint's size, chosen on a validation split; 32 px, the
small-input appendix):

* ``frozen``: a linear head on pooled features; every stage and its batch-norm statistics frozen. The network
  cannot adapt to a wrong input.
* ``partial``: the shipped recipe's cut: stem and the first four stages frozen with their batch-norm
  statistics, later stages trained (batch-norm in training mode).
* ``full``: every layer trained, batch-norm in training mode.

The correctly trained model of each regime is then also served every wrong variant (the train/serve mismatch).
Each finished cell is appended, atomically, to ``cells.jsonl`` in the output folder; a rerun skips the cells it
holds, so the study resumes cell by cell; a cell stopped part-way continues from its last saved step
(``<output>/in-progress/``, :mod:`cifar_transfer.cell_state`), with the same numbers. ``results/study-128px`` and ``results/study`` (32 px) hold the recorded
runs; by default a run writes to a fresh ``runs/study-<UTC time>``. ``--val-fraction`` scores on a held-out share
of the training set instead (how the 128-px budgets were chosen: ``benchmarks/study_budgets.py``). The quick,
small-scale version is ``python -m cifar_transfer.experiment``.

Slightly over 500 lines: one cell's caching, training, scoring and probes share its state (the cut, the caches, the
trained model's runner) and read best as one function beside the loop over cells and its command line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as data_mod
from .backbones import BACKBONES, BackboneError, get_backbone
from .batches import CachedBatches, FeatureCache, ImageBatches
from .cli import HelpFormatter
from .contract import CORRECT_KEY, WRONG_VARIANTS, NormalizationContract, variant_contracts, variant_title
from .data import DataError
from .inference import mirror, prefix_runner
from .meter import LayerProbe
from .model import CifarTransferModel
from .runtime import environment_info
from .checkpoint import atomic_write_text
from .study_report import (docs_block, pct, readme_table, regimes_markdown, replace_block, scale_comparison,
                           summary_markdown, write_plots)
from .study_results import (CELLS_NAME, COMMAND, CURVE_EVALS, CURVE_SUBSET, FORMAT, PROBE_IMAGES, REGIMES, REGIMES_128,
                            PENDING, RESULTS_DIR_128, SCALE_DIRS,
                            WARMUP, Regime, StudyError, append_cell, binned, grad_stats, has_collapsed, has_diverged,
                            read_cells, regime_setup, regimes_for, round_sig, wilson)
from .cell_state import FOLDER as STATE_FOLDER, CellState, describe, segment
from .training import lr_at, make_optimizer, run_steps, split_frozen, step_stream


@dataclass
class StudyConfig:
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None
    data_dir: str | None = None
    download: bool = True
    input_size: int = 128  # the shipped checkpoint's input size; 32 (CIFAR's own, no upsampling) is the appendix
    regimes: list[str] | None = None  # None: all three
    variants: list[str] | None = None  # None: every wrong variant
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    max_per_class: int | None = None  # None: the whole training set (tests use a few images)
    max_test_per_class: int | None = None
    epochs_scale: float = 1.0  # multiplies every regime's epochs (tests: tiny budgets)
    max_batch_size: int | None = None  # caps every regime's batch size (tests: a few images)
    val_fraction: float = 0.0  # >0: train on the rest of the training set, score on this held-out share (budgets)
    engine: str = "auto"  # the frozen prefix on a CPU: ONNX Runtime ("auto") or "pytorch"; training is PyTorch
    device: str = "auto"
    threads: int | None = None
    output: str | None = None
    progress: bool = True
    command: str = ""
    write_docs: str | None = None  # with --summary: the docs file whose generated blocks are rewritten
    write_readme: str | None = None  # with --summary: the README whose study table block is rewritten

    def setup(self, regime: Regime) -> dict:
        """What must be equal for cells of one regime to be comparable (a resumed run checks it)."""
        setup = {"backbone": self.backbone, "input_size": self.input_size, "max_per_class": self.max_per_class,
                 "max_test_per_class": self.max_test_per_class, "epochs_scale": self.epochs_scale,
                 "regime": regime_setup(regime)}
        if self.val_fraction:  # scored on a validation split: never mixed with test-set cells
            setup["val_fraction"] = self.val_fraction
        return setup

    def regime_list(self) -> list[Regime]:
        regimes = regimes_for(self.input_size)
        keys = self.regimes or list(regimes)
        unknown = [k for k in keys if k not in regimes]
        if unknown:
            raise StudyError(f"unknown regime(s) {unknown}; choose from {', '.join(regimes)}")
        cap = self.max_batch_size
        return [dataclasses.replace(regimes[k], batch_size=min(regimes[k].batch_size, cap)) if cap else regimes[k]
                for k in keys]




# -- probes --------------------------------------------------------------------------------------------


@torch.no_grad()
def probe(model: nn.Module, inputs: torch.Tensor) -> dict:
    """Divergence (first and all batch-norm layers) and pooled-feature norm for normalized ``inputs``, eval mode."""
    was = model.training
    model.eval()
    norms = []
    handle = model.classifier.register_forward_pre_hook(lambda _m, args: norms.append(args[0].float().norm(dim=1)))
    try:
        with LayerProbe(model) as lp:
            for i in range(0, len(inputs), 256):
                model(inputs[i:i + 256])
        per_layer = lp.divergences()
    finally:
        handle.remove()
        model.train(was)
    first, every = per_layer[0], torch.stack(per_layer).mean(dim=0)
    return {"first_bn": round_sig(first.median().item()), "all_bn": round_sig(every.median().item()),
            "feature_norm": round_sig(torch.cat(norms).mean().item())}


# -- one cell ------------------------------------------------------------------------------------------


def _accuracy(views: list, labels: torch.Tensor, batch: int = 250) -> dict:  # 250: ONNX Runtime's arena at 128 px stays small
    """Score ``views``, a list of ``(logits_of, inputs)`` over the same images: the prediction is the argmax of their
    mean softmax (one view: the plain argmax; two: flip test-time augmentation, as ``train --tta-flip``). Returns the
    record's ``test`` fields; with several views also ``accuracy_one_view`` (the first view alone)."""
    probs_all, probs_one = [], []
    with torch.inference_mode():
        for i in range(0, len(labels), batch):
            probs = [f(x[i:i + batch]).float().softmax(1) for f, x in views]
            probs_one.append(probs[0].argmax(1))
            probs_all.append(torch.stack(probs).mean(0).argmax(1))
    labels = labels.cpu()
    preds = torch.cat(probs_all).cpu()
    n, acc = len(preds), (preds == labels).float().mean().item()
    lo, hi = wilson(round(acc * n), n)
    out = {"accuracy": round_sig(acc), "ci95": [round_sig(lo), round_sig(hi)], "n": n,
           "max_class_share": round_sig(torch.bincount(preds).max().item() / n)}
    if len(views) > 1:
        out["accuracy_one_view"] = round_sig((torch.cat(probs_one).cpu() == labels).float().mean().item())
    return out


class _Flipped(nn.Module):
    """``preprocess`` then :func:`~cifar_transfer.inference.mirror`: the second view of flip test-time augmentation,
    for the cached features (through the frozen prefix) and the images alike."""

    def __init__(self, preprocess: nn.Module):
        super().__init__()
        self.preprocess = preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mirror(self.preprocess(x))


def run_cell(initial: nn.Module, key: str, contract: NormalizationContract, regime: Regime, ds, cfg: StudyConfig,
             seed: int, device: torch.device, contracts: dict[str, NormalizationContract], *,
             serve_wrong: bool = True, caches: dict | None = None, state_dir: Path | None = None,
             log=print) -> dict:
    """Train a copy of ``initial`` under ``contract`` in ``regime``; score it; for the correct contract also serve
    every wrong variant (unless ``serve_wrong`` is False). Returns the cell's record (JSON-ready).

    ``caches``, when given, keeps each preprocessing's cached prefix features across calls (the budget search
    trains several heads on the same features); a cell's own run passes none. With ``state_dir`` the cell saves its
    progress there as it trains and continues from it when run again (:mod:`cifar_transfer.cell_state`)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = copy.deepcopy(initial).to(device)
    if regime.channels_last:
        model.to(memory_format=torch.channels_last)
    cut = split_frozen(model, regime.freeze_stages)
    body, pool = cut.trainable, None
    if regime.views > 0 and len(body) == 1:  # only the head trains: its parameter-free pooling runs once, with the
        head = body[0]                       # prefix, so the cache holds pooled features (1/16 the memory at 128 px)
        pool, body = head.pre, nn.Sequential(head.dropout, head.fc)
    transform = contract.transform().to(device)
    test_x = ds.test.images
    probe_idx = torch.linspace(0, len(test_x) - 1, min(PROBE_IMAGES, len(test_x))).long()
    start = probe(model, transform(test_x[probe_idx].to(device)))

    if len(ds.train) < regime.batch_size:
        raise StudyError(f"the training set ({len(ds.train)} images) is smaller than one batch of {regime.batch_size}")
    cached = regime.views > 0
    if cached:  # the frozen prefix's outputs, kept float32 on the device (prefix batches of 1000 images)
        memo_key = (key, contract.input_size, regime.freeze_stages, regime.views, seed)
        if caches is not None and memo_key in caches:
            train_cache, test_views = caches[memo_key]
        else:
            prefix_run = prefix_runner(cut.prefix, contract.input_size, cfg.engine)
            run = prefix_run if pool is None else (lambda x: pool(prefix_run(x)))
            common = dict(device=device, seed=seed, batch_size=1000, dtype=torch.float32, store=device,
                          channels_last=regime.channels_last)
            train_cache = FeatureCache(run, ds.train, transform, views=regime.views, augment=True, **common)
            # the test images' features, and with flip TTA those of their mirror images (through the prefix)
            test_views = [FeatureCache(run, ds.test, t, views=1, augment=False, **common).views[0]
                          for t in ([transform, _Flipped(transform)] if regime.tta_flip else [transform])]
            if caches is not None:
                caches[memo_key] = (train_cache, test_views)
            del run, prefix_run  # frees the prefix's ONNX Runtime session and its arena before the model is served
        batches = CachedBatches(train_cache, device, regime.batch_size, seed, flip=regime.flip)
    else:
        batches = ImageBatches(ds.train, transform, device, regime.batch_size, seed)
    test_y = ds.test.labels.to(device)
    subset = torch.arange(0, len(test_y), max(1, len(test_y) // CURVE_SUBSET))

    served = None  # once trained: the fixed model's runner (ONNX Runtime on a CPU), for the final scores

    def image_views(preprocess: nn.Module) -> list:
        """The test images through ``preprocess`` and the trained model (and mirrored, with flip TTA)."""
        net = served or model
        return [(lambda x, t=t: net(t(x.to(device))), test_x)
                for t in ([preprocess, _Flipped(preprocess)] if regime.tta_flip else [preprocess])]

    def score(index: torch.Tensor | None = None) -> dict:
        """Test accuracy (flip TTA when the regime has it); on ``index`` (the curve's subset) the plain view only."""
        body.eval()
        views = [(body, v) for v in test_views] if cached else image_views(transform)
        if index is not None:
            views = [(f, xs[index.to(xs.device)]) for f, xs in views[:1]]
        return _accuracy(views, test_y if index is None else test_y[index.to(device)])

    steps = max(1, int(regime.epochs * cfg.epochs_scale * len(batches)))
    params = [p for p in body.parameters() if p.requires_grad]
    opt = make_optimizer(body, "sgd", regime.lr, regime.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=regime.label_smoothing)
    evals = sorted({max(1, round(steps * (i + 1) / CURVE_EVALS)) for i in range(CURVE_EVALS)})
    stopped: list[int] = []
    cell = f"{regime.key}/{key}/seed{seed}"  # its key in cells.jsonl, its saved progress and its progress bar
    state = CellState(state_dir, cell,
                      {"cell": cell, "setup": cfg.setup(regime),
                       "contract": contract.to_dict(), "steps": steps, "train_images": len(ds.train),
                       "test_images": len(ds.test)}, log=log)
    before = state.load(model, opt) or {
        "step": 0, "losses": [], "norms": [], "train_seconds": 0.0, "wall_seconds": 0.0, "segments": [],
        "curve": {"step": [], "images": [], "wall_s": [], "test_subset_acc": [], "train_loss": []}}
    first = before["step"] + 1
    losses, norms, curve = before["losses"], before["norms"], before["curve"]
    t_train = time.perf_counter() - before["train_seconds"]  # the seconds of the stretches before this one count
    t0 -= before["wall_seconds"]

    def progress(step: int) -> dict:
        return {"step": step, "losses": losses, "norms": norms, "curve": curve,
                "train_seconds": time.perf_counter() - t_train, "wall_seconds": time.perf_counter() - t0,
                "segments": before["segments"] + ([segment(first, step, time.perf_counter() - t_train
                                                           - before["train_seconds"], device)] if step >= first else [])}

    def after(step, _lr, loss, _logits, norm, _y) -> bool:
        losses.append(round_sig(loss.item()))
        norms.append(round_sig(norm) if norm is not None else None)
        if losses[-1] is None or norms[-1] is None:
            stopped.append(step)  # not a number any more: training stops here
            return True
        if step in evals:
            acc = score(subset)["accuracy"]
            recent = [v for v in losses[-max(1, steps // CURVE_EVALS):] if v is not None]
            curve["step"].append(step)
            curve["images"].append(step * regime.batch_size)
            curve["wall_s"].append(round(time.perf_counter() - t_train, 2))
            curve["test_subset_acc"].append(round_sig(acc))
            curve["train_loss"].append(round_sig(sum(recent) / len(recent)) if recent else None)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
        if state.due(step, steps):
            state.save(model, opt, progress(step))
        return False

    bar = tqdm(step_stream(batches, steps, skip=first - 1), total=steps, initial=first - 1,
               desc=cell, disable=not cfg.progress, mininterval=5.0, dynamic_ncols=True,
               leave=False)
    # the forward is the trainable stages alone: on cached features, or (nothing frozen) on the images
    run_steps(body, bar, opt, loss_fn, lambda step: lr_at((step - 1) / steps, regime.lr, WARMUP), start=first,
              cut=cut, channels_last=regime.channels_last, norm_of=params, after=after)
    bar.close()
    stopped_at = stopped[0] if stopped else None
    train_seconds = time.perf_counter() - t_train
    segments = progress(len(losses))["segments"]

    model.eval()
    # the trained model, fixed from here on: ONNX Runtime on a CPU (exported once), the model itself elsewhere
    served = prefix_runner(model, contract.input_size, cfg.engine)
    if stopped_at is None:
        test = score()
    else:
        test = {"accuracy": None, "ci95": None, "n": len(test_y), "max_class_share": None}
    end = probe(model, transform(test_x[probe_idx].to(device)))
    record = {
        "format": FORMAT, "key": cell, "regime": regime.key, "variant": key, "seed": seed,
        "title": variant_title(key), "contract": contract.to_dict(), "setup": cfg.setup(regime),
        "steps": steps, "steps_done": len(losses), "batch_size": regime.batch_size,
        "test": test, "curve": curve,
        "loss_binned": binned(losses), "grad_norm_binned": binned(norms), "grad_norm": grad_stats(norms),
        "divergence": {"start": start, "end": end},
        "stopped_at": stopped_at,
        "diverged": has_diverged(losses, stopped_at),
        "collapsed": has_collapsed(test["accuracy"], test["max_class_share"]),
        "train_seconds": round(train_seconds, 1),
        "segments": segments,  # the stretches it trained in: one, unless it was stopped and continued
    }
    if key == CORRECT_KEY and serve_wrong:  # trained right, served wrong
        served_wrong = {}
        for wrong_key, wrong in contracts.items():
            if wrong_key == CORRECT_KEY:
                continue
            wt = wrong.transform().to(device)
            served_wrong[wrong_key] = {**_accuracy(image_views(wt), test_y),
                                 "divergence": probe(model, wt(test_x[probe_idx].to(device)))}
        record["served_wrong"] = served_wrong
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    state.finish()
    return record




# -- the whole study -------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def initial_models(cfg: StudyConfig, classes: list[str]):
    """``at(size)``: the pretrained model with its new head (seeded 0, the same in every cell) at ``size`` px and the
    contracts of every preprocessing at that size (the correct cell serves every wrong one), built once per size."""
    built: dict[int, tuple] = {}

    def at(size: int) -> tuple[nn.Module, dict[str, NormalizationContract]]:
        if size not in built:
            torch.manual_seed(0)
            model = CifarTransferModel.from_backbone(cfg.backbone, class_names=classes, input_size=size,
                                                     weights_file=cfg.backbone_weights)
            built[size] = model, variant_contracts(model.contract, [CORRECT_KEY, *WRONG_VARIANTS])
        return built[size]
    return at


def run_study(cfg: StudyConfig, log=print) -> list[dict]:
    """Run every missing cell (regime x preprocessing x seed), appending each as it finishes; returns all cells."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per regime: let cuDNN pick its fastest kernels
    out = Path(cfg.output or SCALE_DIRS.get(cfg.input_size, Path("runs") / "study"))
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
    pending = sorted({r.key for r, _, _ in todo} & set(PENDING.get(cfg.input_size, {})))
    if pending and not cfg.val_fraction and cfg.regimes is None:  # all regimes by default: the chosen ones only
        log(f"study: skipping the {', '.join(pending)} regime at {cfg.input_size} px: no budget chosen yet "
            f"({'; '.join(PENDING[cfg.input_size][k] for k in pending)})")
        todo = [t for t in todo if t[0].key not in pending]
    elif pending and not cfg.val_fraction:
        raise StudyError(f"no budget has been chosen yet for the {', '.join(pending)} regime at {cfg.input_size} px "
                         f"({'; '.join(PENDING[cfg.input_size][k] for k in pending)}); run the other regimes "
                         "(--regimes) or choose one with benchmarks/study_budgets.py")
    log(f"study: {len(done)} cells done, {len(todo)} to run, on {device} -> {out / CELLS_NAME}")
    if not todo:
        return list(done.values())
    ds = data_mod.load_dataset(cfg.data_dir, download=cfg.download, contract=get_backbone(cfg.backbone).contract,
                               max_per_class=cfg.max_per_class,
                               max_test_per_class=cfg.max_test_per_class)
    if cfg.val_fraction:  # choosing budgets: the test set is never read; the held-out share of train scores
        ds = data_mod.split_validation(ds, cfg.val_fraction, seed=0)
        ds = dataclasses.replace(ds, test=ds.val, val=None)
    log(f"data: {ds.name}: {len(ds.train)} training, {len(ds.test)} {'validation' if cfg.val_fraction else 'test'} images")
    initial_at = initial_models(cfg, ds.classes)
    env = environment_info(device)
    for regime, key, seed in todo:
        load_before = os.getloadavg()[0]  # the machine's 1-minute load: cells on a shared CPU say how shared it was
        initial, contracts = initial_at(regime.input_size or cfg.input_size)
        cell = run_cell(initial, key, contracts[key], regime, ds, cfg, seed, device, contracts,
                        serve_wrong=not cfg.val_fraction, state_dir=out / STATE_FOLDER, log=log)
        cell["command"] = cfg.command
        cell["environment"] = env
        cell["load_average"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
        append_cell(out, cell)
        done[cell["key"]] = cell
        t = cell["test"]
        log(f"{cell['key']:<32} test {pct(t['accuracy'])} [{pct((t['ci95'] or [None])[0])}, "
            f"{pct((t['ci95'] or [None, None])[1])}]  diverged={cell['diverged']} collapsed={cell['collapsed']}  "
            f"{cell['wall_seconds']:.0f} s")
    return list(done.values())


# -- the CPU-time estimate ------------------------------------------------------------------------------


def estimate(cfg: StudyConfig, log=print, steps: int = 6) -> dict:
    """Time a few training steps and prefix/eval batches of each regime on this machine; project the full study."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    n_train = 5000 * 10 if cfg.max_per_class is None else cfg.max_per_class * 10
    n_test = 1000 * 10 if cfg.max_test_per_class is None else cfg.max_test_per_class * 10
    n_cells = 1 + len(cfg.variants if cfg.variants is not None else WRONG_VARIANTS)

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

    imgs = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8)
    models = initial_models(cfg, [str(i) for i in range(10)])  # the same builder the study's cells use
    total, per, at_size = 0.0, {}, {}
    for regime in cfg.regime_list():
        size = regime.input_size or cfg.input_size
        if size not in at_size:  # the model at the size this regime reads, and its time to score one image
            m = models(size)[0].to(device)
            t = m.contract.transform().to(device)
            at_size[size] = m, t, timed(lambda: _accuracy([(lambda x: m(t(x.to(device))), imgs[:500])],
                                                          torch.zeros(500, dtype=torch.long)), 2) / 500
        model, transform, full_eval = at_size[size]
        cut = split_frozen(copy.deepcopy(model), regime.freeze_stages)
        k, body = len(cut.prefix), cut.trainable
        run = prefix_runner(cut.prefix, size, cfg.engine)

        def features(n: int) -> torch.Tensor:
            with torch.no_grad():
                return run(transform(imgs[:n].to(device))).float().to(device)

        prefix_s = timed(lambda: features(500), 2) / 500 if k else 0.0
        feats = features(regime.batch_size)
        opt = make_optimizer(body, "sgd", 1e-4, 0.0)
        y = torch.zeros(len(feats), dtype=torch.long, device=device)
        step_s = timed(lambda: run_steps(body, [(feats, y)], opt, nn.CrossEntropyLoss(), lambda _: 1e-4), steps)
        n_steps = int(regime.epochs * cfg.epochs_scale * (n_train // regime.batch_size))
        cell = (n_steps * step_s + prefix_s * (n_train * regime.views + n_test)
                + full_eval * (PROBE_IMAGES * 2) + (full_eval if not k else 0.0) * (n_test + CURVE_EVALS * CURVE_SUBSET))
        serve = (n_cells - 1) * full_eval * (n_test + PROBE_IMAGES)
        per[regime.key] = {"step_s": round_sig(step_s), "steps": n_steps, "prefix_s_per_image": round_sig(prefix_s),
                           "cell_s": round(cell), "regime_s": round(cell * n_cells + serve)}
        total += per[regime.key]["regime_s"]
        log(f"{regime.key:<8} {size} px, {n_steps} steps x {step_s * 1000:.0f} ms, ~{cell / 60:.1f} min per cell, "
            f"{per[regime.key]['regime_s'] / 60:.0f} min for {n_cells} cells + serving")
    total *= len(set(cfg.seeds))
    log(f"projected total on {device}: {total / 3600:.2f} h for {len(set(cfg.seeds))} seed(s) (eval " + ", ".join(
        f"{e * 1000:.2f} ms per image at {z} px" for z, (_, _, e) in at_size.items()) + "; decoding not counted)")
    return {"device": str(device), "regimes": per, "total_s": round(total)}


# -- command line -----------------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(prog="python -m cifar_transfer.study", description=__doc__.split("\n\n")[0],
                                epilog="Regimes: " + "; ".join(
                                    f"{r.key}: {r.title} ({r.epochs:g} epochs, batch {r.batch_size}, lr {r.lr:g}"
                                    f"{f', {r.views} cached views' if r.views else ''}"
                                    f"{f', {r.input_size} px' if r.input_size else ''})" for r in REGIMES_128.values())
                                    + ". At --input-size 32 (the small-input appendix): " + "; ".join(
                                    f"{r.key}: {r.epochs:g} epochs, batch {r.batch_size}, lr {r.lr:g}"
                                    f"{f', {r.views} cached views' if r.views else ''}" for r in REGIMES.values()),
                                formatter_class=HelpFormatter)
    p.add_argument("--backbone", default=d.backbone, choices=sorted(BACKBONES), help="pretrained backbone")
    p.add_argument("--backbone-weights", metavar="FILE", help="local ImageNet weights file (offline ResNets)")
    p.add_argument("--data-dir", metavar="DIR", help="train/ + test/ class folders; default: torchvision download")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download the dataset")
    p.add_argument("--input-size", type=int, default=d.input_size, choices=sorted(SCALE_DIRS),
                   help="side in pixels the network sees: 128 (the shipped checkpoint's; results/study-128px) or 32 "
                        "(CIFAR's own, the small-input appendix; results/study); each has its own budgets")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, metavar="F",
                   help="hold out this share of the training set and score on it instead of the test set (how the "
                        "budgets were chosen; no served-wrong evaluation)")
    p.add_argument("--regimes", nargs="+", choices=list(REGIMES_128), help="regimes to run (default: all)")
    p.add_argument("--variants", nargs="*", metavar="KEY", choices=list(WRONG_VARIANTS),
                   help="wrong variants to run beside the correct contract (default: all; none given: the correct "
                        "contract's cells alone, e.g. to see each regime's floor first)")
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
    p.add_argument("--summary", action="store_true",
                   help="only print the tables and verdicts of --output (default: the recorded run at --input-size), "
                        "and on stderr the cells stopped part-way there (and in its budgets/ folder)")
    p.add_argument("--write-docs", metavar="FILE",
                   help="with --summary: rewrite the generated blocks of FILE (docs/study.md) from the recorded cells "
                        "of both sizes (a test checks the docs equal them)")
    p.add_argument("--write-readme", metavar="FILE",
                   help="with --summary: rewrite the 128-px table block of FILE (README.md) from the recorded cells "
                        "(a test checks the README equals them)")
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[StudyConfig, str | None]:
    p = get_args_parser()
    args = vars(p.parse_args(argv))
    summary, estimate_only = args.pop("summary"), args.pop("estimate")  # both popped: neither is a StudyConfig field
    mode = "summary" if summary else "estimate" if estimate_only else None
    for flag in ("write_docs", "write_readme"):
        if args[flag] and mode != "summary":
            p.error(f"--{flag.replace('_', '-')} goes with --summary")
    if args["output"] is None:
        args["output"] = str(SCALE_DIRS.get(args["input_size"], RESULTS_DIR_128)) if mode == "summary" else str(
            Path("runs") / time.strftime("study-%Y%m%d-%H%M%S", time.gmtime()))
    cfg = StudyConfig(**args)
    cfg.command = "python -m cifar_transfer.study " + shlex.join(sys.argv[1:] if argv is None else argv)
    if cfg.epochs_scale <= 0:
        p.error("--epochs-scale must be positive")
    if not 0 <= cfg.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    return cfg, mode


def write_docs(path: Path) -> None:
    """Rewrite docs/study.md's generated blocks (``study-128px``, ``study-32px``, ``study-scales``) from the cells."""
    text = path.read_text(encoding="utf-8")
    by_size = {size: read_cells(folder) for size, folder in SCALE_DIRS.items()}
    for size, cells in by_size.items():
        text = replace_block(text, f"study-{size}px", docs_block(cells))
    text = replace_block(text, "study-128px-setup", regimes_markdown(REGIMES_128, PENDING.get(128)))
    comparison = scale_comparison(by_size[128], by_size[32])
    if comparison:
        text = replace_block(text, "study-scales", comparison)
    atomic_write_text(path, text)


def write_readme(path: Path) -> None:
    """Rewrite the README's ``study-128px-table`` block: the compact table of the 128-px cells, as docs/study.md has it."""
    text = replace_block(path.read_text(encoding="utf-8"), "study-128px-table", readme_table(read_cells(RESULTS_DIR_128)))
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> None:
    cfg, mode = config_from_args(argv)
    try:
        if mode == "summary":
            cells = read_cells(cfg.output)
            if not cells:
                raise StudyError(f"no study results at {Path(cfg.output) / CELLS_NAME}; run `{COMMAND}` to produce them")
            print(summary_markdown(cells))
            for folder in (Path(cfg.output) / STATE_FOLDER, Path(cfg.output) / "budgets" / STATE_FOLDER):
                for line in describe(folder):  # on stderr: the markdown on stdout stays the cells' alone
                    print(f"in progress: {line}", file=sys.stderr)
            if cfg.write_docs:  # the docs' blocks and the app tab's plots, from the cells recorded so far
                write_docs(Path(cfg.write_docs))
                write_plots(cells, Path(cfg.output))
            if cfg.write_readme:
                write_readme(Path(cfg.write_readme))
            return
        if mode == "estimate":
            estimate(cfg)
            return
        cells = run_study(cfg)
        write_plots(cells, Path(cfg.output))
    except (StudyError, BackboneError, DataError, ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"\nwrote {Path(cfg.output) / CELLS_NAME}, accuracy.png and curves.png\n")
    print(summary_markdown(cells))


if __name__ == "__main__":
    main()
