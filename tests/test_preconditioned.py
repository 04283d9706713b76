"""The deployable optimizer and the functional steps against torch.optim and dense oracles."""

import copy

import pytest
import torch
from torch import nn

from metaopt.kron import KroneckerPreconditioner
from metaopt.optim import Preconditioned
from metaopt.optim.rules import get_rule
from metaopt.optim.update import preconditioned_step


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.BatchNorm1d(5),
        nn.Linear(5, 2),
    )


def _data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 2, (8,), generator=g)


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x, y = _data(i)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize(
    "hp",
    [
        dict(momentum=0.0),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True),
        dict(momentum=0.5, weight_decay=1e-2),
    ],
)
@pytest.mark.parametrize("family", ["ekfac-shaped", "lowrank"])
def test_identity_preconditioner_matches_sgd(family, hp):
    ref, ours = _net(), _net()
    pre = KroneckerPreconditioner.for_model(ours, family, init_scale=0.0)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, **hp)
    opt = Preconditioned(ours.named_parameters(), pre, lr=0.05, **hp)
    _train(ref, sgd, 50)
    _train(ours, opt, 50)
    for (n, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=n)


@pytest.mark.parametrize(
    "family, options",
    [
        ("rank1", {}),
        ("lowrank", {"rank": 2, "learn_scale": True}),
        ("diag", {}),
        ("scalar", {}),
        ("ekfac-shaped", {}),
    ],
)
def test_nonidentity_step_matches_dense_oracle(family, options):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    pre = KroneckerPreconditioner.for_model(model, family, **options).double()
    with torch.no_grad():
        for p in pre.parameters():
            p.normal_(std=0.5)
    P = pre.dense()
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buf = torch.zeros_like(theta)
    opt = Preconditioned(list(model.parameters()), pre, lr=0.1, momentum=0.9, weight_decay=0.01)
    for i in range(3):
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        g = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names])
        d = P @ (g + 0.01 * theta)
        buf = d if i == 0 else 0.9 * buf + d
        theta = theta - 0.1 * buf
        opt.step()
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, theta)


def test_state_dict_resume_scheduler_and_param_groups():
    base = _net()
    pre = KroneckerPreconditioner.for_model(base, "rank1")
    with torch.no_grad():
        for p in pre.parameters():
            p.normal_(0, 0.3)
    full = copy.deepcopy(base)
    opt_full = Preconditioned(full.named_parameters(), pre, lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt_full, step_size=5, gamma=0.5)
    for i in range(12):
        _train(full, opt_full, 1, start=i)
        sched.step()

    part = copy.deepcopy(base)
    opt_a = Preconditioned(part.named_parameters(), pre, lr=0.05, momentum=0.9)
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=5, gamma=0.5)
    for i in range(7):
        _train(part, opt_a, 1, start=i)
        sched_a.step()
    saved_model = copy.deepcopy(part.state_dict())
    saved_opt, saved_sched = copy.deepcopy(opt_a.state_dict()), sched_a.state_dict()

    resumed = _net()
    resumed.load_state_dict(saved_model)
    opt_b = Preconditioned(resumed.named_parameters(), pre, lr=0.05, momentum=0.9)
    opt_b.load_state_dict(saved_opt)
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=5, gamma=0.5)
    sched_b.load_state_dict(saved_sched)
    for i in range(7, 12):
        _train(resumed, opt_b, 1, start=i)
        sched_b.step()
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_param_group_options_and_errors():
    model = nn.Linear(3, 2)
    pre = KroneckerPreconditioner.for_model(model, "diag")
    groups = [
        {"params": [model.weight], "param_names": ["weight"], "lr": 0.1},
        {"params": [model.bias], "param_names": ["bias"], "lr": 0.0},
    ]
    opt = Preconditioned(groups, pre, lr=1.0)
    before = model.bias.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert torch.equal(model.bias, before)
    with pytest.raises(ValueError, match="momentum=1.5"):
        Preconditioned(model.named_parameters(), pre, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="nesterov=True: needs momentum"):
        Preconditioned(model.named_parameters(), pre, lr=0.1, nesterov=True)
    other = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"'weight' has shape \(2, 4\)"):
        Preconditioned(other.named_parameters(), pre, lr=0.1)
    # a Kronecker block couples a layer's weight and bias: splitting them across groups
    # (as "no weight decay on biases" recipes do) is refused with the block named
    kron = KroneckerPreconditioner.for_model(model, "rank1")
    split = Preconditioned(groups, kron, lr=1.0)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(ValueError, match=r"block '<root>' couples \['weight', 'bias'\]"):
        split.step()


