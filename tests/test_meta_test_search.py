"""Hyperparameter search: BoTorch against a known optimum and against random search."""

import math

import pytest
import torch

from meta_test.search import run_search
from meta_test.space import LR_GRID, WD_GRID, Dim, SearchSpace, lr_wd_space

# Shifted quadratic in log10 space: minimum 0 at lr = 10^-2.3, weight decay = 10^-3.5,
# inside the box lr in [1e-4, 1], wd in [1e-6, 1e-1] (not at a Sobol corner or the centre).
LR_STAR, WD_STAR = -2.3, -3.5
BOX = SearchSpace((Dim("lr", (1e-4, 1.0)), Dim("weight_decay", (1e-6, 1e-1))))


def shifted_quadratic(config: dict) -> float:
    return (math.log10(config["lr"]) - LR_STAR) ** 2 + (
        math.log10(config["weight_decay"]) - WD_STAR
    ) ** 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_botorch_finds_the_known_minimum_and_beats_random_search(seed: int) -> None:
    torch.set_num_threads(1)
    budget = 12
    bo = run_search(BOX, shifted_quadratic, method="botorch", iterations=budget, seed=seed)
    rnd = run_search(BOX, shifted_quadratic, method="random", iterations=budget, seed=seed)
    assert len(bo.trials) == len(rnd.trials) == budget
    # stated tolerance: within 0.2 decades of the optimum in each coordinate
    assert abs(math.log10(bo.best["lr"]) - LR_STAR) < 0.2
    assert abs(math.log10(bo.best["weight_decay"]) - WD_STAR) < 0.2
    assert bo.best_value < 0.05
    assert bo.best_value < rnd.best_value
    assert bo.best_value == min(t.value for t in bo.trials)


def test_botorch_maximises_and_treats_non_finite_trials_as_worst() -> None:
    torch.set_num_threads(1)

    def score(config: dict) -> float:  # an accuracy-like objective that "diverges" at high lr
        if config["lr"] > 0.3:
            return math.nan
        return 1.0 - shifted_quadratic(config)

    res = run_search(BOX, score, method="botorch", iterations=10, maximize=True, seed=0)
    assert res.best["lr"] <= 0.3 and math.isfinite(res.best_value)
    assert res.best_value == max(t.value for t in res.trials if math.isfinite(t.value))


def test_grid_search_visits_the_papers_grid_and_picks_its_minimum() -> None:
    space = lr_wd_space()
    seen = []

    def f(c: dict) -> float:
        seen.append((c["lr"], c["weight_decay"]))
        return shifted_quadratic(c)

    res = run_search(space, f, method="grid")
    assert sorted(seen) == sorted((a, b) for a in LR_GRID for b in WD_GRID)  # MetaMD A.7
    best = min(seen, key=lambda p: shifted_quadratic({"lr": p[0], "weight_decay": p[1]}))
    assert (res.best["lr"], res.best["weight_decay"]) == best == (0.005, 0.0005)


def test_none_runs_no_trial_and_bad_method_is_rejected() -> None:
    res = run_search(lr_wd_space(momentum=0.9), shifted_quadratic, method="none")
    assert res.trials == [] and res.best == {"momentum": 0.9}
    with pytest.raises(ValueError, match="hpo='bayes'"):
        run_search(BOX, shifted_quadratic, method="bayes")
    zero = SearchSpace((Dim("weight_decay", (0.0, 1e-4)),))
    with pytest.raises(ValueError, match="low > 0"):
        run_search(zero, shifted_quadratic, method="botorch")


def test_unit_cube_round_trip_is_log_scale() -> None:
    d = Dim("lr", (1e-4, 1.0))
    assert d.to_unit(1e-2) == pytest.approx(0.5)
    assert d.from_unit(0.25) == pytest.approx(1e-3)
    lin = Dim("x", (-5.0, 10.0), log=False)
    assert lin.from_unit(lin.to_unit(2.5)) == pytest.approx(2.5)
