"""APO specs in the evaluation harness: parsing, building through the registry, a run."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from meta_test import specs
from meta_test.apo_specs import APOTrainer, parse_spec, search_space
from meta_test.specs import build_trainer
from tasks.base import Task


def _task(metric="accuracy"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    if metric == "accuracy":
        y, loss, out = (x[:, 0] > 0).long(), F.cross_entropy, 2
    else:
        y, loss, out = x[:, :1] * 2.0, F.mse_loss, 1
    data = TensorDataset(x, y)
    return Task(
        name="tiny",
        model_fn=lambda: torch.nn.Sequential(
            torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, out)
        ),
        loss_fn=loss,
        metric=metric,
        train=data,
        val=data,
        test=data,
        batch_size=10,
    )


@pytest.mark.parametrize(
    "spec,adapt,base",
    [
        ("apo-lr:sgdm", "lr", "sgdm"),
        ("apo-layer-lr:adam", "layer-lr", "adam"),
        ("apo-rmsprop-eps-rho", "rmsprop-eps-rho", "rmsprop"),
        ("apo-kfac-damping", "kfac-damping", "kfac"),
        ("apo-precond", "precond", "sgdm"),
    ],
)
def test_every_spec_builds_through_the_registry_and_trains(spec, adapt, base):
    task = _task()
    model = task.make_model(0)
    trainer = build_trainer(spec, model, task, {"meta_interval": 2, "warmup": 3})
    assert isinstance(trainer, APOTrainer)
    cfg = trainer.apo.config
    assert (cfg.adapt, cfg.base, cfg.fsd) == (adapt, base, "kl")
    stream = task.train_batches(0)
    draws = []

    def draw():
        draws.append(1)
        return next(stream)

    losses = [trainer.step(next(stream), draw) for _ in range(6)]
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses)
    assert len(draws) == 3  # B' drawn on meta steps only
    assert trainer.num_meta_parameters == sum(
        p.numel() for p in trainer.apo.rule.meta_parameters().values()
    )
    assert isinstance(trainer.hparam_log(), dict)


def test_precond_warm_up_base_comes_from_hparams():
    task = _task()
    trainer = build_trainer("apo-precond", task.make_model(0), task, {"base": "adam"})
    assert trainer.apo.config.base == "adam"


def test_regression_tasks_default_to_mse_fsd_and_paper_initial_lrs():
    task = _task("mse")
    trainer = build_trainer("apo-lr:rmsprop", task.make_model(0), task, {})
    assert trainer.apo.config.fsd == "mse" and trainer.apo.config.lr == 3e-4
    assert build_trainer("apo-lr:sgd", task.make_model(0), task, {}).apo.config.lr == 0.1


@pytest.mark.parametrize("spec", ["apo-lr", "apo-lr:lbfgs", "apo-kfac-damping:sgd", "apo-x"])
def test_bad_specs_are_value_errors(spec):
    task = _task()
    with pytest.raises(ValueError):
        parse_spec(spec) if spec != "apo-lr:lbfgs" else build_trainer(
            spec, task.make_model(0), task, {}
        )


def test_unknown_hparam_is_a_value_error_naming_it():
    task = _task()
    with pytest.raises(ValueError, match="bogus"):
        build_trainer("apo-lr:sgd", task.make_model(0), task, {"bogus": 1})


def test_search_spaces_follow_the_paper_grids():
    assert search_space("apo-lr:sgdm").names == ["lambda_fsd"]
    # appendix C.3-C.5's 2 x 4 grid plus 0.03 on each axis: the 15 points of every lr x wd grid
    precond = search_space("apo-precond")
    assert {d.name: d.grid for d in precond.dims} == {
        "lambda_fsd": (0.3, 0.1, 0.03),
        "lambda_wsd": (3.0, 1.0, 0.3, 0.1, 0.03),
    }
    assert precond.grid_size() == specs.search_space("sgdm").grid_size() == 15


def test_run_comparison_runs_an_apo_spec_end_to_end():
    from meta_test import run_comparison

    res = run_comparison(_task(), ["apo-lr:sgd"], steps=20, seeds=(0,), hpo="none")
    assert "apo-lr:sgd" in str(res)
