"""How well do the contract meter and the doctor see each preprocessing mistake? (issue 11)

    python benchmarks/instrument_accuracy.py --data-dir ../shared/datasets/cifar10-jpeg [--per-class 50]

On CIFAR-10 *test* images (the meter is calibrated on training images only), every image goes through
every variant of the checkpoint's contract (as ``Predictor.predict_pixels`` builds them), with the channel-swapped
twins of ``correct`` and ``bgr`` in the same forward pass. Per variant: the share of single images the app's
reading flags ("drifting" or "broken": each wrong panel read against the correct panel of the same image,
``MeterCalibration.panel_readings``; the correct panel, the reference, can only read "ok" or "unusual", whose
share is reported), the share the absolute reading of the image alone flags (what ``check_batch`` and the doctor
read; on ``correct``: false alarms), the share of random batches of 8 and 32 the absolute batch reading does not
read as "ok", and the AUROC of the meter's statistic against ``correct``. The doctor: on random batches of 8, 32 and 128 test images, how
often it names the declared contract first, how often it says "DISAGREES" (a confident wrong answer) and
how often it is not sure. "before" columns: the first-batch-norm meter and doctor this replaced (same
images). Results go to runs/instrument_accuracy/instrument_accuracy.json (written atomically; --output
results/instrument_accuracy/instrument_accuracy.json replaces the docs').
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cifar_transfer.contract import CORRECT_KEY, WRONG_VARIANTS, variant_contracts  # noqa: E402
from cifar_transfer.doctor import CONFIDENT, MIN_IMAGES, bootstrap_confidence, candidate_contracts  # noqa: E402
from cifar_transfer.divergence import bn_divergence, pooled_stats, running_stats  # noqa: E402
from cifar_transfer.meter import WITHIN, LayerProbe, channel_swap, find_calibration  # noqa: E402


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg), ties counted half."""
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    for v in np.unique(allv):  # average ranks of ties
        m = allv == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(neg) * len(pos)))


def test_pixels(data_dir: Path, per_class: int, seed: int, contract, side: int | None = 32) -> torch.Tensor:
    """``per_class`` random test images of each class, read as the app reads an upload (cifar_transfer.images)."""
    from cifar_transfer.images import read_pixels

    root = data_dir / "test"
    rng = random.Random(seed)
    pixels = []
    for c in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for p in rng.sample(sorted((root / c).iterdir()), per_class):
            pixels.append(read_pixels(p, contract, side))
    return torch.stack(pixels)


#: Variants whose channel-swapped twin is run. The app runs a twin for every panel; for the other variants the
#: twin's check can only add flags, so their rates here (score alone) are lower bounds, and the doctor's misfit
#: for those candidates (score alone) makes them look no worse than the app's doctor would: both conservative.
TWINS = (CORRECT_KEY, "bgr")


@torch.inference_mode()
def collect(model, pixels: torch.Tensor, chunk: int = 25) -> dict:
    """Per variant: features, twin features, first-layer per-channel mean/var (for the old meter)."""
    contracts = variant_contracts(model.contract, list(WRONG_VARIANTS))
    tf = {k: c.transform() for k, c in contracts.items()}
    out = {k: {"f": [], "t": [], "m0": [], "v0": []} for k in contracts}
    for s in range(0, len(pixels), chunk):
        chunk_pixels = pixels[s:s + chunk].float()
        for k in contracts:
            x = tf[k](chunk_pixels)  # each variant's own transform, as Predictor.network_input
            n = len(x)
            twin = k in TWINS
            with LayerProbe(model) as probe:
                model((torch.cat([x, channel_swap(x)]) if twin else x).contiguous(memory_format=torch.channels_last))
            f = probe.features()
            out[k]["f"].append(f[:n])
            if twin:
                out[k]["t"].append(f[n:])
            out[k]["m0"].append(probe.captured[0][0][0][:n].cpu()); out[k]["v0"].append(probe.captured[0][0][1][:n].cpu())
        print(f"  {s + len(chunk_pixels)}/{len(pixels)} images", flush=True)
    return {k: {a: (torch.cat(b) if b else None) for a, b in v.items()} for k, v in out.items()}


