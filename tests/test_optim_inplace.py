"""In-place base steps: bit-for-bit equal to their functional twins (the steps APO
differentiates) and equal to ``torch.optim`` (the independent oracle) over several steps."""

import pytest
import torch

from metaopt.optim import functional as F
from metaopt.optim import inplace as I

CASES = [
    ("sgd", {"lr": 0.1}, torch.optim.SGD, {"lr": 0.1}),
    ("sgdm", {"lr": 0.1, "momentum": 0.9}, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (
        "nesterov-wd",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ),
    ("rmsprop", {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8}, torch.optim.RMSprop, {"lr": 1e-2}),
    (
        "adam",
        {"lr": 1e-2, "weight_decay": 0.1},
        torch.optim.Adam,
        {"lr": 1e-2, "weight_decay": 0.1},
    ),
]
FUNCS = {
    "sgd": (F.sgd_step, I.sgd_step_),
    "sgdm": (F.sgd_step, I.sgd_step_),
    "nesterov-wd": (F.sgd_step, I.sgd_step_),
    "rmsprop": (F.rmsprop_step, I.rmsprop_step_),
    "adam": (F.adam_step, I.adam_step_),
}


def _grads(step, shapes):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


@pytest.mark.parametrize(("name", "hp", "torch_cls", "torch_hp"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_inplace_step_is_bitwise_its_functional_twin_and_matches_torch_optim(
    name, hp, torch_cls, torch_hp, tensor_lr
):
    functional, inplace = FUNCS[name]
    shapes = {"w": (4, 3), "b": (4,)}
    g0 = torch.Generator().manual_seed(0)
    start = {n: torch.randn(s, generator=g0) for n, s in shapes.items()}
    hp = dict(hp, lr=torch.tensor(hp["lr"])) if tensor_lr else hp
    fun_p, fun_s = dict(start), {}
    inp_p = {n: v.clone() for n, v in start.items()}
    inp_s: dict = {}
    ref = {n: torch.nn.Parameter(v.clone()) for n, v in start.items()}
    opt = torch_cls(list(ref.values()), **torch_hp)
    for t in range(5):
        grads = _grads(t, shapes)
        fun_p, fun_s = functional(fun_p, grads, fun_s, **hp)
        inplace(inp_p, {n: g.clone() for n, g in grads.items()}, inp_s, **hp)
        for n, p in ref.items():
            p.grad = grads[n].clone()
        opt.step()
    for n in shapes:
        assert torch.equal(inp_p[n], fun_p[n]), n
        torch.testing.assert_close(inp_p[n], ref[n].detach(), rtol=1e-5, atol=1e-6)
    assert set(inp_s) == set(fun_s)
    for k in fun_s:
        assert torch.equal(inp_s[k], fun_s[k]), k


def test_inplace_rmsprop_with_tensor_eps_and_power_is_bitwise_functional():
    shapes = {"w": (3, 2)}
    start = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(1))}
    hp = {"lr": torch.tensor(1e-2), "eps": torch.tensor(1e-3), "power": torch.tensor(0.4)}
    hp["eps_root"] = 1e-30
    fun_p, fun_s = dict(start), {}
    inp_p, inp_s = {"w": start["w"].clone()}, {}
    for t in range(4):
        grads = _grads(t, shapes)
        fun_p, fun_s = F.rmsprop_step(fun_p, grads, fun_s, **hp)
        I.rmsprop_step_(inp_p, grads, inp_s, **hp)
    assert torch.equal(inp_p["w"], fun_p["w"])
