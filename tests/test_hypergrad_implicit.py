"""Implicit engines against the closed-form ridge-regression hypergradient (float64)."""

from __future__ import annotations

import pytest
import torch

from metaopt.hypergrad import NonFiniteHypergradient, check_hypergradient, implicit_grad

D = torch.float64


def _ridge(dtype=D, n=40, m=30, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=D)
    w_true = torch.randn(d, generator=g, dtype=D)
    y = X @ w_true + 0.3 * torch.randn(n, generator=g, dtype=D)
    Xv = torch.randn(m, d, generator=g, dtype=D)
    yv = Xv @ w_true + 0.3 * torch.randn(m, generator=g, dtype=D)
    lam = 0.5 + 1.5 * torch.rand(d, generator=g, dtype=D)  # per-feature regularisers

    def K(lam):
        return X.T @ X / n + torch.diag(lam)

    def w_star(lam):
        return torch.linalg.solve(K(lam), X.T @ y / n)

    def inner(params, hparams):
        (w,), (lm,) = params, hparams
        return 0.5 * ((X.to(w.dtype) @ w - y.to(w.dtype)) ** 2).mean() + 0.5 * (lm * w * w).sum()

    def outer(params, hparams):
        (w,) = params
        return 0.5 * ((Xv.to(w.dtype) @ w - yv.to(w.dtype)) ** 2).mean()

    w = w_star(lam)
    gv = Xv.T @ (Xv @ w - yv) / m
    closed = -w * torch.linalg.solve(K(lam), gv)  # d outer / d lam_i = -w_i [K^-1 g]_i
    return {
        "inner": inner,
        "outer": outer,
        "w": w.to(dtype),
        "lam": lam.to(dtype),
        "K": K(lam),
        "closed": closed,
        "val_at": lambda h: outer((w_star(h[0]),), h),
        "K0": X.T @ X / n,
        "b": X.T @ y / n,
    }


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_closed_form_oracle_matches_finite_differences():
    r = _ridge()
    assert check_hypergradient(r["val_at"], (r["lam"],), (r["closed"],)) < 1e-6


@pytest.mark.parametrize(
    ("method", "options", "tol"),
    [("exact", {}, 1e-8), ("cg", {"iterations": 20, "tol": 1e-12}, 1e-6)],
)
def test_exact_and_cg_match_closed_form(method, options, tol):
    r = _ridge()
    (hg,) = implicit_grad(r["inner"], r["outer"], (r["w"],), (r["lam"],), method=method, **options)
    assert hg.dtype == D and hg.shape == r["lam"].shape
    assert _rel(hg, r["closed"]) < tol


def test_closed_form_with_true_inverse():
    r = _ridge()

    def inverse_hvp(v):
        return (torch.linalg.solve(r["K"], v[0]),)

    (hg,) = implicit_grad(
        r["inner"],
        r["outer"],
        (r["w"],),
        (r["lam"],),
        method="closed_form",
        inverse_hvp=inverse_hvp,
    )
    assert _rel(hg, r["closed"]) < 1e-8


def test_neumann_converges_as_iterations_grow():
    r = _ridge()
    alpha = 0.25 / float(torch.linalg.eigvalsh(r["K"]).max())  # slow on purpose
    errs = []
    for J in (1, 4, 16, 64, 256):
        (hg,) = implicit_grad(
            r["inner"],
            r["outer"],
            (r["w"],),
            (r["lam"],),
            method="neumann",
            iterations=J,
            alpha=alpha,
        )
        errs.append(_rel(hg, r["closed"]))
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-4, errs
    assert errs[0] > 1e-2, errs  # one term is far from H^-1 v: the test can fail


def test_neumann_scale_convention_is_inverse_hessian():
    # H = h I: alpha * sum_{j<J} (1 - alpha h)^j -> 1/h, not 1/(alpha h)
    h = 4.0
    from metaopt.hypergrad import neumann_solve

    (x,) = neumann_solve(
        lambda u: (h * u[0],), (torch.ones(3, dtype=D),), iterations=200, alpha=0.1
    )
    torch.testing.assert_close(x, torch.full((3,), 1 / h, dtype=D))


