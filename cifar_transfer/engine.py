"""Inference engines: one forward pass gives the logits and the statistics the contract meter reads.

On a CPU, eager PyTorch spends most of EfficientNet-Lite0's time in depthwise convolutions, where
ONNX Runtime is several times faster (``benchmarks/engine_speed.py``). :func:`make_engine` returns

* :class:`OnnxEngine` on a CPU when ``onnxruntime`` is installed: the network, with the probed layers'
  input statistics as extra graph outputs, exported once per checkpoint and cached, keyed by a hash of
  the weights, the input size, the probed layers and the library versions. A cached file whose key or
  parity check fails is rebuilt, never trusted.
* :class:`TorchEngine` otherwise (CUDA, MPS, no onnxruntime, a failed export), which says why once.

Both take an already-normalized ``(N, 3, S, S)`` float batch and return ``(logits, stats)`` where
``stats[i, 0]`` and ``stats[i, 1]`` are image ``i``'s per-channel mean and (biased) variance of each
probed layer's input, concatenated over the layers in the order given.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# ONNX Runtime's intra-op threads spin-wait for work by default. On 2 shared cores a spinning thread takes the
# time the server's other threads (Gradio, the next request's decoding) need: under the app's load test, spinning
# off halved the server's CPU per request (docs/speed.md, "Where a request's server CPU goes"). CIFAR_TRANSFER_ORT_SPIN=1
# turns it back on.
SPIN_ENV = "CIFAR_TRANSFER_ORT_SPIN"
PARITY_ATOL = 1e-3  # logits; ONNX Runtime and PyTorch differ by ~3e-6 on the shipped checkpoint
OPSET = 17
_warned: set[str] = set()


def cache_dir() -> Path:
    """``$CIFAR_TRANSFER_CACHE`` or ``~/.cache/cifar_transfer``: exports live under ``onnx/`` there."""
    root = os.environ.get("CIFAR_TRANSFER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifar_transfer"
    return Path(root) / "onnx"


def _say_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


class _Probed(nn.Module):
    """The network, returning its logits and the probed layers' per-image input statistics."""

    def __init__(self, net: nn.Module, layers: list[str]):
        super().__init__()
        modules = dict(net.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"no such layer(s) in the model: {', '.join(missing)}")
        self.net, self.layers = net, [modules[name] for name in layers]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stats: list[torch.Tensor] = []

        def hook(_module, args):
            a = args[0].float()
            stats.append(torch.stack([a.mean(dim=(2, 3)), a.var(dim=(2, 3), unbiased=False)], dim=1))

        handles = [m.register_forward_pre_hook(hook) for m in self.layers]
        try:
            logits = self.net(x)
        finally:
            for h in handles:
                h.remove()
        empty = x.new_zeros(x.shape[0], 2, 0)
        return logits.float(), torch.cat(stats, dim=2) if stats else empty


class TorchEngine:
    """Eager PyTorch (any device); channels-last on a CPU."""

    name = "pytorch"

    def __init__(self, model: nn.Module, layers: list[str]):
        self.model = model.eval()
        self.probed = _Probed(model, layers)
        self.device = next(model.parameters()).device
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch.to(self.device, torch.float32)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return self.probed(batch)


class OnnxEngine:
    """ONNX Runtime on the CPU, the export cached and checked against PyTorch before use."""

    name = "onnxruntime"

    def __init__(self, model: nn.Module, layers: list[str], input_size: int, threads: int | None = None,
                 folder: Path | None = None, spin: bool | None = None):
        self.model, self.layers, self.input_size = model.eval(), list(layers), int(input_size)
        self.spin = os.environ.get(SPIN_ENV, "0") == "1" if spin is None else bool(spin)
        self.path = Path(folder or cache_dir()) / f"{self.key()}.onnx"
        self.threads = threads or torch.get_num_threads()
        self.rebuilt = False
        if self.path.is_file():
            try:
                self._open()
                return
            except Exception as exc:  # noqa: BLE001 - unreadable, truncated or wrong: never trusted
                log.warning("rebuilding the cached ONNX export %s (%s)", self.path.name, type(exc).__name__)
                self.path.unlink(missing_ok=True)
                self.rebuilt = True
        self._export()
        self._open()

    def _open(self) -> None:
        import onnxruntime as ort  # optional (the onnx extra): imported where used, so an install without it runs PyTorch

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self._check_parity()
        self._lock = threading.Lock()

    def key(self) -> str:
        """Hash of everything the export depends on: weights and buffers, input size, probed layers, versions."""
        import onnxruntime as ort  # optional (the onnx extra): imported where used, so an install without it runs PyTorch

        h = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        h.update(json.dumps([self.input_size, self.layers, torch.__version__, ort.__version__, OPSET]).encode())
        return h.hexdigest()[:24]

    def _export(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        # a copy: the export must not change the memory format of a model PyTorch still runs
        probed = _Probed(copy.deepcopy(self.model).to(memory_format=torch.contiguous_format), self.layers).eval()
        example = torch.zeros(2, 3, self.input_size, self.input_size)
        try:
            with torch.no_grad():
                torch.onnx.export(probed, (example,), str(tmp), input_names=["x"], output_names=["logits", "stats"],
                                  dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}, "stats": {0: "n"}},
                                  opset_version=OPSET, dynamo=False)
            os.replace(tmp, self.path)  # atomic: a reader never sees half a file
        finally:
            tmp.unlink(missing_ok=True)
        log.info("exported the model to ONNX: %s", self.path)

    def _check_parity(self) -> None:
        """Run a fixed input through both; a mismatch means a stale or broken export."""
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(2, 3, self.input_size, self.input_size, generator=g)
        with torch.inference_mode():
            expected = _Probed(self.model, self.layers)(probe)[0]
        got = torch.from_numpy(self.session.run(["logits"], {"x": probe.numpy()})[0])
        if got.shape == expected.shape and torch.allclose(got, expected, atol=PARITY_ATOL, rtol=0):
            return
        raise RuntimeError(f"the ONNX export {self.path.name} does not reproduce the PyTorch model's logits")

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        with self._lock:  # one run at a time: on a small CPU that is also the fastest
            logits, stats = self.session.run(["logits", "stats"], {"x": x})
        return torch.from_numpy(logits), torch.from_numpy(stats)


def make_engine(model: nn.Module, layers: list[str], input_size: int, prefer: str = "auto",
                threads: int | None = None, folder: Path | None = None):
    """``prefer``: ``"auto"`` (ONNX Runtime on a CPU, else PyTorch), ``"onnxruntime"`` or ``"pytorch"``."""
    device = next(model.parameters()).device
    if prefer == "pytorch" or (prefer == "auto" and device.type != "cpu"):
        return TorchEngine(model, layers)
    try:
        import onnxruntime  # noqa: F401 - optional (the onnx extra): is it installed?
    except ImportError:
        _say_once("onnxruntime is not installed: running inference with PyTorch (pip install onnxruntime is faster on a CPU)")
        return TorchEngine(model, layers)
    try:
        return OnnxEngine(model, layers, input_size, threads=threads, folder=folder)
    except Exception as exc:  # noqa: BLE001 - any export or runtime failure: PyTorch still answers
        _say_once(f"ONNX Runtime could not be used ({type(exc).__name__}: {str(exc)[:200]}); running inference with PyTorch")
        return TorchEngine(model, layers)
