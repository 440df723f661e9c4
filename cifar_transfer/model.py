"""The fine-tuned classifier: a timm model carrying its normalization contract.

``CifarTransferModel.from_pretrained(folder_or_repo_id)`` rebuilds it from a
checkpoint (see :mod:`cifar_transfer.checkpoint` for the folder), and so does
``timm.create_model("hf-hub:USER/NAME", pretrained=True)``: the weights are the
timm model's own, under timm's names, and ``config.json`` is timm's format.

No ``from __future__ import annotations`` here: huggingface_hub reads the
``__init__`` annotations at run time to rebuild the typed contract.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from . import backbones
from .backbones import DEFAULT_BACKBONE, BackboneError, backbone_for_architecture, get_backbone
from .card import render_model_card
from .checkpoint import (  # noqa: F401 - re-exported: app.py and others import these from here
    CARD_NAME, CONFIG_NAME, FORMAT, LIBRARY_NAME, LICENSE, METRICS_NAME, PIPELINE_TAG, PRETRAINED_CFG_SOURCE, TAGS,
    WEIGHTS_NAME, CheckpointError, atomic_write_bytes, atomic_write_json, atomic_write_text, check_config,
    check_timm_agrees, check_timm_config, check_weights, contract_from_pretrained_cfg, is_timm_config, read_config,
    read_metrics, set_aside_stale_calibration, timm_label_names,
)
from .contract import ContractError, NormalizationContract
from .hub_refs import could_be_repo_id, describe_hub_error, hub_unreachable

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def check_pixels(pixels: torch.Tensor) -> None:
    """Refuse what is not ``(N, 3, H, W)`` pixels in 0..255: the silent-mistake shapes and ranges, loudly."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"classify takes (N, 3, H, W) RGB pixels; got {shape}")
    if pixels.dtype == torch.uint8 or pixels.numel() == 0:
        return
    if pixels.is_complex() or pixels.dtype == torch.bool:
        raise ValueError(f"classify takes uint8 pixels 0..255; got dtype {pixels.dtype}")
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < 0:
        raise ValueError(f"classify takes pixels in 0..255; got values down to {lo:.3g}: this input looks already "
                         "normalized (pass the raw pixels: the model applies its own contract)")
    if hi > 255:
        raise ValueError(f"classify takes pixels in 0..255; got values up to {hi:.4g}")
    if pixels.is_floating_point() and hi <= 1.0:
        raise ValueError("classify takes pixels in 0..255; got floats in [0, 1] (scaled like ToTensor's output?): "
                         "pass uint8 pixels, or multiply by 255")


class CifarTransferModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name=LIBRARY_NAME,
    pipeline_tag=PIPELINE_TAG,
    license=LICENSE,
    tags=list(TAGS),
):
    """A timm classifier with its normalization contract.

    ``forward`` takes already-normalized tensors (as any timm model) and is the timm model's own forward;
    :meth:`classify` takes raw RGB pixels (0-255) and applies the model's contract, or an explicitly
    passed override (the wrong variants). The contract is a typed ``__init__`` argument: the Hub mixin
    stores it in ``config.json`` and rebuilds the dataclass on load.

    ``format=None`` is any other timm classifier (a plain timm ``config.json``, what ``from_pretrained``
    passes for one): any timm architecture, the contract from its ``pretrained_cfg``
    (:func:`~cifar_transfer.checkpoint.contract_from_pretrained_cfg`), the labels from its ``label_names``;
    ``contract_source`` says which (``"contract"`` or :data:`~cifar_transfer.checkpoint.PRETRAINED_CFG_SOURCE`).
    """

    def __init__(
        self,
        architecture: str = get_backbone(DEFAULT_BACKBONE).architecture,
        label_names: list[str] | None = None,
        contract: NormalizationContract | None = None,
        format: str | None = FORMAT,  # noqa: A002 - stored in config.json to recognise our checkpoints; None: timm's own
        **timm_config: Any,  # the rest of timm's config.json (num_classes, pretrained_cfg, ...) and timm create args
    ):
        super().__init__()
        self.architecture = architecture
        if format is None:  # any timm classifier: timm's own config.json
            config = check_timm_config({**timm_config, "architecture": architecture,
                                        **({"label_names": label_names} if label_names is not None else {})})
            self.backbone = architecture
            self.class_names = timm_label_names(config)
            named = config.get("label_names", config["pretrained_cfg"].get("label_names")) is not None
            self.labels_source = ("its label_names" if named else "ImageNet-1k's class names (timm's table; "
                                  "it has no label_names)" if len(self.class_names) == 1000 else "numbers (it has no label_names)")
            self.contract = contract if contract is not None else contract_from_pretrained_cfg(config["pretrained_cfg"])
            self.contract_source = "contract" if contract is not None else PRETRAINED_CFG_SOURCE
            self.net = backbones.create_timm(architecture, len(self.class_names), dict(config["pretrained_cfg"]),
                                             config.get("model_args") or {})
        elif format != FORMAT:
            raise CheckpointError(f"unsupported checkpoint format {format!r} (this version reads {FORMAT!r})")
        else:
            spec = backbone_for_architecture(architecture)
            self.backbone = spec.name
            self.class_names = list(label_names or CIFAR10_CLASSES)
            self.contract = contract if contract is not None else spec.contract
            self.contract_source, self.labels_source = "contract", "its label_names"
            if timm_config.get("num_classes", len(self.class_names)) != len(self.class_names):
                raise CheckpointError(f"num_classes is {timm_config['num_classes']} but there are {len(self.class_names)} label names")
            if "pretrained_cfg" in timm_config:
                check_timm_agrees(self.contract, timm_config["pretrained_cfg"])
            create_args = {k: timm_config[k] for k in ("drop_rate", "drop_path_rate") if k in timm_config}
            self.net = backbones.create(spec, len(self.class_names), **create_args)
        self.format = format
        self.preprocess = self.contract.transform()
        self.metrics: dict[str, Any] | None = None  # the checkpoint's metrics.json, for the model card

    @classmethod
    def from_backbone(
        cls,
        backbone: str = DEFAULT_BACKBONE,
        *,
        class_names: list[str] | None = None,
        input_size: int | None = None,
        pretrained: bool = True,
        weights_file: str | None = None,
        pretrained_state: dict | None = None,
    ) -> "CifarTransferModel":
        """A new model for fine-tuning: pretrained backbone, fresh head, the backbone's contract.

        The ImageNet weights are downloaded, read from ``weights_file``, or given as ``pretrained_state``
        (the backbone's ``pretrained_state_dict``, fetched earlier so that a failure comes first)."""
        spec = get_backbone(backbone)
        contract = spec.contract.replace(input_size=input_size or spec.defaults.get("input_size", spec.contract.input_size))
        model = cls(architecture=spec.architecture, label_names=class_names, contract=contract, **spec.train_args)
        if pretrained:
            state = pretrained_state if pretrained_state is not None else spec.pretrained_state_dict(weights_file)
            backbones.load_pretrained(model.net, state)
        return model

    # -- inference ----------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def classify(self, pixels: torch.Tensor, contract: NormalizationContract | None = None) -> torch.Tensor:
        """Logits for ``(N, 3, H, W)`` RGB pixels in 0..255 under the model's contract (or an explicit override).

        Pass ``uint8`` pixels. Other dtypes must hold 0..255 values too: float input in [0, 1] (the
        ``ToTensor`` habit) or with negative values (already normalized) raises ``ValueError`` instead of
        being silently misread, which is the very bug this project is about.
        """
        check_pixels(pixels)
        transform = self.preprocess if contract is None else contract.transform()
        return self(transform(pixels.to(self.device)))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def stages(self) -> nn.Sequential:
        """The network as ``[stem, stage 1, ..., head]`` at timm's stage boundaries (views of ``net``'s modules)."""
        return nn.Sequential(*backbones.stages(self.net))

    @property
    def classifier(self) -> nn.Module:
        return self.net.get_classifier()

    # -- config.json ----------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """``config.json``: timm's own export of the model and its data config, plus our format and contract."""
        from timm.models._hub import save_config_for_hf  # timm takes ~1.8 s to import: only saving needs this

        if self.format is None:
            raise CheckpointError(f"this {self.architecture} is another project's timm classifier, loaded to be served; "
                                  "this package writes only the checkpoints it trains (save it with "
                                  "timm.models.save_for_hf(..., safe_serialization=True))")
        try:
            data_config = self.contract.timm_data_config()
        except ContractError as exc:
            raise CheckpointError(f"not saving a checkpoint timm users would silently misuse: {exc}") from exc
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CONFIG_NAME
            save_config_for_hf(self.net, str(path), data_config=data_config,
                               model_config={"label_names": self.class_names})
            config = json.loads(path.read_text())
        config.pop("model_args", None)  # timm's defaults; training-only arguments (dropout) are not part of it
        config.update(format=FORMAT, contract=self.contract.to_dict())
        return config

    # -- hub mixin hooks ------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        """Weights (timm names), config.json and metrics.json, each written atomically. The mixin then writes
        the card from :meth:`generate_model_card`; a stale one is removed first so it is always regenerated."""
        save_directory = Path(save_directory)
        config = self.config()
        state = {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        atomic_write_bytes(save_directory / WEIGHTS_NAME, save(state, metadata={"format": "pt"}))
        atomic_write_json(save_directory / CONFIG_NAME, config)
        if self.metrics is not None:
            atomic_write_json(save_directory / METRICS_NAME, self.metrics)
        (save_directory / CARD_NAME).unlink(missing_ok=True)

    def generate_model_card(self, *args, repo_id: str | None = None, **kwargs) -> ModelCard:
        """The project's card (not the mixin's template), for ``save_pretrained`` and ``push_to_hub`` alike."""
        return _AtomicCard(render_model_card(self.config(), self.metrics, repo_id))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "CifarTransferModel":
        """The mixin's ``from_pretrained`` (a folder or a Hub repo id), each failure one clear :class:`CheckpointError`.

        A local folder's files are checked first (:func:`read_config`: limits, JSON). A reference that can only be a
        path (``./x``, ``/x``, ``~/x``, ``a/b/c``...) and names no folder fails at once. A Hub repo id is asked of
        the Hub once, without the client's retries (about 30 s on a dead connection); unreachable, only the cache is
        used. When neither gives it, the error says so, and that there is no local folder of that name either."""
        ref = str(pretrained_model_name_or_path)
        local = os.path.expanduser(ref)
        if os.path.isdir(local):
            read_config(Path(local))
            return super().from_pretrained(local, *args, **kwargs)
        no_folder = f"no such local folder: {ref}" + (f" ({os.path.abspath(local)})" if os.path.abspath(local) != ref else "")
        if not could_be_repo_id(ref):
            raise CheckpointError(no_folder)
        why = None
        try:
            why = None if kwargs.get("local_files_only") else hub_unreachable(ref, kwargs.get("revision"), kwargs.get("token"))
            return super().from_pretrained(ref, *args, **{**kwargs, "local_files_only": why is not None or
                                                          kwargs.get("local_files_only", False)})
        except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as exc:
            reason = describe_hub_error(exc) if why is None else f"{why}, and {describe_hub_error(exc)}"
            raise CheckpointError(f"{no_folder}, and cannot load {ref} from the Hugging Face Hub or its cache: "
                                  f"{reason}") from None

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs):
        def fetch(name: str) -> str:
            if os.path.isdir(model_id):
                return os.path.join(model_id, name)
            return hf_hub_download(model_id, name, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                   local_files_only=local_files_only, token=token)

        if is_timm_config(model_kwargs):  # a plain timm checkpoint, not one of ours: bring your own classifier
            model_kwargs["format"] = None
        weights = fetch(WEIGHTS_NAME)
        with torch.device("meta"):  # the architecture's tensor shapes, none allocated: the weights file is checked first
            skeleton = _build(cls, model_kwargs)
        check_weights(weights, {k: tuple(v.shape) for k, v in skeleton.net.state_dict().items()}, skeleton.architecture,
                      strict)
        model = _build(cls, model_kwargs)
        try:
            model.net.load_state_dict(load_file(weights, device=str(map_location)), strict=strict)
        except (RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"{weights}: weights do not match the architecture in config.json: "
                                  f"{' '.join(str(exc).split())}") from exc
        model.metrics = _optional_metrics(fetch)
        return model.eval()


class _AtomicCard(ModelCard):
    """A model card whose ``save`` (called by the mixin) replaces the file atomically."""

    def save(self, filepath) -> None:
        atomic_write_text(Path(filepath), str(self))


def _build(cls, model_kwargs: dict[str, Any]) -> CifarTransferModel:
    """``cls(**model_kwargs)``; an architecture timm cannot build as config.json describes it is the checkpoint's fault."""
    try:
        return cls(**model_kwargs)
    except BackboneError as exc:
        raise CheckpointError(f"{CONFIG_NAME}: {exc}") from exc


def _optional_metrics(fetch) -> dict | None:
    """The checkpoint's metrics.json (checked: :func:`read_metrics`), ``None`` without one."""
    try:
        path = fetch(METRICS_NAME)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    return read_metrics(Path(path).parent)


# -- checkpoint folders -----------------------------------------------------------------


def load_checkpoint(folder: str | Path, map_location: str = "cpu") -> CifarTransferModel:
    """Load a local checkpoint folder, validating it first: one of ours, or any timm classifier's
    (``config.json`` in timm's format and ``model.safetensors``)."""
    read_config(Path(folder))
    return CifarTransferModel.from_pretrained(str(folder), map_location=map_location)


def save_checkpoint(model: CifarTransferModel, folder: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write weights, config, metrics and the model card (``save_pretrained``); every file atomically. A meter
    calibration in ``folder`` made for other weights is first moved aside (never left to be found beside these)."""
    folder = Path(folder)
    if metrics is not None:
        model.metrics = metrics
    set_aside_stale_calibration(model, folder)
    model.save_pretrained(folder)
    return folder
