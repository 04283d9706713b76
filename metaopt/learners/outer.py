"""The offline outer loop shared by MetaMD, MetaSGD and Meta-Curvature (MetaMD Algorithm 1).

Each outer step ``s`` draws ``k`` training tasks and, for each, an initialisation seed and a
data seed, from a ``torch.Generator`` seeded by ``(config.seed, s)`` alone -- so a resumed or
distributed run sees exactly the same tasks. Each task is trained for ``T`` inner steps with
the current preconditioner and contributes its hypergradient
(:func:`~metaopt.learners.task_hypergrad.task_hypergradient`); tasks whose inner run or
hypergradient is not finite are dropped and counted. The mean hypergradient over the kept
tasks drives the meta-optimizer (Adam by default).

Task sources are duck-typed (metaopt never imports ``tasks``): an object with
``sample(generator) -> Task`` (a task family), or a sequence of Task objects (e.g. a suite's
``meta_train_tasks(holdout)``), from which ``k`` distinct tasks are drawn per step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.learners.config import OuterConfig
from metaopt.learners.task_hypergrad import task_hypergradient

__all__ = ["OuterLearner", "step_generator"]

log = logging.getLogger(__name__)
_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates (seed, step) pairs


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator for outer step ``step`` of a run seeded by ``seed`` (CPU)."""
    return torch.Generator().manual_seed((int(seed) * _MIX + int(step)) % (2**63 - 1))