def test_direct_term_is_included():
    r = _ridge()

    def outer(params, hparams):
        return r["outer"](params, hparams) + 0.1 * (hparams[0] ** 2).sum()

    (hg,) = implicit_grad(r["inner"], outer, (r["w"],), (r["lam"],), method="exact")
    assert _rel(hg, r["closed"] + 0.2 * r["lam"]) < 1e-8


def test_float32_runs_and_keeps_dtype():
    r = _ridge(dtype=torch.float32)
    for method in ("neumann", "cg", "exact"):
        opts = {"alpha": 0.3, "iterations": 100} if method == "neumann" else {}
        (hg,) = implicit_grad(r["inner"], r["outer"], (r["w"],), (r["lam"],), method=method, **opts)
        assert hg.dtype == torch.float32
        assert _rel(hg.double(), r["closed"]) < 1e-3


def test_unused_hparam_gets_zero_and_no_graph_is_returned():
    r = _ridge()
    spare = torch.ones(2, dtype=D, requires_grad=True)
    hg = implicit_grad(
        lambda p, h: r["inner"](p, h[:1]),
        r["outer"],
        (r["w"],),
        (r["lam"], spare),
        method="cg",
    )
    assert torch.equal(hg[1], torch.zeros(2, dtype=D))
    assert all(not t.requires_grad and t.grad_fn is None for t in hg)
    assert spare.grad is None


@pytest.mark.parametrize(
    ("bad", "term"),
    [("outer", "outer_grad"), ("direct", "direct"), ("inverse", "inverse_hvp"), ("mixed", "mixed")],
)
def test_non_finite_terms_are_named(bad, term):
    r = _ridge()
    inf = torch.tensor(float("inf"), dtype=D)

    def outer(params, hparams):
        val = r["outer"](params, hparams)
        if bad == "outer":
            val = val + inf * params[0].sum()
        if bad == "direct":
            val = val + inf * hparams[0].sum()
        return val

    def inner(params, hparams):
        val = r["inner"](params, hparams)
        if bad == "mixed":
            val = val + inf * (params[0] * hparams[0]).sum()
        return val

    def inverse_hvp(v):
        return (v[0] * (inf if bad == "inverse" else 1.0),)

    with pytest.raises(NonFiniteHypergradient) as info:
        implicit_grad(
            inner, outer, (r["w"],), (r["lam"],), method="closed_form", inverse_hvp=inverse_hvp
        )
    assert info.value.term == term
    assert isinstance(info.value, FloatingPointError)


def test_bad_method_and_options_raise_value_error():
    r = _ridge()
    args = (r["inner"], r["outer"], (r["w"],), (r["lam"],))
    with pytest.raises(ValueError, match="method='newton'"):
        implicit_grad(*args, method="newton")
    with pytest.raises(ValueError, match="unknown option"):
        implicit_grad(*args, method="cg", alpha=0.1)
    with pytest.raises(ValueError, match="iterations=0"):
        implicit_grad(*args, method="neumann", iterations=0)
    with pytest.raises(ValueError, match="inverse_hvp"):
        implicit_grad(*args, method="closed_form")
    with pytest.raises(ValueError, match="inner_objective=None"):
        implicit_grad(None, *args[1:], method="cg")
    with pytest.raises(ValueError, match="inverse_mixed= replaces"):
        implicit_grad(
            *args, method="closed_form", inverse_hvp=lambda v: v, inverse_mixed=lambda *a: a
        )
    with pytest.raises(ValueError, match="inverse_mixed=3"):
        implicit_grad(*args, method="closed_form", inverse_mixed=3)
    with pytest.raises(ValueError, match="unknown option"):
        implicit_grad(*args, method="cg", inverse_mixed=lambda *a: a)
    with pytest.raises(ValueError, match="inner_grad returned shapes"):
        implicit_grad(*args, method="cg", inner_grad=lambda p, h: (p[0][:2],))


def test_inner_grad_option_matches_closed_form():
    r = _ridge()

    def inner_grad(params, hparams):  # d_w inner = X^T X w / n + lam * w - X^T y / n
        (w,), (lam,) = params, hparams
        return (r["K0"] @ w + lam * w - r["b"],)

    for method, opts in (("cg", {"tol": 1e-14}), ("exact", {})):
        (hg,) = implicit_grad(
            None, r["outer"], (r["w"],), (r["lam"],), method=method, inner_grad=inner_grad, **opts
        )
        assert _rel(hg, r["closed"]) < 1e-8