# --- functional twins ----------------------------------------------------------------------
def _functional(rule_name, pre=None, lr=0.1, **hp):
    """``step(params, grads, states, count)``: one functional step of the rule (with
    ``pre`` as the preconditioner); ``states`` start empty."""
    rule = get_rule(rule_name)
    hp = rule.hparams(hp)

    def step(params, grads, states, count):
        states = states or {n: rule.init(p, hp) for n, p in params.items()}
        return preconditioned_step(params, grads, states, pre, rule, hp, lr, count=count)

    return step


def _steps(fn, opt_cls, okw, steps=6):
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = opt_cls(model.parameters(), **okw)
    state = {}
    for i in range(steps):
        grads = {n: torch.sin((i + 1) * params[n]) + 0.1 for n in params}
        for p in model.parameters():
            p.grad = torch.sin((i + 1) * p.detach()) + 0.1
        opt.step()
        params, state = fn(params, grads, state, i + 1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(params[n], p.detach(), rtol=1e-12, atol=1e-12)


def test_functional_steps_match_torch_optim():
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    _steps(_functional("sgd", **kw), torch.optim.SGD, kw)
    kw = dict(lr=0.01, alpha=0.9, eps=1e-8, momentum=0.5, weight_decay=0.01)
    _steps(_functional("rmsprop", **kw), torch.optim.RMSprop, kw)
    kw = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01)
    _steps(_functional("adam", **kw), torch.optim.Adam, kw)


def test_functional_preconditioned_step_matches_optimizer_and_is_differentiable():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    pre = KroneckerPreconditioner.for_model(model, "ekfac-shaped").double()
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.2 * torch.randn_like(p))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = Preconditioned(model.named_parameters(), pre, lr=0.1, momentum=0.9, weight_decay=0.1)
    step = _functional("sgd", pre, lr=0.1, momentum=0.9, weight_decay=0.1)
    state = {}
    for i in range(3):
        grads = {n: torch.cos((i + 1) * params[n]) for n in params}
        for p in model.parameters():
            p.grad = torch.cos((i + 1) * p.detach())
        opt.step()
        params, state = step(params, grads, state, i + 1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(params[n], p.detach())
    loss = sum(v.pow(2).sum() for v in params.values())
    grads = torch.autograd.grad(loss, list(pre.parameters()))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("eps_root", [0.0, 1e-12])
def test_rmsprop_meta_gradient_in_rho_at_a_zero_second_moment_is_the_closed_form(eps_root):
    """d/d rho of ``w - lr g / ((v + eps_root)^rho + eps)`` with ``v = (1 - alpha) g^2``;
    an entry with ``g = 0`` (``v = 0``: ``0 * log 0`` in the chain) contributes 0, so the
    meta-gradient is finite with or without ``eps_root``."""
    lr, alpha, eps = 0.1, 0.99, 1e-8
    rho = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    step = _functional("rmsprop", lr=lr, alpha=alpha, eps=eps, power=rho, eps_root=eps_root)
    new, _ = step({"w": torch.ones(3, dtype=torch.float64)}, {"w": g}, {}, 1)
    (got,) = torch.autograd.grad(new["w"].sum(), rho)
    v = (1 - alpha) * g[1:] ** 2 + eps_root
    expected = (lr * g[1:] * v**0.9 * v.log() / (v**0.9 + eps) ** 2).sum()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "hp",
    [
        dict(momentum=0.0),
        dict(momentum=0.9, nesterov=True, weight_decay=0.01),
        dict(momentum=0.5),
    ],
)
@pytest.mark.parametrize(
    "family, options",
    [
        ("rank1", {}),
        ("lowrank", {"rank": 2}),
        ("lowrank", {"rank": 2, "learn_scale": True}),
        ("ekfac-shaped", {}),
    ],
)
def test_lowrank_steps_match_dense_oracle_all_paths(family, options, hp):
    """Every branch of the in-place lowrank path (plain, heavy ball, Nesterov, weight decay,
    learn_scale, rank > 1, a bias-free layer, a skipped parameter) against the dense P."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3, bias=False), nn.Linear(3, 2))
    model = model.double()
    pre = KroneckerPreconditioner.for_model(model, family, skip=r"^3\.bias$", **options).double()
    with torch.no_grad():
        for p in pre.parameters():
            p.normal_(std=0.5)
    P = pre.dense()
    lr, mom, wd = 0.1, hp.get("momentum", 0.0), hp.get("weight_decay", 0.0)
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buf = torch.zeros_like(theta)
    opt = Preconditioned(model.named_parameters(), pre, lr=lr, **hp)
    for i in range(4):
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        g = torch.cat([dict(model.named_parameters())[n].grad.reshape(-1) for n in names])
        d = P @ (g + wd * theta)
        if mom:
            buf = d if i == 0 else mom * buf + d
            d = d + mom * buf if hp.get("nesterov") else buf
        theta = theta - lr * d
        opt.step()
        if i == 1:  # the cached factors must follow an in-place change of U, V
            with torch.no_grad():
                for p in pre.parameters():
                    p.mul_(0.8)
            P = pre.dense()
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, theta)
