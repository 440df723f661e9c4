"""Fitting the contract meter's calibration: ``python -m cifar_transfer.meter CHECKPOINT_DIR --data-dir DATA``.

The meter (``meter.py``) reads a calibration; this module builds one from correctly
preprocessed training images and every known mistake: shrinkage-LDA directions,
their centres and scales, and thresholds derived from a held-out third of the images
(split-conformal for single images, predictive draws of one class at a time for
batches). :func:`derived_thresholds` recomputes a stored calibration's thresholds from
the held-out scores it records (what its ``thresholds`` must equal).
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, batchnorm_layers, fingerprint
from .contract import variant_contracts
from .images import ImageInputError, read_square
from .meter import CALIBRATION_FILE, FEATURES, CalibrationError, MeterCalibration, meter_features
from .model import load_checkpoint

#: Normalization mistakes the meter is told about (bgr is read by the paired channel check instead).
MISTAKES = ("no_normalization", "raw_0_255", "other_model_stats", "cifar10_stats", "normalized_twice")
SHRINKAGE = 0.5  # LDA covariance shrinkage towards its diagonal
DRIFTING_QUANTILE = 0.98  # conformal level of the score: a new correct image exceeds it with probability <= 2%
CHANNEL_QUANTILE = 0.02  # conformal level of the channel score: a new correct image falls below with probability <= 2%
BROKEN_FACTOR = 3.0  # broken: this many times the largest correct held-out score
BATCH_SIZES = (2, 4, 8, 16, 32, 64)  # batch statistics get their own thresholds
BATCH_DRAWS = 4000
#: Shares of the calibration images: LDA directions / centres and scales / thresholds (three disjoint parts, so the
#: threshold images are new to everything the score is made of, as a user's images are).
SPLIT = {"fit": 0.5, "standardize": 0.25, "threshold": 0.25}


def conformal_upper(scores: torch.Tensor, level: float) -> float:
    """The ``ceil((n + 1) * level)``-th smallest of ``n`` scores: a new score exchangeable with them exceeds it
    with probability at most ``1 - level`` (split-conformal finite-sample correction; a plain quantile promises
    that only as n grows)."""
    n = len(scores)
    k = math.ceil((n + 1) * level - 1e-9)
    if k > n:
        raise ValueError(f"{n} scores are too few for a level of {level}")
    return scores.double().sort().values[k - 1].item()


def conformal_lower(scores: torch.Tensor, level: float) -> float:
    """The ``floor((n + 1) * level)``-th smallest of ``n`` scores: a new exchangeable score falls below it with
    probability at most ``level``."""
    n = len(scores)
    k = math.floor((n + 1) * level + 1e-9)
    if k < 1:
        raise ValueError(f"{n} scores are too few for a level of {level}")
    return scores.double().sort().values[k - 1].item()


def predictive_batch_statistics(z: torch.Tensor, size: int, draws: int, seed: int,
                                groups: torch.Tensor | None = None) -> torch.Tensor:
    """``(draws, ...)`` simulated batch statistics ``sqrt(size) * mean`` of ``size`` NEW correct images, from the
    scores ``z`` (``(N, ...)``) of held-out correct images.

    A new batch's mean differs from the mean of the population it comes from by its own sampling noise
    (variance s^2 / size), and that population's mean is known only from the held-out images (error s^2 / N).
    Each draw adds both: ``size`` images drawn with replacement, plus the shift of a bootstrap resample of the
    population's held-out images from their mean. With ``groups`` (one label per image: the class), each draw
    takes its images from ONE random group: a batch of a single class (a data loader that does not shuffle) sits
    farther from the training mean than a mixed one, so thresholds from these draws hold for both, and leave a
    margin as large as the classes' spread for images from another source. Drawing batches from the held-out
    images alone (without replacement, without the shift, mixed classes) gives thresholds too tight for images
    never seen."""
    g = torch.Generator().manual_seed(seed)
    z = z.double()
    pools = [torch.arange(len(z))] if groups is None else [torch.nonzero(groups == v).flatten() for v in groups.unique()]
    pools = [p for p in pools if len(p) > 1]
    which = torch.randint(len(pools), (draws,), generator=g)
    out = torch.empty((draws, *z.shape[1:]), dtype=torch.float64)
    for i, pool in enumerate(pools):
        d = int((which == i).sum())
        if not d:
            continue
        zp = z[pool]
        batch = zp[torch.randint(len(pool), (d, size), generator=g)].mean(dim=1)
        shift = zp[torch.randint(len(pool), (d, len(pool)), generator=g)].mean(dim=1) - zp.mean(dim=0)
        out[which == i] = (batch + shift) * size ** 0.5
    return out


def derive_thresholds(per_mistake: torch.Tensor, channel: torch.Tensor | None, derivation: dict,
                      groups: torch.Tensor | None = None) -> dict:
    """The meter's thresholds from the scores of held-out correct images, as ``derivation`` records how.

    ``per_mistake``: ``(N, M)`` standardized discriminants; ``channel``: ``(N,)`` paired channel scores (or None);
    ``groups``: the images' classes, for batch draws of one class each (see :func:`predictive_batch_statistics`)."""
    score = per_mistake.double().max(dim=1).values
    out = {"drifting": round(conformal_upper(score, derivation["drifting_quantile"]), 4),
           "broken": round(derivation["broken_factor"] * score.max().item(), 4)}
    if channel is not None:
        out["channel"] = round(conformal_lower(channel, derivation["channel_quantile"]), 4)
    out["batch"] = {}
    for size in derivation["batch_sizes"]:
        stat = predictive_batch_statistics(per_mistake, size, derivation["batch_draws"], derivation["seed"] + size, groups)
        row = {"drifting": round(torch.quantile(stat.max(dim=1).values, derivation["drifting_quantile"]).item(), 4)}
        if channel is not None:
            chan = predictive_batch_statistics(channel[:, None], size, derivation["batch_draws"],
                                               derivation["seed"] + 1000 + size, groups)
            row["channel"] = round(torch.quantile(chan[:, 0], derivation["channel_quantile"]).item(), 4)
        out["batch"][str(size)] = row
    return out


