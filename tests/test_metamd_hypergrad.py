"""MetaMD hypergradients through the engines, against dense and finite-difference oracles.

The learner is the ``"metamd-paper"`` preset (mirror descent = SGD through ``P = M^{-1}``,
``"bregman-rate"``); one task's hypergradient is the engine on the problem
:meth:`InnerRun.window` builds (:func:`tests._metamd_tasks.window_hypergradient`). The
inner run is recomputed independently with the deploy optimizer
(``metaopt.optim.Preconditioned``, a ``torch.optim.Optimizer``) so the oracles share no code
with the learner's functional inner loop.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from metaopt import MetaContext
from metaopt.learners import MetaMD
from metaopt.objectives import evaluate_meta_objective
from metaopt.optim import Preconditioned
from tests._metamd_tasks import regression_task, window_hypergradient

T = 12


def _learner(task, k_lambda=0.0, gamma=0.0, momentum=0.0, **fields):
    options = {"rank": 1, "learn_scale": True, "init_scale": 0.8}
    fields = {
        "preconditioner": "lowrank",
        "preconditioner_options": {**options, **fields.pop("preconditioner_options", {})},
        "rule_options": {"momentum": momentum},
        "objective_options": {"k_lambda": k_lambda, "gamma": gamma}
        if fields.get("meta_objective", "bregman-rate") == "bregman-rate"
        else {},
        "inner_steps": T,
        "lr": 0.2,
        "tasks_per_step": 1,
        "engine_options": {},
        **fields,
    }
    return MetaMD([task], preset="metamd-paper", **fields)


def _theta_T(task, pre, config, init_seed, data_seed, steps=None, swap=None):
    """Independent inner run with the deploy optimizer; ``swap=(t, values)`` replaces the
    meta-parameters by ``values`` from step ``t`` on."""
    model = task.make_model(init_seed)
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Preconditioned(model.named_parameters(), pre, lr=config.lr, **config.rule_options)
    stream = task.train_batches(data_seed, batch_size=config.batch_size)
    for t in range(config.inner_steps if steps is None else steps):
        if swap is not None and t == swap[0]:
            with torch.no_grad():
                for p, v in zip(pre.parameters(), swap[1], strict=True):
                    p.copy_(v)
        x, y = next(stream)
        opt.zero_grad()
        task.loss(model(x), y).backward()
        opt.step()
    return theta1, {n: p.detach().clone() for n, p in model.named_parameters()}


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def _eq13_oracle(pre, theta1, thetaT, k_lambda, gamma):
    """Eq. 13 for F = B_M(theta, theta_1), E = bregman-rate, from dense matrices:
    u = M^{-1} dE/dtheta = delta, so dE/dM = d_M E - d_M <u, M delta> (delta fixed)."""
    params = list(pre.parameters())
    M = torch.linalg.inv(pre.dense())
    delta = _flat(thetaT) - _flat(theta1)
    eye = torch.eye(M.shape[0], dtype=M.dtype)
    lam = torch.linalg.eigvalsh(0.5 * (M + M.T))[0]
    direct = 0.5 * delta @ M @ delta + k_lambda / lam + gamma * torch.linalg.norm(M - eye)
    mixed = delta @ M @ delta  # <u, M delta> with u = delta held constant
    return torch.autograd.grad(direct - mixed, params)


def _cos(a, b):
    fa, fb = torch.cat([x.reshape(-1) for x in a]), torch.cat([x.reshape(-1) for x in b])
    return float(fa @ fb / (fa.norm() * fb.norm()))


def _maxrel(a, b):
    fa, fb = torch.cat([x.reshape(-1) for x in a]), torch.cat([x.reshape(-1) for x in b])
    return float((fa - fb).norm() / fb.norm())


@pytest.mark.parametrize(
    ("engine", "rank"), [("closed_form", 1), ("closed_form", 2), ("exact", 1), ("cg", 2)]
)
def test_implicit_hypergradient_equals_dense_eq13(engine, rank):
    task = regression_task(3)
    opts = {"iterations": 60} if engine == "cg" else {}
    learner = _learner(
        task,
        engine=engine,
        engine_options=opts,
        k_lambda=0.2,
        gamma=0.05,
        preconditioner_options={"rank": rank},
    )
    pre, cfg = learner.preconditioner, learner.config
    res = window_hypergradient(task, pre, cfg, init_seed=11, data_seed=5)
    theta1, thetaT = _theta_T(task, pre, cfg, 11, 5)
    expected = _eq13_oracle(pre, theta1, thetaT, 0.2, 0.05)
    assert _maxrel(res.grads, expected) < 1e-8


def test_neumann_tends_to_closed_form_as_J_grows():
    task = regression_task(4)
    base = _learner(task, engine="closed_form")
    pre, cfg = base.preconditioner, base.config
    exact = window_hypergradient(task, pre, cfg, init_seed=1, data_seed=2).grads
    # alpha below 2 / lambda_max(M) so that the series converges
    lam_max = float(torch.linalg.eigvalsh(torch.linalg.inv(pre.dense().detach()))[-1])
    alpha = 1.0 / lam_max
    errors = []
    for J in (1, 4, 16, 64, 256):
        cfg_j = dataclasses.replace(
            cfg, engine="neumann", engine_options={"iterations": J, "alpha": alpha}
        )
        g = window_hypergradient(task, pre, cfg_j, init_seed=1, data_seed=2).grads
        errors.append(_maxrel(g, exact))
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-6, errors
    assert errors[0] > 1e-3, errors  # J = 1 is genuinely different


def test_unrolled_hypergradient_equals_finite_differences():
    task = regression_task(5)
    learner = _learner(task, engine="unroll", meta_objective="final-loss")
    pre, cfg = learner.preconditioner, learner.config
    res = window_hypergradient(task, pre, cfg, init_seed=3, data_seed=4)
    meta_batch = next(task.train_batches(4 + 1))
    params = [p.detach().clone() for p in pre.parameters()]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, p0, d in zip(pre.parameters(), params, direction, strict=True):
                    p.copy_(p0 + sign * 1e-6 * d)
            _, thetaT = _theta_T(task, pre, cfg, 3, 4)
            model = task.make_model(0)
            torch.nn.utils.vector_to_parameters(_flat(thetaT), model.parameters())
            values.append(float(task.loss(model(meta_batch[0]), meta_batch[1])))
        fd = (values[0] - values[1]) / 2e-6
        analytic = float(sum((a * d).sum() for a, d in zip(res.grads, direction, strict=True)))
        assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(fd)), (fd, analytic)
    with torch.no_grad():
        for p, p0 in zip(pre.parameters(), params, strict=True):
            p.copy_(p0)


def test_truncated_unroll_equals_finite_differences_of_the_last_steps():
    task = regression_task(6)
    k = 4
    learner = _learner(task, engine="unroll", window=k, k_lambda=0.1)
    pre, cfg = learner.preconditioner, learner.config
    # the run's last window: its first T - k steps ran in earlier windows, without a graph
    res = window_hypergradient(task, pre, cfg, init_seed=7, data_seed=8, skip=T - k)
    params = [p.detach().clone() for p in pre.parameters()]
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    values = []
    for sign in (1.0, -1.0):
        # theta_{T-k} from the unperturbed phi, the last k steps and E with phi + eps d
        moved = [p0 + sign * 1e-6 * d for p0, d in zip(params, direction, strict=True)]
        with torch.no_grad():
            for p, p0 in zip(pre.parameters(), params, strict=True):
                p.copy_(p0)
        theta1, thetaT = _theta_T(task, pre, cfg, 7, 8, swap=(T - k, moved))
        ctx = MetaContext(params_before=theta1, params_after=thetaT, preconditioner=pre)
        with torch.no_grad():
            values.append(float(evaluate_meta_objective("bregman-rate", ctx, k_lambda=0.1)))
    fd = (values[0] - values[1]) / 2e-6
    analytic = float(sum((a * d).sum() for a, d in zip(res.grads, direction, strict=True)))
    assert abs(fd - analytic) <= 1e-6 * max(1.0, abs(fd)), (fd, analytic)
    with torch.no_grad():
        for p, p0 in zip(pre.parameters(), params, strict=True):
            p.copy_(p0)


def test_forward_mode_equals_reverse_mode():
    task = regression_task(7, d=3, out=1)
    rev = _learner(task, engine="unroll", momentum=0.5)
    fwd = _learner(task, engine="forward", momentum=0.5)
    a = window_hypergradient(task, rev.preconditioner, rev.config, init_seed=1, data_seed=1)
    b = window_hypergradient(task, fwd.preconditioner, fwd.config, init_seed=1, data_seed=1)
    assert _maxrel(b.grads, a.grads) < 1e-9
    assert float(a.value) == pytest.approx(float(b.value), rel=1e-12)


def test_paper_implicit_gradient_is_not_the_unrolled_one():
    """Documented property (README, MetaMD section): with gamma = k = 0, Eq. 13 on the
    rephrased objective gives -d_M B_M(theta_T||theta_1), the negative of the direct term."""
    task = regression_task(8)
    learner = _learner(task, engine="closed_form", preconditioner_options={"learn_scale": False})
    pre, cfg = learner.preconditioner, learner.config
    res = window_hypergradient(task, pre, cfg, init_seed=2, data_seed=3)
    theta1, thetaT = _theta_T(task, pre, cfg, 2, 3)
    ctx = MetaContext(params_before=theta1, params_after=thetaT, preconditioner=pre)
    direct = torch.autograd.grad(
        evaluate_meta_objective("bregman-rate", ctx), list(pre.parameters())
    )
    assert _cos(res.grads, direct) == pytest.approx(-1.0, abs=1e-9)


@pytest.mark.parametrize("engine", ["forward", "unroll"])
def test_log_final_loss_hypergradient_on_a_quadratic_equals_closed_form(engine):
    """On f = theta^T Q theta - b^T theta with M = diag(exp(-s)), theta_T - theta_* is
    r^T (theta_1 - theta_*) per coordinate, r = 1 - 2 eta Q exp(s); so
    d/ds log(f(theta_T) - f*) = 2 Q e_T T (-2 eta Q exp(s)) r^(T-1) e_1 / (f(theta_T) - f*)."""
    from tasks import get_family

    q = torch.tensor([0.3, 14.0], dtype=torch.float64)
    b = torch.tensor([1.2, 0.7], dtype=torch.float64)
    task = get_family("meta-quadratics", dtype=torch.float64).task(q, b)
    eta, steps = 0.02, 9
    learner = MetaMD(
        [task],
        preset="metamd-paper",
        preconditioner="rank1",
        preconditioner_options={"init_scale": 0.4},
        inner_steps=steps,
        lr=eta,
        tasks_per_step=1,
        engine=engine,
        meta_objective="log-final-loss",
    )
    pre, cfg = learner.preconditioner, learner.config
    res = window_hypergradient(task, pre, cfg, init_seed=3, data_seed=4)
    s = pre.blocks["theta"].log_scale.detach().reshape(-1)
    e1 = task.make_model(3).theta.detach() - b / (2 * q)
    r = 1 - 2 * eta * q * s.exp()
    eT = r**steps * e1
    gap = float((q * eT * eT).sum())
    expected = 2 * q * eT * steps * (-2 * eta * q * s.exp()) * r ** (steps - 1) * e1 / gap
    assert gap > 1e-6  # far from the eps floor, so the closed form is the whole story
    assert float(res.value) == pytest.approx(math.log(gap + 1e-12), rel=1e-9)
    (grad,) = res.grads
    torch.testing.assert_close(grad.reshape(-1), expected, rtol=1e-8, atol=0)
