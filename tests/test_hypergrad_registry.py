"""Engines by name: every built-in name resolves to the engine it names."""

from __future__ import annotations

import pytest
import torch

from metaopt.hypergrad import available_engines, get_engine, register_engine

D = torch.float64


def test_builtin_names_and_kinds():
    kinds = {n: get_engine(n).kind for n in available_engines()}
    assert {
        "unroll": "unrolled",
        "forward": "unrolled",
        "higher": "higher",
        "neumann": "implicit",
        "cg": "implicit",
        "exact": "implicit",
        "closed_form": "implicit",
    }.items() <= kinds.items()


def test_engines_by_name_agree_on_a_quadratic():
    # inner 1/2 a w^2 - l w has w* = l / a; outer 1/2 (w - 1)^2 -> d/dl = (l/a - 1)/a
    a = torch.tensor(2.0, dtype=D)
    lam = torch.tensor(0.5, dtype=D)
    w = lam / a
    inner = lambda p, h: 0.5 * a * p[0] ** 2 - h[0] * p[0]  # noqa: E731
    outer = lambda p, h: 0.5 * (p[0] - 1) ** 2  # noqa: E731
    expected = (lam / a - 1) / a
    opts = {
        "exact": {},
        "cg": {},
        "neumann": {"alpha": 0.4, "iterations": 60},
        "closed_form": {"inverse_hvp": lambda v: (v[0] / a,)},
    }
    for name, o in opts.items():
        (g,) = get_engine(name)(inner, outer, (w,), (lam,), **o)
        assert abs(float(g - expected)) < 1e-8, name
    # one GD step w1 = w0 - h (a w0 - l) from w0 = 0 with h = 0.1: w1 = 0.1 l
    step = lambda p, h: (p[0] - 0.1 * (a * p[0] - h[0]),)  # noqa: E731
    w0 = torch.zeros((), dtype=D)
    for name in ("unroll", "forward"):
        (g,) = get_engine(name)(step, outer, (w0,), (lam,), steps=1)
        assert abs(float(g - 0.1 * (0.1 * lam - 1))) < 1e-12, name


def test_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match="engine='newton'.*neumann"):
        get_engine("newton")
    with pytest.raises(ValueError, match="already registered"):
        register_engine("cg", lambda *a: (), kind="implicit")
    with pytest.raises(ValueError, match="kind='magic'"):
        register_engine("mine", lambda *a: (), kind="magic")
