"""A fine-tuning run of ``python -m cifar_transfer.train``, part by part: the checks before any work, the data,
the model cut (:func:`cifar_transfer.training.split_frozen`), the batches (:mod:`cifar_transfer.batches`), the
epochs (:func:`fit`, through the engine's :func:`cifar_transfer.training.train_one_epoch`), the state ``--resume``
continues from, and the checkpoint with its ``metrics.json``. ``train.py`` is the command line in front of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import get_token
from torch import nn

from . import data as data_mod
from .backbones import DEFAULT_BACKBONE, get_backbone
from .batches import CachedBatches, FeatureCache, ImageBatches
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes
from .contract import CORRECT_KEY, WRONG_VARIANTS
from .evaluate import EVAL_BATCH_SIZE, evaluate_variants
from .inference import prefix_runner
from .model import CifarTransferModel, save_checkpoint
from .publish import PublishError, publish
from .runtime import environment_info, pick_device
from .training import Cut, Schedule, make_optimizer, mixed_precision, split_frozen, train_one_epoch

STATE_NAME = "train_state.pt"
# Where a run writes without --output: under runs/ (git-ignored), never over the shipped checkpoints/.
DEFAULT_OUTPUT = str(Path("runs") / "{backbone}-cifar10")
# Batch for the frozen (no-grad) pass that fills the feature cache. Small batches keep the large
# early activations in CPU cache: EfficientNet-Lite0 stem + 4 stages at 96 px, 1 thread, measured
# 132 images/s at batch 16, 128 at 32, 110 at 64 and 95 at 128.
CACHE_BATCH = 32


@dataclass
class TrainConfig:
    # what to train
    backbone: str = DEFAULT_BACKBONE
    backbone_weights: str | None = None
    input_size: int | None = None  # None: the backbone's default
    freeze_stages: int | None = None  # None: the backbone's default
    cache_features: bool = False
    cache_views: int = 2
    engine: str = "auto"  # the frozen prefix's engine when caching on a CPU: ONNX Runtime (auto) or PyTorch
    # data
    data_dir: str | None = None
    download: bool = True
    image_size: int = 32
    classes: list[str] | None = None
    max_per_class: int | None = None
    max_test_per_class: int | None = None
    val_fraction: float = 0.0
    # optimisation
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup: float = 0.05
    time_budget_minutes: float | None = None
    tta_flip: bool = False
    # machine
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    threads: int | None = None
    eval_batch_size: int = EVAL_BATCH_SIZE  # images (see evaluate.EVAL_BATCH_SIZE)
    # bookkeeping
    seed: int = 0
    output: str | None = None
    overwrite: bool = False  # replace a checkpoint already in ``output``
    resume: bool = False
    evaluate_variants: bool = True
    push_to_hub: str | None = None
    hub_private: bool = False
    progress: bool = True
    command: str = ""

    def resolved(self) -> "TrainConfig":
        """Fill backbone defaults for every field left at None."""
        spec = get_backbone(self.backbone)
        d = spec.defaults
        out = dataclasses.replace(self)
        for key in ("input_size", "freeze_stages", "epochs", "batch_size", "optimizer", "lr"):
            if getattr(out, key) is None:
                setattr(out, key, d[key])
        if out.output is None:
            out.output = DEFAULT_OUTPUT.format(backbone=self.backbone)
        return out


# -- distributed -------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device_arg: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda") or device_arg.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local)


# -- a run, part by part ---------------------------------------------------------------
#
# train.train() -> run(): check_before_work, prepare_data, build_model, make_optimizer, (resume) load_train_state,
# make_batches, fit (train_one_epoch + the batches' own evaluation, save_train_state per epoch),
# sync_replicas, evaluate_on_test, final_metrics, write_checkpoint; publish_to_hub at the edge.


def run(cfg: TrainConfig, dist: Dist) -> Path:
    """This process's part of a run (``cfg`` resolved): everything but publishing. Returns the checkpoint folder."""
    clock = Clock()  # wall time counts from the start of the command (data decoding and feature caching included)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, dist.local_rank)
    torch.manual_seed(cfg.seed)
    out, state_path = Path(cfg.output), Path(cfg.output) / STATE_NAME
    say = print if dist.main else (lambda *a, **k: None)

    pretrained = check_before_work(cfg, dist, out)
    data = prepare_data(cfg, say)
    net = build_model(cfg, data.dataset.classes, pretrained, device, dist, say)
    del pretrained
    opt = make_optimizer(net.trainable, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)
    state = TrainState()
    if cfg.resume:
        state = load_train_state(state_path, net.model, opt)
        say(f"resumed from {state_path} after epoch {state.epoch}")
    clock.before = state.elapsed
    batches = make_batches(cfg, data, net, dist, say)
    fit(cfg, dist, net, opt, batches, state, state_path, clock, say)

    train_seconds = clock()
    ddp_info = sync_replicas(net, dist)
    if dist.main:
        accuracies, time_to_accuracy, variant_seconds = evaluate_on_test(net.model, data.dataset.test, cfg, device,
                                                                          clock, say)
        metrics = final_metrics(cfg, data.dataset, accuracies, state.history, device, ddp_info, train_seconds,
                                time_to_accuracy, clock(), variant_seconds)
        write_checkpoint(net.model, out, metrics, train_seconds, say)
    dist.barrier()
    return out


