"""Training CLI: a real short run, resume after Ctrl-C, DistributedDataParallel, evaluation CLI."""

import dataclasses
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

from cifar_transfer import batches as batches_mod
from cifar_transfer import finetune
from cifar_transfer import train as train_mod
from cifar_transfer import training
from cifar_transfer.evaluate import main as evaluate_main
from cifar_transfer.inference import prefix_runner
from tests import pins
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
    assert metrics["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
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

    real_lr_at = training.lr_at

    def interrupt_in_second_epoch(progress, *a):
        if progress >= 0.5:
            raise KeyboardInterrupt
        return real_lr_at(progress, *a)

    monkeypatch.setattr(training, "lr_at", interrupt_in_second_epoch)
    with pytest.raises(SystemExit) as exc:
        run_train([*args, "--output", tmp_path / "resumed"])
    assert exc.value.code == 130
    assert (tmp_path / "resumed" / "train_state.pt").is_file()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1

    monkeypatch.setattr(training, "lr_at", real_lr_at)
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
                  augment=True)
    with_torch = batches_mod.FeatureCache(prefix_runner(prefix, 64, "pytorch"), **common)
    with_onnx = batches_mod.FeatureCache(prefix_runner(prefix, 64, "auto"), **common)
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")), "auto did not use ONNX Runtime"
    for a, b in zip(with_torch.views, with_onnx.views):
        assert a.shape == b.shape and a.dtype == torch.float16
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=1e-2)  # fp16 storage of the same values


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero():
    lr_at = training.lr_at
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
    opt = training.make_optimizer(net, "sgd", lr=0.1, weight_decay=0.0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = net.weight.detach().clone()
    loss, logits, norm = training.train_step(net, x, y, opt, torch.nn.CrossEntropyLoss(), norm_of=list(net.parameters()))
    assert logits.shape == (8, 3) and norm > 0 and not torch.equal(net.weight, before)
    after = net.weight.detach().clone()
    loss, _, norm = training.train_step(net, x * float("inf"), y, opt, torch.nn.CrossEntropyLoss(),
                                         norm_of=list(net.parameters()))
    assert not (math.isfinite(loss.item()) and math.isfinite(norm))  # diverged: reported as such...
    assert torch.equal(net.weight, after)  # ...and the weights are left as they were


def test_flip_tta_averages_each_image_with_its_mirror(embedded_model, example_images):
    """The headline accuracy uses flip test-time augmentation: it must be the mean of the two views' probabilities."""
    from cifar_transfer.data import Split
    from cifar_transfer.evaluate import predict_probabilities
    from cifar_transfer.predictor import load_image

    model, _ = embedded_model
    images = torch.stack([load_image(p) for p in example_images])
    split = Split(images, torch.zeros(len(images), dtype=torch.long))
    plain = predict_probabilities(model, split, engine="pytorch")
    mirrored = predict_probabilities(model, Split(images.flip(3), split.labels), engine="pytorch")
    tta = predict_probabilities(model, split, engine="pytorch", tta_flip=True)
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the mirror is a different view, so TTA changes something


# -- the parts of a run (finetune.run: prepare_data, build_model, make_batches, fit/train_one_epoch) -------


class ListBatches:
    """A batch source over fixed batches (the interface of ImageBatches and CachedBatches)."""

    features = True

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch):
        yield from self.batches


