"""APO's proximal meta-objective (Bae et al. 2022, Eq. 8 and Algorithm 1) and its output
divergences.

``Q(phi) = J_B(theta') + lambda_fsd * mean_{x in B'} D_F(theta', theta, x)
+ lambda_wsd / 2 * ||theta' - theta||^2`` with ``theta' = ctx.params_after`` (the one-step
lookahead) and ``theta = ctx.params_before``. The output-space (function-space, FSD)
divergence ``D_F(theta', theta, x) = rho(f(x, theta'), f(x, theta))`` is one of
:data:`FSD_DIVERGENCES`; outputs at ``theta`` are treated as constants.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from metaopt.objectives.base import MetaContext, register_meta_objective
from metaopt.registry import Registry

__all__ = ["FSD_DIVERGENCES", "fsd_divergence", "proximal"]

Loss = Callable[[Tensor, Tensor], Tensor]


def _kl(new: Tensor, old: Tensor, target: Tensor | None, loss: Loss | None) -> Tensor:
    """``mean_i KL(softmax(old_i) || softmax(new_i))`` over the last dim (classification)."""
    log_p_new = F.log_softmax(new, dim=-1)
    log_p_old = F.log_softmax(old, dim=-1)
    kl = (log_p_old.exp() * (log_p_old - log_p_new)).sum(-1)
    return kl.mean()


def _mse(new: Tensor, old: Tensor, target: Tensor | None, loss: Loss | None) -> Tensor:
    """``mean_i 1/2 ||new_i - old_i||^2`` (rows are examples; regression)."""
    diff = (new - old).reshape(new.shape[0], -1) if new.dim() > 0 else (new - old).reshape(1, 1)
    return 0.5 * diff.pow(2).sum(-1).mean()


def _bregman(new: Tensor, old: Tensor, target: Tensor | None, loss: Loss | None) -> Tensor:
    """Bregman divergence of the loss in output space (the Gauss-Newton case).

    ``L(new, t) - L(old, t) - <dL/dz(old, t), new - old>``: with a mean-reduced loss this is
    the mean over examples of the per-example divergence. It is ``KL`` for softmax
    cross-entropy and ``mean (new - old)^2`` for ``F.mse_loss``; its Hessian at ``old`` is
    the loss Hessian in output space, so the FSD's Hessian in weights is the GGN.
    """
    if loss is None or target is None:
        raise ValueError("fsd='bregman' needs ctx.loss and the targets of ctx.fsd_batch")
    old_leaf = old.detach().requires_grad_(True)
    with torch.enable_grad():
        old_loss = loss(old_leaf, target)
        (slope,) = torch.autograd.grad(old_loss, [old_leaf])
    return (
        loss(new, target) - old_loss.detach() - (slope.detach() * (new - old_leaf.detach())).sum()
    )


#: ``name -> fn(new_outputs, old_outputs, targets, loss) -> scalar``; add your own with
#: ``FSD_DIVERGENCES.register("name", fn)``
FSD_DIVERGENCES: Registry[Callable[..., Tensor]] = Registry("fsd")
FSD_DIVERGENCES.register("kl", _kl)
FSD_DIVERGENCES.register("mse", _mse)
FSD_DIVERGENCES.register("bregman", _bregman)


def fsd_divergence(
    name: str, new: Tensor, old: Tensor, target: Tensor | None = None, loss: Loss | None = None
) -> Tensor:
    """Output divergence ``name`` between ``new`` (N x ...) and constant ``old`` outputs."""
    return FSD_DIVERGENCES[name](new, old.detach(), target, loss)


@register_meta_objective("proximal")
def proximal(
    ctx: MetaContext,
    lambda_fsd: float = 0.0,
    lambda_wsd: float = 0.0,
    fsd: str = "kl",
) -> Tensor:
    """APO's proximal objective on ``ctx`` (see the module docstring).

    The loss term uses ``ctx.extras["loss_batch"]`` when present (APO's fresh-batch
    ablation, Bae et al. 2022, appendix E, Eq. 14), else ``ctx.batch`` (the gradient batch B).
    The FSD term needs ``ctx.fsd_batch`` when ``lambda_fsd != 0``.
    """
    ctx.require("forward", "loss", "batch")
    FSD_DIVERGENCES.get(fsd)  # an unknown name fails before any forward pass
    x, y = ctx.extras.get("loss_batch") or ctx.batch
    if lambda_fsd:
        ctx.require("fsd_batch")
        xf, yf = ctx.fsd_batch
        with torch.no_grad():
            old = ctx.forward(ctx.params_before, xf)
        # both terms at theta': one forward of [x; x'] when the model allows it
        out, new = ctx.forward_rows(ctx.params_after, [x, xf])
        value = ctx.loss(out, y) + lambda_fsd * fsd_divergence(fsd, new, old, yf, ctx.loss)
    else:
        value = ctx.loss(ctx.forward(ctx.params_after, x), y)
    if lambda_wsd:
        value = value + 0.5 * lambda_wsd * ctx.squared_distance()
    return value
