"""Time to accuracy: the fast CPU recipe beside a plain baseline, in one invocation on one machine.

    python benchmarks/time_to_accuracy.py --data-dir ../shared/datasets/cifar10-jpeg

Runs ``python -m cifar_transfer.train`` twice with the same wall budget:

* recipe:   EfficientNet-Lite0 at 160 px, stem + 5 stages frozen, their features cached once
            (one unaugmented view; a random flip of the cached maps each step), the last 2
            stages + head fine-tuned for up to 3 epochs at peak lr 0.1 (chosen on a validation
            split: results/recipe_selection/README.md);
* baseline: full fine-tuning at the native 32x32 input, SGD, no caching.

Each run's per-epoch test accuracy and wall time (from the start of the command,
data decoding and caching included) come from its own metrics.json. Writes
``points.csv``, ``summary.json`` and ``time_to_accuracy.png`` to --out, and the recipe's checkpoint to
--recipe-output: by default both in a fresh ``runs/time_to_accuracy-<UTC time>/`` (train refuses to
replace an existing checkpoint unless ``--extra --overwrite``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPE = ["--backbone", "efficientnet_lite0", "--input-size", "160", "--freeze-stages", "6", "--cache-features",
          "--cache-views", "1", "--epochs", "3", "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.1",
          "--label-smoothing", "0.1", "--channels-last", "--eval-batch-size", "32", "--tta-flip"]
BASELINE = ["--backbone", "efficientnet_lite0", "--input-size", "32", "--freeze-stages", "0", "--epochs", "100",
            "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.05", "--label-smoothing", "0.1", "--no-variants"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 folder (train/ + test/ or cifar-10-batches-py)")
    p.add_argument("--budget-minutes", type=float, default=27.0,
                   help="training budget per run in minutes, from the command's start (the schedule follows it); the "
                        "final test evaluation comes on top: 10,000 images and their mirrors through the whole network "
                        "at 160 px, ~2 minutes at 167 images/s (ONNX Runtime, 2 cores), so 27 + that stays under 30")
    fresh = Path("runs") / time.strftime("time_to_accuracy-%Y%m%d-%H%M%S", time.gmtime())  # a new folder per run
    p.add_argument("--recipe-output", default=str(fresh / "recipe"),
                   help="checkpoint folder the recipe writes (an existing checkpoint there needs --extra --overwrite)")
    p.add_argument("--out", default=str(fresh),
                   help="folder for CSV, JSON and PNG (the docs' are in results/time_to_accuracy: pass that to replace them)")
    p.add_argument("--runs", nargs="+", default=["recipe", "baseline"], choices=["recipe", "baseline"], help="which runs")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train flags for both runs (e.g. --max-per-class 100)")
    return p


def run(name: str, flags: list[str], args, output: Path) -> dict:
    output = output.resolve()  # train runs in ROOT; this process reads the metrics from where it stands
    cmd = [sys.executable, "-m", "cifar_transfer.train", *flags, "--data-dir", args.data_dir,
           "--time-budget-minutes", str(args.budget_minutes), "--output", str(output), "--no-progress", *args.extra]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise SystemExit(f"error: the {name} run of train failed (its message is above)")
    metrics = json.loads((output / "metrics.json").read_text())
    points = [(0.0, None)] + [(h["wall_seconds"] / 60, h.get("test_acc")) for h in metrics["history"]]
    points.append((metrics["time_to_accuracy_seconds"] / 60, metrics["accuracy"]["correct"]))
    return {"name": name, "command": metrics["command"], "points": points, "final_accuracy": metrics["accuracy"]["correct"],
            "time_to_accuracy_minutes": round(metrics["time_to_accuracy_seconds"] / 60, 2),
            "epochs_done": len(metrics["history"]), "test_size": metrics["test_size"], "environment": metrics["environment"]}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in results:
        xs = [x for x, y in r["points"] if y is not None]
        ys = [100 * y for x, y in r["points"] if y is not None]
        ax.plot(xs, ys, marker="o", label=f"{r['name']}: {100 * r['final_accuracy']:.2f}% in {r['time_to_accuracy_minutes']:.1f} min")
    ax.axhline(93, color="grey", ls="--", lw=1, label="93% target")
    ax.axvline(30, color="grey", ls=":", lw=1, label="30 min budget")
    ax.set_xlabel("wall-clock minutes since the command started (2 CPU cores)")
    ax.set_ylabel("CIFAR-10 (JPEG copy) test accuracy, %")
    ax.set_title("Time to accuracy, EfficientNet-Lite0 from ImageNet weights")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs:
            flags = RECIPE if name == "recipe" else BASELINE
            output = Path(args.recipe_output) if name == "recipe" else Path(tmp) / "baseline"
            results.append(run(name, flags, args, output))
    with open(out / "points.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "wall_minutes", "test_accuracy"])
        for r in results:
            for x, y in r["points"]:
                if y is not None:
                    w.writerow([r["name"], f"{x:.2f}", f"{y:.4f}"])
    (out / "summary.json").write_text(json.dumps({"budget_minutes": args.budget_minutes, "loadavg_1_5_15": {
        "before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}, "runs": results}, indent=2) + "\n")
    plot(results, out / "time_to_accuracy.png")
    for r in results:
        print(f"{r['name']:<9} {100 * r['final_accuracy']:.2f}% after {r['time_to_accuracy_minutes']:.1f} min ({r['epochs_done']} epochs)")
    print(f"wrote {out}/points.csv, summary.json, time_to_accuracy.png")


if __name__ == "__main__":
    main()