class OuterLearner:
    """Offline meta-learner of a :class:`KroneckerPreconditioner` over a task distribution.

    Args:
        tasks: a task family (``sample(generator) -> Task``) or a sequence of tasks.
        config: an :class:`OuterConfig` (``None``: the learner's defaults).
        model: a model of the tasks' architecture, used to build the preconditioner
            (default: the model of the first task drawn with ``config.seed``).
        **overrides: fields of the config to replace.

    Attributes:
        preconditioner: the meta-parameters (save with ``metaopt.save_preconditioner``).
        step: outer steps done.
        history: the stats dict of every outer step.
    """

    #: config defaults of this learner (subclasses override)
    defaults: dict[str, Any] = {}

    def __init__(
        self,
        tasks: Any,
        config: OuterConfig | None = None,
        *,
        model: nn.Module | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            fields = {**self.defaults, **overrides}
            if overrides.get("engine", fields.get("engine")) != self.defaults.get("engine"):
                # the default engine's options (Neumann's J, alpha) do not fit another engine
                fields.setdefault("engine_options", {})
                if "engine_options" not in overrides:
                    fields["engine_options"] = {}
            config = OuterConfig(**fields)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self._sample, self._source_name = _task_sampler(tasks, config.tasks_per_step)
        if model is None:
            first = self._sample(step_generator(config.seed, -1), 1)[0]
            model = first.make_model(config.seed)
        with torch.random.fork_rng(devices=[]):  # the factors' random start: seeded, local
            torch.manual_seed(config.seed)
            self.preconditioner = KroneckerPreconditioner.for_model(
                model, config.family, **config.family_options()
            )
        ref = next(iter(model.parameters()), None)
        if ref is not None and ref.is_floating_point():
            self.preconditioner.to(dtype=torch.promote_types(ref.dtype, torch.float32))
        params = list(self.preconditioner.parameters())
        if config.meta_optimizer == "adam":
            self.meta_optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.meta_lr)
        else:
            self.meta_optimizer = torch.optim.SGD(params, lr=config.meta_lr)
        self.step = 0
        self.history: list[dict[str, float]] = []

    # --- one outer step --------------------------------------------------------------------
    def draw(self, step: int) -> list[tuple[Any, int, int]]:
        """The ``k`` ``(task, init_seed, data_seed)`` triples of outer step ``step``."""
        gen = step_generator(self.config.seed, step)
        chosen = self._sample(gen, self.config.tasks_per_step)
        seeds = torch.randint(0, 2**31 - 1, (len(chosen), 2), generator=gen).tolist()
        return [(t, int(a), int(b)) for t, (a, b) in zip(chosen, seeds, strict=True)]

    def outer_step(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Callable[[list[Tensor]], None] | None = None,
    ) -> dict[str, float]:
        """One outer step (Algorithm 1, lines 4-10) over this rank's share of the tasks.

        This rank handles tasks ``[rank::world_size]``. ``all_reduce`` (an in-place SUM
        across ranks) is called once with the summed hypergradients followed by one
        4-vector ``[kept tasks, sum of meta-objectives, dropped tasks, sum of final losses]``.

        Returns ``{"meta_objective", "hypergrad_norm", "seconds", "skipped_tasks",
        "final_loss"}`` (floats; means over the kept tasks).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r}: must be in [0, world_size={world_size})")
        start = time.perf_counter()
        pre = self.preconditioner
        params = list(pre.parameters())
        ref = params[0]
        sums = [torch.zeros_like(p) for p in params]
        stats = torch.zeros(4, dtype=torch.float64, device=ref.device)
        for task, init_seed, data_seed in self.draw(self.step)[rank::world_size]:
            result = task_hypergradient(
                task, pre, self.config, init_seed=init_seed, data_seed=data_seed, step=self.step
            )
            if result.grads is None:
                stats[2] += 1
                name = getattr(task, "name", type(task).__name__)
                log.warning("outer step %d: dropped task %s (%s)", self.step, name, result.reason)
                continue
            for acc, g in zip(sums, result.grads, strict=True):
                acc.add_(g.to(acc.dtype))
            stats[0] += 1
            stats[1] += result.meta_objective
            stats[3] += result.final_loss
        if all_reduce is not None:
            all_reduce([*sums, stats])
        kept = float(stats[0])
        norm = float("nan")
        if kept > 0:
            for p, acc in zip(params, sums, strict=True):
                p.grad = acc / kept
            norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
            self.meta_optimizer.step()
            self.meta_optimizer.zero_grad(set_to_none=True)
        self.step += 1
        out = {
            "meta_objective": float(stats[1]) / kept if kept else float("nan"),
            "hypergrad_norm": norm,
            "seconds": time.perf_counter() - start,
            "skipped_tasks": float(stats[2]),
            "final_loss": float(stats[3]) / kept if kept else float("nan"),
        }
        self.history.append(out)
        return out

    def meta_train(
        self, outer_steps: int, callback: Callable[[int, dict[str, float]], None] | None = None
    ) -> KroneckerPreconditioner:
        """Run ``outer_steps`` more outer steps; returns the preconditioner."""
        if isinstance(outer_steps, bool) or not isinstance(outer_steps, int) or outer_steps < 0:
            raise ValueError(f"outer_steps={outer_steps!r}: must be a non-negative integer")
        for _ in range(outer_steps):
            stats = self.outer_step()
            if callback is not None:
                callback(self.step, stats)
        return self.preconditioner

    # --- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Meta-parameters, meta-optimizer state, step, config and the global RNG state."""
        return {
            "preconditioner": {k: v.clone() for k, v in self.preconditioner.state_dict().items()},
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "step": self.step,
            "config": dataclasses.asdict(self.config),
            "rng": torch.get_rng_state(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the config must match this learner's."""
        mine = dataclasses.asdict(self.config)
        if state["config"] != mine:
            diff = sorted(k for k in mine if state["config"].get(k) != mine[k])
            raise ValueError(f"state: config differs from this learner's in fields {diff}")
        self.preconditioner.load_state_dict(state["preconditioner"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])
        self.history = list(state.get("history", []))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tasks={self._source_name}, step={self.step}, "
            f"config={self.config})"
        )


def _task_sampler(tasks: Any, k: int) -> tuple[Callable[[torch.Generator, int], list[Any]], str]:
    """``sample(generator, n) -> n tasks`` for a family or a sequence of tasks."""
    if hasattr(tasks, "sample") and callable(tasks.sample):

        def from_family(gen: torch.Generator, n: int) -> list[Any]:
            return [tasks.sample(gen) for _ in range(n)]

        return from_family, getattr(tasks, "name", type(tasks).__name__)
    if isinstance(tasks, Sequence) and not isinstance(tasks, str):
        pool = list(tasks)
        if not pool:
            raise ValueError("tasks: the task list is empty")
        for t in pool:
            if not (hasattr(t, "make_model") and hasattr(t, "train_batches")):
                raise ValueError(f"tasks: {t!r} is not a Task (needs make_model, train_batches)")
        if len(pool) < k:
            raise ValueError(
                f"tasks_per_step={k}: the task list has only {len(pool)} training tasks "
                f"(domains); use tasks_per_step <= {len(pool)}"
            )

        def from_list(gen: torch.Generator, n: int) -> list[Any]:
            idx = torch.randperm(len(pool), generator=gen)[:n].tolist()
            return [pool[i] for i in idx]

        return from_list, f"{len(pool)} tasks"
    raise ValueError(
        f"tasks={tasks!r}: must be a task family (with sample(generator)) or a list of tasks"
    )
