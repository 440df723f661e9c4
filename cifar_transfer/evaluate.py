"""Score a checkpoint on the test set under its contract and every wrong variant.

    python -m cifar_transfer.evaluate checkpoints/efficientnet_lite0-cifar10 \\
        --data-dir ../shared/datasets/cifar10-jpeg [--write]

Prints the accuracy table; ``--write`` stores it in the checkpoint's
``metrics.json`` (atomically) and regenerates the model card.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .card import write_model_card
from .checkpoint import METRICS_NAME, PRETRAINED_CFG_SOURCE, CheckpointError, atomic_write_json, read_metrics
from .cli import HelpFormatter
from .contract import CORRECT_KEY, WRONG_VARIANTS, variant_contracts, variant_title
from .data import DataError, load_dataset
from .hub import resolve_checkpoint
from .images import pixel_side
from .inference import class_probabilities, prefix_runner
from .runtime import pick_device


# Images per evaluation batch. Small batches stay in the CPU cache: scoring the 10,000 test images with flip TTA at
# 128 px on 2 cores took ~7.5 s per 256 images at batch 256 and ~3.5 s at batch 32 (python -m cifar_transfer.evaluate).
EVAL_BATCH_SIZE = 32
EVAL_BATCH_HELP = "evaluation batch size (small batches stay in the CPU cache: ~2x faster than 256 at 128 px on 2 cores)"


ENGINES = ("auto", "onnxruntime", "pytorch")  # see cifar_transfer/engine.py


def network(model, device, engine: str = "auto"):
    """``batch -> logits``: ONNX Runtime on a CPU (``auto``; :func:`~cifar_transfer.inference.prefix_runner`, which
    runs the frozen prefixes of training too), else the PyTorch model itself."""
    if device.type == "cpu" and engine != "pytorch":
        return prefix_runner(model, model.contract.input_size, engine)
    channels_last = next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    return lambda x: model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)


@torch.no_grad()
def predict_probabilities(model, split, *, contract=None, device=None, batch_size: int = EVAL_BATCH_SIZE, tta_flip: bool = False,
                          progress: bool = False, desc: str = "eval", engine: str = "auto", net=None) -> torch.Tensor:
    """Class probabilities for every image of ``split`` under ``contract`` (default: the model's own).

    ``engine``: see :func:`network` (``net``, if given, is such a network already made)."""
    device = device or model.device
    model.eval()
    net = net or network(model, device, engine)
    transform = (contract or model.contract).transform().to(device)
    out = []
    for i in tqdm(range(0, len(split), batch_size), desc=desc, disable=not progress, leave=False):
        x = transform(split.images[i:i + batch_size].to(device))
        out.append(class_probabilities(net, x, tta_flip).cpu())
    return torch.cat(out)


def evaluate_variants(model, split, *, keys=None, device=None, batch_size: int = EVAL_BATCH_SIZE, tta_flip: bool = False,
                      progress: bool = False, engine: str = "auto") -> dict[str, float]:
    """``{"correct": acc, <variant>: acc, ...}`` as fractions in [0, 1]."""
    keys = list(keys or [CORRECT_KEY, *WRONG_VARIANTS])
    net = network(model, device or model.device, engine)  # one export for every variant
    results = {}
    for key, contract in variant_contracts(model.contract, keys).items():
        if key not in keys:
            continue
        probs = predict_probabilities(model, split, contract=contract, device=device, batch_size=batch_size,
                               tta_flip=tta_flip, progress=progress, desc=key, net=net)
        results[key] = round((probs.argmax(1) == split.labels).float().mean().item(), 6)
    return results


def format_table(accuracies: dict[str, float], reference: dict[str, float] | None = None) -> str:
    lines = [f"{'variant':<22} {'title':<48} {'accuracy':>9}" + ("  metrics.json" if reference else "")]
    for key, acc in accuracies.items():
        row = f"{key:<22} {variant_title(key):<48} {100 * acc:>8.2f}%"
        if reference and key in reference:
            row += f"  {100 * reference[key]:>10.2f}%"
        lines.append(row)
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cifar_transfer.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder or Hugging Face Hub repo id: this package's, or any timm "
                                      "classifier's (contract from its pretrained_cfg)")
    p.add_argument("--data-dir", metavar="DIR", help="local data (train/ + test/ class folders, or cifar-10-batches-py); default: torchvision download")
    p.add_argument("--variants", nargs="*", metavar="KEY", choices=list(WRONG_VARIANTS),
                   help="wrong variants to score (default: all)")
    p.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help=EVAL_BATCH_HELP)
    p.add_argument("--tta-flip", default=None, action=argparse.BooleanOptionalAction,
                   help="average each image with its mirror (default: as the checkpoint was evaluated)")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="score these classes only (default: the classes the checkpoint was trained on)")
    p.add_argument("--max-test-per-class", type=int, metavar="N",
                   help="score only the first N test images of each class; 0: all (default: as the checkpoint was evaluated)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="inference engine; auto: ONNX Runtime on a CPU (3-7x faster there), PyTorch on a GPU")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--write", action="store_true", help="store the accuracies in the checkpoint's metrics.json and refresh its model card")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        folder, model, note = resolve_checkpoint(args.checkpoint)
        print(note)
        metrics = read_metrics(folder) or {}
        tta = metrics.get("tta_flip", False) if args.tta_flip is None else args.tta_flip
        trained = metrics.get("train_config") or {}
        classes = args.classes or trained.get("classes")
        per_class = trained.get("max_test_per_class") if args.max_test_per_class is None else (args.max_test_per_class or None)
        if args.max_test_per_class is None and per_class:
            print(f"scoring the first {per_class} test images per class, as the checkpoint was evaluated "
                  "(--max-test-per-class 0 scores all)")
        # Folder images stored as the checkpoint was trained on them (and as the app reads uploads for it): squared at
        # its recorded training image size by its contract's resize policy; no recorded size: the dataset's default.
        side = pixel_side(model.contract, metrics)
        pipeline = {"contract": model.contract, **({"image_size": side} if side else {})}
        ds = load_dataset(args.data_dir, classes=classes, max_per_class=1, max_test_per_class=per_class, **pipeline)
        foreign = model.contract_source == PRETRAINED_CFG_SOURCE  # another project's timm classifier
        if foreign and ds.classes != model.class_names and not args.classes and set(model.class_names) <= set(ds.classes):
            ds = load_dataset(args.data_dir, classes=model.class_names, max_per_class=1, max_test_per_class=per_class,
                              **pipeline)
    except (CheckpointError, DataError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if ds.classes != model.class_names and foreign:
        raise SystemExit(f"error: {args.checkpoint} is a timm classifier of {len(model.class_names)} classes "
                         f"({_some(model.class_names)}), labelled by its label_names; {ds.name} has the classes "
                         f"{_some(ds.classes)}. evaluate scores it only on a dataset of its own classes (class folders "
                         "named as its label_names: --data-dir, or --classes NAME...), so these accuracies cannot be measured")
    if ds.classes != model.class_names:
        raise SystemExit(f"error: the dataset's classes {ds.classes} differ from the checkpoint's {model.class_names}")
    device = pick_device(args.device)
    model.to(device)
    keys = [CORRECT_KEY, *(args.variants if args.variants is not None else WRONG_VARIANTS)]
    t0 = time.perf_counter()
    acc = evaluate_variants(model, ds.test, keys=keys, device=device, batch_size=args.batch_size, tta_flip=tta, progress=True,
                            engine=args.engine)
    seconds = time.perf_counter() - t0
    print(f"{ds.name}, {len(ds.test)} test images, tta_flip={tta}, {seconds:.0f}s on {device}")
    print(format_table(acc, metrics.get("accuracy")))
    if args.write:
        if not Path(folder).is_dir() or str(folder) != str(Path(args.checkpoint)):
            raise SystemExit("error: --write needs a local checkpoint folder")
        metrics.update({"accuracy": acc, "test_size": len(ds.test), "dataset": ds.name, "data_source": ds.source, "tta_flip": tta})
        atomic_write_json(Path(folder) / METRICS_NAME, metrics)
        if foreign:  # its README.md is its own: the app reads metrics.json, the card stays as its authors wrote it
            print(f"wrote {Path(folder) / METRICS_NAME} (a timm classifier's folder: its README.md is left as it is)")
            return
        write_model_card(Path(folder))
        print(f"wrote {Path(folder) / METRICS_NAME}")


def _some(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


if __name__ == "__main__":
    main()
