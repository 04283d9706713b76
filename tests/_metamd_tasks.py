"""Small real Task objects for the MetaMD tests (linear regression, 2-D quadratics)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

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
