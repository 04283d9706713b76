"""PowerSign and AddSign (Bello et al., 2017, "Neural Optimizer Search with Reinforcement
Learning").

Both scale the gradient up where its sign agrees with the sign of its running average
``m`` and down where it disagrees:

.. code-block:: text

    m_t       = beta * m_{t-1} + (1 - beta) * g_t          (m_0 = 0)
    s_t       = sign(g_t) * sign(m_t)                       (+1 agree, -1 disagree, 0)
    PowerSign:  theta <- theta - lr * base ** (f(t) * s_t) * g_t     (base = e)
    AddSign:    theta <- theta - lr * (alpha + f(t) * s_t) * g_t     (alpha = 1)

``f(t)`` is the internal decay of the sign term, with ``t`` the number of steps taken
before this one (``f(0) = 1``) clipped to ``[0, decay_steps]``, and ``n = decay_periods``:

- ``"constant"``: ``f = 1``;
- ``"linear"``: ``f = 1 - t / T``;
- ``"cyclic"``: ``f = 0.5 * (1 + cos(2 pi n t / T))``;
- ``"restart"``: ``f = 0.5 * (1 + cos(pi * ((n t) mod T) / T))`` (SGDR-style restarts).

``T = decay_steps`` is the length of training and is required for every non-constant
schedule. The step counter is ``state["step"]`` (an int) per parameter and the average is
``state["exp_avg"]``, so ``state_dict`` resumes the schedule exactly. ``lr`` is an ordinary
float in the param groups, so LR schedulers work as with ``torch.optim.SGD``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["AddSign", "PowerSign", "sign_decay"]

_DECAYS = ("constant", "linear", "cyclic", "restart")


def sign_decay(kind: str, t: int, decay_steps: int | None = None, periods: float = 1.0) -> float:
    """The internal decay ``f(t)`` of Bello et al. (see the module docstring); ``t >= 0``."""
    if kind == "constant":
        return 1.0
    if decay_steps is None:
        raise ValueError(f"decay_steps=None: decay={kind!r} needs the training length")
    T = decay_steps
    t = min(max(t, 0), T)
    if kind == "linear":
        return 1.0 - t / T
    if kind == "cyclic":
        return 0.5 * (1.0 + math.cos(2.0 * math.pi * periods * t / T))
    if kind == "restart":
        return 0.5 * (1.0 + math.cos(math.pi * ((periods * t) % T) / T))
    raise ValueError(f"decay={kind!r}: must be one of {_DECAYS}")


class _SignOptimizer(torch.optim.Optimizer):
    """Shared state handling; subclasses define ``_scale(s, f, group) -> factor`` for
    ``theta <- theta - lr * factor * g`` with ``s = sign(g) sign(m)`` and ``f = f(t)``."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
    ) -> None:
        lr, beta = defaults["lr"], defaults["beta"]
        if not lr >= 0:
            raise ValueError(f"lr={lr!r}: must be >= 0")
        if not 0 <= beta < 1:
            raise ValueError(f"beta={beta!r}: must be in [0, 1)")
        if not defaults["weight_decay"] >= 0:
            raise ValueError(f"weight_decay={defaults['weight_decay']!r}: must be >= 0")
        decay, steps = defaults["decay"], defaults["decay_steps"]
        if decay not in _DECAYS:
            raise ValueError(f"decay={decay!r}: must be one of {_DECAYS}")
        if decay != "constant" and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"decay_steps={steps!r}: decay={decay!r} needs an int >= 1")
        if not defaults["decay_periods"] > 0:
            raise ValueError(f"decay_periods={defaults['decay_periods']!r}: must be > 0")
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step. ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta, wd = group["beta"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=wd) if wd != 0 else p.grad
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                f = sign_decay(
                    group["decay"], state["step"], group["decay_steps"], group["decay_periods"]
                )
                m = state["exp_avg"].mul_(beta).add_(g, alpha=1 - beta)
                s = torch.sign(g) * torch.sign(m)
                p.sub_(self._scale(s, f, group) * g, alpha=group["lr"])
                state["step"] += 1
        return loss


class PowerSign(_SignOptimizer):
    """``theta <- theta - lr * base ** (f(t) sign(g) sign(m)) * g``.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default 0.01).
        base: ``alpha`` of the paper (default ``e``; ``> 0``).
        beta: decay of the running average ``m`` (default 0.9).
        decay: ``"constant"`` (default), ``"linear"``, ``"cyclic"`` or ``"restart"``.
        decay_steps: ``T`` for the non-constant decays (default None).
        decay_periods: ``n`` for ``"cyclic"``/``"restart"`` (default 1).
        weight_decay: L2 coefficient added to the gradient (default 0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        base: float = math.e,
        beta: float = 0.9,
        decay: str = "constant",
        decay_steps: int | None = None,
        decay_periods: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        if not base > 0:
            raise ValueError(f"base={base!r}: must be > 0")
        defaults = dict(
            lr=lr,
            base=base,
            beta=beta,
            decay=decay,
            decay_steps=decay_steps,
            decay_periods=decay_periods,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def _scale(self, s: Tensor, f: float, group: dict[str, Any]) -> Tensor:
        return torch.exp(s * (math.log(group["base"]) * f))


class AddSign(_SignOptimizer):
    """``theta <- theta - lr * (alpha + f(t) sign(g) sign(m)) * g``.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default 0.01).
        alpha: constant term (default 1; the paper's AddSign uses 1).
        beta: decay of the running average ``m`` (default 0.9).
        decay: ``"constant"`` (default), ``"linear"``, ``"cyclic"`` or ``"restart"``.
        decay_steps: ``T`` for the non-constant decays (default None).
        decay_periods: ``n`` for ``"cyclic"``/``"restart"`` (default 1).
        weight_decay: L2 coefficient added to the gradient (default 0).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        alpha: float = 1.0,
        beta: float = 0.9,
        decay: str = "constant",
        decay_steps: int | None = None,
        decay_periods: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        if not alpha >= 0:
            raise ValueError(f"alpha={alpha!r}: must be >= 0")
        defaults = dict(
            lr=lr,
            alpha=alpha,
            beta=beta,
            decay=decay,
            decay_steps=decay_steps,
            decay_periods=decay_periods,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def _scale(self, s: Tensor, f: float, group: dict[str, Any]) -> Tensor:
        return group["alpha"] + f * s
