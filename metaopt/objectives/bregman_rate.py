"""MetaMD's meta-objective ``"bregman-rate"`` (Eq. 8), the plain ``"final-loss"`` and its log.

For one task with initialisation ``theta_1`` and weights ``theta_T`` after ``T`` inner steps::

    E = B_M(theta_T || theta_1) + k_lambda / lambda + gamma * ||M - I||_F

with ``B_M(a || b) = 1/2 (a - b)^T M (a - b)``, ``lambda = min_blocks lambda_min(M_block)``
(appendix A.5) and ``||M - I||_F`` from trace identities (appendix A.4), all computed by the
preconditioner's family without forming ``M``. Averaged over the ``n`` tasks of an outer
step this is exactly Eq. 8, ``(1/n) sum_i B_M(theta_T^i || theta_1^i) + k/lambda + g(M)``.

For the plain rank-r family ``lambda_min(I + U U^T) = 1`` whenever ``r`` is below the layer's
dimensions, so ``lambda = 1`` and the ``k_lambda`` term is a constant: it only acts with
``learn_scale=True`` (``lambda = c``) or the diag family.

``"final-loss"`` is the task's training loss at ``theta_T`` on ``ctx.batch``: the
meta-objective of the unrolled competitors (MetaSGD, Meta-Curvature).

``"log-final-loss"`` is ``log(max(L(theta_T) - floor, 0) + eps)``: the same signal on a log
scale. Once inner runs converge, ``L(theta_T) - floor`` shrinks geometrically with ``T`` and so
does the gradient of ``"final-loss"``; Adam's second-moment estimate still remembers the early,
large gradients, so the meta-parameters stall (on meta-quadratics the flat direction's
``M`` stops at ``~5x`` its Newton value). The log rescales the gradient by ``1 / gap``, so it
measures the per-step *rate* of the inner run and keeps its size as the runs converge.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metaopt.objectives.base import MetaContext, register_meta_objective

__all__ = ["bregman_rate", "final_loss", "log_final_loss"]


@register_meta_objective("bregman-rate")
def bregman_rate(ctx: MetaContext, k_lambda: float = 0.0, gamma: float = 0.0) -> Tensor:
    """Eq. 8 for one task: needs ``ctx.preconditioner`` (a family with a metric ``M = P^{-1}``).

    Args:
        ctx: ``params_before`` = theta_1, ``params_after`` = theta_T.
        k_lambda: weight ``k`` of ``1 / lambda`` (default 0).
        gamma: weight of ``||M - I||_F`` (default 0).
    """
    ctx.require("preconditioner")
    _check_weights(k_lambda, gamma)
    pre = ctx.preconditioner
    value = pre.bregman(ctx.params_after, ctx.params_before)
    if k_lambda:
        value = value + k_lambda / pre.min_eigenvalue()
    if gamma:
        value = value + gamma * pre.frobenius_distance_to_identity()
    return value


def _check_weights(k_lambda: float = 0.0, gamma: float = 0.0) -> None:
    if k_lambda < 0 or gamma < 0:
        raise ValueError(f"k_lambda={k_lambda!r}, gamma={gamma!r}: must be non-negative")


# learners check the options when they are configured, before any run
bregman_rate.validate = _check_weights  # type: ignore[attr-defined]


@register_meta_objective("final-loss")
def final_loss(ctx: MetaContext) -> Tensor:
    """Training loss of ``ctx.params_after`` on ``ctx.batch``."""
    ctx.require("forward", "loss", "batch")
    x, y = ctx.batch
    return ctx.loss(ctx.forward(ctx.params_after, x), y)


@register_meta_objective("log-final-loss")
def log_final_loss(ctx: MetaContext, floor: float | None = None, eps: float = 1e-12) -> Tensor:
    """``log(max(L(theta_T) - floor, 0) + eps)`` on ``ctx.batch``.

    Args:
        ctx: ``params_after`` = theta_T; ``forward``, ``loss`` and ``batch`` are required.
        floor: a lower bound of the loss (``f*``). ``None``: ``task.info["minimum"]`` of the
            task in ``ctx.extras["task"]`` (MetaMD fills it) when the task records one, else 0.
        eps: added to the gap; keep it above the rounding error of ``L - floor`` (float64:
            ``~1e-16 |floor|``), below which there is nothing left to learn.
    """
    ctx.require("forward", "loss", "batch")
    if not eps > 0:
        raise ValueError(f"eps={eps!r}: must be positive")
    if floor is None:
        task = ctx.extras.get("task")
        info = getattr(task, "info", None) or {}
        floor = float(info.get("minimum", 0.0))
    gap = final_loss(ctx) - floor
    return torch.log(gap.clamp_min(0.0) + eps)
