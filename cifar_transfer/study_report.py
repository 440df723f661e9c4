"""What the study's cells say: one table per regime, a verdict per claim, the docs' compact table (docs/study.md), the
summary (markdown) and the plots; :func:`save_png` and :func:`table_html` also serve the quick experiment's
results. Every number is read from the cells (:mod:`cifar_transfer.study_results`).
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from .checkpoint import atomic_write_bytes
from .contract import CORRECT_KEY, WRONG_VARIANTS, variant_title
from .study_results import COMMAND, CURVE_EVALS, DEFINITIONS, REGIMES, diff_interval, study_command

# -- reading the results: tables and verdicts ----------------------------------------------------------


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def index(cells: list[dict]) -> dict:
    """``{regime: {seed: {variant: cell}}}``."""
    out: dict = {}
    for c in cells:
        out.setdefault(c["regime"], {}).setdefault(c["seed"], {})[c["variant"]] = c
    return out


def read_size(cell: dict) -> int:
    """The input size a cell's network read: its regime's own, else the study's."""
    return cell["setup"]["regime"].get("input_size") or cell["setup"]["input_size"]


def steps_to_target(cell: dict, target: float | None) -> int | None:
    if target is None:
        return None
    for step, acc in zip(cell["curve"]["step"], cell["curve"]["test_subset_acc"]):
        if acc is not None and acc >= 0.95 * target:
            return step
    return None


def table_markdown(cells: list[dict]) -> str:
    """One table per regime: accuracy ± interval per seed, served-wrong accuracy, divergence, flags."""
    lines = []
    for regime_key, by_seed in index(cells).items():
        regime = REGIMES.get(regime_key)
        seeds = sorted(by_seed)
        lines += [f"**{regime.title if regime else regime_key}**", "",
                  "| preprocessing | " + " | ".join(f"trained & tested (seed {s})" for s in seeds)
                  + " | served wrong (trained right) | first-BN divergence start → end | all-BN divergence start → end"
                  " | steps to 95% of correct | diverged / collapsed |",
                  "|---|" + "---:|" * len(seeds) + "---:|---:|---:|---:|---|"]
        variants = _rows(*(by_seed[s] for s in seeds))
        for v in variants:
            row = [variant_title(v) if v in WRONG_VARIANTS or v == CORRECT_KEY else v]
            for s in seeds:
                c = by_seed[s].get(v)
                t = c["test"] if c else None
                row.append("—" if not t or t["accuracy"] is None
                           else f"{pct(t['accuracy'])} [{pct(t['ci95'][0])}, {pct(t['ci95'][1])}]")
            c0 = by_seed[seeds[0]].get(v)
            correct0 = by_seed[seeds[0]].get(CORRECT_KEY)
            served = (correct0 or {}).get("served_wrong", {}).get(v)
            row.append("(the model's own)" if v == CORRECT_KEY else (pct(served["accuracy"]) if served else "—"))
            if c0:
                d0, d1 = c0["divergence"]["start"], c0["divergence"]["end"]
                row.append(f"{_num(d0['first_bn'])} → {_num(d1['first_bn'])}")
                row.append(f"{_num(d0['all_bn'])} → {_num(d1['all_bn'])}")
                target = ((correct0 or {}).get("curve", {}).get("test_subset_acc") or [None])[-1]
                st = steps_to_target(c0, target)
                row.append("never" if st is None else f"{st} of {c0['steps']}")
                row.append(f"{'yes' if c0['diverged'] else 'no'} / {'yes' if c0['collapsed'] else 'no'}")
            else:
                row += ["—"] * 4
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def _rows(*by_variant: dict) -> list[str]:
    """The preprocessings a table shows: those trained (cells of ``by_variant``, ``{variant: cell}`` per seed), then
    those only served so far (the correct cell serves every wrong variant before any of them is trained)."""
    trained = [v for cells in by_variant for v in cells]
    served = [v for cells in by_variant for v in cells.get(CORRECT_KEY, {}).get("served_wrong", {})]
    return list(dict.fromkeys(trained + served))


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.3e}"


