"""ONNX Runtime engine: same logits and meter statistics as PyTorch, a cache that is never trusted blindly,
and PyTorch when onnxruntime is missing or the export fails (issue 14)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from cifar_transfer.contract import CORRECT_KEY, WRONG_VARIANTS, variant_contracts
from cifar_transfer.engine import OnnxEngine, TorchEngine, make_engine
from cifar_transfer.predictor import load_image

LOGIT_ATOL = 1e-4  # measured: ~3e-6 on the shipped checkpoint
STATS_RTOL = 1e-3  # relative to each statistic's magnitude (raw 0-255 inputs give variances in the thousands)


def bn_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return net.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs() <= STATS_RTOL * (b.abs() + 1)).all())


def variant_batch(model, example_images) -> torch.Tensor:
    pixels = load_image(example_images[0])[None].float()
    contracts = variant_contracts(model.contract, list(WRONG_VARIANTS))
    base = contracts[CORRECT_KEY].transform().resize(pixels)
    return torch.cat([contracts[k].transform()(base) for k in [CORRECT_KEY, *WRONG_VARIANTS]])


@pytest.fixture(scope="module")
def shipped(embedded_model, tmp_path_factory):
    model, _ = embedded_model
    layers = bn_layers(model)
    folder = tmp_path_factory.mktemp("onnx")
    return model, layers, OnnxEngine(model, layers, model.contract.input_size, folder=folder)


@pytest.mark.parametrize("size", [1, 7])
def test_shipped_checkpoint_every_variant_matches_pytorch(shipped, example_images, size):
    model, layers, onnx = shipped
    batch = variant_batch(model, example_images)[:size]
    expected_logits, expected_stats = TorchEngine(model, layers)(batch)
    logits, stats = onnx(batch)
    assert logits.shape == expected_logits.shape == (size, len(model.class_names))
    assert (logits - expected_logits).abs().max() <= LOGIT_ATOL
    assert stats.shape == expected_stats.shape and stats.shape[1] == 2
    assert close(stats, expected_stats)
    assert (logits.argmax(1) == expected_logits.argmax(1)).all()


@pytest.mark.parametrize("size", [1, 7])
def test_fresh_model_matches_pytorch(tmp_path, size):
    net = tiny_model()
    x = torch.randn(size, 3, 32, 32) * 3 + 1
    engine = OnnxEngine(net, bn_layers(net), 32, folder=tmp_path)
    logits, stats = engine(x)
    expected_logits, expected_stats = TorchEngine(net, bn_layers(net))(x)
    assert (logits - expected_logits).abs().max() <= LOGIT_ATOL
    assert stats.shape == (size, 2, 16) and close(stats, expected_stats)
    # the statistics are the probed layers' inputs: the first batch norm sees the first convolution's output
    with torch.no_grad():
        first = net[0](x)
    assert torch.allclose(stats[:, 0, :8], first.mean(dim=(2, 3)), atol=1e-4)
    assert torch.allclose(stats[:, 1, :8], first.var(dim=(2, 3), unbiased=False), atol=1e-3)


def test_export_is_cached_and_keyed_by_the_weights(tmp_path):
    net = tiny_model()
    first = OnnxEngine(net, bn_layers(net), 32, folder=tmp_path)
    stamp = first.path.stat().st_mtime_ns
    again = OnnxEngine(net, bn_layers(net), 32, folder=tmp_path)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp and not again.rebuilt
    with torch.no_grad():
        net[-1].bias += 1.0
    changed = OnnxEngine(net, bn_layers(net), 32, folder=tmp_path)
    assert changed.path != first.path
    assert OnnxEngine(net, bn_layers(net), 64, folder=tmp_path).path not in (first.path, changed.path)
    assert OnnxEngine(net, bn_layers(net)[:1], 32, folder=tmp_path).path not in (first.path, changed.path)


@pytest.mark.parametrize("damage", ["garbage", "another model"])
def test_a_broken_or_stale_cache_file_is_rebuilt_not_trusted(tmp_path, damage):
    net = tiny_model()
    engine = OnnxEngine(net, bn_layers(net), 32, folder=tmp_path)
    if damage == "garbage":
        engine.path.write_bytes(b"not an onnx file")
    else:  # a valid export of other weights under this key
        other = tiny_model()
        with torch.no_grad():
            other[0].weight.mul_(-1)
        engine.path.write_bytes(OnnxEngine(other, bn_layers(other), 32, folder=tmp_path / "other").path.read_bytes())
    again = OnnxEngine(net, bn_layers(net), 32, folder=tmp_path)
    assert again.rebuilt
    x = torch.randn(3, 3, 32, 32)
    assert (again(x)[0] - TorchEngine(net, bn_layers(net))(x)[0]).abs().max() <= LOGIT_ATOL


def test_without_onnxruntime_pytorch_runs_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    monkeypatch.setattr("cifar_transfer.engine._warned", set())
    net = tiny_model()
    with caplog.at_level(logging.WARNING, logger="cifar_transfer.engine"):
        engines = [make_engine(net, bn_layers(net), 32, folder=tmp_path) for _ in range(2)]
    assert all(isinstance(e, TorchEngine) for e in engines)
    assert sum("onnxruntime is not installed" in r.getMessage() for r in caplog.records) == 1


def test_a_failed_export_falls_back_to_pytorch(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("cifar_transfer.engine._warned", set())

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter says no")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    net = tiny_model()
    with caplog.at_level(logging.WARNING, logger="cifar_transfer.engine"):
        engine = make_engine(net, bn_layers(net), 32, folder=tmp_path)
    assert isinstance(engine, TorchEngine)
    assert any("exporter says no" in r.getMessage() for r in caplog.records)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.tmp-*"))


def test_auto_prefers_onnxruntime_on_cpu_and_pytorch_when_asked(tmp_path):
    net = tiny_model()
    assert isinstance(make_engine(net, bn_layers(net), 32, folder=tmp_path), OnnxEngine)
    assert isinstance(make_engine(net, bn_layers(net), 32, prefer="pytorch", folder=tmp_path), TorchEngine)


def test_evaluation_gives_the_same_accuracies_with_either_engine(embedded_model, example_images, tmp_path, monkeypatch):
    """evaluate's default engine on a CPU is ONNX Runtime: the scores must not depend on it."""
    from cifar_transfer.data import Split
    from cifar_transfer.evaluate import evaluate_variants

    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    model, _ = embedded_model
    images = torch.stack([load_image(p) for p in example_images])
    labels = torch.tensor([model.class_names.index(p.name.split("_")[0]) for p in example_images])
    split = Split(images, labels)
    torch_acc = evaluate_variants(model, split, engine="pytorch", tta_flip=True)
    onnx_acc = evaluate_variants(model, split, engine="auto", tta_flip=True)
    assert onnx_acc == torch_acc and set(onnx_acc) == {CORRECT_KEY, *WRONG_VARIANTS}
    assert torch_acc[CORRECT_KEY] >= 0.75  # the examples are test images the model gets right
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")), "auto did not use ONNX Runtime on the CPU"


def test_intra_op_threads_do_not_spin_unless_asked(tmp_path, monkeypatch):
    """Spin-waiting threads take the cores the app's server needs: off by default, CIFAR_TRANSFER_ORT_SPIN=1 on."""
    net = tiny_model()

    def spinning(engine: OnnxEngine) -> str:
        return engine.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    monkeypatch.delenv("CIFAR_TRANSFER_ORT_SPIN", raising=False)
    assert spinning(OnnxEngine(net, [], 32, folder=tmp_path)) == "0"
    monkeypatch.setenv("CIFAR_TRANSFER_ORT_SPIN", "1")
    assert spinning(OnnxEngine(net, [], 32, folder=tmp_path)) == "1"
    assert spinning(OnnxEngine(net, [], 32, folder=tmp_path, spin=False)) == "0"
