"""Curve metrics against closed forms on hand-made curves."""

import math

import pytest

from meta_test.metrics import auc, mean_curve, mean_std, steps_to_target


def test_auc_linear_curve_is_the_trapezoid_closed_form() -> None:
    # y = a + (b - a) t / T on t = 0..T: area T (a + b) / 2, mean height (a + b) / 2
    a, b, T = 3.0, 1.0, 50
    ys = [a + (b - a) * t / T for t in range(T + 1)]
    assert auc(ys, normalize=False) == pytest.approx(T * (a + b) / 2, rel=1e-12)
    assert auc(ys) == pytest.approx((a + b) / 2, rel=1e-12)


def test_auc_uneven_steps_and_quadratic_trapezoid_error() -> None:
    # y = t^2 on steps 0, 1, 3: trapezoids (0+1)/2*1 + (1+9)/2*2 = 10.5
    assert auc([0.0, 1.0, 9.0], [0, 1, 3], normalize=False) == pytest.approx(10.5)
    # y = t^2 on a uniform grid of n intervals over [0, 1]: exact 1/3, trapezoid 1/3 + 1/(6 n^2)
    n = 20
    ys = [(i / n) ** 2 for i in range(n + 1)]
    assert auc(ys) == pytest.approx(1 / 3 + 1 / (6 * n**2), rel=1e-12)


def test_auc_edge_cases() -> None:
    assert auc([4.0]) == 4.0
    assert auc([1.0, math.nan, 0.5]) == math.inf
    with pytest.raises(ValueError, match="values"):
        auc([])
    with pytest.raises(ValueError, match="steps"):
        auc([1.0, 2.0], [0, 0])


def test_steps_to_target_on_geometric_and_noisy_curves() -> None:
    ys = [2.0**-t for t in range(20)]  # first t with 2^-t <= 0.01 is 7 (1/128)
    assert steps_to_target(ys, 0.01) == 7
    assert steps_to_target(ys, 1.0) == 0
    assert steps_to_target(ys, 1e-9) is None
    assert steps_to_target(ys, None) is None
    assert steps_to_target([1.0, 0.6, 0.4], 0.5, steps=[0, 10, 20]) == 20
    assert steps_to_target([1.0, math.nan, 0.1], 0.5) is None  # diverged runs never arrive


def test_mean_std_and_mean_curve() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0}
    assert mean_std([1.0, math.inf]) == {"mean": None, "std": None}
    assert mean_curve([[1.0, 3.0], [3.0, 5.0]]) == [2.0, 4.0]
    assert mean_curve([[1.0, 3.0], [3.0]]) == [2.0, math.inf]
