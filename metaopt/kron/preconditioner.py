"""KroneckerPreconditioner: a block-diagonal preconditioner over a model's layer views."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from metaopt.kron.families import FAMILIES, Family, make_family, resolve_family
from metaopt.kron.layers import LayerView, layer_views

__all__ = ["KroneckerPreconditioner"]


def _module_key(view_name: str) -> str:
    """``nn.ModuleDict`` keys may not contain dots."""
    return view_name.replace(".", "__")


class KroneckerPreconditioner(nn.Module):
    """Block-diagonal preconditioner ``P = diag(P_1, ..., P_Z)``, one family per layer view.

    Linear/conv views get ``family`` built with ``options``. Diag views (norm scales,
    embeddings, lone biases, grouped convs) get the family's ``diag_view_family``
    (``"diag"``; ``"scalar"`` for ``family="scalar"``): with ``options`` when that is
    the family itself, else with its own defaults (the identity), because one family's
    options mean nothing to another (lowrank's ``rank`` or ``init_scale`` to a diag
    block). ``dense_diag_max=n`` (default 0) instead gives diag views with at most ``n``
    entries a ``1 x n`` block of ``family`` itself (a full ``n x n`` EKFAC block for
    ``"ekfac-shaped"``). Parameters matched by ``skip`` are passed through unchanged (identity).

    The module's own parameters are the meta-parameters, so ``preconditioner.parameters()``
    can be handed to a meta-optimizer and ``apply`` is differentiable in them.
    """

    def __init__(
        self,
        views: list[LayerView],
        family: str,
        *,
        param_names: list[str],
        param_shapes: Mapping[str, tuple[int, ...]],
        skip: str | None = None,
        dense_diag_max: int = 0,
        **options: Any,
    ) -> None:
        super().__init__()
        cls, _ = resolve_family(family, options)  # refuses bad options before building
        if type(dense_diag_max) is not int or dense_diag_max < 0:  # bool is not a count
            raise ValueError(f"dense_diag_max={dense_diag_max!r}: must be an integer >= 0")
        self.family_name = family
        #: what ``for_model`` needs to rebuild this preconditioner (saved in file metadata)
        self.options = {**options, **({"dense_diag_max": dense_diag_max} if dense_diag_max else {})}
        self.skip = skip
        self.views = views
        self.param_names = list(param_names)
        self.param_shapes = {n: tuple(s) for n, s in param_shapes.items()}
        fallback = cls.diag_view_family
        fallback_options = options if FAMILIES[fallback] is cls else {}
        blocks = {}
        for v in views:
            if v.kind == "diag" and v.shape[0] * v.shape[1] > dense_diag_max:
                blk = make_family(fallback, v.shape, name=v.name, **fallback_options)
            else:
                blk = make_family(family, v.shape, name=v.name, **options)
            blocks[_module_key(v.name)] = blk
        self.blocks = nn.ModuleDict(blocks)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        family: str = "ekfac-shaped",
        rank: int | None = None,
        skip: str | None = None,
        *,
        dense_diag_max: int = 0,
        **options: Any,
    ) -> KroneckerPreconditioner:
        """Build a preconditioner (identity, or near it for lowrank) for ``model``.

        Args:
            model: the network whose ``named_parameters()`` the preconditioner serves.
            family: a registered family (:func:`~metaopt.kron.families.available_families`:
                ``"ekfac-shaped" | "lowrank" | "rank1" | "diag" | "scalar"`` and any added with
                :func:`~metaopt.kron.families.register_family`).
            rank: the family's ``rank`` option (``"lowrank"``; ``"rank1"`` fixes it to 1);
                ``None`` (default) leaves the family's default.
            skip: regex of parameter names to leave out (identity).
            dense_diag_max: diag views with at most this many entries get a block of
                ``family`` itself instead of the diag fallback (default 0: none).
            **options: the family's own keyword options (``init_scale``, ``learn_scale``,
                ...); one it does not take is a ``ValueError`` listing those it does.
        """
        if rank is not None:
            options["rank"] = rank
        family_cls, _ = resolve_family(family, options)
        views = layer_views(model, skip=skip)
        if family_cls.per_parameter:
            views = _as_diag_views(views)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        ref = next((p for _, p in trainable), None)
        pre = cls(
            views,
            family,
            param_names=[n for n, _ in trainable],
            param_shapes={n: tuple(p.shape) for n, p in trainable},
            skip=skip,
            dense_diag_max=dense_diag_max,
            **options,
        )
        if ref is not None:
            pre.to(device=ref.device)
        return pre

    # --- application ---------------------------------------------------------------------
    def block(self, view: LayerView) -> Family:
        return self.blocks[_module_key(view.name)]  # type: ignore[return-value]

    def apply(
        self, grads: Mapping[str, Tensor], *, meta_constant: bool = False
    ) -> dict[str, Tensor]:
        """Update direction for every gradient in ``grads`` (keyed like ``named_parameters``).

        Parameters the preconditioner does not cover (skipped) pass through unchanged.
        Differentiable in the meta-parameters (and in ``grads``). ``meta_constant=True``
        (default ``False``) promises that no derivative with respect to the
        meta-parameters is wanted (e.g. ``M^{-1} v`` for ``implicit_grad``'s
        ``inverse_hvp``): the lowrank family then reuses factors cached from ``U``, ``V``
        (fewer small ops); the result is the same.
        """
        out = dict(grads)
        for view in self.views:
            if view.weight not in grads:
                continue
            directions = self.block(view).apply_blocks(view.column_blocks(grads), meta_constant)
            out.update(view.from_column_blocks(directions))
        return out

    def forward(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.apply(grads)

    # --- MetaMD identities (families with a metric M = P^{-1}) ---------------------------
    @property
    def has_metric(self) -> bool:
        """Whether every block knows its metric ``M = P^{-1}`` (what the Bregman identities
        and the implicit hypergradient need)."""
        return all(self.block(v).has_metric for v in self.views)

    def _metric_blocks(self) -> list[tuple[LayerView, Family]]:
        pairs = [(v, self.block(v)) for v in self.views]
        bad = sorted({type(b).__name__ for _, b in pairs if not b.has_metric})
        if bad:
            raise ValueError(
                f"family={self.family_name!r} has no metric M = P^-1 (blocks {bad}); "
                "metric_apply/bregman/min_eigenvalue/frobenius need a family with has_metric "
                "(lowrank, rank1, diag, scalar)"
            )
        return pairs

    def metric_apply(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``M v`` block by block for ``tensors`` keyed like ``named_parameters()``, with
        ``M = P^{-1}`` the metric of the Bregman potential ``B_M`` (its Hessian; skipped
        parameters: ``M = I``). Never forms ``M``; differentiable in ``tensors`` and the
        meta-parameters."""
        out = dict(tensors)
        for view, blk in self._metric_blocks():
            if view.weight in tensors:
                out.update(view.from_matrix(blk.metric_apply(view.to_matrix(tensors))))
        return out

    def bregman(self, theta: Mapping[str, Tensor], theta_ref: Mapping[str, Tensor]) -> Tensor:
        """``B_M(theta || theta_ref) = 1/2 (theta - theta_ref)^T M (theta - theta_ref)``.

        Skipped parameters count with ``M = I``. Never forms ``M``.
        """
        total = None
        covered: set[str] = set()
        for view, blk in self._metric_blocks():
            delta = view.to_matrix(theta) - view.to_matrix(theta_ref)
            term = blk.bregman(delta)
            total = term if total is None else total + term
            covered.update(view.params)
        for name in self.param_names:
            if name not in covered and name in theta:
                d = theta[name] - theta_ref[name]
                term = 0.5 * (d * d).sum()
                total = term if total is None else total + term
        if total is None:
            raise ValueError("bregman: no parameters given")
        return total

    @torch.no_grad()
    def bregman_mixed(
        self,
        x: Mapping[str, Tensor],
        theta: Mapping[str, Tensor],
        theta_ref: Mapping[str, Tensor],
    ) -> tuple[Tensor, ...]:
        """``d/d phi <x, M(phi) (theta - theta_ref)>`` for every meta-parameter.

        One tensor per ``self.parameters()`` entry, in that order (zeros for blocks whose
        layers are not in ``theta``). This is the mixed product
        ``(d^2 B_M / d phi d theta)^T x`` that MetaMD's implicit hypergradient needs
        (``x = M^{-1} d_theta outer``), computed analytically block by block
        (``Family.metric_mixed``: thin matrix products, no autograd graph); pass it to
        ``implicit_grad(method="closed_form", mixed_product=...)``.
        """
        return self._blockwise_mixed(x, theta, theta_ref, "metric_mixed")

    @torch.no_grad()
    def bregman_inverse_mixed(
        self,
        v: Mapping[str, Tensor],
        theta: Mapping[str, Tensor],
        theta_ref: Mapping[str, Tensor],
    ) -> tuple[Tensor, ...]:
        """``bregman_mixed(M^{-1} v, theta, theta_ref)`` with ``M^{-1}`` held constant, in
        one pass per block (``Family.metric_inverse_mixed``; the lowrank family never forms
        ``M^{-1} v``): the whole closed-form implicit term
        ``(d^2 B_M / d phi d theta)^T H^{-1} v`` of a Bregman inner objective (``H = M``);
        pass it to ``implicit_grad(method="closed_form", inverse_mixed=...)``.
        """
        return self._blockwise_mixed(v, theta, theta_ref, "metric_inverse_mixed")

    def _blockwise_mixed(
        self,
        x: Mapping[str, Tensor],
        theta: Mapping[str, Tensor],
        theta_ref: Mapping[str, Tensor],
        method: str,
    ) -> tuple[Tensor, ...]:
        grads: dict[int, Tensor] = {}
        for view, blk in self._metric_blocks():
            if view.weight not in theta:
                continue
            cols = zip(view.column_blocks(theta), view.column_blocks(theta_ref), strict=True)
            delta = [a - b for a, b in cols]
            mixed = getattr(blk, method)(view.column_blocks(x), delta)
            for p, g in zip(blk.parameters(), mixed, strict=True):
                grads[id(p)] = g
        return tuple(
            grads[id(p)] if id(p) in grads else torch.zeros_like(p) for p in self.parameters()
        )

    def min_eigenvalue(self) -> Tensor:
        """``lambda = min over blocks of lambda_min(M_block)`` (MetaMD appendix A.5)."""
        return torch.stack([blk.min_eigenvalue() for _, blk in self._metric_blocks()]).min()

    def frobenius_distance_to_identity(self) -> Tensor:
        """``||M - I||_F`` over all blocks (MetaMD appendix A.4), from trace identities."""
        sq = torch.stack(
            [blk.squared_distance_to_identity() for _, blk in self._metric_blocks()]
        ).sum()
        # d sqrt(x)/dx is infinite at 0: use sqrt(max(x, tiny)) for a finite gradient
        return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()

    # --- inspection ----------------------------------------------------------------------
    def dense(self) -> Tensor:
        """Dense ``P`` over all parameters in ``named_parameters()`` order (tests only).

        Each parameter is flattened row-major; skipped parameters get identity blocks.
        """
        sizes = {n: int(torch.Size(s).numel()) for n, s in self.param_shapes.items()}
        offsets, pos = {}, 0
        for n in self.param_names:
            offsets[n] = pos
            pos += sizes[n]
        ref = next(self.parameters())
        out = torch.eye(pos, dtype=ref.dtype, device=ref.device)
        for view in self.views:
            dense_block = self.block(view).dense()
            # index of each matrix entry (row-major over (out, in)) in the flat vector
            idx_mats = {
                n: (torch.arange(sizes[n], device=ref.device) + offsets[n]).reshape(s)
                for n, s in zip(view.params, view.param_shapes, strict=True)
            }
            idx = view.to_matrix(idx_mats).reshape(-1)
            out[idx.unsqueeze(1), idx.unsqueeze(0)] = dense_block
        return out

    def num_meta_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def layer_shapes(self) -> dict[str, list[int]]:
        """``{view name: [out, in]}``, for file metadata and validation."""
        return {v.name: list(v.shape) for v in self.views}

    def extra_repr(self) -> str:
        return f"family={self.family_name!r}, blocks={len(self.views)}, skip={self.skip!r}"


def _as_diag_views(views: list[LayerView]) -> list[LayerView]:
    out = []
    for v in views:
        for pname, shape in zip(v.params, v.param_shapes, strict=True):
            numel = int(torch.Size(shape).numel())
            out.append(
                LayerView(
                    name=pname,
                    kind="diag",
                    weight=pname,
                    bias=None,
                    shape=(1, numel),
                    param_shapes=(shape,),
                )
            )
    return out
