"""What the app runs: read any image safely, then classify it under every chosen variant in one pass.

:meth:`Predictor.read` turns a file, bytes, PIL image or array into the
``(3, S, S)`` uint8 RGB pixels the model's inputs are made from, through the
one image pipeline in :mod:`cifar_transfer.images` (safe decoding, then the
contract's resize policy at the side of the model's training images: the same
pixels the dataset stores for that file), or raises :class:`ImageInputError`
with a message meant for the person who sent it. :class:`Predictor` stacks the
correct contract and the chosen wrong variants into one batch, runs the
network once, and reads the contract meter on the same pass. No Gradio here:
the app wraps it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .contract import CORRECT_KEY, DEFAULT_DEMO_VARIANTS, WRONG_VARIANTS, to_display, variant_contracts, variant_explanation, variant_title
from .engine import make_engine
from .images import (ALLOWED_FORMATS, MAX_FILE_BYTES, SUPPORTED, ImageInputError, decode, pixel_side, read_pixels,
                     square_pixels, to_rgb)
from .divergence import bn_divergence, pooled_stats, running_stats
from .meter import (CalibrationError, MeterCalibration, MeterReading, batchnorm_layers, channel_swap, find_calibration,
                    first_layer_reading, layer_features)

__all__ = ["ALLOWED_FORMATS", "MAX_FILE_BYTES", "SUPPORTED", "ImageInputError", "Prediction", "Predictor",
           "VariantError", "VariantResult", "load_image", "shorten", "to_rgb"]

log = logging.getLogger(__name__)


class VariantError(ValueError):
    """An unknown variant key was asked for."""


MAX_VARIANT_ITEMS = 2 * (len(WRONG_VARIANTS) + 1)  # every key twice over is still a sensible request


def shorten(value: Any, limit: int = 40) -> str:
    """``repr`` of what a caller sent, cut to ``limit`` characters (never echo a megabyte back)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- reading images ------------------------------------------------------------------


def load_image(source: Any, work_size: int = 384, notes: list[str] | None = None) -> torch.Tensor:
    """``(3, S, S)`` uint8 RGB: the central square of :func:`~cifar_transfer.images.decode`'s pixels, at their resolution.

    A convenience for scripts and tests (decoding reduces a huge picture while its shorter side stays at least
    ``work_size``). The app does not use it: :meth:`Predictor.read` brings an upload to the model's pixel side by
    the contract, as the dataset does (see :mod:`cifar_transfer.images`).
    """
    pixels = decode(source, notes, reduce_to=work_size)
    return square_pixels(pixels, min(pixels.shape[:2]))


# -- predicting -------------------------------------------------------------------------


