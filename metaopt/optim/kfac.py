"""KFAC (Martens & Grosse 2015) and EKFAC (George et al. 2018) on the shared layer views.

Both precondition the ``out x in`` gradient matrix ``V`` of every linear/conv layer view
with the eigendecompositions ``A = Q_A diag(a) Q_A^T`` (activations) and
``G = Q_G diag(g) Q_G^T`` (per-example pre-activation gradients) of the running factors
collected by :class:`~metaopt.optim.curvature.KroneckerStatistics`::

    V' = Q_G^T V Q_A;   V' <- V' / D;   direction = Q_G V' Q_A^T

The damping ``d`` (``damping``) enters ``D`` as follows (``vec`` stacks columns, so the
layer's curvature is ``A ⊗ G``):

* KFAC, ``damping_form="split"`` (default): Tikhonov damping split between the factors
  with the pi trace-norm rule, ``gamma = sqrt(d)``,
  ``pi = sqrt((tr(A) / dim A) / (tr(G) / dim G))``; the direction is
  ``(A + pi gamma I)^-1 ⊗ (G + gamma / pi I)^-1 vec(V)``, i.e.
  ``D = (g + gamma / pi) (a + pi gamma)^T``. For a float damping the two damped
  inverses are cached per layer (refreshed with the eigenbasis or a new damping value),
  so a step costs two products per layer instead of four.
* KFAC, ``damping_form="exact"``: ``(A ⊗ G + d I)^-1 vec(V)``, ``D = g a^T + d``.
* EKFAC: ``D = S + d`` where ``S = mean_n (Q_G^T dW_n Q_A)^2`` is re-estimated in the
  KFAC eigenbasis from per-example gradients ``dW_n`` (for conv layers the sum over
  spatial positions is taken per example *before* squaring), with the same running
  average; it is reset to the new batch's estimate whenever the basis is recomputed.

Schedule (``steps`` counts optimizer steps from 0): statistics are collected during the
forward/backward of steps with ``steps % factor_update_freq == 0`` (default 10) and the
eigendecompositions are recomputed when ``steps % inv_update_freq == 0`` (default 100;
EKFAC's ``S`` is re-estimated at every factor step). Factors and eigendecompositions are
fp32 whatever the model's dtype; the eigendecompositions (and the preconditioning
products) are in ``eigh_dtype``, fp32 by default or fp64.

Update, as kfac-pytorch's KFAC-preconditioned SGD: ``u = nu * P(grad)`` for layer views
(``nu = min(1, sqrt(kl_clip / (lr^2 sum <P(grad), grad>)))`` if ``kl_clip`` is set, else
1), ``u = grad`` for the parameters without a linear/conv view (norm layers, embeddings,
grouped convs, ...: the **diag fallback is the identity**, i.e. plain SGD with the same
lr/momentum/weight decay, as kfac-pytorch does for unregistered modules); then
``u += weight_decay * p``; ``buf = momentum * buf + u`` (torch SGD convention);
``p -= lr * buf``.

The Fisher is the *empirical* one of the loss whose ``backward()`` runs (set
``loss_reduction="sum"`` for batch-summed losses).

For APO and other callers that form their own steps:

* :meth:`KFAC.precondition` ``(grads, damping=None) -> dict``: the direction for the stored
  eigendecompositions, differentiable in ``grads`` and in a tensor ``damping``; no new
  statistics or eigendecomposition;
* :meth:`KFAC.statistics_paused`: forward/backward passes inside do not touch statistics;
* :meth:`KFAC.update_curvature`: fold the statistics of the last ``loss.backward()`` and
  refresh decompositions as scheduled (``step`` calls it if the caller has not);
* ``step(grads=..., damping=...)``: a full step from the caller's gradients (instead of
  ``p.grad``) and/or with a damping override; ``step(directions=...)`` applies directions
  the caller preconditioned itself (weight decay and momentum still apply);
* :meth:`KFAC.advance`: end a step without a parameter update (the caller applied its
  own), keeping the statistics/decomposition schedule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaopt.kron.layers import LayerView, layer_views
from metaopt.optim.curvature import (
    KroneckerStatistics,
    LossReduction,
    eigenbasis_second_moment,
    symmetric_eigh,
)
from metaopt.optim.model_bound import ModelBoundOptimizer

__all__ = ["EKFAC", "KFAC"]

DampingForm = Literal["split", "exact"]
_TINY = 1e-30


class KFAC(ModelBoundOptimizer):
    """KFAC-preconditioned SGD with momentum (see the module docstring for the maths).

    Args:
        model: the network (its linear/conv layers are hooked).
        lr: learning rate (default 0.1).
        momentum: heavy-ball coefficient (default 0.9).
        damping: Tikhonov damping ``d`` (default 1e-3; bf16/fp16 models train at it).
        weight_decay: added to the preconditioned direction (default 0).
        kl_clip: KL-clipping bound (default 1e-3; ``None`` disables it).
        factor_update_freq: collect statistics every this many steps (default 10).
        inv_update_freq: recompute eigendecompositions every this many steps (default 100).
        stat_decay: running-average decay of the factors (default 0.95).
        damping_form: ``"split"`` (default, pi rule) or ``"exact"``.
        eigh_dtype: dtype of the eigendecompositions (default float32; float64 allowed).
        loss_reduction: ``"mean"`` (default) or ``"sum"``, the reduction of the loss.
        skip: regex of parameter names to leave to the diag (identity) fallback.
    """

    _keep_rows = False
    _factored = True  # the split form factors into two damped inverses

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        kl_clip: float | None = 1e-3,
        factor_update_freq: int = 10,
        inv_update_freq: int = 100,
        stat_decay: float = 0.95,
        damping_form: DampingForm = "split",
        eigh_dtype: torch.dtype = torch.float32,
        loss_reduction: LossReduction = "mean",
        skip: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__}: KFAC needs the nn.Module itself")
        if not lr >= 0.0:
            raise ValueError(f"lr={lr!r}: must be a non-negative number")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum={momentum!r}: must be in [0, 1)")
        if not damping > 0.0:
            raise ValueError(f"damping={damping!r}: must be positive")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay={weight_decay!r}: must be non-negative")
        if kl_clip is not None and not kl_clip > 0.0:
            raise ValueError(f"kl_clip={kl_clip!r}: must be positive or None")
        for field, value in (("factor_update_freq", factor_update_freq),
                             ("inv_update_freq", inv_update_freq)):  # fmt: skip
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{field}={value!r}: must be an integer >= 1")
        if damping_form not in ("split", "exact"):
            raise ValueError(f"damping_form={damping_form!r}: must be 'split' or 'exact'")
        if eigh_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"eigh_dtype={eigh_dtype!r}: must be torch.float32 or float64")
        self.views: list[LayerView] = layer_views(model, skip)
        named = dict(model.named_parameters())
        self._names = [n for v in self.views for n in v.params]
        params = [named[n] for n in self._names]
        defaults = dict(lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._fix_groups()
        self._name_of = {id(p): n for n, p in zip(self._names, params, strict=True)}
        self.kl_clip = kl_clip
        self.factor_update_freq = factor_update_freq
        self.inv_update_freq = inv_update_freq
        self.damping_form = damping_form
        self.eigh_dtype = eigh_dtype
        self.kron_views = [v for v in self.views if v.kind != "diag"]
        self.stats = KroneckerStatistics(
            self.kron_views,
            decay=stat_decay,
            loss_reduction=loss_reduction,
            keep_rows=self._keep_rows,
        )
        self.eigen: dict[str, dict[str, Tensor]] = {}
        self._inverses: dict[str, tuple[float, Tensor, Tensor]] = {}  # derived, not saved
        self.steps = 0
        self._curvature_done_at = -1
        self._sync_collecting()

    # --- schedule ------------------------------------------------------------------------
    def _sync_collecting(self) -> None:
        self.stats.collecting = self.steps % self.factor_update_freq == 0

    @contextlib.contextmanager
    def statistics_paused(self) -> Iterator[None]:
        """Forward/backward passes inside this block leave the curvature statistics alone."""
        with self.stats.paused():
            yield

    @torch.no_grad()
    def update_curvature(self) -> None:
        """Fold the statistics recorded since the last step and refresh the eigenbases.

        Called by :meth:`step` (at most once per step); call it yourself after
        ``loss.backward()`` if you need :meth:`precondition` to see this step's factors
        before stepping.
        """
        if self._curvature_done_at == self.steps:
            return
        self._curvature_done_at = self.steps
        folded = set(self.stats.fold()) if self.stats.has_pending() else set()
        due = self.steps % self.inv_update_freq == 0
        for view in self.kron_views:
            name = view.name
            if name not in self.stats.A:
                continue
            refreshed = due or name not in self.eigen
            if refreshed:
                d_a, q_a = symmetric_eigh(self.stats.A[name], self.eigh_dtype)
                d_g, q_g = symmetric_eigh(self.stats.G[name], self.eigh_dtype)
                self.eigen[name] = {"QA": q_a, "dA": d_a, "QG": q_g, "dG": d_g}
                self._inverses.pop(name, None)
            self._after_curvature(view, refreshed, name in folded)
        self.stats.clear()

    def advance(self) -> None:
        """End the current step without touching the parameters: fold statistics, refresh
        decompositions on schedule and advance the step counter (for callers that apply
        their own updates from :meth:`precondition`)."""
        self.update_curvature()
        self.steps += 1
        self._sync_collecting()

    def _after_curvature(self, view: LayerView, refreshed: bool, folded: bool) -> None:
        """Hook for EKFAC's re-scaling; KFAC needs nothing more."""

    # --- preconditioning -----------------------------------------------------------------
    def _denominator(self, name: str, damping: float | Tensor) -> Tensor:
        e = self.eigen[name]
        d_a, d_g = e["dA"], e["dG"]
        if self.damping_form == "exact":
            return torch.outer(d_g, d_a) + damping
        gamma = damping.sqrt() if isinstance(damping, Tensor) else math.sqrt(damping)
        pi = self._pi(e)
        return torch.outer(d_g + gamma / pi, d_a + pi * gamma)

    def _split_inverses(self, name: str, damping: float | Tensor) -> tuple[Tensor, Tensor] | None:
        """``((G + gamma/pi I)^-1, (A + pi gamma I)^-1)`` for a float damping (split form).

        Cached per layer until the eigenbasis or the damping changes; ``None`` where the
        eigenbasis path is needed (tensor damping, exact form, EKFAC).
        """
        if not self._factored or self.damping_form != "split" or isinstance(damping, Tensor):
            return None
        cached = self._inverses.get(name)
        if cached is not None and cached[0] == damping:
            return cached[1], cached[2]
        e = self.eigen[name]
        gamma = math.sqrt(damping)
        pi = self._pi(e)
        g_inv = (e["QG"] / (e["dG"] + gamma / pi)) @ e["QG"].T
        a_inv = (e["QA"] / (e["dA"] + pi * gamma)) @ e["QA"].T
        self._inverses[name] = (damping, g_inv, a_inv)
        return g_inv, a_inv

    @staticmethod
    def _pi(e: dict[str, Tensor]) -> Tensor:
        """pi trace-norm rule: ``sqrt((tr(A) / dim A) / (tr(G) / dim G))``."""
        return torch.sqrt(e["dA"].mean().clamp_min(_TINY) / e["dG"].mean().clamp_min(_TINY))

    def precondition(
        self, grads: Mapping[str, Tensor], damping: float | Tensor | None = None
    ) -> dict[str, Tensor]:
        """The (E)KFAC direction for the stored eigendecompositions.

        Args:
            grads: ``{parameter name: gradient}`` (names as in ``model.named_parameters()``);
                a layer view is preconditioned when all its parameters are present.
            damping: overrides the group's ``damping``; a tensor keeps the result
                differentiable in it. Grads stay differentiable too (no in-place ops).

        Returns:
            ``{name: direction}`` for the same names, in the grads' dtypes. Parameters
            without a linear/conv view, or whose layer has no statistics yet, are
            returned unchanged (identity fallback).
        """
        if damping is None:
            damping = self.param_groups[0]["damping"]
        covered: set[str] = set()
        out: dict[str, Tensor] = {}
        for view in self.views:
            present = [n for n in view.params if n in grads]
            if not present:
                continue
            if len(present) != len(view.params):
                raise ValueError(
                    f"grads: layer {view.name!r} needs all of {view.params}, got only {present}"
                )
            covered.update(present)
            if view.kind == "diag" or view.name not in self.eigen:
                out.update({n: grads[n] for n in present})
                continue
            e = self.eigen[view.name]
            mat = view.to_matrix(grads)
            work = mat.to(e["QA"].dtype)
            inverses = self._split_inverses(view.name, damping)
            if inverses is not None:  # two products with the cached damped inverses
                direction = inverses[0] @ work @ inverses[1]
            else:  # four products through the eigenbasis
                rot = (e["QG"].T @ work @ e["QA"]) / self._denominator(view.name, damping)
                direction = e["QG"] @ rot @ e["QA"].T
            out.update(view.from_matrix(direction.to(mat.dtype)))
        unknown = set(grads) - covered
        if unknown:
            raise ValueError(f"grads: unknown parameter names {sorted(unknown)}")
        return out

    # --- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        grads: Mapping[str, Tensor] | None = None,
        damping: float | Tensor | None = None,
        directions: Mapping[str, Tensor] | None = None,
    ) -> Tensor | None:
        """One KFAC step (statistics of this step's ``backward()`` are folded in first).

        Args:
            closure: re-evaluates the loss and calls ``backward()`` (optional).
            grads: ``{name: gradient}`` to use instead of ``p.grad`` (missing names:
                ``p.grad``, and parameters with neither are not updated).
            damping: damping override for this step.
            directions: ``{name: direction}`` already preconditioned by the caller (e.g.
                :meth:`precondition` with a learned damping): used as they are, without
                KL clipping; weight decay and momentum still apply, only these names move.
        """
        if directions is not None and (grads is not None or damping is not None):
            raise ValueError("directions: give either directions or grads/damping, not both")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update_curvature()
        group = self.param_groups[0]
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        params = {self._name_of[id(p)]: p for g in self.param_groups for p in g["params"]}
        if directions is not None:
            unknown = set(directions) - set(params)
            if unknown:
                raise ValueError(f"directions: unknown parameter names {sorted(unknown)}")
            update = {n: d.detach() for n, d in directions.items()}
        else:
            given = dict(grads or {})
            current = {}
            for n, p in params.items():
                g = given.get(n, p.grad)
                if g is not None:
                    current[n] = g.detach()
            update = self.precondition(current, damping)
            if self.kl_clip is not None:
                self._kl_clip(update, current, lr)
        for n, d in update.items():
            p = params[n]
            d = d.to(p.dtype)
            if wd != 0:
                d = d.add(p, alpha=wd)
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
        self._sync_collecting()
        return loss

    def _kl_clip(
        self, directions: dict[str, Tensor], grads: Mapping[str, Tensor], lr: float
    ) -> None:
        names = [n for v in self.kron_views if v.name in self.eigen for n in v.params]
        names = [n for n in names if n in directions]
        if not names:
            return
        vg = sum((directions[n].float() * grads[n].float()).sum() for n in names) * lr**2
        nu = (self.kl_clip / vg.abs().clamp_min(_TINY)).sqrt().clamp(max=1.0)
        for n in names:
            directions[n] = directions[n] * nu.to(directions[n].dtype)

    # --- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Torch's optimizer state (momentum) plus ``"curvature"``: factors, eigenbases,
        EKFAC scalings and the step counter (kept in fp32, not cast to the model dtype)."""
        state = super().state_dict()
        state["curvature"] = {
            "steps": self.steps,
            "curvature_done_at": self._curvature_done_at,
            "stats": self.stats.state_dict(),
            "eigen": {k: dict(v) for k, v in self.eigen.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        curv = state_dict.pop("curvature", None)
        if curv is None:
            raise ValueError("state_dict: no 'curvature' entry; not a KFAC/EKFAC state_dict")
        super().load_state_dict(state_dict)
        device = self.param_groups[0]["params"][0].device
        self.steps = int(curv["steps"])
        self._curvature_done_at = int(curv["curvature_done_at"])
        self.stats.load_state_dict(curv["stats"], device)
        self.eigen = {
            k: {kk: vv.to(device=device, dtype=self.eigh_dtype) for kk, vv in v.items()}
            for k, v in curv["eigen"].items()
        }
        self._inverses.clear()
        self._sync_collecting()


class EKFAC(KFAC):
    """EKFAC: KFAC's eigenbasis with the diagonal re-estimated in it (George et al. 2018).

    Same arguments and API as :class:`KFAC` except ``damping_form`` (EKFAC's damping is
    additive, ``D = S + damping``). ``S`` is refreshed at every factor step from the
    per-example gradients of that step's batch (running average with ``stat_decay``,
    reset when the basis is recomputed); where a refresh of the basis meets no new batch
    ``S`` starts from KFAC's own diagonal ``g a^T``.
    """

    _keep_rows = True
    _factored = False

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        if "damping_form" in kwargs:
            raise ValueError("damping_form: EKFAC's damping is always additive (S + damping)")
        super().__init__(model, **kwargs)

    def _after_curvature(self, view: LayerView, refreshed: bool, folded: bool) -> None:
        e = self.eigen[view.name]
        rows_a, rows_ds = self.stats.pending_rows(view.name) if folded else ([], [])
        if rows_a:
            batch = eigenbasis_second_moment(rows_a, rows_ds, e["QA"], e["QG"])
            if refreshed or "S" not in e:
                e["S"] = batch
            else:
                e["S"] = e["S"].lerp(batch, 1.0 - self.stats.decay)
        elif refreshed or "S" not in e:
            e["S"] = torch.outer(e["dG"], e["dA"])

    def _denominator(self, name: str, damping: float | Tensor) -> Tensor:
        return self.eigen[name]["S"] + damping