def verdicts(cells: list[dict]) -> list[dict]:
    """A verdict per seed claim per regime, from the cells alone: ``{"claim", "regime", "verdict", "evidence"}``."""
    out = []
    for regime_key, by_seed in index(cells).items():
        seed = min(by_seed)
        cs = by_seed[seed]
        correct = cs.get(CORRECT_KEY)
        if not correct or correct["test"]["accuracy"] is None:
            continue
        wrong = {k: c for k, c in cs.items() if k != CORRECT_KEY}
        n = correct["test"]["n"]
        pc = correct["test"]["accuracy"]

        def add(claim: str, verdict: str, evidence: str) -> None:
            out.append({"claim": claim, "regime": regime_key, "verdict": verdict, "evidence": evidence})

        def add_served() -> None:  # needs the correct cell alone: it serves every wrong variant
            served = correct.get("served_wrong", {})
            if served:
                drops = {k: v["accuracy"] - pc for k, v in served.items() if v["accuracy"] is not None}
                add("Accuracy drops silently (trained right, served wrong)",
                    f"a drop for {sum(d < 0 and diff_interval(pc + d, n, pc, n)[1] < 0 for d in drops.values())} "
                    f"of {len(drops)} variants",
                    "points vs the correct contract: " + "; ".join(f"{k} {_pts(d)}" for k, d in drops.items()))

        if not wrong:
            add_served()
            continue

        # features mis-scaled
        f0 = correct["divergence"]["start"]["feature_norm"]
        ratios = {k: c["divergence"]["start"]["feature_norm"] / f0 for k, c in wrong.items()
                  if f0 and c["divergence"]["start"]["feature_norm"] is not None}
        f1 = correct["divergence"]["end"]["feature_norm"]
        ratios_end = {k: c["divergence"]["end"]["feature_norm"] / f1 for k, c in wrong.items()
                      if f1 and c["divergence"]["end"]["feature_norm"] is not None}
        off = [k for k, r in ratios.items() if not 0.8 <= r <= 1.25]
        add("Features are mis-scaled", f"yes for {len(off)} of {len(ratios)} variants before training",
            "pooled-feature norm relative to the correct contract, before → after training: " + "; ".join(
                f"{k} ×{ratios[k]:.2f} → ×{ratios_end.get(k, float('nan')):.2f}" for k in ratios)
            + " (outside ×0.8–×1.25 counts as mis-scaled)")
        # batch-norm statistics shifted: where the input enters (first layer) and over every layer
        def shift(c: dict, when: str, where: str) -> float | None:
            return c["divergence"][when][where]

        first0, first1 = shift(correct, "start", "first_bn"), shift(correct, "end", "first_bn")
        more = [k for k, c in wrong.items() if (shift(c, "start", "first_bn") or 0) > 1.5 * first0]
        still = [k for k, c in wrong.items() if (shift(c, "end", "first_bn") or 0) > 1.5 * first1]
        add("Batch-norm layers see shifted statistics",
            f"yes at the first layer for {len(more)} of {len(wrong)} variants before training; after training "
            f"{len(still)} still above 1.5× the correct model's",
            f"first-BN divergence (median per image) correct {first0:.3g} → {first1:.3g}; " + "; ".join(
                f"{k} {_num(shift(c, 'start', 'first_bn'))} → {_num(shift(c, 'end', 'first_bn'))}" for k, c in wrong.items())
            + f". Averaged over every BN layer: correct {_num(shift(correct, 'start', 'all_bn'))} → "
            f"{_num(shift(correct, 'end', 'all_bn'))}; " + "; ".join(
                f"{k} {_num(shift(c, 'start', 'all_bn'))} → {_num(shift(c, 'end', 'all_bn'))}" for k, c in wrong.items()))
        # unstable gradients
        g0 = correct["grad_norm"]
        unstable = [k for k, c in wrong.items() if c["grad_norm"]["nonfinite"] or (
            g0["p90"] and c["grad_norm"]["p90"] is not None and c["grad_norm"]["p90"] > 1.5 * g0["p90"])
            or c["grad_norm"]["spikes"] > 2 * g0["spikes"] + 2]
        add("Gradients are unstable", f"less stable for {len(unstable)} of {len(wrong)} variants",
            "gradient norm median / p90 / max / spikes above 10x the median / non-finite: correct "
            f"{_num(g0['median'])} / {_num(g0['p90'])} / {_num(g0['max'])} / {g0['spikes']} / {g0['nonfinite']}; "
            + "; ".join(f"{k} {_num(c['grad_norm']['median'])} / {_num(c['grad_norm']['p90'])} / "
                        f"{_num(c['grad_norm']['max'])} / {c['grad_norm']['spikes']} / {c['grad_norm']['nonfinite']}"
                        for k, c in wrong.items())
            + " (less stable: p90 above 1.5x the correct run's, more than twice its spikes + 2, or any non-finite)")
        # slow convergence
        target = (correct["curve"]["test_subset_acc"] or [None])[-1]
        st_c = steps_to_target(correct, target)
        slow = {k: steps_to_target(c, target) for k, c in wrong.items()}
        slower = [k for k, s in slow.items() if s is None or (st_c is not None and s > st_c)]
        add("Training converges slowly", f"slower for {len(slower)} of {len(slow)} variants",
            f"first of {CURVE_EVALS} curve points reaching 95% of the correct cell's final test-subset accuracy "
            f"({pct(target)}): correct at step {st_c}; " + "; ".join(
                f"{k} {'never' if s is None else f'step {s}'}" for k, s in slow.items()))
        # collapse
        bad = [k for k, c in wrong.items() if c["diverged"] or c["collapsed"]]
        add("Training collapses", f"{len(bad)} of {len(wrong)} variants diverged or collapsed",
            f"correct contract: diverged={correct['diverged']}, collapsed={correct['collapsed']}; "
            + ("; ".join(f"{k}: diverged={wrong[k]['diverged']}, collapsed={wrong[k]['collapsed']}, stopped at step "
                       f"{wrong[k]['stopped_at']}" for k in bad) or "none")
            + f" (definitions: diverged = {DEFINITIONS['diverged']}; collapsed = {DEFINITIONS['collapsed']})")
        # accuracy drop, trained and tested consistently
        diffs = {}
        for k, c in wrong.items():
            p = c["test"]["accuracy"]
            diffs[k] = (None, None) if p is None else (p - pc, diff_interval(p, c["test"]["n"], pc, n))
        correct_by_seed = [by_seed[s][CORRECT_KEY]["test"]["accuracy"] for s in sorted(by_seed)
                           if CORRECT_KEY in by_seed[s] and by_seed[s][CORRECT_KEY]["test"]["accuracy"] is not None]
        spread = max(correct_by_seed) - min(correct_by_seed)  # training noise between seeds (0 with one seed)

        def seed_diffs(k: str) -> list[float]:  # the variant's difference to the correct contract in every seed
            return [by_seed[s][k]["test"]["accuracy"] - by_seed[s][CORRECT_KEY]["test"]["accuracy"] for s in by_seed
                    if k in by_seed[s] and CORRECT_KEY in by_seed[s] and by_seed[s][k]["test"]["accuracy"] is not None
                    and by_seed[s][CORRECT_KEY]["test"]["accuracy"] is not None]

        # beyond the test-sampling interval, beyond the seed spread, and the same sign in every seed
        worse = [k for k, (d, ci) in diffs.items()
                 if d is None or (ci[1] < 0 and -d > spread and all(x < 0 for x in seed_diffs(k)))]
        better = [k for k, (d, ci) in diffs.items()
                  if d is not None and ci[0] > 0 and d > spread and all(x > 0 for x in seed_diffs(k))]

        def other_seeds(k: str) -> str:
            notes = []
            for s in sorted(by_seed):
                c, ref = by_seed[s].get(k), by_seed[s].get(CORRECT_KEY)
                if s != seed and c and ref and c["test"]["accuracy"] is not None and ref["test"]["accuracy"] is not None:
                    notes.append(f"seed {s}: {_pts(c['test']['accuracy'] - ref['test']['accuracy'])}")
            return f" ({', '.join(notes)})" if notes else ""

        seeds_note = ""
        if len(by_seed) > 1:
            accs = [(s, by_seed[s][CORRECT_KEY]["test"]["accuracy"]) for s in sorted(by_seed)
                    if CORRECT_KEY in by_seed[s] and by_seed[s][CORRECT_KEY]["test"]["accuracy"] is not None]
            seeds_note = ("; the correct contract by seed: " + ", ".join(f"{pct(a, 2)} (seed {s})" for s, a in accs)
                          + f": a spread of {100 * spread:.1f} points, which a difference must also exceed")
        add("Accuracy drops silently (trained and served the same wrong way)",
            f"a drop beyond noise for {len(worse)} of {len(diffs)} variants"
            + (f", a gain for {len(better)}" if better else ""),
            f"difference to the correct contract ({pct(pc, 2)}, seed {seed}), points with 95% interval: " + "; ".join(
                f"{k} {'no score' if d is None else _pts(d)} [{'' if d is None else _pts(ci[0])}, "
                f"{'' if d is None else _pts(ci[1])}]{other_seeds(k)}" for k, (d, ci) in diffs.items()) + seeds_note)
        add_served()
    return out


