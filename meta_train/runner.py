"""The loop around any :class:`metaopt.MetaLearner`: metrics, checkpoints, signals, files.

``run(config, learner, dist, out, total)`` takes meta-steps until ``total`` are done,
appending one line per step to ``out/metrics.jsonl``, writing ``out/checkpoint.safetensors``
every ``checkpoint_every`` steps and when SIGTERM or SIGINT arrives (then it stops with
:class:`Stopped`), and at the end saves the learned optimizer to
``out/learned_optimizer.safetensors`` (its rule and hyperparameters, the run's config as
metadata) and ``out/meta_objective.png``. Only rank 0 writes; every rank steps.

A checkpoint holds ``{"learner": learner.state_dict(), "rng": every global RNG state,
"step": n, "config": identity fields}``; the learner's own state carries its meta-optimizer
state and its inner runs in flight (in a distributed run every rank's runs are gathered
into it first), so a resumed run continues bit-for-bit on CPU.

Before every checkpoint and before the learned-optimizer file, the learner's state must be
finite (every floating tensor, and the learner's optional ``check_finite()``); a diverged
run stops with :class:`~meta_train.checkpoint.NonFiniteState` instead, so the last good
checkpoint stays.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import metaopt
from meta_train.checkpoint import (
    CheckpointError,
    NonFiniteState,
    load_checkpoint,
    save_checkpoint,
)
from meta_train.config import IDENTITY_EXEMPT, TrainConfig
from meta_train.distributed import Dist
from meta_train.metrics import MetricsLog, plot_metrics
from metaopt.cli_support import one_line
from metaopt.io import first_non_finite
from metaopt.learners import MetaLearner, MetaStep
from metaopt.optim import LearnedOptimizer

__all__ = ["CHECKPOINT", "LEARNED", "Stopped", "check_resumable", "run"]

CHECKPOINT = "checkpoint.safetensors"
LEARNED = "learned_optimizer.safetensors"
METRICS = "metrics.jsonl"
PLOT = "meta_objective.png"


class Stopped(Exception):
    """Training stopped on a signal after writing a checkpoint; ``.signum`` is the signal."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by signal {signum} at outer step {step} (checkpoint written)")
        self.signum = signum
        self.step = step


