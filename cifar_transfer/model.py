"""The fine-tuned classifier and its self-describing checkpoint folder.

A checkpoint is a folder::

    model.safetensors   weights (no pickle)
    config.json         backbone, class names, normalization contract: enough to rebuild
    metrics.json        measured accuracies, command, wall time, hardware, versions
    README.md           model card generated from the two JSON files

``CifarTransferModel.from_pretrained(folder_or_repo_id)`` rebuilds the model
(huggingface_hub's ``PyTorchModelHubMixin`` turns ``__init__`` arguments into
``config.json``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .backbones import DEFAULT_BACKBONE, BackboneError, get_backbone
from .contract import ContractError, NormalizationContract

FORMAT = "cifar_transfer/1"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"
CARD_NAME = "README.md"


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or not ours; the message names the problem."""


class CifarTransferModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="cifar-transfer",
    pipeline_tag="image-classification",
    license="mit",
    tags=["image-classification", "cifar10", "transfer-learning", "normalization"],
):
    """A pretrained backbone with a new head, carrying its normalization contract.

    ``forward`` takes already-normalized tensors (as any torchvision model);
    :meth:`classify` takes raw RGB pixels (0-255) and applies the model's own
    contract, or an explicitly passed override (the wrong variants).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        class_names: list[str] | None = None,
        contract: dict | None = None,
        format: str = FORMAT,  # noqa: A002 - stored in config.json to recognise our checkpoints
    ):
        super().__init__()
        if format != FORMAT:
            raise CheckpointError(f"unsupported checkpoint format {format!r} (this version reads {FORMAT!r})")
        spec = get_backbone(backbone)
        self.backbone = backbone
        self.class_names = list(class_names or CIFAR10_CLASSES)
        self.contract = NormalizationContract.from_dict(contract) if contract is not None else spec.contract
        self.stages = nn.Sequential(*spec.build(len(self.class_names), self.contract.input_size))
        self.preprocess = self.contract.transform()

    @classmethod
    def from_backbone(
        cls,
        backbone: str = DEFAULT_BACKBONE,
        *,
        class_names: list[str] | None = None,
        input_size: int | None = None,
        pretrained: bool = True,
        weights_file: str | None = None,
    ) -> "CifarTransferModel":
        """A new model for fine-tuning: pretrained backbone, fresh head, the backbone's contract."""
        spec = get_backbone(backbone)
        contract = spec.contract.replace(input_size=input_size or spec.defaults.get("input_size", spec.contract.input_size))
        model = cls(backbone=backbone, class_names=class_names, contract=contract.to_dict())
        if pretrained:
            spec.load_into(list(model.stages), spec.pretrained_state_dict(weights_file))
        return model

    # -- inference ----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def classify(self, pixels: torch.Tensor, contract: NormalizationContract | None = None) -> torch.Tensor:
        """Logits for ``(N, 3, H, W)`` RGB pixels in 0..255 under the model's contract (or an explicit override)."""
        transform = self.preprocess if contract is None else contract.transform()
        return self(transform(pixels.to(self.device)))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def first_batchnorm(self) -> nn.BatchNorm2d:
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                return m
        raise BackboneError(f"{self.backbone} has no BatchNorm2d layer")

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "backbone": self.backbone,
            "class_names": self.class_names,
            "contract": self.contract.to_dict(),
        }

    # -- hub mixin hooks ------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        tmp = Path(save_directory) / f".{WEIGHTS_NAME}.tmp"
        save_model(self, str(tmp))
        os.replace(tmp, Path(save_directory) / WEIGHTS_NAME)
        atomic_write_json(Path(save_directory) / CONFIG_NAME, self.config())

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs):
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_model

        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
        else:
            weights = hf_hub_download(model_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, local_files_only=local_files_only, token=token)
        try:
            load_model(model, weights, strict=True, device=map_location)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds
            raise CheckpointError(f"{weights}: weights do not match the architecture in config.json: {exc}") from exc
        return model.eval()


# -- files ---------------------------------------------------------------------


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


def read_config(folder: Path) -> dict[str, Any]:
    """Read and validate a checkpoint's config.json, with a clear error for each way it can be wrong."""
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
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cifar-transfer checkpoint config (format is {config.get('format')!r}, expected {FORMAT!r})")
    for key in ("backbone", "class_names", "contract"):
        if key not in config:
            raise CheckpointError(f"{path} lacks the field {key!r}")
    try:
        get_backbone(config["backbone"])
        NormalizationContract.from_dict(config["contract"])
    except (BackboneError, ContractError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    names = config["class_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise CheckpointError(f"{path}: class_names must be a non-empty list of strings")
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


def load_checkpoint(folder: str | Path, map_location: str = "cpu") -> CifarTransferModel:
    """Load a local checkpoint folder, validating it first."""
    read_config(Path(folder))
    return CifarTransferModel.from_pretrained(str(folder), map_location=map_location)


def save_checkpoint(model: CifarTransferModel, folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write weights, config, metrics and the model card; every file atomically."""
    from .card import write_model_card

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model._save_pretrained(folder)
    if metrics is not None:
        atomic_write_json(folder / METRICS_NAME, metrics)
    write_model_card(folder)
    return folder