def pooled_first_layer(bn, m0: torch.Tensor, v0: torch.Tensor) -> float:
    return float(bn_divergence(pooled_stats((m0, v0)), running_stats(bn)))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared/datasets/cifar10-jpeg"))
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints/efficientnet_lite0-cifar10"))
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batches", type=int, default=200, help="random batches per batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", help="file for the collected features: read when present, else written")
    p.add_argument("--output", default=str(REPO / "runs/instrument_accuracy/instrument_accuracy.json"),
                   help="result JSON; default: runs/instrument_accuracy/instrument_accuracy.json (the docs': "
                        "results/instrument_accuracy/instrument_accuracy.json)")
    return p


def main(argv=None) -> None:
    args = get_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from cifar_transfer.images import pixel_side
    from cifar_transfer.model import load_checkpoint, read_metrics
    from cifar_transfer.checkpoint import first_batchnorm

    t0 = time.perf_counter()
    model = load_checkpoint(args.checkpoint).eval().to(memory_format=torch.channels_last)
    cal = find_calibration(model, args.checkpoint)
    accuracy = (read_metrics(args.checkpoint) or {}).get("accuracy", {})
    side = pixel_side(model.contract, read_metrics(args.checkpoint))
    pixels = test_pixels(Path(args.data_dir), args.per_class, args.seed, model.contract, side)
    n = len(pixels)
    print(f"{n} test images, {len(WRONG_VARIANTS) + 1} variants, twins in the same pass")
    if args.cache and Path(args.cache).is_file():
        data = torch.load(args.cache)
    else:
        data = collect(model, pixels)
        if args.cache:
            torch.save(data, args.cache)
    bn0 = first_batchnorm(model)
    rng = np.random.default_rng(args.seed)
    batches = {b: [rng.choice(n, b, replace=n < b) for _ in range(args.batches)] for b in (8, 32, 128)}

    def flags_new(k, idx=None):
        f, t = data[k]["f"], data[k]["t"]
        s = cal.scores(f if idx is None else f[idx], t if idx is None or t is None else t[idx])
        if idx is None:
            channel = s.channel if s.channel is not None else [None] * len(s.score)
            return np.array([cal.reading(float(a), None if c is None else float(c)).level != "ok"
                             for a, c in zip(s.score, channel)]), s
        score, channel = cal.batch_scores(s)
        return cal.reading(score, channel, len(idx)).level != "ok", s

    keys = list(data)  # correct first, as the app's panels
    panels = [cal.panel_readings(torch.stack([data[k]["f"][i] for k in keys]), data[CORRECT_KEY]["t"][i]) for i in range(n)]
    app_levels = {k: np.array([p[j].level for p in panels]) for j, k in enumerate(keys)}

    old_d = {k: bn_divergence((data[k]["m0"], data[k]["v0"]), running_stats(bn0)).numpy() for k in data}
    s_correct = cal.scores(data[CORRECT_KEY]["f"], data[CORRECT_KEY]["t"])
    rows = {}
    for k in data:
        single, s = flags_new(k)
        levels = app_levels[k]
        row = {"accuracy_cost_points": None if k == CORRECT_KEY or k not in accuracy else round(100 * (accuracy[CORRECT_KEY] - accuracy[k]), 1),
               "single": float(np.isin(levels, ("drifting", "broken")).mean()), "single_unusual": float((levels == "unusual").mean()),
               "single_levels": {v: int((levels == v).sum()) for v in sorted(set(levels))},
               "single_alone": float(single.mean()), "score_only": float((s.score.numpy() > cal.thresholds["drifting"]).mean()),
               "channel_only": None if s.channel is None else float((s.channel.numpy() < cal.thresholds["channel"]).mean()),
               "twin_run": k in TWINS}
        for b in (8, 32):
            row[f"batch_{b}"] = float(np.mean([flags_new(k, idx)[0] for idx in batches[b]]))
        row["before_single"] = float((old_d[k] > WITHIN).mean())
        for b in (8, 32):
            row[f"before_batch_{b}"] = float(np.mean([pooled_first_layer(bn0, data[k]["m0"][idx], data[k]["v0"][idx]) > WITHIN
                                                      for idx in batches[b]]))
        if k != CORRECT_KEY:
            row["auroc_score"] = auroc(s_correct.score.numpy(), s.score.numpy())
            row["auroc_channel"] = None if s.channel is None else auroc(-s_correct.channel.numpy(), -s.channel.numpy())
            row["auroc"] = row["auroc_channel"] if k == "bgr" else row["auroc_score"]
            row["before_auroc"] = auroc(old_d[CORRECT_KEY], old_d[k])
        rows[k] = row

    # the doctor: candidates -> the variant whose normalization they are
    contracts = variant_contracts(model.contract, list(WRONG_VARIANTS))
    cands = candidate_contracts(model.contract)
    source = {name: next(k for k, c in contracts.items() if c.same_normalization(cc)) for name, cc in cands.items()
              if any(c.same_normalization(cc) for c in contracts.values())}
    names = list(source)
    declared = next(nm for nm in names if source[nm] == CORRECT_KEY)
    def misfit_of(key):
        s = cal.scores(data[key]["f"], data[key]["t"])
        return s.score if s.channel is None else torch.maximum(s.score, -s.channel)

    misfit = torch.stack([misfit_of(source[nm]) for nm in names])
    doctor = {"candidates": {nm: source[nm] for nm in names}, "declared": declared}
    for b in (8, 32, 128):
        right = disagrees = unsure = before_right = 0
        for j, idx in enumerate(batches[b]):
            per = misfit[:, torch.as_tensor(idx)]
            best = int(per.double().mean(1).argmin())
            conf = float(bootstrap_confidence(per, seed=j)[best])
            confident = b >= MIN_IMAGES and conf >= CONFIDENT
            right += names[best] == declared
            disagrees += names[best] != declared and confident
            unsure += names[best] != declared and not confident
            pooled = [pooled_first_layer(bn0, data[source[nm]]["m0"][idx], data[source[nm]]["v0"][idx]) for nm in names]
            before_right += names[int(np.argmin(pooled))] == declared
        doctor[f"batch_{b}"] = {"names_declared_first": right / len(batches[b]), "says_disagrees": disagrees / len(batches[b]),
                                "unsure_and_wrong_first": unsure / len(batches[b]), "before_names_declared_first": before_right / len(batches[b])}
    result = {"checkpoint": str(Path(args.checkpoint).relative_to(REPO)) if Path(args.checkpoint).resolve().is_relative_to(REPO) else args.checkpoint,
              "images": f"CIFAR-10 test split, {args.per_class} per class ({n}), seed {args.seed}; the calibration used training images only",
              "batches_per_size": args.batches, "thresholds": cal.thresholds, "paired_thresholds": cal.paired_thresholds(),
              "calibration": cal.derivation["images"],
              "single_reading": "the app's: each wrong panel against the correct panel of the same image; single_alone: "
                                "the image alone against the training images",
              "command": "python benchmarks/instrument_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "wall_seconds": round(time.perf_counter() - t0, 1), "variants": rows, "doctor": doctor}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(table(result))
    print(f"wrote {out}")


def table(r: dict) -> str:
    pc = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = ["| variant | accuracy cost | single image: the app's panel flagged (\"unusual\") | single image alone: first "
             "layer → calibrated | batch of 8 (before → after) | batch of 32 (before → after) | AUROC (before → after) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k, v in r["variants"].items():
        cost = "—" if v["accuracy_cost_points"] is None else f"{v['accuracy_cost_points']:.1f} pts"
        au = "—" if k == CORRECT_KEY else f"{v['before_auroc']:.3f} → {v['auroc']:.3f}"
        name = f"{k} (false alarms)" if k == CORRECT_KEY else k
        app = pc(v["single"]) + (f" ({pc(v['single_unusual'])})" if k == CORRECT_KEY else "")
        lines.append(f"| {name} | {cost} | {app} | {pc(v['before_single'])} → {pc(v['single_alone'])} | "
                     f"{pc(v['before_batch_8'])} → {pc(v['batch_8'])} | {pc(v['before_batch_32'])} → {pc(v['batch_32'])} | {au} |")
    lines += ["", "| doctor, random batches of | names the declared contract first (before → after) | says DISAGREES | wrong first but says it is unsure |",
              "|---|---:|---:|---:|"]
    for b in (8, 32, 128):
        d = r["doctor"][f"batch_{b}"]
        lines.append(f"| {b} | {pc(d['before_names_declared_first'])} → {pc(d['names_declared_first'])} | "
                     f"{pc(d['says_disagrees'])} | {pc(d['unsure_and_wrong_first'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