def test_train_one_epoch_returns_the_mean_loss_and_steps_the_schedule_as_lr_at_says():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = training.make_optimizer(net, "sgd", lr=0.0, weight_decay=0.0)
    batches = ListBatches([(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(4)])
    seen_lr, losses, hits = [], [], []

    def forward(x):
        seen_lr.append([g["lr"] for g in opt.param_groups])
        return net(x)

    def loss_fn(logits, y):
        loss = torch.nn.functional.cross_entropy(logits, y)
        losses.append(loss.item())
        hits.append((logits.argmax(1) == y).sum().item())
        return loss

    schedule = training.Schedule(peak=0.1, warmup=0.25, total_steps=3 * len(batches))
    result = training.train_one_epoch(forward, batches, opt, loss_fn, 1, schedule)
    expected = [training.lr_at((1 * 4 + step) / 12, 0.1, 0.25) for step in range(4)]  # epoch 1 of 3
    assert seen_lr == [[lr, lr] for lr in expected]  # every parameter group, before each step
    assert result.loss == pytest.approx(sum(losses) / 4) and result.accuracy == sum(hits) / 20
    assert result.steps == 4 and not result.out_of_time


def test_train_one_epoch_stops_when_the_time_budget_is_spent_and_the_schedule_follows_the_clock():
    now = iter(range(100))
    clock = lambda: float(next(now))  # noqa: E731 - one second per reading
    schedule = training.Schedule(peak=0.1, warmup=0.0, total_steps=1000, budget_s=6.0, clock=clock, start_s=2.0)
    assert schedule.lr(0) == pytest.approx(training.lr_at((0 - 2) / 4, 0.1, 0.0))  # the clock read 0: not started
    assert schedule.lr(0) == pytest.approx(training.lr_at((1 - 2) / 4, 0.1, 0.0))
    assert schedule.lr(0) == pytest.approx(training.lr_at((2 - 2) / 4, 0.1, 0.0))
    assert schedule.lr(0) == pytest.approx(training.lr_at((3 - 2) / 4, 0.1, 0.0))  # a quarter of the budget
    net = torch.nn.Linear(4, 3)
    opt = training.make_optimizer(net, "sgd", lr=0.0, weight_decay=0.0)
    batches = ListBatches([(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(10)])
    # each step reads the clock twice (schedule, budget check): readings 4,5 then 6,7 -> the budget (6 s) is spent
    result = training.train_one_epoch(net, batches, opt, torch.nn.CrossEntropyLoss(), 0, schedule)
    assert result.out_of_time and result.steps == 2


def test_train_state_round_trips(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = training.make_optimizer(net, "sgd", lr=0.1, weight_decay=0.0)
    training.train_step(net, torch.randn(8, 4), torch.randint(0, 3, (8,)), opt, torch.nn.CrossEntropyLoss())
    state = finetune.TrainState(epoch=2, history=[{"epoch": 1}, {"epoch": 2}], elapsed=12.5)
    path = tmp_path / finetune.STATE_NAME
    finetune.save_train_state(path, state, net, opt, train_mod.TrainConfig())
    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["model", "optimizer", "epoch", "history", "elapsed", "config"]  # the file format

    other = torch.nn.Linear(4, 3)
    other_opt = training.make_optimizer(other, "sgd", lr=0.1, weight_decay=0.0)
    assert finetune.load_train_state(path, other, other_opt) == state
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    assert other_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()  # momentum buffers too
    with pytest.raises(SystemExit, match="--resume: no saved state"):
        finetune.load_train_state(tmp_path / "missing.pt", other, other_opt)


def test_cached_batches_shuffle_a_view_per_epoch_flip_feature_maps_and_repeat_per_epoch():
    n, b = 10, 4
    views = [torch.randn(n, 2, 3, 3).half() for _ in range(2)]
    cache = type("Cache", (), {"views": views, "labels": torch.arange(n)})()  # label i: sample i
    batches = batches_mod.CachedBatches(cache, torch.device("cpu"), b, seed=3)
    assert len(batches) == n // b
    for epoch in range(3):
        got = list(batches.epoch(epoch))
        assert len(got) == len(batches) and all(len(x) == len(y) == b for x, y in got)
        labels = torch.cat([y for _, y in got])
        assert len(set(labels.tolist())) == len(labels)  # no sample twice in an epoch
        for x, y in got:
            assert x.dtype == torch.float32
            for row, i in zip(x, y):
                feature = views[epoch % 2][i].float()  # epoch e uses view e mod 2 ...
                assert torch.equal(row, feature) or torch.equal(row, feature.flip(2))  # ... maybe mirrored
        again = list(batches.epoch(epoch))  # a resumed run sees the same batches
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(got, again))
    flips = [torch.equal(row, views[0][i].float().flip(2)) for x, y in batches.epoch(0) for row, i in zip(x, y)]
    assert any(flips) and not all(flips)


def test_cached_and_image_batches_serve_the_same_run(tiny_data, tmp_path, monkeypatch):
    """Either source: the same steps per epoch, every training image once an epoch, logits of the same shape
    from the step's forward, and the same per-epoch score (cached features vs the whole model on images)."""
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    quiet = lambda *a, **k: None  # noqa: E731
    cfg = train_mod.TrainConfig(backbone="efficientnet_lite0", input_size=32, freeze_stages=3, batch_size=8,
                                data_dir=str(tiny_data), progress=False, eval_batch_size=16).resolved()
    data = finetune.prepare_data(cfg, say=quiet)
    assert data.eval_name == "test" and len(data.dataset.train) == 24
    net = finetune.build_model(cfg, data.dataset.classes, None, torch.device("cpu"), finetune.Dist(), say=quiet)
    assert len(net.prefix) == 3 and not any(p.requires_grad for p in net.prefix.parameters())
    images = finetune.make_batches(cfg, data, net, finetune.Dist(), say=quiet)
    cached = finetune.make_batches(dataclasses.replace(cfg, cache_features=True, cache_views=2), data, net,
                                    finetune.Dist(), say=quiet)
    assert isinstance(images, batches_mod.ImageBatches) and isinstance(cached, batches_mod.CachedBatches)
    assert len(images) == len(cached) == 3
    for source, forward in ((images, net.forward), (cached, net.body)):
        assert source.features == (source is cached)  # fit runs net.body on features, net.forward on images
        got = list(source.epoch(1))
        assert len(got) == 3
        assert sorted(torch.cat([y for _, y in got]).tolist()) == sorted(data.dataset.train.labels.tolist())
        with torch.no_grad():
            assert forward(got[0][0]).shape == (8, 3)
    assert cached.eval_accuracy(net, 16, False) == pytest.approx(images.eval_accuracy(net, 16, False), abs=1e-6)


# -- the engine gives the numbers the separate loops gave (tests/pins.py wrote them) ---------------------------


@pytest.mark.parametrize("name", list(pins.TRAIN_RUNS))
def test_a_tiny_run_gives_the_pinned_numbers(name, tmp_path):
    """Images, and cached features with flip TTA: history, accuracy and weights as before the engine was shared
    (a learning rate x0.5 in the loop, or the cached TTA flipping another axis, moves them)."""
    got, want = pins.run_train(tmp_path, name), pins.pinned()["train"][name]
    sha = got.pop("weights_sha256"), want.pop("weights_sha256")
    pins.assert_matches(got, want, name)
    if pins.pinned()["platform"] == pins.platform_id():
        assert sha[0] == sha[1], "same platform, same weights bit for bit"


def test_the_pins_file_is_chosen_by_cpu_name_and_instruction_set():
    """Two chips both called "AMD EPYC" run different float kernels (AVX2, AVX-512); each reads its own file, a chip
    whose instruction set no file was written on reads none (and pins_file() says how to write one)."""
    assert pins.pins_path("AMD EPYC 7B13", "AVX2").name == "pins-amd-epyc.json"
    assert pins.pins_path("AMD EPYC 9B14", "AVX512").name == "pins-amd-epyc-avx512.json"
    assert pins.pins_path("AMD EPYC 9B14", "DEFAULT") is None
    assert pins.pins_path("Intel(R) Xeon(R) Processor", "AVX512") == pins.PINS
    assert pins.pins_path("Apple M2", "DEFAULT") is None
    assert all(path.exists() for path in pins.PINS_BY_CPU.values())


def test_cached_feature_tta_averages_each_feature_map_with_its_horizontal_mirror():
    """The per-epoch score on cached features with --tta-flip: the mirror is the width axis of (N, C, H, W)
    feature maps, as for images; the labels here are what that TTA predicts, which a flip of the height axis
    (or none) gets wrong for some samples."""
    torch.manual_seed(0)
    feats = torch.randn(64, 2, 3, 3)
    trainable = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(18, 4))

    def tta_labels(axis):
        with torch.no_grad():
            return (trainable(feats).softmax(1) + trainable(feats.flip(axis)).softmax(1)).argmax(1)

    labels = tta_labels(3)
    assert not torch.equal(labels, tta_labels(2)) and not torch.equal(labels, trainable(feats).argmax(1))
    cache = type("Cache", (), {"views": [feats], "labels": labels})()  # a FeatureCache's fields
    batches = batches_mod.CachedBatches(cache, torch.device("cpu"), 8, seed=0, evaluation=cache)
    net = type("Net", (), {"trainable": trainable})()
    assert batches.eval_accuracy(net, 16, tta_flip=True) == 1.0
    assert batches.eval_accuracy(net, 16, tta_flip=False) < 1.0


def test_split_frozen_cuts_where_asked_and_the_head_always_trains():
    """The one frozen/trainable cut of train, the study and the experiment: -1 freezes every stage but the last."""
    model = torch.nn.Module()
    model.stages = torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(4)))
    for freeze, frozen in ((-1, 3), (0, 0), (2, 2), (9, 3)):
        for p in model.parameters():
            p.requires_grad_(True)
        cut = training.split_frozen(model, freeze)
        assert len(cut.prefix) == frozen and len(cut.trainable) == 4 - frozen, freeze
        assert not any(p.requires_grad for p in cut.prefix.parameters()) and not cut.prefix.training
        assert all(p.requires_grad for p in cut.trainable.parameters())
