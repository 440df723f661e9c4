"""How often does the app's contract meter flag real images, not CIFAR-10, under each variant? (issue 20)

    python benchmarks/meter_on_real_images.py --split design [--output runs/real_images] [--name meter-design]

Every image of one split of ``results/real_images/manifest.json`` (built by ``benchmarks/real_images.py``) goes
through the app's :class:`~cifar_transfer.predictor.Predictor`, built from the checkpoint as ``app.py`` builds it,
under the correct contract and every wrong variant (one forward pass per image, as the app answers an upload).
Per kind (``photo``, ``nonphoto``, and each of them without its grayscale images, on which the BGR panel is the
correct one): the share of images whose *correct* panel the meter reads "drifting" or "broken" (false alarms), for
each wrong variant the share flagged and the share whose top-1 class is the correct panel's, and every level's
count. The levels are read from what the predictor returns (``result.to_dict()["variants"][i]["meter"]["level"]``),
so a redesigned meter is measured by the same script. Results go to ``<output>/<name>.json`` (written atomically);
per-image readings are kept for the design split only: the held-out split is for the final before/after numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

import real_images  # noqa: E402
from cifar_transfer.checkpoint import atomic_write_json  # noqa: E402
from cifar_transfer.contract import CORRECT_KEY, WRONG_VARIANTS  # noqa: E402

FLAGGED = ("drifting", "broken")  # the levels that tell a visitor the preprocessing looks wrong
CHECKPOINT = REPO / "checkpoints/efficientnet_lite0-cifar10"


def build_predictor(checkpoint: str | Path = CHECKPOINT):
    """The predictor as ``app.load_predictor`` builds it from a checkpoint folder (without importing Gradio)."""
    from cifar_transfer.checkpoint import read_metrics
    from cifar_transfer.meter import CALIBRATION_FILE
    from cifar_transfer.model import load_checkpoint
    from cifar_transfer.predictor import Predictor

    folder = Path(checkpoint)
    calibration = folder if (folder / CALIBRATION_FILE).is_file() else None  # else the shipped one that fits
    return Predictor(load_checkpoint(folder), read_metrics(folder), calibration=calibration)


def read_panels(predictor, image) -> dict[str, dict]:
    """``{variant: {level, label, divergence, channel_order}}`` for one image under every variant, one pass."""
    result = predictor.predict(image, list(WRONG_VARIANTS)).to_dict()
    return {v["key"]: {"level": v["meter"]["level"], "label": v["label"], "divergence": v["meter"]["divergence"],
                       "channel_order": v["meter"].get("channel_order")} for v in result["variants"]}


def summarize(rows: list[dict], accuracy: dict[str, float] | None = None) -> dict:
    """Shares over ``rows`` (each with ``panels`` as :func:`read_panels` gives them).

    ``correct``: how often its level is flagged (false alarms) and every level's count; each wrong variant: the
    same, the share whose top-1 class equals the correct panel's, and its measured accuracy cost in points.
    """
    n = len(rows)
    accuracy = accuracy or {}

    def share(hits: int) -> float | None:
        return round(hits / n, 4) if n else None

    def panel(key: str) -> dict:
        levels = Counter(r["panels"][key]["level"] for r in rows)
        out = {"flagged": share(sum(levels[level] for level in FLAGGED)), "levels": dict(sorted(levels.items()))}
        if key != CORRECT_KEY:
            out["top1_agrees_with_correct"] = share(sum(r["panels"][key]["label"] == r["panels"][CORRECT_KEY]["label"]
                                                        for r in rows))
            known = key in accuracy and CORRECT_KEY in accuracy
            out["accuracy_cost_points"] = round(100 * (accuracy[CORRECT_KEY] - accuracy[key]), 1) if known else None
        return out

    return {"images": n, CORRECT_KEY: panel(CORRECT_KEY), "variants": {k: panel(k) for k in WRONG_VARIANTS}}


def measure(predictor, paths) -> dict:
    """Read every image in ``paths`` under every variant: ``{"summary": summarize(...), "images": [per image]}``."""
    rows = [{"image": Path(p).name, "panels": read_panels(predictor, p)} for p in paths]
    return {"summary": summarize(rows, predictor.accuracy), "images": rows}


def groups(entries: list[dict]) -> dict[str, list[int]]:
    """Indices of the manifest entries in each reported group: per kind, and per kind without grayscale images."""
    out: dict[str, list[int]] = {}
    for kind in sorted({e["kind"] for e in entries}, reverse=True):  # photo first
        out[kind] = [i for i, e in enumerate(entries) if e["kind"] == kind]
        out[f"{kind}, colour only"] = [i for i in out[kind] if not entries[i]["grayscale"]]
    return out


def table(by_group: dict[str, dict]) -> str:
    """The printed summary: per group, each panel's flagged share and top-1 agreement with the correct panel."""
    lines = []
    for name, s in by_group.items():
        if not s["images"]:
            continue
        lines.append(f"{name} ({s['images']} images): correct panel flagged {100 * s[CORRECT_KEY]['flagged']:.1f}%")
        lines.append(f"  {'variant':18s} {'cost':>6s} {'flagged':>8s} {'same top-1':>11s}")
        for key, v in s["variants"].items():
            cost = "" if v["accuracy_cost_points"] is None else f"{v['accuracy_cost_points']:.1f}"
            lines.append(f"  {key:18s} {cost:>6s} {100 * v['flagged']:7.1f}% {100 * v['top1_agrees_with_correct']:10.1f}%")
    return "\n".join(lines)


def code_fingerprint() -> dict[str, str]:
    """sha256 (12 hex digits) of the meter's and the predictor's source as imported: which meter was measured."""
    from cifar_transfer import meter, predictor

    return {Path(m.__file__).name: hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()[:12] for m in (meter, predictor)}


def shown(path: str) -> str:
    """A path as the result names it: repository-relative when inside the repository."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=(real_images.DESIGN, real_images.HELDOUT), default=real_images.DESIGN)
    p.add_argument("--checkpoint", default=str(CHECKPOINT))
    p.add_argument("--manifest", default=str(real_images.MANIFEST))
    p.add_argument("--output", default=str(REPO / "runs/real_images"), help="folder for the JSON result")
    p.add_argument("--name", help="file name of the result, without .json (default: meter-<split>)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    p.add_argument("--note", default="", help="a line kept in the result (e.g. which commit's meter was measured)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("cifar_transfer").setLevel(logging.ERROR)  # the predictor warns once per far-out image
    try:
        chosen = real_images.select(real_images.load_manifest(Path(args.manifest)), args.split)
    except real_images.ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    entries = [e for e, _ in chosen]
    t0 = time.perf_counter()
    predictor = build_predictor(args.checkpoint)
    result = measure(predictor, [f for _, f in chosen])
    rows = result["images"]
    by_group = {name: summarize([rows[i] for i in idx], predictor.accuracy) for name, idx in groups(entries).items()}
    out = {"split": args.split, "checkpoint": shown(args.checkpoint), "manifest": shown(args.manifest),
           "command": "python benchmarks/meter_on_real_images.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "note": args.note, "code": code_fingerprint(), "flagged_levels": list(FLAGGED), "wall_seconds": round(time.perf_counter() - t0, 1), "by_group": by_group}
    if args.split == real_images.DESIGN:
        out["images"] = [{"id": e["id"], "kind": e["kind"], "label": e["label"], "grayscale": e["grayscale"], **r}
                         for e, r in zip(entries, rows)]
    path = Path(args.output) / f"{args.name or 'meter-' + args.split}.json"
    atomic_write_json(path, out)
    print(table(by_group))
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
