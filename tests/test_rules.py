"""Update-rule kernels against torch.optim (bit for bit) and their functional twins."""

import pytest
import torch

from metaopt.optim.rules import RULES, get_rule

CASES = [
    ("sgd", torch.optim.SGD, {}, {}),
    ("sgd", torch.optim.SGD, {"weight_decay": 1e-2}, {"weight_decay": 1e-2}),
    ("sgdm", torch.optim.SGD, {}, {"momentum": 0.9}),
    ("sgdm", torch.optim.SGD, {"weight_decay": 1e-3}, {"momentum": 0.9, "weight_decay": 1e-3}),
    ("nesterov", torch.optim.SGD, {}, {"momentum": 0.9, "nesterov": True}),
    ("adam", torch.optim.Adam, {}, {}),
    ("adam", torch.optim.Adam, {"weight_decay": 1e-2, "betas": (0.8, 0.99)},
     {"weight_decay": 1e-2, "betas": (0.8, 0.99)}),
    ("adamw", torch.optim.AdamW, {}, {}),
    ("rmsprop", torch.optim.RMSprop, {}, {}),
    ("rmsprop", torch.optim.RMSprop, {"momentum": 0.5, "weight_decay": 1e-3},
     {"momentum": 0.5, "weight_decay": 1e-3}),
]  # fmt: skip


def _run_kernel(name, hp_over, lr, params, grads_seq, inplace):
    rule = get_rule(name)
    hp = rule.hparams(hp_over)
    params = [p.clone() for p in params]
    states = [rule.init(p, hp) for p in params]
    for t, grads in enumerate(grads_seq, start=1):
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            p2, g2 = rule.decay(p, g, hp, lr, inplace=inplace)
            d, states[i] = rule.direction(
                g2, states[i], hp, lr, inplace=inplace, count=None if inplace else t
            )
            params[i] = d.apply(p2, inplace=inplace)
    return params


@pytest.mark.parametrize("name,cls,hp,torch_hp", CASES)
def test_kernel_equals_torch_optim_bit_for_bit(name, cls, hp, torch_hp):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 5, generator=gen), torch.randn(5, generator=gen)]
    grads_seq = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(25)]
    grads_seq[3][1][2] = 0.0  # a zero gradient entry
    lr = 0.03
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = cls(ref, lr=lr, foreach=False, **torch_hp)
    for grads in grads_seq:
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    for inplace in (True, False):
        got = _run_kernel(name, hp, lr, params, grads_seq, inplace)
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a, b.detach()), (name, inplace)


def test_functional_sqrt_has_a_finite_derivative_at_a_zero_second_moment():
    rule = get_rule("adam")
    hp = rule.hparams()
    p = torch.zeros(3)
    g = torch.tensor([0.0, 1.0, -2.0], requires_grad=True)
    state = rule.init(p, hp)
    d, _ = rule.direction(g, state, hp, 0.1, inplace=False, count=1)
    (dg,) = torch.autograd.grad(d.apply(p, inplace=False).sum(), g)
    assert torch.isfinite(dg).all()
    # the derivative of the bias-corrected step at t=1 away from 0 is 0 (m/sqrt(v) = sign g)
    assert torch.allclose(dg[1:], torch.zeros(2), atol=1e-6)


def test_unknown_and_bad_hyperparameters_are_one_line_errors():
    with pytest.raises(ValueError, match=r"rule 'adam': unknown hyperparameters \['momentum'\]"):
        get_rule("adam").hparams({"momentum": 0.9})
    with pytest.raises(ValueError, match=r"momentum=1.5: must be a number in \[0.0, 1.0\)"):
        get_rule("sgd").hparams({"momentum": 1.5})
    with pytest.raises(ValueError, match="nesterov=True: needs momentum > 0"):
        get_rule("sgd").hparams({"nesterov": True})
    with pytest.raises(ValueError, match="rule='lion' is unknown"):
        get_rule("lion")
    assert RULES.available() == ["adam", "adamw", "nesterov", "rmsprop", "sgd", "sgdm"]
