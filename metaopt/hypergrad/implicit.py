"""Implicit hypergradients at a stationary point of an inner objective (IFT).

Convention (MetaMD Eq. 13 / appendix A.12, Lorraine et al. 2020). With ``theta*`` a
stationary point of ``inner(theta, lambda)`` and ``H = d^2 inner / d theta d theta``::

    d outer / d lambda = d_lambda outer  -  (d^2 inner / d lambda d theta)^T  H^{-1}  d_theta outer
                         (``"direct"``)      (``"mixed"``)                   (``"inverse_hvp"``)

evaluated at ``(theta*, lambda)``. The minus sign comes from ``d theta*/d lambda =
-H^{-1} d^2 inner/(d theta d lambda)``.

Hessian-vector products are matrix-free: the graph of ``g = d_theta inner`` is built once
(``create_graph``) and every product ``H u`` is one vector-Jacobian product through it
(``u^T H = (H u)^T``, ``H`` symmetric); the mixed term is one more, into ``lambda``. No
dense Hessian is formed except by ``method="exact"`` (``n`` products for ``n`` parameter
scalars). These products use ``torch.autograd`` rather than ``torch.func.vjp``: on the
benchmark MLP (``bench/hypergrad_cost.py``) the same mixed product took 12 ms with
autograd and 18 ms through ``torch.func`` (transform overhead per op), and autograd also
accepts closures that capture the hyperparameter tensors instead of using the arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from metaopt.hypergrad._common import (
    Vec,
    as_leaves,
    hparam_inputs,
    positive_int,
    take_options,
    zeros_for_none,
)
from metaopt.hypergrad.errors import FiniteGuard
from metaopt.hypergrad.linalg import cg_solve, neumann_solve

__all__ = ["IMPLICIT_METHODS", "implicit_grad"]

Objective = Callable[[Vec, Vec], Tensor]
IMPLICIT_METHODS = ("exact", "neumann", "cg", "closed_form")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "exact": {"inner_grad": None},
    "neumann": {"iterations": 20, "alpha": 1.0, "inner_grad": None},
    "cg": {"iterations": 20, "tol": 1e-10, "inner_grad": None},
    "closed_form": {
        "inverse_hvp": None,
        "inner_grad": None,
        "mixed_product": None,
        "inverse_mixed": None,
    },
}


def implicit_grad(
    inner_objective: Objective | None,
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
            (approximately) a stationary point of it. It must compute with the ``params``
            tensors it is given (evaluate models through ``metaopt.func``); for
            ``hparams`` it may use the tensors given or, when the hparams passed to
            ``implicit_grad`` require grad, those same tensors captured (e.g. a
            preconditioner's own ``nn.Parameter`` meta-parameters).
        outer_objective: ``outer(params, hparams) -> 0-dim tensor`` (validation loss,
            meta-objective); may ignore ``hparams`` (then the direct term is zero).
        params: tensors ``theta*`` (any shapes).
        hparams: tensors ``lambda`` (any shapes, floating point).
        method: ``"exact"`` (dense Hessian + ``torch.linalg.solve``; small problems and
            tests only), ``"neumann"`` (``iterations=20``, ``alpha=1.0``: ``H^{-1} v ~
            alpha sum_{j<J} (I - alpha H)^j v``, ``J - 1`` products, needs ``0 < alpha <
            2/lambda_max(H)``), ``"cg"`` (``iterations=20`` products, ``tol=1e-10``
            relative residual or ``None`` for no early stop and no host sync; ``H`` must be
            SPD), ``"closed_form"`` (``inverse_hvp=callable`` mapping a tuple shaped like
            ``params`` to ``H^{-1}`` of it, e.g. MetaMD's ``M^{-1} v`` through the lowrank
            family's ``apply``: no Hessian product at all; called under ``no_grad``;
            optionally ``mixed_product=callable(u, params, hparams) -> tuple`` shaped like
            ``hparams`` giving ``(d^2 inner / d lambda d theta)^T u`` in closed form, e.g.
            ``KroneckerPreconditioner.bregman_mixed(u, theta, theta_1)`` for MetaMD's
            Bregman potential: then no graph of ``d_theta inner`` is built at all and
            ``inner_objective`` may be ``None``; or, instead of both,
            ``inverse_mixed=callable(v, params, hparams) -> tuple`` shaped like ``hparams``
            giving ``(d^2 inner / d lambda d theta)^T H^{-1} v`` in one call, e.g.
            ``KroneckerPreconditioner.bregman_inverse_mixed(v, theta, theta_1)``, which for
            the lowrank family never forms ``H^{-1} v``).
        **options: also, for every method, ``inner_grad=callable(params, hparams) ->
            tuple`` giving ``d_theta inner`` in closed form (differentiable in ``params``
            and ``hparams``); products then backpropagate through it once instead of
            through the gradient graph of ``inner`` (double backward), and
            ``inner_objective`` may be ``None``. E.g. for MetaMD's ``<g, theta> +
            B_M(theta, theta_1)`` it is ``g + M (theta - theta_1)``.

    Returns:
        one tensor per hparam, same shape/dtype/device, detached (no graph is kept).

    Raises:
        NonFiniteHypergradient: when the result is not finite, with ``.term`` the first
            term that is not: ``"outer_grad"`` (``d_theta outer``), ``"direct"``,
            ``"inverse_hvp"``, ``"mixed"`` (or ``"hypergradient"``: only the difference
            overflowed).
        ValueError: unknown method or option, bad option value.
    """
    if method not in _DEFAULTS:
        raise ValueError(f"method={method!r}: allowed {list(IMPLICIT_METHODS)}")
    opts = take_options(method, options, _DEFAULTS[method])
    if method in ("neumann", "cg"):
        positive_int("iterations", opts["iterations"])
    mixed_product, inverse_mixed = opts.get("mixed_product"), opts.get("inverse_mixed")
    for name, fn in (("mixed_product", mixed_product), ("inverse_mixed", inverse_mixed)):
        if fn is not None and not callable(fn):
            raise ValueError(f"{name}={fn!r}: must be a callable or None")
    given_too = opts.get("inverse_hvp") is not None or mixed_product is not None
    if inverse_mixed is not None and given_too:
        raise ValueError("inverse_mixed= replaces inverse_hvp= and mixed_product=: give one")
    closed = mixed_product is not None or inverse_mixed is not None
    if inner_objective is None and opts["inner_grad"] is None and not closed:
        raise ValueError(
            "inner_objective=None: give inner_grad= (or mixed_product= / inverse_mixed=) then"
        )
    if method == "closed_form" and inverse_mixed is None and not callable(opts["inverse_hvp"]):
        raise ValueError(
            f"inverse_hvp={opts['inverse_hvp']!r}: method='closed_form' needs a callable "
            "mapping a tuple shaped like params to H^{-1} applied to it (or inverse_mixed=)"
        )
    theta = tuple(t.requires_grad_(True) for t in as_leaves(params, "params"))
    lam = hparam_inputs(hparams)
    n_theta = len(theta)

    with torch.enable_grad():
        value = outer_objective(theta, lam)
        both = torch.autograd.grad(value, theta + lam, allow_unused=True)
        both = zeros_for_none(both, theta + lam)
        v, direct = both[:n_theta], both[n_theta:]
        del value, both
        guard = FiniteGuard()  # one host sync on the result; names the first bad term
        guard.add(v, "outer_grad")
        guard.add(direct, "direct")

        if inverse_mixed is not None:  # the whole implicit term in one call
            mixed = _closed_mixed("inverse_mixed", inverse_mixed, v, theta, lam)
            return _finish(direct, mixed, guard)
        if mixed_product is not None:  # closed_form with both terms given: no graph of g
            u = _inverse_hvp(opts["inverse_hvp"], v, theta)
            guard.add(u, "inverse_hvp")
            mixed = _closed_mixed("mixed_product", mixed_product, u, theta, lam)
            return _finish(direct, mixed, guard)
        # the graph of g = d_theta inner, built once and reused by every product
        if opts["inner_grad"] is not None:
            g = tuple(opts["inner_grad"](theta, lam))
            if len(g) != n_theta or any(a.shape != b.shape for a, b in zip(g, theta, strict=False)):
                raise ValueError(
                    f"inner_grad returned shapes {[tuple(a.shape) for a in g]}, "
                    f"expected those of params {[tuple(b.shape) for b in theta]}"
                )
        else:
            g = torch.autograd.grad(inner_objective(theta, lam), theta, create_graph=True)
        # (an inner linear in theta has a constant g: tie it to theta so products are 0)
        g = tuple(gi if gi.requires_grad else gi + 0 * ti for gi, ti in zip(g, theta, strict=True))

        def hvp(u: Vec) -> Vec:
            hu = torch.autograd.grad(g, theta, tuple(u), retain_graph=True, allow_unused=True)
            return zeros_for_none(hu, theta)

        if method == "exact":
            u = _dense_solve(hvp, theta, v)
        elif method == "neumann":
            u = neumann_solve(hvp, v, iterations=opts["iterations"], alpha=opts["alpha"])
        elif method == "cg":
            u = cg_solve(hvp, v, iterations=opts["iterations"], tol=opts["tol"])
        else:
            u = _inverse_hvp(opts["inverse_hvp"], v, theta)
        guard.add(u, "inverse_hvp")

        # mixed term (d^2 inner / d lambda d theta)^T u: one more product, into lambda
        mixed = torch.autograd.grad(g, lam, u, allow_unused=True)
        return _finish(direct, zeros_for_none(mixed, lam), guard)


