"""The offline meta-learner: MetaMD, and (as presets) its competitors.

``k = tasks_per_step`` inner runs are in flight. Each meta-step advances every run by one
window of the deployed update, asks the configured engine for the hypergradient of the
window's meta-objective (:meth:`InnerRun.window` builds the problem; the engine comes from
the registry, so a user's engine works here), averages the hypergradients of the runs that
stayed finite and takes one meta-optimizer step. A run that reaches ``inner_steps``
restarts on a newly drawn task (truncated training: Metz et al. 2019; learned_optimization's
``truncated_step``); with ``window = inner_steps`` every meta-step is a whole inner run, as
in MetaMD Algorithm 1.

Run ``i``'s task, initialisation seed and data seed are drawn from a generator seeded by
``(seed, meta-step of the draw, i)`` alone, so a resumed or distributed run sees exactly the
same tasks. Task sources are duck-typed (metaopt never imports ``tasks``): an object with
``sample(generator) -> Task`` (a task family) or a sequence of tasks (a suite's training
domains), one drawn uniformly per run.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version

from metaopt.hypergrad.engines import ENGINES
from metaopt.hypergrad.errors import NonFiniteHypergradient
from metaopt.hypergrad.problem import Problem, finite
from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.learners.base import LearnedOptimizer, MetaStep, make_meta_optimizer
from metaopt.learners.metamd.config import MetaMDConfig, preset_config
from metaopt.learners.metamd.window import InnerRun
from metaopt.optim.rules import get_rule

__all__ = ["MetaMD", "draw_generator"]

log = logging.getLogger(__name__)
#: config fields a resumed run may change
RESUMABLE_CHANGES = frozenset({"lr", "meta_lr", "meta_steps"})
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates (seed, step, run) triples


def draw_generator(seed: int, step: int, run: int = 0) -> torch.Generator:
    """The CPU generator behind run ``run``'s draw at meta-step ``step`` of seed ``seed``."""
    mixed = ((int(seed) * _MIX + int(step)) * _MIX + int(run)) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


