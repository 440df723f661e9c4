"""The checkpoint folder: file names, Hub metadata, atomic writes and validation.

A checkpoint is a timm Hub checkpoint, so ``timm.create_model("hf-hub:USER/NAME",
pretrained=True)`` loads it without this package::

    model.safetensors   weights under timm's parameter names (no pickle)
    config.json         timm's format: architecture, num_classes, label_names, pretrained_cfg
                        (mean, std, input_size, interpolation, crop_pct, crop_mode); plus, under
                        keys timm ignores, ``format`` and the full normalization ``contract``
                        (channel order, pixel scale, how often it is applied: what timm cannot say)
    metrics.json        measured accuracies, command, wall time, hardware, versions
    README.md           model card generated from config.json and metrics.json

Both ``model.py`` (writing, loading) and ``card.py`` (the card) use this module;
it imports neither.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .backbones import BackboneError, backbone_for_architecture
from .contract import ContractError, NormalizationContract

FORMAT = "cifar_transfer/2"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
CARD_NAME = "README.md"

# Hub metadata, declared once: the model class and the card both read these.
LIBRARY_NAME = "timm"
LICENSE = "mit"
PIPELINE_TAG = "image-classification"
TAGS = ("image-classification", "timm", "cifar10", "transfer-learning", "normalization")


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or not ours; the message names the problem."""


# -- atomic writes -------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint is meant to be shared
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# -- reading and checking -----------------------------------------------------------


def check_config(config: Any, where: str = CONFIG_NAME) -> dict[str, Any]:
    """Validate a checkpoint's config.json content; returns it. Each way it can be wrong has its own message."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} must hold a JSON object")
    if config.get("format") != FORMAT:
        found = config.get("format")
        hint = (" (written by an older cifar-transfer, before checkpoints became timm checkpoints; "
                "retrain it with this version)") if str(found).startswith("cifar_transfer/") else ""
        raise CheckpointError(f"{where} is not a cifar-transfer checkpoint config (format is {found!r}, "
                              f"expected {FORMAT!r}){hint}")
    for key in ("architecture", "num_classes", "label_names", "pretrained_cfg", "contract"):
        if key not in config:
            raise CheckpointError(f"{where} lacks the field {key!r}")
    try:
        backbone_for_architecture(config["architecture"])
        contract = NormalizationContract.from_dict(config["contract"])
    except (BackboneError, ContractError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    names = config["label_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{where}: label_names must be a non-empty list of strings")
    if config["num_classes"] != len(names):
        raise CheckpointError(f"{where}: num_classes is {config['num_classes']!r} but there are {len(names)} label_names")
    check_timm_agrees(contract, config["pretrained_cfg"], where)
    return config


def check_timm_agrees(contract: NormalizationContract, pretrained_cfg: Any, where: str = CONFIG_NAME) -> None:
    """timm preprocesses by ``pretrained_cfg``, this package by the contract: they must say the same."""
    if not isinstance(pretrained_cfg, dict):
        raise CheckpointError(f"{where}: pretrained_cfg must be a JSON object")
    try:
        disagreements = contract.timm_disagreements(pretrained_cfg)
    except ContractError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    if disagreements:
        raise CheckpointError(f"{where} contradicts itself: timm would preprocess by pretrained_cfg, this package by "
                              f"the contract, and they differ ({'; '.join(disagreements)})")


def read_config(folder: Path) -> dict[str, Any]:
    """Read and validate a checkpoint folder's config.json; the weights file must be there too."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"a checkpoint is a folder, but {folder} is a file")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint: {CONFIG_NAME} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    check_config(config, str(path))
    if not (folder / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint: {WEIGHTS_NAME} is missing")
    return config


def read_metrics(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / METRICS_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
