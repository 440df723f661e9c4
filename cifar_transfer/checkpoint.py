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

Any other timm image classifier loads too ("bring your own classifier"): a
``config.json`` in timm's own format (``architecture``, ``num_classes``,
``pretrained_cfg``, optionally ``label_names``) with no ``format``/``contract``
keys, and ``model.safetensors``. Its contract is what timm itself would apply,
derived from ``pretrained_cfg`` (:func:`contract_from_pretrained_cfg`).

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
CALIBRATION_NAME = "meter_calibration.json"  # the contract meter's calibration for these weights (meter.py), if any
PICKLED_WEIGHTS = ("pytorch_model.bin", "model.pth", "model.pt")  # what older timm repos hold instead; never loaded

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


def is_timm_config(config: Any) -> bool:
    """A plain timm checkpoint's config (any timm classifier, not written by this package): timm's
    ``architecture`` and ``pretrained_cfg``, and neither of our ``format``/``contract`` keys."""
    return (isinstance(config, dict) and "format" not in config and "contract" not in config
            and "architecture" in config and "pretrained_cfg" in config)


def check_config(config: Any, where: str = CONFIG_NAME) -> dict[str, Any]:
    """Validate a checkpoint's config.json content; returns it. Each way it can be wrong has its own message.

    Ours (``format``) or any timm classifier's (:func:`is_timm_config`, checked by :func:`check_timm_config`)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where} must hold a JSON object")
    if is_timm_config(config):
        return check_timm_config(config, where)
    if config.get("format") != FORMAT:
        found = config.get("format")
        hint = (" (written by an older cifar-transfer, before checkpoints became timm checkpoints; "
                "retrain it with this version)") if str(found).startswith("cifar_transfer/") else \
            " nor a timm one (timm's config.json has 'architecture' and 'pretrained_cfg')"
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


# -- any timm classifier ("bring your own") ---------------------------------------------

#: How the page and the CLIs name a contract that came from a plain timm checkpoint.
PRETRAINED_CFG_SOURCE = "contract from the repo's pretrained_cfg"


def check_timm_config(config: dict[str, Any], where: str = CONFIG_NAME) -> dict[str, Any]:
    """Validate a plain timm classifier's config.json: a timm architecture, its class count and labels, and a
    ``pretrained_cfg`` this package can turn into a contract. Returns it."""
    import timm

    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise CheckpointError(f"{where}: unknown architecture {arch!r} (timm {timm.__version__} has no such model)")
    if not isinstance(config.get("pretrained_cfg"), dict):
        raise CheckpointError(f"{where}: pretrained_cfg must be a JSON object")
    timm_label_names(config, where)
    contract_from_pretrained_cfg(config["pretrained_cfg"], where)
    return config


def timm_num_classes(config: dict[str, Any], where: str = CONFIG_NAME) -> int:
    n = config.get("num_classes", config.get("pretrained_cfg", {}).get("num_classes"))
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        raise CheckpointError(f"{where}: num_classes must be a positive integer, got {n!r} "
                              "(a feature extractor without a classifier cannot be served)")
    return n


def timm_label_names(config: dict[str, Any], where: str = CONFIG_NAME) -> list[str]:
    """The class names of a timm classifier: its ``label_names`` (a list, or timm's ``{index: name}`` dict);
    without them, ImageNet-1k's descriptions for 1000 classes (timm's own table), else ``class 0``, ``class 1``..."""
    n = timm_num_classes(config, where)
    names = config.get("label_names", config["pretrained_cfg"].get("label_names"))
    if isinstance(names, dict):
        try:
            by_index = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise CheckpointError(f"{where}: label_names keys must be class indices") from None
        names = [by_index.get(i) for i in range(n)]
    if names is None:
        if n == 1000:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            names = [info.index_to_description(i) for i in range(n)]
        else:
            names = [f"class {i}" for i in range(n)]
    if not (isinstance(names, list) and all(isinstance(x, str) and x for x in names)):
        raise CheckpointError(f"{where}: label_names must be a list of non-empty strings")
    if len(names) != n:
        raise CheckpointError(f"{where}: num_classes is {n} but there are {len(names)} label_names")
    seen: dict[str, int] = {}
    unique = []
    for i, name in enumerate(names):  # the app shows names as keys: two classes must not merge into one
        unique.append(name if name not in seen else f"{name} ({i})")
        seen.setdefault(name, i)
    return unique


def contract_from_pretrained_cfg(pretrained_cfg: Any, where: str = CONFIG_NAME) -> NormalizationContract:
    """The contract timm itself applies to a model with this ``pretrained_cfg`` (``timm.data.resolve_data_config``,
    so timm's defaults fill what it leaves out): mean, std, input size, interpolation, crop; RGB pixels in [0, 1],
    normalized once (timm's data pipeline cannot say otherwise)."""
    from timm.data import resolve_data_config

    if not isinstance(pretrained_cfg, dict):
        raise CheckpointError(f"{where}: pretrained_cfg must be a JSON object")
    try:
        cfg = resolve_data_config({}, pretrained_cfg=dict(pretrained_cfg))
    except Exception as exc:  # noqa: BLE001 - any malformed field
        raise CheckpointError(f"{where}: cannot read pretrained_cfg's preprocessing: {exc}") from exc
    size = tuple(cfg["input_size"])
    if len(size) != 3 or size[0] != 3 or size[1] != size[2]:
        raise CheckpointError(f"{where}: pretrained_cfg's input_size {list(size)} is not a square RGB image "
                              "(this package feeds the network square RGB images)")
    try:
        return NormalizationContract(
            name="pretrained_cfg", mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), input_size=int(size[1]),
            interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"],
            description="From the checkpoint's timm pretrained_cfg, as timm preprocesses: RGB pixels in [0, 1], "
                        "normalized once.")
    except ContractError as exc:
        raise CheckpointError(f"{where}: pretrained_cfg asks for preprocessing this package does not implement: "
                              f"{exc}") from exc


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
        pickled = [n for n in PICKLED_WEIGHTS if (folder / n).is_file()]
        hint = (f" (it has {pickled[0]}, a pickle, which this package never loads: re-save the weights with "
                "timm.models.save_for_hf(..., safe_serialization=True))") if pickled else ""
        raise CheckpointError(f"{folder} is not a complete checkpoint: {WEIGHTS_NAME} is missing{hint}")
    return config


def read_metrics(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / METRICS_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
