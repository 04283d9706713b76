"""Kronecker curvature statistics from forward/backward hooks on the shared layer views.

For every linear/conv :class:`~metaopt.kron.layers.LayerView` of a model,
:class:`KroneckerStatistics` keeps running averages (fp32, whatever the model's dtype) of

* ``A = mean_rows(a a^T)``: ``a`` are the rows of :meth:`LayerView.input_matrix` (conv
  patches, a ones column for a bias), one row per example and spatial position;
* ``G = (1 / B) sum_rows(ds ds^T)``: ``ds`` are the rows of
  :meth:`LayerView.output_grad_matrix`, rescaled to *per-example* pre-activation gradients
  (multiplied by the batch size ``B`` when the loss is a batch mean, ``loss_reduction="mean"``).

so that ``A ⊗ G`` (with ``vec`` stacking the columns of the ``out x in`` gradient matrix)
is the KFAC / KFC approximation of the empirical Fisher: for a linear layer
``E_n[vec(ds_n a_n^T) vec(ds_n a_n^T)^T] ≈ A ⊗ G``, and for a conv layer with ``L``
positions ``A ⊗ G = L * mean(a a^T) ⊗ mean(ds ds^T)`` (Grosse & Martens 2016).

Statistics are gathered from ordinary ``loss.backward()`` calls while :attr:`collecting`
is true (and not inside :meth:`paused`); they wait in a pending buffer until
:meth:`fold` merges them into the running averages (``new = decay * old + (1 - decay) *
batch``, the first batch initialising the average). With ``keep_rows=True`` the raw
rows are kept too, for EKFAC's per-example re-scaling (:func:`eigenbasis_second_moment`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from metaopt.kron.layers import LayerView

__all__ = ["KroneckerStatistics", "eigenbasis_second_moment", "symmetric_eigh"]

LossReduction = Literal["mean", "sum"]


def symmetric_eigh(mat: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD ``n x n`` matrix in ``dtype``.

    Returns ``(evals (n,), evecs (n, n))`` in ``dtype``, eigenvalues clamped at 0
    (round-off can make them slightly negative). The matrix is symmetrised first.
    """
    m = mat.to(dtype)
    m = 0.5 * (m + m.T)
    evals, evecs = torch.linalg.eigh(m)
    return evals.clamp_min(0), evecs


def eigenbasis_second_moment(
    rows_a: list[Tensor], rows_ds: list[Tensor], qa: Tensor, qg: Tensor
) -> Tensor:
    """EKFAC's re-scaling: ``S = mean_n (Q_G^T dW_n Q_A)^2`` (elementwise), ``out x in``.

    ``dW_n = sum_l ds_{n,l} a_{n,l}^T`` is example ``n``'s gradient matrix (for conv the sum
    runs over the spatial positions ``l`` *before* squaring; for linear there is one
    position and ``(Q_G^T ds_n)(Q_A^T a_n)^T`` is squared directly). ``rows_a[i]`` is
    ``(B_i, L_i, in)`` and ``rows_ds[i]`` ``(B_i, L_i, out)``, per-example scaled.
    """
    total = qa.new_zeros(qg.shape[0], qa.shape[0])
    count = 0
    for a, ds in zip(rows_a, rows_ds, strict=True):
        a_rot = a.to(qa.dtype) @ qa  # (B, L, in)
        ds_rot = ds.to(qg.dtype) @ qg  # (B, L, out)
        if a.shape[1] == 1:
            total += ds_rot[:, 0].square().T @ a_rot[:, 0].square()
        else:
            for chunk in range(0, a.shape[0], 32):  # bound the (b, out, in) temporary
                per_ex = torch.einsum(
                    "blo,bli->boi", ds_rot[chunk : chunk + 32], a_rot[chunk : chunk + 32]
                )
                total += per_ex.square().sum(0)
        count += a.shape[0]
    return total / max(count, 1)


