"""Pinned numbers of a quick cell of every training path (issue 22: one training engine).

    .venv/bin/python -m tests.pins          # rewrites tests/pins.json from the code as it is now

``tests/pins.json`` was written by this script on the three training loops as they were before the engine was
shared (commit c3cb639: ``train.fit``, ``experiment.train_run``, ``study.run_cell``); the tests in
``test_train.py``, ``test_study.py`` and ``test_experiment.py`` run the same tiny setups (CPU, seed 0, the real
EfficientNet-Lite0 ImageNet weights of the pip package, a few steps on tiny generated images) and compare what
:func:`measure_train`, :func:`measure_study` and :func:`measure_experiment` read from them with the file. Floats
are compared within :data:`REL` (the values pass through ``round(.., 5 significant digits)`` in the results
files); the weights' SHA-256 exactly when the platform that wrote the file is the one running the test.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

PINS = Path(__file__).with_name("pins.json")  # written on an "Intel(R) Xeon(R) Processor" from the loops of c3cb639
# Float kernels differ between CPUs: on tiny runs a logit moves in its 4th digit and an accuracy over 3 images flips.
# The name alone does not say which kernels run: "AMD EPYC" has been an AVX2 chip and, on 2026-12-07, an AVX-512 one
# (family 25 model 17), each with its own floats. So a file is chosen by the name and by the instruction set torch
# dispatches to (torch.backends.cpu.get_cpu_capability(); None: any). Each was written there by this script;
# pins.json itself proved the shared engine equal to the separate loops.
PINS_BY_CPU = {("Intel(R) Xeon(R) Processor", None): PINS,
               ("AMD EPYC", "AVX2"): Path(__file__).with_name("pins-amd-epyc.json"),
               ("AMD EPYC", "AVX512"): Path(__file__).with_name("pins-amd-epyc-avx512.json")}
REL = 1e-4  # relative tolerance of pinned floats; a learning rate x0.5 moves them by far more

# -- the setups (the tests use these very values) ----------------------------------------------------------------

TRAIN_CLASSES, TRAIN_N_TRAIN, TRAIN_N_TEST = ("cat", "dog", "ship"), 8, 4
TRAIN_ARGS = ["--backbone", "efficientnet_lite0", "--input-size", "32", "--batch-size", "8", "--freeze-stages", "3",
              "--no-progress", "--eval-batch-size", "16", "--epochs", "2", "--no-variants", "--engine", "pytorch"]
TRAIN_RUNS = {"images": [], "cached_tta": ["--cache-features", "--cache-views", "2", "--tta-flip"]}
STUDY_CLASSES, STUDY_N_TRAIN, STUDY_N_TEST = ("a", "b", "c"), 12, 6
STUDY_CONFIG = dict(input_size=32, variants=["raw_0_255"], epochs_scale=0.5, max_batch_size=8, progress=False, engine="pytorch")
EXPERIMENT_CONFIG = dict(input_size=32, max_per_class=10, val_per_class=3, steps=3, batch_size=4, eval_every=2,
                         variants=["raw_0_255", "bgr"], progress=False)


def platform_id() -> str:
    """Where bit-exact weights can be expected to repeat: same torch, same CPU, same thread count."""
    return f"{torch.__version__} {platform.machine()} {platform.processor()} threads={torch.get_num_threads()}"


# -- what is read from each path --------------------------------------------------------------------------------


def measure_train(out: Path) -> dict:
    """The history, the final accuracy and the weights of a finished ``cifar_transfer.train`` run in ``out``."""
    metrics = json.loads((out / "metrics.json").read_text())
    weights = load_file(out / "model.safetensors")
    h = hashlib.sha256()
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"history": [{k: v for k, v in r.items() if k != "wall_seconds"} for r in metrics["history"]],
            "accuracy": metrics["accuracy"],
            "weights_abs_sum": sum(float(w.double().abs().sum()) for w in weights.values()),
            "weights_sha256": h.hexdigest()}


def measure_study(cells: list[dict]) -> dict:
    """Per cell: test accuracy, binned losses and gradient norms, the probes, the served-wrong scores."""
    keep = ("test", "loss_binned", "grad_norm_binned", "grad_norm", "divergence", "served_wrong", "steps", "steps_done",
            "stopped_at")
    pinned = set(STUDY_CONFIG["variants"])  # the correct cell now serves every wrong variant; the pins hold these
    out = {c["key"]: {k: c[k] for k in keep if k in c} | {"curve": c["curve"]["test_subset_acc"]} for c in cells}
    for rec in out.values():
        if "served_wrong" in rec:
            rec["served_wrong"] = {k: v for k, v in rec["served_wrong"].items() if k in pinned}
    return out


def measure_experiment(results: dict) -> dict:
    """Per run: the per-step series, the evaluations and the final record; the served-wrong scores."""
    return {"runs": {k: {"steps": r["steps"], "eval": r["eval"], "final": r["final"],
                         "initial_divergence": r["initial_divergence"]} for k, r in results["runs"].items()},
            "serve_mismatch": results["serve_mismatch"]}


# -- running them ------------------------------------------------------------------------------------------------


def run_train(root: Path, name: str) -> dict:
    from cifar_transfer import train
    from tests.helpers import make_folder_dataset

    data = root / "train-data"
    if not data.is_dir():
        make_folder_dataset(data, classes=TRAIN_CLASSES, n_train=TRAIN_N_TRAIN, n_test=TRAIN_N_TEST)
    out = root / f"train-{name}"
    train.main([*TRAIN_ARGS, *TRAIN_RUNS[name], "--data-dir", str(data), "--output", str(out)])
    return measure_train(out)


def run_study(root: Path) -> list[dict]:
    from cifar_transfer import study
    from tests.helpers import make_folder_dataset

    make_folder_dataset(root / "data", classes=STUDY_CLASSES, n_train=STUDY_N_TRAIN, n_test=STUDY_N_TEST)
    cfg = study.StudyConfig(data_dir=str(root / "data"), output=str(root / "out"), **STUDY_CONFIG)
    return study.run_study(cfg, log=lambda *_: None)


def run_experiment(root: Path) -> dict:
    from cifar_transfer import experiment
    from tests.test_experiment import _write_tiny_dataset

    _write_tiny_dataset(root / "data")
    cfg = experiment.ExperimentConfig(data_dir=str(root / "data"), output=str(root / "out"), **EXPERIMENT_CONFIG)
    return experiment.run_experiment(cfg)


def assert_matches(got, want, where: str = "") -> None:
    """``got`` equals the pinned ``want``: the same structure, floats within :data:`REL`."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_matches(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: {got} != {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_matches(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)) and abs(got - want) <= REL * max(abs(want), 1e-6), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def cpu_kernels() -> tuple[str, str]:
    """The CPU's name and the instruction set torch's kernels use on it (``"AVX2"``, ``"AVX512"``, ...)."""
    from cifar_transfer.runtime import cpu_name

    return cpu_name(), torch.backends.cpu.get_cpu_capability()


