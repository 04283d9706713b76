"""Implicit hypergradients at a stationary point of an inner objective (IFT).

Convention (MetaMD Eq. 13 / appendix A.12, Lorraine et al. 2020). With ``theta*`` a
stationary point of ``inner(theta, lambda)`` and ``H = d^2 inner / d theta d theta``::

    d outer / d lambda = d_lambda outer  -  (d^2 inner / d lambda d theta)^T  H^{-1}  d_theta outer
                         (``"direct"``)      (``"mixed"``)                   (``"inverse_hvp"``)

evaluated at ``(theta*, lambda)``. The minus sign comes from ``d theta*/d lambda =
-H^{-1} d^2 inner/(d theta d lambda)``. Hessian-vector products go through ``torch.func``
(``vjp`` of ``grad``: the gradient graph is built once and reused for every product); no
dense Hessian is formed except by ``method="exact"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, hessian, vjp

from metaopt.hypergrad._common import Vec, as_leaves, positive_int, take_options
from metaopt.hypergrad.errors import check_finite
from metaopt.hypergrad.linalg import cg_solve, neumann_solve

__all__ = ["IMPLICIT_METHODS", "implicit_grad"]

Objective = Callable[[Vec, Vec], Tensor]
IMPLICIT_METHODS = ("exact", "neumann", "cg", "closed_form")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "exact": {},
    "neumann": {"iterations": 20, "alpha": 1.0},
    "cg": {"iterations": 20, "tol": 1e-10},
    "closed_form": {"inverse_hvp": None},
}


def implicit_grad(
    inner_objective: Objective,
    outer_objective: Objective,
    params: Sequence[Tensor],
    hparams: Sequence[Tensor],
    *,
    method: str,
    **options: Any,
) -> tuple[Tensor, ...]:
    """``d outer(theta*(lambda), lambda) / d lambda`` by the implicit function theorem.

    Args:
        inner_objective: ``inner(params, hparams) -> 0-dim tensor``; ``params`` must be
            (approximately) a stationary point of it. A pure function of the tuples it is
            given (``torch.func`` transforms it): evaluate models at ``params`` through
            ``metaopt.func`` and use the ``hparams`` tensors passed in, not captured ones.
        outer_objective: ``outer(params, hparams) -> 0-dim tensor`` (validation loss,
            meta-objective); may ignore ``hparams`` (then the direct term is zero).
        params: tensors ``theta*`` (any shapes).
        hparams: tensors ``lambda`` (any shapes, floating point).
        method: ``"exact"`` (dense Hessian + ``torch.linalg.solve``; small problems and
            tests only), ``"neumann"`` (``iterations=20``, ``alpha=1.0``: ``H^{-1} v ~
            alpha sum_{j<J} (I - alpha H)^j v``, needs ``0 < alpha < 2/lambda_max(H)``),
            ``"cg"`` (``iterations=20``, ``tol=1e-10`` relative residual, ``None`` for no
            early stop; ``H`` must be SPD), ``"closed_form"`` (``inverse_hvp=callable``
            mapping a tuple shaped like ``params`` to ``H^{-1}`` of it, e.g. MetaMD's
            ``M^{-1} v`` through the lowrank family's ``apply``).

    Returns:
        one tensor per hparam, same shape/dtype/device, detached (no graph is kept).

    Raises:
        NonFiniteHypergradient: with ``.term`` one of ``"outer_grad"`` (``d_theta outer``),
            ``"direct"``, ``"inverse_hvp"``, ``"mixed"``.
        ValueError: unknown method or option, bad option value.
    """
    if method not in _DEFAULTS:
        raise ValueError(f"method={method!r}: allowed {list(IMPLICIT_METHODS)}")
    opts = take_options(method, options, _DEFAULTS[method])
    theta = as_leaves(params, "params")
    lam = as_leaves(hparams, "hparams")
    if method in ("neumann", "cg"):
        positive_int("iterations", opts["iterations"])
    if method == "closed_form" and not callable(opts["inverse_hvp"]):
        raise ValueError(
            f"inverse_hvp={opts['inverse_hvp']!r}: method='closed_form' needs a callable "
            "mapping a tuple shaped like params to H^{-1} applied to it"
        )

    with torch.no_grad():  # torch.func transforms still differentiate; nothing else records
        v, direct = grad(outer_objective, argnums=(0, 1))(theta, lam)
        check_finite(v, "outer_grad")
        check_finite(direct, "direct")

        grad_inner = grad(inner_objective, argnums=0)
        # one linearisation of theta -> d_theta inner, reused for every H u ...
        _, vjp_theta = vjp(lambda p: grad_inner(p, lam), theta)

        def hvp(u: Vec) -> Vec:
            return vjp_theta(tuple(u))[0]  # H symmetric: u^T H = (H u)^T

        if method == "exact":
            u = _dense_solve(inner_objective, theta, lam, v)
        elif method == "neumann":
            u = neumann_solve(hvp, v, iterations=opts["iterations"], alpha=opts["alpha"])
        elif method == "cg":
            u = cg_solve(hvp, v, iterations=opts["iterations"], tol=opts["tol"])
        else:
            u = tuple(opts["inverse_hvp"](tuple(v)))
            if len(u) != len(theta):
                raise ValueError(f"inverse_hvp returned {len(u)} tensors for {len(theta)} params")
        check_finite(u, "inverse_hvp")

        # ... and one of lambda -> d_theta inner for the mixed term (d^2 inner/dl dt)^T u
        _, vjp_lam = vjp(lambda h: grad_inner(theta, h), lam)
        mixed = vjp_lam(tuple(u))[0]
        check_finite(mixed, "mixed")
        return tuple(d - m for d, m in zip(direct, mixed, strict=True))


def _dense_solve(inner_objective: Objective, theta: Vec, lam: Vec, v: Vec) -> Vec:
    """``H^{-1} v`` with the dense Hessian over the flattened params (oracle only)."""
    sizes = [t.numel() for t in theta]
    shapes = [t.shape for t in theta]

    def unflat(flat: Tensor) -> Vec:
        return tuple(c.reshape(s) for c, s in zip(flat.split(sizes), shapes, strict=True))

    flat = torch.cat([t.reshape(-1) for t in theta])
    H = hessian(lambda f: inner_objective(unflat(f), lam))(flat)
    rhs = torch.cat([t.reshape(-1) for t in v])
    return unflat(torch.linalg.solve(H, rhs))