class _SignalFlag:
    """SIGTERM/SIGINT only set a flag; the loop checkpoints and stops at a step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _divergence(learner: MetaLearner, state: dict[str, Any]) -> str | None:
    """What makes ``state`` unfit for a checkpoint: its first non-finite tensor, or a
    divergence the learner's optional ``check_finite()`` reports (``FloatingPointError``)
    that its tensors do not show yet; ``None`` when it is fine."""
    bad = first_non_finite(state, "learner")
    if bad is not None:
        return f"tensor {bad!r} is not finite"
    check = getattr(learner, "check_finite", None)
    if callable(check):
        try:
            check()
        except FloatingPointError as err:
            return f"the learner reports: {one_line(err)}"
    return None


#: the largest magnitude a learned meta-parameter may reach before the result is refused as
#: absurd (a preconditioner factor or log-scale this large means the meta-training diverged)
MAX_META_PARAMETER = 1e6


def _unfit_result(learner: Any, learned: LearnedOptimizer) -> str | None:
    """Why the learned optimizer must not be written: no meta-update was ever applied (every
    meta-step dropped its tasks), a non-finite tensor, or one beyond ``MAX_META_PARAMETER``."""
    history = getattr(learner, "history", [])
    if (
        learner.meta_steps
        and history
        and all(r.hypergrad_norm != r.hypergrad_norm for r in history)
    ):
        return "no meta-step applied an update (every task was dropped as non-finite)"
    if learned.preconditioner is None:
        return None
    tensors = learned.preconditioner.state_dict()
    bad = first_non_finite(tensors, "preconditioner")
    if bad is not None:
        return f"tensor {bad!r} is not finite"
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > MAX_META_PARAMETER:
            return (
                f"preconditioner tensor {name!r} reaches {float(t.abs().max()):.3g}, beyond "
                f"{MAX_META_PARAMETER:g}: the meta-training diverged"
            )
    return None


def check_resumable(config: TrainConfig, out: Path) -> dict[str, Any]:
    """Load ``out``'s checkpoint and check it belongs to this configuration.

    Raises:
        CheckpointError: missing, corrupt or foreign checkpoint, or one written by a run
            whose configuration differs (the first differing field is named).
    """
    state = load_checkpoint(out / CHECKPOINT)
    if not isinstance(state, dict) or not {"learner", "rng", "step", "config"} <= set(state):
        raise CheckpointError(f"checkpoint {str(out / CHECKPOINT)!r} lacks the pipeline fields")
    saved, ours = state["config"], config.identity()
    for key in sorted((set(saved) | set(ours)) - IDENTITY_EXEMPT):
        if saved.get(key) != ours.get(key):
            raise CheckpointError(
                f"checkpoint {str(out / CHECKPOINT)!r} was written with {key}={saved.get(key)!r}, "
                f"this run has {key}={ours.get(key)!r}; refusing to resume a different run"
            )
    return state


def run(
    config: TrainConfig,
    learner: MetaLearner,
    dist: Dist,
    out: Path,
    total: int,
    *,
    resume_state: dict[str, Any] | None = None,
) -> LearnedOptimizer:
    """Meta-train ``learner`` to ``total`` meta-steps; returns its learned optimizer.

    On resume, ``learner`` already holds ``resume_state["learner"]`` (the caller loads it,
    before anything is written, to refuse a checkpoint that does not fit; loading is not
    cheap: MetaMD re-draws every inner run in flight); ``resume_state`` restores the random
    generators and the metrics log here.

    Raises:
        Stopped: a SIGTERM/SIGINT arrived; a checkpoint of the last finished step was written.
        NonFiniteState: the learner's state holds a NaN or infinity where a checkpoint or
            the artefact was due; nothing was written, the last good checkpoint stays.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    metrics = MetricsLog(out / METRICS)
    if resume_state is not None:
        _set_rng_state(resume_state["rng"])
        if dist.is_main:
            metrics.truncate_after(int(resume_state["step"]))

    def checkpoint() -> None:
        learner_state = learner.state_dict()
        bad = _divergence(learner, learner_state)  # on every rank, so all stop together
        if dist.any(bad is not None):
            raise NonFiniteState(bad or "another rank diverged", learner.meta_steps)
        if dist.world_size > 1:
            learner_state = _gathered(learner, learner_state, dist)
        if dist.is_main:
            state = {
                "learner": learner_state,
                "rng": _rng_state(),
                "step": int(learner.meta_steps),
                "config": config.identity(),
            }
            save_checkpoint(state, out / CHECKPOINT)

    bar = tqdm(
        total=total,
        initial=learner.meta_steps,
        desc=f"meta-train {config.learner}",
        unit="step",
        disable=not (dist.is_main and config.progress),
        dynamic_ncols=True,
    )
    with _SignalFlag() as flag, bar:
        while learner.meta_steps < total:
            t0 = time.perf_counter()
            try:
                record = learner.meta_step(
                    rank=dist.rank, world_size=dist.world_size, all_reduce=dist.all_reduce
                )
            except FloatingPointError as err:  # the learner's own divergence check
                raise NonFiniteState(
                    f"the learner stopped ({one_line(err)})", learner.meta_steps + 1
                ) from None
            if not isinstance(record, MetaStep):
                raise TypeError(f"learner {config.learner!r}: meta_step() returned {record!r}")
            if dist.is_main:
                metrics.append({**record.as_dict(), "wall_seconds": time.perf_counter() - t0})
            bar.update(1)
            bar.set_postfix(meta_objective=f"{record.meta_objective:.4g}")
            stopping = dist.any(flag.signum is not None)
            if stopping or learner.meta_steps % config.checkpoint_every == 0:
                checkpoint()
            if stopping:
                dist.barrier()
                raise Stopped(flag.signum or signal.SIGTERM, int(learner.meta_steps))
    if learner.meta_steps % config.checkpoint_every != 0:
        checkpoint()
    learned = learner.learned_optimizer()
    problem = _unfit_result(learner, learned)
    if problem is not None:
        raise NonFiniteState(problem, learner.meta_steps)
    if dist.is_main:
        metaopt.save_learned_optimizer(
            learned, out / LEARNED, metadata={"config": config.to_dict()}
        )
        plot_metrics(out / METRICS, out / PLOT)
    dist.barrier()
    return learned


def _gathered(learner: Any, state: dict[str, Any], dist: Dist) -> dict[str, Any]:
    """One state from every rank's (each holds its own inner runs in flight)."""
    states = dist.gather_objects(state)
    merge = getattr(type(learner), "merge_rank_states", None)
    return merge(states) if merge is not None and dist.is_main else state
