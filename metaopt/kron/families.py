"""Preconditioner families: the meta-parameters of one layer block and how they act, by name.

A family acts on the ``out x in`` matrix ``G`` of a :class:`~metaopt.kron.layers.LayerView`
and returns the update direction ``P(phi) vec(G)`` reshaped the same way. ``vec`` is
row-major throughout (``G.reshape(-1)``), so for ``X`` of shape ``out x in``,
``vec(B X A) = (B kron A^T) vec(X)``.

Families (all PSD by construction, all the identity at ``init_scale=0``):

* :class:`EKFACFamily` (APO, Eq. 9-10): ``A`` (in x in), ``B`` (out x out), ``S``
  (out x in); direction ``B (S^2 * (B^T G A)) A^T``, i.e. ``P = C diag(vec S^2) C^T``
  with ``C = B kron A``. No inverse anywhere.
* :class:`LowRankFamily` (MetaMD; in :mod:`metaopt.kron.lowrank`, re-exported here):
  metric ``M = c (B kron A)`` with ``A = I + U U^T``, ``B = I + V V^T`` and
  ``c = 1`` unless ``learn_scale``; direction ``M^{-1} vec(G) = vec(B^{-1} G A^{-1}) / c``
  through Woodbury in ``O(r out in)``.
* :class:`DiagFamily`: per-entry positive scale, direction ``exp(s) * G``.
* :class:`ScalarFamily`: one positive scale per block (per-layer learning rates).

``P`` is the preconditioner; ``M = P^{-1}`` is the metric of the Bregman potential
``1/2 theta^T M theta`` (Gao et al., *Meta Mirror Descent*, 2022, section 3). Families that
know ``M`` (lowrank, diag, scalar; ``has_metric``) also give ``metric_apply`` (``M X``),
``bregman``, ``min_eigenvalue`` and ``squared_distance_to_identity`` without forming ``M``.

The names live in one :class:`~metaopt.registry.Registry`, :data:`FAMILIES`: ``"ekfac-shaped"``,
``"lowrank"``, ``"diag"``, ``"scalar"`` and the alias ``"rank1"`` (``lowrank`` with
``rank=1``, MetaMD's ``A = a a^T + I``). :func:`register_family` adds a user's
:class:`Family` subclass; :func:`make_family` refuses options the class does not take.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.cli_support import check_types
from metaopt.kron.family_base import Family, add_scaled_, decay_
from metaopt.kron.lowrank import LowRankFamily
from metaopt.registry import Registry, check_options, keyword_options

__all__ = [
    "FAMILIES",
    "DiagFamily",
    "EKFACFamily",
    "Family",
    "LowRankFamily",
    "ScalarFamily",
    "available_families",
    "family_options",
    "make_family",
    "register_family",
    "resolve_family",
]


class EKFACFamily(Family):
    """APO's structured preconditioner ``B (S^2 * (B^T G A)) A^T`` (identity at init).

    Args:
        shape: ``(out, in)``.
        init_scale: add ``N(0, init_scale^2)`` noise to ``A = I``, ``B = I``, ``S = 1``
            (default 0: the identity).
    """

    def __init__(self, shape: tuple[int, int], *, init_scale: float = 0.0) -> None:
        super().__init__(shape)
        out_dim, in_dim = self.shape
        self.A = nn.Parameter(torch.eye(in_dim))
        self.B = nn.Parameter(torch.eye(out_dim))
        self.S = nn.Parameter(torch.ones(out_dim, in_dim))
        if init_scale:
            with torch.no_grad():
                self.A.add_(torch.randn_like(self.A), alpha=init_scale)
                self.B.add_(torch.randn_like(self.B), alpha=init_scale)
                self.S.add_(torch.randn_like(self.S), alpha=init_scale)

    def _direction(self, grad: Tensor, dtype: torch.dtype) -> Tensor:
        A, B, S = (self._p(t, dtype) for t in (self.A, self.B, self.S))
        return B @ ((S * S) * (B.T @ grad @ A)) @ A.T

    @torch.no_grad()
    def accumulate_(
        self, targets: list[Tensor], grads: list[Tensor], alpha: float, beta: float = 1.0
    ) -> None:
        """``targets = beta * targets + alpha * B (S^2 * (B^T G A)) A^T`` block by block.

        The four products of :meth:`_direction` without concatenating ``G`` or writing the
        direction: ``G A = sum_i G_i A_i`` (``A_i`` the rows of ``A`` matching block ``i``),
        and the last product is an ``addmm_`` into each target (``A_i^T``). ``S^2`` and the
        casts depend on the meta-parameters alone and are cached until they change."""
        dtype = torch.promote_types(grads[0].dtype, self.A.dtype)
        A, B, S2 = self._factors(dtype)
        rows = A.split([g.shape[1] for g in grads], dim=0)
        ga = self._p(grads[0], dtype) @ rows[0]
        for g, a in zip(grads[1:], rows[1:], strict=True):
            ga.addmm_(self._p(g, dtype), a)
        bn = B @ torch.mul(B.T @ ga, S2)
        for target, a in zip(targets, rows, strict=True):
            b, a_t = self._p(bn, target.dtype), self._p(a.T, target.dtype)
            if beta == 0.0:  # overwrite (a scratch buffer) in one pass: its old values unread
                torch.addmm(target, b, a_t, beta=0, alpha=alpha, out=target)
            else:
                decay_(target, beta)
                target.addmm_(b, a_t, alpha=alpha)

    def _factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """No-grad ``(A, B, S^2)`` in ``dtype``, cached until ``A``, ``B`` or ``S`` change
        (:meth:`~metaopt.kron.family_base.Family._meta_cache`)."""

        def build() -> tuple[Tensor, Tensor, Tensor]:
            A, B, S = (self._p(m.detach(), dtype) for m in (self.A, self.B, self.S))
            return A, B, S * S

        return self._meta_cache("_factor_cache", (dtype,), build)

    def dense(self) -> Tensor:
        C = torch.kron(self.B, self.A)
        return C @ torch.diag((self.S * self.S).reshape(-1)) @ C.T


class DiagFamily(Family):
    """Per-entry positive scale: direction ``exp(s) * G``; metric ``M = diag(exp(-s))``.

    One block per parameter, whatever its layer (:attr:`Family.per_parameter`).

    Args:
        shape: ``(out, in)``.
        init_scale: ``s ~ N(0, init_scale^2)`` (default 0: the identity).
    """

    has_metric = True
    per_parameter = True

    def __init__(self, shape: tuple[int, int], *, init_scale: float = 0.0) -> None:
        super().__init__(shape)
        self.log_scale = nn.Parameter(torch.randn(*self.shape) * init_scale)

    def _direction(self, grad: Tensor, dtype: torch.dtype) -> Tensor:
        return self._p(self.log_scale.exp(), dtype) * grad

    @torch.no_grad()
    def accumulate_(
        self, targets: list[Tensor], grads: list[Tensor], alpha: float, beta: float = 1.0
    ) -> None:
        scales = self.log_scale.exp().split([g.shape[1] for g in grads], dim=1)
        for target, g, sc in zip(targets, grads, scales, strict=True):
            add_scaled_(target, g, sc, alpha, beta)

    def metric_apply(self, X: Tensor) -> Tensor:
        """``M X = exp(-s) * X``."""
        dtype = torch.promote_types(X.dtype, self.log_scale.dtype)
        return self._p(torch.exp(-self.log_scale), dtype) * self._p(X, dtype)

    def metric_mixed(self, X: list[Tensor], delta: list[Tensor]) -> tuple[Tensor, ...]:
        """``d/ds <X, exp(-s) * delta> = -exp(-s) * X * delta`` (one block)."""
        (x,), (d,) = X, delta
        return ((-torch.exp(-self.log_scale) * x * d).to(self.log_scale.dtype),)

    def dense(self) -> Tensor:
        return torch.diag(self.log_scale.exp().reshape(-1))

    def bregman(self, delta: Tensor) -> Tensor:
        return 0.5 * (delta * delta * torch.exp(-self.log_scale)).sum()

    def min_eigenvalue(self) -> Tensor:
        return torch.exp(-self.log_scale).min()

    def squared_distance_to_identity(self) -> Tensor:
        return (torch.exp(-self.log_scale) - 1).pow(2).sum()


class ScalarFamily(Family):
    """One positive scale per block: direction ``exp(s) * G`` (per-layer learning rate).

    Its diag views get scalar blocks too (:attr:`Family.diag_view_family`).

    Args:
        shape: ``(out, in)``.
        init_scale: ``s ~ N(0, init_scale^2)`` (default 0: the identity).
    """

    diag_view_family = "scalar"

    has_metric = True

    def __init__(self, shape: tuple[int, int], *, init_scale: float = 0.0) -> None:
        super().__init__(shape)
        self.log_scale = nn.Parameter(torch.randn(()) * init_scale)

    def _direction(self, grad: Tensor, dtype: torch.dtype) -> Tensor:
        return self._p(self.log_scale.exp(), dtype) * grad

    @torch.no_grad()
    def accumulate_(
        self, targets: list[Tensor], grads: list[Tensor], alpha: float, beta: float = 1.0
    ) -> None:
        scale = self.log_scale.exp()
        for target, g in zip(targets, grads, strict=True):
            add_scaled_(target, g, scale, alpha, beta)

    def metric_apply(self, X: Tensor) -> Tensor:
        """``M X = exp(-s) X``."""
        dtype = torch.promote_types(X.dtype, self.log_scale.dtype)
        return self._p(torch.exp(-self.log_scale), dtype) * self._p(X, dtype)

    def metric_mixed(self, X: list[Tensor], delta: list[Tensor]) -> tuple[Tensor, ...]:
        """``d/ds exp(-s) <X, delta> = -exp(-s) <X, delta>``."""
        xd = sum((x * d).sum() for x, d in zip(X, delta, strict=True))
        return ((-torch.exp(-self.log_scale) * xd).to(self.log_scale.dtype),)

    def dense(self) -> Tensor:
        n = self.shape[0] * self.shape[1]
        s = self.log_scale
        return s.exp() * torch.eye(n, dtype=s.dtype, device=s.device)

    def bregman(self, delta: Tensor) -> Tensor:
        return 0.5 * torch.exp(-self.log_scale) * (delta * delta).sum()

    def min_eigenvalue(self) -> Tensor:
        return torch.exp(-self.log_scale)

    def squared_distance_to_identity(self) -> Tensor:
        n = self.shape[0] * self.shape[1]
        return n * (torch.exp(-self.log_scale) - 1) ** 2


FAMILIES: Registry[type[Family]] = Registry("family")


def register_family(name: str, cls: type[Family], *, replace: bool = False) -> type[Family]:
    """Make the :class:`Family` subclass ``cls`` available as ``name`` (e.g. to
    ``KroneckerPreconditioner.for_model(model, name)``); returns ``cls``.

    ``cls(shape, **options)`` must take its options as named keyword arguments (no
    ``**kwargs``) so that a misspelt option is refused. An existing name raises
    ``ValueError`` unless ``replace=True``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise ValueError(f"register_family({name!r}): {cls!r} is not a Family subclass")
    FAMILIES.register(name, cls, replace=replace)
    return cls


