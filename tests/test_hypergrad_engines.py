"""Every registered engine on one Problem seam, against closed forms and smoothed oracles."""

import math

import pytest
import torch

from metaopt.hypergrad import ENGINES, NonFiniteHypergradient, Problem, get_engine
from metaopt.hypergrad.es import es_grad, pes_grad

D = torch.float64


def _quadratic(steps, eta=0.1, seed=0):
    """GD on f(w) = 1/2 w^T A w - lam^T w from w0 for ``steps`` steps; E = 1/2 |w_T - c|^2.

    w_T = (I - eta A)^T w0 + (I - (I - eta A)^T) A^{-1} lam, so dE/dlam = J^T (w_T - c)
    with J = (I - (I - eta A)^T) A^{-1}; at T -> inf it is the implicit A^{-1} (w* - c)."""
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=D))[0]
    A = Q @ torch.diag(torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=D)) @ Q.T
    lam = torch.randn(4, generator=gen, dtype=D)
    w0 = torch.randn(4, generator=gen, dtype=D)
    c = torch.randn(4, generator=gen, dtype=D)

    def step(state, hp, i):
        (w,) = state
        return (w - eta * (A @ w - hp[0]),)

    def objective(state, hp):
        return 0.5 * ((state[0] - c) ** 2).sum()

    def inner(ps, hp):
        return 0.5 * ps[0] @ A @ ps[0] - hp[0] @ ps[0]

    Ainv = torch.linalg.inv(A)
    problem = Problem(
        step=step, state=(w0,), hparams=(lam,), steps=steps, objective=objective,
        num_params=1, inner_objective=inner,
        closed_form={"inverse_hvp": lambda v: (Ainv @ v[0],)},
    )  # fmt: skip
    M = torch.linalg.matrix_power(torch.eye(4, dtype=D) - eta * A, steps)
    wT = M @ w0 + (torch.eye(4, dtype=D) - M) @ Ainv @ lam
    J = (torch.eye(4, dtype=D) - M) @ Ainv
    return problem, J.T @ (wT - c), Ainv @ (Ainv @ lam - c), wT


@pytest.mark.parametrize("name", ["unroll", "forward"])
def test_unrolled_engines_equal_the_closed_form_and_return_the_end_state(name):
    problem, expected, _, wT = _quadratic(steps=7)
    entry = get_engine(name)
    result = entry.obj(problem, None, **entry.options)
    torch.testing.assert_close(result.grads[0], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.state[0], wT, rtol=1e-12, atol=1e-12)
    # the value at the closed-form end point, through the test's own objective
    torch.testing.assert_close(result.value, problem.objective((wT,), problem.hparams))
    assert result.carry is None


@pytest.mark.parametrize(
    "name,options",
    [("exact", {}), ("cg", {}), ("neumann", {"alpha": 0.2, "iterations": 300}),
     ("closed_form", {}), ("implicit", {"solve": "cg", "iterations": 10})],
)  # fmt: skip
def test_implicit_engines_equal_the_implicit_closed_form(name, options):
    # after 400 steps GD is at the stationary point to (1 - 0.1 * 0.5)^400 ~ 1e-9
    problem, _, expected, _ = _quadratic(steps=400)
    entry = get_engine(name)
    result = entry.obj(problem, None, **{**entry.options, **options})
    torch.testing.assert_close(result.grads[0], expected, rtol=1e-7, atol=1e-8)


def test_implicit_needs_an_inner_objective():
    problem, *_ = _quadratic(steps=3)
    problem.inner_objective, problem.closed_form = None, {}
    with pytest.raises(ValueError, match="no inner_objective"):
        get_engine("implicit").obj(problem)


@pytest.mark.parametrize("name", ["unroll", "forward", "exact", "neumann", "closed_form"])
def test_a_diverging_window_raises_the_error_learners_skip(name):
    # learners catch NonFiniteHypergradient (and only it) to drop the run and go on
    problem, *_ = _quadratic(steps=3, eta=1e200)
    entry = get_engine(name)
    with pytest.raises(NonFiniteHypergradient) as info:
        entry.obj(problem, None, **entry.options)
    assert info.value.term in {"hypergradient", "tangent", "inner_run"}


