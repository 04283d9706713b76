"""In-place base steps (``block_step(..., inplace=True)``, what the deployed optimizer and
APO's real update run): bit-for-bit equal to their functional twins
(:func:`~metaopt.optim.update.preconditioned_step`, what meta-training and APO's lookahead
differentiate) and equal to ``torch.optim`` (the independent oracle) over several steps,
also with tensor hyperparameters (APO's learned lr, eps, rho)."""

import pytest
import torch

from metaopt.optim.rules import get_rule
from metaopt.optim.update import block_step, preconditioned_step

CASES = [
    ("sgd", "sgd", {}, 0.1, torch.optim.SGD, {"lr": 0.1}),
    ("sgdm", "sgd", {"momentum": 0.9}, 0.1, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (
        "nesterov-wd",
        "sgd",
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        0.05,
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    ("rmsprop", "rmsprop", {"alpha": 0.99, "eps": 1e-8}, 1e-2, torch.optim.RMSprop, {"lr": 1e-2}),
    (
        "adam",
        "adam",
        {"weight_decay": 0.1},
        1e-2,
        torch.optim.Adam,
        {"lr": 1e-2, "weight_decay": 0.1},
    ),
]


def _grads(step, shapes):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


def _twins(rule_name, hp, lr, start, steps):
    """``(functional params, functional states, in-place params, in-place states)`` after
    ``steps`` steps of the rule from ``start`` on the same gradients."""
    rule = get_rule(rule_name)
    hp = rule.hparams(hp)
    names = list(start)
    fun_p = dict(start)
    fun_s = {n: rule.init(p, hp) for n, p in start.items()}
    inp_p = {n: v.clone() for n, v in start.items()}
    inp_s = [rule.init(inp_p[n], hp) for n in names]
    for t in range(steps):
        grads = _grads(t, {n: v.shape for n, v in start.items()})
        fun_p, fun_s = preconditioned_step(fun_p, grads, fun_s, None, rule, hp, lr, count=t + 1)
        _, inp_s = block_step(
            None, None, [inp_p[n] for n in names], [grads[n].clone() for n in names], inp_s,
            rule, hp, lr, inplace=True,
        )  # fmt: skip
    return fun_p, fun_s, inp_p, dict(zip(names, inp_s, strict=True))


def _assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert type(a[n]) is type(b[n])
        for field, x, y in zip(a[n]._fields, a[n], b[n], strict=True):
            assert (x is None) == (y is None), (n, field)
            if x is not None:
                assert torch.equal(x, y), (n, field)


@pytest.mark.parametrize(
    ("name", "rule", "hp", "lr", "torch_cls", "torch_hp"), CASES, ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_inplace_step_is_bitwise_its_functional_twin_and_matches_torch_optim(
    name, rule, hp, lr, torch_cls, torch_hp, tensor_lr
):
    shapes = {"w": (4, 3), "b": (4,)}
    g0 = torch.Generator().manual_seed(0)
    start = {n: torch.randn(s, generator=g0) for n, s in shapes.items()}
    fun_p, fun_s, inp_p, inp_s = _twins(
        rule, hp, torch.tensor(lr) if tensor_lr else lr, start, steps=5
    )
    ref = {n: torch.nn.Parameter(v.clone()) for n, v in start.items()}
    opt = torch_cls(list(ref.values()), **torch_hp)
    for t in range(5):
        grads = _grads(t, shapes)
        for n, p in ref.items():
            p.grad = grads[n].clone()
        opt.step()
    for n in shapes:
        assert torch.equal(inp_p[n], fun_p[n]), n
        torch.testing.assert_close(inp_p[n], ref[n].detach(), rtol=1e-5, atol=1e-6)
    _assert_states_equal(inp_s, fun_s)


def test_inplace_rmsprop_with_tensor_eps_and_power_is_bitwise_functional():
    start = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(1))}
    hp = {"eps": torch.tensor(1e-3), "power": torch.tensor(0.4), "eps_root": 1e-30}
    fun_p, fun_s, inp_p, inp_s = _twins("rmsprop", hp, torch.tensor(1e-2), start, steps=4)
    assert torch.equal(inp_p["w"], fun_p["w"])
    _assert_states_equal(inp_s, fun_s)
