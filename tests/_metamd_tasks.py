"""Small real Task objects for the MetaMD tests (linear regression, 2-D quadratics) and
one task's window hypergradient through the learner's own pieces."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from metaopt.hypergrad import EngineResult, get_engine, run_window
from metaopt.kron import KroneckerPreconditioner
from metaopt.learners import MetaMDConfig
from metaopt.learners.metamd.window import InnerRun
from metaopt.optim.rules import get_rule
from tasks.base import Task


def regression_task(
    seed: int, n: int = 32, d: int = 4, out: int = 2, batch_size: int | None = None
) -> Task:
    """Least squares ``Y = X W + noise`` with a fixed ill-conditioned input scale."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -1, d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    w = torch.randn(d, out, generator=g, dtype=torch.float64)
    y = x @ w + 0.01 * torch.randn(n, out, generator=g, dtype=torch.float64)
    data = TensorDataset(x, y)
    return Task(
        name=f"regression/{seed}",
        model_fn=lambda: nn.Linear(d, out).double(),
        loss_fn=nn.functional.mse_loss,
        metric="mse",
        train=data,
        val=data,
        test=data,
        batch_size=batch_size or n,
    )


class RegressionFamily:
    """Duck-typed task family: ``sample(generator) -> Task``."""

    name = "regression-family"

    def __init__(self, **options):
        self.options = options

    def sample(self, generator: torch.Generator) -> Task:
        return regression_task(
            int(torch.randint(0, 10_000, (1,), generator=generator)), **self.options
        )


def window_hypergradient(
    task: Task,
    pre: KroneckerPreconditioner,
    config: MetaMDConfig,
    *,
    init_seed: int,
    data_seed: int,
    skip: int = 0,
) -> EngineResult:
    """The configured engine on the window of ``task``'s inner run from
    ``task.make_model(init_seed)`` with batches ``task.train_batches(data_seed)``
    (:meth:`InnerRun.window`, as :class:`~metaopt.MetaMD` builds it); the first ``skip``
    inner steps run without a graph first (the run's earlier windows). The window is
    ``config.window`` steps (``None``: the whole run)."""
    rule = get_rule(config.rule)
    hp = rule.hparams(config.rule_options)
    run = InnerRun.start(task, init_seed, data_seed, 0, rule, hp, config.batch_size)
    options = {
        "lr": config.lr,
        "compose": config.compose,
        "meta_objective": config.meta_objective,
        "objective_options": config.objective_options,
        "meta_step": 0,
    }
    if skip:
        before = run.window(skip, pre, rule, hp, **options)
        with torch.no_grad():
            run.state, _ = run_window(before, before.state, before.hparams)
        run.t += skip
    problem = run.window(config.steps_per_window, pre, rule, hp, **options)
    entry = get_engine(config.engine)
    return entry.obj(problem, None, **{**entry.options, **config.engine_options})
