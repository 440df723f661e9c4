"""Publish to the Hub and load back, end to end with the real huggingface_hub client
against a loopback Hub (tests/hub_server.py) on 127.0.0.1."""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_transfer.hub import resolve_checkpoint
from cifar_transfer.model import CheckpointError, CifarTransferModel, load_checkpoint, save_checkpoint
from cifar_transfer.publish import PublishError, publish, publish_checkpoint
from tests.hub_server import LoopbackHub

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_LoopbackAliceSecret0123456789"  # alice's write token on the loopback Hub
CHECKPOINT_FILES = ("model.safetensors", "config.json", "metrics.json", "meter_calibration.json")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = CifarTransferModel.from_backbone("efficientnet_lite0", input_size=32, pretrained=False)
    m.train()
    with torch.no_grad():  # non-trivial batch-norm statistics
        m.classify(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    return m.eval()


@pytest.fixture
def checkpoint(tmp_path, model):
    metrics = {"dataset": "CIFAR-10 (JPEG copy)", "test_size": 40, "accuracy": {"correct": 0.625, "bgr": 0.375},
               "command": "python -m cifar_transfer.train --max-test-per-class 4", "train_wall_seconds": 12.5}
    folder = save_checkpoint(model, tmp_path / "ck", metrics)
    (folder / "train_state.pt").write_bytes(b"optimizer state that must never be uploaded")
    # a meter calibration travels with the weights (this one is the shipped model's: only its transport is tested)
    shutil.copy(REPO / "checkpoints" / "efficientnet_lite0-cifar10" / "meter_calibration.json", folder)
    return folder


@pytest.fixture
def hub():
    server = LoopbackHub({TOKEN: "alice", "hf_BobToken": "bob"}).start()
    yield server
    server.stop()


def _point_client_at(monkeypatch, endpoint: str, home: Path, token: str | None = TOKEN) -> dict:
    """Point huggingface_hub at ``endpoint`` with an empty cache, in this process (constants are read at import,
    so they are patched) and in subprocesses (environment). Returns the subprocess environment."""
    from huggingface_hub import constants

    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    for name, value in {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
                        "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False,
                        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}.items():
        monkeypatch.setattr(constants, name, value)
    for name, value in vars(constants).items():  # every other file the client keeps under HF_HOME
        if isinstance(value, str) and value.startswith(constants.HF_HOME + os.sep):
            monkeypatch.setattr(constants, name, str(home) + value[len(constants.HF_HOME):])
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def client(hub, tmp_path, monkeypatch) -> dict:
    return _point_client_at(monkeypatch, hub.endpoint, tmp_path / "hf_home")


def run_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar_transfer.publish", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def outputs(m: CifarTransferModel) -> torch.Tensor:
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m.classify(pixels)


# -- publish, then load back -------------------------------------------------------------


def test_cli_publishes_one_commit_and_loads_back_identical(hub, client, checkpoint, model):
    from huggingface_hub import ModelCard

    debug = {**client, "HF_HUB_VERBOSITY": "debug"}  # the client logs every request it makes
    done = run_cli(debug, str(checkpoint), "--repo-id", "alice/cifar-demo", "--commit-message", "first model")
    assert done.returncode == 0, done.stderr
    assert "alice/cifar-demo" in done.stdout and "/api/repos/create" in done.stderr
    assert TOKEN not in done.stdout + done.stderr

    repo = hub.repos["alice/cifar-demo"]
    assert len(repo.commits) == 2  # the Hub's initial .gitattributes commit, then ours: one commit for everything
    assert repo.messages[repo.branches["main"]] == "first model"
    files = hub.files("alice/cifar-demo")
    assert set(files) == {".gitattributes", *CHECKPOINT_FILES, "README.md"}  # never train_state.pt
    assert files["model.safetensors"].lfs  # weights went through LFS to the storage origin ...
    assert not any(r["authorization"] for r in hub.requests if r["origin"] == "storage")  # ... which never saw the token

    folder, loaded, note = resolve_checkpoint("alice/cifar-demo")
    assert "downloaded from the Hugging Face Hub" in note
    assert str(folder).startswith(str(client["HF_HUB_CACHE"]))
    for name in CHECKPOINT_FILES:
        assert (folder / name).read_bytes() == (checkpoint / name).read_bytes() == hub.file_bytes("alice/cifar-demo", name)
    assert torch.equal(outputs(loaded), outputs(model))
    assert torch.equal(outputs(CifarTransferModel.from_pretrained("alice/cifar-demo")), outputs(model))

    card = ModelCard.load(folder / "README.md")  # the card's YAML parses and carries metrics.json's accuracy
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    assert card.data.eval_results[0].metric_value == metrics["accuracy"]["correct"]
    assert card.data.pipeline_tag == "image-classification" and card.data.library_name == "timm"
    assert 'from_pretrained("alice/cifar-demo")' in card.text and '"hf-hub:alice/cifar-demo"' in card.text


def timm_outputs(repo_id: str, model: CifarTransferModel) -> torch.Tensor:
    """Logits of the published model loaded by timm alone, on ``outputs``' pixels under the model's own contract."""
    import timm

    net = timm.create_model(f"hf-hub:{repo_id}", pretrained=True).eval()
    assert tuple(net.pretrained_cfg["mean"]) == model.contract.mean and net.pretrained_cfg["label_names"] == model.class_names
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return net(model.preprocess(pixels))


def test_timm_loads_the_published_model_with_identical_logits(hub, client, checkpoint, model):
    publish(checkpoint, "alice/cifar-demo")
    assert torch.equal(timm_outputs("alice/cifar-demo", model), outputs(model))
    assert torch.equal(outputs(CifarTransferModel.from_pretrained("alice/cifar-demo")), outputs(model))
    assert any(r["path"].startswith("/alice/cifar-demo/resolve/") for r in hub.requests)  # timm went through the Hub


def test_mixin_push_to_hub_publishes_the_project_card_and_a_timm_checkpoint(hub, client, model):
    from huggingface_hub import ModelCard

    pushed = copy.deepcopy(model)
    pushed.metrics = {"accuracy": {"correct": 0.75}, "dataset": "CIFAR-10 (JPEG copy)", "test_size": 40}
    pushed.push_to_hub("alice/pushed", model_card_kwargs={"repo_id": "alice/pushed"})  # the mixin's public method
    card = ModelCard(hub.file_bytes("alice/pushed", "README.md").decode())
    assert card.data.library_name == "timm" and card.data.eval_results[0].metric_value == 0.75
    assert "More Information Needed" not in card.text and '"hf-hub:alice/pushed"' in card.text
    assert json.loads(hub.file_bytes("alice/pushed", "config.json"))["architecture"] == "tf_efficientnet_lite0"
    assert torch.equal(timm_outputs("alice/pushed", model), outputs(model))
    again = CifarTransferModel.from_pretrained("alice/pushed")
    assert torch.equal(outputs(again), outputs(model)) and again.metrics == pushed.metrics


def test_revision_branch_and_republish(hub, client, checkpoint, model, tmp_path):
    first = publish_checkpoint(checkpoint, "alice/cifar-demo")
    assert first["created"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        list(other.parameters())[-1].add_(0.5)  # the head's bias
    second = save_checkpoint(other, tmp_path / "ck2", {"accuracy": {"correct": 0.5}})
    url = publish(second, "alice/cifar-demo", revision="v2")  # existing repo of ours: reused; new branch from main
    assert url.endswith("/alice/cifar-demo/tree/v2")
    assert hub.file_bytes("alice/cifar-demo", "model.safetensors", "v2") == (second / "model.safetensors").read_bytes()
    assert hub.file_bytes("alice/cifar-demo", "model.safetensors") == (checkpoint / "model.safetensors").read_bytes()

    on_branch = CifarTransferModel.from_pretrained("alice/cifar-demo", revision="v2")
    assert torch.equal(outputs(on_branch), outputs(other))
    assert not torch.equal(outputs(on_branch), outputs(model))
    folder, _, note = resolve_checkpoint("alice/cifar-demo", revision="v2")
    assert "alice/cifar-demo@v2" in note and (folder / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_train_push_to_hub_publishes_the_trained_checkpoint(hub, client, tmp_path):
    from cifar_transfer import train
    from tests.helpers import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", classes=("cat", "dog"), n_train=8, n_test=2)
    out = tmp_path / "trained"
    train.main(["--backbone", "efficientnet_lite0", "--input-size", "32", "--batch-size", "8", "--freeze-stages", "3",
                "--epochs", "1", "--no-progress", "--no-variants", "--data-dir", str(data), "--output", str(out),
                "--push-to-hub", "alice/tiny", "--private"])
    assert (out / "train_state.pt").is_file() and hub.repos["alice/tiny"].private
    # training writes no meter calibration (python -m cifar_transfer.meter does): the rest is published
    trained_files = [name for name in CHECKPOINT_FILES if name != "meter_calibration.json"]
    assert set(hub.files("alice/tiny")) == {".gitattributes", *trained_files, "README.md"}
    for name in trained_files:
        assert hub.file_bytes("alice/tiny", name) == (out / name).read_bytes()


def test_private_repo_needs_the_token_to_read(hub, client, checkpoint, monkeypatch):
    publish(checkpoint, "alice/secret", private=True)
    assert hub.repos["alice/secret"].private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(CheckpointError, match="does not exist, or is private"):
        resolve_checkpoint("alice/secret")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert "downloaded" in resolve_checkpoint("alice/secret")[2]


def test_token_from_a_prior_login_is_used_and_never_written_anywhere(hub, tmp_path, monkeypatch, checkpoint):
    home = tmp_path / "hf_home"
    _point_client_at(monkeypatch, hub.endpoint, home, token=None)
    home.mkdir(parents=True)
    (home / "token").write_text(TOKEN)  # what `hf auth login` leaves behind
    publish(checkpoint, "alice/from-login")
    resolve_checkpoint("alice/from-login")
    assert "alice/from-login" in hub.repos
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != home / "token"]
    assert written and not [p for p in written if TOKEN.encode() in p.read_bytes()]


# -- refusals: clear message, nothing published ------------------------------------------------


def test_missing_token_gives_clear_error_and_creates_nothing(hub, tmp_path, monkeypatch, checkpoint):
    env = _point_client_at(monkeypatch, hub.endpoint, tmp_path / "hf_home", token=None)
    done = run_cli(env, str(checkpoint), "--repo-id", "alice/cifar-demo")
    assert done.returncode != 0
    assert "no Hugging Face token" in done.stderr and "HF_TOKEN" in done.stderr and "hf auth login" in done.stderr
    assert "Traceback" not in done.stderr
    assert hub.repos == {} and not [r for r in hub.requests if r["path"].startswith(("/api/repos", "/api/models"))]


def test_rejected_token_gives_clear_error(hub, client, checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_RevokedToken000")
    with pytest.raises(PublishError, match="rejected the token") as err:
        publish(checkpoint, "alice/cifar-demo")
    assert "hf_RevokedToken000" not in str(err.value) and hub.repos == {}


def test_offline_mode_refuses_to_publish(hub, client, checkpoint, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE=1; nothing was uploaded"):
        publish(checkpoint, "alice/cifar-demo")
    assert hub.requests == []


def test_someone_elses_namespace_is_refused_with_403(hub, client, checkpoint):
    hub.create("bob/cifar-demo", files={"config.json": b"{}"})
    before = dict(hub.files("bob/cifar-demo"))
    with pytest.raises(PublishError, match="403") as err:
        publish(checkpoint, "bob/cifar-demo")
    assert "someone else" in str(err.value) and "Nothing was uploaded" in str(err.value)
    assert hub.files("bob/cifar-demo") == before and TOKEN not in str(err.value)


def test_taken_name_in_own_namespace_is_refused_with_409(hub, client, checkpoint):
    hub.create("alice/bert", files={"config.json": json.dumps({"model_type": "bert"}).encode(), "pytorch_model.bin": b"\0"})
    before = dict(hub.files("alice/bert"))
    with pytest.raises(PublishError, match="name alice/bert is taken"):
        publish(checkpoint, "alice/bert")
    assert hub.files("alice/bert") == before


def test_failed_upload_leaves_nothing_half_published(hub, client, checkpoint):
    hub.failures["commit"] = 500
    with pytest.raises(PublishError, match="nothing was published.*deleted again"):
        publish(checkpoint, "alice/cifar-demo")
    assert "alice/cifar-demo" not in hub.repos


def test_invalid_checkpoint_is_not_uploaded(hub, client, checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(PublishError, match="model.safetensors is missing"):
        publish(checkpoint, "alice/cifar-demo")
    assert hub.requests == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_gives_clear_error(tmp_path, monkeypatch, checkpoint):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = _point_client_at(monkeypatch, endpoint, tmp_path / "hf_home")
    done = run_cli(env, str(checkpoint), "--repo-id", "alice/cifar-demo")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"cannot reach the Hugging Face Hub at {endpoint}" in done.stderr and "nothing was uploaded" in done.stderr
    assert TOKEN not in done.stdout + done.stderr
    with pytest.raises(CheckpointError, match="cannot reach the Hugging Face Hub .*, and it is not .*in the Hugging Face cache"):
        resolve_checkpoint("alice/cifar-demo")


# -- loading offline or unreachable: cache first, then the local copy -----------------------------


def test_offline_falls_back_to_cache_then_to_local_copy(hub, client, checkpoint, monkeypatch, tmp_path, model):
    from huggingface_hub import constants

    publish(checkpoint, "alice/cifar-demo")
    online, _, _ = resolve_checkpoint("alice/cifar-demo")  # fills the cache

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder, loaded, note = resolve_checkpoint("alice/cifar-demo", fallback=checkpoint)
    assert folder == online and "loaded from the Hugging Face cache (offline mode, HF_HUB_OFFLINE=1)" in note
    assert torch.equal(outputs(loaded), outputs(model))
    assert torch.equal(outputs(CifarTransferModel.from_pretrained("alice/cifar-demo")), outputs(model))

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    folder, loaded, note = resolve_checkpoint("alice/cifar-demo", fallback=checkpoint)
    assert folder == checkpoint and "HF_HUB_OFFLINE=1, and it is not (completely) in the Hugging Face cache" in note and f"using the local copy {checkpoint}" in note
    with pytest.raises(CheckpointError, match="in the Hugging Face cache"):
        resolve_checkpoint("alice/cifar-demo")


def test_unreachable_hub_falls_back_to_cache_then_to_local_copy(hub, client, checkpoint, monkeypatch, tmp_path):
    from huggingface_hub import constants

    publish(checkpoint, "alice/cifar-demo")
    online, _, _ = resolve_checkpoint("alice/cifar-demo")
    hub.stop()
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", dead + "/{repo_id}/resolve/{revision}/{filename}")
    folder, _, note = resolve_checkpoint("alice/cifar-demo")
    assert folder == online and note.startswith("loaded from the Hugging Face cache (cannot reach the Hugging Face Hub")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    folder, loaded, note = resolve_checkpoint("alice/cifar-demo", fallback=checkpoint)
    assert folder == checkpoint and "using the local copy" in note
    assert load_checkpoint(checkpoint).config() == loaded.config()


def test_unknown_repo_is_not_served_from_a_stale_cache(hub, client, checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("alice/never-published")
    _, _, note = resolve_checkpoint("alice/never-published", fallback=checkpoint)
    assert "does not exist" in note and "using the local copy" in note


# -- a reference: a local folder, a Hub repo id, or either ------------------------------------------

SHIPPED_NAME = "checkpoints/efficientnet_lite0-cifar10"  # the README's folder, run from another working folder


@pytest.mark.parametrize("ref", ["./" + SHIPPED_NAME, "/no/such/checkpoint", "~/no-such-checkpoint-folder",
                                 SHIPPED_NAME + "/v2", "checkpoint-without-owner", "two--dashes/name", "owner/name."])
def test_a_path_that_names_no_folder_fails_at_once_without_asking_the_hub(hub, client, tmp_path, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        CifarTransferModel.from_pretrained(ref)
    message = str(err.value)
    assert message.startswith(f"no such local folder: {ref}") and "Hub" not in message
    assert hub.requests == []


def test_a_name_that_could_be_either_says_there_is_no_folder_and_what_the_hub_said(hub, client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where = f"no such local folder: {SHIPPED_NAME} ({tmp_path / SHIPPED_NAME}), and cannot load {SHIPPED_NAME} from "
    with pytest.raises(CheckpointError, match=re.escape(where + "the Hugging Face Hub or its cache: the repository does "
                                                         "not exist")):
        CifarTransferModel.from_pretrained(SHIPPED_NAME)
    with pytest.raises(CheckpointError, match=re.escape(where + "the Hugging Face Hub or its cache: the repository")):
        resolve_checkpoint(SHIPPED_NAME)
    shutil.copytree(REPO / SHIPPED_NAME, tmp_path / SHIPPED_NAME)  # the folder exists: it is loaded, the Hub not asked
    hub.requests.clear()
    assert CifarTransferModel.from_pretrained(SHIPPED_NAME).class_names[0] == "airplane" and hub.requests == []


def test_an_unreachable_hub_is_asked_once_then_the_cache(tmp_path, monkeypatch, caplog):
    """Not the client's five retries (about 30 s): one request, then the cache, then one line saying both."""
    monkeypatch.chdir(tmp_path)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    _point_client_at(monkeypatch, endpoint, tmp_path / "hf_home")
    with pytest.raises(CheckpointError) as err:
        CifarTransferModel.from_pretrained(SHIPPED_NAME)
    assert str(err.value) == (f"no such local folder: {SHIPPED_NAME} ({tmp_path / SHIPPED_NAME}), and cannot load "
                              f"{SHIPPED_NAME} from the Hugging Face Hub or its cache: cannot reach the Hugging Face Hub "
                              f"at {endpoint} (ConnectError), and it is not (completely) in the Hugging Face cache")
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


# -- bring your own classifier: any timm classifier, served, scored, diagnosed -------------------------

COLOURS = ["red", "green", "blue"]  # the label_names of "another project's" classifier


def colour_images(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated RGB uint8 pictures: random texture with one saturated channel, the class (red, green, blue)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    pixels = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    pixels[torch.arange(n), labels] = 255
    return pixels, labels


@pytest.fixture(scope="module")
def timm_resnet18():
    """Another project's classifier, built with timm alone: ResNet-18, 3 classes, trained a few steps on generated
    pictures normalized as its pretrained_cfg says (ImageNet statistics; the preprocessing is written out here by hand,
    not taken from this package)."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    cfg = net.pretrained_cfg
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406) and tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for step in range(20):
        pixels, labels = colour_images(12, 32, seed=step)
        loss = torch.nn.functional.cross_entropy(net((pixels / 255 - mean) / std), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # batch-norm statistics of the
        bn.reset_running_stats()                                                 # final weights, as training
        bn.momentum = None                                                       # recipes recalibrate them
    with torch.no_grad():
        for step in range(2):
            net((colour_images(32, 32, seed=100 + step)[0] / 255 - mean) / std)
    return net.eval()


def test_any_timm_classifier_on_the_hub_is_served_by_the_app_with_its_pretrained_cfg_contract(hub, client, tmp_path,
                                                                                              timm_resnet18):
    """Published with timm's own push_to_hf_hub (safetensors and a pickle, as timm does; no metrics.json), then
    ``app.py --checkpoint alice/resnet18-colours`` in a subprocess, called through the real HTTP API."""
    import httpx
    from gradio_client import Client, handle_file
    from PIL import Image
    from timm.models import push_to_hf_hub

    from cifar_transfer.contract import IMAGENET

    push_to_hf_hub(timm_resnet18, "alice/resnet18-colours", model_config={"label_names": COLOURS})
    files = set(hub.files("alice/resnet18-colours"))
    assert {"config.json", "model.safetensors"} <= files and "metrics.json" not in files
    config = json.loads(hub.file_bytes("alice/resnet18-colours", "config.json"))
    assert "format" not in config and "contract" not in config  # timm's format, nothing of ours

    port = free_port()
    env = {**client, "PYTHONUNBUFFERED": "1", "CIFAR_TRANSFER_THREADS": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--checkpoint", "alice/resnet18-colours",
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Running on" in line or "error:" in line:
                break
        assert f"Running on http://127.0.0.1:{port}" in "".join(lines), "".join(lines)
        url = f"http://127.0.0.1:{port}"

        config = httpx.get(f"{url}/config", timeout=60).json()  # the page's text: note, contract, accuracy lines
        page = html.unescape("\n".join(c["props"]["value"] for c in config["components"]
                                       if isinstance(c.get("props", {}).get("value"), str)))
        assert "alice/resnet18-colours" in page and "contract from the repo's pretrained_cfg" in page
        assert "3 labels from its label_names" in page and "| mean | 0.485 | 0.456 | 0.406 |" in page
        assert "not measured for this checkpoint" in page and "Measured test accuracy with" not in page
        assert "bicubic" in page

        picture = colour_images(1, 256, seed=99)[0][0]  # a "red" picture with a black and a white patch
        picture[:, 20:80, 20:80] = 0
        picture[:, 150:210, 150:210] = 255
        path = tmp_path / "red.png"
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(path)
        chosen = ["no_normalization", "raw_0_255", "bgr", "normalized_twice"]
        answer = Client(url, verbose=False).predict(handle_file(str(path)), chosen, api_name="/predict")
    finally:
        proc.kill()
        proc.wait(timeout=30)

    by_key = {v["key"]: v for v in answer["variants"]}
    assert list(by_key) == ["correct", *chosen]  # the wrong variants are there, as asked
    correct = by_key["correct"]
    assert set(correct["confidences"]) == set(COLOURS)  # the repo's label_names
    assert correct["label"] == "red"
    assert all(v["accuracy"] is None for v in answer["variants"])  # no metrics.json: not measured
    # ImageNet's statistics, from the repo's pretrained_cfg: the black and white patches give its exact range
    assert correct["input_range"] == pytest.approx(IMAGENET.value_range(), abs=1e-3)
    assert by_key["no_normalization"]["input_range"] == pytest.approx([0, 1], abs=1e-3)
    assert by_key["raw_0_255"]["input_range"] == pytest.approx([0, 255], abs=1e-2)


def test_a_timm_classifier_on_the_hub_loads_as_timm_loads_it(hub, client, timm_resnet18):
    """``resolve_checkpoint`` (the app, evaluate, doctor) and ``timm.create_model("hf-hub:...")`` agree on the
    weights, the labels and the preprocessing; the contract is named as the pretrained_cfg's."""
    import timm
    from timm.models import push_to_hf_hub

    push_to_hf_hub(timm_resnet18, "alice/resnet18-colours", model_config={"label_names": COLOURS})
    folder, model, note = resolve_checkpoint("alice/resnet18-colours")
    assert "contract from the repo's pretrained_cfg" in note and "3 labels from its label_names" in note
    assert not (folder / "pytorch_model.bin").exists()  # the pickle timm also pushed is never downloaded
    assert model.class_names == COLOURS and model.metrics is None
    assert model.contract.mean == (0.485, 0.456, 0.406) and model.contract.interpolation == "bicubic"
    assert (model.contract.channel_order, model.contract.pixel_scale, model.contract.times) == ("RGB", 1.0, 1)

    net = timm.create_model("hf-hub:alice/resnet18-colours", pretrained=True).eval()
    data_config = timm.data.resolve_data_config({}, model=net)
    assert data_config["crop_pct"] == model.contract.crop_pct and data_config["input_size"][1] == model.contract.input_size
    pixels = colour_images(4, 64, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(model.classify(pixels), net(model.preprocess(pixels)))
        assert torch.equal(model.classify(pixels), timm_resnet18(model.preprocess(pixels)))


def save_timm_folder(net, folder: Path, **model_config) -> Path:
    """A plain timm checkpoint folder, written by timm alone (safetensors only, no metrics.json)."""
    from timm.models import save_for_hf

    save_for_hf(net, str(folder), model_config=model_config or None, safe_serialization=True)
    return folder


def test_a_plain_timm_model_in_a_folder_loads_in_the_app_path(tmp_path, timm_resnet18, monkeypatch):
    import app

    folder = save_timm_folder(timm_resnet18, tmp_path / "colours", label_names=COLOURS)
    predictor, note = app.load_predictor(str(folder))
    assert "contract from the repo's pretrained_cfg" in note and str(tmp_path) not in note
    assert predictor.class_names == COLOURS and predictor.accuracy == {} and predictor.test_size is None
    assert app.accuracy_markdown(predictor.accuracy.get("correct"), predictor.test_size).endswith("*not measured for this checkpoint*.")
    pixels = colour_images(3, 48, seed=5)[0]
    result = predictor.predict(pixels[1].permute(1, 2, 0).numpy(), ["bgr"])
    assert [v.key for v in result.variants] == ["correct", "bgr"] and set(result.variants[0].confidences) == set(COLOURS)


def test_evaluate_scores_a_timm_classifier_whose_labels_are_the_datasets(tmp_path, capsys):
    """A plain ``timm.create_model(..., pretrained=False)``, its label_names the dataset's classes: scored."""
    import timm

    from cifar_transfer import evaluate
    from tests.helpers import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", classes=("cat", "dog"), n_train=1, n_test=2)
    torch.manual_seed(0)
    folder = save_timm_folder(timm.create_model("resnet18", pretrained=False, num_classes=2), tmp_path / "r18",
                              label_names=["dog", "cat"])  # its own order: evaluate follows it
    evaluate.main([str(folder), "--data-dir", str(data), "--engine", "pytorch", "--variants", "bgr", "--write"])
    out = capsys.readouterr().out
    assert "contract from the repo's pretrained_cfg" in out and "4 test images" in out
    assert re.search(r"^correct .* \d+\.\d\d%$", out, re.M) and re.search(r"^bgr .* \d+\.\d\d%$", out, re.M)
    metrics = json.loads((folder / "metrics.json").read_text())  # --write: metrics.json only, the card is timm's
    assert set(metrics["accuracy"]) == {"correct", "bgr"} and not (folder / "README.md").exists()
    assert load_checkpoint(folder).metrics == metrics


def test_evaluate_refuses_a_timm_classifier_of_other_classes_with_the_reason(tmp_path):
    """Any timm architecture (not one this package trains), 1000 ImageNet classes without label_names: loads, with
    ImageNet's class names, but a dataset of cats and dogs cannot score it."""
    import timm

    from cifar_transfer import evaluate
    from tests.helpers import make_folder_dataset

    data = make_folder_dataset(tmp_path / "data", classes=("cat", "dog"), n_train=1, n_test=1)
    folder = save_timm_folder(timm.create_model("mobilenetv3_small_050", pretrained=False), tmp_path / "mnv3")
    model = load_checkpoint(folder)
    assert len(model.class_names) == 1000 and model.class_names[0].startswith("tench")
    assert model.contract.crop_pct == 0.875 and model.contract.mean == (0.485, 0.456, 0.406)
    with pytest.raises(SystemExit, match=r"timm classifier of 1000 classes \('tench.*cannot be measured"):
        evaluate.main([str(folder), "--data-dir", str(data), "--engine", "pytorch"])


def test_doctor_checks_a_timm_classifiers_declared_contract(hub, client, timm_resnet18, capsys):
    """The doctor loads a Hub repo id, declares the pretrained_cfg's contract, and ranks candidates against it."""
    from timm.models import push_to_hf_hub

    from cifar_transfer import doctor

    push_to_hf_hub(timm_resnet18, "alice/resnet18-colours", model_config={"label_names": COLOURS})
    model, name = doctor.load_model("alice/resnet18-colours")
    assert "contract from the repo's pretrained_cfg" in name and model.contract.mean == (0.485, 0.456, 0.406)
    pixels = colour_images(8, 224, seed=1000)[0]
    report = doctor.diagnose(model, pixels, name=name)
    assert report.declared == model.contract
    assert report.best.name == "imagenet" and report.agrees_with_declared is True
