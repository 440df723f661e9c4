"""Training under wrong normalization: does the contract still matter after fine-tuning?

    python -m cifar_transfer.experiment --data-dir ../shared/datasets/cifar10-jpeg
    python -m cifar_transfer.experiment --summary     # print the summary of the last run (markdown)

Fine-tunes one backbone with the same budget and seed under the correct
contract and under every wrong variant (training and evaluation consistent),
then scores the correctly trained model under each wrong variant (the
train/serve mismatch). Writes ``results.json`` and PNG plots to
``results/experiment``; :func:`cifar_transfer.study_tab.build_experiment_tab` shows them in the app.

It trains with the study's engine (:mod:`cifar_transfer.training`: the same cut, optimizer, schedule and step
loop; :class:`cifar_transfer.batches.ImageBatches`, the batches of the study's ``full`` regime) but is not a
preset of :mod:`cifar_transfer.study`, because it measures other things: the first batch-norm layer's
divergence of *every training batch* (a probe around each step), the gradient norm and the learning rate per
step, on a validation split carved out of the training images rather than the test set, written as one
``results.json`` that ``results/experiment`` ships and the app's tab reads. A study cell keeps binned series and
probes the test set before and after training; folding one into the other would change what either reports.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import data as data_mod
from .backbones import BACKBONES, BackboneError, get_backbone
from .batches import ImageBatches
from .checkpoint import atomic_write_json, first_batchnorm
from .cli import HelpFormatter
from .contract import CORRECT_KEY, WRONG_VARIANTS, NormalizationContract, variant_contracts, variant_title
from .data import DataError
from .evaluate import predict_probabilities
from .divergence import BatchNormProbe, bn_divergence, channel_stats
from .model import CifarTransferModel
from .runtime import environment_info
from .study_report import save_png
from .training import lr_at, make_optimizer, run_steps, split_frozen, step_stream

FORMAT = "cifar_transfer.experiment/1"
# The shipped results in a checkout of the repository; installed (no pyproject.toml beside the package), the
# folder `--output results/experiment` fills when run from the current directory (issue 10).
_CHECKOUT = Path(__file__).resolve().parents[1]
RESULTS_DIR = (_CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path()) / "results" / "experiment"
RESULTS_NAME = "results.json"
CURVES_NAME = "curves.png"
ACCURACY_NAME = "accuracy.png"
COMMAND = "python -m cifar_transfer.experiment --data-dir ../shared/datasets/cifar10-jpeg"


class ExperimentError(RuntimeError):
    """Results are missing or malformed; the message names the problem."""


# -- reading results -------------------------------------------------------------------


def load_results(results_dir: Path | None = None) -> dict:
    """Read and check ``results.json``; raises :class:`ExperimentError` with a clear message."""
    path = Path(results_dir or RESULTS_DIR) / RESULTS_NAME
    if not path.is_file():
        raise ExperimentError(f"no experiment results at {path}; run `{COMMAND}` to produce them")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExperimentError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ExperimentError(f"{path} is not a results file of this experiment (expected format {FORMAT!r})")
    for key in ("runs", "serve_mismatch", "config"):
        if key not in results:
            raise ExperimentError(f"{path} lacks the field {key!r}")
    if CORRECT_KEY not in results["runs"]:
        raise ExperimentError(f"{path} has no run under the correct contract")
    return results


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def summary_markdown(results: dict) -> str:
    """Plain-words summary and table; every number is read from ``results``."""
    cfg, runs, serve = results["config"], results["runs"], results["serve_mismatch"]
    correct = runs[CORRECT_KEY]["final"]
    lines = [
        f"**Setup.** {cfg['backbone']} (ImageNet weights) fine-tuned on {cfg['train_size']:,} {cfg['dataset']} images "
        f"at {cfg['input_size']} px for {cfg['steps']} steps of {cfg['batch_size']} images "
        f"({cfg['freeze_stages']} leading stages frozen, seed {cfg['seed']}); accuracy on {cfg['val_size']:,} held-out "
        f"training images. Same budget and seed for every row; measured in {results.get('wall_seconds', 0) / 60:.0f} min "
        f"on {results.get('environment', {}).get('cpu', 'this machine')}.",
        "",
        f"With the correct contract the model reaches **{_pct(correct['val_acc'])}**. "
        "*Trained and served wrong* uses the same wrong preprocessing for training and evaluation; "
        "*served wrong* takes the correctly trained model and only changes the preprocessing at serving time.",
        "",
        "| preprocessing | trained and served wrong | served wrong (train/serve mismatch) | "
        "first-BN divergence before → after training | pretrained features' norm (× correct) | final train loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    norm0 = runs[CORRECT_KEY].get("initial_feature_norm")
    for key, run in runs.items():
        f = run["final"]
        served = "—" if key == CORRECT_KEY else _pct(serve.get(key))
        ratio = run.get("initial_feature_norm") / norm0 if norm0 and run.get("initial_feature_norm") is not None else None
        lines.append(f"| {variant_title(key)} | {_pct(f['val_acc'])} | {served} | {_num(run['initial_divergence'])} → "
                     f"{_num(f['divergence'])} | {_num(ratio)} | {_num(f['train_loss'])} |")
    wrong = {k: r["final"]["val_acc"] for k, r in runs.items() if k != CORRECT_KEY}
    if wrong and serve:
        worst_train = min(wrong, key=wrong.get)
        worst_serve = min(serve, key=serve.get)
        lines += [
            "",
            f"Trained consistently, the wrong variants end between {_pct(min(wrong.values()))} "
            f"({variant_title(worst_train)}) and {_pct(max(wrong.values()))}, against {_pct(correct['val_acc'])} "
            f"for the correct contract. Changing only the serving preprocessing drops the correctly trained model to "
            f"as low as {_pct(serve[worst_serve])} ({variant_title(worst_serve)}).",
        ]
    return "\n".join(lines)


# -- configuration ----------------------------------------------------------------------------


@dataclass
class ExperimentConfig:
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None
    data_dir: str | None = None
    download: bool = True
    input_size: int = 32
    freeze_stages: int = 0
    max_per_class: int = 550  # training images read per class; val_per_class of them are held out
    val_per_class: int = 50
    steps: int = 200
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.05
    eval_every: int = 50
    variants: list[str] | None = None  # None: every wrong variant
    seed: int = 0
    threads: int | None = None
    output: str | None = None  # None: a fresh runs/experiment-<UTC time> folder (never the shipped results)
    progress: bool = True
    command: str = ""


LONG = dict(steps=3000, max_per_class=5000, val_per_class=500, input_size=96, batch_size=64, eval_every=250)


def _round(x: float, digits: int = 5) -> float | None:
    """Finite floats rounded to ``digits`` significant digits; NaN/inf become None (valid JSON)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


