"""Nothing lost (issue 21): no default writes into checkpoints/ or results/, an existing checkpoint is replaced only
with --overwrite, and a meter calibration never stays beside weights it was not made for."""

from __future__ import annotations

import hashlib
import importlib.util
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_transfer import data as data_mod
from cifar_transfer import meter, meter_fit
from cifar_transfer import train as train_mod
from cifar_transfer.backbones import BACKBONES
from cifar_transfer.checkpoint import CALIBRATION_NAME
from cifar_transfer.model import load_checkpoint, save_checkpoint
from tests.helpers import make_folder_dataset

from .conftest import REPO

SHIPPED = REPO / "checkpoints" / "efficientnet_lite0-cifar10"
TINY = ["--backbone", "efficientnet_lite0", "--input-size", "32", "--batch-size", "8", "--freeze-stages", "3",
        "--no-progress", "--eval-batch-size", "16", "--epochs", "1", "--no-variants"]


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def tiny_data(tmp_path):
    return make_folder_dataset(tmp_path / "data", classes=("cat", "dog", "ship"), n_train=8, n_test=4)


@pytest.fixture
def shipped_copy(tmp_path) -> Path:
    """A checkout-like folder whose checkpoints/efficientnet_lite0-cifar10 is a copy of the shipped one."""
    work = tmp_path / "work"
    shutil.copytree(SHIPPED, work / "checkpoints" / SHIPPED.name)
    return work


def train(argv) -> None:
    train_mod.main([str(a) for a in argv])


def test_train_without_output_writes_under_runs_and_leaves_the_shipped_checkpoint_byte_identical(
        tiny_data, shipped_copy, monkeypatch):
    before = hashes(shipped_copy / "checkpoints")
    assert {"model.safetensors", "config.json", "metrics.json", "README.md", CALIBRATION_NAME} <= {
        Path(k).name for k in before}
    monkeypatch.chdir(shipped_copy)
    train([*TINY, "--data-dir", tiny_data, "--max-per-class", "8"])  # the command, tiny
    assert hashes(shipped_copy / "checkpoints") == before
    out = shipped_copy / "runs" / "efficientnet_lite0-cifar10"
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_an_existing_checkpoint_is_refused_before_any_work_and_replaced_with_overwrite(
        tiny_data, shipped_copy, monkeypatch, capsys):
    folder = shipped_copy / "checkpoints" / SHIPPED.name
    before = hashes(folder)
    calibration = (folder / CALIBRATION_NAME).read_bytes()
    real_load = data_mod.load_dataset
    monkeypatch.setattr(data_mod, "load_dataset", lambda *a, **k: pytest.fail("the data was read before the refusal"))
    with pytest.raises(SystemExit) as exc:
        train([*TINY, "--data-dir", tiny_data, "--output", folder])
    message = str(exc.value.code)
    assert "\n" not in message and str(folder) in message and "--overwrite" in message and "--output" in message
    with pytest.raises(SystemExit, match="--resume: no saved state"):  # no run of its own to continue
        train([*TINY, "--data-dir", tiny_data, "--output", folder, "--resume"])
    assert hashes(folder) == before

    monkeypatch.setattr(data_mod, "load_dataset", real_load)
    capsys.readouterr()
    train([*TINY, "--data-dir", tiny_data, "--output", folder, "--overwrite"])
    after = hashes(folder)
    assert after["model.safetensors"] != before["model.safetensors"]
    # the calibration of the old weights was moved aside, whole, and said so in one line
    assert not (folder / CALIBRATION_NAME).exists()
    stale = list(folder.glob("meter_calibration.stale-*.json"))
    assert len(stale) == 1 and stale[0].read_bytes() == calibration
    said = [line for line in capsys.readouterr().out.splitlines() if "aside" in line]
    assert len(said) == 1 and stale[0].name in said[0]

    # a run into its own folder: --resume continues it; a fresh run is refused again
    train([*TINY, "--data-dir", tiny_data, "--output", folder, "--resume"])
    with pytest.raises(SystemExit, match="--overwrite"):
        train([*TINY, "--data-dir", tiny_data, "--output", folder])


def test_save_checkpoint_keeps_a_fitting_calibration_and_sets_aside_one_for_other_weights(shipped_copy):
    folder = shipped_copy / "checkpoints" / SHIPPED.name
    calibration = (folder / CALIBRATION_NAME).read_bytes()
    model = load_checkpoint(folder)
    save_checkpoint(model, folder)  # the same weights again: the calibration still fits them
    assert (folder / CALIBRATION_NAME).read_bytes() == calibration
    assert not list(folder.glob("*.stale-*"))

    with torch.no_grad():
        meter.batchnorm_layers(model)[-1][1].running_mean.add_(1.0)  # other weights: another fingerprint
    save_checkpoint(model, folder)
    assert not (folder / CALIBRATION_NAME).exists()
    [stale] = folder.glob("meter_calibration.stale-*.json")
    assert stale.read_bytes() == calibration

    (folder / CALIBRATION_NAME).write_text("not a calibration")  # unreadable: it fits nothing, set aside too
    save_checkpoint(model, folder)
    assert not (folder / CALIBRATION_NAME).exists()
    assert len(list(folder.glob("meter_calibration.stale-*.json"))) == 2  # the first one kept


