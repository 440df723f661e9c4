"""The app through its API: a real server on 127.0.0.1, called with gradio_client."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cifar_transfer.contract import CORRECT_KEY, DEFAULT_DEMO_VARIANTS, WRONG_VARIANTS
from cifar_transfer.predictor import load_image

from .conftest import REPO


@pytest.fixture(scope="module")
def client(running_app):
    from gradio_client import Client

    return Client(running_app, verbose=False)


def call(client, path, variants=None):
    from gradio_client import handle_file

    args = [handle_file(str(path))] + ([variants] if variants is not None else [])
    return client.predict(*args, api_name="/predict")


def test_predict_endpoint_is_documented(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert "/predict" in info["named_endpoints"]


def test_json_structure_for_the_default_variants(client, example_images):
    result = call(client, example_images[0])
    assert set(result) == {"variants", "warning", "notes"}
    keys = [v["key"] for v in result["variants"]]
    assert keys == [CORRECT_KEY, *(k for k in WRONG_VARIANTS if k in DEFAULT_DEMO_VARIANTS)]
    for v in result["variants"]:
        assert set(v) >= {"key", "title", "explanation", "label", "confidences", "meter", "accuracy"}
        assert v["label"] == max(v["confidences"], key=v["confidences"].get)
        assert set(v["meter"]) >= {"divergence", "level", "colour", "words"}
        assert v["accuracy"] is None or 0 <= v["accuracy"] <= 1


def test_all_variants_in_one_call(client, example_images):
    result = call(client, example_images[1], list(WRONG_VARIANTS))
    assert [v["key"] for v in result["variants"]] == [CORRECT_KEY, *WRONG_VARIANTS]


@pytest.mark.parametrize("index", [0, 3, 5])
def test_correct_panel_top_class_equals_a_direct_model_call(client, example_images, embedded_model, index):
    model, _ = embedded_model
    path = example_images[index]
    with torch.inference_mode():
        direct = model.class_names[model.classify(load_image(path)[None]).argmax(1).item()]
    assert call(client, path)["variants"][0]["label"] == direct


def test_bad_upload_gets_a_clear_error_and_the_app_keeps_working(client, example_images, tmp_path):
    from gradio_client.exceptions import AppError

    bad = tmp_path / "report.png"
    bad.write_text("not really a png")
    with pytest.raises(AppError, match="not an image this app can read"):
        call(client, bad)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(AppError, match="empty"):
        call(client, empty)
    assert call(client, example_images[2])["variants"][0]["key"] == CORRECT_KEY


def test_settings_come_from_flags_and_environment(monkeypatch):
    import app

    monkeypatch.setenv("CIFAR_TRANSFER_CHECKPOINT", "someone/some-model")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    monkeypatch.setenv("CIFAR_TRANSFER_SHARE", "true")
    args = app.get_args_parser().parse_args([])
    assert (args.checkpoint, args.host, args.port, args.share) == ("someone/some-model", "0.0.0.0", 7999, True)
    args = app.get_args_parser().parse_args(["--checkpoint", "ck", "--host", "127.0.0.1", "--port", "1234", "--no-share"])
    assert (args.checkpoint, args.host, args.port, args.share) == ("ck", "127.0.0.1", 1234, False)


def test_cli_help_lists_the_flags():
    out = subprocess.run([sys.executable, str(REPO / "app.py"), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for flag in ("--checkpoint", "--host", "--port", "--share"):
        assert flag in out.stdout


def test_bad_checkpoint_gives_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "app.py"), "--checkpoint", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode != 0
    assert "checkpoint folder not found" in out.stderr


def test_startup_lines_name_the_apps_own_share_switch():
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "--share" in line or len(lines) > 200:
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    text = "".join(lines)
    assert f"Running on http://127.0.0.1:{port}" in text
    assert "run again with --share" in text
    assert "share=True" not in text
