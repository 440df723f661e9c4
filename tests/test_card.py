"""The model card: Hub metadata a user expects, every section, generated only from the checkpoint's files."""

from __future__ import annotations

import functools
import itertools
import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from cifar_transfer.backbones import get_backbone
from cifar_transfer.card import render_model_card, write_model_card
from cifar_transfer.contract import IMAGENET, WRONG_VARIANTS, variant_title
from cifar_transfer.model import CifarTransferModel, save_checkpoint

EMBEDDED_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "efficientnet_lite0-cifar10"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@functools.cache
def _config(backbone: str) -> str:
    return json.dumps(CifarTransferModel.from_backbone(backbone, class_names=CLASSES, pretrained=False).config())


def config_for(backbone: str) -> dict:
    """config.json as a checkpoint of ``backbone`` has it."""
    return json.loads(_config(backbone))


def table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after ``heading`` (header and separator rows dropped)."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def number(cell: str) -> float:
    return float(re.fullmatch(r"\s*(-?[0-9.]+)\s*%?\s*", cell).group(1))


def full_metrics() -> dict:
    return {
        "dataset": "CIFAR-10 (JPEG copy)", "test_size": 10000, "train_size": 50000, "tta_flip": True,
        "accuracy": {"correct": 0.9123, **{k: 0.1 + i / 20 for i, k in enumerate(WRONG_VARIANTS)}},
        "command": "python -m cifar_transfer.train --backbone resnet18 --epochs 3",
        "train_wall_seconds": 754.2, "total_wall_seconds": 901.0, "history": [{"epoch": e} for e in range(3)],
        "environment": {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "cpu": "AMD EPYC", "cpu_count": 16,
                        "torch_threads": 8, "python": "3.11.9", "torch": "2.14.1", "torchvision": "0.29.1"},
        "train_config": {"backbone": "resnet18", "input_size": 224, "epochs": 3, "batch_size": 256, "lr": 0.05},
    }


def test_metadata_is_what_a_hub_user_expects():
    metrics = full_metrics()
    card = ModelCard(render_model_card(config_for("resnet18"), metrics, repo_id="alice/resnet18-cifar10"))
    data = card.data
    assert data.library_name == "timm" and data.license == "mit" and data.pipeline_tag == "image-classification"
    assert {"image-classification", "timm", "cifar10", "resnet18"} <= set(data.tags)
    assert data.datasets == ["uoft-cs/cifar10"]
    assert data.base_model == get_backbone("resnet18").base_model
    (result,) = data.eval_results
    assert result.metric_type == "accuracy" and result.metric_value == metrics["accuracy"]["correct"]
    assert result.dataset_name == metrics["dataset"] and result.dataset_split == "test"
    assert result.task_type == "image-classification"
    assert data.model_name == "alice/resnet18-cifar10"


def test_sections_come_from_the_checkpoint_files():
    metrics, config = full_metrics(), config_for("resnet18")
    text = ModelCard(render_model_card(config, metrics, repo_id="alice/r18")).text
    contract = table(text, "## Normalization contract")  # channel | mean | std, read back as numbers
    assert [row[0] for row in contract] == ["R", "G", "B"]
    assert [number(row[1]) for row in contract] == pytest.approx(IMAGENET.mean, abs=5e-4)
    assert [number(row[2]) for row in contract] == pytest.approx(IMAGENET.std, abs=5e-4)
    assert "Why it matters" in text
    accuracy = {row[0]: number(row[1]) for row in table(text, "## Accuracy")}  # preprocessing | test accuracy | ...
    assert accuracy == {variant_title(k): pytest.approx(100 * v, abs=0.005) for k, v in metrics["accuracy"].items()}
    assert 'timm.create_model("hf-hub:alice/r18", pretrained=True)' in text
    assert 'CifarTransferModel.from_pretrained("alice/r18")' in text and "model.classify(" in text
    assert metrics["command"] in text and "12.6 min" in text  # 754.2 s of training
    assert metrics["environment"]["gpu"] in text
    assert "## Limitations" in text


