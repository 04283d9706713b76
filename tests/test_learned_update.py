"""The learned optimizer's update: P composed with a rule, against torch.optim and dense P."""

import copy

import pytest
import torch
from torch import nn

from metaopt.kron import KroneckerPreconditioner
from metaopt.optim import Preconditioned
from metaopt.optim.rules import get_rule
from metaopt.optim.update import preconditioned_step

TORCH = {
    "sgd": (torch.optim.SGD, {}),
    "sgdm": (torch.optim.SGD, {"momentum": 0.9}),
    "nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.01}),
    "rmsprop": (torch.optim.RMSprop, {}),
}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 6 * 6, 5),
                         nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4))  # fmt: skip


def _train(model, opt, steps=15):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("rule", sorted(TORCH))
def test_without_a_preconditioner_each_rule_is_torch_optim_bit_for_bit(rule):
    cls, hp = TORCH[rule]
    a, b = _model(), _model()
    _train(a, cls(a.parameters(), lr=0.01, foreach=False, **hp))
    _train(b, Preconditioned(b.named_parameters(), None, lr=0.01, rule=rule))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("rule", ["sgdm", "adam"])
@pytest.mark.parametrize("compose", ["gradient", "direction"])
def test_identity_valued_lowrank_stays_the_rule(rule, compose):
    # U = V = 0, c = 1 is the identity: the Woodbury path adds exact zeros, but its last
    # step is add(alpha) where torch uses addcdiv, so agreement is to rounding, not bits
    # (no batch norm here: the gradient of a bias in front of it is rounding noise, which
    # Adam's sign-like first steps amplify)
    cls, hp = TORCH[rule]
    torch.manual_seed(0)
    a = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(108, 5), nn.Tanh(), nn.Linear(5, 4)
    )
    b = copy.deepcopy(a)
    pre = KroneckerPreconditioner.for_model(b, "lowrank", rank=2, learn_scale=True)
    with torch.no_grad():
        for p in pre.parameters():
            p.zero_()
    _train(a, cls(a.parameters(), lr=0.01, foreach=False, **hp))
    _train(b, Preconditioned(b.named_parameters(), pre, lr=0.01, rule=rule, compose=compose))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _dense_adam_oracle(pre, model, compose, lr, steps_grads):
    """theta_{t+1} = theta_t - lr * adam(P g) or - lr * P adam(g), with P = pre.dense()
    applied to the flattened row-major vector of every block, in float64."""
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    P = pre.dense().double()
    order = [n for view in pre.views for n in view.params]

    def apply_P(d):
        # dense() acts on the parameters flattened row-major in named_parameters() order
        out = P @ torch.cat([d[n].reshape(-1) for n in names])
        parts = out.split([d[n].numel() for n in names])
        return {n: x.reshape(d[n].shape) for n, x in zip(names, parts, strict=True)}

    assert sorted(order) == sorted(names)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t, g in enumerate(steps_grads, start=1):
        g = {n: x.double() for n, x in g.items()}
        if compose == "gradient":
            g = apply_P(g)
        d = {}
        for n in names:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            d[n] = (m[n] / (1 - b1**t)) / ((v[n] ** 0.5) / (1 - b2**t) ** 0.5 + eps)
        if compose == "direction":
            d = apply_P(d)
        theta = {n: theta[n] - lr * d[n] for n in names}
    return theta


