"""Fixed hyperparameters per spec, ``SPEC?key=value&key=value``: the values reach the
builder (against hand-written torch loops and the built objects), leave the search space,
and bad queries fail with one clear line."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_meta_test_specs import manual_losses  # the hand-written torch loop
from torch.utils.data import TensorDataset

import metaopt
import tasks
from meta_test import run_comparison, search_space
from meta_test.cli import _spec_list, main
from meta_test.runs import run_training
from meta_test.space import LR_GRID, WD_GRID
from meta_test.specs import build_trainer, canonical_spec, input_files, split_spec
from metaopt.kron import KroneckerPreconditioner
from tasks import Task

TINY = "meta-test-fixed-tiny"


@tasks.register_task(TINY)
def _task(metric: str = "mse") -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    if metric == "accuracy":
        y, loss, out = (x[:, 0] > 0).long(), F.cross_entropy, 2
    else:
        y, loss, out = x @ torch.randn(4, 1, generator=g), F.mse_loss, 1
    d = TensorDataset(x, y)
    return Task("tiny-fixed", lambda: torch.nn.Linear(4, out), loss, metric, d, d, d,
                batch_size=16)  # fmt: skip


def test_split_spec_parses_toml_values_and_keeps_learned_paths() -> None:
    assert split_spec("sgdm") == ("sgdm", {})
    assert split_spec(" sgdm?momentum=0.5&nesterov=true ") == (
        "sgdm",
        {"momentum": 0.5, "nesterov": True},
    )
    assert split_spec("adam?betas=[0.8, 0.9]&eps=1e-6") == (
        "adam",
        {"betas": [0.8, 0.9], "eps": 1e-6},
    )
    assert split_spec("apo-lr:sgdm?precond_options={dense_diag_max = 4}&base=sgdm") == (
        "apo-lr:sgdm",
        {"precond_options": {"dense_diag_max": 4}, "base": "sgdm"},
    )
    assert split_spec("learned:runs/a b/x.safetensors?momentum=0.9") == (
        "learned:runs/a b/x.safetensors",
        {"momentum": 0.9},
    )
    assert input_files("learned:runs/x.safetensors?momentum=0.9") == ["runs/x.safetensors"]
    assert canonical_spec("SGDM?momentum=0.5") == "sgdm?momentum=0.5"
    for bad, needle in [
        ("sgdm?momentum", "spec 'sgdm?momentum' 'momentum': write KEY=VALUE"),
        ("sgdm?momentum=0.5&momentum=0.9", "momentum: given twice"),
        ('sgdm?x={"a": 1}', "is not a value"),
        ("nope?lr=1", "optimizer spec='nope?lr=1' is unknown"),
    ]:
        with pytest.raises(ValueError, match=needle.replace("?", r"\?").replace("{", r"\{")):
            search_space(bad)


def test_a_fixed_momentum_reaches_the_optimizer_and_beats_the_trials_value() -> None:
    task = _task()
    ref = manual_losses(task, lambda m: torch.optim.SGD(m.parameters(), 0.05, 0.5), 12, seed=1)
    for hp in ({"lr": 0.05}, {"lr": 0.05, "momentum": 0.9}):  # the fixed 0.5 wins over 0.9
        r = run_training(task, "sgdm?momentum=0.5", hp, seed=1, steps=12, log_every=4)
        assert r.train_loss == pytest.approx(ref, rel=1e-6)
    plain = run_training(task, "sgdm", {"lr": 0.05}, seed=1, steps=12, log_every=4)
    assert plain.train_loss != pytest.approx(ref, rel=1e-6)  # sgdm's own momentum is 0.9


def test_a_fixed_value_leaves_the_search_space() -> None:
    space = search_space("sgd?lr=0.05&momentum=0.5")
    assert space.names == ["weight_decay"] and space.fixed == {"lr": 0.05, "momentum": 0.5}
    assert [p["lr"] for p in space.grid_points()] == [0.05] * len(WD_GRID)
    res = run_comparison(_task(), ["sgd?lr=0.05", "sgd"], steps=3, seeds=[0],
                         allow_unequal_budget=True)  # fmt: skip
    fixed, tuned = res["optimizers"]["sgd?lr=0.05"], res["optimizers"]["sgd"]
    assert {t["config"]["lr"] for t in fixed["search"]["trials"]} == {0.05}
    assert fixed["search"]["budget"] == len(WD_GRID) and fixed["hparams"]["lr"] == 0.05
    assert tuned["search"]["budget"] == len(LR_GRID) * len(WD_GRID)  # the same name, unfixed
    assert res["protocol"]["fixed"]["sgd?lr=0.05"] == {"lr": 0.05}
    assert res["protocol"]["grids"]["sgd?lr=0.05"] == {"weight_decay": list(WD_GRID)}
    with pytest.raises(ValueError, match="grid sizes differ"):  # the equal budget still holds
        run_comparison(_task(), ["sgd?lr=0.05", "sgd"], steps=3, seeds=[0])


def test_apo_fixed_values_reach_the_apo_config() -> None:
    task = _task("accuracy")
    model = task.make_model(0)
    trainer = build_trainer("apo-precond?warmup=7&lambda_wsd=0.3", model, task,
                            {"lambda_fsd": 0.1, "lambda_wsd": 3.0})  # fmt: skip
    config = trainer.apo.config
    assert (config.warmup, config.lambda_fsd, config.lambda_wsd) == (7, 0.1, 0.3)
    assert search_space("apo-precond?lambda_wsd=0.3").names == ["lambda_fsd"]
    bad = "apo-lr:sgdm?no_such_field=1"
    with pytest.raises(ValueError, match="not APOConfig fields"):
        run_comparison(task, [bad], steps=2, seeds=[0], hpo="none")


def test_learned_with_fixed_momentum_is_sgd_momentum(tmp_path) -> None:
    task = _task()
    pre = KroneckerPreconditioner.for_model(task.make_model(0), "scalar")  # the identity
    path = tmp_path / "learned.safetensors"
    metaopt.save_learned_optimizer(metaopt.LearnedOptimizer(pre, "sgd", {}, 0.2), path)
    spec = f"learned:{path}?momentum=0.5"
    r = run_training(task, spec, {"lr": 0.1}, seed=2, steps=10, log_every=5)
    ref = manual_losses(task, lambda m: torch.optim.SGD(m.parameters(), 0.1, 0.5), 10, seed=2)
    assert r.train_loss == pytest.approx(ref, rel=1e-5)
    assert search_space(spec).names == ["lr", "weight_decay"]  # momentum is not tuned
    assert search_space(f"learned:{path}?lr=0.05").names == ["weight_decay"]


def test_cli_specs_with_queries(tmp_path) -> None:
    assert _spec_list("sgd, adam?betas=[0.8,0.9]&eps=1e-6,sgdm?momentum=0.5") == [
        "sgd",
        "adam?betas=[0.8,0.9]&eps=1e-6",
        "sgdm?momentum=0.5",
    ]
    assert _spec_list('apo-lr:sgdm?x="a,b",sgd') == ['apo-lr:sgdm?x="a,b"', "sgd"]
    out = tmp_path / "run"
    argv = ["--task", TINY, "--optimizers", "sgdm,sgdm?momentum=0.5", "--steps", "3",
            "--seeds", "0", "--hpo", "none", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["optimizers"]["sgdm?momentum=0.5"]["hparams"] == {"momentum": 0.5}
    assert res["optimizers"]["sgdm"]["hparams"] == {}
