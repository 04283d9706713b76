"""The preconditioned update: one place that composes a preconditioner block with a rule.

A learned optimizer is a preconditioner ``P`` (one family block per layer view), an update
rule (:mod:`metaopt.optim.rules`) and the rule's hyperparameters. ``compose`` says where
``P`` acts:

* ``"gradient"`` (default): the rule sees ``P g``. For SGD and SGD-momentum, which are
  linear in ``g``, this is the same as preconditioning the step; for Adam it is Adam on
  the preconditioned gradient, whose diagonal normalisation then acts on ``P g`` (so a
  scalar factor of ``P`` cancels and what is learned is the shape of ``P``);
* ``"direction"``: the rule's step ``d`` is preconditioned, ``theta -= lr P d`` (for Adam
  a learned scale of ``P`` is then a per-layer step size).

Weight decay is applied before ``P`` (L2 joins ``g``; AdamW's decoupled decay shrinks
``theta``). Without a preconditioner (or for parameters it skips) the update is exactly
the rule's, with ``torch.optim``'s own ops.

:func:`block_step` is the kernel; :func:`preconditioned_step` applies it functionally to
named tensors (meta-training, APO's lookahead) and :class:`~metaopt.optim.Preconditioned`
applies it in place (deployment).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from metaopt.kron.family_base import Family
from metaopt.kron.layers import LayerView
from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.optim.rules import Direction, Scalar, SGDRule, UpdateRule

__all__ = ["COMPOSE", "block_step", "preconditioned_step"]

COMPOSE = ("gradient", "direction")


def check_compose(compose: str) -> str:
    if compose not in COMPOSE:
        raise ValueError(f"compose={compose!r}: must be one of {list(COMPOSE)}")
    return compose


def block_step(
    family: Family | None,
    view: LayerView | None,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[Any],
    rule: UpdateRule,
    hp: Mapping[str, Any],
    lr: Scalar,
    *,
    compose: str = "gradient",
    inplace: bool,
    count: int | None = None,
    scratch: list[Tensor] | None = None,
) -> tuple[list[Tensor], list[Any]]:
    """One update of a block's parameters (``view.params`` order; any order when
    ``family`` is ``None``, i.e. ``P = I``). Returns ``(new params, new states)``; in place
    these are the given tensors, updated. ``scratch`` (in place, ``compose="gradient"``):
    tensors shaped like the parameters that receive ``P g``, reused from step to step
    (a fresh parameter-sized tensor each step costs page faults on CPU)."""
    decayed = [
        rule.decay(p, g, hp, lr, inplace=inplace) for p, g in zip(params, grads, strict=True)
    ]
    params = [p for p, _ in decayed]
    grads = [g for _, g in decayed]
    if family is not None and compose == "gradient":
        assert view is not None
        if inplace and _fused_sgd(rule, hp, lr):
            return _fused_sgd_gradient(family, view, params, grads, states, hp, lr)
        if inplace and scratch is not None:
            family.accumulate_(view.blocks_of(scratch), view.blocks_of(grads), 1.0, 0.0)
            grads = scratch
        else:
            pg = family.apply_blocks(view.blocks_of(grads), meta_constant=inplace)
            grads = _as_params(view, pg, grads)
    if family is None or compose == "gradient":
        new, new_states = [], []
        for p, g, s in zip(params, grads, states, strict=True):
            d, s = rule.direction(g, s, hp, lr, inplace=inplace, count=count)
            new.append(d.apply(p, inplace=inplace))
            new_states.append(s)
        return new, new_states
    assert view is not None
    steps, new_states = [], []
    for g, s in zip(grads, states, strict=True):
        d, s = rule.direction(g, s, hp, lr, inplace=inplace, count=count)
        steps.append(d)
        new_states.append(s)
    if count is None:  # in place, each parameter's step number comes from its own state
        _check_one_step_size(view, steps)
    step_size = steps[0].step_size
    directions = view.blocks_of([d.tensor(reuse_denom=inplace) for d in steps])
    if inplace and not isinstance(step_size, Tensor):
        family.accumulate_(view.blocks_of(params), directions, -step_size)
        return params, new_states
    pd = _as_params(view, family.apply_blocks(directions, meta_constant=inplace), params)
    new = []
    for p, d in zip(params, pd, strict=True):
        if isinstance(step_size, Tensor):
            new.append(p - step_size * d)
        else:
            new.append(p.add_(d, alpha=-step_size) if inplace else p.add(d, alpha=-step_size))
    return new, new_states


def _check_one_step_size(view: LayerView, steps: list[Direction]) -> None:
    """``ValueError`` naming each parameter's step size unless the block's parameters share
    one (``P`` mixes them, so they must be at the same step of the rule). A tensor step size
    is shared when it is the same tensor; a functional caller gives one ``count`` for the
    whole block, so its step sizes (new tensors per parameter for a tensor ``lr``) agree."""
    shared = {id(d.step_size) if isinstance(d.step_size, Tensor) else d.step_size for d in steps}
    if len(shared) == 1:
        return
    sizes = ", ".join(
        f"{n}: {float(d.step_size):.6g}" for n, d in zip(view.params, steps, strict=True)
    )
    raise ValueError(
        f"block {view.name!r}: its parameters are at different steps of the rule (step sizes "
        f"{sizes}); a layer's weight and bias step together"
    )


def _as_params(view: LayerView, blocks: list[Tensor], like: list[Tensor]) -> list[Tensor]:
    """A block's column blocks back as tensors shaped like ``like`` (``view.params``)."""
    out = view.from_column_blocks(blocks)
    return [out[n].reshape(t.shape) for n, t in zip(view.params, like, strict=True)]


