"""Training runs: one spec with one configuration on one task and one seed.

The loop is the Task API's (``task.make_model(seed)``, ``task.train_batches(seed)``,
``task.loss``, ``task.evaluate``), driven by a :class:`~meta_test.specs.Trainer`:

- the training loss of every step (the minibatch loss before the update) stays in a
  device tensor and is read back every ``log_every`` steps, where the run also checks it
  for non-finite values: a diverged run stops there and is marked ``diverged``;
- the trainer's ``hparam_log()`` is recorded every ``log_every`` steps;
- ``eval_every`` (optional) evaluates ``eval_split`` (default the test split) along the run,
  at step 0 and every ``eval_every`` steps;
- each ``trainer.step`` is timed (CUDA events on CUDA, no per-step host sync;
  ``perf_counter`` on CPU); ``sec_per_iter`` is the median over the run and
  ``mean_sec_per_iter`` the mean (which includes periodic work such as KFAC's
  eigendecompositions every ``inv_update_freq`` steps);
- the peak CUDA memory of the run is recorded on CUDA (``None`` on CPU, where torch keeps
  no allocator statistics).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from meta_test.specs import build_trainer

__all__ = ["RunResult", "run_training"]

#: Seed offset of the separate stream behind ``draw_batch`` (so that a trainer drawing
#: extra batches does not change the batches the main loop sees).
EXTRA_STREAM_OFFSET = 1_000_003


@dataclass
class RunResult:
    """What one run produced.

    Attributes:
        train_loss: the training loss of each step done (``len == steps_done``; cut at the
            first non-finite value when the run diverged).
        eval_steps, eval_metric: the ``eval_split`` metric along the run (updates done).
        hparam_steps, hparams_adapted: ``hparam_log()`` every ``log_every`` steps.
        final: ``{"<split>_loss", "<split>_<metric>"}`` after training for each split in
            ``final_splits`` (``nan`` when diverged).
    """

    spec: str
    hparams: dict[str, Any]
    seed: int
    steps: int
    metric: str
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_metric: list[float] = field(default_factory=list)
    hparam_steps: list[int] = field(default_factory=list)
    hparams_adapted: dict[str, list[float]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    diverged: bool = False
    sec_per_iter: float = math.nan
    mean_sec_per_iter: float = math.nan
    peak_memory_mb: float | None = None
    num_meta_parameters: int = 0

    @property
    def steps_done(self) -> int:
        return len(self.train_loss)


class _StepTimer:
    """Per-step wall time: CUDA events (read once at the end) or ``perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[Any, Any]] = []
        self.cpu: list[float] = []
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
        else:
            self.cpu.append(time.perf_counter() - self._start)

    def summary(self) -> tuple[float, float]:
        """``(median, mean)`` seconds per step (``nan`` if no step finished)."""
        if self.cuda:
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) / 1000.0 for a, b in self.events]
        else:
            times = self.cpu
        if not times:
            return math.nan, math.nan
        return statistics.median(times), statistics.fmean(times)


def _evaluate(task: Any, model: torch.nn.Module, split: str) -> dict[str, float]:
    out = task.evaluate(model, split)
    return {f"{split}_loss": out["loss"], f"{split}_{task.metric}": out[task.metric]}


def run_training(
    task: Any,
    spec: str,
    hparams: Mapping[str, Any],
    *,
    seed: int,
    steps: int,
    log_every: int = 10,
    eval_every: int | None = None,
    eval_split: str = "test",
    final_splits: Sequence[str] = ("train", "val", "test"),
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Train a fresh ``task.make_model(seed)`` with ``spec`` for ``steps`` steps.

    Args:
        task: a ``tasks.Task`` (or anything with its API).
        spec: an optimizer spec (``meta_test.specs``).
        hparams: the builder's hyperparameters (e.g. ``{"lr": 0.01, "weight_decay": 1e-4}``).
        seed: model initialisation and batch-order seed.
        steps: number of training steps (>= 1).
        log_every: read back losses / check finiteness / log hparams every N steps.
        eval_every: evaluate ``eval_split`` every N steps (``None``: only at the end).
        final_splits: splits evaluated after training.
        progress: called with the number of steps just done (e.g. ``tqdm.update``).
    """
    if steps < 1:
        raise ValueError(f"steps={steps!r}: must be a positive integer")
    if log_every < 1:
        raise ValueError(f"log_every={log_every!r}: must be a positive integer")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every={eval_every!r}: must be a positive integer or None")
    device = torch.device(task.device)
    model = task.make_model(seed)
    model.train()
    trainer = build_trainer(spec, model, task, dict(hparams))
    result = RunResult(spec, dict(hparams), int(seed), int(steps), task.metric)
    result.num_meta_parameters = int(trainer.num_meta_parameters)
    stream = task.train_batches(seed)
    extra: list[Any] = []

    def draw_batch() -> tuple[Tensor, Tensor]:
        if not extra:
            extra.append(task.train_batches(seed + EXTRA_STREAM_OFFSET))
        return next(extra[0])

    def eval_now(t: int) -> None:
        result.eval_steps.append(t)
        result.eval_metric.append(task.evaluate(model, eval_split)[task.metric])
        model.train()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if eval_every is not None:
        eval_now(0)
    # float64: float32 resolves a loss of 14 only to ~1e-6 (f - f* targets need better)
    losses = torch.full((steps,), math.nan, device=device, dtype=torch.float64)
    timer = _StepTimer(device)
    checked = 0
    for t in range(steps):
        batch = next(stream)
        timer.start()
        try:
            loss = trainer.step(batch, draw_batch)
        except (FloatingPointError, torch.linalg.LinAlgError):
            result.diverged = True
            break
        timer.stop()
        losses[t] = loss.detach().reshape(())
        done = t + 1
        if done % log_every == 0 or done == steps:
            window = losses[checked:done]
            checked = done
            if progress is not None:
                progress(len(window))
            if not bool(torch.isfinite(window).all()):
                result.diverged = True
                break
            for k, v in trainer.hparam_log().items():
                result.hparams_adapted.setdefault(k, []).append(float(v))
            result.hparam_steps.append(done)
        if eval_every is not None and done % eval_every == 0:
            eval_now(done)
    if progress is not None and checked < steps:
        progress(steps - checked)
    values = losses.cpu().tolist()
    first_bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), len(values))
    result.train_loss = values[:first_bad]
    result.sec_per_iter, result.mean_sec_per_iter = timer.summary()
    if not result.diverged:
        for split in final_splits:
            result.final.update(_evaluate(task, model, split))
        if not all(math.isfinite(v) for v in result.final.values()):
            result.diverged = True
    if result.diverged:
        for split in final_splits:
            result.final.update({f"{split}_loss": math.nan, f"{split}_{task.metric}": math.nan})
    if device.type == "cuda":
        result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return result
