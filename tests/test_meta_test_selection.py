"""Selection in ``run_comparison``: multi-seed aggregates, the tuning horizon, steps to a
target, and ties, against hand-made tables and curves (``meta_test.selection``).

The trainers here do not learn: their builder sets the model to a weight read from a table
(so the validation metric is a number chosen by hand) and their step returns a hand-made
training-loss curve, so every expected selection is computed by hand from the tables.
"""

import json
import math
import re
import statistics

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tasks
from meta_test import Dim, SearchSpace, run_comparison
from meta_test.cli import build_parser, main
from meta_test.search import Score, run_search
from meta_test.specs import register_spec

REG = "meta-test-selection-reg"  # MSE task: x = 1, y = 0, so val MSE = w^2 exactly
CLS = "meta-test-selection-cls"  # 2 classes: x = 1, y = 0, so accuracy = [w0 > w1]


@tasks.register_task(REG)
def _reg() -> tasks.Task:
    d = TensorDataset(torch.ones(8, 1), torch.zeros(8, 1))
    return tasks.Task(REG, lambda: nn.Linear(1, 1, bias=False), nn.functional.mse_loss, "mse",
                      d, d, d, batch_size=4)  # fmt: skip


@tasks.register_task(CLS)
def _cls() -> tasks.Task:
    d = TensorDataset(torch.ones(8, 1), torch.zeros(8, dtype=torch.long))
    return tasks.Task(CLS, lambda: nn.Linear(1, 2, bias=False), nn.functional.cross_entropy,
                      "accuracy", d, d, d, batch_size=4)  # fmt: skip


SEEDS = (0, 1, 2)
SEED_OF = {_reg().make_model(s).weight.item(): s for s in SEEDS}  # the seed, by its init
DIVERGED = None  # a table entry: the run's loss turns infinite


class TableTrainer:
    """Replays ``curve`` as its training losses (``inf`` from ``diverge_at`` on)."""

    num_meta_parameters = 0

    def __init__(self, curve, diverge_at=None):
        self.curve, self.diverge_at, self.t = curve, diverge_at, 0
        STEPS.append(0)

    def step(self, batch, draw_batch):
        t, self.t = self.t, self.t + 1
        STEPS[-1] += 1
        if self.diverge_at is not None and t >= self.diverge_at:
            return torch.tensor(math.inf, dtype=torch.float64)
        return torch.tensor(self.curve[min(t, len(self.curve) - 1)], dtype=torch.float64)

    def hparam_log(self):
        return {}


STEPS: list[int] = []  # steps taken by each trainer built, in build order
#: (lr, seed) -> the weight w the run ends at (val MSE w^2), or DIVERGED
WEIGHTS = {
    (0.1, 0): 0.125, (0.1, 1): DIVERGED, (0.1, 2): DIVERGED,  # best single run, median inf
    (0.05, 0): 0.25, (0.05, 1): 0.25, (0.05, 2): 0.75,  # median 0.0625, mean 0.2291666
    (0.01, 0): 0.375, (0.01, 1): 0.375, (0.01, 2): 0.375,  # median = mean = 0.140625
}  # fmt: skip
LRS = (0.1, 0.05, 0.01)


def _weight_builder(spec, model, task, hp):
    w = WEIGHTS[hp["lr"], SEED_OF[model.weight.item()]]
    with torch.no_grad():
        model.weight.fill_(0.0 if w is None else w)
    return TableTrainer([1.0], diverge_at=0 if w is None else None)


register_spec("test-weights", _weight_builder, replace=True,
              search_space=SearchSpace((Dim("lr", LRS),)))  # fmt: skip


def _mse(lr: float, seed: int) -> float:
    w = WEIGHTS[lr, seed]
    return math.inf if w is None else w * w


def _compare(**kw):
    return run_comparison(REG, ["test-weights"], steps=3, seeds=[0], hpo="grid", **kw)


