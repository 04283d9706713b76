"""Metrics of training curves and their summaries over seeds.

- :func:`auc`: area under the training-loss curve (MetaMD appendix A.13), trapezoidal,
  normalised by the step span so that it is the curve's mean height (comparable across
  budgets; a lower value means faster convergence).
- :func:`steps_to_target`: the first step at which a curve reaches a target loss.
- :func:`mean_std`: mean and sample standard deviation over seeds (non-finite values make
  both ``None``, which JSON writes as ``null``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["auc", "mean_curve", "mean_std", "steps_to_target"]


def _check_curve(values: Sequence[float], steps: Sequence[float] | None) -> list[float]:
    if len(values) < 1:
        raise ValueError("values: the curve is empty")
    if steps is None:
        return [float(i) for i in range(len(values))]
    if len(steps) != len(values):
        raise ValueError(f"steps: {len(steps)} steps for {len(values)} values")
    xs = [float(s) for s in steps]
    if any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
        raise ValueError("steps: must be strictly increasing")
    return xs


def auc(
    values: Sequence[float], steps: Sequence[float] | None = None, *, normalize: bool = True
) -> float:
    """Trapezoidal area under ``values`` over ``steps`` (default ``0, 1, ..., n-1``).

    With ``normalize=True`` (default) the area is divided by ``steps[-1] - steps[0]``; a
    one-point curve returns its value. Any non-finite value gives ``inf`` (a diverged run
    is the worst possible).
    """
    xs = _check_curve(values, steps)
    ys = [float(v) for v in values]
    if not all(math.isfinite(y) for y in ys):
        return math.inf
    if len(ys) == 1:
        return ys[0]
    area = sum(
        (x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False)
    )
    return area / (xs[-1] - xs[0]) if normalize else area


def steps_to_target(
    values: Sequence[float], target: float | None, steps: Sequence[float] | None = None
) -> int | None:
    """The first ``steps[i]`` with ``values[i] <= target``; ``None`` if never or no target.

    A non-finite value ends the curve (a diverged run never reaches the target later).
    """
    if target is None:
        return None
    xs = _check_curve(values, steps)
    for x, v in zip(xs, values, strict=False):
        if not math.isfinite(v):
            return None
        if v <= target:
            return int(x)
    return None


def mean_std(values: Sequence[float]) -> dict[str, float | None]:
    """``{"mean", "std"}`` over seeds (sample std, 0 for one seed; ``None`` if non-finite)."""
    vals = [float(v) for v in values]
    if not vals or not all(math.isfinite(v) for v in vals):
        return {"mean": None, "std": None}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std}


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Pointwise mean of equal-length curves (shorter ones, from diverged runs, are padded
    with ``inf`` so the mean is ``inf`` from where any run stopped)."""
    if not curves:
        return []
    n = max(len(c) for c in curves)
    padded = [list(map(float, c)) + [math.inf] * (n - len(c)) for c in curves]
    return [statistics.fmean(col) for col in zip(*padded, strict=False)]
