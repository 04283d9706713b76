"""Unrolled engines (reverse, forward, higher) on T-step gradient descent on a quadratic.

Oracle: with ``f(theta) = 1/2 theta^T A theta - b^T theta`` and ``theta_{t+1} = theta_t -
eta grad f``, ``theta_T - theta* = (I - eta A)^T (theta_0 - theta*)``, so
``d theta_T / d eta = -T A (I - eta A)^{T-1} (theta_0 - theta*)`` and with ``eta = exp(s)``
``d outer / d s = eta (theta_T - c)^T d theta_T / d eta`` for ``outer = 1/2 |theta_T - c|^2``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad

from metaopt.hypergrad import (
    NonFiniteHypergradient,
    check_hypergradient,
    higher_grad,
    unrolled_grad,
)

D = torch.float64
T = 10


def _problem(seed=0, d=4):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D))
    A = Q @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=D)) @ Q.T
    b = torch.randn(d, generator=g, dtype=D)
    c = torch.randn(d, generator=g, dtype=D)
    theta0 = torch.randn(d, generator=g, dtype=D)
    return A, b, c, theta0


def _f(theta, A, b):
    return 0.5 * theta @ A @ theta - b @ theta


def _analytic(A, b, c, theta_start, eta, k):
    """d outer / d log(eta) for k GD steps from theta_start (held constant)."""
    star = torch.linalg.solve(A, b)
    M = torch.eye(len(b), dtype=D) - eta * A
    theta_k = star + torch.linalg.matrix_power(M, k) @ (theta_start - star)
    dtheta = -k * A @ torch.linalg.matrix_power(M, k - 1) @ (theta_start - star)
    return eta * (theta_k - c) @ dtheta


def _gd(A, b, eta, theta, steps):
    for _ in range(steps):
        theta = theta - eta * (A @ theta - b)
    return theta


def _func_step(A, b):
    """A pure step (torch.func.grad): usable in reverse and forward mode."""

    def step(params, hparams):
        (theta,), (log_lr,) = params, hparams
        return (theta - log_lr.exp() * grad(_f)(theta, A, b),)

    return step


def _autograd_step(A, b):
    """A step through torch.autograd.grad(create_graph=True): reverse mode only."""

    def step(params, hparams):
        (theta,), (log_lr,) = params, hparams
        (g,) = torch.autograd.grad(_f(theta, A, b), theta, create_graph=True)
        return (theta - log_lr.exp() * g,)

    return step


def _outer(c):
    return lambda params, hparams: 0.5 * ((params[0] - c) ** 2).sum()


@pytest.mark.parametrize(
    ("mode", "stepper"),
    [("reverse", _func_step), ("reverse", _autograd_step), ("forward", _func_step)],
)
def test_full_unroll_matches_analytic(mode, stepper):
    A, b, c, theta0 = _problem()
    eta = 0.3
    log_lr = torch.tensor(eta, dtype=D).log()
    (hg,) = unrolled_grad(stepper(A, b), _outer(c), (theta0,), (log_lr,), steps=T, mode=mode)
    expected = _analytic(A, b, c, theta0, eta, T)
    assert abs(float(hg - expected)) <= 1e-8 * abs(float(expected))
    assert hg.shape == log_lr.shape and hg.grad_fn is None


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("k", [1, 3, T])
def test_truncated_unroll_matches_hand_truncated_derivative(mode, k):
    A, b, c, theta0 = _problem(seed=1)
    eta = 0.25
    log_lr = torch.tensor(eta, dtype=D).log()
    (hg,) = unrolled_grad(
        _func_step(A, b), _outer(c), (theta0,), (log_lr,), steps=T, mode=mode, truncate=k
    )
    theta_cut = _gd(A, b, eta, theta0, T - k)  # a constant for the truncated derivative
    expected = _analytic(A, b, c, theta_cut, eta, k)
    assert abs(float(hg - expected)) <= 1e-8 * abs(float(expected))
    if k < T:  # truncation changes the answer: the test can tell them apart
        full = _analytic(A, b, c, theta0, eta, T)
        assert abs(float(full - expected)) > 1e-3 * abs(float(full))


def test_higher_engine_matches_analytic():
    A, b, c, theta0 = _problem()
    eta = 0.3

    class Point(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(theta0.clone())

        def forward(self):
            return self.theta

    model = Point()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    log_lr = torch.tensor(eta, dtype=D).log()
    (hg,) = higher_grad(
        model,
        opt,
        lambda fm, t: _f(fm(), A, b),
        lambda fm: 0.5 * ((fm() - c) ** 2).sum(),
        (log_lr,),
        steps=T,
        override=lambda h: {"lr": h[0].exp()},
    )
    expected = _analytic(A, b, c, theta0, eta, T)
    assert abs(float(hg - expected)) <= 1e-8 * abs(float(expected))
    assert torch.equal(model.theta.detach(), theta0)  # the model itself is untouched


def test_higher_engine_momentum_and_mapping_hparams_match_finite_differences():
    A, b, c, theta0 = _problem(seed=3)
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(theta0[None])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    x = torch.eye(4, dtype=D)

    def inner(fm, t):
        return _f(fm(x)[:, 0], A, b)

    def outer(fm):
        return 0.5 * ((fm(x)[:, 0] - c) ** 2).sum()

    hp = {"lr": torch.tensor(0.2, dtype=D), "momentum": torch.tensor(0.6, dtype=D)}
    hg = higher_grad(model, opt, inner, outer, hp, steps=5)

    def fn(h):
        theta, buf = theta0.clone(), None
        for _ in range(5):
            g = A @ theta - b
            buf = g if buf is None else h[1] * buf + g
            theta = theta - h[0] * buf
        return 0.5 * ((theta - c) ** 2).sum()

    assert check_hypergradient(fn, tuple(hp.values()), hg) < 1e-6


def test_forward_with_vector_hparams_matches_reverse_and_finite_differences():
    A, b, c, theta0 = _problem(seed=2)

    def step(params, hparams):  # per-coordinate log learning rates (4 scalars: the vmap path)
        (theta,), (log_lr,) = params, hparams
        return (theta - log_lr.exp() * grad(_f)(theta, A, b),)

    log_lr = torch.log(torch.tensor([0.2, 0.3, 0.25, 0.1], dtype=D))
    fwd = unrolled_grad(step, _outer(c), (theta0,), (log_lr,), steps=T, mode="forward")
    rev = unrolled_grad(step, _outer(c), (theta0,), (log_lr,), steps=T, mode="reverse")
    torch.testing.assert_close(fwd[0], rev[0], rtol=1e-10, atol=0)

    def fn(h):
        theta = theta0
        for _ in range(T):
            theta = step((theta,), h)[0]
        return _outer(c)((theta,), h)

    assert check_hypergradient(fn, (log_lr,), fwd) < 1e-6


@pytest.mark.parametrize("steps", [1, 3])
def test_forward_when_lambda_enters_the_inner_gradient_and_skips_a_param(steps):
    """The window's first tangent (double-vjp in lambda) where lambda = (log lr, log weight
    decay) enters the step both outside and inside ``torch.func.grad`` and one param
    (``phi``) never meets lambda in the first step: against central finite differences."""
    A, b, c, theta0 = _problem(seed=3)
    phi0 = torch.tensor([0.5, -1.0], dtype=D)

    def step(params, hparams):
        theta, phi = params
        (h,) = hparams

        def loss(t, p):
            return _f(t, A, b) + 0.5 * h[1].exp() * (t * t).sum() + (p * p).sum() * (t @ c)

        g_theta, g_phi = grad(loss, argnums=(0, 1))(theta, phi)
        return theta - h[0].exp() * g_theta, phi - 0.1 * g_phi

    def outer(params, hparams):
        return 0.5 * ((params[0] - c) ** 2).sum() + (params[1] ** 2).sum()

    hp = torch.log(torch.tensor([0.2, 0.05], dtype=D))
    fwd = unrolled_grad(step, outer, (theta0, phi0), (hp,), steps=steps, mode="forward")

    def fn(h):
        params = (theta0, phi0)
        for _ in range(steps):
            params = step(params, h)
        return outer(params, h)

    assert check_hypergradient(fn, (hp,), fwd) < 1e-7


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_float32_keeps_dtype(mode):
    A, b, c, theta0 = (t.float() for t in _problem())
    log_lr = torch.tensor(0.3).log()

    def step(params, hparams):
        return (params[0] - hparams[0].exp() * grad(_f)(params[0], A, b),)

    (hg,) = unrolled_grad(step, _outer(c), (theta0,), (log_lr,), steps=T, mode=mode)
    expected = _analytic(*(t.double() for t in (A, b, c, theta0)), 0.3, T)
    assert hg.dtype == torch.float32
    assert abs(float(hg) - float(expected)) <= 1e-4 * abs(float(expected))


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_non_finite_hypergradient_raises(mode):
    A, b, c, theta0 = _problem()
    huge = torch.tensor(1e200, dtype=D).log()  # lr 1e200: the unroll overflows
    with pytest.raises(NonFiniteHypergradient) as info:
        unrolled_grad(_func_step(A, b), _outer(c), (theta0,), (huge,), steps=T, mode=mode)
    assert info.value.term in ("hypergradient", "tangent")


def test_bad_arguments_raise_value_error():
    A, b, c, theta0 = _problem()
    args = (_func_step(A, b), _outer(c), (theta0,), (torch.zeros((), dtype=D),))
    with pytest.raises(ValueError, match="mode='sideways'"):
        unrolled_grad(*args, steps=2, mode="sideways")
    with pytest.raises(ValueError, match="truncate=3"):
        unrolled_grad(*args, steps=2, truncate=3)
    with pytest.raises(ValueError, match="steps=0"):
        unrolled_grad(*args, steps=0)
    A, b = _problem()[:2]
    with pytest.raises(ValueError, match="torch.func.grad"):
        unrolled_grad(_autograd_step(A, b), args[1], args[2], args[3], steps=1, mode="forward")
    with pytest.raises(ValueError, match="hparams"):
        unrolled_grad(args[0], args[1], args[2], torch.zeros(()), steps=1)
