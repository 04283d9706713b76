"""The optimizer name registry: every name builds and steps; errors name what is allowed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaopt.optim import registry
from metaopt.optim.registry import available_optimizers, get_optimizer, register_optimizer

MODEL_ONLY = {
    "kfac": "metaopt.optim.kfac",
    "ekfac": "metaopt.optim.kfac",
    "shampoo": "metaopt.optim.shampoo",
}
EXPECTED = [
    "sgd", "sgdm", "nesterov", "adam", "adamw", "rmsprop", "kfac", "ekfac", "shampoo",
    "sgd-hd", "sgdm-hd", "adam-hd", "l4-sgdm", "l4-adam", "powersign", "addsign",
]  # fmt: skip


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def test_all_issue_names_are_registered() -> None:
    assert set(EXPECTED) <= set(available_optimizers())


@pytest.mark.parametrize("name", available_optimizers())
def test_every_name_builds_and_takes_a_step(name: str) -> None:
    if name in MODEL_ONLY:
        pytest.importorskip(MODEL_ONLY[name])
    model = _model()
    opt = get_optimizer(name, model)
    assert isinstance(opt, torch.optim.Optimizer)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    before = [p.detach().clone() for p in model.parameters()]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(moved), f"{name}: some parameters did not move"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_names_fix_their_defaults_and_pass_hparams_through() -> None:
    model = _model()
    sgdm = get_optimizer("sgdm", model)
    assert isinstance(sgdm, torch.optim.SGD)
    assert sgdm.defaults["momentum"] == 0.9 and not sgdm.defaults["nesterov"]
    nest = get_optimizer("NESTEROV", model.parameters(), lr=0.3, weight_decay=1e-4)
    assert nest.defaults["nesterov"] and nest.defaults["lr"] == 0.3
    assert nest.defaults["weight_decay"] == 1e-4
    hd = get_optimizer("sgdm-hd", model, hypergrad_lr=0.5)
    assert hd.defaults["hypergrad_lr"] == 0.5 and hd.defaults["nesterov"]
    l4 = get_optimizer("l4-sgdm", model, alpha=0.2)
    assert l4.direction == "momentum" and l4.alpha == 0.2
    assert get_optimizer("l4-adam", model).direction == "adam"


def test_param_groups_are_accepted() -> None:
    model = _model()
    groups = [
        {"params": model[0].parameters(), "lr": 0.01},
        {"params": model[2].parameters()},
    ]
    opt = get_optimizer("adam-hd", groups)
    assert [float(g["lr"]) for g in opt.param_groups] == [0.01, 1e-3]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        get_optimizer("adagradx", _model())
    msg = str(err.value)
    assert "adagradx" in msg
    for name in available_optimizers():
        assert name in msg


@pytest.mark.parametrize("name", sorted(MODEL_ONLY))
def test_model_only_optimizer_rejects_bare_parameters(name: str) -> None:
    with pytest.raises(ValueError, match="nn.Module"):
        get_optimizer(name, _model().parameters())


def test_register_optimizer_decorator() -> None:
    try:

        @register_optimizer("My-SGD", defaults={"lr": 0.05})
        class MySGD(torch.optim.SGD):
            pass

        assert "my-sgd" in available_optimizers()
        opt = get_optimizer("my-sgd", _model(), momentum=0.5)
        assert isinstance(opt, MySGD)
        assert opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.5

        @register_optimizer("hooked", needs_model=True)
        def hooked(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
            return torch.optim.SGD(model.parameters(), lr=lr)

        assert isinstance(get_optimizer("hooked", _model()), torch.optim.SGD)
        with pytest.raises(ValueError, match="nn.Module"):
            get_optimizer("hooked", list(_model().parameters()))
        with pytest.raises(ValueError, match="'sgd' is already registered"):
            register_optimizer("SGD")(torch.optim.SGD)
        register_optimizer("my-sgd", defaults={"lr": 0.2}, replace=True)(torch.optim.SGD)
        assert type(get_optimizer("my-sgd", _model())) is torch.optim.SGD
    finally:
        for name in ("my-sgd", "hooked"):
            if name in registry.OPTIMIZERS:
                registry.OPTIMIZERS.unregister(name)


@pytest.mark.parametrize("name", [n for n in available_optimizers() if n not in MODEL_ONLY])
def test_first_order_names_train_a_bf16_model(name: str) -> None:
    model = _model().to(torch.bfloat16)
    opt = get_optimizer(name, model)
    x = torch.randn(16, 5, dtype=torch.bfloat16)
    y = torch.randn(16, 2, dtype=torch.bfloat16)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(20)]
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0], f"{name}: bf16 loss did not decrease: {losses}"
