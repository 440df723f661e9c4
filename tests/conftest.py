"""Shared pytest fixtures.

Tests that need the CIFAR-10 JPEG copy in ``../shared`` take the ``shared_data``
fixture (or carry the ``shared_data`` marker); both skip, with a reason, on a
clone without that folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-jpeg"
SHARED_REASON = "needs ../shared/datasets/cifar10-jpeg (CIFAR-10 JPEG copy)"
# The app's checkpoint: $CIFAR_TRANSFER_CHECKPOINT (a folder) when set, as app.py reads it, else the embedded one.
APP_CHECKPOINT = Path(os.environ.get("CIFAR_TRANSFER_CHECKPOINT") or REPO / "checkpoints" / "efficientnet_lite0-cifar10")
EXAMPLES = REPO / "examples"
ARTIFACTS = REPO / "test-artifacts"


def pytest_configure(config):
    config.addinivalue_line("markers", f"shared_data: {SHARED_REASON}; skipped when absent")


def pytest_runtest_setup(item):
    if item.get_closest_marker("shared_data") and not SHARED.is_dir():
        pytest.skip(SHARED_REASON)


@pytest.fixture
def shared_data() -> Path:
    """Path of ../shared/datasets/cifar10-jpeg; skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(SHARED_REASON)
    return SHARED


# -- the app (issue 4) ---------------------------------------------------------------


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded checkpoint, loaded once per test session."""
    from cifar_transfer.model import load_checkpoint, read_metrics

    return load_checkpoint(APP_CHECKPOINT), read_metrics(APP_CHECKPOINT)


@pytest.fixture(scope="session")
def predictor(embedded_model):
    from cifar_transfer.predictor import Predictor

    model, metrics = embedded_model
    return Predictor(model, metrics)


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    return sorted(EXAMPLES.glob("*.png"))


@pytest.fixture(scope="session")
def running_app():
    """The app's module-level ``demo``, served on 127.0.0.1 for the session; yields its URL."""
    import app

    _, url, _ = app.launch(app.demo, host="127.0.0.1", port=None, share=False, prevent_thread_lock=True)
    yield url
    app.demo.close()
