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


def _finite_flag(tensors: Sequence[Tensor]) -> Tensor:
    """0-dim bool: every entry finite. One sum per tensor (a NaN/Inf entry makes the sum
    NaN/Inf), accumulated in at least float32 so fp16/bf16 sums do not overflow."""
    sums = [t.sum(dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return torch.isfinite(torch.stack(sums)).all()


class FiniteGuard:
    """Collects finiteness flags of named terms without syncing; ``check()`` syncs once.

    ``check()`` raises :class:`NonFiniteHypergradient` naming the FIRST term added that
    is not finite (later terms usually inherit the NaN). A term whose finite entries sum
    beyond the float32/float64 range counts as non-finite too.
    """

    def __init__(self) -> None:
        self.terms: list[str] = []
        self.flags: list[Tensor] = []

    def add(self, tensors: Sequence[Tensor], term: str) -> None:
        if tensors:
            self.terms.append(term)
            self.flags.append(_finite_flag(tensors))

    def check(self) -> None:
        if not self.flags:
            return
        ok = torch.stack([f.to(self.flags[0].device) for f in self.flags])
        if bool(ok.all()):  # the one host sync
            return
        first = next(i for i, flag in enumerate(ok.tolist()) if not flag)
        raise NonFiniteHypergradient(self.terms[first])


def check_finite(tensors: Sequence[Tensor], term: str) -> None:
    """Raise :class:`NonFiniteHypergradient` naming ``term`` unless all entries are finite."""
    guard = FiniteGuard()
    guard.add(tensors, term)
    guard.check()
