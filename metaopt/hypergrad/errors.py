"""The exception every engine raises when a hypergradient term is not finite."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["NonFiniteHypergradient", "check_finite"]


class NonFiniteHypergradient(FloatingPointError):
    """A term of a hypergradient contains NaN or Inf.

    ``term`` names the term (``"direct"``, ``"outer_grad"``, ``"inverse_hvp"``, ``"mixed"``,
    ``"hypergradient"``, ``"tangent"``, ...). Learners catch this and skip the meta-step.
    """

    def __init__(self, term: str, detail: str = "") -> None:
        self.term = term
        msg = f"non-finite hypergradient term {term!r}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


def check_finite(tensors: Sequence[Tensor], term: str) -> None:
    """Raise :class:`NonFiniteHypergradient` naming ``term`` unless all entries are finite.

    One host sync per call (a single reduction over all tensors), made once per
    hypergradient term, never inside an iteration.
    """
    if not tensors:
        return
    flags = torch.stack([torch.isfinite(t).all() for t in tensors])
    if not bool(flags.all()):
        bad = [i for i, ok in enumerate(flags.tolist()) if not ok]
        raise NonFiniteHypergradient(term, f"tensor(s) {bad} of {len(tensors)}")
