"""Synthetic tasks against their closed forms (values, gradients, minimisers, conditioning)."""

from __future__ import annotations

import pytest
import torch

import tasks
from tasks.base import Task


def _loss_and_grad(task: Task, model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, y = next(task.train_batches(0, batch_size=len(task.train)))
    loss = task.loss(model(x), y)
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return loss.detach(), [g.detach() for g in grads]


# --- Rosenbrock ------------------------------------------------------------------------------
def test_rosenbrock_value_gradient_and_minimum():
    task = tasks.get_task("rosenbrock", dtype=torch.float64)
    model = task.make_model(0)
    assert model.theta.tolist() == [1.0, -1.5]  # APO appendix D.1 start
    loss, (grad,) = _loss_and_grad(task, model)
    assert float(loss) == pytest.approx((1 - 1) ** 2 + 100 * (-1.5 - 1) ** 2)  # 625
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = (torch.randn(2, generator=g, dtype=torch.float64) * 2).tolist()
        with torch.no_grad():
            model.theta.copy_(torch.tensor([x, y], dtype=torch.float64))
        loss, (grad,) = _loss_and_grad(task, model)
        assert float(loss) == pytest.approx((1 - x) ** 2 + 100 * (y - x * x) ** 2, rel=1e-12)
        dx = -2 * (1 - x) - 400 * x * (y - x * x)
        dy = 200 * (y - x * x)
        torch.testing.assert_close(grad, torch.tensor([dx, dy], dtype=torch.float64))
    with torch.no_grad():
        model.theta.copy_(task.info["minimiser"])
    loss, (grad,) = _loss_and_grad(task, model)
    assert float(loss) == 0.0 and float(grad.abs().max()) == 0.0
    # the metric is the mean squared residual: f / 2
    with torch.no_grad():
        model.theta.copy_(torch.tensor([1.0, -1.5]))
    assert task.evaluate(model) == {"loss": 625.0, "mse": 312.5}


def test_rosenbrock_bad_start():
    with pytest.raises(ValueError, match="start="):
        tasks.get_task("rosenbrock", start=(1.0,))


# --- ill-conditioned regression -------------------------------------------------------------
def test_ill_conditioned_regression_condition_number_and_targets():
    task = tasks.get_task("ill-conditioned-regression")
    a = task.info["A"]
    assert a.dtype == torch.float64
    cond = float(torch.linalg.cond(a))
    assert cond == pytest.approx(1e10, rel=1e-4)
    x, t = task.train.tensors
    assert x.shape == (4096, 10) and t.shape == (4096, 10)
    torch.testing.assert_close(t.double(), x.double() @ a.T, rtol=1e-5, atol=1e-6)
    # x ~ N(0, I): sample moments
    assert float(x.mean(0).abs().max()) < 0.1
    torch.testing.assert_close(
        torch.cov(x.T.double()), torch.eye(10, dtype=torch.float64), atol=0.1, rtol=0
    )


def test_ill_conditioned_regression_two_layer_linear_reaches_zero():
    task = tasks.get_task("ill-conditioned-regression", dim=6, dtype=torch.float64)
    model = task.make_model(0)
    assert [tuple(p.shape) for p in model.parameters()] == [(6, 6), (6, 6)]
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    loss, _ = _loss_and_grad(task, model)
    assert float(loss) > 0.1
    with torch.no_grad():
        model.fc1.weight.copy_(torch.eye(6, dtype=torch.float64))
        model.fc2.weight.copy_(task.info["A"])
    loss, grads = _loss_and_grad(task, model)
    assert task.train.tensors[1].dtype == torch.float64  # float64 targets in a float64 task
    assert float(loss) < 1e-20
    assert max(float(g.abs().max()) for g in grads) < 1e-6


def test_ill_conditioned_regression_bad_options():
    with pytest.raises(ValueError, match="dim=0"):
        tasks.get_task("ill-conditioned-regression", dim=0)
    with pytest.raises(ValueError, match="condition=0.5"):
        tasks.get_task("ill-conditioned-regression", condition=0.5)


def test_synthetic_determinism():
    task = tasks.get_task("ill-conditioned-regression")
    a, b, c = task.make_model(3), task.make_model(3), task.make_model(4)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    s1, s2, s3 = task.train_batches(7), task.train_batches(7), task.train_batches(8)
    for _ in range(40):  # crosses an epoch boundary (4096 / 128 = 32 batches)
        x1, x2, x3 = next(s1)[0], next(s2)[0], next(s3)[0]
        assert torch.equal(x1, x2)
    assert not torch.equal(x1, x3)
    assert torch.equal(tasks.get_task("ill-conditioned-regression").info["A"], task.info["A"])


# --- meta-quadratics ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mild", "severe"])
def test_meta_quadratic_objective_and_minimiser(variant):
    family = tasks.get_family("meta-quadratics", variant=variant, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        task = family.sample(g)
        q, b = task.info["Q"], task.info["b"]
        assert torch.equal(q, torch.diag(torch.diagonal(q))) and bool((torch.diagonal(q) > 0).all())
        model = task.make_model(1)
        theta = model.theta.detach().clone()
        loss, (grad,) = _loss_and_grad(task, model)
        assert float(loss) == pytest.approx(float(theta @ q @ theta - b @ theta), abs=1e-12)
        torch.testing.assert_close(grad, 2 * q @ theta - b)
        star = torch.linalg.solve(2 * q, b)  # grad of theta^T Q theta - b^T theta vanishes
        torch.testing.assert_close(task.info["minimiser"], star)
        with torch.no_grad():
            model.theta.copy_(star)
        loss, (grad,) = _loss_and_grad(task, model)
        assert float(loss) == pytest.approx(float(star @ q @ star - b @ star), abs=1e-12)
        assert float(loss) == pytest.approx(task.info["minimum"], abs=1e-12)
        assert float(grad.abs().max()) < 1e-12


@pytest.mark.parametrize(("variant", "means"), [("mild", (0.3, 14.0)), ("severe", (0.02, 14.0))])
def test_meta_quadratic_distribution(variant, means):
    family = tasks.get_family("meta-quadratics", variant=variant)
    g = torch.Generator().manual_seed(0)
    draws = [family.sample(g) for _ in range(400)]
    q = torch.stack([torch.diagonal(t.info["Q"]) for t in draws])
    b = torch.stack([t.info["b"] for t in draws])
    torch.testing.assert_close(
        q.mean(0), torch.tensor(means, dtype=torch.float64), rtol=0.02, atol=0
    )
    torch.testing.assert_close(b.mean(0), torch.ones(2, dtype=torch.float64), atol=0.15, rtol=0)
    torch.testing.assert_close(torch.cov(b.T), torch.eye(2, dtype=torch.float64), atol=0.2, rtol=0)
    # different seeds give different initial points; the same generator seed the same tasks
    assert not torch.equal(draws[0].make_model(0).theta, draws[0].make_model(1).theta)
    again = family.sample(torch.Generator().manual_seed(0))
    assert torch.equal(again.info["Q"], draws[0].info["Q"])


def test_meta_quadratic_bad_variant():
    with pytest.raises(ValueError, match=r"variant='medium'.*\['mild', 'severe'\]"):
        tasks.get_family("meta-quadratics", variant="medium")


# --- linear-regression family ---------------------------------------------------------------
def test_linear_regression_family_covariance_and_least_squares():
    family = tasks.get_family("linear-regression-family", dim=5, condition=1e3, n_train=20000)
    cov = family.covariance
    assert float(torch.linalg.cond(cov)) == pytest.approx(1e3, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    t1, t2 = family.sample(g), family.sample(g)
    assert not torch.equal(t1.info["w_true"], t2.info["w_true"])
    assert t1.info["covariance"] is t2.info["covariance"]  # shared by the family
    x, y = t1.train.tensors
    # whitened sample covariance is the identity: x really has covariance Sigma
    evals, evecs = torch.linalg.eigh(cov)
    white = x.double() @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    torch.testing.assert_close(
        white.T @ white / len(x), torch.eye(5, dtype=torch.float64), atol=0.05, rtol=0
    )
    # least squares recovers w_true and is the minimiser of the task loss
    w_ls = torch.linalg.lstsq(x.double(), y.double()).solution
    torch.testing.assert_close(w_ls.squeeze(1), t1.info["w_true"], atol=0.1, rtol=0)
    task = t1.with_device("cpu", torch.float64)
    model = task.make_model(0)
    assert [tuple(p.shape) for p in model.parameters()] == [(1, 5)]
    with torch.no_grad():
        model.out.weight.copy_(w_ls.T)
    loss, (grad,) = _loss_and_grad(task, model)
    assert float(grad.abs().max()) < 1e-8
    assert float(loss) == pytest.approx(0.1**2, rel=0.05)  # noise variance


def test_linear_regression_family_bad_options():
    with pytest.raises(ValueError, match="condition=0"):
        tasks.get_family("linear-regression-family", condition=0)
    with pytest.raises(ValueError, match="dim=-1"):
        tasks.get_family("linear-regression-family", dim=-1)


def test_every_synthetic_task_is_marked_for_the_harness():
    g = torch.Generator().manual_seed(0)
    made = [
        tasks.get_task("rosenbrock"),
        tasks.get_task("ill-conditioned-regression"),
        tasks.get_family("meta-quadratics").sample(g),
        tasks.get_family("linear-regression-family").sample(g),
    ]
    assert all(t.info["synthetic"] is True and t.metric == "mse" for t in made)
    assert "synthetic" not in tasks.get_task("diabetes").info


def _in_memory_tasks(**options) -> list[Task]:
    g = torch.Generator().manual_seed(0)
    return [
        tasks.get_task("rosenbrock", **options),
        tasks.get_task("ill-conditioned-regression", **options),
        tasks.get_family("meta-quadratics", **options).sample(g),
        tasks.get_family("linear-regression-family", **options).sample(g),
        tasks.get_task("digits", **options),
        tasks.get_suite("rotated-digits", **options).task("30"),
        tasks.get_task("wine", **options),
        tasks.get_task("diabetes", **options),
        tasks.get_task("autoencoder:digits", **options),
    ]


def _one_step(task: Task, device: str, dtype: torch.dtype) -> None:
    model = task.make_model(0)
    x, y = next(task.train_batches(0, batch_size=8))
    out = model(x)
    assert out.device.type == device and out.dtype == dtype, task.name
    assert x.device.type == device and y.device.type == device
    loss = task.loss(out, y)
    assert loss.dtype == dtype and loss.device.type == device, task.name
    loss.backward()
    assert all(p.grad.dtype == dtype for p in model.parameters())
    result = task.evaluate(model, "val")
    assert set(result) == {"loss", task.metric}


def test_float64_tasks_stay_float64():
    for task in _in_memory_tasks(dtype=torch.float64):
        _one_step(task, "cpu", torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tasks_run_on_cuda():
    for task in _in_memory_tasks(device="cuda"):
        _one_step(task, "cuda", torch.float32)


def test_linear_regression_family_hessian_is_the_ill_conditioned_covariance():
    family = tasks.get_family(
        "linear-regression-family", dim=8, condition=1e3, n_train=4000, dtype=torch.float64
    )
    task = family.sample(torch.Generator().manual_seed(3))
    x, y = task.train.tensors
    model = task.make_model(0)

    def loss_at(w: torch.Tensor) -> torch.Tensor:
        return task.loss(x @ w, y.squeeze(1))

    w0 = model.out.weight.detach().reshape(-1).clone()
    hess = torch.autograd.functional.hessian(loss_at, w0)
    torch.testing.assert_close(hess, 2 * x.T @ x / len(x))  # exact for least squares
    ratio = float(torch.linalg.cond(hess)) / 1e3  # the family's covariance condition number
    assert 0.7 < ratio < 1.4
    sample = task.loss(model(x), y).detach()
    assert float(sample) == pytest.approx(float(loss_at(w0)), rel=1e-12)  # model == x @ w