@pytest.mark.parametrize(
    ("kw", "aggregate", "best"),
    [
        ({}, None, 0.1),  # one seed (seed 0): the lucky run wins
        ({"search_seeds": SEEDS}, statistics.median, 0.05),
        ({"search_seeds": SEEDS, "search_aggregate": "mean"}, statistics.fmean, 0.01),
    ],
)
def test_configurations_score_the_aggregate_of_their_seeds(kw, aggregate, best) -> None:
    r = _compare(**kw)["optimizers"]["test-weights"]
    assert r["hparams"] == {"lr": best}
    for trial in r["search"]["trials"]:
        lr = trial["config"]["lr"]
        if aggregate is None:
            expected = _mse(lr, 0)
            assert trial["seed_values"] == {"0": None if math.isinf(expected) else expected}
        else:
            expected = aggregate([_mse(lr, s) for s in SEEDS])  # a diverged seed is +inf
            assert set(trial["seed_values"]) == {"0", "1", "2"}
        assert trial["value"] == (None if math.isinf(expected) else pytest.approx(expected))
    if aggregate is not None:  # hand-computed: median 0.0625 (lr 0.05); mean 0.140625 (0.01)
        assert r["search"]["best_value"] == {0.05: 0.0625, 0.01: 0.140625}[best]


