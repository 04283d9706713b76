"""The exception every engine raises when a hypergradient term is not finite."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["FiniteGuard", "NonFiniteHypergradient", "check_finite"]


class NonFiniteHypergradient(FloatingPointError):
    """A term of a hypergradient contains NaN or Inf.

    ``term`` names the term (``"direct"``, ``"outer_grad"``, ``"inverse_hvp"``, ``"mixed"``,
    ``"hypergradient"``, ``"tangent"``, ...). Learners catch this and skip the meta-step.
    """

    def __init__(self, term: str, detail: str = "") -> None:
        self.term = term
        msg = f"non-finite hypergradient term {term!r}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


def _sums(tensors: Sequence[Tensor]) -> Tensor:
    """One sum per tensor (a NaN/Inf entry makes the sum NaN/Inf), accumulated in at
    least float32 so fp16/bf16 sums do not overflow, stacked into a 1-dim tensor."""
    return torch.stack([t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors])


class FiniteGuard:
    """Collects finiteness evidence of named terms without syncing; ``check()`` syncs once.

    ``check()`` raises :class:`NonFiniteHypergradient` naming the FIRST term added that
    is not finite (later terms usually inherit the NaN). A term whose finite entries sum
    beyond the float32/float64 range counts as non-finite too.
    """

    def __init__(self) -> None:
        self.terms: list[str] = []
        self.sums: list[Tensor] = []

    def add(self, tensors: Sequence[Tensor], term: str) -> None:
        if tensors:
            self.terms.append(term)
            self.sums.append(_sums(tensors))

    def check(self) -> None:
        if not self.sums:
            return
        device = self.sums[0].device
        sums = [s.to(device) for s in self.sums]
        if bool(torch.isfinite(torch.cat(sums)).all()):  # the one host sync
            return
        first = next(i for i, s in enumerate(sums) if not bool(torch.isfinite(s).all()))
        raise NonFiniteHypergradient(self.terms[first])


def check_finite(tensors: Sequence[Tensor], term: str) -> None:
    """Raise :class:`NonFiniteHypergradient` naming ``term`` unless all entries are finite."""
    guard = FiniteGuard()
    guard.add(tensors, term)
    guard.check()