@pytest.fixture
def ten_classes(tmp_path):
    """Class folders the meter's --per-class check counts (it reads no image before refusing)."""
    root = tmp_path / "ten"
    for c in range(10):
        (root / "train" / f"class{c}").mkdir(parents=True)
        for i in range(25):
            (root / "train" / f"class{c}" / f"{i}.png").write_bytes(b"")
    return root


def test_meter_refuses_too_few_per_class_up_front_saying_the_minimum(ten_classes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(meter_fit, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before the check"))
    with pytest.raises(SystemExit) as exc:
        meter_fit.main([str(tmp_path / "ck"), "--data-dir", str(ten_classes), "--per-class", "12"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--per-class 12 is too few" in err and "at least 20 per class" in err
    # 20 is the fit's own limit: 19 per class leaves too few held-out scores for its thresholds, 20 enough
    held = {p: len(meter_fit.split_indices(10 * p, 0)["threshold"]) for p in (19, 20)}
    with pytest.raises(ValueError, match="too few"):
        meter_fit.conformal_upper(torch.zeros(held[19]), meter_fit.DRIFTING_QUANTILE)
    meter_fit.conformal_upper(torch.zeros(held[20]), meter_fit.DRIFTING_QUANTILE)
    meter_fit.conformal_lower(torch.zeros(held[20]), meter_fit.CHANNEL_QUANTILE)
    assert meter_fit.fewest_per_class([25] * 10) == 20


def test_meter_refuses_to_replace_a_calibration_without_overwrite(ten_classes, shipped_copy, monkeypatch):
    folder = shipped_copy / "checkpoints" / SHIPPED.name
    before = hashes(folder)
    monkeypatch.setattr(meter_fit, "load_checkpoint", lambda *a, **k: pytest.fail("loaded before the check"))
    args = [str(folder), "--data-dir", str(ten_classes), "--per-class", "20"]
    with pytest.raises(SystemExit) as exc:
        meter_fit.main(args)
    message = str(exc.value.code)
    assert "\n" not in message and str(folder / CALIBRATION_NAME) in message and "--overwrite" in message
    assert hashes(folder) == before

    class Loaded(Exception):
        pass

    def loaded(*a, **k):
        raise Loaded

    monkeypatch.setattr(meter_fit, "load_checkpoint", loaded)
    with pytest.raises(Loaded):  # --overwrite gets past the refusal to the work
        meter_fit.main([*args, "--overwrite"])


def readme_commands(prefix: str) -> list[str]:
    """The command lines of the README and its docs/ pages that start with ``prefix`` (comments cut)."""
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.startswith(prefix)]


def test_the_real_shipped_checkpoint_is_untouched_by_the_readmes_commands_without_an_output_flag(tmp_path):
    """Runs, from the checkout, the README's commands that write by default and are cheap here, and checks the
    defaults of the rest; the shipped folder's files are byte-identical after."""
    before = hashes(SHIPPED)
    commands = readme_commands("python -m cifar_transfer.meter checkpoints/") + readme_commands(
        "python -m cifar_transfer.train --help")
    assert len(commands) == 2, commands
    for command in commands:
        argv = shlex.split(command)
        if "--data-dir" in argv:  # no images: were the refusal gone, the command would stop, not calibrate for 30 min
            argv[argv.index("--data-dir") + 1] = str(tmp_path)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
        if argv[2] == "cifar_transfer.meter":  # the calibration is there: refused, in one line, before any work
            assert proc.returncode == 1 and "--overwrite" in proc.stderr and len(proc.stderr.splitlines()) == 1, \
                proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr
    for name in BACKBONES:  # train without --output, from the checkout
        out = (REPO / train_mod.TrainConfig(backbone=name).resolved().output).resolve()
        assert out.is_relative_to(REPO / "runs"), out
    assert hashes(SHIPPED) == before


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmarks_write_under_runs_unless_told(tmp_path, monkeypatch):
    """Where each benchmark writes without an output flag: under runs/, never checkpoints/ or results/."""
    monkeypatch.chdir(tmp_path)
    outputs = {
        "app_load": benchmark("app_load").get_parser().parse_args([]).out_dir,
        "app_profile": benchmark("app_profile").get_parser().parse_args([]).out_dir,
        "instrument_accuracy": benchmark("instrument_accuracy").get_parser().parse_args([]).output,
    }
    tta = benchmark("time_to_accuracy").get_args_parser().parse_args(["--data-dir", str(tmp_path)])
    outputs.update(time_to_accuracy=tta.out, time_to_accuracy_recipe=tta.recipe_output)
    for name, path in outputs.items():
        resolved = Path(path).resolve()
        assert resolved.is_relative_to(REPO / "runs") or resolved.is_relative_to(tmp_path / "runs"), (name, path)