def verdicts_markdown(cells: list[dict]) -> str:
    rows = verdicts(cells)
    if not rows:
        return ""
    lines = ["| claim | regime | verdict | evidence |", "|---|---|---|---|"]
    for v in rows:
        lines.append(f"| {v['claim']} | {v['regime']} | {v['verdict']} | {v['evidence']} |")
    return "\n".join(lines)


def summary_markdown(cells: list[dict]) -> str:
    if not cells:
        return f"No study results yet: run `{COMMAND}`."
    size = cells[0]["setup"]["input_size"]
    seeds = sorted({c["seed"] for c in cells})
    wall = sum(c["wall_seconds"] for c in cells)
    places = {}
    for c in cells:
        env = c.get("environment", {})
        name = env.get("gpu") or (f"{env['cpu']} ({env.get('cpu_count', '?')} cores)" if env.get("cpu") else "?")
        places[name] = places.get(name, 0) + 1
    where = " and ".join(f"{name} ({n} cells)" if len(places) > 1 else name for name, n in places.items())
    own = {c["regime"]: read_size(c) for c in cells if read_size(c) != size}  # regimes that read another size
    sizes = f"{size} px" + (f" ({', '.join(f'{r}: {s} px' for r, s in own.items())})" if own else "")
    head = (f"{len(cells)} cells (regime × preprocessing × seed; seeds {', '.join(map(str, seeds))}), "
            f"{sizes}, {cells[0]['test']['n']} test images each, "
            f"{wall / 60:.1f} min of training and scoring on {where}. Reproduce: `{study_command(size)} --seeds "
            f"{' '.join(map(str, seeds))}` (each cell records the exact command it ran under).")
    return "\n\n".join(x for x in (head, table_markdown(cells), verdicts_markdown(cells)) if x)