def test_search_seeds_are_checked_and_recorded() -> None:
    res = _compare(search_seeds=[2, 1])
    assert res["protocol"]["search_seeds"] == [2, 1] and res["protocol"]["search_seed"] == 2
    assert res["protocol"]["search_aggregate"] == "median"
    for bad, match in [
        ({"search_seeds": []}, "search_seeds=\\[\\]: must be distinct"),
        ({"search_seeds": [1, 1]}, "must be distinct"),
        ({"search_seeds": [0], "search_seed": 0}, "give one of them"),
        ({"search_aggregate": "mode"}, "search_aggregate='mode': must be one of"),
        ({"search_steps": 0}, "search_steps=0: must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            _compare(**bad)


def test_search_trials_train_search_steps_and_reported_runs_train_steps() -> None:
    STEPS.clear()
    res = _compare(search_steps=2, search_seeds=[0, 1])
    r = res["optimizers"]["test-weights"]
    # build order: one throwaway build to validate the spec; 3 configs x 2 seeds of
    # search_steps (lr 0.1 on seed 1 diverges at its first step and stops there); then the
    # selected configuration (lr 0.05: median 0.0625) on the reported seed for `steps`
    assert STEPS == [0, 2, 1, 2, 2, 2, 2, 3]
    assert r["hparams"] == {"lr": 0.05}
    assert res["protocol"]["search_steps"] == 2 and res["steps"] == 3
    assert r["curves"]["steps"][-1] == 2  # the reported curve has 3 steps (0, 1, 2)


SPLIT = "meta-test-selection-split"  # train targets 0, validation targets 1


@tasks.register_task(SPLIT)
def _split() -> tasks.Task:
    x = torch.ones(8, 1)
    train, val = TensorDataset(x, torch.zeros(8, 1)), TensorDataset(x, torch.ones(8, 1))
    return tasks.Task(SPLIT, lambda: nn.Linear(1, 1, bias=False), nn.functional.mse_loss,
                      "mse", train, val, val, batch_size=4)  # fmt: skip


def test_train_loss_selects_on_the_training_split() -> None:
    # lr 0.05 ends at w = 0.25 on seed 0 (train MSE 0.0625, val MSE 0.5625), lr 0.01 at
    # w = 0.375 (train 0.140625, val 0.390625): the splits disagree
    kw = dict(steps=2, seeds=[0], grids={"lr": (0.05, 0.01)})
    on_train = run_comparison(SPLIT, ["test-weights"], select_on="train-loss", **kw)
    on_val = run_comparison(SPLIT, ["test-weights"], **kw)
    assert on_train["optimizers"]["test-weights"]["hparams"] == {"lr": 0.05}
    assert on_train["optimizers"]["test-weights"]["search"]["best_value"] == 0.0625
    assert on_train["protocol"]["select_on"] == "train_loss"
    assert on_val["optimizers"]["test-weights"]["hparams"] == {"lr": 0.01}
    assert on_val["optimizers"]["test-weights"]["search"]["best_value"] == 0.390625


def test_spaces_replace_a_specs_search_space_under_its_query() -> None:
    space = SearchSpace((Dim("momentum", (0.0, 0.5)), Dim("lr", (0.1, 0.3))), {"nesterov": False})
    res = run_comparison(REG, ["sgd", "sgd?lr=0.2"], steps=2, seeds=[0], allow_unequal_budget=True,
                         spaces={"sgd": space, "SGD?lr=0.2": space})  # fmt: skip
    configs = [t["config"] for t in res["optimizers"]["sgd"]["search"]["trials"]]
    assert configs == [{"nesterov": False, "momentum": m, "lr": lr}
                       for m in (0.0, 0.5) for lr in (0.1, 0.3)]  # fmt: skip
    fixed = [t["config"] for t in res["optimizers"]["sgd?lr=0.2"]["search"]["trials"]]
    assert fixed == [{"nesterov": False, "lr": 0.2, "momentum": m} for m in (0.0, 0.5)]
    with pytest.raises(ValueError, match=r"spaces: \['adam'\] are not among the specs"):
        run_comparison(REG, ["sgd"], steps=2, seeds=[0], spaces={"adam": space})


# --- steps to a target -----------------------------------------------------------------------
TARGET = 0.1
#: lr -> training-loss curve; None: diverges at step 2
CURVES = {
    1.0: [0.9, 0.5, 0.2, 0.1, 0.06, 0.05],  # reaches at step 3, ends at 0.05
    2.0: [0.9, 0.4, 0.3, 0.09, 0.02, 0.01],  # reaches at step 3 too, ends lower: wins the tie
    3.0: [0.9, 0.8, 0.7, 0.5, 0.3, 0.08, 0.2, 0.3],  # reaches at 5, ends at 0.3 (bounces up)
    4.0: [0.9, 0.5, 0.2, 0.2, 0.2, 0.2],  # never reaches, ends at 0.2
    5.0: [0.9, 0.5, 0.16, 0.15, 0.15, 0.15],  # never reaches, ends at 0.15
    6.0: None,
}


def _curve_builder(spec, model, task, hp):
    curve = CURVES[hp["lr"]]
    return TableTrainer(curve or [0.01], diverge_at=2 if curve is None else None)


register_spec("test-curves", _curve_builder, replace=True,
              search_space=SearchSpace((Dim("lr", tuple(CURVES)),)))  # fmt: skip


@pytest.mark.parametrize(
    ("lrs", "search_steps", "best"),
    [
        ((1.0, 2.0, 3.0, 4.0, 5.0, 6.0), None, 2.0),  # fewest steps; the tie by final loss
        ((3.0, 4.0, 5.0, 6.0), None, 3.0),  # reaching ranks first, whatever its final loss
        ((4.0, 5.0, 6.0), None, 5.0),  # none reaches: the lowest final loss
        ((6.0,), None, 6.0),  # only a diverged one: it is still the (only) choice
        ((3.0, 5.0), 5, 5.0),  # within a 5-step horizon 3.0 never reaches and ends at 0.3
    ],
)
def test_steps_to_target_selects_the_fewest_steps_then_the_final_loss(
    lrs, search_steps, best
) -> None:
    res = run_comparison(REG, ["test-curves"], steps=8, seeds=[0], hpo="grid",
                         grids={"lr": lrs}, select_on="steps-to-target", target_loss=TARGET,
                         search_steps=search_steps)  # fmt: skip
    r = res["optimizers"]["test-curves"]
    assert r["hparams"] == {"lr": best}
    assert res["protocol"]["select_on"] == "steps_to_target"
    horizon = search_steps or 8
    for trial in r["search"]["trials"]:
        curve = CURVES[trial["config"]["lr"]]
        if curve is None:
            assert trial["value"] is None and trial["tiebreak"] is None  # worst on both
            continue
        run = (curve + [curve[-1]] * horizon)[:horizon]  # the trainer repeats its last loss
        hit = next((i for i, v in enumerate(run) if v <= TARGET), None)
        assert trial["value"] == hit and trial["tiebreak"] == pytest.approx(run[-1])


def test_steps_to_target_needs_a_target() -> None:
    with pytest.raises(ValueError, match="select_on='steps-to-target': needs target_loss"):
        run_comparison(REG, ["sgd"], steps=2, seeds=[0], select_on="steps-to-target")
    with pytest.raises(ValueError, match="select_on='fastest': must be one of"):
        run_comparison(REG, ["sgd"], steps=2, seeds=[0], select_on="fastest")


# --- ties ------------------------------------------------------------------------------------
#: lr -> (w0, w1): accuracy [w0 > w1], validation loss log(1 + exp(w1 - w0))
LOGITS = {0.1: (1.0, 0.0), 0.2: (3.0, 0.0), 0.3: (0.0, 1.0), 0.4: (3.0, 0.0)}


def _logit_builder(spec, model, task, hp):
    with torch.no_grad():
        model.weight.copy_(torch.tensor(LOGITS[hp["lr"]]).reshape(2, 1))
    return TableTrainer([0.5])


register_spec("test-logits", _logit_builder, replace=True,
              search_space=SearchSpace((Dim("lr", tuple(LOGITS)),)))  # fmt: skip


def test_equal_accuracies_go_to_the_lower_validation_loss_then_to_grid_order() -> None:
    r = run_comparison(CLS, ["test-logits"], steps=2, seeds=[0])["optimizers"]["test-logits"]
    # accuracies 1, 1, 0, 1: lr 0.2 and 0.4 share the lowest loss log(1 + e^-3) (the same
    # logits); 0.2 comes first in the grid. Without the tie-break lr 0.1 (first) would win.
    assert r["hparams"] == {"lr": 0.2}
    values = {t["config"]["lr"]: (t["value"], t["tiebreak"]) for t in r["search"]["trials"]}
    for lr, (w0, w1) in LOGITS.items():
        assert values[lr][0] == float(w0 > w1)
        assert values[lr][1] == pytest.approx(math.log1p(math.exp(w1 - w0)), rel=1e-6)


def test_run_search_orders_ties_by_tiebreak_then_evaluation_order() -> None:
    space = SearchSpace((Dim("x", (1.0, 2.0, 3.0, 4.0)),))
    table = {1.0: Score(0.5, 0.3), 2.0: Score(0.5, 0.1), 3.0: Score(0.4), 4.0: Score(0.5, 0.1)}
    best = run_search(space, lambda c: table[c["x"]], method="grid", maximize=True).best
    assert best == {"x": 2.0}
    plain = run_search(space, lambda c: 1.0, method="grid")
    assert plain.best == {"x": 1.0}  # no tie-break: the first of the grid
    nonfinite = {1.0: math.inf, 2.0: math.nan, 3.0: math.inf, 4.0: math.inf}
    ranked = run_search(space, lambda c: Score(nonfinite[c["x"]], {3.0: 0.2}.get(c["x"])),
                        method="grid")  # fmt: skip
    assert ranked.best == {"x": 3.0} and ranked.best_value is None


# --- the command line --------------------------------------------------------------------------
def test_cli_passes_the_selection_flags(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["--task", REG, "--optimizers", "test-weights", "--steps", "3", "--seeds", "0",
            "--search-seeds", "0,1,2", "--search-aggregate", "mean", "--search-steps", "2",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["optimizers"]["test-weights"]["hparams"] == {"lr": 0.01}  # the mean's pick
    p = res["protocol"]
    assert (p["search_seeds"], p["search_aggregate"], p["search_steps"]) == ([0, 1, 2], "mean", 2)
    out2 = tmp_path / "run2"
    argv = ["--task", REG, "--optimizers", "test-curves", "--steps", "8", "--seeds", "0",
            "--select-on", "steps-to-target", "--target-loss", "0.1", "--grid", "lr=1,2,3",
            "--out", str(out2), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out2 / "results.json").read_text())["optimizers"]["test-curves"][
        "hparams"
    ] == {"lr": 2.0}
    capsys.readouterr()
    for extra, needle in [
        (["--search-aggregate", "mode"], "search_aggregate='mode'"),
        (["--search-seeds", "0,x"], "--search-seeds='0,x': must be comma-separated integers"),
        (["--search-steps", "0"], "argument --search-steps"),
        (["--select-on", "steps-to-target"], "needs target_loss (--target-loss)"),
    ]:
        bad = tmp_path / "bad"
        argv = ["--task", REG, "--optimizers", "sgd", "--steps", "2", "--out", str(bad), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
        assert not bad.exists()
    text = build_parser().format_help()  # the flags are documented in --help
    for flag in ("--search-seeds", "--search-aggregate", "--search-steps", "steps-to-target"):
        assert flag in text, flag


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"seeds": [0.5]}, "seeds[0]=0.5: must be an integer in [0, 4294967295]"),
        ({"seeds": [0, True]}, "seeds[1]=True: must be an integer"),
        ({"search_seeds": [1, 2.0]}, "search_seeds[1]=2.0: must be an integer"),
        ({"search_seed": 1.5}, "search_seed=1.5: must be an integer"),
    ],
)
def test_seeds_that_are_not_integers_are_refused_not_truncated(bad, needle) -> None:
    """``int(0.5)`` is 0: a fractional seed would silently run seed 0 (and ``True`` seed 1)."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        run_comparison(REG, ["test-weights"], steps=3, hpo="grid", **{"seeds": [0], **bad})