def pins_path(cpu: str, capability: str) -> Path | None:
    """The file named in :data:`PINS_BY_CPU` for this CPU name and instruction set, or None."""
    return next((p for (family, isa), p in PINS_BY_CPU.items()
                 if cpu.startswith(family) and isa in (None, capability)), None)


def pins_file() -> Path:
    """The pins of the CPU running the tests; one line saying how to write them where there are none."""
    cpu, capability = cpu_kernels()
    path = pins_path(cpu, capability)
    if path is not None and path.exists():
        return path
    raise AssertionError(f"no pinned numbers for this CPU ({cpu!r}, {capability}); write them with `python -m tests.pins` "
                         f"from a commit whose numbers are known good and add the file to PINS_BY_CPU")


def pinned() -> dict:
    return json.loads(pins_file().read_text())


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cpu, capability = cpu_kernels()
        target = pins_path(cpu, capability)
        if target is None:
            raise SystemExit(f"no pins file is named for this CPU ({cpu!r}, {capability}): add it to PINS_BY_CPU first")
        pins = {"written_by": "python -m tests.pins", "platform": platform_id(), "cpu": cpu, "cpu_capability": capability,
                "train": {name: run_train(root, name) for name in TRAIN_RUNS},
                "study": measure_study(run_study(root / "study")),
                "experiment": measure_experiment(run_experiment(root / "experiment"))}
    target.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