def progress_note(cells: list[dict], seeds: dict[int, list[str]] | None = None) -> str:
    """Which cells the results hold against the plan (``{seed: [regime, ...]}``; default: every regime for seed 0,
    the partial regime for seed 1), e.g. "14 of 28 planned cells: seed 0 frozen 7/7, ...". Empty when complete."""
    plan = seeds or {0: list(REGIMES), 1: ["partial"]}
    by = index(cells)
    parts, have, total = [], 0, 0
    for seed, regimes in plan.items():
        for r in regimes:
            n = sum(v in by.get(r, {}).get(seed, {}) for v in (CORRECT_KEY, *WRONG_VARIANTS))
            have, total = have + n, total + 1 + len(WRONG_VARIANTS)
            parts.append(f"seed {seed} {r} {n}/{1 + len(WRONG_VARIANTS)}")
    if have == total:
        return ""
    return f"**In progress: {have} of the {total} planned cells have run** ({', '.join(parts)}); the verdicts below " \
           "count only the variants run so far."


def scale_comparison(main: list[dict], small: list[dict]) -> str:
    """What changed between two input sizes, read from both sets of cells: the correct contract's accuracy and the
    two accuracy verdicts, per regime."""
    if not main or not small:
        return ""
    size_m, size_s = main[0]["setup"]["input_size"], small[0]["setup"]["input_size"]
    bm, bs = index(main), index(small)
    vm = {(v["regime"], v["claim"]): v["verdict"] for v in verdicts(main)}
    vs = {(v["regime"], v["claim"]): v["verdict"] for v in verdicts(small)}
    rows = []
    for r in REGIMES:
        cm, cs = bm.get(r, {}).get(0, {}).get(CORRECT_KEY), bs.get(r, {}).get(0, {}).get(CORRECT_KEY)
        if not cm or not cs:
            continue
        same = "Accuracy drops silently (trained and served the same wrong way)"
        served = "Accuracy drops silently (trained right, served wrong)"
        rows.append(f"{r}: correct {pct(cm['test']['accuracy'])} at {read_size(cm)} px against "
                    f"{pct(cs['test']['accuracy'])} at {read_size(cs)} px; trained and tested the same wrong way, "
                    f"{vm.get((r, same), 'not run yet')} "
                    f"(at {size_s} px: {vs.get((r, same), '—')}); served wrong, {vm.get((r, served), 'not run yet')} "
                    f"(at {size_s} px: {vs.get((r, served), '—')})")
    if not rows:
        return ""
    return f"**What changed between {size_s} px and {size_m} px** (seed 0, from both sets of cells): " + "; ".join(rows) + "."