def _lda(a: torch.Tensor, b: torch.Tensor, shrinkage: float) -> torch.Tensor:
    cov = 0.5 * (torch.cov(a.T) + torch.cov(b.T))
    cov = (1 - shrinkage) * cov + shrinkage * torch.diag(cov.diag())
    cov = cov + 1e-9 * cov.diag().mean() * torch.eye(len(cov), dtype=cov.dtype)
    return torch.linalg.solve(cov, b.mean(0) - a.mean(0))


def derived_thresholds(cal: MeterCalibration) -> dict:
    """The thresholds of ``cal`` recomputed from its ``held_out_scores`` as its ``derivation`` records (what
    ``cal.thresholds`` must equal)."""
    if not cal.held_out_scores:
        raise CalibrationError("this calibration does not record the held-out scores its thresholds came from")
    h = cal.held_out_scores
    return derive_thresholds(torch.tensor(h["per_mistake"], dtype=torch.float64),
                             torch.tensor(h["channel"], dtype=torch.float64) if h.get("channel") is not None else None,
                             cal.derivation, torch.tensor(h["class"]) if h.get("class") is not None else None)


def split_indices(n: int, seed: int, split: dict | None = None) -> dict[str, torch.Tensor]:
    """Seeded disjoint parts of ``n`` calibration images, named and sized as ``split`` (default :data:`SPLIT`)."""
    split = SPLIT if split is None else split
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for i, (name, share) in enumerate(split.items()):
        stop = n if i == len(split) - 1 else start + round(share * n)
        out[name] = perm[start:stop]
        start = stop
    return out


