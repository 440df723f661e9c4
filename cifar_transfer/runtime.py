"""Device choice and a description of the machine, for metrics.json."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU. Anything else is passed to ``torch.device``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(device: torch.device | None = None) -> dict:
    import torchvision  # ~1.3 s to import; only the record of a run asks its version

    info = {
        "device": str(device) if device is not None else "cpu",
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        # the vector instructions torch's CPU kernels dispatch to ("AVX2", "AVX512", ...): one CPU name has come
        # with either, and each gives its own float rounding (tests/pins.py)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device is not None and device.type == "cuda" else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cifar_transfer": __version__,
    }
    return info