def replace_block(text: str, name: str, block: str) -> str:
    """``text`` with the lines between ``<!-- begin: NAME -->`` and ``<!-- end: NAME -->`` replaced by ``block``
    (how ``--write-docs`` keeps docs/study.md equal to the cells); a missing marker raises ValueError."""
    begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"expected one '{begin}' ... '{end}' pair")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{block.strip()}\n{end}{rest.split(end, 1)[1]}"


def regimes_markdown(regimes: dict, pending: dict[str, str] | None = None) -> str:
    """One line per regime: its cut and budget, as the code defines it (docs/study.md shows it); a ``pending``
    regime (no budget cleared its floor on validation yet) says so and why."""
    lines = []
    for r in regimes.values():
        if r.key in (pending or {}):
            lines.append(f"- **{r.key}**: {r.title.split(': ', 1)[-1]}; **no budget chosen yet**: {pending[r.key]}.")
            continue
        cached = f", {r.views} cached view{'s' if r.views > 1 else ''} of the frozen prefix" if r.views else ""
        extra = "".join([f", images resized to {r.input_size} px for this regime" if r.input_size else "",
                         f", label smoothing {r.label_smoothing:g}" if r.label_smoothing else "",
                         ", random flips of the cached feature maps" if r.flip else "",
                         ", scored with flip test-time augmentation" if r.tta_flip else ""])
        lines.append(f"- **{r.key}**: {r.title.split(': ', 1)[-1]}; {r.epochs:g} epoch{'s' if r.epochs != 1 else ''}, batch {r.batch_size}, "
                     f"peak lr {r.lr:g} (SGD, Nesterov momentum 0.9, weight decay {r.weight_decay:g}){cached}{extra}.")
    return "\n".join(lines)


def runs_markdown(cells: list[dict]) -> str:
    """Where and how long each cell ran, with the machine's load average before and after it (cells recorded
    before the load was kept show a dash); a cell stopped and continued lists its stretches of training, each with
    its steps, minutes and machine (the wall and load columns are those of its last run)."""
    lines = ["| cell | device | wall (min) | training (min) | load average before → after |", "|---|---|---:|---:|---|"]
    for c in cells:
        env, load = c.get("environment", {}), c.get("load_average")
        isa = f", {env['cpu_capability']}" if env.get("cpu_capability") else ""  # recorded since 2026-12-07
        device = env.get("gpu") or (f"{env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores, "
                                    f"{env.get('torch_threads', '?')} threads{isa})")
        if len(c.get("segments", [])) > 1:
            device += "; stopped and continued: " + ", ".join(
                f"steps {s['first_step']}-{s['last_step']} ({s['train_seconds'] / 60:.1f} min, {s.get('gpu') or s['cpu']})"
                for s in c["segments"])
        lines.append(f"| {c['key']} | {device} | {c['wall_seconds'] / 60:.1f} | {c['train_seconds'] / 60:.1f} | "
                     + (f"{load['before']:.2f} → {load['after']:.2f} |" if load else "— |"))
    return "\n".join(lines)


def docs_block(cells: list[dict]) -> str:
    """What docs/study.md shows of one set of cells: progress, the compact table and the verdicts."""
    if not cells:
        return "No cells have run yet."
    parts = [summary_markdown(cells).split("\n\n", 1)[0], progress_note(cells),
             readme_table(cells), "**Verdict per claim and regime** (seed 0, `study_report.verdicts`):",
             verdicts_markdown(cells)]
    if any("load_average" in c for c in cells):  # runs that record their load (the 32-px run predates it)
        parts += ["**Where each cell ran** (from the cells):", runs_markdown(cells)]
    return "\n\n".join(p for p in parts if p)


