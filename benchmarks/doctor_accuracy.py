"""Does the contract doctor hold on the folders people bring? (issue 20)

    python benchmarks/doctor_accuracy.py                    # CIFAR-10 test folders and the held-out real photographs
    python benchmarks/doctor_accuracy.py --photos DIR       # another folder of photographs
    python benchmarks/doctor_accuracy.py --split train      # the design data: CIFAR-10 train folders, design photos

Runs the doctor's command (``python -m cifar_transfer.doctor MODEL FOLDER --json``, in process) with the shipped
checkpoint and with the bare ``efficientnet_lite0`` backbone, both of which declare the contract their weights were
trained with (minus_one_one), on: the CIFAR-10 split folder as it lies on disk (its first files in sorted order are
all airplanes), each single-class folder, and a folder of photographs. Per run: the top-ranked candidate, the
verdict, whether it said DISAGREES, the candidates it could not separate, and how far the evidence went against the
correct contract (the first's margin over it in standard deviations of the per-image differences; the doctor
needs ``CONTENT_SPREAD`` of them, and 95% of bootstrap resamples, to say DISAGREES). And the doctor on a timm
ResNet-18 with freshly initialized batch-norm statistics (``pretrained=False``), which should answer "cannot judge".

Photographs: ``--photos DIR``; by default the real photographs of ``results/real_images/manifest.json`` (built by
``benchmarks/real_images.py`` under the git-ignored ``data/real_images/``) of the split's part (``heldout`` for
``--split test``, never designed on; ``design`` for ``--split train``), else the shipped ``examples/`` (which are
CIFAR-10 test images: said so in the output).

Writes ``results/doctor_accuracy/<split>.json`` and prints a table. The issue's targets: never "DISAGREES" with
the correct contract; the correct contract ranked first on at least 75% of the runs; "cannot judge" on untrained
statistics. Before/after: run it with another version of the package first on the path, e.g. the commit before
issue 20's doctor work (older doctors have no ``--seed`` and no verdict field; this script reads what they say)::

    mkdir -p /tmp/before && git archive 457a0bd cifar_transfer | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before python benchmarks/doctor_accuracy.py --output /tmp/before/results
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # appended: a PYTHONPATH package (another version, see above) comes first

import cifar_transfer  # noqa: E402
from cifar_transfer import doctor  # noqa: E402
from cifar_transfer.checkpoint import atomic_write_json  # noqa: E402
from cifar_transfer.contract import IMAGENET  # noqa: E402

CHECKPOINT = REPO / "checkpoints" / "efficientnet_lite0-cifar10"
BARE = "efficientnet_lite0"
DATA = REPO.parent / "shared" / "datasets" / "cifar10-jpeg"
MANIFEST = REPO / "results" / "real_images" / "manifest.json"
REAL_IMAGES = REPO / "data" / "real_images" / "images"
EXAMPLES = REPO / "examples"
PHOTO_PART = {"test": "heldout", "train": "design"}  # the real photographs' part measured with each CIFAR-10 split
TARGET_FIRST = 0.75  # the target share of runs with the correct contract ranked first


def photo_folder(given: str | None, split: str, scratch: Path) -> tuple[Path, str]:
    """The folder of photographs to run on, and what it is."""
    if given:
        return Path(given), f"{given} (given with --photos)"
    if MANIFEST.is_file() and REAL_IMAGES.is_dir():
        part = PHOTO_PART[split]
        files = [REAL_IMAGES / i["file"] for i in json.loads(MANIFEST.read_text())["images"]
                 if i["kind"] == "photo" and i["split"] == part]
        if files and all(f.is_file() for f in files):
            folder = scratch / f"photos-{part}"
            folder.mkdir()
            for f in files:
                (folder / f.name).symlink_to(f)
            return folder, (f"the {len(files)} {part} real photographs of {MANIFEST.relative_to(REPO)} "
                            f"(files under {REAL_IMAGES.relative_to(REPO)})")
    return EXAMPLES, f"{EXAMPLES.relative_to(REPO)}/ (CIFAR-10 test images: no real photographs here; build them with " \
                     "python benchmarks/real_images.py)"


def run_doctor(model: str, folder: Path, max_images: int, seed: int) -> dict:
    """The doctor's command on ``folder``, its JSON report."""
    argv = [model, str(folder), "--max-images", str(max_images), "--json"]
    if "--seed" in doctor.get_args_parser().format_help():
        argv += ["--seed", str(seed)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        doctor.main(argv)
    return json.loads(out.getvalue())


def summarize(report: dict) -> dict:
    """One run's row: what the doctor answered, against the correct (declared) contract."""
    agrees = report["agrees_with_declared"]
    verdict = report.get("verdict") or {True: "agrees", False: "DISAGREES", None: "not sure"}[agrees]
    declared_row = next((s for s in report["ranking"] if "declared" in s["aliases"] or s["name"] == "declared"), None)
    against = 0.0 if agrees or declared_row is None else declared_row.get("effect")
    return {"n_images": report["n_images"], "images": report["images"], "top": report["most_likely"],
            "verdict": verdict, "disagrees": verdict == "DISAGREES", "correct_first": agrees is True,
            "unresolved": report.get("unresolved"), "against_correct_sd": against,
            "effects_sd": {s["name"]: round(s["effect"], 2) for s in report["ranking"][1:] if "effect" in s},
            "headline": report.get("headline"), "confidence": report["confidence"]}


def untrained_resnet18(folder: Path, max_images: int) -> dict:
    """The doctor on timm's ResNet-18 with freshly initialized batch-norm statistics (declared: ImageNet's)."""
    net = timm.create_model("resnet18", pretrained=False).eval()
    net.contract = IMAGENET  # what its pretrained_cfg declares
    pixels = doctor.load_images(folder, 32, max_images)
    report = doctor.diagnose(net, pixels, name="timm resnet18, pretrained=False", images=str(folder))
    d = report.to_dict()
    return {"verdict": d.get("verdict") or ("DISAGREES" if d["agrees_with_declared"] is False else "ranked"),
            "headline": d.get("headline") or report.format().splitlines()[-1], "most_likely": d["most_likely"],
            "cannot_judge": d.get("verdict") == "cannot judge"}


def totals(rows: list[dict], untrained: dict) -> dict:
    first = sum(r["correct_first"] for r in rows)
    disagrees = sum(r["disagrees"] for r in rows)
    verdicts = {v: sum(r["verdict"] == v for r in rows) for v in dict.fromkeys(r["verdict"] for r in rows)}
    return {"runs": len(rows), "correct_first": first, "correct_first_share": round(first / len(rows), 4),
            "disagrees_with_correct": disagrees, "verdicts": verdicts, "untrained_resnet18": untrained["verdict"],
            "targets": {"never_disagrees": disagrees == 0,
                        f"correct_first_at_least_{TARGET_FIRST:g}": first / len(rows) >= TARGET_FIRST,
                        "untrained_cannot_judge": untrained["cannot_judge"]}}


def table(rows: list[dict], summary: dict) -> str:
    lines = ["| model | folder | images | top-ranked | verdict | DISAGREES | not separated from the first "
             "| against correct (sd) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        unresolved = ", ".join(r["unresolved"]) if r["unresolved"] is not None else "(not reported)"
        against = "" if r["against_correct_sd"] is None else f"{r['against_correct_sd']:.2f}"
        lines.append(f"| {r['model']} | {r['folder']} | {r['n_images']} | {r['top']} | {r['verdict']} | "
                     f"{'yes' if r['disagrees'] else 'no'} | {unresolved} | {against} |")
    s = summary
    lines += ["", f"correct contract ranked first: {s['correct_first']} of {s['runs']} runs "
                  f"({100 * s['correct_first_share']:.0f}%); "
                  f"DISAGREES with the correct contract: {s['disagrees_with_correct']}; verdicts: {s['verdicts']}; "
                  f"untrained ResNet-18: {s['untrained_resnet18']}", f"targets met: {s['targets']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DATA, help="the CIFAR-10 JPEG copy (class folders under <split>/)")
    p.add_argument("--split", choices=sorted(PHOTO_PART), default="test",
                   help="CIFAR-10 split to read; train is the design data, test is measured")
    p.add_argument("--photos", help="folder of photographs (default: the real photographs, else examples/)")
    p.add_argument("--max-images", type=int, default=64, help="the doctor's --max-images (its default)")
    p.add_argument("--seed", type=int, default=0, help="the doctor's --seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", type=Path, default=REPO / "results" / "doctor_accuracy")
    args = p.parse_args(argv)
    root = args.data_dir / args.split
    if not root.is_dir():
        raise SystemExit(f"error: no {args.split}/ folder under {args.data_dir}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        photos, photos_are = photo_folder(args.photos, args.split, Path(scratch))
        folders = [(f"{args.split}/ (as on disk)", root)]
        folders += [(f"{args.split}/{c.name}", c) for c in sorted(root.iterdir()) if c.is_dir()]
        folders += [("photographs", photos)]
        rows = []
        for model, label in ((str(CHECKPOINT), "shipped checkpoint"), (BARE, f"bare {BARE}")):
            for name, folder in folders:
                t = time.perf_counter()
                row = {"model": label, "folder": name, **summarize(run_doctor(model, folder, args.max_images, args.seed))}
                row["seconds"] = round(time.perf_counter() - t, 1)
                rows.append(row)
                print(f"{label:<26} {name:<24} {row['top']:<16} {row['verdict']:<12} ({row['seconds']} s)", flush=True)
        untrained = untrained_resnet18(root, args.max_images)
    summary = totals(rows, untrained)
    path = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    result = {"command": f"{path}python benchmarks/doctor_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "package": str(Path(cifar_transfer.__file__).parent), "date": time.strftime("%Y-%m-%d"),
              "split": args.split, "max_images": args.max_images, "seed": args.seed, "photographs": photos_are,
              "correct_contract": "minus_one_one (declared by both models)",
              "content_spread": getattr(doctor, "CONTENT_SPREAD", None), "wall_seconds": round(time.perf_counter() - t0, 1),
              "summary": summary, "untrained_resnet18": untrained, "runs": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.output / f"{args.split}.json", result)
    print()
    print(table(rows, summary))
    print(f"\nphotographs: {photos_are}\nwrote {args.output / f'{args.split}.json'}")


if __name__ == "__main__":
    main()