class Clock:
    """Wall seconds since the command started, plus ``before``: the seconds of the run it resumes."""

    def __init__(self):
        self.start, self.before = time.perf_counter(), 0.0

    def __call__(self) -> float:
        return self.before + time.perf_counter() - self.start


def check_before_work(cfg: TrainConfig, dist: Dist, out: Path) -> dict:
    """Refuse an output folder holding another run, a bad configuration, a missing Hub token, missing ImageNet
    weights (a download, or --backbone-weights) or an unwritable output folder before the slow work (decoding the
    dataset). Returns the pretrained backbone's state dict."""
    check_output_free(out, overwrite=cfg.overwrite, resume=cfg.resume)
    if cfg.cache_features and cfg.freeze_stages <= 0:
        raise SystemExit("--cache-features needs --freeze-stages of at least 1")
    if cfg.push_to_hub and dist.main:
        if not get_token():
            raise SystemExit("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login` "
                             "(checked before training so a long run is not wasted)")
    if cfg.batch_size % dist.world_size:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({dist.world_size})")
    pretrained = get_backbone(cfg.backbone).pretrained_state_dict(cfg.backbone_weights)
    if dist.main:
        check_writable(out)
    return pretrained


def check_output_free(out: Path, overwrite: bool, resume: bool) -> None:
    """Stop, in one line, unless ``out`` may be written: it holds no checkpoint (weights or config) and no interrupted
    run's state, or ``--overwrite`` says to replace them, or ``--resume`` continues the run whose state is there.
    Every rank checks (the same files), so all stop together."""
    if resume:
        if not (out / STATE_NAME).is_file():
            raise SystemExit(f"error: --resume: no saved state at {out / STATE_NAME}")
        return
    held = [name for name in (WEIGHTS_NAME, CONFIG_NAME, STATE_NAME) if (out / name).is_file()]
    if held and not overwrite:
        raise SystemExit(f"error: {out} already holds a checkpoint or run ({', '.join(held)}); not replacing it: pass "
                         f"--overwrite to replace it{', --resume to continue it' if STATE_NAME in held else ''}, "
                         "or --output DIR for another folder")


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file in it, or stop with a clear message (before hours of training)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise SystemExit(f"error: cannot write the checkpoint to {folder}: {exc.strerror or exc}") from None


@dataclass
class TrainData:
    dataset: data_mod.Dataset
    eval_split: data_mod.Split  # scored after every epoch: the validation split, else the test split
    eval_name: str  # "val" or "test"


def prepare_data(cfg: TrainConfig, say=print) -> TrainData:
    """The dataset as ``cfg`` selects it, a validation split held out with ``--val-fraction``."""
    # contract: the backbone's, whose resize policy squares other-size folder images as the app does for the model
    ds = data_mod.load_dataset(cfg.data_dir, image_size=cfg.image_size, download=cfg.download, classes=cfg.classes,
                               max_per_class=cfg.max_per_class, max_test_per_class=cfg.max_test_per_class,
                               contract=get_backbone(cfg.backbone).contract)
    ds = data_mod.split_validation(ds, cfg.val_fraction, seed=cfg.seed)
    eval_split, eval_name = (ds.val, "val") if ds.val is not None else (ds.test, "test")
    say(f"data: {ds.name} from {ds.source}: {len(ds.train)} train, {len(eval_split)} {eval_name}, {len(ds.classes)} classes")
    return TrainData(ds, eval_split, eval_name)


