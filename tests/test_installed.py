"""The package works installed from a wheel (issue 10), not only from the repository root.

A wheel is built from a copy of the sources (so the build leaves nothing in the working tree), installed with
``pip install --target``, and run from a folder outside the repository with the install first on ``sys.path``
(the venv's editable install of this repository comes after it, and its dependencies are used as they are).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "efficientnet_lite0-cifar10"
TIMEOUT = 300


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """``site``: where the wheel is installed; ``cwd``: an empty folder outside the repository; ``env``."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("cifar_transfer", "examples"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)],
                   check=True, cwd=root, timeout=TIMEOUT)
    (wheel,) = wheels.glob("cifar_transfer-*.whl")
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, cwd=root, timeout=TIMEOUT)
    cwd = root / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1", NO_COLOR="1")
    return {"site": site, "cwd": cwd, "env": env, "wheel": wheel}


def run(installed: dict, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd or installed["cwd"], env=installed["env"],
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_the_installed_copy_is_the_one_imported(installed):
    r = run(installed, "-c", "import cifar_transfer; print(cifar_transfer.__file__)")
    assert r.returncode == 0, r.stderr
    imported = Path(r.stdout.strip())
    assert imported.is_relative_to(installed["site"]) and not imported.is_relative_to(REPO), imported


def test_the_wheel_ships_the_example_images(installed):
    shipped = installed["site"] / "cifar_transfer" / "examples"
    assert sorted(p.name for p in shipped.glob("*.png")) == sorted(p.name for p in (REPO / "examples").glob("*.png"))
    assert (shipped / "ATTRIBUTION.md").is_file()  # the images' licence travels with them


def test_doctor_help(installed):
    r = run(installed, "-m", "cifar_transfer.doctor", "--help")
    assert r.returncode == 0, r.stderr
    assert "MODEL_OR_CHECKPOINT" in r.stdout


def test_doctor_reads_its_shipped_examples_and_the_checkpoint_calibration(installed):
    r = run(installed, "-m", "cifar_transfer.doctor", str(CHECKPOINT), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["n_images"] == 8, report["images"]
    assert str(installed["site"] / "cifar_transfer" / "examples") in report["images"]
    assert report["calibrated"], "the checkpoint folder's meter calibration was not used"
    assert report["agrees_with_declared"] is not False


# the study's --summary reads the run of its --input-size (default 128: results/study-128px); the 32-px run is results/study
@pytest.mark.parametrize("module, results, args", [("experiment", "results.json", []),
                                                   ("study", "cells.jsonl", ["--input-size", "32"])])
def test_summary_outside_the_repository(installed, module, results, args, tmp_path):
    r = run(installed, "-m", f"cifar_transfer.{module}", "--summary")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    message = r.stderr.strip()
    assert message.startswith("error: no ") and f"run `python -m cifar_transfer.{module}" in message, message
    assert str(installed["site"]) not in message, "points into the install, not at a folder the user can fill"

    # results in the working folder, where `--output results/<module>` writes them: --summary reads them
    (tmp_path / "results" / module).mkdir(parents=True)
    shutil.copy2(REPO / "results" / module / results, tmp_path / "results" / module / results)
    r = run(installed, "-m", f"cifar_transfer.{module}", "--summary", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "|" in r.stdout and "Traceback" not in r.stderr
