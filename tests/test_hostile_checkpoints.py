"""Hostile checkpoints through the real commands: ``app.py --checkpoint``, ``evaluate`` and ``doctor``.

Each is built in ``tmp_path`` from a copy of the shipped checkpoint (never the shipped folder itself), and each
command must end with one line on stderr naming the limit or the file, exit non-zero, and peak under 2 GB: the
limits are checked before anything is built from the checkpoint. A watcher process runs the command and kills it
past 2 GB, so a regression fails the test instead of eating the machine's memory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from cifar_transfer.checkpoint import MAX_CLASSES, MAX_INPUT_SIDE, MAX_JSON_BYTES

from .conftest import REPO

SHIPPED = REPO / "checkpoints" / "efficientnet_lite0-cifar10"
PEAK_LIMIT_MB = 2048  # the issue's budget for any hostile checkpoint
COMMAND_TIMEOUT_S = 300  # a command that serves instead of refusing is stopped here (and the test fails)
COMMANDS = {
    "app": [sys.executable, "app.py", "--checkpoint"],
    "evaluate": [sys.executable, "-m", "cifar_transfer.evaluate"],
    "doctor": [sys.executable, "-m", "cifar_transfer.doctor"],
}

# Runs a command, polls its peak resident memory (VmHWM) and kills it past the limit; writes what it saw as JSON.
WATCHER = r"""
import json, resource, subprocess, sys, time
result, limit_kb, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
child = subprocess.Popen(sys.argv[4:])
start, peak, why = time.monotonic(), 0, None
while child.poll() is None:
    try:
        with open(f"/proc/{child.pid}/status") as f:
            hwm = [int(line.split()[1]) for line in f if line.startswith("VmHWM:")]
        peak = max([peak, *hwm])
    except (OSError, ValueError):  # the process is gone, or its status is being rewritten
        pass
    why = "memory" if peak > limit_kb else "timeout" if time.monotonic() - start > timeout else None
    if why:
        child.kill()
        child.wait()
        break
    time.sleep(0.02)
peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
with open(result, "w") as f:
    json.dump({"returncode": child.returncode, "peak_kb": peak, "killed_for": why}, f)
"""


def run_watched(command: str, folder: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    result = tmp_path / f"{command}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", WATCHER, str(result), str(PEAK_LIMIT_MB * 1024), str(COMMAND_TIMEOUT_S),
                           *COMMANDS[command], str(folder)], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=COMMAND_TIMEOUT_S + 60)
    assert result.is_file(), done.stderr[-3000:]  # the watcher itself failed
    return done, json.loads(result.read_text())


# -- the hostile checkpoints, each from a copy of the shipped one --------------------------------------------


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _as_timm(config: dict) -> None:
    """Another project's timm classifier: timm's own config.json, without this package's keys nor label_names."""
    for key in ("format", "contract", "label_names"):
        config.pop(key)


def _huge_input(config: dict) -> None:
    _as_timm(config)
    config["pretrained_cfg"]["input_size"] = [3, 100_000, 100_000]


def _huge_input_ours(config: dict) -> None:  # both of this package's records of the size, agreeing
    config["pretrained_cfg"]["input_size"] = [3, 100_000, 100_000]
    config["contract"]["input_size"] = 100_000


def _tiny_crop(config: dict) -> None:  # 128 px cut from images resized to 128,000 px
    config["pretrained_cfg"]["crop_pct"] = config["contract"]["crop_pct"] = 0.001


def _nine_classes(config: dict) -> None:  # the weights' head has 10 rows
    config.update(num_classes=9, label_names=config["label_names"][:9])
    config["pretrained_cfg"]["num_classes"] = 9


def _wrong_weights(folder: Path) -> None:  # the same names, one tensor of another shape
    state = load_file(folder / "model.safetensors")
    state["conv_stem.weight"] = state["conv_stem.weight"][:16].contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _grow(name: str, size: int):
    """Make ``name`` ``size`` bytes long without writing them (a sparse file): only its size can refuse it."""
    return lambda folder: os.truncate(folder / name, size)


def _header_length(folder: Path) -> None:
    with open(folder / "model.safetensors", "r+b") as f:
        f.write((2**62).to_bytes(8, "little"))


def _config(change):
    return lambda folder: _edit_json(folder / "config.json", change)


def _metrics(change):
    return lambda folder: _edit_json(folder / "metrics.json", change)


def _write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


