"""One-step unrolls w.r.t. preconditioner meta-parameters on a small MLP (APO's lookahead).

Oracle: central finite differences in float64 (``check_hypergradient``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaopt.func import functional_forward, loss_and_grads
from metaopt.hypergrad import check_hypergradient, implicit_grad, unrolled_grad
from metaopt.kron import KroneckerPreconditioner
from metaopt.optim.rules import get_rule
from metaopt.optim.update import preconditioned_step

D = torch.float64
loss_fn = nn.functional.cross_entropy
SGD = get_rule("sgd")
SGD_HP = SGD.hparams()


def _sgd_step(params, grads, pre, lr):
    """``theta - lr P g`` (one functional SGD step through the preconditioner)."""
    states = {n: SGD.init(p, SGD_HP) for n, p in params.items()}
    return preconditioned_step(params, grads, states, pre, SGD, SGD_HP, lr, count=1)[0]


class _Stepper(nn.Module):
    """Holds the preconditioner so that ``functional_call`` can swap in meta-parameters."""

    def __init__(self, pre: KroneckerPreconditioner, lr: float) -> None:
        super().__init__()
        self.pre, self.lr = pre, lr

    def forward(self, params, grads):
        return _sgd_step(params, grads, self.pre, self.lr)


def _setup(family, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    pre = KroneckerPreconditioner.for_model(model, family, **options).to(D)
    stepper = _Stepper(pre, lr=0.5)
    names = [n for n, _ in model.named_parameters()]
    meta_names = [f"pre.{n}" for n, _ in pre.named_parameters()]
    hparams = tuple(p.detach().clone() for p in pre.parameters())
    params = tuple(p.detach().clone() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 4, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g))
    val = (torch.randn(16, 4, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g))
    forward = functional_forward(model)

    def apply_step(p, h, grads):
        return functional_call(stepper, dict(zip(meta_names, h, strict=True)), (p, grads))

    def step(params, hparams):  # reverse mode: autograd gradients with create_graph
        p = dict(zip(names, params, strict=True))
        _, grads = loss_and_grads(forward, loss_fn, p, batch, create_graph=True)
        new = apply_step(p, hparams, grads)
        return tuple(new[n] for n in names)

    def pure_step(params, hparams):  # forward mode: torch.func.grad
        p = dict(zip(names, params, strict=True))
        grads = torch.func.grad(lambda q: loss_fn(forward(q, batch[0]), batch[1]))(p)
        new = apply_step(p, hparams, grads)
        return tuple(new[n] for n in names)

    def outer(params, hparams):
        return loss_fn(forward(dict(zip(names, params, strict=True)), val[0]), val[1])

    def meta_objective(h):  # the whole lookahead from the meta-parameters, for the check
        theta = tuple(p.detach().requires_grad_(True) for p in params)
        return outer(step(theta, h), h)

    return step, pure_step, outer, params, hparams, meta_objective


@pytest.mark.parametrize(
    ("family", "options"),
    [("ekfac-shaped", {"init_scale": 0.3}), ("lowrank", {"rank": 2, "init_scale": 0.8})],
)
def test_one_step_unroll_matches_finite_differences(family, options):
    step, _, outer, params, hparams, meta_objective = _setup(family, **options)
    hg = unrolled_grad(step, outer, params, hparams, steps=1)
    assert [h.shape for h in hg] == [h.shape for h in hparams]
    assert max(float(h.abs().max()) for h in hg) > 1e-6  # a non-trivial hypergradient
    assert check_hypergradient(meta_objective, hparams, hg) < 1e-6
    wrong = tuple(1.01 * h for h in hg)  # a 1% error is detected
    assert check_hypergradient(meta_objective, hparams, wrong) > 5e-3


def test_forward_mode_through_a_preconditioned_step_matches_reverse():
    step, pure_step, outer, params, hparams, _ = _setup("lowrank", rank=1, init_scale=0.8)
    rev = unrolled_grad(step, outer, params, hparams, steps=1)
    fwd = unrolled_grad(pure_step, outer, params, hparams, steps=1, mode="forward")
    for a, b in zip(fwd, rev, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_closed_form_lowrank_bregman_matches_exact_cg_and_finite_differences():
    """MetaMD's inner problem: ``min_theta <g, theta> + B_M(theta, theta_1)`` has
    ``theta* = theta_1 - M^{-1} g`` and Hessian ``M``, so ``closed_form`` with the lowrank
    family's ``apply`` (``M^{-1}`` by Woodbury) must equal the dense-Hessian ``exact``
    engine, CG, and finite differences of the validation loss at ``theta*(phi)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    pre = KroneckerPreconditioner.for_model(
        model, "lowrank", rank=1, init_scale=0.8, learn_scale=True
    ).to(D)
    with torch.no_grad():
        for blk in pre.blocks.values():
            if hasattr(blk, "log_scale"):
                blk.log_scale.fill_(0.3)
    names = [n for n, _ in model.named_parameters()]
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    g1 = {n: torch.randn(p.shape, generator=g, dtype=D) for n, p in ref.items()}
    val = (torch.randn(16, 4, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g))
    forward = functional_forward(model)
    meta = tuple(pre.parameters())  # captured by the closures: the module's own tensors

    def inner(theta, h):
        linear = sum((g1[n] * t).sum() for n, t in zip(names, theta, strict=True))
        return linear + pre.bregman(dict(zip(names, theta, strict=True)), ref)

    def outer(theta, h):
        return loss_fn(forward(dict(zip(names, theta, strict=True)), val[0]), val[1])

    with torch.no_grad():
        step = pre.apply(g1)
    theta_star = tuple(ref[n] - step[n] for n in names)

    def inverse_hvp(v):
        out = pre.apply(dict(zip(names, v, strict=True)))
        return tuple(out[n] for n in names)

    cf = implicit_grad(
        inner, outer, theta_star, meta, method="closed_form", inverse_hvp=inverse_hvp
    )
    exact = implicit_grad(inner, outer, theta_star, meta, method="exact")

    def inner_grad(theta, h):  # g + M (theta - theta_1), M applied block by block
        delta = {n: t - ref[n] for n, t in zip(names, theta, strict=True)}
        m_delta = pre.metric_apply(delta)
        return tuple(g1[n] + m_delta[n] for n in names)

    cf_grad = implicit_grad(
        None,
        outer,
        theta_star,
        meta,
        method="closed_form",
        inverse_hvp=inverse_hvp,
        inner_grad=inner_grad,
    )
    cf_mixed = implicit_grad(  # both terms analytic: M^{-1} by Woodbury, mixed by thin products
        None,
        outer,
        theta_star,
        meta,
        method="closed_form",
        inverse_hvp=inverse_hvp,
        mixed_product=lambda u, theta, h: pre.bregman_mixed(
            dict(zip(names, u, strict=True)), dict(zip(names, theta, strict=True)), ref
        ),
    )
    cf_fused = implicit_grad(  # the whole implicit term in one call, M^{-1} v never formed
        None,
        outer,
        theta_star,
        meta,
        method="closed_form",
        inverse_mixed=lambda v, theta, h: pre.bregman_inverse_mixed(
            dict(zip(names, v, strict=True)), dict(zip(names, theta, strict=True)), ref
        ),
    )
    cg = implicit_grad(inner, outer, theta_star, meta, method="cg", iterations=200, tol=1e-14)
    scale = max(float(t.abs().max()) for t in exact)
    assert scale > 1e-6
    for a, b, c, d, e, f in zip(cf, exact, cg, cf_grad, cf_mixed, cf_fused, strict=True):
        assert float((a - b).abs().max()) <= 1e-8 * scale
        assert float((d - b).abs().max()) <= 1e-8 * scale
        assert float((e - b).abs().max()) <= 1e-8 * scale
        assert float((f - b).abs().max()) <= 1e-8 * scale
        assert float((c - b).abs().max()) <= 1e-6 * scale
    assert all(p.grad is None for p in meta)  # engines never write .grad

    meta_names = [n for n, _ in pre.named_parameters()]

    def val_at(h):  # theta*(phi) = theta_1 - M(phi)^{-1} g, evaluated functionally
        d = functional_call(pre, dict(zip(meta_names, h, strict=True)), (g1,))
        return outer(tuple(ref[n] - d[n] for n in names), h)

    assert check_hypergradient(val_at, meta, cf) < 1e-6


def test_captured_module_parameters_as_hparams_match_functional_version():
    """APO's shape: hparams are the preconditioner's own parameters and the step calls
    ``preconditioned_step`` with ``pre`` directly; same answer as swapping copies in."""
    step, _, outer, params, hparams, _ = _setup("ekfac-shaped", init_scale=0.3)
    functional = unrolled_grad(step, outer, params, hparams, steps=1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    pre = KroneckerPreconditioner.for_model(model, "ekfac-shaped", init_scale=0.3).to(D)
    names = [n for n, _ in model.named_parameters()]
    forward = functional_forward(model)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(16, 4, generator=g, dtype=D), torch.randint(0, 3, (16,), generator=g))

    def captured_step(theta, h):
        p = dict(zip(names, theta, strict=True))
        _, grads = loss_and_grads(forward, loss_fn, p, batch, create_graph=True)
        new = _sgd_step(p, grads, pre, 0.5)
        return tuple(new[n] for n in names)

    captured = unrolled_grad(captured_step, outer, params, tuple(pre.parameters()), steps=1)
    for a, b in zip(captured, functional, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in pre.parameters())