def _closed_mixed(
    what: str, fn: Callable[..., Sequence[Tensor]], x: Vec, theta: Vec, lam: Vec
) -> Vec:
    """A user's closed-form mixed term ``fn(x, theta, lambda)``, under ``no_grad``."""
    with torch.no_grad():
        mixed = tuple(fn(x, theta, lam))
    _check_shapes(what, mixed, lam, "hparams")
    return mixed


def _finish(direct: Vec, mixed: Vec, guard: FiniteGuard) -> Vec:
    """``direct - mixed``, detached; the guard checks it (naming the first bad term)."""
    guard.add(mixed, "mixed")
    out = tuple((d - m).detach() for d, m in zip(direct, mixed, strict=True))
    guard.check(out)
    return out


def _check_shapes(what: str, got: Vec, like: Vec, name: str) -> None:
    if len(got) != len(like) or any(a.shape != b.shape for a, b in zip(got, like, strict=False)):
        raise ValueError(
            f"{what} returned shapes {[tuple(a.shape) for a in got]}, "
            f"expected those of {name} {[tuple(b.shape) for b in like]}"
        )


def _inverse_hvp(fn: Callable[[Vec], Vec], v: Vec, theta: Vec) -> Vec:
    """``closed_form``'s ``H^{-1} v`` from the user's callable, under ``no_grad``."""
    with torch.no_grad():
        u = tuple(fn(tuple(v)))
    _check_shapes("inverse_hvp", u, theta, "params")
    return u


def _dense_solve(hvp: Callable[[Vec], Vec], theta: Vec, v: Vec) -> Vec:
    """``H^{-1} v`` with the dense Hessian (one product per parameter scalar; oracle only)."""
    sizes = [t.numel() for t in theta]
    n = sum(sizes)
    ref = theta[0]
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
    rows = []
    for i in range(n):
        e = tuple(c.reshape(t.shape) for c, t in zip(eye[i].split(sizes), theta, strict=True))
        rows.append(torch.cat([h.reshape(-1) for h in hvp(e)]))
    H = torch.stack(rows)  # symmetric: row i is (H e_i)^T
    rhs = torch.cat([t.reshape(-1) for t in v])
    flat = torch.linalg.solve(H, rhs)
    return tuple(c.reshape(t.shape) for c, t in zip(flat.split(sizes), theta, strict=True))
