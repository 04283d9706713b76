"""check_hypergradient against functions with known gradients; FiniteGuard semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt.hypergrad import NonFiniteHypergradient, check_hypergradient, higher_grad
from metaopt.hypergrad.errors import FiniteGuard

D = torch.float64


def _fn(h):  # f(a, b) = sum(sin(a) * b^2) + a.sum()^2
    a, b = h
    return (torch.sin(a) * b * b).sum() + a.sum() ** 2


def _grad(a, b):
    return (torch.cos(a) * b * b + 2 * a.sum(), 2 * torch.sin(a) * b)


def test_exact_gradient_passes_and_errors_are_measured():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    exact = _grad(a, b)
    assert check_hypergradient(_fn, (a, b), exact) < 1e-8
    off = (exact[0], exact[1] * 1.001)  # 0.1 % off in one tensor
    err = check_hypergradient(_fn, (a, b), off)
    assert 5e-4 < err < 2e-3


def test_float32_inputs_are_differenced_in_float64():
    a = torch.linspace(-1, 1, 4)
    b = torch.linspace(0.5, 2, 4)
    seen = []

    def fn(h):
        seen.append(h[0].dtype)
        return _fn(h)

    exact = tuple(t.float() for t in _grad(a.double(), b.double()))
    assert check_hypergradient(fn, (a, b), exact) < 1e-6  # float32 rounding of `exact`
    assert set(seen) == {D}


def test_max_entries_checks_a_subset_and_shapes_are_validated():
    a, b = torch.randn(50, dtype=D), torch.randn(50, dtype=D)
    calls = []

    def fn(h):
        calls.append(1)
        return _fn(h)

    gen = torch.Generator().manual_seed(0)
    assert check_hypergradient(fn, (a, b), _grad(a, b), max_entries=7, generator=gen) < 1e-7
    assert len(calls) == 14
    with pytest.raises(ValueError, match="analytic: expected shapes"):
        check_hypergradient(_fn, (a, b), (a[:3], b))


def test_guard_names_the_first_bad_term_and_catches_overflowing_half_sums():
    guard = FiniteGuard()
    guard.add((torch.ones(3),), "outer_grad")
    guard.add((torch.tensor([1.0, float("nan")]),), "inverse_hvp")
    guard.add((torch.tensor([float("inf")]),), "mixed")
    with pytest.raises(NonFiniteHypergradient) as info:
        guard.check()
    assert info.value.term == "inverse_hvp"
    ok = FiniteGuard()
    ok.add((torch.full((10,), 60000.0, dtype=torch.float16),), "direct")  # fp16 sum overflows
    ok.check()  # ... but is accumulated in float32: finite, no false alarm


def test_guard_given_the_result_tests_it_first_and_names_the_term_behind_it():
    nan = torch.tensor([float("nan")])
    guard = FiniteGuard()
    guard.add((torch.ones(3),), "outer_grad")
    guard.add((nan,), "inverse_hvp")
    guard.check((torch.ones(2),))  # a finite hypergradient passes, whatever the terms
    with pytest.raises(NonFiniteHypergradient) as info:
        guard.check((nan,))
    assert info.value.term == "inverse_hvp"
    clean = FiniteGuard()
    clean.add((torch.ones(3),), "outer_grad")
    with pytest.raises(NonFiniteHypergradient) as info:
        clean.check((torch.tensor([float("inf")]),))  # only the result overflowed
    assert info.value.term == "hypergradient"


def test_higher_engine_raises_on_non_finite():
    model = nn.Linear(3, 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.ones(4, 3, dtype=D)
    with pytest.raises(NonFiniteHypergradient) as info:
        higher_grad(
            model,
            opt,
            lambda fm, t: (fm(x) ** 2).sum(),
            lambda fm: (fm(x) ** 2).sum(),
            {"lr": torch.tensor(1e300, dtype=D)},
            steps=3,
        )
    assert info.value.term == "hypergradient"
    with pytest.raises(ValueError, match="override key 'lrr'"):
        higher_grad(
            model,
            opt,
            lambda fm, t: fm(x).sum(),
            lambda fm: fm(x).sum(),
            {"lrr": torch.tensor(0.1, dtype=D)},
            steps=1,
        )
