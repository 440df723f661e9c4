"""The one training engine: every training in the package (``train``, the study's cells, the quick experiment)
cuts its model with :func:`split_frozen`, builds its optimizer with :func:`make_optimizer`, takes its learning
rate from :func:`lr_at` and runs :func:`run_steps`, whose :func:`train_step` is the package's one
``loss.backward()``. The batches come from :mod:`cifar_transfer.batches`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


# -- the frozen/trainable cut ---------------------------------------------------------------------------


@dataclass
class Cut:
    """A model cut for fine-tuning: the frozen ``prefix`` (eval mode, no gradients) and the ``trainable`` rest."""

    prefix: nn.Sequential
    trainable: nn.Sequential

    def train(self) -> None:
        """Training mode for the trainable stages; the frozen prefix stays in eval mode (its batch-norm statistics
        are frozen too)."""
        self.prefix.eval()
        self.trainable.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of preprocessed images: the frozen prefix without gradients, then the trainable stages."""
        if len(self.prefix):
            with torch.no_grad():
                x = self.prefix(x)
        return self.trainable(x)


def split_frozen(model: nn.Module, freeze_stages: int) -> Cut:
    """``model.stages`` cut after the first ``freeze_stages`` (-1: all but the last; the last, the head, always
    trains). The prefix's parameters stop requiring gradients and it goes to eval mode."""
    stages = list(model.stages)
    k = len(stages) - 1 if freeze_stages < 0 else min(freeze_stages, len(stages) - 1)
    prefix, trainable = nn.Sequential(*stages[:k]).eval(), nn.Sequential(*stages[k:])
    for p in prefix.parameters():
        p.requires_grad_(False)
    return Cut(prefix, trainable)


