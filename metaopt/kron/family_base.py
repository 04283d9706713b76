"""The family interface: one layer block's meta-parameters and how they act on ``G``.

A family acts on the ``out x in`` matrix ``G`` of a :class:`~metaopt.kron.layers.LayerView`
and returns the update direction ``P(phi) vec(G)`` reshaped the same way. ``vec`` is
row-major throughout (``G.reshape(-1)``), so for ``X`` of shape ``out x in``,
``vec(B X A) = (B kron A^T) vec(X)``. The families themselves are in
:mod:`metaopt.kron.families` (EKFAC, diag, scalar) and :mod:`metaopt.kron.lowrank`.

``P`` is the preconditioner (the update is ``-eta P g``). Families that also know
``M = P^{-1}`` (:attr:`Family.has_metric`) define a mirror map: ``M`` is the metric of the
Bregman potential ``1/2 theta^T M theta``, whose mirror-descent step is the preconditioned
step (Gao et al., *Meta Mirror Descent*, 2022, section 3). They give ``M X``
(:meth:`Family.metric_apply`) and MetaMD's identities without forming ``M``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Family", "add_scaled_", "decay_"]


def decay_(target: Tensor, beta: float) -> None:
    """``target *= beta`` in place; ``beta=0`` zeroes without reading (``0 * nan`` is nan)."""
    if beta == 0.0:
        target.zero_()
    elif beta != 1.0:
        target.mul_(beta)


def add_scaled_(target: Tensor, grad: Tensor, scale: Tensor, alpha: float, beta: float) -> None:
    """``target = beta * target + alpha * scale * grad`` in place (``scale`` broadcasts to
    ``grad``); ``beta=0`` writes ``target`` in one pass without reading it."""
    scale = scale.to(grad.dtype)
    if beta == 0.0:
        torch.mul(grad, scale if alpha == 1.0 else scale * alpha, out=target)
    else:
        decay_(target, beta)
        target.addcmul_(grad, scale, value=alpha)


class Family(nn.Module, abc.ABC):
    """One block's meta-parameters. Subclasses implement ``_direction`` and ``dense``.

    ``apply`` computes in the wider of the gradient's and the meta-parameters' dtypes and
    returns the gradient's dtype, so a bf16 model can use an fp32 preconditioner.

    The constructor is ``cls(shape, **options)`` with keyword-only options (no ``**kwargs``:
    :func:`~metaopt.kron.families.make_family` refuses an option the signature lacks, naming
    the allowed ones). A new family is added with
    :func:`~metaopt.kron.families.register_family`.
    """

    #: whether ``M = P^{-1}`` is known: ``metric_apply``, ``metric_mixed``,
    #: ``metric_inverse_mixed``, ``bregman``, ``min_eigenvalue`` and
    #: ``squared_distance_to_identity`` exist
    has_metric: bool = False
    #: the registered family that serves this family's ``"diag"`` views (norm scales,
    #: embeddings, lone biases, grouped convs); a different family is built there with its
    #: default options, since one family's options mean nothing to another
    diag_view_family: str = "diag"
    #: one block per parameter (every view split into ``1 x numel`` diag views) rather than
    #: one per layer
    per_parameter: bool = False

    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))

    def apply(self, grad: Tensor) -> Tensor:
        """``grad`` (out x in) -> update direction (out x in), same dtype as ``grad``."""
        meta_dtype = next(self.parameters()).dtype
        dtype = torch.promote_types(grad.dtype, meta_dtype)
        return self._direction(grad.to(dtype), dtype).to(grad.dtype)

    def apply_blocks(self, grads: list[Tensor], meta_constant: bool = False) -> list[Tensor]:
        """``apply`` on column blocks ``G = [grads[0] | ...]`` (``LayerView.column_blocks``),
        returning the direction's matching blocks. The default concatenates; families
        override it to avoid copying ``G``. ``meta_constant=True`` promises that no
        derivative (reverse or forward mode) with respect to the meta-parameters is needed,
        so a family may use cached factors; families without a cache ignore it."""
        if len(grads) == 1:
            return [self.apply(grads[0])]
        return list(self.apply(torch.cat(grads, dim=1)).split([g.shape[1] for g in grads], 1))

    @abc.abstractmethod
    def _direction(self, grad: Tensor, dtype: torch.dtype) -> Tensor:
        """``grad`` already in ``dtype``; cast meta-parameters with ``_p``."""

    @abc.abstractmethod
    def dense(self) -> Tensor:
        """The ``(out*in) x (out*in)`` preconditioner ``P`` (row-major vec)."""

    def forward(self, grad: Tensor) -> Tensor:
        return self.apply(grad)

    @torch.no_grad()
    def accumulate_(
        self, targets: list[Tensor], grads: list[Tensor], alpha: float, beta: float = 1.0
    ) -> None:
        """In place: ``targets = beta * targets + alpha * P G`` with ``G = [grads[0] | ...]``.

        ``targets`` and ``grads`` are matching column blocks (see
        ``LayerView.column_blocks``). ``beta`` is the momentum decay when ``targets`` are
        momentum buffers (families fold it into an op they do anyway); ``beta=0`` overwrites
        the targets without reading them (scratch buffers: old values may be anything). The default
        concatenates; families override it to avoid temporaries the size of ``G`` and extra
        passes over memory (the deploy optimizer's hot path).
        """
        sizes = [g.shape[1] for g in grads]
        grad = grads[0] if len(grads) == 1 else torch.cat(grads, dim=1)
        direction = self.apply(grad)
        for target, part in zip(targets, direction.split(sizes, dim=1), strict=True):
            decay_(target, beta)
            target.add_(part, alpha=alpha)

    def metric_apply(self, X: Tensor) -> Tensor:
        """``M vec(X)`` reshaped (``X``: ``out x in``), ``M = P^{-1}`` the metric of the
        Bregman potential; differentiable in ``X`` and the meta-parameters. Families with a
        metric only."""
        raise ValueError(f"{type(self).__name__} has no metric M = P^-1")

    def metric_mixed(self, X: list[Tensor], delta: list[Tensor]) -> tuple[Tensor, ...]:
        """``d/d phi <X, M(phi) delta>`` for each meta-parameter (``self.parameters()``
        order), without autograd. ``X``, ``delta``: the ``out x in`` matrices as matching
        column blocks (``LayerView.column_blocks``; ``[X]`` for a whole matrix). This is
        ``(d^2 B_M / d phi d theta)^T x`` for ``B_M = 1/2 delta^T M delta``, the mixed
        product of MetaMD's implicit hypergradient. Families with a metric only."""
        raise ValueError(f"{type(self).__name__} has no metric M = P^-1")

    def metric_inverse_mixed(self, V: list[Tensor], delta: list[Tensor]) -> tuple[Tensor, ...]:
        """``metric_mixed(M^{-1} V, delta)`` with ``M^{-1}`` held constant: the closed-form
        implicit term ``(d^2 B_M / d phi d theta)^T M^{-1} v`` in one call. The default
        applies ``P = M^{-1}`` (``apply_blocks``) first; families override it to fuse the
        two. Families with a metric only."""
        with torch.no_grad():
            return self.metric_mixed(self.apply_blocks(V, meta_constant=True), delta)

    def _meta_cache(self, slot: str, extra: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        """``build()``, cached in attribute ``slot`` until a meta-parameter changes or
        ``extra`` (dtype, block sizes, ...) differs. Changes are seen through version
        counters (bumped by every in-place update, ``load_state_dict``'s included) and
        storage (a new tensor). PyTorch's fused optimizers (``fused=True``) update in place
        without bumping version counters: after such a step call
        ``torch.autograd.graph.increment_version`` on the meta-parameters (APO does)."""
        metas = self._parameters.values()  # a family has no submodules; cheaper than parameters()
        key = extra + tuple((m._version, m.data_ptr(), m.device) for m in metas)
        cached = getattr(self, slot, None)
        if cached is not None and cached[0] == key:
            return cached[1]
        value = build()
        setattr(self, slot, (key, value))
        return value

    @staticmethod
    def _p(t: Tensor, dtype: torch.dtype) -> Tensor:
        return t if t.dtype == dtype else t.to(dtype)
