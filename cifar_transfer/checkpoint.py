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
it imports neither. It also says which of a folder's files belong to which weights
(:func:`fingerprint`, :func:`set_aside_stale_calibration`), so that writing new weights
never leaves the meter's calibration of the old ones behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

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


# -- limits: a checkpoint is untrusted input, checked before anything is built from it ----------------

#: Most classes a checkpoint may have. The largest label set among timm's pretrained classifiers is 115,217
#: (vit_base_patch16_224.bamboo; ImageNet-21k's is 21,843), so 150,000 refuses no real one, while a config.json
#: saying 10^9 would otherwise have the loader make 10^9 label names (past 6 GB) before building a 10^9-row head.
MAX_CLASSES = 150_000
#: Largest side, in pixels, of the square a checkpoint's network is fed, and of the image resized before its crop
#: (``input_size / crop_pct``) or stored for it (metrics' ``train_config.image_size``). timm's largest pretrained
#: input size is 1024 (its classifiers' is 800); one 1024 px float image is 12 MB, the app's batch of every variant
#: and its channel twins about 170 MB, while 100,000 px would be 120 GB per image.
MAX_INPUT_SIDE = 1024
#: Largest JSON file of a checkpoint (config.json, metrics.json, meter_calibration.json), checked before it is read.
#: The shipped ones are 1.2 kB, 3.9 kB and 82 kB; MAX_CLASSES label names of 100 characters make about 16 MB. Parsing
#: 16 MiB of the worst JSON (nested empty lists) took 0.7 GB (measured with ru_maxrss), within the 2 GB budget.
MAX_JSON_BYTES = 16 * 2**20
#: Widest value a weights file may store (float64, 8 bytes): model.safetensors may hold at most this many bytes a
#: parameter of the architecture (plus its header), checked from its size before anything is read.
MAX_BYTES_PER_VALUE = 8


def check_class_count(n: Any, where: str = CONFIG_NAME) -> int:
    """``n`` if it is a positive class count within :data:`MAX_CLASSES`; else the reason, one line."""
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        raise CheckpointError(f"{where}: num_classes must be a positive integer, got {n!r} "
                              "(a feature extractor without a classifier cannot be served)")
    if n > MAX_CLASSES:
        raise CheckpointError(f"{where}: num_classes is {n:,}, above the limit of {MAX_CLASSES:,} classes "
                              "this package serves")
    return n


def check_input_size(contract: NormalizationContract, where: str = CONFIG_NAME) -> NormalizationContract:
    """``contract`` if the images it makes stay within :data:`MAX_INPUT_SIDE` pixels a side; else the reason."""
    if contract.input_size > MAX_INPUT_SIDE:
        raise CheckpointError(f"{where}: the input size {contract.input_size} px is above the limit of "
                              f"{MAX_INPUT_SIDE} px a side")
    resized = math.floor(contract.input_size / contract.crop_pct)
    if resized > MAX_INPUT_SIDE:
        raise CheckpointError(f"{where}: crop_pct {contract.crop_pct} has images resized to {resized} px before "
                              f"the crop, above the limit of {MAX_INPUT_SIDE} px a side")
    return contract


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
    check_input_size(contract, where)
    check_class_count(config["num_classes"], where)
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
    import timm  # timm, torchvision with it, takes ~1.8 s to import: paid only for a timm checkpoint of another project

    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise CheckpointError(f"{where}: unknown architecture {arch!r} (timm {timm.__version__} has no such model)")
    if not isinstance(config.get("pretrained_cfg"), dict):
        raise CheckpointError(f"{where}: pretrained_cfg must be a JSON object")
    timm_label_names(config, where)
    contract_from_pretrained_cfg(config["pretrained_cfg"], where)
    return config


