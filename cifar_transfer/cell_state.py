"""A study cell's progress on disk, so that a cell stopped part-way (Ctrl-C, a killed process, the end of a
working session) continues from its last saved step instead of from its beginning.

A cell saves the trained weights, the optimizer's state, the random-number state and its measurements so far at
most every :data:`SAVE_EVERY_S` wall seconds and after its last step, into one file named after the cell and a
digest of everything that makes it that cell (regime, budget, preprocessing, seed, sizes): a changed budget never
continues an old file. The batches of an epoch are seeded by the epoch (``batches.epoch(e)``), so the resumed cell
sees exactly the batches it would have seen, and gives the same numbers as one run straight through
(``tests/test_study.py`` checks that). The file goes once the cell's record is complete. Loading never unpickles:
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_write_bytes
from .runtime import cpu_name

# Wall seconds between two saves. A stopped cell loses at most this much training; a save of the 128-px partial
# cell (weights and momentum, ~35 MB) takes well under a second, so this costs under 0.3% of a cell.
SAVE_EVERY_S = 300.0
FOLDER = "in-progress"  # under a study's --output (git-ignored): one file per unfinished cell


class CellState:
    """The saved progress of one cell (``folder`` None: nothing is saved or read)."""

    def __init__(self, folder: Path | None, name: str, identity: dict, log=print):
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        self.path = None if folder is None else Path(folder) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}-{digest}.pt"
        self.identity, self.log = json.loads(json.dumps(identity)), log  # as it reads back: tuples are lists
        self.last_save = time.perf_counter()

    def load(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict | None:
        """Restore ``model``, ``opt`` and the random-number state from the saved file, if there is one, and return
        the cell's progress (``step``, its measurements, seconds and segments so far); None: start from step 1.
        An unreadable file is moved aside (``.broken``) with a one-line message, and the cell starts over."""
        if self.path is None or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if state.get("identity") != self.identity:
                raise ValueError("it belongs to another cell")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except Exception as e:  # noqa: BLE001: whatever is wrong with the file, the cell starts over and says so
            broken = self.path.with_suffix(".broken")
            os.replace(self.path, broken)
            self.log(f"{self.path.name}: unreadable saved progress ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                     f"moved to {broken.name}, the cell starts from its beginning")
            return None
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["cuda_rng"]))
        self.log(f"{self.path.stem}: continuing after step {state['progress']['step']} "
                 f"(saved progress in {self.path.parent})")
        return state["progress"]

    def due(self, step: int, last_step: int) -> bool:
        """Time for a save after ``step``: :data:`SAVE_EVERY_S` since the last one, or the last step."""
        return self.path is not None and (step == last_step or time.perf_counter() - self.last_save >= SAVE_EVERY_S)

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, progress: dict) -> None:
        """Write the state atomically (a stop during the write leaves the previous save whole)."""
        state = {"identity": self.identity, "model": model.state_dict(), "optimizer": opt.state_dict(),
                 "rng": torch.get_rng_state(), "progress": progress}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.path, buf.getvalue())
        self.last_save = time.perf_counter()

    def finish(self) -> None:
        """The cell's record is complete: its saved progress is no longer needed."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def segment(first_step: int, last_step: int, train_seconds: float, device: torch.device) -> dict:
    """One uninterrupted stretch of a cell's training and the machine it ran on (a resumed cell has several)."""
    where = {"device": device.type, "cpu": cpu_name()}
    if device.type == "cuda":
        where["gpu"] = torch.cuda.get_device_name(device)
    return {"first_step": first_step, "last_step": last_step, "train_seconds": round(train_seconds, 1), **where}


def describe(folder: Path) -> list[str]:
    """One line per unfinished cell saved in ``folder``: which cell, how far it got (``study --summary`` prints them)."""
    lines = []
    for path in sorted(Path(folder).glob("*.pt")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            identity, progress = state["identity"], state["progress"]
            regime = identity["setup"]["regime"]
            what = "validation" if identity["setup"].get("val_fraction") else "test"
            lines.append(f"{identity['cell']} ({regime['epochs']:g} epochs, peak lr {regime['lr']:g}, scored on {what}): "
                         f"step {progress['step']} of {identity['steps']}, {progress['train_seconds'] / 60:.1f} min of "
                         f"training, saved {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(path.stat().st_mtime))}")
        except Exception as e:  # noqa: BLE001: a listing never fails on one bad file
            lines.append(f"{path.name}: unreadable ({type(e).__name__})")
    return lines
