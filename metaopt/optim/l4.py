"""L4 step-size adaptation (Rolinek & Martius, 2018, "L4: Practical loss-based stepsize
adaptation for deep learning") on top of momentum SGD (``L4Mom``) or Adam (``L4Adam``).

Each step linearises the loss along the base optimizer's direction ``v`` and picks the
step that would bring it down a fraction ``alpha`` of the way to an estimate of the
attainable minimum:

.. code-block:: text

    L_min   = gamma0 * L_0 at the first step, else min(L_min, L_t)
    eta_t   = alpha * (L_t - gamma * L_min) / (g_hat . v_t + epsilon)
    theta  <- theta - eta_t * v_t
    L_min  <- (1 + 1 / tau) * L_min          (slowly forget the minimum seen)

``g_hat`` is the bias-corrected moving average of the gradient with decay ``betas[0]``
(the paper's momentum gradient estimate). ``v`` is the same average for
``direction="momentum"`` and Adam's ``m_hat / (sqrt(v_hat) + eps)`` for ``"adam"``.
The loss must be non-negative (its minimum is estimated as a fraction of losses seen).

L4 needs the loss value, so :meth:`L4.step` must be called with a closure that zeroes the
gradients, runs the backward pass and returns the loss. The global quantities (the
minimum-loss estimate ``"l4_min_loss"`` and the last step size ``"l4_step_size"``, both
0-dim tensors) live in the state of the first parameter, as ``torch.optim.LBFGS`` keeps
its global state, so ``state_dict`` carries them; per-parameter moments and ``"step"``
counters sit beside them as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["L4"]

_GLOBAL_KEYS = ("l4_min_loss", "l4_step_size")
_DIRECTIONS = ("momentum", "adam")


class L4(torch.optim.Optimizer):
    """L4Mom (``direction="momentum"``) or L4Adam (``direction="adam"``).

    Args:
        params: parameters or param-group dicts.
        direction: ``"momentum"`` or ``"adam"`` (default ``"adam"``).
        alpha: fraction of the linearised step (default 0.15; 0.1-0.3 works per the paper).
        gamma: fraction of the minimum seen loss taken as attainable (default 0.9).
        gamma0: ``L_min = gamma0 * L_0`` at the first step (default 0.75).
        tau: forgetting time of the minimum, in steps (default 1000).
        epsilon: added to the denominator ``g_hat . v`` (default 1e-12).
        betas: ``(b1, b2)``: gradient-average decay (time scale 10) and Adam's second-moment
            decay (time scale 1000; unused for momentum). Default ``(0.9, 0.999)``.
        eps: Adam's denominator term (default 1e-4, the authors' value).
        weight_decay: L2 coefficient added to the gradient (default 0).

    There is no learning rate: the step size is recomputed every step (read
    ``"l4_step_size"``), so passing ``lr`` raises ``ValueError`` and LR schedulers do not
    apply.
    """

    def __init__(
        self,
        params: Iterable[Any],
        direction: str = "adam",
        alpha: float = 0.15,
        gamma: float = 0.9,
        gamma0: float = 0.75,
        tau: float = 1000.0,
        epsilon: float = 1e-12,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        lr: float | None = None,
    ) -> None:
        if lr is not None:
            raise ValueError(f"lr={lr!r}: L4 computes its own step size; tune alpha instead")
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction={direction!r}: must be one of {_DIRECTIONS}")
        if not alpha > 0:
            raise ValueError(f"alpha={alpha!r}: must be > 0")
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma={gamma!r}: must be in [0, 1]")
        if not 0 <= gamma0 <= 1:
            raise ValueError(f"gamma0={gamma0!r}: must be in [0, 1]")
        if not tau > 0:
            raise ValueError(f"tau={tau!r}: must be > 0")
        if not epsilon >= 0:
            raise ValueError(f"epsilon={epsilon!r}: must be >= 0")
        for i, b in enumerate(betas):
            if not 0 <= b < 1:
                raise ValueError(f"betas[{i}]={b!r}: must be in [0, 1)")
        if not eps >= 0:
            raise ValueError(f"eps={eps!r}: must be >= 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay={weight_decay!r}: must be >= 0")
        super().__init__(params, dict(betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.direction = direction
        self.alpha, self.gamma, self.gamma0 = alpha, gamma, gamma0
        self.tau, self.epsilon = tau, epsilon

    def _first_param(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    def _direction(self, p: Tensor, g: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Update the moments of ``p``; return ``(g_hat, v)``."""
        b1, b2 = group["betas"]
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            if self.direction == "adam":
                state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        m = state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        g_hat = m / (1 - b1**t)
        if self.direction == "momentum":
            return g_hat, g_hat
        s = state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        return g_hat, g_hat / ((s / (1 - b2**t)).sqrt() + group["eps"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One L4 step. ``closure`` is required: it must zero the gradients, compute the
        (non-negative) loss, call ``backward()`` and return the loss."""
        if closure is None:
            raise ValueError(
                "closure=None: L4 sets its step size from the loss; call "
                "step(closure) with a closure that zeroes grads, runs backward and returns the loss"
            )
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise ValueError("closure returned None: L4 needs the loss value")
        p0 = self._first_param()
        acc = torch.promote_types(p0.dtype, torch.float32)
        cur = torch.as_tensor(loss).detach().to(device=p0.device, dtype=acc).reshape(())
        gstate = self.state[p0]
        prev_min = gstate.get("l4_min_loss")
        min_loss = self.gamma0 * cur if prev_min is None else torch.minimum(prev_min, cur)

        updates: list[tuple[Tensor, Tensor]] = []
        dot = torch.zeros((), dtype=acc, device=p0.device)
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=wd) if wd != 0 else p.grad
                g_hat, v = self._direction(p, g, group)
                dot = dot + torch.sum(g_hat.to(acc) * v.to(acc)).to(p0.device)
                updates.append((p, v))

        eta = self.alpha * (cur - self.gamma * min_loss) / (dot + self.epsilon)
        for p, v in updates:
            p.sub_(v * eta.to(device=p.device, dtype=p.dtype))
        gstate["l4_min_loss"] = min_loss * (1.0 + 1.0 / self.tau)
        gstate["l4_step_size"] = eta
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but keeps the global L4 scalars in
        their saved (fp32 or wider) dtype instead of casting them to the parameter's dtype."""
        saved = state_dict["state"].get(0, {})
        keep = {k: saved[k] for k in _GLOBAL_KEYS if k in saved}
        super().load_state_dict(state_dict)
        p0 = self._first_param()
        for k, v in keep.items():
            self.state[p0][k] = v.detach().clone().to(device=p0.device)
