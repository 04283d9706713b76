"""MetaMD's "bregman-rate" objective against dense matrices; configs and task sources."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from metaopt import MetaContext
from metaopt.kron import KroneckerPreconditioner
from metaopt.learners import MetaMD, MetaMDConfig, MetaSGD, preset_config
from metaopt.learners.metamd import draw_generator
from metaopt.objectives import evaluate_meta_objective
from tests._metamd_tasks import RegressionFamily, regression_task


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()


def _random_pre(model, learn_scale):
    pre = KroneckerPreconditioner.for_model(model, "lowrank", rank=2, learn_scale=learn_scale)
    pre.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pre.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
    return pre


def _flat(params):
    return torch.cat([t.reshape(-1) for t in params.values()])


@pytest.mark.parametrize("learn_scale", [False, True])
def test_bregman_rate_equals_dense_computation(learn_scale):
    model = _model()
    pre = _random_pre(model, learn_scale)
    g = torch.Generator().manual_seed(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = {n: t + torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in before.items()}
    ctx = MetaContext(params_before=before, params_after=after, preconditioner=pre)
    k_lambda, gamma = 0.3, 0.05
    value = evaluate_meta_objective("bregman-rate", ctx, k_lambda=k_lambda, gamma=gamma)

    # oracle: dense M = P^{-1} over all parameters in named_parameters order
    M = torch.linalg.inv(pre.dense())
    delta = _flat(after) - _flat(before)
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    lam = torch.linalg.eigvalsh(0.5 * (M + M.T))[0]
    expected = 0.5 * delta @ M @ delta + k_lambda / lam + gamma * torch.linalg.norm(M - eye)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)


def test_bregman_rate_gradient_matches_dense_autograd():
    model = _model()
    pre = _random_pre(model, True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = {n: t + 0.5 for n, t in before.items()}
    ctx = MetaContext(params_before=before, params_after=after, preconditioner=pre)
    value = evaluate_meta_objective("bregman-rate", ctx, k_lambda=0.0, gamma=0.1)
    grads = torch.autograd.grad(value, list(pre.parameters()))
    M = torch.linalg.inv(pre.dense())
    delta = _flat(after) - _flat(before)
    dense = 0.5 * delta @ M @ delta + 0.1 * torch.linalg.norm(M - torch.eye(M.shape[0]).double())
    expected = torch.autograd.grad(dense, list(pre.parameters()))
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_bregman_rate_needs_a_preconditioner():
    p = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="ctx.preconditioner"):
        evaluate_meta_objective("bregman-rate", MetaContext(params_before=p, params_after=p))


def _quadratic_ctx(theta, with_task=True):
    """``log-final-loss`` context on ``f = theta^T Q theta - b^T theta`` (a real task)."""
    from metaopt.func import functional_forward
    from tasks import get_family

    q = torch.tensor([0.5, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    task = get_family("meta-quadratics", dtype=torch.float64).task(q, b)
    model = task.make_model(0)
    fstar = float(-(b * b / q).sum() / 4)
    ctx = MetaContext(
        params_before={"theta": torch.zeros(2, dtype=torch.float64)},
        params_after={"theta": theta},
        forward=functional_forward(model),
        loss=task.loss,
        batch=next(task.train_batches(0)),
        extras={"task": task} if with_task else {},
    )
    t = theta.detach()
    return ctx, float(t @ (q * t) - b @ t), fstar


def test_log_final_loss_is_the_log_gap_to_the_minimum():
    theta = torch.tensor([0.3, -0.1], dtype=torch.float64)
    ctx, f, fstar = _quadratic_ctx(theta)
    value = evaluate_meta_objective("log-final-loss", ctx)  # floor from task.info
    assert float(value) == pytest.approx(math.log(f - fstar + 1e-12), rel=1e-12)
    value = evaluate_meta_objective("log-final-loss", ctx, floor=fstar - 1.0, eps=1e-3)
    assert float(value) == pytest.approx(math.log(f - fstar + 1.0 + 1e-3), rel=1e-12)
    plain, f, _ = _quadratic_ctx(theta + 10.0, with_task=False)  # no task: floor 0
    assert float(evaluate_meta_objective("log-final-loss", plain)) == pytest.approx(
        math.log(f + 1e-12), rel=1e-12
    )


def test_log_final_loss_gradient_is_the_final_loss_gradient_over_the_gap():
    theta = torch.tensor([0.3, -0.1], dtype=torch.float64, requires_grad=True)
    ctx, f, fstar = _quadratic_ctx(theta)
    (grad,) = torch.autograd.grad(evaluate_meta_objective("log-final-loss", ctx), theta)
    q = torch.tensor([0.5, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    expected = (2 * q * theta.detach() - b) / (f - fstar + 1e-12)  # closed form of grad f
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=0)


def test_log_final_loss_is_floored_at_eps_at_the_minimum():
    star = torch.tensor([1.0, -0.25], dtype=torch.float64)  # (2Q)^-1 b
    ctx, f, fstar = _quadratic_ctx(star)
    assert f == pytest.approx(fstar, abs=1e-15)
    value = evaluate_meta_objective("log-final-loss", ctx, eps=1e-10)
    assert float(value) == pytest.approx(math.log(1e-10), abs=1e-4)  # finite, not log(0)
    with pytest.raises(ValueError, match="eps=0"):
        evaluate_meta_objective("log-final-loss", ctx, eps=0)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"inner_steps": 0}, "inner_steps=0: must be an integer >= 1"),
        ({"tasks_per_step": 0}, "tasks_per_step=0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"engine": "magic"}, "engine='magic'"),
        ({"meta_optimizer": "lbfgs"}, "meta_optimizer='lbfgs'"),
        ({"meta_objective": "bregman-rate", "objective_options": {"gamma": -0.1}}, "gamma=-0.1"),
        ({"preconditioner": "kfac"}, "preconditioner='kfac'"),
        ({"inner_steps": 40, "window": 41}, "window=41: must be at most inner_steps=40"),
        ({"engine": "neumann", "window": 10}, "window=10 must be None or inner_steps"),
    ],
)
def test_config_rejects_bad_values(fields, match):
    with pytest.raises(ValueError, match=match):
        MetaMDConfig(**fields)


def test_runs_shorter_than_the_presets_window_are_one_window_each():
    """The default recipe cuts its 300-step runs into 20-step windows; asked for shorter runs
    it differentiates each whole run, while a window given explicitly is kept and checked."""
    assert (preset_config().window, preset_config().inner_steps) == (20, 300)
    assert preset_config(inner_steps=5).window is None
    assert preset_config(inner_steps=40).window == 20
    assert preset_config(inner_steps=5, window=2).window == 2
    with pytest.raises(ValueError, match="window=20: must be at most inner_steps=5"):
        preset_config(inner_steps=5, window=20)
    assert MetaMD([regression_task(0)], inner_steps=5).config.window is None


def test_ekfac_family_rejects_implicit_engines():
    with pytest.raises(
        ValueError, match="explicit metric M .*preconditioner='ekfac-shaped' has none"
    ):
        MetaMD([regression_task(0)], preset="metamd-paper", preconditioner="ekfac-shaped")


def test_rank_below_one_or_larger_than_a_layer_is_rejected():
    task = regression_task(0, d=4, out=2)
    with pytest.raises(ValueError, match="rank=0: must be a positive integer"):
        MetaMD([task], preconditioner="lowrank", preconditioner_options={"rank": 0})
    with pytest.raises(ValueError, match="layer .*: rank=3 is larger than a 2x5 block"):
        MetaMD([task], preconditioner="lowrank", preconditioner_options={"rank": 3})


def test_bad_task_source_is_rejected():
    with pytest.raises(ValueError, match="task family"):
        MetaMD(42)
    with pytest.raises(ValueError, match="task list is empty"):
        MetaMD([])


def _draws(learner, step):
    """``(task name, init seed, data seed)`` of every run drawn at meta-step ``step``."""
    runs = [learner._draw(i, step) for i in range(learner.config.tasks_per_step)]
    return [(r.task.name, r.init_seed, r.data_seed) for r in runs]


def test_tasks_and_seeds_depend_on_seed_and_step_only():
    family = RegressionFamily()
    a = MetaMD(family, tasks_per_step=3, seed=5)
    b = MetaMD(family, tasks_per_step=3, seed=5)
    torch.manual_seed(123)  # global RNG must not matter
    draws_a = _draws(a, 7)
    torch.manual_seed(999)
    draws_b = _draws(b, 7)
    assert draws_a == draws_b
    assert len(set(draws_a)) == 3  # the runs of one step differ
    assert draws_a != _draws(a, 8)
    c = MetaSGD(family, tasks_per_step=3, seed=6)
    assert draws_a != _draws(c, 7)
    g1, g2 = draw_generator(5, 7, 1), draw_generator(5, 7, 1)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_list_source_draws_every_task_uniformly():
    """Each run draws its task uniformly from the list (so k may exceed the list): over
    200 draws every one of 5 tasks comes up 40 +- 20 times (3.5 binomial sigmas)."""
    tasks = [regression_task(i) for i in range(5)]
    learner = MetaMD(tasks, tasks_per_step=8)
    names = [name for step in range(25) for name, _, _ in _draws(learner, step)]
    counts = {t.name: names.count(t.name) for t in tasks}
    assert sum(counts.values()) == 200
    assert all(20 <= n <= 60 for n in counts.values()), counts


def test_metamd_paper_preset_is_the_papers():
    learner = MetaMD([regression_task(0)], preset="metamd-paper", tasks_per_step=1)
    cfg = learner.config
    assert (cfg.preconditioner, cfg.rule, cfg.engine, cfg.meta_objective, cfg.meta_optimizer) == (
        "rank1",
        "sgd",
        "neumann",
        "bregman-rate",
        "adam",
    )
    assert (cfg.window, cfg.inner_steps, cfg.lr) == (None, 100, 0.1)
    assert cfg.engine_options == {"iterations": 20, "alpha": 0.5}
    # another engine does not inherit Neumann's options
    other = MetaMD([regression_task(0)], preset="metamd-paper", tasks_per_step=1, engine="cg")
    assert other.config.engine_options == {}
    blocks = list(learner.preconditioner.blocks.values())
    assert all(b.rank == 1 for b in blocks)
    assert torch.is_tensor(learner.preconditioner.dense())
    assert MetaMD([regression_task(0)]).config.preset == "kron-adamw"  # the default recipe


def test_learn_scale_needs_the_lowrank_family():
    with pytest.raises(ValueError, match=r"family 'diag': unknown option\(s\) \['learn_scale'\]"):
        MetaMDConfig(preconditioner="diag", preconditioner_options={"learn_scale": True})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            {"preconditioner_options": {"learn_scale": "maybe"}},
            "learn_scale='maybe': must be true or false",
        ),
        ({"preconditioner_options": {"learn_scale": 1}}, "learn_scale=1: must be true or false"),
        ({"preconditioner_options": {"init_scale": "big"}}, "init_scale='big': must be float"),
    ],
)
def test_the_python_api_refuses_values_of_the_wrong_type(overrides, needle):
    """The annotations (``LowRankFamily(learn_scale: bool, init_scale: float)``, the config's
    ``preset: str``) are the contract: a truthy string is not a boolean."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        MetaMD([regression_task(0)], **overrides)
    with pytest.raises(ValueError, match=re.escape(needle)):
        MetaMDConfig(**overrides)
    with pytest.raises(ValueError, match=re.escape("preset=3: must be str")):
        MetaMDConfig(preset=3)