def fit_calibration(model: nn.Module, features: dict[str, torch.Tensor], twin_correct: torch.Tensor,
                    twin_features: dict[str, torch.Tensor] | None = None, *, source: str = "",
                    layers: list[int] | None = None, seed: int = 0,
                    groups: torch.Tensor | None = None) -> MeterCalibration:
    """Fit the meter on per-image ``features`` of training images under ``correct`` and each mistake.

    ``twin_correct``: features of the correct inputs' channel-swapped twins. ``layers`` (indices into
    :func:`batchnorm_layers`; default all): which layers' features the meter reads (``features`` hold all
    of them). Images are split in three (seeded, :data:`SPLIT`): directions from the first part, centres
    and scales from the second, thresholds (:func:`derive_thresholds`) and the recorded rates from the third.
    ``groups``: each image's class (batch thresholds then hold for batches of one class; recorded).
    """
    all_layers = batchnorm_layers(model)
    layers = list(range(len(all_layers))) if layers is None else list(layers)
    cols = torch.tensor([3 * i + j for i in layers for j in range(len(FEATURES))])
    if features["correct"].shape[1] != len(cols):
        features = {k: v[:, cols] for k, v in features.items()}
        twin_correct = twin_correct[:, cols]
        twin_features = {k: v[:, cols] for k, v in (twin_features or {}).items()}
    n = len(features["correct"])
    parts = split_indices(n, seed)
    fit, std, held = parts["fit"], parts["standardize"], parts["threshold"]
    x0 = features["correct"].double()
    directions, centres, scales = [], [], []
    for m in MISTAKES:  # direction from the fit part; centre and scale from the standardize part (no in-sample bias)
        w = _lda(x0[fit], features[m].double()[fit], SHRINKAGE)
        p = x0[std] @ w
        directions.append(w.tolist()); centres.append(p.mean().item()); scales.append(p.std().item())
    diff = x0 - twin_correct.double()
    wc = _lda(-diff[fit], diff[fit], SHRINKAGE)  # antisymmetric: a swapped input gives -diff
    channel_scale = (diff[std] @ wc).std().item()
    cal = MeterCalibration(fingerprint(model), layers, [all_layers[i][0] for i in layers], list(MISTAKES), directions,
                           centres, scales, wc.tolist(), channel_scale, {}, {}, {})
    s0 = cal.scores(x0[held], twin_correct[held])
    cal.derivation = {
        "images": source, "n_images": n, "fit_images": len(fit), "standardize_images": len(std),
        "held_out_images": len(held), "seed": seed, "split": dict(SPLIT),
        "features": list(FEATURES), "shrinkage": SHRINKAGE, "drifting_quantile": DRIFTING_QUANTILE,
        "channel_quantile": CHANNEL_QUANTILE, "broken_factor": BROKEN_FACTOR, "batch_sizes": list(BATCH_SIZES),
        "batch_draws": BATCH_DRAWS, "batch_draws_from": "one class" if groups is not None else "all held-out images",
        "how": ("Three seeded disjoint parts of the training images (split). Directions: shrinkage LDA between correct "
                "and each mistake on the fit part; each standardized (centre, scale) by the correct standardize-part "
                "images' projections; score = the largest. Channel: LDA on features(input) - features(channel-swapped "
                "input), antisymmetric, scaled on the standardize part. Thresholds from the held-out (threshold) part, "
                "new to the directions, centres and scales as a user's images are, whose scores are recorded in "
                "held_out_scores (derive_thresholds recomputes every threshold from them): drifting = the "
                "ceil((n+1) x drifting_quantile)-th smallest score and channel = the floor((n+1) x channel_quantile)-th "
                "smallest channel score (split-conformal: a new correct image crosses each with probability at most "
                "1 - drifting_quantile, resp. channel_quantile); broken = broken_factor x the largest held-out score; "
                "for a batch of n (sqrt(n) x the mean per-mistake score, the largest; sqrt(n) x the mean channel "
                "score) the same quantiles of batch_draws predictive draws: n held-out images drawn with replacement "
                "plus the shift of a bootstrap resample of their mean (the error of the centre the batch is compared "
                "with), each draw from the held-out images of one random class when batch_draws_from says so "
                "(predictive_batch_statistics)."),
    }
    cal.held_out_scores = {"per_mistake": [[round(v, 4) for v in row] for row in s0.per_mistake.tolist()],
                           "channel": [round(v, 4) for v in s0.channel.tolist()]}
    if groups is not None:
        cal.held_out_scores["class"] = [int(v) for v in torch.as_tensor(groups)[held].tolist()]
    cal.thresholds = derived_thresholds(cal)
    twin_features = twin_features or {}
    measured = {}
    for key, f in features.items():
        tw = twin_features.get(key, twin_correct if key == "correct" else None)
        s = cal.scores(f[held], None if tw is None else tw[held])
        flagged = s.score > cal.thresholds["drifting"]
        row = {"score_flag_rate": round(flagged.float().mean().item(), 4)}
        if s.channel is not None:
            row["channel_flag_rate"] = round((s.channel < cal.thresholds["channel"]).float().mean().item(), 4)
            flagged = flagged | (s.channel < cal.thresholds["channel"])
        row["flag_rate"] = round(flagged.float().mean().item(), 4)
        measured[key] = row
    cal.measured = measured
    return cal


