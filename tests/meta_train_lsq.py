"""A small, real MetaLearner for the meta_train tests (not a test file itself).

``DiagLSQ`` meta-learns a per-parameter (``"diag"`` family) preconditioner for a linear
least-squares model across random least-squares tasks whose input coordinates have fixed,
very different scales (so a good diagonal preconditioner exists). Each task trains ``T``
steps of preconditioned gradient descent from a fresh initialisation; the meta-objective is
the final training loss, and its hypergradient is the exact derivative through all ``T``
steps (reverse-mode autograd, float64). It follows the :class:`metaopt.MetaLearner`
protocol to the letter: tasks and initialisation seeds of meta-step ``n`` come from a
generator seeded by ``(seed, n)`` alone; rank ``r`` handles tasks ``[r::world_size]``; the
summed gradients and the kept-task count go through ``all_reduce``; its learned optimizer
is the preconditioner with plain SGD at the inner learning rate (the update it trained).

Registered as learner ``"lsq-diag"`` and family ``"lsq-test"``; run as a script it is
``python -m meta_train`` with those registered (for subprocess and torchrun tests); with
``META_TRAIN_LSQ_PAUSE_IN_CHECKPOINT_WRITE=SECONDS`` every checkpoint write pauses that long
after writing its temporary file, so a test can kill the process inside a write.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import meta_train
import tasks
from metaopt.func import detached_params, functional_forward, loss_and_grads
from metaopt.kron import KroneckerPreconditioner
from metaopt.learners import MetaStep
from metaopt.optim import LearnedOptimizer
from tasks.base import Task, TaskFamily


class LSQFamily(TaskFamily):
    """Least squares ``min_w ||X w - y||^2 / n`` with column scales ``cond**(j/(d-1))``."""

    name = "lsq-test"

    def __init__(self, dim: int = 12, n: int = 48, cond: float = 6.0) -> None:
        self.dim, self.n = dim, n
        self.scales = cond ** (torch.arange(dim, dtype=torch.float64) / (dim - 1))

    def sample(self, generator: torch.Generator) -> Task:
        X = torch.randn(self.n, self.dim, generator=generator, dtype=torch.float64) * self.scales
        w = torch.randn(self.dim, 1, generator=generator, dtype=torch.float64)
        y = X @ w + 0.01 * torch.randn(self.n, 1, generator=generator, dtype=torch.float64)
        data = TensorDataset(X, y)
        dim = self.dim
        return Task(
            name="lsq",
            model_fn=lambda: nn.Linear(dim, 1, bias=False).double(),
            loss_fn=F.mse_loss,
            metric="mse",
            train=data,
            val=data,
            test=data,
            batch_size=self.n,
        )


class DiagLSQ:
    """Meta-learns ``P = diag(exp(s))`` for preconditioned GD on least-squares tasks."""

    def __init__(
        self,
        source: Any,
        *,
        seed: int = 0,
        tasks_per_step: int | None = None,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        meta_lr: float | None = None,
        meta_optimizer: str | None = None,
    ) -> None:
        self.source = source
        self.seed = seed
        self.k = 4 if tasks_per_step is None else tasks_per_step
        self.T = 10 if inner_steps is None else inner_steps
        self.lr = 0.02 if inner_lr is None else inner_lr
        probe = self._draw(torch.Generator().manual_seed(seed))
        self.preconditioner = KroneckerPreconditioner.for_model(probe.make_model(0), "diag")
        self.preconditioner.double()
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "rmsprop": torch.optim.RMSprop}
        self.meta_opt = opt[meta_optimizer or "adam"](
            self.preconditioner.parameters(), lr=0.05 if meta_lr is None else meta_lr
        )
        self.meta_steps = 0
        self.history: list[MetaStep] = []

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.preconditioner.parameters())

    def learned_optimizer(self) -> LearnedOptimizer:
        return LearnedOptimizer(self.preconditioner, "sgd", {}, self.lr)

    def _draw(self, g: torch.Generator) -> Task:
        if isinstance(self.source, list):
            return self.source[int(torch.randint(len(self.source), (1,), generator=g))]
        return self.source.sample(g)

    def _task_seeds(self) -> list[tuple[Task, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.meta_steps)
        return [
            (self._draw(g), int(torch.randint(2**31 - 1, (1,), generator=g))) for _ in range(self.k)
        ]

    def _hypergrad(self, task: Task, init: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = task.make_model(init)
        forward = functional_forward(model)
        params = detached_params(model)
        batch = next(task.train_batches(init))
        for _ in range(self.T):
            _, grads = loss_and_grads(forward, task.loss, params, batch, create_graph=True)
            direction = self.preconditioner.apply(grads)
            params = {n: params[n] - self.lr * direction[n] for n in params}
        meta = task.loss(forward(params, batch[0]), batch[1])
        grads = torch.autograd.grad(meta, list(self.preconditioner.parameters()))
        return meta.detach(), list(grads)

    def meta_step(self, *, rank: int = 0, world_size: int = 1, all_reduce: Any = None) -> MetaStep:
        t0 = time.perf_counter()
        metas = self.meta_parameters()
        sums = [torch.zeros_like(p) for p in metas]
        totals = torch.zeros(3, dtype=torch.float64)  # kept, sum of objectives, skipped
        for task, init in self._task_seeds()[rank::world_size]:
            meta, grads = self._hypergrad(task, init)
            if not (torch.isfinite(meta) and all(torch.isfinite(g).all() for g in grads)):
                totals[2] += 1
                continue
            for s, g in zip(sums, grads, strict=True):
                s.add_(g)
            totals[0] += 1
            totals[1] += meta
        if all_reduce is not None:
            all_reduce([*sums, totals])
        kept = max(float(totals[0]), 1.0)
        self.meta_opt.zero_grad(set_to_none=True)
        for p, s in zip(metas, sums, strict=True):
            p.grad = s / kept
        norm = torch.sqrt(sum((p.grad**2).sum() for p in metas))
        if totals[0] > 0:
            self.meta_opt.step()
        self.meta_steps += 1
        record = MetaStep(
            step=self.meta_steps,
            meta_objective=float(totals[1]) / kept,
            hypergrad_norm=float(norm),
            seconds=time.perf_counter() - t0,
            skipped=int(totals[2]),
        )
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {
            "preconditioner": self.preconditioner.state_dict(),
            "meta_opt": self.meta_opt.state_dict(),
            "meta_steps": self.meta_steps,
            "history": [r.as_dict() for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lrs = [g["lr"] for g in self.meta_opt.param_groups]
        self.preconditioner.load_state_dict(state["preconditioner"])
        self.meta_opt.load_state_dict(state["meta_opt"])
        for group, lr in zip(self.meta_opt.param_groups, lrs, strict=True):
            group["lr"] = lr  # a resume may lower the meta learning rate; the new one wins
        self.meta_steps = int(state["meta_steps"])
        self.history = [MetaStep.from_dict(r) for r in state["history"]]


class Wrapped:
    """A MetaLearner that forwards everything to ``inner`` (tests subclass it to act
    around ``meta_step``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def meta_steps(self) -> int:
        return self.inner.meta_steps

    @property
    def history(self) -> list[MetaStep]:
        return self.inner.history

    def meta_step(self, **kw: Any) -> MetaStep:
        return self.inner.meta_step(**kw)

    def meta_parameters(self) -> list[nn.Parameter]:
        return self.inner.meta_parameters()

    def learned_optimizer(self) -> LearnedOptimizer:
        return self.inner.learned_optimizer()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def build(config: meta_train.TrainConfig, source: Any, device: str) -> DiagLSQ:
    return DiagLSQ(
        source,
        seed=config.seed,
        tasks_per_step=config.tasks_per_step,
        inner_steps=config.inner_steps,
        inner_lr=config.inner_lr,
        meta_lr=config.meta_lr,
        meta_optimizer=config.meta_optimizer,
        **config.options,
    )


if "lsq-test" not in tasks.available()["families"]:
    tasks.register_family("lsq-test")(LSQFamily)
meta_train.register_learner("lsq-diag", build, description="test learner (tests/meta_train_lsq)")

if __name__ == "__main__":
    import os

    from meta_train.cli import main

    pause = float(os.environ.get("META_TRAIN_LSQ_PAUSE_IN_CHECKPOINT_WRITE", "0"))
    if pause > 0:  # fault injection: a kill then lands while a checkpoint is being written
        import meta_train.checkpoint as checkpoint

        def slow_save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
            save_file(tensors, filename, metadata=metadata)
            time.sleep(pause)

        save_file = checkpoint.save_file
        checkpoint.save_file = slow_save_file

    sys.exit(main())