class MetaMD:
    """Meta-learns an optimizer (preconditioner + rule) across a distribution of tasks.

    Args:
        tasks: a task family (``sample(generator) -> Task``) or a sequence of tasks.
        config: a :class:`MetaMDConfig` (``None``: ``preset`` with ``overrides``).
        preset: a recipe of :data:`~metaopt.learners.metamd.PRESETS`: ``"kron-adamw"``
            (default, the recipe that measures best), ``"metamd-paper"``, ``"metasgd"``,
            ``"metacurvature"``.
        model: a model of the tasks' architecture for building the preconditioner
            (default: the model of a task drawn with ``seed``).
        **overrides: :class:`MetaMDConfig` fields to replace.

    Attributes:
        preconditioner: the meta-parameters (a :class:`KroneckerPreconditioner`).
        meta_steps: meta-updates done.
        history: one :class:`~metaopt.learners.MetaStep` per meta-update.
    """

    #: the preset used when neither ``config`` nor ``preset`` is given
    default_preset = "kron-adamw"

    def __init__(
        self,
        tasks: Any,
        config: MetaMDConfig | None = None,
        *,
        preset: str | None = None,
        model: nn.Module | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = preset_config(preset or self.default_preset, **overrides)
        else:
            if preset is not None:
                raise ValueError("pass either config or preset, not both")
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self._sample, self._source_name = _task_sampler(tasks)
        if model is None:
            model = self._sample(draw_generator(config.seed, -1)).make_model(config.seed)
        with torch.random.fork_rng(devices=[]):  # the factors' random start: seeded, local
            torch.manual_seed(config.seed)
            self.preconditioner = KroneckerPreconditioner.for_model(
                model, config.preconditioner, **config.preconditioner_options
            )
        ref = next(iter(model.parameters()), None)
        if ref is not None and ref.is_floating_point():
            self.preconditioner.to(dtype=torch.promote_types(ref.dtype, torch.float32))
        if config.implicit and not self.preconditioner.has_metric:
            raise ValueError(
                f"engine={config.engine!r}: the implicit hypergradient needs a family with an "
                f"explicit metric M (lowrank, rank1, diag, scalar); preconditioner="
                f"{config.preconditioner!r} "
                "has none: use 'unroll', 'es' or 'pes'"
            )
        self.rule = get_rule(config.rule)
        self.rule_hparams = self.rule.hparams(config.rule_options)
        self.meta_optimizer = make_meta_optimizer(
            config.meta_optimizer, self.preconditioner.parameters(), config.meta_lr
        )
        self.engine = ENGINES.get(config.engine)
        self._engine_takes_seed = "seed" in inspect.signature(self.engine.obj).parameters
        self.meta_steps = 0
        self.history: list[MetaStep] = []
        self._runs: list[InnerRun | None] = [None] * config.tasks_per_step

    # --- the protocol ------------------------------------------------------------------
    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.preconditioner.parameters())

    def learned_optimizer(self) -> LearnedOptimizer:
        c = self.config
        return LearnedOptimizer(self.preconditioner, c.rule, self.rule_hparams, c.lr, c.compose)

    def meta_step(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Callable[[list[Tensor]], None] | None = None,
    ) -> MetaStep:
        """One meta-update over this rank's inner runs (``[rank::world_size]``).

        ``all_reduce`` (an in-place SUM across ranks) is called once with the summed
        hypergradients followed by one 4-vector ``[kept runs, sum of meta-objectives,
        dropped runs, sum of window training losses]``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}: must be in [0, world_size={world_size})")
        start = time.perf_counter()
        params = self.meta_parameters()
        sums = [torch.zeros_like(p) for p in params]
        stats = torch.zeros(4, dtype=torch.float64, device=params[0].device)
        for i in range(rank, self.config.tasks_per_step, world_size):
            kept_run = self._advance(i)
            if kept_run is None:
                stats[2] += 1
                continue
            grads, value, train_loss = kept_run
            for acc, g in zip(sums, grads, strict=True):
                acc.add_(g.to(acc.dtype))
            stats[0] += 1
            stats[1] += value
            stats[3] += train_loss
        if all_reduce is not None:
            all_reduce([*sums, stats])
        kept, total, dropped, loss_total = stats.tolist()  # one host sync for the record
        norm = float("nan")
        if kept > 0:
            for p, acc in zip(params, sums, strict=True):
                p.grad = acc / kept
            norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
            self.meta_optimizer.step()
            # a fused meta-optimizer does not bump version counters; the families'
            # factor caches key on them
            increment_version(params)
            self.meta_optimizer.zero_grad(set_to_none=True)
        self.meta_steps += 1
        record = MetaStep(
            step=self.meta_steps,
            meta_objective=total / kept if kept else float("nan"),
            hypergrad_norm=norm,
            seconds=time.perf_counter() - start,
            skipped=int(dropped),
            extra={"train_loss": loss_total / kept if kept else float("nan")},
        )
        self.history.append(record)
        return record

    def meta_train(
        self,
        meta_steps: int | None = None,
        callback: Callable[[MetaStep], None] | None = None,
        *,
        progress: bool = False,
    ) -> LearnedOptimizer:
        """Run ``meta_steps`` more meta-updates (default: the recipe's ``config.meta_steps``;
        ``callback(record)`` after each; ``progress=True`` shows a tqdm bar); returns the
        learned optimizer."""
        if meta_steps is None:
            meta_steps = self.config.meta_steps
        if isinstance(meta_steps, bool) or not isinstance(meta_steps, int) or meta_steps < 0:
            raise ValueError(f"meta_steps={meta_steps!r}: must be a non-negative integer")
        from tqdm.auto import tqdm

        with tqdm(total=meta_steps, disable=not progress, unit="step", desc="meta-train") as bar:
            for _ in range(meta_steps):
                record = self.meta_step()
                bar.update(1)
                bar.set_postfix(meta_objective=f"{record.meta_objective:.4g}")
                if callback is not None:
                    callback(record)
        return self.learned_optimizer()

    # --- inner runs --------------------------------------------------------------------
    def _draw(self, i: int, at: int) -> InnerRun:
        gen = draw_generator(self.config.seed, at, i)
        task = self._sample(gen)
        if not (hasattr(task, "make_model") and hasattr(task, "train_batches")):
            raise ValueError(
                f"tasks: the source returned {task!r}, which is not a Task "
                "(needs make_model, train_batches, loss, batches)"
            )
        init_seed, data_seed = torch.randint(0, 2**31 - 1, (2,), generator=gen).tolist()
        run = InnerRun.start(task, init_seed, data_seed, at, self.rule, self.rule_hparams,
                             self.config.batch_size)  # fmt: skip
        _check_architecture(self.preconditioner, run.theta1)
        run.end = self.config.inner_steps - (self._offset(i) if at == 0 else 0)
        return run

    def _offset(self, i: int) -> int:
        """How much shorter run ``i``'s first inner run is: the runs in flight start at
        different points of their runs, so each meta-step averages windows from across the
        trajectory rather than ``k`` windows of the same phase (learned_optimization's
        ``random_initial_iteration_offset``, here evenly spaced and whole windows)."""
        c = self.config
        window = c.steps_per_window
        return (i * c.inner_steps // c.tasks_per_step) // window * window

    def _advance(self, i: int) -> tuple[tuple[Tensor, ...], Tensor, Tensor] | None:
        """One window of run ``i``: ``(hypergradient, objective, mean training loss of the
        window)`` as tensors (summed on the device), or ``None`` when the run is dropped."""
        c = self.config
        run = self._runs[i]
        if run is None or run.t >= run.end:
            run = self._runs[i] = self._draw(i, self.meta_steps)
        steps = min(c.steps_per_window, run.end - run.t)
        problem, options = self.window_problem(run, steps, i)
        try:
            result = self.engine.obj(problem, run.carry, **options)
        except NonFiniteHypergradient as err:
            return self._drop(i, run, f"{err} (term {err.term!r})")
        if not finite([*problem.params(result.state), result.value]):  # one host sync
            return self._drop(i, run, "non-finite inner run")
        run.state, run.carry = result.state, result.carry
        run.t += steps
        return result.grads, result.value, run.window_mean_loss(result.state, steps)

    def window_problem(
        self, run: InnerRun, steps: int, i: int = 0
    ) -> tuple[Problem, dict[str, Any]]:
        """The next ``steps`` inner steps of ``run`` (run ``i`` in flight) as this learner's
        engine takes them: ``(problem, options)`` for ``self.engine.obj(problem, run.carry,
        **options)``.

        ``problem`` is :meth:`InnerRun.window` under this learner's preconditioner, rule,
        learning rate, composition and meta-objective at this meta-step (it draws the
        window's batches); ``options`` are the engine alias's, then ``config.engine_options``,
        then, for an engine that takes a ``seed`` and was given none, one drawn from
        ``(seed, meta-step, i)``."""
        c = self.config
        problem = run.window(
            steps, self.preconditioner, self.rule, self.rule_hparams, lr=c.lr, compose=c.compose,
            meta_objective=c.meta_objective, objective_options=c.objective_options,
            meta_step=self.meta_steps,
        )  # fmt: skip
        options = {**self.engine.options, **c.engine_options}
        if self._engine_takes_seed and "seed" not in options:
            options["seed"] = int(draw_generator(c.seed, self.meta_steps, i).initial_seed())
        return problem, options

    def _drop(self, i: int, run: InnerRun, reason: str) -> None:
        name = getattr(run.task, "name", type(run.task).__name__)
        log.warning("meta-step %d: dropped the run on %s (%s)", self.meta_steps, name, reason)
        self._runs[i] = None  # its state is broken: the next meta-step draws a new run
        return None

    # --- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Meta-parameters, meta-optimizer state, counters, history and the runs in flight
        (each re-drawn from its seeds on load, then set to its saved state)."""
        return {
            "config": self.config.to_dict(),
            "preconditioner": {k: v.clone() for k, v in self.preconditioner.state_dict().items()},
            # a copy: the meta-optimizer's state_dict holds its live moment buffers
            "meta_optimizer": copy.deepcopy(self.meta_optimizer.state_dict()),
            "meta_steps": self.meta_steps,
            "history": [r.as_dict() for r in self.history],
            "runs": [None if r is None else _run_state(r) for r in self._runs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The config must match this learner's except for
        the learning rates and the run length (``lr``, ``meta_lr``, ``meta_steps``), which a
        resumed run may change, e.g. to continue a diverged run more gently; the configured
        ``meta_lr`` then replaces the saved meta-optimizer's."""
        mine = self.config.to_dict()
        diff = sorted(
            k for k in mine if k not in RESUMABLE_CHANGES and state["config"].get(k) != mine[k]
        )
        if diff:
            raise ValueError(f"state: config differs from this learner's in fields {diff}")
        self.preconditioner.load_state_dict(state["preconditioner"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        for group in self.meta_optimizer.param_groups:
            group["lr"] = self.config.meta_lr
        self.meta_steps = int(state["meta_steps"])
        self.history = [MetaStep.from_dict(r) for r in state["history"]]
        runs: list[InnerRun | None] = []
        for i, saved in enumerate(state["runs"]):
            if saved is None:
                runs.append(None)
                continue
            run = self._draw(i, int(saved["drawn_at"]))
            run.t, run.end = int(saved["t"]), int(saved["end"])
            run.state = tuple(saved["state"])
            run.stream.load_state_dict(saved["stream"])
            run.carry = saved["carry"]
            runs.append(run)
        self._runs = runs

    @staticmethod
    def merge_rank_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One state from the :meth:`state_dict` of every rank of a distributed run (each
        holds its own runs in flight; everything else is the same on every rank)."""
        merged = dict(states[0])
        merged["runs"] = [
            next((s["runs"][i] for s in states if s["runs"][i] is not None), None)
            for i in range(len(states[0]["runs"]))
        ]
        return merged

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tasks={self._source_name}, meta_steps={self.meta_steps}, "
            f"config={self.config})"
        )


def _run_state(run: InnerRun) -> dict[str, Any]:
    return {
        "drawn_at": run.drawn_at,
        "t": run.t,
        "end": run.end,
        "state": tuple(t.clone() for t in run.state),
        "stream": run.stream.state_dict(),
        "carry": run.carry,
    }


def _check_architecture(pre: KroneckerPreconditioner, params: dict[str, Tensor]) -> None:
    shapes = {n: tuple(t.shape) for n, t in params.items()}
    if shapes != pre.param_shapes:
        raise ValueError(
            f"task model: parameters {shapes} do not match the preconditioner's "
            f"{pre.param_shapes}; every task must use the same architecture"
        )


def _task_sampler(tasks: Any) -> tuple[Callable[[torch.Generator], Any], str]:
    """``sample(generator) -> task`` for a family or a sequence of tasks."""
    if hasattr(tasks, "sample") and callable(tasks.sample):
        return tasks.sample, getattr(tasks, "name", type(tasks).__name__)
    if isinstance(tasks, Sequence) and not isinstance(tasks, str):
        pool = list(tasks)
        if not pool:
            raise ValueError("tasks: the task list is empty")
        for t in pool:
            if not (hasattr(t, "make_model") and hasattr(t, "train_batches")):
                raise ValueError(f"tasks: {t!r} is not a Task (needs make_model, train_batches)")

        def from_list(gen: torch.Generator) -> Any:
            return pool[int(torch.randint(len(pool), (1,), generator=gen))]

        return from_list, f"{len(pool)} tasks"
    raise ValueError(
        f"tasks={tasks!r}: must be a task family (with sample(generator)) or a list of tasks"
    )