def _training_pixels(data_dir: Path, per_class: int, seed: int, with_labels: bool = False, *, side: int = 32,
                     contract=None):
    """``per_class`` seeded training images of each class, as ``(N, 3, side, side)`` uint8 (and their class indices).

    Read by the one image pipeline (:func:`cifar_transfer.images.read_square` at ``side``, ``contract``'s resize
    policy; default: the dataset's 32 px and centre crop): the pixels the dataset stores for these files, so a
    32 x 32 CIFAR-10 image is kept exactly as decoded.
    """


    root = Path(data_dir) / "train"
    if not root.is_dir():
        raise SystemExit(f"error: no train/ folder under {data_dir}")
    rng = random.Random(seed)
    paths, labels = [], []
    for i, c in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        files = sorted((root / c).iterdir())
        chosen = rng.sample(files, min(per_class, len(files)))
        paths += chosen
        labels += [i] * len(chosen)
    arrays = []
    for p in paths:
        try:
            arrays.append(read_square(p, side, contract))
        except ImageInputError as exc:
            raise SystemExit(f"error: cannot read training image {p}: {exc}") from None
    return (torch.stack(arrays), torch.tensor(labels)) if with_labels else torch.stack(arrays)


def calibrate(model: nn.Module, pixels: torch.Tensor, source: str = "", seed: int = 0, log=print,
              cache: str | Path | None = None, labels: torch.Tensor | None = None) -> MeterCalibration:
    """Calibrate on RGB uint8 training ``pixels`` (N, 3, H, W): every variant of the model's contract, one pass each.

    ``cache``: a file for the features (read when it exists, else written), to refit without the forward passes.
    ``labels``: the images' classes (see :func:`fit_calibration`'s ``groups``).
    """

    if cache is not None and Path(cache).is_file():
        data = torch.load(cache)
        return fit_calibration(model, data["features"], data["twins"]["correct"], data["twins"], source=source, seed=seed,
                               groups=labels)
    contracts = variant_contracts(model.contract)
    base = contracts["correct"].transform().resize(pixels.float())
    features, twins = {}, {}
    for key, c in contracts.items():
        log(f"  features under {key} ({len(pixels)} images)")
        f, t = meter_features(model, c.transform()(base), twin=key in ("correct", "bgr"))
        features[key] = f
        if t is not None:
            twins[key] = t
    if cache is not None:
        torch.save({"features": features, "twins": twins}, cache)
    return fit_calibration(model, features, twins["correct"], twins, source=source, seed=seed, groups=labels)


