"""Diagnostics of APO's short-horizon bias: the one-step-optimal learning rate.

APO adapts hyperparameters by descending a one-step lookahead objective, the loss on the
batch ``B`` after one update (Bae, Vicol, HaoChen & Grosse 2022, Eq. 2; at ``lambda = 0``
no proximity term). :func:`greedy_lr` computes what that objective prefers for the
learning rate: the ``lr`` of a grid minimising ``J_B(theta - lr d)``, with ``d`` the step
the base rule would take on ``B`` from its current state. Probed along a training
trajectory and set beside the lr in use, it shows whether the greedy optimum is smaller
than the lr that trains best over a long horizon -- the short-horizon bias of Wu, Ren,
Liao & Grosse 2018 ("Understanding Short-Horizon Bias in Stochastic Meta-Optimization").

The step is the rule's own kernel (:func:`metaopt.optim.update.preconditioned_step`, P = I),
so the probe evaluates exactly the update that training runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from metaopt.func import detached_params, functional_forward, loss_and_grads
from metaopt.optim.rules import UpdateRule, get_rule
from metaopt.optim.update import preconditioned_step

__all__ = ["GREEDY_LRS", "GreedyStep", "greedy_lr"]

#: the default candidate learning rates: 1e-6 .. 1, four per decade
GREEDY_LRS = tuple(10 ** (e / 4) for e in range(-24, 1))


class GreedyStep(NamedTuple):
    """The one-step-optimal learning rate of a grid and the batch loss it reaches."""

    lr: float
    loss: float


def greedy_lr(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch: tuple[Tensor, Tensor],
    rule: str | UpdateRule = "rmsprop",
    *,
    states: Mapping[str, Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
    lrs: Sequence[float] = GREEDY_LRS,
) -> GreedyStep:
    """The ``lr`` in ``lrs`` minimising the loss on ``batch`` after one ``rule`` step on it.

    Args:
        model: the model at the current parameters ``theta`` (its parameters are left
            unchanged).
        loss_fn: ``loss_fn(model(x), y) -> 0-dim tensor``.
        batch: ``(x, y)``, both the batch of the gradient and the batch evaluated after
            the step (APO's ``B``).
        rule: the base update rule (default ``"rmsprop"``).
        states: the rule's state per parameter name (e.g. ``APO.state``, or the typed
            state of a ``torch.optim`` optimizer's entries); a missing name starts from
            ``rule.init`` (zeros). The states are read, not advanced.
        hparams: the rule's hyperparameters (default: its defaults).
        lrs: the candidate learning rates (default :data:`GREEDY_LRS`); the first of
            equal losses wins.

    Returns:
        ``GreedyStep(lr, loss)``: the best candidate and ``J_B`` after its step.
    """
    if not lrs:
        raise ValueError("lrs: give at least one candidate learning rate")
    rule = get_rule(rule)
    hp = rule.hparams(hparams)
    params = detached_params(model, requires_grad=True)
    forward = functional_forward(model)
    _, grads = loss_and_grads(forward, loss_fn, params, batch)
    given = dict(states or {})
    with torch.no_grad():
        params = {n: p.detach() for n, p in params.items()}
        state = {
            n: given[n] if given.get(n) is not None else rule.init(p, hp) for n, p in params.items()
        }
        count = 1 + max((int(getattr(s, "step", 0)) for s in state.values()), default=0)
        losses = []
        for lr in lrs:
            new, _ = preconditioned_step(params, grads, state, None, rule, hp, lr, count=count)
            losses.append(float(loss_fn(forward(new, batch[0]), batch[1])))
    best = min(range(len(lrs)), key=losses.__getitem__)
    return GreedyStep(float(lrs[best]), losses[best])
