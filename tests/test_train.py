"""Training CLI: a real short run, resume after Ctrl-C, DistributedDataParallel, evaluation CLI."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifar_transfer import train as train_mod
from cifar_transfer.evaluate import main as evaluate_main
from tests.helpers import make_folder_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "efficientnet_lite0", "--input-size", "32", "--batch-size", "8", "--freeze-stages", "3",
        "--no-progress", "--eval-batch-size", "16"]


@pytest.fixture
def tiny_data(tmp_path):
    return make_folder_dataset(tmp_path / "data", classes=("cat", "dog", "ship"), n_train=8, n_test=4)


def run_train(argv):
    train_mod.main([str(a) for a in argv])


def test_every_flag_has_help_text():
    for action in train_mod.get_args_parser()._actions:
        assert action.help, action.option_strings


def test_short_training_on_shared_cifar10_subset_learns(shared_data, tmp_path):
    out = tmp_path / "ck"
    run_train(["--backbone", "efficientnet_lite0", "--data-dir", shared_data, "--classes", "cat", "ship", "frog",
               "--max-per-class", "100", "--max-test-per-class", "50", "--input-size", "64", "--freeze-stages", "4",
               "--epochs", "3", "--batch-size", "32", "--lr", "0.05", "--no-progress", "--output", out])
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert metrics["accuracy"]["correct"] > 0.5  # chance is 1/3
    assert metrics["test_size"] == 150 and metrics["dataset"] == "CIFAR-10 (JPEG copy)"
    assert set(metrics["accuracy"]) == {"correct", "no_normalization", "raw_0_255", "other_model_stats",
                                        "cifar10_stats", "bgr", "normalized_twice"}
    assert metrics["command"].startswith("python -m cifar_transfer.train --backbone efficientnet_lite0")
    assert metrics["environment"]["torch"] == torch.__version__
    assert metrics["train_config"]["epochs"] == 3

    # the evaluation CLI reproduces the accuracy written at the end of training
    metrics_before = (out / "metrics.json").read_text()
    evaluate_main([str(out), "--data-dir", str(shared_data), "--classes", "cat", "ship", "frog",
                   "--max-test-per-class", "50", "--write"])
    after = json.loads((out / "metrics.json").read_text())
    assert after["accuracy"] == pytest.approx(json.loads(metrics_before)["accuracy"], abs=1e-6)


def test_cached_features_train_and_match_full_model_evaluation(tiny_data, tmp_path):
    out = tmp_path / "ck"
    run_train([*TINY, "--data-dir", tiny_data, "--epochs", "2", "--cache-features", "--cache-views", "2", "--output", out])
    metrics = json.loads((out / "metrics.json").read_text())
    # the last epoch's accuracy on cached features equals the full model's accuracy on raw pixels
    assert metrics["history"][-1]["test_acc"] == pytest.approx(metrics["accuracy"]["correct"], abs=1e-6)


def test_interrupted_run_resumes_to_the_same_weights(tiny_data, tmp_path, monkeypatch):
    args = [*TINY, "--data-dir", tiny_data, "--epochs", "2", "--no-variants"]
    run_train([*args, "--output", tmp_path / "straight"])

    real_lr_at = train_mod.lr_at

    def interrupt_in_second_epoch(progress, *a):
        if progress >= 0.5:
            raise KeyboardInterrupt
        return real_lr_at(progress, *a)

    monkeypatch.setattr(train_mod, "lr_at", interrupt_in_second_epoch)
    with pytest.raises(SystemExit) as exc:
        run_train([*args, "--output", tmp_path / "resumed"])
    assert exc.value.code == 130
    assert (tmp_path / "resumed" / "train_state.pt").is_file()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1

    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    run_train([*args, "--output", tmp_path / "resumed", "--resume"])
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights(tiny_data, tmp_path):
    args = [*TINY, "--data-dir", tiny_data, "--epochs", "1", "--no-variants"]
    run_train([*args, "--output", tmp_path / "a"])
    run_train([*args, "--output", tmp_path / "b"])
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_ddp_ends_with_identical_weights_on_both_ranks(tiny_data, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "cifar_transfer.train", *TINY,
         "--data-dir", str(tiny_data), "--epochs", "2", "--no-variants", "--device", "cpu", "--output", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    dist = metrics["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    assert len(dist["rank_weight_digests"]) == 2
    assert dist["rank_weight_digests"][0] == dist["rank_weight_digests"][1]
    # each rank saw half of the 24 training images per epoch: global batch 8 = 2 x 4, 3 steps per epoch
    assert metrics["history"][0]["steps"] == 3
    assert proc.stdout.count("checkpoint written") == 1  # rank 0 only


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match="data folder not found"):
        run_train([*TINY, "--data-dir", tmp_path / "missing", "--output", tmp_path / "ck"])


def test_cache_features_without_frozen_stages_is_refused(tiny_data, tmp_path):
    with pytest.raises(SystemExit, match="--cache-features needs --freeze-stages"):
        run_train([*TINY, "--data-dir", tiny_data, "--freeze-stages", "0", "--cache-features", "--output", tmp_path / "ck"])


def test_evaluate_refuses_a_broken_checkpoint(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text("{")
    with pytest.raises(SystemExit, match="not valid JSON"):
        evaluate_main([str(tmp_path / "ck"), "--data-dir", str(tmp_path)])


def test_missing_imagenet_weights_fail_before_the_data_is_read(tiny_data, tmp_path, monkeypatch):
    """A ResNet without its weights (offline, no --backbone-weights) stops at once, not after decoding the data."""
    from cifar_transfer import data

    def offline(*args, **kwargs):
        raise OSError("no network")

    import torchvision

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("the data was read before the weights check"))
    with pytest.raises(SystemExit, match="(?s)cannot download the ImageNet weights for resnet18.*--backbone-weights"):
        run_train(["--backbone", "resnet18", "--data-dir", tiny_data, "--output", tmp_path / "ck", "--no-progress"])
    with pytest.raises(SystemExit, match="weights file not found|no such file|does not exist"):
        run_train(["--backbone", "resnet18", "--backbone-weights", tmp_path / "resnet18-f37072fd.pth",
                   "--data-dir", tiny_data, "--output", tmp_path / "ck", "--no-progress"])


def test_unwritable_output_folder_fails_before_the_data_is_read(tiny_data, tmp_path, monkeypatch):
    from cifar_transfer import data

    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: pytest.fail("the data was read before the output check"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write the checkpoint to"):
        run_train([*TINY, "--data-dir", tiny_data, "--output", blocker / "ck"])


def test_evaluate_scores_as_the_checkpoint_was_trained(tiny_data, tmp_path, capsys):
    """A checkpoint trained on the first 2 test images per class is evaluated on those unless told otherwise."""
    ck = tmp_path / "ck"
    run_train([*TINY, "--data-dir", tiny_data, "--output", ck, "--epochs", "1", "--max-test-per-class", "2", "--no-variants"])
    capsys.readouterr()
    evaluate_main([str(ck), "--data-dir", str(tiny_data), "--variants"])
    out = capsys.readouterr().out
    assert ", 6 test images," in out and "as the checkpoint was evaluated" in out
    evaluate_main([str(ck), "--data-dir", str(tiny_data), "--variants", "--max-test-per-class", "0"])
    assert ", 12 test images," in capsys.readouterr().out


def test_feature_cache_is_the_same_through_onnx_runtime(tiny_data, tmp_path, monkeypatch):
    """The recipe caches the frozen prefix's features with ONNX Runtime on a CPU: the same features as PyTorch."""
    from cifar_transfer import data
    from cifar_transfer.model import CifarTransferModel

    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    ds = data.load_dataset(str(tiny_data), image_size=32)
    model = CifarTransferModel.from_backbone("efficientnet_lite0", class_names=ds.classes, input_size=64).eval()
    prefix = torch.nn.Sequential(*list(model.stages)[:3]).eval()
    common = dict(split=ds.train, preprocess=model.preprocess, device=torch.device("cpu"), views=2, seed=0, batch_size=8,
                  channels_last=False, progress=False, augment=True, input_size=64)
    with_torch = train_mod.FeatureCache(prefix, engine="pytorch", **common)
    with_onnx = train_mod.FeatureCache(prefix, engine="auto", **common)
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")), "auto did not use ONNX Runtime"
    for a, b in zip(with_torch.views, with_onnx.views):
        assert a.shape == b.shape and a.dtype == torch.float16
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=1e-2)  # fp16 storage of the same values


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    lr_at = train_mod.lr_at
    assert lr_at(0.0, 0.05, 0.1) == 0.0
    assert lr_at(0.05, 0.05, 0.1) == pytest.approx(0.025)  # half-way through the warm-up
    assert lr_at(0.1, 0.05, 0.1) == pytest.approx(0.05)  # the peak, where the warm-up ends
    assert lr_at(0.55, 0.05, 0.1) == pytest.approx(0.025)  # half-way through the cosine
    assert lr_at(1.0, 0.05, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0.3, 0.05, 0.0) == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 0.3)))
    assert lr_at(1.7, 0.05, 0.1) == pytest.approx(0.0, abs=1e-12) and lr_at(-1, 0.05, 0.1) == 0.0  # clamped


