"""Differentiable functional base steps: ``(params, grads, state, hparams) -> (params, state)``.

These are the update rules the meta-learners differentiate through (APO's one-step
lookahead, MetaMD's unrolled engine). Every function is pure: it returns new dicts and
never mutates its inputs, and any hyperparameter may be a tensor that requires grad.
``params``, ``grads`` and ``state`` entries are keyed by parameter name.

Conventions match ``torch.optim`` (SGD: dampening 0, weight decay added to the gradient;
RMSprop: ``alpha`` is the decay ``rho``; Adam: bias-corrected) so that with float
hyperparameters each step equals one step of the corresponding ``torch.optim`` optimizer.
Adaptive steps put an ``eps_root`` inside the square root (optax's lesson): with
``eps_root > 0`` the derivative stays finite when a second moment is zero.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metaopt.kron.preconditioner import KroneckerPreconditioner

__all__ = ["adam_step", "preconditioned_step", "rmsprop_step", "scaled_sub", "sgd_step"]

Params = Mapping[str, Tensor]
Scalar = float | Tensor


def _decayed(grads: Params, params: Params, weight_decay: Scalar) -> dict[str, Tensor]:
    if isinstance(weight_decay, float | int) and weight_decay == 0:
        return dict(grads)
    return {n: g + weight_decay * params[n] for n, g in grads.items()}


def scaled_sub(param: Tensor, step: Tensor, lr: Scalar) -> Tensor:
    """``param - lr * step`` as one fused op (``torch.optim.SGD``'s ``add(alpha=-lr)`` for
    a float ``lr``, ``addcmul`` for a tensor one). The in-place steps use the same op in
    place, so both compute the same bits."""
    if isinstance(lr, Tensor):
        return torch.addcmul(param, step, lr, value=-1)
    return torch.add(param, step, alpha=-lr)


def _momentum(
    direction: Mapping[str, Tensor], state: Params, momentum: Scalar, nesterov: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """torch.optim.SGD momentum (dampening 0): ``buf = mu buf + d``; step ``buf`` or Nesterov."""
    if isinstance(momentum, float | int) and momentum == 0:
        return dict(direction), {}
    new_state, step = {}, {}
    for n, d in direction.items():
        key = f"{n}:momentum"
        buf = d if key not in state else momentum * state[key] + d
        new_state[key] = buf
        step[n] = d + momentum * buf if nesterov else buf
    return step, new_state


def sgd_step(
    params: Params,
    grads: Params,
    state: Params | None = None,
    *,
    lr: Scalar,
    momentum: Scalar = 0.0,
    nesterov: bool = False,
    weight_decay: Scalar = 0.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """SGD with optional heavy-ball / Nesterov momentum (``torch.optim.SGD`` semantics)."""
    g = _decayed(grads, params, weight_decay)
    step, new_state = _momentum(g, state or {}, momentum, nesterov)
    return {n: scaled_sub(params[n], step[n], lr) for n in step}, new_state


def preconditioned_step(
    params: Params,
    grads: Params,
    preconditioner: KroneckerPreconditioner,
    state: Params | None = None,
    *,
    lr: Scalar,
    momentum: Scalar = 0.0,
    nesterov: bool = False,
    weight_decay: Scalar = 0.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``theta - lr * momentum(P (g + wd theta))``: the differentiable twin of
    :class:`metaopt.optim.Preconditioned` (differentiable in the preconditioner's
    meta-parameters, the hyperparameters, ``params`` and ``grads``)."""
    direction = preconditioner.apply(_decayed(grads, params, weight_decay))
    direction = {n: direction[n] for n in grads}
    step, new_state = _momentum(direction, state or {}, momentum, nesterov)
    return {n: scaled_sub(params[n], step[n], lr) for n in step}, new_state


def rmsprop_step(
    params: Params,
    grads: Params,
    state: Params | None = None,
    *,
    lr: Scalar,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    eps_root: Scalar = 0.0,
    momentum: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    power: Scalar = 0.5,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """RMSprop: ``v = alpha v + (1 - alpha) g^2``; ``theta -= lr g / ((v + eps_root)^power + eps)``.

    ``alpha`` is the decay (gamma of APO's earlier version, ``001_`` Eq. 20); ``power`` is
    the exponent rho of its Eq. 21 (default 1/2, computed as ``sqrt``, as in
    ``torch.optim.RMSprop``). A tensor ``power`` needs ``eps_root > 0`` for a finite
    derivative where ``v = 0``. ``v`` starts at 0 as in ``torch.optim.RMSprop``.
    """
    state = state or {}
    g = _decayed(grads, params, weight_decay)
    new_state: dict[str, Tensor] = {}
    direction = {}
    for n, gn in g.items():
        key = f"{n}:square_avg"
        prev = state[key] if key in state else torch.zeros_like(gn)
        v = alpha * prev + (1 - alpha) * gn * gn
        new_state[key] = v
        if isinstance(power, float | int) and power == 0.5:
            denom = torch.sqrt(v + eps_root)
        else:
            denom = (v + eps_root) ** power
        direction[n] = gn / (denom + eps)
    step, mom_state = _momentum(direction, state, momentum, False)
    new_state.update(mom_state)
    return {n: params[n] - lr * step[n] for n in step}, new_state


def adam_step(
    params: Params,
    grads: Params,
    state: Params | None = None,
    *,
    lr: Scalar,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    eps_root: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Adam (``torch.optim.Adam`` semantics, L2 weight decay) with ``eps_root``.

    ``state`` carries ``"<name>:exp_avg"``, ``"<name>:exp_avg_sq"`` and a shared ``"step"``.
    """
    state = state or {}
    b1, b2 = betas
    g = _decayed(grads, params, weight_decay)
    ref = next(iter(g.values()))
    count_dtype = torch.promote_types(ref.dtype, torch.float32)
    zero = torch.zeros((), device=ref.device, dtype=count_dtype)
    t = (state["step"] if "step" in state else zero) + 1
    new_state: dict[str, Tensor] = {"step": t}
    out = {}
    for n, gn in g.items():
        m_prev = state.get(f"{n}:exp_avg", torch.zeros_like(gn))
        v_prev = state.get(f"{n}:exp_avg_sq", torch.zeros_like(gn))
        m = b1 * m_prev + (1 - b1) * gn
        v = b2 * v_prev + (1 - b2) * gn * gn
        new_state[f"{n}:exp_avg"], new_state[f"{n}:exp_avg_sq"] = m, v
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        out[n] = params[n] - lr * m_hat / (torch.sqrt(v_hat + eps_root) + eps)
    return out, new_state
