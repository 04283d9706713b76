"""One-step unrolls w.r.t. preconditioner meta-parameters on a small MLP (APO's lookahead).

Oracle: central finite differences in float64 (``check_hypergradient``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaopt.func import functional_forward, loss_and_grads
from metaopt.hypergrad import check_hypergradient, unrolled_grad
from metaopt.kron import KroneckerPreconditioner
from metaopt.optim.functional import preconditioned_step

D = torch.float64
loss_fn = nn.functional.cross_entropy


class _Stepper(nn.Module):
    """Holds the preconditioner so that ``functional_call`` can swap in meta-parameters."""

    def __init__(self, pre: KroneckerPreconditioner, lr: float) -> None:
        super().__init__()
        self.pre, self.lr = pre, lr

    def forward(self, params, grads):
        return preconditioned_step(params, grads, self.pre, lr=self.lr)[0]


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
    [("ekfac", {"init_scale": 0.3}), ("lowrank", {"rank": 2, "init_scale": 0.8})],
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
