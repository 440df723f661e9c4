"""How a frozen network, or a frozen prefix of one, is run: :func:`prefix_runner` (ONNX Runtime or PyTorch) and
:func:`class_probabilities`, the package's one test-time augmentation (an image and its :func:`mirror`, probabilities
averaged), used by evaluation and by the per-epoch score on cached features alike.
"""

from __future__ import annotations

import torch
from torch import nn

from .engine import TorchEngine, make_engine


def prefix_runner(prefix: nn.Module, input_size: int, engine: str = "auto"):
    """The frozen ``prefix`` as a function of preprocessed images: ONNX Runtime on a CPU (``engine.py``: exported
    once per weights and size, 3-7x eager PyTorch for EfficientNet-Lite0's prefix), the module itself (eval mode)
    elsewhere, without onnxruntime, when ``engine="pytorch"`` or when the prefix is empty (nothing frozen)."""
    prefix.eval()
    params = list(prefix.parameters())
    if params and params[0].device.type == "cpu" and engine != "pytorch":
        run = make_engine(prefix, [], input_size, prefer=engine)
        if not isinstance(run, TorchEngine):
            return lambda x: run(x)[0]
    return prefix


def mirror(x: torch.Tensor) -> torch.Tensor:
    """The horizontal mirror of ``(N, C, H, W)`` images or feature maps: the width axis, 3 (a vertical flip, axis 2,
    would turn photos upside down). Every flip of test-time augmentation and of cached feature maps is this one."""
    return x.flip(3)


def class_probabilities(net, x: torch.Tensor, tta_flip: bool = False) -> torch.Tensor:
    """Softmax of ``net(x)``; with ``tta_flip`` the mean with that of the :func:`mirror` image."""
    probs = net(x).float().softmax(1)
    if tta_flip:
        probs = (probs + net(mirror(x)).float().softmax(1)) / 2
    return probs