def test_train_step_steps_on_finite_loss_and_skips_a_diverged_one():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = train_mod.make_optimizer(net, "sgd", lr=0.1, weight_decay=0.0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = net.weight.detach().clone()
    loss, logits, norm = train_mod.train_step(net, x, y, opt, torch.nn.CrossEntropyLoss(), norm_of=list(net.parameters()))
    assert logits.shape == (8, 3) and norm > 0 and not torch.equal(net.weight, before)
    after = net.weight.detach().clone()
    loss, _, norm = train_mod.train_step(net, x * float("inf"), y, opt, torch.nn.CrossEntropyLoss(),
                                         norm_of=list(net.parameters()))
    assert not (math.isfinite(loss.item()) and math.isfinite(norm))  # diverged: reported as such...
    assert torch.equal(net.weight, after)  # ...and the weights are left as they were


def test_flip_tta_averages_each_image_with_its_mirror(embedded_model, example_images):
    """The headline accuracy uses flip test-time augmentation: it must be the mean of the two views' probabilities."""
    from cifar_transfer.data import Split
    from cifar_transfer.evaluate import predict_logits
    from cifar_transfer.predictor import load_image

    model, _ = embedded_model
    images = torch.stack([load_image(p) for p in example_images])
    split = Split(images, torch.zeros(len(images), dtype=torch.long))
    plain = predict_logits(model, split, engine="pytorch")
    mirrored = predict_logits(model, Split(images.flip(3), split.labels), engine="pytorch")
    tta = predict_logits(model, split, engine="pytorch", tta_flip=True)
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the mirror is a different view, so TTA changes something