def test_card_snippets_run(tmp_path):
    """The card's timm snippet, run as written against a local folder (hf-hub: swapped for local-dir:)."""
    from PIL import Image

    model = CifarTransferModel.from_backbone("efficientnet_lite0", input_size=32, pretrained=False, class_names=CLASSES)
    folder = save_checkpoint(model, tmp_path / "ck")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "photo.jpg")
    text = ModelCard.load(folder / "README.md").text
    code = re.search(r"```python\n(import timm.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) == 4
    code = code.replace("hf-hub:USER/NAME", f"local-dir:{folder}").replace('"photo.jpg"', repr(str(tmp_path / "photo.jpg")))
    printed = []
    exec(code, {"print": printed.append})  # noqa: S102 - our own card's snippet
    assert printed and printed[0] in CLASSES


def test_base_model_is_left_out_where_there_is_none():
    assert get_backbone("efficientnet_lite0").base_model is None
    data = ModelCard(render_model_card(config_for("efficientnet_lite0"), full_metrics())).data
    assert data.base_model is None and "base_model" not in data.to_dict()


def test_card_without_metrics_is_valid_and_claims_nothing():
    card = ModelCard(render_model_card(config_for("efficientnet_lite0"), None))
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "No measured accuracy" in card.text and "does not record how it was trained" in card.text


def test_other_dataset_is_named_honestly():
    metrics = {**full_metrics(), "dataset": "pets", "test_size": 30}
    data = ModelCard(render_model_card(config_for("resnet18"), metrics)).data
    assert data.datasets is None
    assert data.eval_results[0].dataset_name == "pets" and data.eval_results[0].dataset_type == "pets"


def test_subset_of_the_test_set_is_disclosed():
    text = render_model_card(config_for("resnet18"), {**full_metrics(), "test_size": 200})
    assert "200 of the 10000 CIFAR-10 test images" in text


def test_saved_checkpoint_card_is_regenerated_from_its_files(tmp_path):
    model = CifarTransferModel.from_backbone("efficientnet_lite0", input_size=32, pretrained=False)
    folder = save_checkpoint(model, tmp_path / "ck", {"accuracy": {"correct": 0.25}, "dataset": "CIFAR-10 (JPEG copy)"})
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm" and card.data.eval_results[0].metric_value == 0.25
    assert {row[0]: number(row[1]) for row in table(card.text, "## Accuracy")} == {variant_title("correct"): 25.0}
    assert "32x32" in card.text  # the checkpoint's own input size, not the backbone default
    (folder / "README.md").write_text("hand-edited: 99% accuracy")
    write_model_card(folder)
    assert ModelCard.load(folder / "README.md").data.eval_results[0].metric_value == 0.25


def test_embedded_checkpoint_card_matches_its_files():
    config = json.loads((EMBEDDED_CHECKPOINT / "config.json").read_text())
    metrics = json.loads((EMBEDDED_CHECKPOINT / "metrics.json").read_text())
    card = ModelCard.load(EMBEDDED_CHECKPOINT / "README.md")
    assert card.data.library_name == "timm" and card.data.eval_results[0].metric_value == metrics["accuracy"]["correct"]
    assert {row[0]: number(row[1]) for row in table(card.text, "## Accuracy")} == \
        {variant_title(k): pytest.approx(100 * v, abs=0.005) for k, v in metrics["accuracy"].items()}
    assert (EMBEDDED_CHECKPOINT / "README.md").read_text() == render_model_card(config, metrics), \
        "stale card: regenerate it: python -c \"from cifar_transfer.card import write_model_card as w; w('checkpoints/efficientnet_lite0-cifar10')\""


def test_readme_timm_snippet_is_the_cards_tested_snippet():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "hub.md").read_text()
    card = render_model_card(config_for("efficientnet_lite0"), None)
    find = lambda text: re.search(r"```python\n(import timm.*?)```", text, re.S).group(1)  # noqa: E731
    assert find(readme) == find(card)  # test_card_snippets_run runs it