def distinct_rows(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unique, inverse)`` with ``unique[inverse]`` equal to ``batch``, every exactly repeated row kept once.

    Rows are matched by two cheap sums, then confirmed element by element: a row is only ever replaced by an
    identical one, so the network's outputs for it are the same values.
    """
    flat = batch.flatten(1)
    ramp = torch.linspace(1.0, 2.0, flat.shape[1], dtype=flat.dtype, device=flat.device)
    keys = list(zip(flat.sum(1).tolist(), (flat * ramp).sum(1).tolist()))
    kept: list[int] = []
    inverse: list[int] = []
    for i, key in enumerate(keys):
        match = next((j for j, k in enumerate(kept) if keys[k] == key and torch.equal(flat[k], flat[i])), None)
        if match is None:
            kept.append(i)
            match = len(kept) - 1
        inverse.append(match)
    if len(kept) == len(flat):
        return batch, torch.arange(len(flat))
    return batch[kept], torch.tensor(inverse)


@dataclass
class VariantResult:
    key: str
    title: str
    explanation: str
    confidences: dict[str, float]  # every class, most likely first
    meter: MeterReading
    accuracy: float | None  # measured test accuracy from metrics.json, as a fraction
    seen: np.ndarray = field(repr=False)  # (S, S, 3) uint8: the network input read under the correct contract
    input_range: tuple[float, float] = (0.0, 0.0)  # min and max value of the network input
    clipped: float = 0.0  # share of input values outside the range the correct contract produces (shown clipped)

    @property
    def label(self) -> str:
        return next(iter(self.confidences))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "explanation": self.explanation, "label": self.label,
                "confidences": self.confidences, "meter": self.meter.to_dict(), "accuracy": self.accuracy,
                "input_range": list(self.input_range), "clipped": self.clipped}


@dataclass
class Prediction:
    variants: list[VariantResult]
    warning: str | None = None  # set when the correct panel's input is far outside the contract
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"variants": [v.to_dict() for v in self.variants], "warning": self.warning, "notes": self.notes}


class Predictor:
    """Holds one loaded model; classifies an image under the correct contract and chosen wrong variants.

    All variants go through a single batched forward pass. The forward pass is
    serialized by a lock (the meter hooks the model's batch-norm layers,
    and on a small CPU one pass at a time is also the fastest); image decoding
    runs outside it.
    """

    def __init__(self, model, metrics: dict | None = None, channels_last: bool = True,
                 calibration: MeterCalibration | str | Path | None = None, engine: str = "auto",
                 image_size: int | None = None):
        self.model = model.eval()
        self.contract = model.contract
        # The side of the square pixels an upload is brought to before the contract's transform: the training images'
        # (as the dataset stored them), so an upload reaches the network exactly as that file would in training.
        # None (no recorded training size): the decoded picture, all geometry by the contract's transform.
        self.image_size = image_size or pixel_side(self.contract, metrics)
        self.class_names = list(model.class_names)
        self.contracts = variant_contracts(self.contract, list(WRONG_VARIANTS))
        self.transforms = {k: c.transform().to(model.device) for k, c in self.contracts.items()}
        self.accuracy = dict((metrics or {}).get("accuracy") or {})
        self.test_size = (metrics or {}).get("test_size")
        self.calibration, self.calibration_problem = self._calibration(calibration)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._lock = threading.Lock()
        # The meter's layers (the calibration's, else the first), measured by the engine in the same pass as the
        # logits: ONNX Runtime on a CPU (the statistics are extra graph outputs), PyTorch elsewhere (engine.py).
        bns = batchnorm_layers(self.model)
        picked = self.calibration.layers if self.calibration is not None else [0]
        self._bns = [bns[i][1] for i in picked]
        self.engine = make_engine(self.model, [bns[i][0] for i in picked], self.contract.input_size, prefer=engine)

    def _calibration(self, calibration) -> tuple[MeterCalibration | None, str | None]:
        """The meter calibration (given, from a checkpoint folder, or the shipped one that fits); else why not."""
        try:
            if isinstance(calibration, MeterCalibration):
                calibration.check(self.model)
            else:
                calibration = find_calibration(self.model, calibration)
            calibration.paired_thresholds()  # the panels are read against the correct one: it needs them
            return calibration, None
        except CalibrationError as exc:
            log.warning("contract meter cannot judge: %s", exc)
            return None, str(exc)

    def reliability(self, key: str) -> dict | None:
        """What the calibration measured on held-out training images for panel ``key``, in numbers and words."""
        cal = self.calibration
        row = cal.measured.get(key) if cal else None
        if row is None:
            return None
        rate = row["flag_rate"]
        if key == CORRECT_KEY:
            words = (f"The reference panel: the meter never calls it drifting or broken. It reads \"unusual\" when the "
                     f"picture's own statistics fall beyond the thresholds, as {100 * rate:.0f}% of correctly "
                     "preprocessed held-out training images did.")
        elif key == "bgr":
            words = (f"Channel order is seen only by its channel-order evidence against a channel-swapped input: reading "
                     f"each image on its own, the meter flagged {100 * rate:.0f}% of single held-out training images "
                     "with this mistake, so an \"ok\" here is weaker evidence than for the other mistakes.")
        else:
            words = (f"Reading each image on its own (without a correct panel to compare with), the meter flagged "
                     f"{100 * rate:.0f}% of single held-out training images with this mistake.")
        return {"flag_rate": rate, "words": words}

    @staticmethod
    def variant_keys(variants: Iterable[str] | None) -> list[str]:
        """``["correct", *chosen]`` in the canonical order; ``None`` means the defaults.

        Anything else than a list of known keys raises :class:`VariantError` with a
        short message (what a caller sent is quoted at most 40 characters long).
        """
        if variants is None:
            chosen = list(DEFAULT_DEMO_VARIANTS)
        elif isinstance(variants, (list, tuple)):
            chosen = list(variants)
        else:
            raise VariantError(f"The variants must be a list of keys, e.g. [\"bgr\"], not {shorten(variants)}; "
                               f"choose from {', '.join(WRONG_VARIANTS)}.")
        if len(chosen) > MAX_VARIANT_ITEMS:
            raise VariantError(f"At most {MAX_VARIANT_ITEMS} variants can be asked for at once; got {len(chosen)}.")
        unknown = [k for k in chosen if not (isinstance(k, str) and (k in WRONG_VARIANTS or k == CORRECT_KEY))]
        if unknown:
            shown = ", ".join(shorten(k) for k in unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise VariantError(f"Unknown variant {shown}; choose from {', '.join(WRONG_VARIANTS)}.")
        return [CORRECT_KEY, *(k for k in WRONG_VARIANTS if k in chosen)]

    def predict(self, image: Any, variants: Iterable[str] | None = None) -> Prediction:
        """Read ``image`` (see :meth:`read`) and classify it under ``correct`` + ``variants``."""
        keys = self.variant_keys(variants)
        notes: list[str] = []
        pixels = self.read(image, notes)
        prediction = self.predict_pixels(pixels, keys)
        prediction.notes = notes
        return prediction

    def read(self, image: Any, notes: list[str] | None = None) -> torch.Tensor:
        """``(3, S, S)`` uint8 RGB pixels of an upload (path, bytes, PIL image or array), ``S = self.image_size``.

        :func:`cifar_transfer.images.read_pixels` under the model's contract: what the dataset stores for the same
        file (without a recorded training size: the decoded picture). Raises :class:`ImageInputError` with a plain
        message for anything that is not a readable image.
        """
        return read_pixels(image, self.contract, self.image_size, notes)

    def network_input(self, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """The network's input for ``(3, H, W)`` uint8 pixels under each contract in ``keys``: each one's own transform."""
        x = pixels.unsqueeze(0).to(self.model.device, torch.float32)
        return torch.cat([self.transforms[k](x) for k in keys])

    @torch.inference_mode()
    def predict_pixels(self, pixels: torch.Tensor, keys: list[str]) -> Prediction:
        """Classify ``(3, H, W)`` uint8 pixels under each contract in ``keys`` in one forward pass.

        ``keys[0]`` must be the correct contract: its panel is the reference the meter judges the others against."""
        if not keys or keys[0] != CORRECT_KEY:
            raise VariantError(f"The first panel must be {CORRECT_KEY!r} (the meter's reference); got {shorten(keys)}.")
        batch = self.network_input(pixels, keys)
        probs, readings = self._panels(batch)
        seen = (to_display(batch, self.contract) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        lo, hi = self.contract.value_range()
        flat = batch.flatten(1)
        mins, maxs = flat.amin(1).tolist(), flat.amax(1).tolist()
        clipped = ((flat < lo - 1e-4) | (flat > hi + 1e-4)).float().mean(1).tolist()
        results = []
        for i, key in enumerate(keys):
            order = probs[i].argsort(descending=True).tolist()
            results.append(VariantResult(
                key=key, title=variant_title(key), explanation=variant_explanation(key),
                confidences={self.class_names[j]: round(float(probs[i, j]), 6) for j in order},
                meter=dataclasses.replace(readings[i], reliability=self.reliability(key)), accuracy=self.accuracy.get(key), seen=seen[i],
                input_range=(round(mins[i], 4), round(maxs[i], 4)), clipped=round(clipped[i], 4)))
        return Prediction(results, warning=self._warning(results[0].meter, "the correct contract"))

    @torch.inference_mode()
    def check_normalized(self, inputs: torch.Tensor) -> MeterReading:
        """Meter reading of an already-normalized ``(N, 3, S, S)`` batch as a whole (no reference: the absolute
        reading, against the training images); warns when far outside the contract."""
        inputs = inputs.to(self.model.device, torch.float32)
        cal = self.calibration
        if cal is None:
            _, per_layer = self._run(inputs)
            _, meter = self._first_layer(per_layer)
        else:
            n = len(inputs)
            _, per_layer = self._run(torch.cat([inputs, channel_swap(inputs)]))
            f = layer_features(self._bns, per_layer)
            meter = cal.reading(*cal.batch_scores(cal.scores(f[:n], f[n:])), n_images=n)
        self._warning(meter, "an input given as already normalized")
        return meter

    def _run(self, batch: torch.Tensor):
        """Logits and the meter layers' per-image ``(mean, var)`` of ``batch``, one pass of the engine.

        Inputs that are exactly equal are computed once (:func:`distinct_rows`): under a contract with the same mean
        and std for every channel the BGR panel's input is the correct panel's channel-swapped twin."""
        unique, inverse = distinct_rows(batch)
        with self._lock:
            logits, stats = self.engine(unique)
        logits, stats = logits[inverse], stats[inverse]
        widths = [bn.num_features for bn in self._bns]
        return logits, list(zip(stats[:, 0].split(widths, dim=1), stats[:, 1].split(widths, dim=1)))

    def _first_layer(self, per_layer) -> tuple[list[MeterReading], MeterReading]:
        """Without a calibration: the first batch-norm layer's divergence, per image and over the whole batch."""
        running = running_stats(self._bns[0])
        d = bn_divergence(per_layer[0], running)
        whole = first_layer_reading(float(bn_divergence(pooled_stats(per_layer[0]), running)))
        return [first_layer_reading(float(v)) for v in d], whole

    def _panels(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[MeterReading]]:
        """Softmax and the meter's reading of each panel of one picture, ``batch[0]`` the correct panel, one pass.

        With a calibration, the correct panel's channel-swapped twin rides in the same pass (its own channel check)
        and every other panel is read against the correct panel (:meth:`MeterCalibration.panel_readings`): what
        the picture's content does to the statistics is the same in both and cancels."""
        n, cal = len(batch), self.calibration
        logits, per_layer = self._run(batch if cal is None else torch.cat([batch, channel_swap(batch[:1])]))
        if cal is None:
            readings, _ = self._first_layer(per_layer)
        else:
            f = layer_features(self._bns, per_layer)
            readings = cal.panel_readings(f[:n], f[n])
        return logits[:n].float().softmax(1), readings

    def _warning(self, meter: MeterReading, what: str) -> str | None:
        """A warning for input far from anything the model was trained on: a "broken" reading, or a correct panel
        whose picture scores beyond the broken threshold (an unusual picture, not a preprocessing mistake)."""
        cal = self.calibration
        if meter.level == "broken":
            message = (f"The input's statistics under {what} fall far outside the model's contract "
                       f"(contract meter {meter.divergence:,.3g}); the predictions are unreliable.")
        elif meter.level == "unusual" and cal is not None and meter.divergence > cal.thresholds["broken"]:
            message = (f"This picture is far from anything the model was trained on, even under {what} "
                       f"(contract meter {meter.divergence:,.3g}); the predictions are unreliable.")
        else:
            return None
        log.warning(message)
        return message
