"""Training under wrong normalization: does the contract still matter after fine-tuning?

    python -m cifar_transfer.experiment --data-dir ../shared/datasets/cifar10-jpeg
    python -m cifar_transfer.experiment --summary     # print the summary of the last run (markdown)

Fine-tunes one backbone with the same budget and seed under the correct
contract and under every wrong variant (training and evaluation consistent),
then scores the correctly trained model under each wrong variant (the
train/serve mismatch). Writes ``results.json`` and PNG plots to
``results/experiment``; :func:`build_experiment_tab` shows them in the app.
"""

from __future__ import annotations

from pathlib import Path

from .contract import CORRECT_KEY, variant_title

FORMAT = "cifar_transfer.experiment/1"
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results" / "experiment"
RESULTS_NAME = "results.json"
CURVES_NAME = "curves.png"
ACCURACY_NAME = "accuracy.png"
COMMAND = "python -m cifar_transfer.experiment --data-dir ../shared/datasets/cifar10-jpeg"


class ExperimentError(RuntimeError):
    """Results are missing or malformed; the message names the problem."""


# -- reading results -------------------------------------------------------------------


def load_results(results_dir: Path | None = None) -> dict:
    """Read and check ``results.json``; raises :class:`ExperimentError` with a clear message."""
    import json

    path = Path(results_dir or RESULTS_DIR) / RESULTS_NAME
    if not path.is_file():
        raise ExperimentError(f"no experiment results at {path}; run `{COMMAND}` to produce them")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExperimentError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise ExperimentError(f"{path} is not a results file of this experiment (expected format {FORMAT!r})")
    for key in ("runs", "serve_mismatch", "config"):
        if key not in results:
            raise ExperimentError(f"{path} lacks the field {key!r}")
    if CORRECT_KEY not in results["runs"]:
        raise ExperimentError(f"{path} has no run under the correct contract")
    return results


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def summary_markdown(results: dict) -> str:
    """Plain-words summary and table; every number is read from ``results``."""
    cfg, runs, serve = results["config"], results["runs"], results["serve_mismatch"]
    correct = runs[CORRECT_KEY]["final"]
    lines = [
        f"**Setup.** {cfg['backbone']} (ImageNet weights) fine-tuned on {cfg['train_size']:,} {cfg['dataset']} images "
        f"at {cfg['input_size']} px for {cfg['steps']} steps of {cfg['batch_size']} images "
        f"({cfg['freeze_stages']} leading stages frozen, seed {cfg['seed']}); accuracy on {cfg['val_size']:,} held-out "
        f"training images. Same budget and seed for every row; measured in {results.get('wall_seconds', 0) / 60:.0f} min "
        f"on {results.get('environment', {}).get('cpu', 'this machine')}.",
        "",
        f"With the correct contract the model reaches **{_pct(correct['val_acc'])}**. "
        "*Trained and served wrong* uses the same wrong preprocessing for training and evaluation; "
        "*served wrong* takes the correctly trained model and only changes the preprocessing at serving time.",
        "",
        "| preprocessing | trained and served wrong | served wrong (train/serve mismatch) | first-BN divergence at start | at end | final train loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, run in runs.items():
        f = run["final"]
        served = "—" if key == CORRECT_KEY else _pct(serve.get(key))
        lines.append(f"| {variant_title(key)} | {_pct(f['val_acc'])} | {served} | {_num(run['initial_divergence'])} | "
                     f"{_num(f['divergence'])} | {_num(f['train_loss'])} |")
    wrong = {k: r["final"]["val_acc"] for k, r in runs.items() if k != CORRECT_KEY}
    if wrong and serve:
        worst_train = min(wrong, key=wrong.get)
        worst_serve = min(serve, key=serve.get)
        lines += [
            "",
            f"Trained consistently, the wrong variants end between {_pct(min(wrong.values()))} "
            f"({variant_title(worst_train)}) and {_pct(max(wrong.values()))}, against {_pct(correct['val_acc'])} "
            f"for the correct contract. Changing only the serving preprocessing drops the correctly trained model to "
            f"as low as {_pct(serve[worst_serve])} ({variant_title(worst_serve)}).",
        ]
    return "\n".join(lines)


# -- the app tab --------------------------------------------------------------------------


def build_experiment_tab(results_dir: Path | None = None) -> None:
    """Add the experiment's plots and summary to the current ``gr.Blocks``/``gr.Tab`` context."""
    import gradio as gr

    folder = Path(results_dir or RESULTS_DIR)
    gr.Markdown(
        "### Training under wrong normalization\n"
        "The same backbone fine-tuned with the same budget and seed under the correct contract and under each "
        "wrong variant, and the correctly trained model served with the wrong preprocessing."
    )
    try:
        results = load_results(folder)
    except ExperimentError as exc:
        gr.Markdown(f"No results to show yet: {exc}.")
        return
    for name, label in ((CURVES_NAME, "Training curves per preprocessing"), (ACCURACY_NAME, "Final accuracy")):
        if (folder / name).is_file():
            gr.Image(str(folder / name), type="filepath", label=label, interactive=False)
    gr.Markdown(summary_markdown(results))
    gr.Markdown(f"Reproduce: `{results.get('command') or COMMAND}`")
