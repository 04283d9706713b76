"""Shampoo (Gupta, Koren & Singer 2018) on the shared layer views, with grafting.

For every linear/conv :class:`~metaopt.kron.layers.LayerView` with gradient matrix
``V`` (``out x in``, bias as last column; weight decay added first)::

    L <- beta2 L + V V^T          R <- beta2 R + V^T V        (beta2 = 1: plain sums)
    P = (L + eps I)^(-1/4) V (R + eps I)^(-1/4)

(a side whose dimension exceeds ``max_preconditioner_dim`` is left out and the other side
uses the root ``-1/2``, Shampoo's rule for an order-1 tensor). Parameters without a
linear/conv view (norm layers, embeddings, ...) get the **diagonal (AdaGrad-style)
fallback** ``acc <- beta2 acc + v^2``, ``P = v / sqrt(acc + eps)``.
(``beta2 < 1`` uses ``beta2 * old + (1 - beta2) * new``, as Distributed Shampoo does.)

Grafting (Agarwal et al.; Distributed Shampoo's ``grafting_config``) keeps the direction
of ``P`` and takes the per-layer step size of a first-order method:
``P <- P * ||D_graft|| / ||P||`` with ``D_graft = V`` (``"sgd"``, default), Adam's
bias-corrected ``m / (sqrt(v) + graft_eps)`` (``"adam"``), AdaGrad's
``V / (sqrt(sum V^2) + graft_eps)`` (``"adagrad"``), or no grafting (``"none"``).
Before ``start_preconditioning_step`` (default: ``precondition_freq``) the step is the
graft direction itself (plain ``V`` without grafting); the inverse roots are recomputed
every ``precondition_freq`` steps (default 20) from then on, by ``eigh`` in
``root_dtype`` (default float64) with eigenvalues floored at 0 before adding ``eps``.
Statistics are fp32 for bf16/fp16/fp32 models (fp64 for fp64 models). Finally
heavy-ball momentum (torch SGD convention) and ``p -= lr * buf``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaopt.kron.layers import LayerView, layer_views
from metaopt.optim.model_bound import ModelBoundOptimizer

__all__ = ["Shampoo", "matrix_inverse_root"]

Grafting = Literal["sgd", "adam", "adagrad", "none"]
_TINY = 1e-30


def matrix_inverse_root(
    mat: Tensor, root: int, epsilon: float, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``(mat + epsilon I)^(-1/root)`` of a symmetric PSD matrix by ``eigh`` in ``dtype``.

    Returns ``mat``'s dtype. Eigenvalues are floored at 0 (round-off) before ``epsilon``.
    """
    m = mat.to(dtype)
    evals, evecs = torch.linalg.eigh(0.5 * (m + m.T))
    scale = (evals.clamp_min(0) + epsilon).pow(-1.0 / root)
    return ((evecs * scale) @ evecs.T).to(mat.dtype)


