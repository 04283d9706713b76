"""Matrix-free solvers for ``H x = v`` over tuples of tensors (one entry per parameter).

``hvp(u) -> H u`` is any linear operator given as a callable on tuples; the solvers never
form ``H``. Modelled on TorchOpt's ``linalg/ns.py`` (Neumann) and ``linalg/cg.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["cg_solve", "neumann_solve", "tree_dot"]

Vec = tuple[Tensor, ...]
LinearOp = Callable[[Vec], Vec]


def tree_dot(a: Vec, b: Vec) -> Tensor:
    """``sum_i <a_i, b_i>`` as a 0-dim tensor (no host sync)."""
    return sum(
        (torch.sum(x * y) for x, y in zip(a, b, strict=True)),
        torch.zeros((), device=a[0].device, dtype=a[0].dtype),
    )


def neumann_solve(hvp: LinearOp, v: Vec, *, iterations: int = 20, alpha: float = 1.0) -> Vec:
    """Truncated Neumann series ``alpha * sum_{j<J} (I - alpha H)^j v`` with ``J = iterations``.

    Tends to ``H^{-1} v`` as ``J -> inf`` when the spectral radius of ``I - alpha H`` is
    below 1 (for SPD ``H``: ``0 < alpha < 2 / lambda_max(H)``). Costs ``J - 1`` HVPs.

    Scale convention: the result is multiplied by ``alpha``, so it approximates ``H^{-1} v``
    itself. Lorraine et al. (2020) and MetaMD's Algorithm 2 instead return the unscaled sum
    ``sum_{j<=J} (I - alpha H)^j v`` (``J + 1`` terms, which approximates ``H^{-1} v / alpha``)
    and fold the missing ``alpha`` into the meta learning rate.
    """
    if iterations < 1:
        raise ValueError(f"iterations={iterations!r}: must be a positive integer")
    term = tuple(x.clone() for x in v)
    total = tuple(x.clone() for x in v)
    for _ in range(iterations - 1):
        h_term = hvp(term)
        # term <- (I - alpha H) term ;  total <- total + term
        term = tuple(t - alpha * h for t, h in zip(term, h_term, strict=True))
        total = tuple(s + t for s, t in zip(total, term, strict=True))
    return tuple(alpha * s for s in total)


def cg_solve(hvp: LinearOp, v: Vec, *, iterations: int = 20, tol: float | None = 1e-10) -> Vec:
    """Conjugate gradients for ``H x = v`` from ``x0 = 0`` (``H`` symmetric positive definite).

    Runs at most ``iterations`` steps (one HVP each). With ``tol`` set, stops once
    ``||r|| <= tol * ||v||`` (one host sync per step for the test); ``tol=None`` runs all
    steps with no sync. On an indefinite ``H`` (a network away from a minimum) CG is not
    guaranteed to converge; prefer ``"neumann"`` with a small ``alpha`` there.
    """
    if iterations < 1:
        raise ValueError(f"iterations={iterations!r}: must be a positive integer")
    x = tuple(torch.zeros_like(t) for t in v)
    r = tuple(t.clone() for t in v)
    p = tuple(t.clone() for t in v)
    rs = tree_dot(r, r)
    stop = None if tol is None else (tol * tol) * rs
    for _ in range(iterations):
        if stop is not None and bool(rs <= stop):
            break
        hp = hvp(p)
        php = tree_dot(p, hp)
        # a zero curvature step means r = 0 already: take no step rather than 0 / 0
        step = torch.where(php != 0, rs / torch.where(php != 0, php, 1), 0)
        x = tuple(xi + step * pi for xi, pi in zip(x, p, strict=True))
        r = tuple(ri - step * hi for ri, hi in zip(r, hp, strict=True))
        rs_new = tree_dot(r, r)
        beta = torch.where(rs != 0, rs_new / torch.where(rs != 0, rs, 1), 0)
        p = tuple(ri + beta * pi for ri, pi in zip(r, p, strict=True))
        rs = rs_new
    return x