def _fused_sgd(rule: UpdateRule, hp: Mapping[str, Any], lr: Scalar) -> bool:
    return (
        isinstance(rule, SGDRule)
        and not isinstance(lr, Tensor)
        and not isinstance(hp["momentum"], Tensor)
    )


def _fused_sgd_gradient(
    family: Family,
    view: LayerView,
    params: list[Tensor],
    grads: list[Tensor],
    states: list[Any],
    hp: Mapping[str, Any],
    lr: float,
) -> tuple[list[Tensor], list[Any]]:
    """SGD(-momentum) on ``P g`` in place without forming ``P g``: the momentum decay is
    folded into the family's own update (``buf = mu buf + P g`` in one pass)."""
    g_blocks = view.blocks_of(grads)
    mu = hp["momentum"]
    if states[0].momentum_buffer is None:  # p -= lr * P g
        family.accumulate_(view.blocks_of(params), g_blocks, -lr)
        return params, states
    bufs = [s.momentum_buffer for s in states]
    family.accumulate_(view.blocks_of(bufs), g_blocks, 1.0, mu)
    if hp["nesterov"]:  # p -= lr * (P g + mu * buf)
        family.accumulate_(view.blocks_of(params), g_blocks, -lr)
        for p, buf in zip(params, bufs, strict=True):
            p.add_(buf, alpha=-lr * mu)
    else:  # p -= lr * buf while the block's buffer is still in cache
        for p, buf in zip(params, bufs, strict=True):
            p.add_(buf, alpha=-lr)
    return params, states


def preconditioned_step(
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    states: Mapping[str, Any],
    preconditioner: KroneckerPreconditioner | None,
    rule: UpdateRule,
    hp: Mapping[str, Any],
    lr: Scalar,
    *,
    compose: str = "gradient",
    count: int,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One functional step of every tensor in ``grads``: ``(new params, new states)``.

    Differentiable in ``params``, ``grads``, the preconditioner's meta-parameters (call it
    through :func:`metaopt.func.functional_forward` to substitute them) and any tensor
    hyperparameter. ``states[name]`` is the rule's state (``rule.init``); ``count`` is this
    step's number (1, 2, ...). Parameters the preconditioner does not cover get the plain
    rule (``P = I``).
    """
    new_params: dict[str, Tensor] = {}
    new_states: dict[str, Any] = {}

    def run(family: Family | None, view: LayerView | None, names: list[str]) -> None:
        out, st = block_step(
            family,
            view,
            [params[n] for n in names],
            [grads[n] for n in names],
            [states[n] for n in names],
            rule,
            hp,
            lr,
            compose=compose,
            inplace=False,
            count=count,
        )
        new_params.update(zip(names, out, strict=True))
        new_states.update(zip(names, st, strict=True))

    covered: set[str] = set()
    if preconditioner is not None:
        for view in preconditioner.views:
            if view.weight not in grads:
                continue
            run(preconditioner.block(view), view, list(view.params))
            covered.update(view.params)
    rest = [n for n in grads if n not in covered]
    if rest:
        run(None, None, rest)
    return new_params, new_states