class Shampoo(ModelBoundOptimizer):
    """Shampoo with grafting and a diagonal fallback (maths in the module docstring).

    Args:
        model: the network.
        lr: learning rate (default 0.01, the SGD-momentum scale when grafting from SGD).
        momentum: heavy-ball coefficient (default 0.9).
        weight_decay: L2 coefficient added to the gradient (default 0).
        epsilon: added to the statistics' eigenvalues before the root (default 1e-12).
        beta2: statistics decay; 1.0 (default) accumulates sums as in the paper.
        precondition_freq: recompute inverse roots every this many steps (default 20).
        start_preconditioning_step: first step using Shampoo's direction (default:
            ``precondition_freq``); earlier steps use the graft direction.
        grafting: ``"sgd"`` (default), ``"adam"``, ``"adagrad"`` or ``"none"``.
        graft_beta1: the Adam graft's first-moment decay (default 0.9).
        graft_beta2: the Adam/AdaGrad graft's second-moment decay (default 0.999).
        graft_eps: the graft's epsilon (default 1e-8).
        root_dtype: dtype of the ``eigh`` (default float64; float32 allowed).
        max_preconditioner_dim: sides larger than this are not preconditioned (default 4096).
        skip: regex of parameter names sent to the diagonal fallback.

    bf16/fp16 models train at the defaults (statistics and roots are fp32/fp64).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        epsilon: float = 1e-12,
        beta2: float = 1.0,
        precondition_freq: int = 20,
        start_preconditioning_step: int | None = None,
        grafting: Grafting = "sgd",
        graft_beta1: float = 0.9,
        graft_beta2: float = 0.999,
        graft_eps: float = 1e-8,
        root_dtype: torch.dtype = torch.float64,
        max_preconditioner_dim: int = 4096,
        skip: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__}: Shampoo needs the nn.Module itself")
        if not lr >= 0.0:
            raise ValueError(f"lr={lr!r}: must be a non-negative number")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r}: must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay={weight_decay!r}: must be non-negative")
        if not epsilon > 0.0:
            raise ValueError(f"epsilon={epsilon!r}: must be positive")
        if not 0.0 < beta2 <= 1.0:
            raise ValueError(f"beta2={beta2!r}: must be in (0, 1]")
        if not (isinstance(precondition_freq, int) and precondition_freq >= 1):
            raise ValueError(f"precondition_freq={precondition_freq!r}: must be an integer >= 1")
        if start_preconditioning_step is None:
            start_preconditioning_step = precondition_freq
        if not (isinstance(start_preconditioning_step, int) and start_preconditioning_step >= 0):
            raise ValueError(
                f"start_preconditioning_step={start_preconditioning_step!r}: must be an "
                "integer >= 0"
            )
        if grafting not in ("sgd", "adam", "adagrad", "none"):
            raise ValueError(
                f"grafting={grafting!r}: must be one of 'sgd', 'adam', 'adagrad', 'none'"
            )
        for field, value in (("graft_beta1", graft_beta1), ("graft_beta2", graft_beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{field}={value!r}: must be in [0, 1)")
        if not graft_eps > 0.0:
            raise ValueError(f"graft_eps={graft_eps!r}: must be positive")
        if root_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"root_dtype={root_dtype!r}: must be torch.float32 or float64")
        if not (isinstance(max_preconditioner_dim, int) and max_preconditioner_dim >= 1):
            raise ValueError(
                f"max_preconditioner_dim={max_preconditioner_dim!r}: must be an integer >= 1"
            )
        self.views: list[LayerView] = layer_views(model, skip)
        named = dict(model.named_parameters())
        names = [n for v in self.views for n in v.params]
        params = [named[n] for n in names]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._fix_groups()
        self._named = dict(zip(names, params, strict=True))
        self.epsilon = epsilon
        self.beta2 = beta2
        self.precondition_freq = precondition_freq
        self.start_preconditioning_step = start_preconditioning_step
        self.grafting = grafting
        self.graft_beta1, self.graft_beta2, self.graft_eps = graft_beta1, graft_beta2, graft_eps
        self.root_dtype = root_dtype
        self.max_preconditioner_dim = max_preconditioner_dim
        self.layers: dict[str, dict[str, Tensor]] = {}
        self.steps = 0

    # --- per-layer pieces ----------------------------------------------------------------
    def _accumulate(self, old: Tensor | None, new: Tensor) -> Tensor:
        if old is None:
            return new if self.beta2 == 1.0 else (1.0 - self.beta2) * new
        if self.beta2 == 1.0:
            return old + new
        return old.mul(self.beta2).add_(new, alpha=1.0 - self.beta2)

    def _sides(self, view: LayerView) -> tuple[bool, bool]:
        if view.kind == "diag":
            return False, False
        out_dim, in_dim = view.shape
        return out_dim <= self.max_preconditioner_dim, in_dim <= self.max_preconditioner_dim

    def _shampoo_direction(self, view: LayerView, v: Tensor, refresh: bool) -> Tensor:
        st = self.layers.setdefault(view.name, {})
        left, right = self._sides(view)
        if not (left or right):
            st["acc"] = self._accumulate(st.get("acc"), v.square())
            return v / (st["acc"] + self.epsilon).sqrt()
        root = 4 if (left and right) else 2
        if left:
            st["L"] = self._accumulate(st.get("L"), v @ v.T)
        if right:
            st["R"] = self._accumulate(st.get("R"), v.T @ v)
        if self.steps < self.start_preconditioning_step:
            return v
        for side, stat in (("L", left), ("R", right)):
            if stat and (refresh or f"{side}_root" not in st):
                st[f"{side}_root"] = matrix_inverse_root(
                    st[side], root, self.epsilon, self.root_dtype
                )
        out = st["L_root"] @ v if left else v
        return out @ st["R_root"] if right else out

    def _graft_direction(self, view: LayerView, v: Tensor) -> Tensor:
        st = self.layers.setdefault(view.name, {})
        if self.grafting in ("sgd", "none"):
            return v
        if self.grafting == "adagrad":
            st["graft_acc"] = st.get("graft_acc", torch.zeros_like(v)) + v.square()
            return v / (st["graft_acc"].sqrt() + self.graft_eps)
        b1, b2 = self.graft_beta1, self.graft_beta2
        m = st["graft_m"] = st.get("graft_m", torch.zeros_like(v)).lerp(v, 1.0 - b1)
        s = st["graft_v"] = st.get("graft_v", torch.zeros_like(v)).lerp(v.square(), 1.0 - b2)
        t = self.steps + 1
        return (m / (1.0 - b1**t)) / ((s / (1.0 - b2**t)).sqrt() + self.graft_eps)

    # --- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Shampoo step from ``p.grad`` (a layer is skipped if any grad is missing)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        refresh = (
            self.steps >= self.start_preconditioning_step
            and (self.steps - self.start_preconditioning_step) % self.precondition_freq == 0
        )
        for view in self.views:
            ps = {n: self._named[n] for n in view.params}
            if any(p.grad is None for p in ps.values()):
                continue
            work = torch.promote_types(_view_dtype(ps), torch.float32)
            g = {n: p.grad.to(work) + wd * p.to(work) if wd else p.grad.to(work)
                 for n, p in ps.items()}  # fmt: skip
            v = view.to_matrix(g)
            direction = self._shampoo_direction(view, v, refresh)
            graft = self._graft_direction(view, v)
            if self.steps < self.start_preconditioning_step and view.kind != "diag":
                direction = graft if self.grafting != "none" else v
            elif self.grafting != "none":
                direction = direction * (graft.norm() / direction.norm().clamp_min(_TINY))
            for n, d in view.from_matrix(direction).items():
                p = ps[n]
                d = d.to(p.dtype)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        self.steps += 1
        return loss

    # --- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state (momentum) plus ``"shampoo"``: statistics, inverse roots,
        graft moments and the step counter (their own dtype, not cast to the model's)."""
        state = super().state_dict()
        state["shampoo"] = {
            "steps": self.steps,
            "layers": {k: dict(v) for k, v in self.layers.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("shampoo", None)
        if extra is None:
            raise ValueError("state_dict: no 'shampoo' entry; not a Shampoo state_dict")
        super().load_state_dict(state_dict)
        device = self.param_groups[0]["params"][0].device
        self.steps = int(extra["steps"])
        self.layers = {
            k: {kk: vv.to(device=device) for kk, vv in v.items()}
            for k, v in extra["layers"].items()
        }


def _view_dtype(params: dict[str, Tensor]) -> torch.dtype:
    """The widest floating dtype among a layer's parameters."""
    dtype = torch.float16
    for p in params.values():
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype
