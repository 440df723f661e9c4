"""The app's page on training under wrong normalization: the full-scale study (:func:`build_study_tab`) and the
quick experiment (:func:`build_experiment_tab`), read from their shipped results. ``app.py`` imports these;
Gradio is imported here, beside the app, and nowhere in the modules that run or report the study.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from . import experiment
from .study_report import progress_note, scale_comparison, summary_markdown, table_html
from .study_results import DEFINITIONS, RESULTS_DIR, RESULTS_DIR_128, StudyError, read_cells


def show_plot(path: Path, label: str) -> None:
    """A results PNG, if it is there, captioned ``label``. The caption sits above the plot: Gradio's label chip and
    buttons would cover its title and legend."""
    if path.is_file():
        gr.Markdown(f"**{label}**", elem_classes=["caption", "plot-caption"])
        gr.Image(str(path), type="filepath", label=label, show_label=False, interactive=False, buttons=[],
                 alt_text=label, elem_classes="plot")


def _cells_or_message(folder: Path) -> list[dict] | None:
    """The folder's cells, or None after showing why they cannot be read."""
    try:
        return read_cells(folder)
    except StudyError as exc:
        gr.Markdown(f"The study's results in {folder.name} cannot be read: {exc}.")
        return None


def _study_section(folder: Path, cells: list[dict], heading: str) -> None:
    """One recorded run: its plots, per-regime tables and verdicts (all computed from ``cells``)."""
    head, *rest = [b.strip() for b in summary_markdown(cells).split("\n\n") if b.strip()]
    gr.Markdown(f"{heading}\nEvery preprocessing trained on all 50,000 training images *and* tested the same way on "
                "all 10,000 test images, in three regimes; the correctly trained model also served each wrong variant. "
                + head)
    note = progress_note(cells)
    if note:
        gr.Markdown(note)
    for name, label in (("accuracy.png", "Test accuracy per regime and preprocessing"),
                        ("curves.png", "Test-subset accuracy and training loss against step")):
        show_plot(folder / name, label)
    for block in rest:
        if block.startswith("| claim"):
            gr.Markdown("**Verdict per claim and regime** (computed from the cells above; seed "
                        f"{min(c['seed'] for c in cells)})")
            gr.HTML(table_html(block), elem_classes="exp-table")
        elif block.startswith("|"):
            gr.HTML(table_html(block), elem_classes="exp-table")
        else:
            gr.Markdown(block)


def build_study_tab(results_dir: Path | None = None, appendix_dir: Path | None = None) -> bool:
    """Add the study to the current ``gr.Blocks``/``gr.Tab`` context: the 128-px run (``results_dir``, default
    ``results/study-128px``) first, what changed between the scales, then the 32-px run (``appendix_dir``, default
    ``results/study``) as a labelled appendix.

    Returns False (and adds nothing) when neither folder holds cells, so the caller can show something else."""
    main_dir, small_dir = Path(results_dir or RESULTS_DIR_128), Path(appendix_dir or RESULTS_DIR)
    main, small = _cells_or_message(main_dir), _cells_or_message(small_dir)
    if main is None or small is None:
        return True
    if not main and not small:
        return False
    if main:
        _study_section(main_dir, main, f"### The seed's claims at {main[0]['setup']['input_size']} px, the shipped "
                                       "checkpoint's input size")
        comparison = scale_comparison(main, small)
        if comparison:
            gr.Markdown(comparison)
    if small:
        size = small[0]["setup"]["input_size"]
        with gr.Accordion(f"Appendix: the small-input run ({size} px)", open=not main):
            _study_section(small_dir, small, f"### The same study at {size} px (CIFAR's own size, no upsampling), "
                                             "where the correctly preprocessed model barely trains")
    gr.Markdown("Definitions: " + "; ".join(f"*{k}*: {v}" for k, v in DEFINITIONS.items()))
    return True


def build_experiment_tab(results_dir: Path | None = None) -> None:
    """Add the experiment's plots and summary to the current ``gr.Blocks``/``gr.Tab`` context."""
    folder = Path(results_dir or experiment.RESULTS_DIR)
    gr.Markdown(
        "### Training under wrong normalization\n"
        "The same backbone fine-tuned with the same budget and seed under the correct contract and under each "
        "wrong variant, and the correctly trained model served with the wrong preprocessing."
    )
    try:
        results = experiment.load_results(folder)
    except experiment.ExperimentError as exc:
        gr.Markdown(f"No results to show yet: {exc}.")
        return
    for name, label in ((experiment.CURVES_NAME, "Training curves per preprocessing"),
                        (experiment.ACCURACY_NAME, "Final accuracy")):
        show_plot(folder / name, label)
    text, table = experiment.summary_markdown(results).split("\n\n| ", 1)
    gr.Markdown(text)
    gr.HTML(table_html("| " + table.split("\n\n", 1)[0]), elem_classes="exp-table")
    if "\n\n" in table:
        gr.Markdown(table.split("\n\n", 1)[1])
    gr.Markdown(f"Reproduce: `{results.get('command') or experiment.COMMAND}`")
