"""Evolution-strategies estimates of ``d E / d lambda`` for one window of an inner run.

Both estimate the gradient of the Gaussian-smoothed objective
``E_sigma(lambda) = E_{eps ~ N(0, sigma^2 I)} E(lambda + eps)`` from objective values
alone (no backpropagation through the inner steps, so they cost ``2 * pairs`` forward runs
of the window and stay usable where the unrolled computation is too long or chaotic to
differentiate; Metz et al. 2019, "Understanding and correcting pathologies in the training
of learned optimizers"):

* :func:`es_grad` (engine ``"es"``): antithetic ES (Salimans et al. 2017),
  ``g = sum_i (E(lambda + eps_i) - E(lambda - eps_i)) eps_i / (2 N sigma^2)``; the inner
  run continues from the unperturbed run's end. Across the windows of one inner run it is
  biased (each window ignores how ``lambda`` shaped the state it starts from).
* ``es_grad(..., persistent=True)`` (engine ``"pes"``, :func:`pes_grad`): Persistent ES
  (Vicol, Metz & Sohl-Dickstein 2021, Algorithm 2; the
  model is learned_optimization's ``truncated_pes.py``): each antithetic pair keeps its
  own perturbed inner state across windows and the sum of its perturbations ``xi_i``, and
  ``g = sum_i (E(+) - E(-)) xi_i / (2 N sigma^2)``, which is unbiased for the smoothed
  sum of the windows' objectives.

Perturbations are drawn on the CPU from a generator seeded by ``seed`` and moved to the
meta-parameters' device, so a run is reproducible on any device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from metaopt.hypergrad._common import positive_int
from metaopt.hypergrad.errors import check_finite
from metaopt.hypergrad.problem import EngineResult, Problem, detached, run_window

__all__ = ["check_es_options", "es_grad", "pes_grad"]


def check_es_options(pairs: int, sigma: float) -> None:
    """``ValueError`` unless ``pairs`` is a positive integer and ``sigma`` a positive number."""
    positive_int("pairs", pairs)
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma > 0:
        raise ValueError(f"sigma={sigma!r}: must be a positive number")
    if not math.isfinite(sigma):
        raise ValueError(f"sigma={sigma!r}: must be finite")


def _perturbations(
    hparams: tuple[Tensor, ...], pairs: int, sigma: float, seed: int | None
) -> list[tuple[Tensor, ...]]:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return [
        tuple(
            (sigma * torch.randn(h.shape, generator=gen, dtype=torch.float64)).to(h)
            for h in hparams
        )
        for _ in range(pairs)
    ]


def _shift(hparams: tuple[Tensor, ...], eps: tuple[Tensor, ...], sign: float) -> tuple[Tensor, ...]:
    return tuple(h + sign * e for h, e in zip(hparams, eps, strict=True))


def _combine(
    deltas: list[Tensor], directions: list[tuple[Tensor, ...]], sigma: float
) -> tuple[Tensor, ...]:
    """``sum_i delta_i * dir_i / (2 N sigma^2)`` per hparam."""
    scale = 1.0 / (2 * len(deltas) * sigma * sigma)
    out = []
    for k in range(len(directions[0])):
        acc = torch.zeros_like(directions[0][k])
        for d, dirs in zip(deltas, directions, strict=True):
            acc = acc + d.to(acc.dtype) * dirs[k]
        out.append(acc * scale)
    return tuple(out)


@torch.no_grad()
def es_grad(
    problem: Problem,
    carry: Any = None,
    *,
    pairs: int = 4,
    sigma: float = 0.01,
    seed: int | None = None,
    persistent: bool = False,
) -> EngineResult:
    """Antithetic ES for the window (``persistent=False``) or Persistent ES (``True``).

    Antithetic ES estimates each window on its own (``carry`` unused); ``value`` and
    ``state`` come from an unperturbed run of the window. Persistent ES keeps, per pair,
    its own perturbed inner states and the sum of its perturbations across the windows of
    one inner run in ``carry`` (``None`` at the start of a run: every pair starts from
    ``problem.state``); ``value`` is the mean of the pairs' objectives and ``state`` the
    first positive particle's (for bookkeeping: the pairs carry their own).

    Args:
        pairs: antithetic pairs ``N`` (``2N`` runs of the window, plus one for plain ES).
        sigma: perturbation scale (in the meta-parameters' own units).
        seed: seed of the perturbations (``None``: fresh randomness).
    """
    check_es_options(pairs, sigma)
    hparams = tuple(h.detach() for h in problem.hparams)
    if not persistent or carry is None:
        start = detached(problem.state)
        zeros = tuple(torch.zeros_like(h) for h in hparams)
        carry = {"plus": [start] * pairs, "minus": [start] * pairs, "xi": [zeros] * pairs}
    if len(carry["xi"]) != pairs:
        raise ValueError(f"pairs={pairs}: the carried state has {len(carry['xi'])} pairs")
    eps = _perturbations(hparams, pairs, sigma, seed)
    plus_states, minus_states, xis, deltas, values = [], [], [], [], []
    for i, e in enumerate(eps):
        xi = tuple(a + b for a, b in zip(carry["xi"][i], e, strict=True))
        p_end, p_val = run_window(problem, carry["plus"][i], _shift(hparams, e, 1.0))
        m_end, m_val = run_window(problem, carry["minus"][i], _shift(hparams, e, -1.0))
        plus_states.append(detached(p_end))
        minus_states.append(detached(m_end))
        xis.append(xi)
        deltas.append(p_val - m_val)
        values.append((p_val + m_val) / 2)
    grads = _combine(deltas, xis, sigma)
    check_finite(grads, "hypergradient")
    if not persistent:
        end, value = run_window(problem, detached(problem.state), hparams)
        return EngineResult(grads, value.detach(), detached(end))
    value = torch.stack([v.reshape(()) for v in values]).mean()
    new_carry = {"plus": plus_states, "minus": minus_states, "xi": xis}
    return EngineResult(grads, value, plus_states[0], new_carry)


def pes_grad(problem: Problem, carry: Any = None, **options: Any) -> EngineResult:
    """Persistent ES: :func:`es_grad` with ``persistent=True``."""
    return es_grad(problem, carry, persistent=True, **options)


def _validate(
    *, pairs: int = 4, sigma: float = 0.01, seed: int | None = None, persistent: bool = False
) -> None:
    check_es_options(pairs, sigma)


es_grad.validate = _validate  # type: ignore[attr-defined]