class KroneckerStatistics:
    """Running ``A`` / ``G`` factors of the linear/conv views of a model, from hooks.

    Args:
        views: the layer views to watch (non-``diag`` ones; ``view.module`` is hooked).
        decay: running-average decay (default 0.95).
        loss_reduction: ``"mean"`` (default) if the loss being differentiated is a batch
            mean (output gradients are multiplied by the batch size to get per-example
            gradients), ``"sum"`` if it is a batch sum.
        keep_rows: also keep the raw ``a`` / ``ds`` rows of the pending batch (EKFAC).

    Attributes:
        A, G: ``{view name: fp32 factor}`` running averages (absent until the first fold).
        collecting: hooks record only while this is true (set by the optimizer's schedule).
    """

    def __init__(
        self,
        views: list[LayerView],
        *,
        decay: float = 0.95,
        loss_reduction: LossReduction = "mean",
        keep_rows: bool = False,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay!r}: must be in [0, 1)")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: must be 'mean' or 'sum'")
        for v in views:
            if v.kind == "diag" or v.module is None:
                raise ValueError(f"view {v.name!r}: only linear/conv2d views have statistics")
        self.views = list(views)
        self.decay = decay
        self.loss_reduction = loss_reduction
        self.keep_rows = keep_rows
        self.collecting = True
        self._paused = 0
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, Tensor] = {}
        self._pending: dict[str, dict[str, Any]] = {}
        self._handles = [v.module.register_forward_hook(self._forward_hook(v)) for v in views]

    # --- hooks ---------------------------------------------------------------------------
    def _active(self, module: nn.Module) -> bool:
        return self.collecting and not self._paused and module.training

    def _forward_hook(self, view: LayerView):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (self._active(module) and torch.is_grad_enabled() and output.requires_grad):
                return
            if _is_functorch_wrapped(inputs[0]):  # inside vmap/grad: no per-batch statistics
                return
            with torch.no_grad():
                a = view.input_matrix(inputs[0].detach()).float()  # (N, in)
            batch = inputs[0].shape[0]
            pend = self._pending.setdefault(view.name, _empty_pending())
            pend["A"] = _add(pend["A"], a.T @ a)
            pend["rows"] += a.shape[0]
            if self.keep_rows:
                pend["a"].append(a.reshape(batch, -1, a.shape[1]))
            output.register_hook(self._backward_hook(view, batch))

        return hook

    def _backward_hook(self, view: LayerView, batch: int):  # noqa: ANN202
        def hook(grad_out: Tensor) -> None:
            if self._paused or not self.collecting:
                return
            with torch.no_grad():
                ds = view.output_grad_matrix(grad_out.detach()).float()  # (N, out)
                if self.loss_reduction == "mean":
                    ds = ds * batch
                pend = self._pending.setdefault(view.name, _empty_pending())
                pend["G"] = _add(pend["G"], ds.T @ ds)
                pend["examples"] += batch
                if self.keep_rows:
                    pend["ds"].append(ds.reshape(batch, -1, ds.shape[1]))

        return hook

    # --- control -------------------------------------------------------------------------
    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward/backward passes inside this block record nothing (nestable)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def has_pending(self) -> bool:
        """Whether a full forward+backward has been recorded since the last fold."""
        return any(p["G"] is not None for p in self._pending.values())

    def pending_rows(self, name: str) -> tuple[list[Tensor], list[Tensor]]:
        """The kept ``a`` / ``ds`` rows of view ``name`` (``keep_rows=True``)."""
        pend = self._pending.get(name, _empty_pending())
        n = min(len(pend["a"]), len(pend["ds"]))
        return pend["a"][:n], pend["ds"][:n]

    def fold(self) -> list[str]:
        """Merge pending batch statistics into the running averages; clear the buffer.

        Layers whose forward ran but whose backward did not are skipped. Returns the
        names of the views that were updated.
        """
        updated = []
        for name, pend in self._pending.items():
            if pend["A"] is None or pend["G"] is None:
                continue
            a_new = _symmetrise(pend["A"] / pend["rows"])
            g_new = _symmetrise(pend["G"] / pend["examples"])
            for store, new in ((self.A, a_new), (self.G, g_new)):
                old = store.get(name)
                store[name] = new if old is None else old.lerp(new, 1.0 - self.decay)
            updated.append(name)
        return updated

    def clear(self) -> None:
        """Drop pending statistics (call after :meth:`fold` and any use of the rows)."""
        self._pending.clear()

    def remove_hooks(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # --- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"A": dict(self.A), "G": dict(self.G)}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.A = {k: v.to(device=device, dtype=torch.float32) for k, v in state["A"].items()}
        self.G = {k: v.to(device=device, dtype=torch.float32) for k, v in state["G"].items()}
        self._pending.clear()


def _is_functorch_wrapped(t: Tensor) -> bool:
    # torch has no public way to ask whether a hook runs inside a torch.func transform (where
    # activations are wrapped per-sample tensors); the private check is looked up defensively
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)  # noqa: SLF001
    return bool(check(t)) if check is not None else False


def _empty_pending() -> dict[str, Any]:
    return {"A": None, "G": None, "rows": 0, "examples": 0, "a": [], "ds": []}


def _add(acc: Tensor | None, x: Tensor) -> Tensor:
    return x if acc is None else acc + x


def _symmetrise(m: Tensor) -> Tensor:
    """Exactly symmetric (``X^T X`` in floating point is not always)."""
    return 0.5 * (m + m.T)
