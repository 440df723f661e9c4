"""Side-by-side demo: one image, the model's own normalization contract, and the ways to break it.

    python app.py [--checkpoint DIR_OR_HUB_REPO_ID] [--host 0.0.0.0] [--port 7860] [--share]

The same settings come from environment variables (for a Hugging Face Space):
CIFAR_TRANSFER_CHECKPOINT, CIFAR_TRANSFER_REVISION, GRADIO_SERVER_NAME,
GRADIO_SERVER_PORT, CIFAR_TRANSFER_SHARE, CIFAR_TRANSFER_THREADS; the upload folder's
bounds (see cifar_transfer/uploads.py) from CIFAR_TRANSFER_PARTIAL_UPLOAD_AGE_S,
CIFAR_TRANSFER_UPLOAD_AGE_S, CIFAR_TRANSFER_UPLOAD_MAX_MB, CIFAR_TRANSFER_UPLOAD_SWEEP_S. The model is
loaded once, when the module-level ``demo`` is built.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import torch
from starlette.middleware import Middleware

from cifar_transfer.contract import CORRECT_KEY, DEFAULT_DEMO_VARIANTS, WRONG_VARIANTS, variant_explanation, variant_title
from cifar_transfer.study_tab import build_experiment_tab, build_study_tab
from cifar_transfer.gradio_inputs import PathCheckedImage, UncheckedChoices
from cifar_transfer.http_limits import RequestLimits, limits_from_env
from cifar_transfer.hub import resolve_checkpoint
from cifar_transfer.meter import CALIBRATION_FILE
from cifar_transfer.model import CheckpointError, read_metrics
from cifar_transfer.predictor import ImageInputError, Predictor, VariantError, shorten
from cifar_transfer.sessions import BoundedBlocks
from cifar_transfer.uploads import (MAX_BYTES, PARTIAL_AGE_S, SWEEP_EVERY_S, UPLOAD_AGE_S, UploadGuard, UploadJanitor,
                                    upload_folder)

log = logging.getLogger("cifar_transfer.app")

HERE = Path(__file__).resolve().parent
EMBEDDED_CHECKPOINT = HERE / "checkpoints" / "efficientnet_lite0-cifar10"
EXAMPLES = HERE / "examples"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.png"))
PANEL_KEYS = [CORRECT_KEY, *WRONG_VARIANTS]
# Queue: one forward pass runs at a time (the predictor's lock; on a small CPU that is also the
# fastest), a second request may decode its image and encode its answer meanwhile.
CONCURRENCY = int(os.environ.get("CIFAR_TRANSFER_CONCURRENCY", "2"))
QUEUE_SIZE = int(os.environ.get("CIFAR_TRANSFER_QUEUE_SIZE", "128"))
MAX_UPLOAD = "25mb"
# Sessions whose last values the server keeps (for the page's render step and deep links), oldest
# dropped first; each holds its answer and 7 small pictures, about 0.4 MB (see docs: limits).
SESSIONS = int(os.environ.get("CIFAR_TRANSFER_SESSIONS", "256"))

CSS = """
.verdict { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 8px 12px; }
.verdict h2 { font-size: 1.05rem; margin: 0 0 4px; }
.verdict ul { list-style: none; margin: 0; padding: 0; }
.verdict li { padding: 3px 0; line-height: 1.35; }
.verdict-name { color: var(--body-text-color); }
.verdict-tag { font-size: 0.85em; border-radius: 999px; padding: 0 8px; white-space: nowrap; }
.verdict-same .verdict-tag { background: #e8f5e9; color: #1b5e20; }
.verdict-changed .verdict-tag { background: #ffebee; color: #8e0000; font-weight: 600; }
.panels { display: grid !important; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
.panels > .vpanel { min-width: 0 !important; width: auto !important; }
.vpanel { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px !important; }
.vpanel.correct { border: 2px solid #2e7d32; }
.vpanel h2 { font-size: 1.05rem; margin: 0 0 4px; }
.caption p { margin: 0; font-size: 0.9em; }
.meter { font-size: 0.9em; line-height: 1.35; }
.meter-top { display: flex; justify-content: space-between; align-items: baseline; gap: 8px; }
.meter-chip { border-radius: 999px; padding: 1px 10px; font-weight: 600; }
.meter-chip.level-ok { background: #1b5e20; color: #fff; }
.meter-chip.level-drifting { background: #f9a825; color: #1a1a1a; }
.meter-chip.level-broken { background: #b71c1c; color: #fff; }
.meter-chip.level-unknown { background: #e0e0e0; color: #1a1a1a; }
.meter-chip.level-unusual { background: #0d47a1; color: #fff; }
.meter-bar { height: 10px; background: var(--neutral-200); border-radius: 5px; overflow: hidden; margin: 6px 0; }
.meter-fill { height: 100%; }
.values { margin-top: 4px; color: var(--body-text-color-subdued); }
.problem-box { border: 2px solid #b71c1c; background: #fff5f5; color: #4a0000; border-radius: 10px; padding: 10px 14px; }
.problem-box p { margin: 4px 0 0; }
.warning-badge { background: #b71c1c; color: #fff; border-radius: 10px; padding: 10px 14px; font-weight: 600; }
.link-note:empty { display: none; }
button[role="tab"].selected { color: var(--primary-700) !important; }
.link-note { margin: 0; font-weight: 600; }
.accuracy { font-size: 0.9em; }
.pixelated img { image-rendering: pixelated; object-fit: contain; width: 100%; height: 100%; }
.seen img { outline: 1px solid var(--neutral-400); }  /* a blown-out (all white) input still reads as a picture */
.exp-table td, .exp-table th { hyphens: none; word-break: normal; overflow-wrap: normal; }
@media (max-width: 700px) {
  .panels { grid-template-columns: 1fr; }
  button { min-height: 44px; }
  button.icon { min-width: 44px; }  /* upload / camera / paste */
  /* the measured table as one card per row */
  .exp-table thead { display: none; }
  .exp-table table, .exp-table tbody, .exp-table tr, .exp-table td { display: block; width: 100%; }
  .exp-table tr { border: 1px solid var(--border-color-primary); border-radius: 8px; margin-bottom: 8px; padding: 4px 8px; }
  .exp-table td { border: none; text-align: left !important; padding: 2px 0; }
  .exp-table td::before { content: attr(data-label) ": "; font-weight: 600; }
  .exp-table td:first-child::before { content: none; }
  .exp-table td:first-child { font-weight: 700; }
}
"""

# Gradio's Soft theme with darker label and tab text: its defaults fall below WCAG AA contrast (axe-core).
THEME = gr.themes.Soft().set(
    block_label_text_color="*primary_800", block_label_text_color_dark="*primary_100",
    block_title_text_color="*primary_800", block_title_text_color_dark="*primary_100",
    body_text_color_subdued="*neutral_600", body_text_color_subdued_dark="*neutral_300",
    checkbox_label_background_fill_selected="*primary_700", checkbox_label_border_color_selected="*primary_700",
)

# Example thumbnails are buttons holding an image with empty alt text: name each button for
# screen readers (Gradio offers no option for it), and keep naming them as Gradio re-renders.
HEAD = """<script>
(() => {
  const names = %s;
  const label = () => document.querySelectorAll("button.gallery-item").forEach((b, i) => {
    if (names[i] && b.getAttribute("aria-label") !== names[i]) b.setAttribute("aria-label", names[i]);
  });
  new MutationObserver(label).observe(document.documentElement, {childList: true, subtree: true});
})();
</script>""" % json.dumps([f"Example: {p.stem.split('_')[0]} (CIFAR-10 test image)" for p in EXAMPLE_FILES])


def checked_path(guard: UploadGuard):
    """What the image input does with a path: the admitted file, or the refusal to report.

    Every route (the page, ``/call``, ``/run``, ``/queue/join``) preprocesses through
    :class:`PathCheckedImage`, so this is the one place a path is checked.
    """

    def check(path):
        try:
            return guard.check(path)
        except PermissionError as exc:
            refusal = ImageInputError(str(exc))
            refusal.path = shorten(str(path), 200)  # for the log line (predict), never for the answer
            return refusal

    return check


def public_name(ref: str | Path) -> str:
    """How the page names a checkpoint: repo-relative for a folder in the repo, its name elsewhere, a Hub id as is."""
    path = Path(ref).expanduser()
    if not path.exists():
        return str(ref)
    path = path.resolve()
    return str(path.relative_to(HERE)) if path.is_relative_to(HERE) else path.name


# -- rendering ------------------------------------------------------------------------


def contract_markdown(predictor: Predictor) -> str:
    c = predictor.contract
    row = lambda name, values: f"| {name} | " + " | ".join(f"{v:g}" for v in values) + " |"  # noqa: E731
    scale = "0..1" if c.pixel_scale == 1 else f"0..{c.pixel_scale:g}"
    pixels = "pixel / 255" if c.pixel_scale == 1 else f"pixel / 255 × {c.pixel_scale:g}"
    return "\n".join([
        "## The contract of the loaded model",
        f"The network computes **({pixels} − mean) / std** per channel, exactly as its "
        "pretrained weights were trained. Every panel above feeds it the same image; only this preprocessing changes.",
        "",
        "| statistic | R | G | B |",
        "|---|---|---|---|",
        row("mean", c.mean),
        row("std", c.std),
        "",
        f"Pixels scaled to {scale}, {c.channel_order} order, resized to {c.input_size}×{c.input_size} ({c.interpolation}).",
    ])


def meter_html(variant: dict, contract_range: tuple[float, float]) -> str:
    """The contract meter of one panel, and what the values fed to the network were.

    A wrong panel read against the correct one (its meter has a ``shift``) shows that shift, the number its level
    comes from; the correct panel and uncalibrated readings show the panel's own score."""
    meter = variant["meter"]
    paired = isinstance(meter.get("shift"), (int, float))
    d = meter["shift"] if paired else meter["divergence"]
    name = "Contract meter, shift from the correct panel" if paired else "Contract meter"
    known = isinstance(d, (int, float)) and math.isfinite(d)
    number = _num(d) if known else "—"  # as the meter's words write it
    fill = max(3.0, min(100.0, 100 * math.log10(1 + max(d, 0.0)) / 5)) if known else 3.0  # log scale, full at 100,000
    colour = html.escape(meter["colour"])
    level = html.escape(meter["level"])
    lo, hi = variant.get("input_range") or (0.0, 0.0)
    values = (f"Input values {_num(lo)} to {_num(hi)}; the contract gives {_num(contract_range[0])} to "
              f"{_num(contract_range[1])}.")
    if variant.get("clipped", 0) >= 0.01:
        values += (f" {100 * variant['clipped']:.0f}% of them lie outside that range, so the picture above shows "
                   "them clipped (white or black), not as the network sees them.")
    return (
        f'<div class="meter"><div class="meter-top"><span>{name}: <b>{number}</b></span>'
        f'<span class="meter-chip level-{level}">{level}</span></div>'
        f'<div class="meter-bar" aria-hidden="true"><div class="meter-fill" style="width:{fill:.0f}%;background:{colour}"></div></div>'
        f'<div class="meter-words">{html.escape(meter["words"])}</div>'
        + (f'<div class="meter-reliability">{html.escape(meter["reliability"]["words"])}</div>' if meter.get("reliability") else "")
        + f'<div class="values">{html.escape(values)}</div></div>'
    )


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}".replace("-", "−")


def verdict_html(result: dict) -> str:
    """One line per panel: the top class and its confidence, and whether it matches the correct contract's."""
    variants = result["variants"]
    reference = variants[0]["label"]
    rows = []
    for v in variants:
        top = v["confidences"][v["label"]]
        if v["key"] == CORRECT_KEY:
            tag, cls = "the reference", "same"
        elif v["label"] == reference:
            tag, cls = "same answer", "same"
        else:
            tag, cls = "different answer", "changed"
        rows.append(f'<li class="verdict-{cls}"><span class="verdict-name">{html.escape(v["title"])}</span> '
                    f'<b>{html.escape(v["label"])}</b> {100 * top:.0f}% <span class="verdict-tag">{tag}</span></li>')
    return f'<div class="verdict" role="status"><h2>Verdict</h2><ul>{"".join(rows)}</ul></div>'


def accuracy_markdown(accuracy: float | None, test_size: int | None) -> str:
    if accuracy is None:
        return "Measured test accuracy: *not measured for this checkpoint*."
    size = f" on {test_size:,} test images" if test_size else ""
    return f"Measured test accuracy with this preprocessing: **{100 * accuracy:.1f}%**{size}."


def problem_html(title: str, message: str) -> str:
    """A refusal shown in place of the panels (``message`` is the plain text the API caller gets too)."""
    return (f'<div class="problem-box" role="alert"><strong>{html.escape(title)}</strong>'
            f'<p>{html.escape(message)}</p></div>')


def warning_html(text: str) -> str:
    return f'<div class="warning-badge" role="alert">⚠ {html.escape(text)}</div>'


# -- the app --------------------------------------------------------------------------


def load_predictor(checkpoint: str | None = None, revision: str | None = None) -> tuple[Predictor, str]:
    """The predictor and a one-line note on where its checkpoint came from, without server paths."""
    ref = checkpoint or os.environ.get("CIFAR_TRANSFER_CHECKPOINT") or str(EMBEDDED_CHECKPOINT)
    revision = revision or os.environ.get("CIFAR_TRANSFER_REVISION") or None
    folder, model, note = resolve_checkpoint(ref, revision=revision, fallback=EMBEDDED_CHECKPOINT)
    log.info(note)
    for path in sorted({str(Path(ref).expanduser()), str(folder), str(EMBEDDED_CHECKPOINT)}, key=len, reverse=True):
        if Path(path).exists():
            note = note.replace(path, public_name(path))
    has_calibration = (Path(folder) / CALIBRATION_FILE).is_file()  # else the shipped calibration whose fingerprint fits
    return Predictor(model, read_metrics(folder), calibration=folder if has_calibration else None), note


class LastErrors:
    """The last refusal per browser session, for the page to show in place (bounded).

    Only a request that names its session is stored or answered: an API call without a
    ``session_hash`` (or a page event called by ``fn_index`` from a fresh session) gets nothing.
    """

    def __init__(self, size: int = 1024):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def put(self, session: str | None, title: str, message: str) -> None:
        if not session:
            return
        with self._lock:
            self._items[session] = (title, message)
            self._items.move_to_end(session)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def pop(self, session: str | None) -> tuple[str, str] | None:
        if not session:
            return None
        with self._lock:
            return self._items.pop(session, None)


def build_demo(checkpoint: str | None = None, revision: str | None = None) -> gr.Blocks:
    """The whole app; loads the checkpoint once."""
    threads = os.environ.get("CIFAR_TRANSFER_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    predictor, note = load_predictor(checkpoint, revision)
    guard = UploadGuard([upload_folder(), EXAMPLES])
    errors = LastErrors()

    def refuse(request: gr.Request | None, title: str, message: str):
        errors.put(getattr(request, "session_hash", None), title, message)
        # The page shows the message in place, escaped (problem_html), never in Gradio's pop-up
        # (visible=False); API callers get it here as plain text.
        raise gr.Error(message, title=title, print_exception=False, visible=False)

    def predict(image, variants, request: gr.Request = None):
        """Classify one image under the correct contract and each chosen wrong variant (one batched pass).

        Returns JSON: {"variants": [{key, title, explanation, label, confidences, meter, accuracy}, ...],
        "warning", "notes"}; the first variant is always "correct". ``null`` when no image is given.
        ``variants`` ``null`` means the default ones.
        """
        if image is None:
            return None, None
        try:
            if isinstance(image, Exception):  # refused by the input's preprocess (see checked_path)
                raise ImageInputError(str(image))
            result = predictor.predict(image, variants)
        except ImageInputError as exc:
            if getattr(exc, "path", None):
                log.warning("refused a path outside the upload folder and examples: %s", exc.path)
            else:
                log.info("refused input: %s", exc)
            refuse(request, "Cannot classify this input", str(exc))
        except VariantError as exc:
            log.info("refused variants: %s", exc)
            refuse(request, "Unknown variant", str(exc))
        except Exception:
            log.exception("prediction failed")
            refuse(request, "Something went wrong", "Something went wrong while classifying this image; please try another one.")
        answer = result.to_dict()
        return answer, {"result": answer, "pictures": [v.seen for v in result.variants]}

    with BoundedBlocks(title="Normalization is a contract", analytics_enabled=False) as demo:
        gr.Markdown(
            "# Input normalization is a contract with the pretrained model\n"
            "Break it and nothing crashes: the model still answers, only worse. Give it an image and compare the "
            "correct preprocessing with the usual mistakes, side by side."
        )
        with gr.Tab("Demo"):
            with gr.Row(elem_classes="top"):
                with gr.Column(scale=1, min_width=280):
                    image = PathCheckedImage(check_path=checked_path(guard), sources=["upload", "webcam", "clipboard"],
                                             label="Your image", height=240, elem_classes="pixelated")
                    # The verdict and any refusal sit right under the image: on a phone they show without scrolling.
                    verdict = gr.HTML(visible=False, elem_classes="verdict-html")
                    problem = gr.HTML(visible=False, elem_classes="problem")
                    badge = gr.HTML(visible=False)
                    notes = gr.Markdown(visible=False)
                with gr.Column(scale=1, min_width=280):
                    gr.Examples([[str(p)] for p in EXAMPLE_FILES], inputs=[image],
                                label="Examples: CIFAR-10 test images (tap one)", examples_per_page=8)
                    variants = UncheckedChoices(choices=[(v.title, k) for k, v in WRONG_VARIANTS.items()],
                                                value=list(DEFAULT_DEMO_VARIANTS), label="Wrong variants to compare")
            columns, labels, seens, meters = [], [], [], []
            with gr.Row(elem_classes="panels", equal_height=True):
                for key in PANEL_KEYS:
                    classes = ["vpanel", "correct" if key == CORRECT_KEY else "wrong", f"panel-{key}"]
                    # Panels show once there is a result (empty, Gradio's Label breaks an ARIA rule).
                    with gr.Column(visible=False, min_width=240, elem_classes=classes) as column:
                        gr.Markdown(f"## {variant_title(key)}\n{variant_explanation(key)}", elem_classes="panel-head")
                        labels.append(gr.Label(num_top_classes=5, label="Top 5", show_label=False, elem_classes="label"))
                        gr.Markdown("**What the network receives**", elem_classes="caption")
                        seens.append(gr.Image(label="What the network receives", show_label=False, type="numpy",
                                              alt_text=f"What the network receives under: {variant_title(key)}",
                                              format="png", interactive=False, height=140, buttons=[],
                                              elem_classes=["pixelated", "seen"]))
                        meters.append(gr.HTML(elem_classes="meter-html"))
                        gr.Markdown(accuracy_markdown(predictor.accuracy.get(key), predictor.test_size),
                                    elem_classes="accuracy")
                    columns.append(column)
            link = gr.DeepLinkButton("Copy a link to this result", size="md", icon=None)  # Gradio's icon shows a server path in /config
            gr.HTML('<p class="link-note" role="status" aria-live="polite"></p>')
            gr.Markdown(contract_markdown(predictor))
            gr.Markdown(f"<small>Checkpoint: {html.escape(note)}</small>")  # no server paths: see load_predictor
            with gr.Accordion("The API's JSON answer", open=False):
                raw = gr.JSON(label="JSON")
            shown = gr.State()

        with gr.Tab("Does it matter? (measured)"):
            if build_study_tab():  # the study (128 px, then the 32-px appendix), the quick run below it
                with gr.Accordion("The quick version: 200 steps on 5,000 images (python -m cifar_transfer.experiment)",
                                  open=False):
                    build_experiment_tab()
            else:
                build_experiment_tab()

        def render(shown_value, chosen, refusal: str | None = None):
            """The verdict and panels, from the server-side state only (never from what a client sends as JSON)."""
            chosen = {k for k in chosen if isinstance(k, str)} if isinstance(chosen, list) else set(DEFAULT_DEMO_VARIANTS)
            result, pictures = (shown_value or {}).get("result"), (shown_value or {}).get("pictures")
            if not result:
                return [gr.HTML(visible=False), gr.HTML(refusal or "", visible=bool(refusal)), gr.HTML(visible=False),
                        gr.Markdown(visible=False), *(gr.Column(visible=False) for _ in PANEL_KEYS),
                        *([None] * len(PANEL_KEYS) * 3)]
            by_key = {v["key"]: (v, pic) for v, pic in zip(result["variants"], pictures)}
            out_labels, out_seens, out_meters = [], [], []
            for key in PANEL_KEYS:
                v, pic = by_key.get(key, (None, None))
                out_labels.append(v["confidences"] if v else None)
                out_seens.append(pic)
                out_meters.append(meter_html(v, predictor.contract.value_range()) if v else None)
            warning = result.get("warning")
            return [gr.HTML(verdict_html(result), visible=True), gr.HTML(visible=False),
                    gr.HTML(warning_html(warning) if warning else "", visible=bool(warning)),
                    gr.Markdown("\n".join(f"- {n}" for n in result.get("notes", [])), visible=bool(result.get("notes"))),
                    *(gr.Column(visible=k in by_key) for k in PANEL_KEYS), *out_labels, *out_seens, *out_meters]

        def render_refusal(chosen, request: gr.Request = None):
            last = errors.pop(getattr(request, "session_hash", None))
            return render(None, chosen, problem_html(*last) if last else None)

        panel_outputs = [verdict, problem, badge, notes, *columns, *labels, *seens, *meters]
        event = gr.on([image.change, variants.change], predict, inputs=[image, variants], outputs=[raw, shown],
                      api_name="predict", trigger_mode="always_last", concurrency_limit=CONCURRENCY,
                      show_progress="minimal")
        event.success(render, inputs=[shown, variants], outputs=panel_outputs, queue=False,
                      api_visibility="private", show_progress="hidden")
        event.failure(render_refusal, inputs=[variants], outputs=panel_outputs,
                      queue=False, api_visibility="private", show_progress="hidden")
        # Feedback that stays: Gradio's own "Copied!" lasts a second.
        link.click(None, js="() => { document.querySelector('.link-note').textContent = "
                            "'Link copied: paste it anywhere to share this result.'; }")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)
    demo.predictor = predictor
    env = os.environ.get
    demo.janitor = UploadJanitor(
        upload_folder(), keep=lambda: set().union(*(getattr(b, "keep_in_cache", set()) for b in demo.blocks.values())),
        partial_age=float(env("CIFAR_TRANSFER_PARTIAL_UPLOAD_AGE_S", PARTIAL_AGE_S)),
        upload_age=float(env("CIFAR_TRANSFER_UPLOAD_AGE_S", UPLOAD_AGE_S)),
        max_bytes=int(float(env("CIFAR_TRANSFER_UPLOAD_MAX_MB", MAX_BYTES / 2**20)) * 2**20),
        every=float(env("CIFAR_TRANSFER_UPLOAD_SWEEP_S", SWEEP_EVERY_S)))
    return demo


def launch(app: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False, **kwargs):
    """``app.launch`` with this demo's styling and limits (Gradio 6 takes css/theme here).

    Limits: request bodies (``cifar_transfer.http_limits``), sessions kept (:data:`SESSIONS`, each
    bounded by ``cifar_transfer.sessions``), upload size and, through the upload janitor started
    here, the upload folder's disk use (``cifar_transfer.uploads``).
    """
    if getattr(app, "janitor", None) is not None:
        app.janitor.start()
    middleware = [Middleware(RequestLimits, **limits_from_env())]
    return app.launch(server_name=host, server_port=port, share=share, css=CSS, head=HEAD, theme=THEME,
                      max_file_size=MAX_UPLOAD, allowed_paths=[str(EXAMPLES)], state_session_capacity=SESSIONS,
                      app_kwargs={"middleware": middleware}, **kwargs)


def get_args_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=env("CIFAR_TRANSFER_CHECKPOINT"),
                   help="checkpoint folder or Hugging Face Hub repo id; default: the embedded "
                        f"{EMBEDDED_CHECKPOINT.relative_to(HERE)} [$CIFAR_TRANSFER_CHECKPOINT]")
    p.add_argument("--revision", default=env("CIFAR_TRANSFER_REVISION"), help="Hub revision [$CIFAR_TRANSFER_REVISION]")
    p.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="address to listen on [$GRADIO_SERVER_NAME]")
    p.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")), help="port [$GRADIO_SERVER_PORT]")
    p.add_argument("--share", action=argparse.BooleanOptionalAction,
                   default=env("CIFAR_TRANSFER_SHARE", "").lower() in ("1", "true", "yes"),
                   help="also serve a public Gradio share link [$CIFAR_TRANSFER_SHARE]")
    return p


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = get_args_parser().parse_args()
    try:
        demo = build_demo(args.checkpoint, args.revision)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    # Gradio's own start-up lines tell a user to "set share=True in launch()"; this app's switch is --share.
    try:
        _, local_url, share_url = launch(demo, host=args.host, port=args.port, share=args.share, quiet=True,
                                         prevent_thread_lock=True)
    except OSError as exc:  # Gradio's "Cannot find empty port" (or an address it cannot bind)
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port} ({shorten(str(exc), 120)}); "
                         "choose another port with --port N (or GRADIO_SERVER_PORT)") from None
    print(f"* Running on {local_url}", flush=True)
    print(f"* Public link (72 h): {share_url}" if share_url else
          "* To share a public link too, run again with --share (or set CIFAR_TRANSFER_SHARE=1).", flush=True)
    demo.block_thread()
else:
    demo = build_demo()
