"""MetaMD's meta-objective ``"bregman-rate"`` (MetaMD Eq. 8) and the plain ``"final-loss"``.

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
"""

from __future__ import annotations

from torch import Tensor

from metaopt.objectives.base import MetaContext, register_meta_objective

__all__ = ["bregman_rate", "final_loss"]


@register_meta_objective("bregman-rate")
def bregman_rate(ctx: MetaContext, k_lambda: float = 0.0, gamma: float = 0.0) -> Tensor:
    """Eq. 8 for one task: needs ``ctx.preconditioner`` (a family with a forward matrix).

    Args:
        ctx: ``params_before`` = theta_1, ``params_after`` = theta_T.
        k_lambda: weight ``k`` of ``1 / lambda`` (default 0).
        gamma: weight of ``||M - I||_F`` (default 0).
    """
    ctx.require("preconditioner")
    if k_lambda < 0 or gamma < 0:
        raise ValueError(f"k_lambda={k_lambda!r}, gamma={gamma!r}: must be non-negative")
    pre = ctx.preconditioner
    value = pre.bregman(ctx.params_after, ctx.params_before)
    if k_lambda:
        value = value + k_lambda / pre.min_eigenvalue()
    if gamma:
        value = value + gamma * pre.frobenius_distance_to_identity()
    return value


@register_meta_objective("final-loss")
def final_loss(ctx: MetaContext) -> Tensor:
    """Training loss of ``ctx.params_after`` on ``ctx.batch``."""
    ctx.require("forward", "loss", "batch")
    x, y = ctx.batch
    return ctx.loss(ctx.forward(ctx.params_after, x), y)
