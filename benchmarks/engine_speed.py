"""PyTorch vs ONNX Runtime on this CPU, side by side in one process: the whole network and the recipe's frozen prefix.

    python benchmarks/engine_speed.py [--checkpoint DIR] [--threads 2] [--runs 30] [--json OUT]

Cases (the shipped checkpoint's input size, normalized random input; the meter's statistics are
extra outputs of the ONNX graph, and PyTorch computes them with the same hooks):

* whole network + meter statistics, batch 1 (one panel), 7 (every panel), 12 (what the app runs for every
  panel: 7 inputs + their 7 channel-swapped twins, less the 2 that repeat under the [-1, 1] contract) and 64;
* the whole network alone (no statistics), batch 1, 7 and 12: what the meter's statistics add, and the floor
  under any all-panel answer on this machine;
* the frozen stem + 4 stages the recipe caches (``--freeze-stages 5``), batch 64, in images/s.

Reports p50/p95 per call and the ratio. The load average is printed with the numbers: another job on
the 2 cores changes them, so compare only numbers from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.app_latency import percentiles  # noqa: E402


def timed(fn, runs: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return percentiles(samples)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "efficientnet_lite0-cifar10"))
    p.add_argument("--threads", type=int, default=2, help="torch threads and ONNX Runtime intra-op threads")
    p.add_argument("--runs", type=int, default=30, help="timed calls per case")
    p.add_argument("--prefix-stages", type=int, default=5, help="stages in the cached prefix (the recipe's --freeze-stages)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from cifar_transfer.engine import OnnxEngine, TorchEngine
    from cifar_transfer.model import load_checkpoint

    torch.set_num_threads(args.threads)
    model = load_checkpoint(args.checkpoint).eval()
    size = model.contract.input_size
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    engines = {"pytorch": TorchEngine(model, layers), "onnxruntime": OnnxEngine(model, layers, size, threads=args.threads)}
    results = {"load_average_before": os.getloadavg(), "threads": args.threads, "input_size": size, "cases": []}
    bare = {"pytorch": TorchEngine(model, []), "onnxruntime": OnnxEngine(model, [], size, threads=args.threads)}
    cases = [("whole network + meter statistics", engines, b) for b in (1, 7, 12, 64)]
    cases += [("whole network alone", bare, b) for b in (1, 7, 12)]
    for what, by_name, batch in cases:
        x = torch.randn(batch, 3, size, size)
        row = {"case": f"{what}, batch {batch}"}
        for name, engine in by_name.items():
            row[name] = timed(lambda: engine(x), args.runs if batch < 64 else max(5, args.runs // 5))
        row["ratio"] = row["pytorch"]["p50"] / row["onnxruntime"]["p50"]
        results["cases"].append(row)
        print(f"{row['case']}: pytorch p50 {1000 * row['pytorch']['p50']:.1f} ms, onnxruntime p50 "
              f"{1000 * row['onnxruntime']['p50']:.1f} ms, {row['ratio']:.1f}x", flush=True)

    prefix = nn.Sequential(*list(model.stages)[:args.prefix_stages]).eval()
    x = torch.randn(64, 3, size, size)
    row = {"case": f"frozen prefix ({args.prefix_stages} stages), batch 64, images/s"}
    for name, engine in {"pytorch": TorchEngine(prefix, []), "onnxruntime": OnnxEngine(prefix, [], size, threads=args.threads)}.items():
        t = timed(lambda: engine(x), max(5, args.runs // 5))
        row[name] = {**t, "images_per_s": 64 / t["p50"]}
    row["ratio"] = row["onnxruntime"]["images_per_s"] / row["pytorch"]["images_per_s"]
    results["cases"].append(row)
    print(f"{row['case']}: pytorch {row['pytorch']['images_per_s']:.0f}, onnxruntime {row['onnxruntime']['images_per_s']:.0f} "
          f"images/s, {row['ratio']:.1f}x", flush=True)
    results["load_average_after"] = os.getloadavg()
    print(f"load average before/after: {results['load_average_before']} / {results['load_average_after']}")
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out)
    return results


if __name__ == "__main__":
    main()