def timm_num_classes(config: dict[str, Any], where: str = CONFIG_NAME) -> int:
    return check_class_count(config.get("num_classes", config.get("pretrained_cfg", {}).get("num_classes")), where)


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
            from timm.data import ImageNetInfo  # timm is slow to import (see check_timm_config)

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
    from timm.data import resolve_data_config  # timm is slow to import (see check_timm_config)

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
        contract = NormalizationContract(
            name="pretrained_cfg", mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), input_size=int(size[1]),
            interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"],
            description="From the checkpoint's timm pretrained_cfg, as timm preprocesses: RGB pixels in [0, 1], "
                        "normalized once.")
    except ContractError as exc:
        raise CheckpointError(f"{where}: pretrained_cfg asks for preprocessing this package does not implement: "
                              f"{exc}") from exc
    return check_input_size(contract, f"{where}: pretrained_cfg")


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


def read_json(path: Path) -> Any:
    """One of a checkpoint's JSON files, its size checked before it is read (:data:`MAX_JSON_BYTES`); a file too
    large or not JSON is one :class:`CheckpointError` line naming it."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is {size / 2**20:.0f} MB, above the limit of {MAX_JSON_BYTES // 2**20} MB for "
                              "a checkpoint's JSON file")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None


def read_config(folder: Path) -> dict[str, Any]:
    """Read and validate a checkpoint folder's config.json; the weights file must be there too, and its other JSON
    files (metrics, meter calibration), if any, must be JSON within the size limit."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"a checkpoint is a folder, but {folder} is a file")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a checkpoint: {CONFIG_NAME} is missing")
    config = check_config(read_json(path), str(path))
    if not (folder / WEIGHTS_NAME).is_file():
        pickled = [n for n in PICKLED_WEIGHTS if (folder / n).is_file()]
        hint = (f" (it has {pickled[0]}, a pickle, which this package never loads: re-save the weights with "
                "timm.models.save_for_hf(..., safe_serialization=True))") if pickled else ""
        raise CheckpointError(f"{folder} is not a complete checkpoint: {WEIGHTS_NAME} is missing{hint}")
    read_metrics(folder)
    if (folder / CALIBRATION_NAME).is_file():
        read_json(folder / CALIBRATION_NAME)  # its content is the meter's to check (meter.MeterCalibration.load)
    return config


def read_metrics(folder: Path) -> dict[str, Any] | None:
    """The folder's metrics.json, checked (:func:`check_metrics`); ``None`` without one."""
    path = Path(folder) / METRICS_NAME
    return check_metrics(read_json(path), str(path)) if path.is_file() else None


def check_metrics(metrics: Any, where: str = METRICS_NAME) -> dict[str, Any]:
    """``metrics`` if it is a JSON object whose recorded training image size (the side images are read at for the
    model, :func:`cifar_transfer.images.pixel_side`) is within :data:`MAX_INPUT_SIDE`; else the reason."""
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{where} must hold a JSON object")
    train_config = metrics.get("train_config")
    if train_config is not None and not isinstance(train_config, dict):
        raise CheckpointError(f"{where}: train_config must be a JSON object")
    side = (train_config or {}).get("image_size")
    if isinstance(side, (int, float)) and side > MAX_INPUT_SIDE:
        raise CheckpointError(f"{where}: train_config.image_size {side} px is above the limit of {MAX_INPUT_SIDE} px "
                              "a side")
    return metrics


# -- the weights file, against the architecture ------------------------------------------------


