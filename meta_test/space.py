"""Search spaces: which hyperparameters a spec tunes, their grid and their search box.

A :class:`Dim` is one tuned hyperparameter: the values a grid search sweeps and the box a
Bayesian search explores (by default the grid's range, on a log10 scale). A
:class:`SearchSpace` is an ordered set of dims plus fixed hyperparameters that every trial
gets. Grids follow MetaMD appendix A.7: learning rates ``{0.1, 0.05, 0.01, 0.005, 0.001}``
(Adam: ``{0.3, 0.2, 0.1, 0.01, 0.001}``) times weight decays ``{0.001, 0.0001, 0.0005}``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "ADAM_LR_GRID",
    "Dim",
    "LR_GRID",
    "SearchSpace",
    "WD_GRID",
    "lr_wd_space",
]

#: MetaMD appendix A.7 grids.
LR_GRID = (0.1, 0.05, 0.01, 0.005, 0.001)
ADAM_LR_GRID = (0.3, 0.2, 0.1, 0.01, 0.001)
WD_GRID = (0.001, 0.0001, 0.0005)


@dataclass(frozen=True)
class Dim:
    """One tuned hyperparameter.

    Args:
        name: the keyword the spec's builder receives (``"lr"``, ``"weight_decay"``, ...).
        grid: values swept by ``hpo="grid"`` (at least one).
        low: lower end of the box for ``hpo="botorch"`` / random search (default: the
            grid's smallest value).
        high: upper end of that box (default: the grid's largest value).
        log: search on a log10 scale (default True; needs ``low > 0``).
    """

    name: str
    grid: tuple[float, ...]
    low: float | None = None
    high: float | None = None
    log: bool = True

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"name={self.name!r}: must be a non-empty string")
        grid = tuple(float(v) for v in self.grid)
        if not grid or not all(math.isfinite(v) for v in grid):
            raise ValueError(f"{self.name}: grid={list(self.grid)!r} must be non-empty and finite")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "low", float(min(grid) if self.low is None else self.low))
        object.__setattr__(self, "high", float(max(grid) if self.high is None else self.high))
        if not self.low <= self.high:
            raise ValueError(f"{self.name}: low={self.low} must be <= high={self.high}")

    def check_box(self) -> None:
        """Raise unless the box is usable by a continuous search."""
        if self.log and not self.low > 0:
            raise ValueError(
                f"{self.name}: a log-scale search needs low > 0, got low={self.low} "
                "(give a positive range or drop 0 from the grid)"
            )

    def to_unit(self, value: float) -> float:
        """Map a value in ``[low, high]`` to ``[0, 1]`` (log10 scale when ``log``)."""
        lo, hi = self._box()
        v = math.log10(value) if self.log else value
        return 0.0 if hi == lo else (v - lo) / (hi - lo)

    def from_unit(self, u: float) -> float:
        """Inverse of :meth:`to_unit`."""
        lo, hi = self._box()
        u = min(max(u, 0.0), 1.0)
        if u in (0.0, 1.0):  # the box's own ends, exactly (no 10**log10 round-off)
            return self.low if u == 0.0 else self.high
        v = lo + u * (hi - lo)
        return 10.0**v if self.log else v

    def _box(self) -> tuple[float, float]:
        self.check_box()
        if self.log:
            return math.log10(self.low), math.log10(self.high)
        return self.low, self.high


@dataclass(frozen=True)
class SearchSpace:
    """Tuned dims (in order) plus ``fixed`` hyperparameters passed to every trial."""

    dims: tuple[Dim, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [d.name for d in self.dims]
        if len(set(names)) != len(names):
            raise ValueError(f"dims: duplicate names in {names}")
        clash = set(names) & set(self.fixed)
        if clash:
            raise ValueError(f"fixed: {sorted(clash)} are also tuned dims")
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "fixed", dict(self.fixed))

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    def grid_points(self) -> Iterator[dict[str, Any]]:
        """Every point of the grid (the product of the dims' grids), fixed values included."""
        for values in itertools.product(*(d.grid for d in self.dims)):
            yield {**self.fixed, **dict(zip(self.names, values, strict=True))}

    def grid_size(self) -> int:
        return math.prod(len(d.grid) for d in self.dims)

    def default_point(self) -> dict[str, Any]:
        """The configuration used by ``hpo="none"``: only the fixed hyperparameters (each
        tuned hyperparameter keeps its optimizer default)."""
        return dict(self.fixed)

    def from_unit(self, u: Sequence[float]) -> dict[str, Any]:
        """A configuration from a point of the unit cube ``[0, 1]^len(dims)``."""
        if len(u) != len(self.dims):
            raise ValueError(f"u: got {len(u)} coordinates for {len(self.dims)} dims")
        return {
            **self.fixed,
            **{d.name: d.from_unit(float(x)) for d, x in zip(self.dims, u, strict=False)},
        }

    def to_unit(self, config: Mapping[str, Any]) -> list[float]:
        return [d.to_unit(float(config[d.name])) for d in self.dims]

    def fix(self, values: Mapping[str, Any]) -> SearchSpace:
        """This space with ``values`` fixed: a tuned dim of the same name stops being tuned
        (the fixed value wins), and every trial gets ``values``."""
        dims = tuple(d for d in self.dims if d.name not in values)
        return SearchSpace(dims, {**self.fixed, **values})

    def override(self, grids: Mapping[str, Sequence[float]]) -> SearchSpace:
        """This space with the grids (and boxes) of the named dims replaced.

        Names that this space does not tune are ignored, so one override can serve specs
        that tune different things (``lr`` for SGD, ``alpha`` for L4).
        """
        dims = tuple(
            replace(d, grid=tuple(grids[d.name]), low=None, high=None) if d.name in grids else d
            for d in self.dims
        )
        return SearchSpace(dims, self.fixed)


def lr_wd_space(
    lr_grid: Sequence[float] = LR_GRID,
    wd_grid: Sequence[float] = WD_GRID,
    lr_name: str = "lr",
    **fixed: Any,
) -> SearchSpace:
    """The papers' learning rate (or ``lr_name``) x weight decay space."""
    return SearchSpace(
        (Dim(lr_name, tuple(lr_grid)), Dim("weight_decay", tuple(wd_grid))), fixed=fixed
    )