@pytest.mark.parametrize("compose", ["gradient", "direction"])
@pytest.mark.parametrize("family", ["lowrank", "ekfac-shaped", "diag"])
def test_adam_with_a_preconditioner_equals_the_dense_oracle(compose, family):
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opts = {"rank": 2, "learn_scale": True} if family == "lowrank" else {}
    pre = KroneckerPreconditioner.for_model(model, family, **opts).double()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model = model.double()
    initial = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    seq = [{n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in
            model.named_parameters()} for _ in range(4)]  # fmt: skip
    want = _dense_adam_oracle(pre, model, compose, 0.05, seq)
    opt = Preconditioned(model.named_parameters(), pre, lr=0.05, rule="adam", compose=compose)
    for g in seq:
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-10, atol=1e-12)
    # the functional twin (meta-training's update) computes the same steps
    rule = get_rule("adam")
    hp = rule.hparams()
    theta = {n: p.detach().clone() for n, p in initial.named_parameters()}
    states = {n: rule.init(t, hp) for n, t in theta.items()}
    for t, g in enumerate(seq, start=1):
        theta, states = preconditioned_step(theta, g, states, pre, rule, hp, 0.05,
                                            compose=compose, count=t)  # fmt: skip
    for n in want:
        torch.testing.assert_close(theta[n], want[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("compose", ["gradient", "direction"])
def test_a_tensor_lr_steps_a_weight_and_bias_block_like_the_dense_oracle(compose):
    # a tensor lr makes Adam's step size lr / (1 - b1^t) a new tensor per parameter; with one
    # count for the whole block they are one step size, and theta_T is linear in lr (the
    # gradients are given), so d(sum theta_T)/d lr = sum(theta_T - theta_0) / lr
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    pre = KroneckerPreconditioner.for_model(model, "ekfac-shaped").double()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(5)
    seq = [{n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in
            model.named_parameters()} for _ in range(3)]  # fmt: skip
    want = _dense_adam_oracle(pre, model, compose, 0.05, seq)
    rule = get_rule("adam")
    hp = rule.hparams()
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = {n: rule.init(t, hp) for n, t in theta.items()}
    for t, g in enumerate(seq, start=1):
        theta, states = preconditioned_step(theta, g, states, pre, rule, hp, lr,
                                            compose=compose, count=t)  # fmt: skip
    for n in want:
        torch.testing.assert_close(theta[n], want[n], rtol=1e-10, atol=1e-12)
    (dlr,) = torch.autograd.grad(sum(t.sum() for t in theta.values()), lr)
    moved = sum((want[n] - p.detach()).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(dlr, moved / 0.05, rtol=1e-9, atol=1e-12)


def test_an_in_place_block_at_two_steps_of_the_rule_is_refused_naming_its_parameters():
    from metaopt.optim.update import block_step

    model = nn.Linear(4, 3)
    pre = KroneckerPreconditioner.for_model(model, "ekfac-shaped")
    (view,) = pre.views
    rule = get_rule("adam")
    hp = rule.hparams()
    params = [model.weight.detach(), model.bias.detach()]
    states = [rule.init(p, hp) for p in params]
    states[0].step.fill_(4)  # the weight has taken four steps, the bias none
    grads = [torch.ones_like(p) for p in params]
    with pytest.raises(ValueError, match="different steps of the rule") as err:
        block_step(pre.block(view), view, params, grads, states, rule, hp, 0.01,
                   compose="direction", inplace=True)  # fmt: skip
    # step sizes lr / (1 - 0.9^t): t = 5 for the weight, t = 1 for the bias
    assert f"weight: {0.01 / (1 - 0.9**5):.6g}, bias: {0.01 / (1 - 0.9):.6g}" in str(err.value)


@pytest.mark.parametrize("rule", ["adam", "adamw", "rmsprop"])
def test_the_step_counter_is_kept_on_the_cpu_like_torch_optim(rule):
    # the meta device stands in for an accelerator: reading a counter kept beside the
    # parameters fails there, as it would wait for the device on a GPU
    cls, hp = TORCH[rule]
    ours = nn.Linear(3, 2, device="meta")
    theirs = nn.Linear(3, 2, device="meta")
    for m in (ours, theirs):
        for p in m.parameters():
            p.grad = torch.empty_like(p)
    ref = cls(theirs.parameters(), lr=0.01, foreach=False, **hp)
    opt = Preconditioned(ours.named_parameters(), None, lr=0.01, rule=rule)
    for _ in range(2):
        ref.step()
        opt.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        mine, want = opt.state[p]["step"], ref.state[q]["step"]
        assert (mine.device, mine.dtype, float(mine)) == (want.device, want.dtype, float(want))