@dataclass
class Network:
    """The model cut for fine-tuning (:func:`cifar_transfer.training.split_frozen`): the frozen ``prefix`` (eval
    mode, no gradients), the ``trainable`` rest, and ``body``: the trainable rest as the optimiser sees it
    (DistributedDataParallel under torchrun)."""

    model: CifarTransferModel
    cut: Cut
    body: nn.Module
    device: torch.device

    @property
    def prefix(self) -> nn.Sequential:
        return self.cut.prefix

    @property
    def trainable(self) -> nn.Sequential:
        return self.cut.trainable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of preprocessed images: the frozen prefix runs here, without gradients, then the body."""
        if len(self.prefix):
            with torch.no_grad():
                x = self.prefix(x)
        return self.body(x)


def build_model(cfg: TrainConfig, classes: list[str], pretrained: dict, device: torch.device, dist: Dist,
                say=print) -> Network:
    """The pretrained backbone with a new head for ``classes`` on ``device``, its first ``cfg.freeze_stages``
    stages frozen (batch-norm statistics included; the last stage always trains)."""
    model = CifarTransferModel.from_backbone(cfg.backbone, class_names=classes, input_size=cfg.input_size,
                                             pretrained_state=pretrained)
    say(f"model: {cfg.backbone}, contract {model.contract.name} mean={model.contract.mean} std={model.contract.std}, "
        f"input {cfg.input_size}px, {cfg.freeze_stages} of {len(model.stages)} stages frozen")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    cut = split_frozen(model, cfg.freeze_stages)
    body: nn.Module = cut.trainable
    if dist.enabled:
        body = nn.parallel.DistributedDataParallel(body, device_ids=[device.index] if device.type == "cuda" else None)
    return Network(model, cut, body, device)


# -- what --resume continues from ----------------------------------------------------------


@dataclass
class TrainState:
    """Where a run stands after a finished epoch (``train_state.pt`` holds it with the weights, the
    optimizer and the config)."""

    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    elapsed: float = 0.0  # wall seconds at the end of that epoch


def save_train_state(path: Path, state: TrainState, model: nn.Module, opt, cfg: TrainConfig) -> None:
    """Write ``train_state.pt`` atomically: an interrupted write leaves the previous epoch's state."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": state.epoch,
                "history": state.history, "elapsed": state.elapsed, "config": dataclasses.asdict(cfg)}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_train_state(path: Path, model: nn.Module, opt) -> TrainState:
    """Load the weights and optimizer state of ``path`` into ``model`` and ``opt``; return where the run stood."""
    if not path.is_file():
        raise SystemExit(f"--resume: no saved state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return TrainState(state["epoch"], state["history"], state["elapsed"])


# -- batches: cached features or images (cifar_transfer/batches.py) -------------------------------


def make_batches(cfg: TrainConfig, data: TrainData, net: Network, dist: Dist, say=print) -> ImageBatches | CachedBatches:
    """This rank's batch source: cached features of a fixed shard (``--cache-features``), else images."""
    per_rank_batch = cfg.batch_size // dist.world_size
    if not cfg.cache_features:
        batches = ImageBatches(data.dataset.train, net.model.preprocess, net.device, per_rank_batch, cfg.seed,
                               rank=dist.rank, world_size=dist.world_size, evaluation=data.eval_split,
                               eval_name=data.eval_name)
    else:
        shard = data.dataset.train
        if dist.enabled:
            shard = shard.subset(torch.arange(len(shard))[dist.rank::dist.world_size][: len(shard) // dist.world_size])
        t0 = time.perf_counter()
        run_prefix = prefix_runner(net.prefix, cfg.input_size, cfg.engine)
        common = dict(device=net.device, seed=cfg.seed, batch_size=CACHE_BATCH, channels_last=cfg.channels_last,
                      progress=cfg.progress and dist.main)
        cache = FeatureCache(run_prefix, shard, net.model.preprocess, views=cfg.cache_views, augment=True, **common)
        evaluation = FeatureCache(run_prefix, data.eval_split, net.model.preprocess, views=1, augment=False,
                                  name=data.eval_name, **common) if dist.main else None
        say(f"cached {cfg.cache_views} view(s) of {len(shard)} images -> {tuple(cache.views[0].shape[1:])} "
            f"in {time.perf_counter() - t0:.0f}s")
        batches = CachedBatches(cache, net.device, per_rank_batch, cfg.seed, evaluation=evaluation,
                                eval_name=data.eval_name)
    if len(batches) == 0:
        raise SystemExit(f"training set too small for --batch-size {cfg.batch_size}")
    return batches



# -- the loop (cifar_transfer/training.py: run_steps, train_one_epoch) ----------------------------


def fit(cfg: TrainConfig, dist: Dist, net: Network, opt, batches, state: TrainState, state_path: Path, clock: Clock,
        say=print) -> None:
    """Epochs ``state.epoch + 1 .. cfg.epochs``: train, score on the held-out split (rank 0), save the state.
    Ctrl-C exits (status 130) with the state of the last finished epoch saved."""
    save = (lambda: save_train_state(state_path, state, net.model, opt, cfg)) if dist.main else (lambda: None)
    if state.epoch == 0:
        save()
    # With a time budget the schedule runs over the time left once training starts (data and caching excluded).
    budget_s = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None
    schedule = Schedule(cfg.lr, cfg.warmup, len(batches) * cfg.epochs, budget_s, clock, start_s=clock())
    if budget_s and budget_s <= schedule.start_s:
        raise SystemExit(f"--time-budget-minutes {cfg.time_budget_minutes} is used up before training starts "
                         f"({schedule.start_s / 60:.1f} min spent loading data and caching features)")
    forward = net.body if batches.features else net.forward
    amp_dtype, scaler = mixed_precision(cfg.amp, net.device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    epoch = state.epoch
    try:
        for epoch in range(state.epoch, cfg.epochs):
            torch.manual_seed(cfg.seed * 1_000_003 + epoch * 101 + dist.rank)  # dropout etc.: resumable per epoch
            result = train_one_epoch(forward, batches, opt, loss_fn, epoch, schedule, cut=net.cut, scaler=scaler,
                                     amp_dtype=amp_dtype,
                                     channels_last=cfg.channels_last, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                     progress=cfg.progress and dist.main)
            train_time = clock()
            record = {"epoch": epoch + 1, "train_loss": result.loss, "train_acc": result.accuracy,
                      "wall_seconds": train_time, "steps": result.steps}
            if dist.main:
                acc = record[f"{batches.eval_name}_acc"] = batches.eval_accuracy(net, cfg.eval_batch_size, cfg.tta_flip)
                say(f"epoch {epoch + 1}: train loss {result.loss:.4f} acc {result.accuracy:.4f} | "
                    f"{batches.eval_name} acc {acc:.4f} | {train_time / 60:.1f} min")
            state.history.append(record)
            state.epoch, state.elapsed = epoch + 1, train_time
            save()
            dist.barrier()
            if result.out_of_time:
                say(f"time budget of {cfg.time_budget_minutes} min reached after {train_time / 60:.1f} min")
                break
    except KeyboardInterrupt:
        if dist.main:
            print(f"\ninterrupted in epoch {epoch + 1}; the state after epoch {epoch} is saved in {state_path}.\n"
                  f"Continue with the same command plus --resume.", file=sys.stderr)
        raise SystemExit(130)


# -- after training ------------------------------------------------------------------------------


def sync_replicas(net: Network, dist: Dist) -> dict | None:
    """Under torchrun: rank 0's batch-norm statistics on every rank, and every rank's weight digest
    (``metrics.json`` shows they agree). None in a single process."""
    if not dist.enabled:
        return None
    # Parameters stay in sync through the all-reduced gradients; batch-norm running statistics are
    # updated locally after DDP's per-forward broadcast, so take rank 0's, as DDP itself would next step.
    for buf in net.trainable.buffers():
        torch.distributed.broadcast(buf, src=0)
    digest = state_digest(net.model)
    gathered = [torch.zeros_like(digest) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, digest)
    return {"world_size": dist.world_size, "backend": torch.distributed.get_backend(),
            "rank_weight_digests": [f"{g.item():015x}" for g in gathered]}


def state_digest(model: nn.Module) -> torch.Tensor:
    """The first 60 bits of a sha256 over every tensor of the state dict, as a 1-element int64 tensor."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.tensor([int(h.hexdigest()[:15], 16)], dtype=torch.int64)


def evaluate_on_test(model: CifarTransferModel, test: data_mod.Split, cfg: TrainConfig, device: torch.device,
                     clock: Clock, say=print) -> tuple[dict[str, float], float, float]:
    """Test accuracy under the model's contract, then (unless ``--no-variants``) under every wrong one.
    Returns the accuracies, the clock when the first was known (time to accuracy) and the seconds the rest took."""
    model.eval()
    accuracies = evaluate_variants(model, test, keys=[CORRECT_KEY], device=device, batch_size=cfg.eval_batch_size,
                                   tta_flip=cfg.tta_flip, progress=cfg.progress)
    time_to_accuracy = clock()  # start of the command -> trained model scored on the test set
    say(f"test accuracy under the correct contract: {accuracies[CORRECT_KEY]:.4f} after {time_to_accuracy / 60:.1f} min")
    t_variants = time.perf_counter()
    wrong = [k for k in WRONG_VARIANTS if k != CORRECT_KEY] if cfg.evaluate_variants else []
    if wrong:
        accuracies.update(evaluate_variants(model, test, keys=wrong, device=device, batch_size=cfg.eval_batch_size,
                                            tta_flip=cfg.tta_flip, progress=cfg.progress))
    return accuracies, time_to_accuracy, time.perf_counter() - t_variants


def final_metrics(cfg: TrainConfig, ds: data_mod.Dataset, accuracies: dict[str, float], history: list[dict],
                  device: torch.device, ddp_info: dict | None, train_seconds: float, time_to_accuracy: float,
                  total_seconds: float, variant_seconds: float) -> dict:
    """``metrics.json``: the scores, the history, the timings, the environment and the config of the run."""
    metrics = {
        "dataset": ds.name,
        "data_source": ds.source,
        "test_size": len(ds.test),
        "train_size": len(ds.train),
        "classes": ds.classes,
        "accuracy": accuracies,
        "tta_flip": cfg.tta_flip,
        "command": cfg.command,
        "train_wall_seconds": round(train_seconds, 1),
        "time_to_accuracy_seconds": round(time_to_accuracy, 1),
        "total_wall_seconds": round(total_seconds, 1),
        "variant_eval_wall_seconds": round(variant_seconds, 1),
        "history": history,
        "environment": environment_info(device),
        "train_config": dataclasses.asdict(cfg),
    }
    if ddp_info:
        metrics["distributed"] = ddp_info
    return metrics


def write_checkpoint(model: CifarTransferModel, out: Path, metrics: dict, train_seconds: float, say=print) -> None:
    """Save the model (on the CPU, contiguous) with ``metrics`` to ``out`` and print the summary."""
    model.to("cpu").to(memory_format=torch.contiguous_format)
    save_checkpoint(model, out, metrics)
    accuracies = metrics["accuracy"]
    say(f"\ntest accuracy ({metrics['dataset']}, {metrics['test_size']} images): correct contract "
        f"{accuracies[CORRECT_KEY]:.4f}")
    for k, v in accuracies.items():
        if k != CORRECT_KEY:
            say(f"  {k:<20} {v:.4f}")
    say(f"checkpoint written to {out} (train {train_seconds / 60:.1f} min, "
        f"total {metrics['total_wall_seconds'] / 60:.1f} min)")


def publish_to_hub(out: Path, repo_id: str, private: bool = False) -> None:
    """Upload the checkpoint folder to the Hub (``--push-to-hub``); on failure say how to retry, the checkpoint kept."""
    try:
        print(f"published: {publish(out, repo_id, private=private)}")
    except PublishError as exc:
        raise SystemExit(f"error: {exc}\nThe checkpoint is saved in {out}; retry with "
                         f"python -m cifar_transfer.publish {out} --repo-id {repo_id}") from None
