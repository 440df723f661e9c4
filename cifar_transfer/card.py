"""The model card (README.md of a checkpoint), generated from its config.json and metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

from .contract import NormalizationContract, variant_title
from .model import CARD_NAME, CONFIG_NAME, METRICS_NAME, atomic_write_text


def render_model_card(config: dict, metrics: dict | None) -> str:
    contract = NormalizationContract.from_dict(config["contract"])
    lines = [f"# {config['backbone']} fine-tuned on CIFAR-10", "",
             "## Normalization contract", "",
             "| channel | mean | std |", "|---|---|---|"]
    for ch, m, s in zip("RGB", contract.mean, contract.std):
        lines.append(f"| {ch} | {m} | {s} |")
    if metrics and "accuracy" in metrics:
        lines += ["", f"## Test accuracy ({metrics.get('dataset')}, {metrics.get('test_size')} images)", "",
                  "| variant | accuracy |", "|---|---|"]
        for k, v in metrics["accuracy"].items():
            lines.append(f"| {variant_title(k)} | {100 * v:.2f}% |")
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path) -> Path:
    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    metrics_path = folder / METRICS_NAME
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    atomic_write_text(folder / CARD_NAME, render_model_card(config, metrics))
    return folder / CARD_NAME