LIMIT = re.escape
CASES = {
    # the issue's four, through every command
    "classes": (_config(lambda c: (_as_timm(c), c.update(num_classes=10**9))),
                LIMIT(f"config.json: num_classes is 1,000,000,000, above the limit of {MAX_CLASSES:,} classes")),
    "input_size": (_config(_huge_input),
                   LIMIT(f"config.json: pretrained_cfg: the input size 100000 px is above the limit of {MAX_INPUT_SIDE} px")),
    "metrics_json": (_write("metrics.json", b"{'accuracy': 0.9,}"), r"metrics\.json is not valid JSON: "),
    "wrong_shapes": (_config(_nine_classes),
                     LIMIT("model.safetensors: weights do not match the architecture in config.json "
                           "(tf_efficientnet_lite0): tensor 'classifier.weight' has the shape [10, 1280] in the file, "
                           "[9, 1280] in the architecture")),
    # the rest, each through one command
    "input_size_ours": (_config(_huge_input_ours),
                        LIMIT(f"config.json: the input size 100000 px is above the limit of {MAX_INPUT_SIDE} px")),
    "crop_pct": (_config(_tiny_crop), LIMIT(f"crop_pct 0.001 has images resized to 128000 px before the crop, above "
                                            f"the limit of {MAX_INPUT_SIDE} px")),
    "image_size": (_metrics(lambda m: m["train_config"].update(image_size=100_000)),
                   LIMIT(f"metrics.json: train_config.image_size 100000 px is above the limit of {MAX_INPUT_SIDE} px")),
    "config_json": (_write("config.json", b'{"architecture": "tf_efficientnet_lite0",'), r"config\.json is not valid JSON: "),
    "calibration_json": (_write("meter_calibration.json", b"\xff\xfe\x00garbage"), r"meter_calibration\.json is not valid JSON: "),
    "metrics_object": (_write("metrics.json", b"[0.9242]"), r"metrics\.json must hold a JSON object"),
    "wrong_tensor": (_wrong_weights, LIMIT("tensor 'conv_stem.weight' has the shape [16, 3, 3, 3] in the file, "
                                           "[32, 3, 3, 3] in the architecture")),
    "config_size": (_grow("config.json", 300 * 2**20),
                    LIMIT(f"config.json is 300 MB, above the limit of {MAX_JSON_BYTES // 2**20} MB")),
    "metrics_size": (_grow("metrics.json", 300 * 2**20),
                     LIMIT(f"metrics.json is 300 MB, above the limit of {MAX_JSON_BYTES // 2**20} MB")),
    "calibration_size": (_grow("meter_calibration.json", 300 * 2**20),
                         LIMIT(f"meter_calibration.json is 300 MB, above the limit of {MAX_JSON_BYTES // 2**20} MB")),
    "weights_size": (_grow("model.safetensors", 50 * 2**30),
                     LIMIT("model.safetensors is 51,200 MB, more than the architecture in config.json "
                           "(tf_efficientnet_lite0) can hold: at most ")),
    "weights_header": (_header_length, r"model\.safetensors is not a safetensors file \(its header length is "),
}
ISSUE_CASES = ("classes", "input_size", "metrics_json", "wrong_shapes")
OTHER_CASES = [c for c in CASES if c not in ISSUE_CASES]
RUNS = [(c, cmd) for c in ISSUE_CASES for cmd in COMMANDS] + [
    (c, list(COMMANDS)[i % len(COMMANDS)]) for i, c in enumerate(OTHER_CASES)]  # each command sees several


@pytest.fixture
def hostile(tmp_path, request) -> tuple[Path, str]:
    breakage, words = CASES[request.param]
    folder = tmp_path / request.param
    shutil.copytree(SHIPPED, folder)
    breakage(folder)
    return folder, words


@pytest.mark.parametrize("hostile, command", RUNS, indirect=["hostile"], ids=[f"{c}-{cmd}" for c, cmd in RUNS])
def test_a_hostile_checkpoint_is_refused_in_one_line_within_2_gb(hostile, command, tmp_path):
    folder, words = hostile
    done, watched = run_watched(command, folder, tmp_path)
    peak_mb = watched["peak_kb"] / 1024
    assert watched["killed_for"] is None, f"{command} was killed for {watched['killed_for']} (peak {peak_mb:.0f} MB)"
    assert peak_mb <= PEAK_LIMIT_MB
    assert watched["returncode"] != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert re.search(words, lines[0]), lines[0]
    assert str(folder) in lines[0]  # which checkpoint, and which of its files


def test_the_shipped_checkpoint_is_within_every_limit():
    """The limits refuse only what is hostile: the shipped checkpoint, all its files read, loads."""
    from cifar_transfer.model import load_checkpoint

    model = load_checkpoint(SHIPPED)
    assert model.class_names[0] == "airplane" and model.metrics["accuracy"]["correct"] > 0.9