# -- measurements -------------------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: nn.Module, split, contract: NormalizationContract, batch_size: int = 250) -> float:
    """Top-1 accuracy (eval mode) of ``model`` on ``split`` preprocessed with ``contract``."""
    probs = predict_probabilities(model, split, contract=contract, device=torch.device("cpu"), batch_size=batch_size,
                           engine="pytorch")  # small splits, weights that change: no ONNX export
    return (probs.argmax(1) == split.labels).float().mean().item()


@torch.no_grad()
def probe_inputs(model: nn.Module, pixels: torch.Tensor, contract: NormalizationContract) -> tuple[float, float]:
    """(median per-image first-BN divergence, mean norm of the pooled features the classifier sees), eval mode."""
    feats = []
    fc = model.classifier
    handle = fc.register_forward_pre_hook(lambda _m, args: feats.append(args[0].norm(dim=1)))
    model.eval()
    try:
        with BatchNormProbe(model) as probe:
            model(contract.transform()(pixels))
        d = probe.divergence(per_image=True).median().item()
    finally:
        handle.remove()
    return d, torch.cat(feats).mean().item()


# -- one fine-tuning run ------------------------------------------------------------------------


def train_run(initial: nn.Module, contract: NormalizationContract, ds, cfg: ExperimentConfig, label: str) -> tuple[nn.Module, dict]:
    """Fine-tune a copy of ``initial`` with ``contract`` for training *and* validation; returns (model, record).

    The engine's step loop (:func:`cifar_transfer.training.run_steps`) with a probe around every step: the
    training batch's divergence at the first batch-norm layer, against the running statistics before the step."""
    torch.manual_seed(cfg.seed)
    model = copy.deepcopy(initial)
    cut = split_frozen(model, cfg.freeze_stages)
    params = [p for p in cut.trainable.parameters() if p.requires_grad]
    opt = make_optimizer(cut.trainable, "sgd", cfg.lr, cfg.weight_decay, cfg.momentum)
    bn = first_batchnorm(model)
    probe_pixels = ds.val.images[:256]

    d0, f0 = probe_inputs(model, probe_pixels, contract)
    record = {"title": variant_title(label), "contract": contract.to_dict(),
              "initial_divergence": _round(d0), "initial_feature_norm": _round(f0),
              "steps": {"train_loss": [], "grad_norm": [], "divergence": [], "lr": []},
              "eval": {"step": [], "val_acc": []}, "collapsed_at": None}
    batches = ImageBatches(ds.train, contract.transform(), torch.device("cpu"), cfg.batch_size, cfg.seed)
    if len(batches) == 0:
        raise ExperimentError(f"training set ({len(ds.train)} images) is smaller than one batch of {cfg.batch_size}")
    s = record["steps"]

    @contextmanager
    def probed():
        running = bn.running_mean.clone(), bn.running_var.clone()
        with BatchNormProbe(model) as probe:
            yield
        s["divergence"].append(_round(bn_divergence(channel_stats(probe.inputs[-1]), running).mean().item()))

    def after(step, lr, loss, _logits, norm, _y) -> bool:
        s["train_loss"].append(_round(loss.item()))
        s["grad_norm"].append(_round(norm))
        s["lr"].append(_round(lr))
        if not (math.isfinite(loss.item()) and math.isfinite(norm)):
            record["collapsed_at"] = step  # loss or gradient is no longer a number: training has collapsed
            return True
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record["eval"]["step"].append(step)
            record["eval"]["val_acc"].append(_round(accuracy(model, ds.val, contract)))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{record['eval']['val_acc'][-1]:.3f}")
        return False

    t0 = time.perf_counter()
    bar = tqdm(step_stream(batches, cfg.steps), total=cfg.steps, desc=label, disable=not cfg.progress,
               mininterval=2.0, dynamic_ncols=True)
    run_steps(cut.forward, bar, opt, nn.CrossEntropyLoss(), lambda step: lr_at((step - 1) / cfg.steps, cfg.lr, cfg.warmup),
              start=1, cut=cut, norm_of=params, around=probed, after=after)  # no step if not finite
    bar.close()
    losses = [v for v in record["steps"]["train_loss"] if v is not None]
    tail = losses[-max(1, len(losses) // 10):] if losses else []
    d1, f1 = probe_inputs(model, probe_pixels, contract)
    evals = record["eval"]["val_acc"]
    record["final"] = {
        "val_acc": evals[-1] if evals and record["collapsed_at"] is None else None,
        "train_loss": _round(sum(tail) / len(tail)) if tail else None,  # mean over the last 10% of steps
        "divergence": _round(d1),
        "feature_norm": _round(f1),
    }
    record["wall_seconds"] = round(time.perf_counter() - t0, 1)
    model.eval()
    return model, record


# -- the whole experiment -------------------------------------------------------------------------


def load_data(cfg: ExperimentConfig):
    if not 0 < cfg.val_per_class < cfg.max_per_class:
        raise ExperimentError(f"--val-per-class ({cfg.val_per_class}) must be positive and below --max-per-class ({cfg.max_per_class})")
    ds = data_mod.load_dataset(cfg.data_dir, download=cfg.download, contract=get_backbone(cfg.backbone).contract,
                               max_per_class=cfg.max_per_class, max_test_per_class=1)
    return data_mod.split_validation(ds, cfg.val_per_class / cfg.max_per_class, seed=cfg.seed)


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Run every preprocessing with the same budget and seed; write results.json and the plots; return the results."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = print if cfg.progress else (lambda *a, **k: None)
    ds = load_data(cfg)
    say(f"data: {ds.name} from {ds.source}: {len(ds.train)} train, {len(ds.val)} validation images, {len(ds.classes)} classes")
    torch.manual_seed(cfg.seed)
    initial = CifarTransferModel.from_backbone(cfg.backbone, class_names=ds.classes, input_size=cfg.input_size,
                                               weights_file=cfg.backbone_weights)
    contracts = variant_contracts(initial.contract, cfg.variants)
    runs, serve, serve_divergence = {}, {}, {}
    for key, contract in contracts.items():
        model, runs[key] = train_run(initial, contract, ds, cfg, key)
        say(f"{key:<20} val acc {_pct(runs[key]['final']['val_acc'])}, first-BN divergence "
            f"{_num(runs[key]['initial_divergence'])} -> {_num(runs[key]['final']['divergence'])}")
        if key == CORRECT_KEY:  # the train/serve mismatch: trained right, served wrong
            for wrong_key, wrong in contracts.items():
                if wrong_key != CORRECT_KEY:
                    serve[wrong_key] = _round(accuracy(model, ds.val, wrong))
                    serve_divergence[wrong_key] = _round(probe_inputs(model, ds.val.images[:256], wrong)[0])
    results = {
        "format": FORMAT,
        "command": cfg.command,
        "config": {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("output", "progress", "command")},
                   "dataset": ds.name, "train_size": len(ds.train), "val_size": len(ds.val),
                   "classes": ds.classes, "contract": initial.contract.to_dict()},
        "runs": runs,
        "serve_mismatch": serve,
        "serve_mismatch_divergence": serve_divergence,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "environment": environment_info(torch.device("cpu")),
    }
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULTS_NAME, results)
    write_plots(results, out)
    return results


