"""Meta-objectives that measure what users measure: the whole training trajectory and
held-out data (the objectives of learned optimizers that beat hand-designed ones: Metz et
al. 2020, "Tasks, stability, architecture, and compute", section 4; Wichrowska et al. 2017).

* ``"mean-loss"``: the mean of ``L_t`` over the inner steps (MetaMD's learner fills
  ``ctx.train_loss_mean`` from the losses its steps computed anyway): the area under the
  training curve that the harness reports, so meta-training optimises what users measure.
  It is dominated by the early, large losses, i.e. by how fast training gets going.
* ``"mean-log-loss"``: the mean of ``log L_t``: each step's improvement counts by its
  ratio, so late, small losses weigh as much as early ones. Under truncated windows that
  weight on the late plateau pulls towards small steps (the short-horizon bias of Wu et
  al. 2018): on the teacher-regression family it learned per-layer scales ~20x below the
  trained lr and lost to tuned Adam, where ``"mean-loss"`` won.
* ``"val-loss"``: the loss at ``params_after`` on a batch of the task's validation split.
"""

from __future__ import annotations

from torch import Tensor

from metaopt.objectives.base import MetaContext, register_meta_objective

__all__ = ["mean_log_loss", "mean_loss", "val_loss"]


@register_meta_objective("mean-log-loss")
def mean_log_loss(ctx: MetaContext) -> Tensor:
    """Mean of ``log L_t`` over the window's inner steps."""
    ctx.require("train_log_loss_mean")
    assert ctx.train_log_loss_mean is not None
    return ctx.train_log_loss_mean


@register_meta_objective("mean-loss")
def mean_loss(ctx: MetaContext) -> Tensor:
    """Mean of ``L_t`` over the window's inner steps."""
    ctx.require("train_loss_mean")
    assert ctx.train_loss_mean is not None
    return ctx.train_loss_mean


@register_meta_objective("val-loss")
def val_loss(ctx: MetaContext) -> Tensor:
    """The task's loss at ``params_after`` on ``ctx.val_batch``."""
    ctx.require("forward", "loss", "val_batch")
    x, y = ctx.val_batch
    return ctx.loss(ctx.forward(ctx.params_after, x), y)