def _sines(n=3):
    """E(lam) = sum sin(lam_j): its Gaussian smoothing has gradient cos(lam) exp(-s^2/2)."""
    lam = torch.tensor([0.3, -1.2, 2.0], dtype=D)[:n]
    return Problem(
        step=lambda s, h, i: s, state=(torch.zeros(1, dtype=D),), hparams=(lam,), steps=1,
        objective=lambda s, h: torch.sin(h[0]).sum(), num_params=1,
    ), lam  # fmt: skip


def test_es_estimates_the_gradient_of_the_smoothed_objective():
    problem, lam = _sines()
    sigma, pairs = 0.8, 20000
    g = es_grad(problem, pairs=pairs, sigma=sigma, seed=0).grads[0]
    smoothed = torch.cos(lam) * math.exp(-(sigma**2) / 2)
    # antithetic pairs: the estimate's per-pair spread is below 1.5 here; 5 standard errors
    assert torch.allclose(g, smoothed, atol=5 * 1.5 / math.sqrt(pairs))
    assert not torch.allclose(g, torch.cos(lam), atol=0.1)  # it is the smoothed gradient


def _linear_system(windows, length, a=0.9):
    """s <- a s + lam; each window's objective is its end state. d/dlam of the sum over the
    windows of one run is sum_w (1 - a^{wL}) / (1 - a); a window alone sees (1 - a^L)/(1 - a)."""
    lam = torch.tensor([0.7], dtype=D)
    problem = Problem(
        step=lambda s, h, i: (a * s[0] + h[0],), state=(torch.zeros(1, dtype=D),),
        hparams=(lam,), steps=length, objective=lambda s, h: s[0].sum(), num_params=1,
    )  # fmt: skip
    full = sum((1 - a ** (w * length)) / (1 - a) for w in range(1, windows + 1))
    truncated = windows * (1 - a**length) / (1 - a)
    return problem, full, truncated


def test_pes_is_unbiased_across_windows_where_truncated_es_is_not():
    windows, length, pairs, sigma = 4, 3, 4000, 0.1
    problem, full, truncated = _linear_system(windows, length)
    carry, state, total_pes, total_es = None, problem.state, 0.0, 0.0
    for w in range(windows):
        r = pes_grad(Problem(**{**problem.__dict__, "state": state}), carry, pairs=pairs,
                     sigma=sigma, seed=w)  # fmt: skip
        carry = r.carry
        e = es_grad(Problem(**{**problem.__dict__, "state": state}), pairs=pairs, sigma=sigma,
                    seed=100 + w)  # fmt: skip
        state = e.state  # the unperturbed run continues (the state ES leaves behind)
        total_pes += float(r.grads[0])
        total_es += float(e.grads[0])
    assert abs(total_es - truncated) < 0.03 * truncated
    assert abs(total_pes - full) < 0.05 * full
    assert abs(truncated - full) > 0.3 * full  # the two targets are far apart


def test_es_options_are_checked_and_non_finite_values_raise():
    problem, _ = _sines()
    with pytest.raises(ValueError, match="pairs=0"):
        es_grad(problem, pairs=0)
    with pytest.raises(ValueError, match="sigma=-1"):
        pes_grad(problem, sigma=-1)
    problem.objective = lambda s, h: torch.log(h[0] - 10).sum()  # nan everywhere
    with pytest.raises(NonFiniteHypergradient):
        es_grad(problem, pairs=2, seed=0)


def test_registry_lists_the_engines_and_solver_aliases():
    assert {"unroll", "forward", "implicit", "neumann", "cg", "exact", "closed_form", "es",
            "pes"} <= set(ENGINES.available())  # fmt: skip
    assert dict(get_engine("cg").options) == {"solve": "cg"}
    with pytest.raises(ValueError, match="engine='newton' is unknown"):
        get_engine("newton")
