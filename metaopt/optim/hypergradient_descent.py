"""Hypergradient descent (Baydin et al., 2018, "Online learning rate adaptation with
hypergradient descent"): SGD-HD, SGDN-HD and Adam-HD.

Each step first adapts the learning rate with the hypergradient of the loss with respect to
the previous step's learning rate, then takes the base step with the new rate:

.. code-block:: text

    g_t     = grad f(theta_{t-1})              (+ weight_decay * theta_{t-1})
    h_t     = g_t . u_{t-1}                    (u_0 = 0, so alpha_1 = alpha_0)
    alpha_t = alpha_{t-1} - beta * h_t         (beta = hypergrad_lr)
    u_t     = base update direction            (SGD: -g_t; SGDN: -g_t - mu v_t; Adam below)
    theta_t = theta_{t-1} + alpha_t u_t

The dot product runs over all parameters of a param group; each group adapts its own rate.
The adapted rate is ``group["lr"]``, a 0-dim tensor on the group's device (no host sync),
so it is saved by ``state_dict`` with the param groups; ``u_{t-1}`` is saved per parameter
as ``state["prev_update"]``. LR schedulers in chainable form (``ExponentialLR``,
``StepLR``, ...) multiply the adapted rate; closed-form ones (``LambdaLR``) overwrite it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["AdamHD", "SGDHD"]


def _check(name: str, value: float, lo: float, hi: float | None = None) -> None:
    ok = value >= lo and (hi is None or value < hi)
    if not ok:
        allowed = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={value!r}: must be {allowed}")


class _HypergradientBase(torch.optim.Optimizer):
    """Shared step: adapt ``group["lr"]`` by ``-hypergrad_lr * (g . u_prev)``, then apply ``u``.

    Subclasses define ``_direction(p, g, group) -> u`` (the base update direction ``u_t``,
    same shape as ``p``), updating their own per-parameter state.
    """

    @staticmethod
    def _lr_tensor(group: dict[str, Any], like: Tensor) -> Tensor:
        lr = group["lr"]
        dtype = torch.promote_types(like.dtype, torch.float32)
        if not isinstance(lr, Tensor):
            lr = torch.tensor(float(lr), dtype=dtype, device=like.device)
        return lr.to(device=like.device, dtype=dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One HD step. ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            wd = group["weight_decay"]
            grads = [p.grad.add(p, alpha=wd) if wd != 0 else p.grad for p in params]
            lr = self._lr_tensor(group, params[0])
            # Hypergradient h_t = g_t . u_{t-1} over the group (u_0 = 0: no change at t = 1).
            h = None
            for p, g in zip(params, grads, strict=True):
                prev = self.state[p].get("prev_update")
                if prev is not None:
                    term = torch.sum(g.to(lr.dtype) * prev.to(lr.dtype)).to(lr.device)
                    h = term if h is None else h + term
            if h is not None:
                lr = lr - group["hypergrad_lr"] * h
            group["lr"] = lr  # rebinding (not in place) keeps earlier state_dicts intact
            for p, g in zip(params, grads, strict=True):
                u = self._direction(p, g, group)
                self.state[p]["prev_update"] = u
                p.add_(u * lr.to(device=p.device, dtype=p.dtype))
        return loss


class SGDHD(_HypergradientBase):
    """SGD-HD, and SGDN-HD with ``momentum > 0, nesterov=True`` (the paper's Algorithm 2).

    Directions (``v`` is ``state["momentum_buffer"]``, ``v_t = mu v_{t-1} + g_t``, torch's
    convention with dampening 0): plain ``u_t = -g_t``; heavy-ball ``u_t = -v_t``;
    Nesterov ``u_t = -g_t - mu v_t``.

    Args:
        params: parameters or param-group dicts.
        lr: initial learning rate ``alpha_0`` (default 0.01); adapted every step.
        hypergrad_lr: hypergradient step ``beta`` (default 1e-3, the paper's value for
            SGD-HD and SGDN-HD).
        momentum: ``mu`` (default 0).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 coefficient added to the gradient (default 0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        hypergrad_lr: float = 1e-3,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        _check("lr", lr, 0.0)
        _check("hypergrad_lr", hypergrad_lr, 0.0)
        _check("momentum", momentum, 0.0, 1.0)
        _check("weight_decay", weight_decay, 0.0)
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}")
        defaults = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def _direction(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> Tensor:
        mu = group["momentum"]
        if mu == 0:
            return -g
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = g.detach().clone()
        else:
            buf.mul_(mu).add_(g)
        return -(g + mu * buf) if group["nesterov"] else -buf


class AdamHD(_HypergradientBase):
    """Adam-HD (the paper's Algorithm 3).

    ``m_t = b1 m + (1 - b1) g``, ``v_t = b2 v + (1 - b2) g^2``,
    ``u_t = -(m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)``.

    Args:
        params: parameters or param-group dicts.
        lr: initial learning rate ``alpha_0`` (default 1e-3); adapted every step.
        hypergrad_lr: hypergradient step ``beta`` (default 1e-7, the paper's Adam-HD value;
            ``g . u`` scales like ``|g|_1`` here instead of ``|g|^2``).
        betas: ``(b1, b2)`` (default ``(0.9, 0.999)``).
        eps: denominator term (default 1e-8).
        weight_decay: L2 coefficient added to the gradient (default 0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        hypergrad_lr: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        _check("lr", lr, 0.0)
        _check("hypergrad_lr", hypergrad_lr, 0.0)
        _check("betas[0]", betas[0], 0.0, 1.0)
        _check("betas[1]", betas[1], 0.0, 1.0)
        _check("eps", eps, 0.0)
        _check("weight_decay", weight_decay, 0.0)
        defaults = dict(
            lr=lr,
            hypergrad_lr=hypergrad_lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def _direction(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> Tensor:
        b1, b2 = group["betas"]
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return -m_hat / (v_hat.sqrt() + group["eps"])
