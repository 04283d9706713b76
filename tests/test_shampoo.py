"""Shampoo against dense float64 oracles: inverse matrix roots by scipy, grafts by hand."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import fractional_matrix_power
from torch import nn

from metaopt.optim.shampoo import Shampoo

D64 = torch.float64


def inv_root(m: torch.Tensor, root: int, eps: float) -> torch.Tensor:
    dense = m.numpy() + eps * np.eye(m.shape[0])
    return torch.from_numpy(np.real(fractional_matrix_power(dense, -1.0 / root)))


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3).double()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + step)
    return torch.randn(8, 4, generator=gen, dtype=D64), torch.randn(8, 3, generator=gen, dtype=D64)


def _wmat(model: nn.Module) -> torch.Tensor:
    return torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()


def _gmat(model: nn.Module) -> torch.Tensor:
    return torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).detach().clone()


def _run(model, opt, steps, loss_fn=F.mse_loss, batch=_batch):
    """Steps ``steps``; returns the (grad matrix, param delta) of every step."""
    out = []
    for k in steps:
        x, y = batch(k)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        before, g = _wmat(model), _gmat(model)
        opt.step()
        out.append((g, _wmat(model) - before))
    return out


@pytest.mark.parametrize("freq", [1, 3])
def test_shampoo_equals_dense_inverse_fourth_roots(freq: int) -> None:
    eps, lr = 1e-3, 0.1
    model = _linear()
    opt = Shampoo(model, lr=lr, momentum=0.0, epsilon=eps, grafting="none",
                  precondition_freq=freq, start_preconditioning_step=0)  # fmt: skip
    history = _run(model, opt, range(4))
    left, right = torch.zeros(3, 3, dtype=D64), torch.zeros(5, 5, dtype=D64)
    roots = None
    for k, (g, delta) in enumerate(history):
        left, right = left + g @ g.T, right + g.T @ g
        if k % freq == 0:
            roots = inv_root(left, 4, eps), inv_root(right, 4, eps)
        expected = -lr * roots[0] @ g @ roots[1]
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-8)


def test_one_sided_shampoo_uses_inverse_square_root() -> None:
    eps, lr = 1e-3, 0.1
    model = _linear()
    opt = Shampoo(
        model,
        lr=lr,
        momentum=0.0,
        epsilon=eps,
        grafting="none",
        precondition_freq=1,
        start_preconditioning_step=0,
        max_preconditioner_dim=4,
    )  # fmt: skip  (in-side 5 > 4: left only)
    left = torch.zeros(3, 3, dtype=D64)
    for g, delta in _run(model, opt, range(3)):
        left = left + g @ g.T
        torch.testing.assert_close(delta, -lr * inv_root(left, 2, eps) @ g, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("grafting", ["sgd", "adam", "adagrad"])
def test_grafting_takes_the_layer_norm_of_the_graft_step(grafting: str) -> None:
    eps, lr = 1e-3, 0.1
    model = _linear()
    opt = Shampoo(model, lr=lr, momentum=0.0, epsilon=eps, grafting=grafting,
                  precondition_freq=1, start_preconditioning_step=0)  # fmt: skip
    left, right = torch.zeros(3, 3, dtype=D64), torch.zeros(5, 5, dtype=D64)
    m, v, acc = (torch.zeros(3, 5, dtype=D64) for _ in range(3))
    for t, (g, delta) in enumerate(_run(model, opt, range(3)), start=1):
        left, right = left + g @ g.T, right + g.T @ g
        p = inv_root(left, 4, eps) @ g @ inv_root(right, 4, eps)
        m, v, acc = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2, acc + g**2
        graft = {
            "sgd": g,
            "adam": (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8),
            "adagrad": g / (acc.sqrt() + 1e-8),
        }[grafting]
        expected = -lr * p * (graft.norm() / p.norm())
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-8)


def test_before_start_the_step_is_the_graft_and_diag_fallback_is_adagrad() -> None:
    eps, lr = 1e-6, 0.1
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double()
    opt = Shampoo(model, lr=lr, momentum=0.0, epsilon=eps, grafting="none",
                  start_preconditioning_step=2)  # fmt: skip
    acc = torch.zeros(3, dtype=D64)
    for k in range(2):
        x, y = _batch(k)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        lin = _gmat(model[0])
        before = _wmat(model[0])
        ln_w, ln_g = model[1].weight.detach().clone(), model[1].weight.grad.clone()
        opt.step()
        torch.testing.assert_close(_wmat(model[0]) - before, -lr * lin, rtol=1e-10, atol=1e-12)
        acc = acc + ln_g**2
        expected = -lr * ln_g / (acc + eps).sqrt()
        torch.testing.assert_close(model[1].weight.detach() - ln_w, expected, rtol=1e-6, atol=1e-10)


def _conv_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2)).double()


def _conv_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(70 + step)
    return torch.randn(4, 2, 4, 4, generator=gen, dtype=D64), torch.randn(
        4, 2, generator=gen, dtype=D64
    )


def test_conv_layer_matrix_is_out_by_patch_plus_bias() -> None:
    eps, lr = 1e-3, 0.05
    model = _conv_model()
    opt = Shampoo(model, lr=lr, momentum=0.0, epsilon=eps, grafting="none",
                  precondition_freq=1, start_preconditioning_step=0)  # fmt: skip
    conv = model[0]
    left, right = torch.zeros(3, 3, dtype=D64), torch.zeros(19, 19, dtype=D64)
    for k in range(2):
        x, y = _conv_batch(k)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        g = torch.cat([conv.weight.grad.reshape(3, 18), conv.bias.grad[:, None]], 1).clone()
        before = torch.cat([conv.weight.reshape(3, 18), conv.bias[:, None]], 1).detach().clone()
        opt.step()
        after = torch.cat([conv.weight.reshape(3, 18), conv.bias[:, None]], 1).detach()
        left, right = left + g @ g.T, right + g.T @ g
        expected = -lr * inv_root(left, 4, eps) @ g @ inv_root(right, 4, eps)
        torch.testing.assert_close(after - before, expected, rtol=1e-5, atol=1e-8)


def test_resume_mid_run_with_roots_and_adam_graft_continues_exactly() -> None:
    kw = dict(precondition_freq=2, start_preconditioning_step=1, grafting="adam", lr=0.01)

    def run(model, opt, steps):
        for k in steps:
            x, y = _conv_batch(k)
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    ref = _conv_model()
    run(ref, Shampoo(ref, **kw), range(7))
    first = _conv_model()
    opt = Shampoo(first, **kw)
    run(first, opt, range(4))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    assert {"L", "R", "L_root", "R_root", "graft_m", "graft_v"} <= set(
        saved["opt"]["shampoo"]["layers"]["0"]
    )
    resumed = _conv_model(seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = Shampoo(resumed, **kw)
    opt2.load_state_dict(saved["opt"])
    run(resumed, opt2, range(4, 7))
    for a, b in zip(ref.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="shampoo"):
        opt2.load_state_dict(torch.optim.SGD(resumed.parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize("grafting", ["sgd", "adam"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_bf16_model_trains_100_steps_at_default_epsilon(arch: str, grafting: str) -> None:
    torch.manual_seed(0)
    if arch == "mlp":
        model, shape = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)), (10,)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
            nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 3),
        )  # fmt: skip
        shape = (1, 8, 8)
    model = model.to(torch.bfloat16)
    lr = 0.05 if grafting == "sgd" else 3e-3
    opt = Shampoo(model, lr=lr, grafting=grafting)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, *shape, generator=gen).to(torch.bfloat16)
    y = torch.randint(0, 3, (32,), generator=gen)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(t.dtype == torch.float32 for st in opt.layers.values() for t in st.values())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"epsilon": 0.0}, "epsilon"), ({"beta2": 0.0}, "beta2"), ({"grafting": "x"}, "grafting"),
     ({"precondition_freq": 0}, "precondition_freq"), ({"momentum": -0.1}, "momentum"),
     ({"start_preconditioning_step": -1}, "start_preconditioning_step"),
     ({"root_dtype": torch.float16}, "root_dtype"), ({"graft_beta2": 1.0}, "graft_beta2"),
     ({"max_preconditioner_dim": 0}, "max_preconditioner_dim")],
)  # fmt: skip
def test_bad_hyperparameters_name_the_field(kwargs, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Shampoo(nn.Linear(2, 2), **kwargs)


def test_a_second_param_group_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = Shampoo(model, lr=0.1)
    with pytest.raises(ValueError, match="param_group: Shampoo keeps one param group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 1