# -- optimizer, schedule, step ------------------------------------------------------------------------------


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: weight decay on weights, none on biases and norm scales (1-D)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(module: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9):
    """SGD (Nesterov) or AdamW over :func:`param_groups`."""
    if name == "sgd":
        return torch.optim.SGD(param_groups(module, weight_decay), lr=lr, momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(param_groups(module, weight_decay), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: sgd or adamw")


def grad_norm(params) -> float:
    """The L2 norm of all gradients together (0.0 when there are none)."""
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def train_step(forward, x: torch.Tensor, y: torch.Tensor, opt, loss_fn, *, scaler=None, amp_dtype=None,
               norm_of=None) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """One optimisation step: ``forward(x)`` under autocast (``amp_dtype``), the loss, backward (scaled by
    ``scaler`` for fp16), then the step.

    With ``norm_of`` (parameters) the gradients' norm is measured (unscaled) and returned, and a
    non-finite loss or norm skips the step: the caller decides whether that is a collapse.
    Returns ``(loss, logits, norm)``.
    """
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = forward(x)
        loss = loss_fn(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        scaler = torch.amp.GradScaler(x.device.type, enabled=False)
    scaler.scale(loss).backward()
    norm = None
    if norm_of is not None:
        scaler.unscale_(opt)
        norm = grad_norm(norm_of)
        if not (math.isfinite(loss.item()) and math.isfinite(norm)):
            return loss, logits, norm
    scaler.step(opt)
    scaler.update()
    return loss, logits, norm


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction, then cosine decay to zero."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return peak * progress / warmup
    t = (progress - warmup) / max(1e-8, 1 - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


@dataclass
class Schedule:
    """The learning rate of each step: :func:`lr_at` of the fraction of ``total_steps`` done or, with a
    time budget, of the budget spent since ``start_s`` on ``clock`` if that is further along."""

    peak: float
    warmup: float
    total_steps: int
    budget_s: float | None = None
    clock: Callable[[], float] = time.perf_counter
    start_s: float = 0.0

    def lr(self, step: int) -> float:
        progress = step / self.total_steps
        if self.budget_s:
            progress = max(progress, (self.clock() - self.start_s) / (self.budget_s - self.start_s))
        return lr_at(progress, self.peak, self.warmup)

    def out_of_time(self) -> bool:
        return bool(self.budget_s) and self.clock() >= self.budget_s


def mixed_precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """``--amp`` on ``device``: the autocast dtype (None: off) and the gradient scaler (active for fp16 on CUDA)."""
    amp = amp if amp != "auto" else ("fp16" if device.type == "cuda" else "off")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    return dtype, torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")


# -- the loop ---------------------------------------------------------------------------------------------------


def run_steps(forward, batches: Iterable, opt, loss_fn, lr_of: Callable[[int], float], *, start: int = 0,
              cut: Cut | None = None, scaler=None, amp_dtype=None, channels_last: bool = False, norm_of=None,
              around=None, after=None) -> int:
    """The one step loop: step ``start``, ``start + 1``, ... over the ``(x, y)`` of ``batches``, each at
    ``lr_of(step)`` on every parameter group, ``cut`` in training mode, one :func:`train_step` (inside the
    context ``around()`` makes, when given). ``after(step, lr, loss, logits, norm, y)`` returning True stops the
    loop after that step. Returns the steps done."""
    done = 0
    for step, (x, y) in enumerate(batches, start=start):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = lr_of(step)
        for group in opt.param_groups:
            group["lr"] = lr
        if cut is not None:
            cut.train()
        with around() if around is not None else nullcontext():
            loss, logits, norm = train_step(forward, x, y, opt, loss_fn, scaler=scaler, amp_dtype=amp_dtype,
                                            norm_of=norm_of)
        done += 1
        if after is not None and after(step, lr, loss, logits, norm, y):
            break
    return done


def step_stream(batches, steps: int, skip: int = 0):
    """``steps`` batches of ``batches.epoch(0)``, ``epoch(1)``, ...: a budget in steps rather than epochs; the
    first ``skip`` are left out (a resumed run: whole epochs are not read at all, each epoch being seeded by its
    number; the batches of a started epoch are drawn and dropped, so the rest come out as they would have)."""
    (epoch, skip_in_epoch), taken = divmod(skip, len(batches)), skip
    while taken < steps:
        for i, xy in enumerate(batches.epoch(epoch)):
            if i < skip_in_epoch:
                continue
            yield xy
            taken += 1
            if taken == steps:
                return
        epoch, skip_in_epoch = epoch + 1, 0


@dataclass
class EpochResult:
    loss: float  # mean training loss over the epoch's samples
    accuracy: float  # training accuracy
    steps: int
    out_of_time: bool  # the time budget ran out during the epoch


def train_one_epoch(forward, batches, opt, loss_fn, epoch: int, schedule: Schedule, *, cut: Cut | None = None,
                    scaler=None, amp_dtype=None, channels_last: bool = False, desc: str = "",
                    progress: bool = False) -> EpochResult:
    """One pass over ``batches.epoch(epoch)`` through :func:`run_steps`, each step at
    ``schedule.lr(epoch * len(batches) + step)``; stops early when the schedule's time budget is spent."""
    steps = len(batches)
    bar = tqdm(batches.epoch(epoch), total=steps, desc=desc, disable=not progress, mininterval=1.0, dynamic_ncols=True)
    tally = {"loss": 0.0, "correct": 0, "seen": 0, "out_of_time": False}

    def after(_step, lr, loss, logits, _norm, y) -> bool:
        tally["loss"] += loss.item() * len(y)
        tally["correct"] += (logits.argmax(1) == y).sum().item()
        tally["seen"] += len(y)
        bar.set_postfix(loss=f"{tally['loss'] / tally['seen']:.3f}", acc=f"{tally['correct'] / tally['seen']:.3f}",
                        lr=f"{lr:.4f}")
        tally["out_of_time"] = schedule.out_of_time()
        return tally["out_of_time"]

    done = run_steps(forward, bar, opt, loss_fn, schedule.lr, start=epoch * steps, cut=cut, scaler=scaler,
                     amp_dtype=amp_dtype, channels_last=channels_last, after=after)
    bar.close()
    seen = max(tally["seen"], 1)
    return EpochResult(tally["loss"] / seen, tally["correct"] / seen, done, tally["out_of_time"])
