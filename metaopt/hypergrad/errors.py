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
    """Collects named terms of a hypergradient; ``check()`` syncs the host once.

    ``check()`` raises :class:`NonFiniteHypergradient` naming the FIRST term added that
    is not finite (later terms usually inherit the NaN). ``check(result)`` first tests
    only ``result`` (the hypergradient itself, hparam-sized: cheap) and returns when it is
    finite; otherwise it names the first non-finite term added, or ``"hypergradient"``
    when every term is finite and only the result overflowed. A term whose finite entries
    sum beyond the float32/float64 range counts as non-finite too.
    """

    def __init__(self) -> None:
        self.terms: list[tuple[str, Sequence[Tensor]]] = []

    def add(self, tensors: Sequence[Tensor], term: str) -> None:
        if tensors:
            self.terms.append((term, tuple(tensors)))

    def check(self, result: Sequence[Tensor] | None = None) -> None:
        if result is not None:
            if not result or bool(torch.isfinite(_sums(result)).all()):  # the one host sync
                return
        elif not self.terms:
            return
        sums = [_sums(t) for _, t in self.terms]
        if result is None:  # one sync over every term
            device = sums[0].device
            if bool(torch.isfinite(torch.cat([s.to(device) for s in sums])).all()):
                return
        for (term, _), s in zip(self.terms, sums, strict=True):
            if not bool(torch.isfinite(s).all()):
                raise NonFiniteHypergradient(term)
        raise NonFiniteHypergradient("hypergradient")


def check_finite(tensors: Sequence[Tensor], term: str) -> None:
    """Raise :class:`NonFiniteHypergradient` naming ``term`` unless all entries are finite."""
    guard = FiniteGuard()
    guard.add(tensors, term)
    guard.check()
