"""In-place twins of :mod:`metaopt.optim.functional`'s base steps, for real (not
differentiated) updates: ``step_(params, grads, state, ...) -> None`` writes the new
parameters into ``params`` and the new statistics into ``state`` (adding missing keys),
as ``torch.optim`` does, without building new parameter dicts.

Each performs exactly the floating-point operations of its functional twin, in the same
order (so a run is bit-for-bit the same whichever is used; the tests check this), and
``hparams`` may be Python numbers or 0-dim tensors (never synced to the host). ``grads``
entries may be reused as momentum buffers: pass gradients that are not used afterwards.

SGD's ``theta - lr * step`` is one fused pass (:func:`~metaopt.optim.functional.scaled_sub`
in place: ``add_(alpha=-lr)`` as ``torch.optim.SGD`` for a float ``lr``, ``addcmul_`` for a
tensor one), so an SGDm step makes the passes over memory ``torch.optim.SGD``'s does and
allocates nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch
from torch import Tensor

__all__ = ["adam_step_", "rmsprop_step_", "scaled_sub_", "sgd_step_"]

Params = Mapping[str, Tensor]
State = MutableMapping[str, Tensor]
Scalar = float | Tensor


def _is_zero(value: Scalar) -> bool:
    return isinstance(value, float | int) and value == 0


def _decayed(g: Tensor, p: Tensor, weight_decay: Scalar) -> Tensor:
    return g if _is_zero(weight_decay) else g + weight_decay * p


def scaled_sub_(param: Tensor, step: Tensor, lr: Scalar) -> None:
    """In place ``param -= lr * step``: :func:`~metaopt.optim.functional.scaled_sub`'s op."""
    if isinstance(lr, Tensor):
        param.addcmul_(step, lr, value=-1)
    else:
        param.add_(step, alpha=-lr)


def _momentum_(d: Tensor, state: State, key: str, momentum: Scalar, nesterov: bool) -> Tensor:
    """``buf = mu buf + d`` in place (``buf = d`` at first); returns the step direction."""
    if _is_zero(momentum):
        return d
    if key in state:
        buf = state[key].mul_(momentum).add_(d)
    else:
        buf = state[key] = d
    return d + momentum * buf if nesterov else buf


@torch.no_grad()
def sgd_step_(
    params: Params,
    grads: Params,
    state: State,
    *,
    lr: Scalar,
    momentum: Scalar = 0.0,
    nesterov: bool = False,
    weight_decay: Scalar = 0.0,
) -> None:
    """In-place :func:`metaopt.optim.functional.sgd_step` (state keys ``"<name>:momentum"``)."""
    for n, g in grads.items():
        p = params[n]
        step = _momentum_(_decayed(g, p, weight_decay), state, f"{n}:momentum", momentum, nesterov)
        scaled_sub_(p, step, lr)


@torch.no_grad()
def rmsprop_step_(
    params: Params,
    grads: Params,
    state: State,
    *,
    lr: Scalar,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    eps_root: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    power: Scalar = 0.5,
) -> None:
    """In-place :func:`metaopt.optim.functional.rmsprop_step` without momentum
    (state keys ``"<name>:square_avg"``)."""
    for n, g in grads.items():
        p = params[n]
        gn = _decayed(g, p, weight_decay)
        key = f"{n}:square_avg"
        if key not in state:
            state[key] = torch.zeros_like(gn)
        v = state[key].mul_(alpha).add_((1 - alpha) * gn * gn)
        if isinstance(power, float | int) and power == 0.5:
            denom = torch.sqrt(v + eps_root)
        else:
            denom = (v + eps_root) ** power
        p.sub_(lr * (gn / (denom + eps)))


@torch.no_grad()
def adam_step_(
    params: Params,
    grads: Params,
    state: State,
    *,
    lr: Scalar,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    eps_root: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
) -> None:
    """In-place :func:`metaopt.optim.functional.adam_step` (keys ``"<name>:exp_avg"``,
    ``"<name>:exp_avg_sq"`` and a shared 0-dim ``"step"`` count)."""
    b1, b2 = betas
    ref = next(iter(grads.values()))
    count_dtype = torch.promote_types(ref.dtype, torch.float32)
    if "step" in state:
        state["step"] = state["step"] + 1
    else:
        state["step"] = torch.zeros((), device=ref.device, dtype=count_dtype) + 1
    t = state["step"]
    for n, g in grads.items():
        p = params[n]
        gn = _decayed(g, p, weight_decay)
        for key in (f"{n}:exp_avg", f"{n}:exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(gn)
        m = state[f"{n}:exp_avg"].mul_(b1).add_((1 - b1) * gn)
        v = state[f"{n}:exp_avg_sq"].mul_(b2).add_((1 - b2) * gn * gn)
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p.sub_(lr * m_hat / (torch.sqrt(v_hat + eps_root) + eps))
