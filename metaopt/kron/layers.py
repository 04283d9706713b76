"""Layer views: the one place that maps a module's parameters to a matrix and back.

Every optimizer in metaopt (KFAC, EKFAC, Shampoo, APO, MetaMD) sees a layer through a
:class:`LayerView`:

* ``"linear"``: ``nn.Linear`` -- ``G`` is ``out x in`` (``out x (in + 1)`` with a bias, the
  bias gradient being the last column, as if the input had an extra ones feature).
* ``"conv2d"``: ``nn.Conv2d`` with ``groups == 1`` -- the weight is ``out x (in*kh*kw)``
  and a bias adds a ones column, so ``G`` is ``out x (in*kh*kw + 1)``.
* ``"diag"``: everything else (norm scales and shifts, embeddings, grouped convs, lone
  biases, ...): one parameter per view, seen as a ``1 x numel`` row.

The same views also turn a layer's forward input and backward output gradient into the
``N x in`` activation matrix and ``N x out`` pre-activation-gradient matrix used for
Kronecker curvature statistics (conv patches included), so that no optimizer reshapes a
conv weight or unfolds an input on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerView", "layer_views"]

ViewKind = Literal["linear", "conv2d", "diag"]


@dataclass(frozen=True)
class LayerView:
    """How one block of parameters is seen as a matrix.

    Attributes:
        name: block name (module path for linear/conv, parameter name for diag blocks).
        kind: ``"linear"``, ``"conv2d"`` or ``"diag"``.
        weight: full parameter name of the weight (or of the lone parameter of a diag block).
        bias: full parameter name of the bias, or ``None``.
        shape: ``(out, in)`` of the matrix view, bias column included.
        param_shapes: shape of each parameter of the block, in ``params`` order.
        module: the module, for hooks (``None`` for diag blocks).
    """

    name: str
    kind: ViewKind
    weight: str
    bias: str | None
    shape: tuple[int, int]
    param_shapes: tuple[tuple[int, ...], ...]
    module: nn.Module | None = None

    @property
    def params(self) -> tuple[str, ...]:
        """Full parameter names covered by this view, weight first."""
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    # --- parameters / gradients <-> matrix -------------------------------------------
    def column_blocks(self, tensors: Mapping[str, Tensor]) -> list[Tensor]:
        """The matrix as column blocks without copying: ``[W (out x k)]`` or
        ``[W (out x k), b (out x 1)]`` (views of contiguous tensors, so in-place updates of
        the blocks update the tensors)."""
        return self.blocks_of([tensors[n] for n in self.params])

    def blocks_of(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """``column_blocks`` for the block's tensors given in ``params`` order."""
        w = tensors[0]
        if self.kind == "diag":
            return [w.reshape(1, -1)]
        if len(tensors) == 1:
            return [w.reshape(w.shape[0], -1)]
        return [w.reshape(w.shape[0], -1), tensors[1].reshape(-1, 1)]

    def to_matrix(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Stack this block's tensors (grads or params) into its ``out x in`` matrix."""
        blocks = self.column_blocks(tensors)
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def from_column_blocks(self, blocks: list[Tensor]) -> dict[str, Tensor]:
        """Inverse of ``column_blocks``: parameter-shaped tensors from the blocks."""
        return {
            n: b.reshape(s) for n, b, s in zip(self.params, blocks, self.param_shapes, strict=True)
        }

    def from_matrix(self, mat: Tensor) -> dict[str, Tensor]:
        """Split an ``out x in`` matrix back into this block's parameter-shaped tensors."""
        if self.bias is None:
            return {self.weight: mat.reshape(self.param_shapes[0])}
        return {
            self.weight: mat[:, :-1].reshape(self.param_shapes[0]),
            self.bias: mat[:, -1].reshape(self.param_shapes[1]),
        }

    # --- curvature statistics ----------------------------------------------------------
    def input_matrix(self, inp: Tensor) -> Tensor:
        """Layer input -> ``N x in`` activations (conv patches; ones column for a bias).

        ``inp`` is the module's forward input: ``(..., in)`` for linear, ``(B, C, H, W)``
        for conv (``N = B * positions``).
        """
        if self.kind == "linear":
            a = inp.reshape(-1, inp.shape[-1])
        elif self.kind == "conv2d":
            conv = self.module
            assert isinstance(conv, nn.Conv2d)
            pads = _conv_padding(conv)
            padding: tuple[int, ...] | int = tuple(before for before, _ in pads)
            if conv.padding_mode != "zeros" or any(a != b for a, b in pads):
                # F.pad wants (left, right, top, bottom): the (h, w) pairs reversed
                mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
                inp = F.pad(inp, tuple(x for pair in reversed(pads) for x in pair), mode=mode)
                padding = 0
            patches = F.unfold(
                inp,
                conv.kernel_size,
                dilation=conv.dilation,
                padding=padding,
                stride=conv.stride,
            )  # (B, C*kh*kw, L)
            a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        else:
            raise ValueError(f"layer {self.name!r}: diag blocks have no activation matrix")
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return a

    def output_grad_matrix(self, grad_out: Tensor) -> Tensor:
        """Gradient w.r.t. the layer output -> ``N x out`` matrix.

        ``grad_out`` is ``(..., out)`` for linear and ``(B, out, H', W')`` for conv.
        """
        if self.kind == "linear":
            return grad_out.reshape(-1, grad_out.shape[-1])
        if self.kind == "conv2d":
            # (B, out, H', W') -> (B, H'*W', out): same position order as F.unfold
            return grad_out.flatten(2).transpose(1, 2).reshape(-1, grad_out.shape[1])
        raise ValueError(f"layer {self.name!r}: diag blocks have no output-gradient matrix")

    def positions(self, grad_out: Tensor) -> int:
        """Spatial positions per example (1 for linear)."""
        return 1 if self.kind == "linear" else grad_out.shape[-1] * grad_out.shape[-2]


def _conv_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` padding of each spatial dimension ``(h, w)`` of ``conv``.

    ``padding="same"`` pads ``dilation * (kernel - 1)`` in all, ``total // 2`` before and the
    rest after (an odd total, e.g. an even kernel, pads one more after), as ``nn.Conv2d`` does;
    ``"valid"`` pads nothing."""
    if conv.padding == "valid":
        return ((0, 0), (0, 0))
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in conv.padding)


def _kron_view(prefix: str, module: nn.Module, params: dict[str, Tensor]) -> LayerView | None:
    """A linear/conv view of ``module`` if it qualifies, else ``None``."""
    if isinstance(module, nn.Linear):
        kind: ViewKind = "linear"
    elif isinstance(module, nn.Conv2d) and module.groups == 1:
        kind = "conv2d"
    else:
        return None
    wname = f"{prefix}weight" if prefix else "weight"
    bname = f"{prefix}bias" if prefix else "bias"
    if wname not in params:
        return None
    w = params[wname]
    has_bias = module.bias is not None and bname in params
    out_dim = w.shape[0]
    in_dim = w[0].numel() + (1 if has_bias else 0)
    shapes = (tuple(w.shape),) + ((tuple(params[bname].shape),) if has_bias else ())
    return LayerView(
        name=prefix.rstrip(".") or "<root>",
        kind=kind,
        weight=wname,
        bias=bname if has_bias else None,
        shape=(out_dim, in_dim),
        param_shapes=shapes,
        module=module,
    )


def layer_views(
    model: nn.Module, skip: str | None = None, *, trainable_only: bool = True
) -> list[LayerView]:
    """Views covering every (trainable) parameter of ``model``.

    Args:
        model: the network.
        skip: regex; parameters whose full name matches (``re.search``) are left out.
            A linear/conv layer whose weight is skipped falls back to diag views for its
            remaining parameters.
        trainable_only: ignore parameters with ``requires_grad=False`` (default ``True``).

    Returns:
        Views ordered by the first appearance of their parameters in
        ``model.named_parameters()``.
    """
    pattern = re.compile(skip) if skip else None
    params = {
        n: p
        for n, p in model.named_parameters()
        if (p.requires_grad or not trainable_only) and not (pattern and pattern.search(n))
    }
    claimed: dict[str, LayerView] = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        view = _kron_view(prefix, module, params)
        if view is not None:
            for p in view.params:
                claimed[p] = view
    views: list[LayerView] = []
    seen: set[str] = set()
    for pname, p in params.items():
        view = claimed.get(pname)
        if view is None:
            view = LayerView(
                name=pname,
                kind="diag",
                weight=pname,
                bias=None,
                shape=(1, p.numel()),
                param_shapes=(tuple(p.shape),),
            )
        if view.name not in seen:
            seen.add(view.name)
            views.append(view)
    return views


def iter_view_params(views: list[LayerView]) -> Iterator[str]:
    """All parameter names covered by ``views``, in view order."""
    for v in views:
        yield from v.params