def readme_table(cells: list[dict]) -> str:
    """The compact table of docs/study.md: one row per preprocessing, one column group per regime (seed 0; seed 1 in
    brackets where run), then served-wrong accuracy. ``tests/test_study.py`` checks docs/study.md carries it."""
    by = index(cells)
    regimes = [r for r in REGIMES if r in by]
    head = ["preprocessing"] + [f"{r}: trained & tested" for r in regimes] + [f"{r}: served wrong" for r in regimes]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    variants = _rows(*(by[r][min(by[r])] for r in regimes))
    for v in variants:
        row = [variant_title(v)]
        for r in regimes:
            accs = [pct(by[r][s][v]["test"]["accuracy"]) for s in sorted(by[r]) if v in by[r][s]]
            row.append(accs[0] + (f" ({', '.join(accs[1:])})" if accs[1:] else "") if accs else "not run yet")
        for r in regimes:
            served = by[r][min(by[r])].get(CORRECT_KEY, {}).get("served_wrong", {}).get(v)
            row.append("—" if v == CORRECT_KEY or not served else pct(served["accuracy"]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- plots ------------------------------------------------------------------------------------------------


def write_plots(cells: list[dict], out: Path) -> list[Path]:
    """``accuracy.png`` (test accuracy with intervals per regime) and ``curves.png`` (test-subset accuracy and
    training loss against step, seed 0 or the lowest)."""
    import matplotlib  # here, not at the top: only plotting needs it, and the app imports this module to read results

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = index(cells)
    regimes = list(by)
    written = []
    fig, axes = plt.subplots(1, len(regimes), figsize=(5 * len(regimes), 4.2), squeeze=False)
    for ax, r in zip(axes[0], regimes):
        s = min(by[r])
        vs = list(by[r][s])
        accs = [by[r][s][v]["test"]["accuracy"] or 0.0 for v in vs]
        lo = [a - (by[r][s][v]["test"]["ci95"] or [a, a])[0] for a, v in zip(accs, vs)]
        hi = [(by[r][s][v]["test"]["ci95"] or [a, a])[1] - a for a, v in zip(accs, vs)]
        ax.barh(range(len(vs)), [100 * a for a in accs], xerr=[[100 * x for x in lo], [100 * x for x in hi]],
                color=["#1b7837" if v == CORRECT_KEY else "#b2182b" for v in vs])
        served = by[r][s].get(CORRECT_KEY, {}).get("served_wrong", {})
        for i, v in enumerate(vs):
            if v in served and served[v]["accuracy"] is not None:
                ax.plot(100 * served[v]["accuracy"], i, "k|", markersize=14)
        ax.set_yticks(range(len(vs)), vs)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy, %")
        ax.set_title(r)
    fig.suptitle("bar: trained and tested with that preprocessing (whisker: 95% interval); "
                 "|: trained right, served that way", fontsize=10)
    fig.tight_layout()
    written.append(save_png(fig, out / "accuracy.png"))
    plt.close(fig)
    fig, axes = plt.subplots(2, len(regimes), figsize=(5 * len(regimes), 7), squeeze=False)
    for j, r in enumerate(regimes):
        s = min(by[r])
        for v, c in by[r][s].items():
            style = dict(lw=2.2 if v == CORRECT_KEY else 1.2, label=v)
            axes[0][j].plot(c["curve"]["step"], [100 * (a or 0) for a in c["curve"]["test_subset_acc"]], **style)
            lb = c["loss_binned"]
            axes[1][j].plot([(i + 0.5) * c["steps_done"] / max(1, len(lb)) for i in range(len(lb))], lb, **style)
        axes[0][j].set_title(r)
        axes[0][j].set_ylabel("test-subset accuracy, %")
        axes[1][j].set_ylabel("training loss")
        axes[1][j].set_xlabel("step")
        axes[1][j].set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    written.append(save_png(fig, out / "curves.png"))
    plt.close(fig)
    return written


def save_png(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG (90 dpi), atomically; the plots of the experiment and the study."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(path, buf.getvalue())
    return path


def table_html(markdown_table: str) -> str:
    """A Markdown table as HTML whose cells carry their column name (``data-label``): on a phone the
    app's CSS shows each row as a card, every value next to its name."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown_table.strip().splitlines()]
    head, body = rows[0], rows[2:]
    cell = lambda tag, text, label="": f'<{tag}{label}>{html.escape(text)}</{tag}>'  # noqa: E731
    return ("<table><thead><tr>" + "".join(cell("th", h, ' scope="col"') for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(cell("td", c, f' data-label="{html.escape(h)}"') for h, c in zip(head, r)) + "</tr>"
                      for r in body) + "</tbody></table>")