def available_families() -> list[str]:
    """Every registered family name and alias, sorted."""
    return FAMILIES.available()


def family_options(family: str) -> list[str]:
    """The keyword options ``family`` takes (an alias's fixed ones included), sorted."""
    cls = FAMILIES[family]
    return keyword_options(cls, supplied=_shape_parameter(cls)) or []


def resolve_family(family: str, options: Mapping[str, Any]) -> tuple[type[Family], dict[str, Any]]:
    """``(class, options)`` for ``family``: an alias's fixed options merged in (``rank1`` is
    ``lowrank`` with ``rank=1``; giving it another ``rank`` is an error), and every option
    checked against the class's signature (names and annotated types). Nothing is built."""
    entry = FAMILIES.get(family)
    for key, fixed in entry.options.items():
        if key in options and options[key] != fixed:
            raise ValueError(
                f"family {family!r} fixes {key}={fixed!r}; got {key}={options[key]!r} "
                f"(use family {entry.target!r} for another {key})"
            )
    merged = {**options, **entry.options}
    check_options(entry.obj, merged, f"family {family!r}", supplied=_shape_parameter(entry.obj))
    check_types(entry.obj, merged)  # ``learn_scale="maybe"`` is refused, not truthy
    return entry.obj, merged


def make_family(family: str, shape: tuple[int, int], *, name: str = "", **options: Any) -> Family:
    """Instantiate ``family`` for a block of ``shape`` (``out x in``) with ``options``
    (checked by :func:`resolve_family`); ``name`` (the layer) prefixes a construction error."""
    cls, options = resolve_family(family, options)
    try:
        return cls(shape, **options)
    except ValueError as err:
        if not name:
            raise
        raise ValueError(f"layer {name!r}: {err}") from None


def _shape_parameter(cls: type[Family]) -> tuple[str, ...]:
    """The name of the constructor's first parameter (the block shape, not an option)."""
    params = list(inspect.signature(cls).parameters)
    return tuple(params[:1])


register_family("ekfac-shaped", EKFACFamily)
register_family("lowrank", LowRankFamily)
register_family("diag", DiagFamily)
register_family("scalar", ScalarFamily)
FAMILIES.alias("rank1", "lowrank", rank=1)