# -- plots ------------------------------------------------------------------------------------------


def _smooth(values: list, window: int) -> tuple[list[int], list[float]]:
    """Trailing moving average, skipping missing values; returns (steps, values)."""
    xs, ys, buf = [], [], []
    for i, v in enumerate(values, start=1):
        if v is None:
            continue
        buf = (buf + [v])[-window:]
        xs.append(i)
        ys.append(sum(buf) / len(buf))
    return xs, ys


def write_plots(results: dict, out: Path) -> list[Path]:
    """``curves.png`` (loss, validation accuracy, gradient norm, first-BN divergence per step) and ``accuracy.png``."""
    import matplotlib  # here, not at the top: only plotting needs it, and the app imports this module to read results

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, serve = results["runs"], results["serve_mismatch"]
    steps = results["config"]["steps"]
    window = max(1, steps // 20)
    colours = dict(zip(runs, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [("train_loss", "training loss (moving average)", "linear"),
              (None, "validation accuracy (eval mode)", "linear"),
              ("grad_norm", "gradient norm (moving average)", "log"),
              ("divergence", "first batch-norm layer: divergence of the batch from running stats", "log")]
    for ax, (key, title, scale) in zip(axes.flat, panels):
        for name, run in runs.items():
            style = dict(color=colours[name], lw=2.5 if name == CORRECT_KEY else 1.3, label=name)
            if key is None:
                xs, ys = run["eval"]["step"], run["eval"]["val_acc"]
                ax.plot(xs, [None if y is None else 100 * y for y in ys], marker="o", ms=3, **style)
            else:
                # divergence spans orders of magnitude: plotted per step, a moving average would smear it
                ax.plot(*_smooth(run["steps"][key], 1 if key == "divergence" else window), **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
    axes.flat[1].set_ylabel("%")
    axes.flat[0].legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(f"{cfg['backbone']} fine-tuned on {cfg['train_size']} images at {cfg['input_size']} px, "
                 f"{steps} steps of {cfg['batch_size']}, seed {cfg['seed']}", fontsize=11)
    fig.tight_layout()
    paths = [save_png(fig, out / CURVES_NAME)]
    plt.close(fig)

    keys = [k for k in runs if k != CORRECT_KEY]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(keys))
    trained = [100 * (runs[k]["final"]["val_acc"] or 0) for k in keys]
    served = [100 * (serve.get(k) or 0) for k in keys]
    ax.bar([x - 0.2 for x in xs], trained, 0.4, label="trained and served with it (consistent)", color="#1565c0")
    ax.bar([x + 0.2 for x in xs], served, 0.4, label="trained correctly, served with it (mismatch)", color="#c62828")
    correct = runs[CORRECT_KEY]["final"]["val_acc"]
    if correct is not None:
        ax.axhline(100 * correct, color="#2e7d32", ls="--", label=f"correct contract ({100 * correct:.1f}%)")
    ax.axhline(100 / len(cfg["classes"]), color="grey", ls=":", label="chance")
    ax.set_xticks(list(xs), keys, rotation=15, fontsize=9)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Wrong normalization: consistent in training and serving vs. a train/serve mismatch", fontsize=11)
    fig.tight_layout()
    paths.append(save_png(fig, out / ACCURACY_NAME))
    plt.close(fig)
    return paths


# -- command line ---------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    d = ExperimentConfig()
    p = argparse.ArgumentParser(prog="python -m cifar_transfer.experiment", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--backbone", default=d.backbone, choices=sorted(BACKBONES), help="pretrained backbone (resnet* download their weights)")
    p.add_argument("--backbone-weights", metavar="FILE", help="local weights file <arch>-<sha256 prefix>.pth (offline ResNets)")
    p.add_argument("--data-dir", metavar="DIR", help="train/ + test/ class folders or cifar-10-batches-py; default: torchvision download")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download the dataset")
    p.add_argument("--input-size", type=int, default=d.input_size, help="side in pixels the network sees")
    p.add_argument("--freeze-stages", type=int, default=d.freeze_stages,
                   help="leading stages kept frozen (stem counts as one; >0 also freezes the first batch-norm layer)")
    p.add_argument("--max-per-class", type=int, default=d.max_per_class, help="training images read per class")
    p.add_argument("--val-per-class", type=int, default=d.val_per_class, help="of those, held out per class for validation")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run (same for every preprocessing)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (SGD, Nesterov; warm-up then cosine)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="validate every N steps")
    p.add_argument("--variants", nargs="+", metavar="KEY", choices=list(WRONG_VARIANTS), help="wrong variants to run (default: all)")
    p.add_argument("--long", action="store_true",
                   help="a longer run (" + ", ".join(f"{k}={v}" for k, v in LONG.items()) + "); explicit flags still win")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for initialisation, shuffling and augmentation")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    p.add_argument("--output", default=d.output, metavar="DIR",
                   help="where results.json and the PNGs go (default: a fresh runs/experiment-<UTC time>/; the app's tab "
                        "shows results/experiment, pass that to replace it)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--summary", action="store_true", help="only print the markdown summary of the results in --output")
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[ExperimentConfig, bool]:
    p = get_args_parser()
    args = p.parse_args(argv)
    given = vars(args)
    argv_list = sys.argv[1:] if argv is None else argv
    if args.long:  # preset values, unless the flag was given explicitly
        for key, value in LONG.items():
            if not any(a == "--" + key.replace("_", "-") or a.startswith("--" + key.replace("_", "-") + "=") for a in argv_list):
                given[key] = value
    summary = given.pop("summary")
    given.pop("long")
    if given["output"] is None:
        given["output"] = str(RESULTS_DIR) if summary else str(Path("runs") / time.strftime("experiment-%Y%m%d-%H%M%S", time.gmtime()))
    cfg = ExperimentConfig(**given)
    cfg.command = "python -m cifar_transfer.experiment " + shlex.join(argv_list)
    for key in ("steps", "batch_size", "eval_every", "input_size", "max_per_class"):
        if getattr(cfg, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    return cfg, summary


def main(argv: list[str] | None = None) -> None:
    cfg, summary_only = config_from_args(argv)
    try:
        if summary_only:
            print(summary_markdown(load_results(Path(cfg.output))))
            return
        results = run_experiment(cfg)
    except (ExperimentError, BackboneError, DataError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"\nwrote {Path(cfg.output) / RESULTS_NAME}, {CURVES_NAME} and {ACCURACY_NAME} "
          f"({results['wall_seconds'] / 60:.1f} min)\n")
    print(summary_markdown(results))


if __name__ == "__main__":
    main()