# -- the calibration file beside its weights, and the command that writes it ---------------------------------


def fewest_scores() -> int:
    """The fewest held-out scores the thresholds can come from: :func:`conformal_upper` at
    :data:`DRIFTING_QUANTILE` and :func:`conformal_lower` at :data:`CHANNEL_QUANTILE`, asked as the fit asks them."""
    for n in range(1, 100_000):
        try:
            conformal_upper(torch.zeros(n), DRIFTING_QUANTILE)
            conformal_lower(torch.zeros(n), CHANNEL_QUANTILE)
            return n
        except ValueError:
            continue
    raise ValueError(f"no number of scores reaches the levels {DRIFTING_QUANTILE} and {CHANNEL_QUANTILE}")


def fewest_per_class(class_sizes: list[int], seed: int = 0) -> int | None:
    """The smallest ``--per-class`` whose threshold part (:func:`split_indices`) holds :func:`fewest_scores` images,
    for classes of ``class_sizes`` images; None: all of them are too few."""
    need = fewest_scores()
    for per_class in range(1, max(class_sizes, default=0) + 1):
        if len(split_indices(sum(min(per_class, size) for size in class_sizes), seed)["threshold"]) >= need:
            return per_class
    return None


def main(argv: list[str] | None = None) -> None:

    p = argparse.ArgumentParser(prog="python -m cifar_transfer.meter",
                                description="Calibrate the contract meter of a checkpoint on CIFAR-10 training images.")
    p.add_argument("checkpoint", help="checkpoint folder; the calibration is written there as " + CALIBRATION_FILE)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 JPEG copy (its train/ class folders are read)")
    p.add_argument("--per-class", type=int, default=250,
                   help="training images per class (split in three: directions, standardization, thresholds; "
                        "the thresholds need enough of them: the minimum is checked before any work)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", help="features file: read when present (refit only), else written")
    p.add_argument("--overwrite", action="store_true", help=f"replace the {CALIBRATION_FILE} already in the folder")
    args = p.parse_args(argv)

    out = Path(args.checkpoint) / CALIBRATION_FILE
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} already exists; not replacing it: pass --overwrite to rebuild it")
    train = Path(args.data_dir) / "train"
    if not train.is_dir():
        raise SystemExit(f"error: no train/ folder under {args.data_dir}")
    sizes = [sum(1 for _ in c.iterdir()) for c in train.iterdir() if c.is_dir()]
    fewest = fewest_per_class(sizes, args.seed)
    if fewest is None or args.per_class < fewest:
        have = (f"at least {fewest} per class for these {len(sizes)} classes" if fewest else
                f"more than the {sum(sizes)} images of {train}")
        p.error(f"--per-class {args.per_class} is too few: the thresholds need {fewest_scores()} held-out images "
                f"(the {SPLIT['threshold']:.0%} share of all), so {have}")
    torch.set_num_threads(args.threads)
    try:
        model = load_checkpoint(args.checkpoint).eval()
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    pixels, labels = _training_pixels(Path(args.data_dir), args.per_class, args.seed, with_labels=True)
    source = f"CIFAR-10 train split, {args.per_class} per class, seed {args.seed}"
    cal = calibrate(model, pixels, source=source, seed=args.seed, cache=args.cache, labels=labels)
    # what rebuilds this file (--cache only skips the forward passes of a previous run of the same command)
    cal.derivation["command"] = (f"python -m cifar_transfer.meter {args.checkpoint} --data-dir {args.data_dir} "
                                 f"--per-class {args.per_class} --seed {args.seed}")
    cal.save(out)
    print(f"wrote {out}: thresholds {cal.thresholds}")
    for k, v in cal.measured.items():
        print(f"  {k:<18} {v}")


if __name__ == "__main__":
    main()