def check_weights(path: Path, shapes: dict[str, tuple[int, ...]], architecture: str, strict: bool = True) -> None:
    """Check ``model.safetensors`` against ``shapes`` (the architecture's tensors, name to shape) from its size and
    header alone, before any tensor is read: not larger than the architecture can fill
    (:data:`MAX_BYTES_PER_VALUE`), and, tensor by tensor, the names (when ``strict``) and shapes it needs.
    The first problem is one :class:`CheckpointError` line."""
    path = Path(path)
    size = path.stat().st_size
    header_limit = 8 + MAX_JSON_BYTES
    limit = header_limit + MAX_BYTES_PER_VALUE * sum(math.prod(s) for s in shapes.values())
    if size > limit:
        raise CheckpointError(f"{path} is {size / 2**20:,.0f} MB, more than the architecture in {CONFIG_NAME} "
                              f"({architecture}) can hold: at most {limit / 2**20:,.0f} MB")
    tensors = _safetensors_header(path, size)
    mismatch = "weights do not match the architecture in config.json"
    if strict:
        missing = [k for k in shapes if k not in tensors]
        unexpected = [k for k in tensors if k not in shapes]
        if missing:
            raise CheckpointError(f"{path}: {mismatch} ({architecture}): it lacks the tensor {missing[0]!r} "
                                  f"({len(missing)} of {len(shapes)} missing)")
        if unexpected:
            raise CheckpointError(f"{path}: {mismatch} ({architecture}): it has the tensor {unexpected[0]!r}, "
                                  f"which the architecture has not ({len(unexpected)} such)")
    for name, shape in shapes.items():
        if name not in tensors:
            continue  # allowed when not strict
        found = tensors[name].get("shape") if isinstance(tensors[name], dict) else None
        if found != list(shape):
            raise CheckpointError(f"{path}: {mismatch} ({architecture}): tensor {name!r} has the shape {found} in the "
                                  f"file, {list(shape)} in the architecture")


def _safetensors_header(path: Path, size: int) -> dict[str, Any]:
    """A safetensors file's header (its tensors' names, dtypes, shapes and offsets), read and size-checked alone."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(MAX_JSON_BYTES, size - 8):
            raise CheckpointError(f"{path} is not a safetensors file (its header length is {length} bytes, in a file "
                                  f"of {size} bytes)")
        header = f.read(length)
    try:
        tensors = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file: its header is not valid JSON ({exc})") from None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path} is not a safetensors file: its header is not a JSON object")
    tensors.pop("__metadata__", None)
    return tensors


# -- what in a folder belongs to which weights ------------------------------------------


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every ``BatchNorm2d`` of ``model`` in ``model.modules()`` order, with its name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def first_batchnorm(model: nn.Module) -> nn.BatchNorm2d:
    """The first ``BatchNorm2d`` of ``model`` (the one the first-layer divergence reads); ``ValueError`` if none."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("the model has no BatchNorm2d layer")
    return layers[0][1]


def fingerprint(model: nn.Module) -> dict:
    """What a calibration is keyed to: the batch-norm layers' count, widths and running statistics."""
    layers = batchnorm_layers(model)
    h = hashlib.sha256()
    for _, bn in layers:
        for t in (bn.running_mean, bn.running_var):
            # rounded, so that a dtype round-trip or a re-save of the same weights still matches
            h.update(np.round(t.detach().float().cpu().numpy().astype(np.float64), 4).tobytes())
    return {"batchnorm_layers": len(layers), "widths": [bn.num_features for _, bn in layers],
            "running_stats_sha256": h.hexdigest()}


def set_aside_stale_calibration(model: nn.Module, folder: str | Path, log=print) -> Path | None:
    """Before new weights are written to ``folder``: unless its calibration was made for ``model`` (the same
    :func:`fingerprint`, the rule the meter's ``MeterCalibration.check`` applies), rename it atomically to
    ``meter_calibration.stale-<UTC time>.json``, where nothing looks for it; an unreadable one too. Returns the new path."""
    path = Path(folder) / CALIBRATION_NAME
    if not path.is_file():
        return None
    try:
        if json.loads(path.read_text()).get("fingerprint") == fingerprint(model):
            return None
    except (OSError, ValueError, AttributeError):  # unreadable, or not a calibration at all: it fits nothing
        pass
    stamp, n = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), 1
    aside = path.with_name(f"{path.stem}.stale-{stamp}.json")
    while aside.exists():  # never over an earlier one of the same second
        n += 1
        aside = path.with_name(f"{path.stem}.stale-{stamp}-{n}.json")
    os.replace(path, aside)
    log(f"moved {path} aside to {aside.name}: it was made for other weights (rebuild it with python -m "
        f"cifar_transfer.meter {folder} --data-dir DATA)")
    return aside
