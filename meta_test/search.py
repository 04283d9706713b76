"""Hyperparameter search over a :class:`~meta_test.space.SearchSpace`.

Methods (``hpo``):

- ``"none"``: no trial; the space's default point (optimizer defaults).
- ``"grid"``: every point of the space's grid (MetaMD appendix A.7 grids by default).
- ``"botorch"``: Bayesian optimisation (MetaMD appendix A.7): a BoTorch ``SingleTaskGP``
  with a ``ScaleKernel(RBFKernel)`` (one lengthscale per dim) over the space mapped to the
  unit cube (log10 scale for log dims), standardised outcomes, ``UpperConfidenceBound``
  acquisition maximised with ``optimize_acqf``; ``iterations`` evaluations in all
  (default 25), the first ``2 d + 1`` of them a scrambled Sobol design.
- ``"random"``: ``iterations`` uniform draws in the same unit cube (a baseline for tests).

A trial whose objective is not finite (a diverged run) scores as the worst value: it is
never selected over a finite one, and the GP sees it as the worst finite value observed so
far.

Ties: the objective may return a :class:`Score` with a ``tiebreak`` (lower is better) that
orders trials of equal value (and trials that are all non-finite, e.g. configurations
that never reach a target); trials still tied go to the first in evaluation order (the
grid's order for ``"grid"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from meta_test.space import SearchSpace

__all__ = ["HPO_METHODS", "Score", "SearchResult", "Trial", "run_search"]

HPO_METHODS = ("none", "grid", "botorch", "random")


@dataclass(frozen=True)
class Score:
    """What an objective may return instead of a float.

    Attributes:
        value: the quantity the search minimises (or maximises).
        tiebreak: orders trials of equal ``value``, lower is better (``None``: no tie-break).
        detail: recorded with the trial (e.g. the per-seed values behind an aggregate).
    """

    value: float
    tiebreak: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trial:
    config: dict[str, Any]
    value: float
    tiebreak: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchResult:
    """The selected configuration and every trial, in evaluation order."""

    method: str
    best: dict[str, Any]
    best_value: float | None
    trials: list[Trial] = field(default_factory=list)


def _rank(trial: Trial, maximize: bool) -> tuple[float, float]:
    """The sort key of a trial (lower is better): its value (negated when maximising;
    non-finite: worst), then its tie-break (absent or non-finite: worst)."""
    v, tb = trial.value, trial.tiebreak
    primary = (-v if maximize else v) if math.isfinite(v) else math.inf
    return primary, tb if tb is not None and math.isfinite(tb) else math.inf


def _finish(method: str, space: SearchSpace, trials: list[Trial], maximize: bool) -> SearchResult:
    if not trials:
        return SearchResult(method, space.default_point(), None, trials)
    best = min(trials, key=lambda t: _rank(t, maximize))  # min keeps the first of equals
    value = best.value if math.isfinite(best.value) else None
    return SearchResult(method, dict(best.config), value, trials)


def run_search(
    space: SearchSpace,
    objective: Callable[[dict[str, Any]], float | Score],
    *,
    method: str,
    iterations: int = 25,
    maximize: bool = False,
    seed: int = 0,
    beta: float = 2.0,
) -> SearchResult:
    """Search ``space`` for the configuration that minimises (or maximises) ``objective``.

    Args:
        space: what to tune.
        objective: ``config -> float`` (e.g. the validation metric after training) or
            ``config -> Score`` (a value with a tie-break).
        method: one of ``HPO_METHODS``.
        iterations: evaluations for ``"botorch"`` and ``"random"`` (default 25).
        maximize: maximise instead of minimise (accuracy).
        seed: seed of the Sobol design / random draws.
        beta: UCB exploration weight (``mean + sqrt(beta) * std``).
    """
    if method not in HPO_METHODS:
        raise ValueError(f"hpo={method!r}: must be one of {list(HPO_METHODS)}")
    if iterations < 1:
        raise ValueError(f"iterations={iterations!r}: must be a positive integer")
    trials: list[Trial] = []

    def evaluate(config: dict[str, Any]) -> float:
        score = objective(config)
        if not isinstance(score, Score):
            score = Score(float(score))
        tb = None if score.tiebreak is None else float(score.tiebreak)
        trials.append(Trial(dict(config), float(score.value), tb, dict(score.detail)))
        return float(score.value)

    if method == "none":
        pass
    elif not space.dims:
        evaluate(space.default_point())
    elif method == "grid":
        for config in space.grid_points():
            evaluate(config)
    elif method == "random":
        for d in space.dims:
            d.check_box()
        gen = torch.Generator().manual_seed(int(seed))
        for _ in range(iterations):
            u = torch.rand(len(space.dims), generator=gen, dtype=torch.float64)
            evaluate(space.from_unit(u.tolist()))
    else:
        _botorch(space, evaluate, iterations, maximize, seed, beta)
    return _finish(method, space, trials, maximize)


def _botorch(
    space: SearchSpace,
    evaluate: Callable[[dict[str, Any]], float],
    iterations: int,
    maximize: bool,
    seed: int,
    beta: float,
) -> None:
    try:  # an optional dependency: the "bayesopt" extra
        from botorch.acquisition import UpperConfidenceBound
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms import Standardize
        from botorch.optim import optimize_acqf
        from gpytorch.kernels import RBFKernel, ScaleKernel
        from gpytorch.mlls import ExactMarginalLogLikelihood
    except ImportError as err:
        raise ValueError(
            f"hpo='botorch' needs BoTorch ({err}); install it with pip install 'metaopt[bayesopt]'"
        ) from None

    for d in space.dims:
        d.check_box()
    dim = len(space.dims)
    dtype = torch.float64
    sign = 1.0 if maximize else -1.0
    n_init = min(iterations, 2 * dim + 1)
    sobol = torch.quasirandom.SobolEngine(dim, scramble=True, seed=int(seed))
    xs: list[list[float]] = []
    ys: list[float] = []

    def observe(u: list[float]) -> None:
        xs.append(u)
        ys.append(sign * evaluate(space.from_unit(u)))

    for u in sobol.draw(n_init, dtype=dtype).tolist():
        observe(u)
    bounds = torch.stack([torch.zeros(dim, dtype=dtype), torch.ones(dim, dtype=dtype)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for _ in range(iterations - n_init):
            finite = [y for y in ys if math.isfinite(y)]
            worst = min(finite) if finite else 0.0
            train_y = torch.tensor([y if math.isfinite(y) else worst for y in ys], dtype=dtype)
            train_x = torch.tensor(xs, dtype=dtype)
            kernel = ScaleKernel(RBFKernel(ard_num_dims=dim))
            gp = SingleTaskGP(
                train_x,
                train_y.unsqueeze(-1),
                covar_module=kernel,
                outcome_transform=Standardize(m=1),
            )
            fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
            acq = UpperConfidenceBound(gp, beta=beta)
            cand, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=8, raw_samples=128)
            observe(cand.squeeze(0).clamp(0, 1).tolist())
