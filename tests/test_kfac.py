"""KFAC / EKFAC against dense float64 oracles built in the test.

Conventions checked here: ``vec`` stacks the columns of the ``out x in`` gradient matrix
``V`` (bias as last column), so a layer's curvature is ``kron(A, G)``;
``A = mean_rows(a a^T)`` over examples x positions, ``G = (1/B) sum_rows(ds ds^T)`` with
``ds`` the per-example pre-activation gradient (``B * dL/dz`` for a batch-mean loss).
KFAC's split damping is ``kron(A + pi gamma I, G + gamma / pi I)^-1`` with
``gamma = sqrt(damping)``, ``pi = sqrt((tr A / dim A) / (tr G / dim G))``; the exact form
is ``(kron(A, G) + damping I)^-1``; EKFAC is
``(Q_A ⊗ Q_G) diag(vec(S) + damping)^-1 (Q_A ⊗ Q_G)^T`` with
``S = mean_n (Q_G^T dW_n Q_A)^2`` from per-example gradients ``dW_n`` (torch.func).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from metaopt.optim.kfac import EKFAC, KFAC

D64 = torch.float64


def vec(m: torch.Tensor) -> torch.Tensor:
    return m.T.reshape(-1)


def unvec(v: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return v.reshape(shape[1], shape[0]).T


def _mse_closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _linear_setup(seed=0, **kw):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).double()
    opt = KFAC(model, factor_update_freq=1, inv_update_freq=1, eigh_dtype=D64, **kw)
    return model, opt


def _batch(step, b=8, din=4, dout=3):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(b, din, generator=gen, dtype=D64), torch.randn(
        b, dout, generator=gen, dtype=D64
    )


def _linear_oracle_factors(model, x, y):
    """A and G of one linear layer from first principles (ones column, autograd dL/dz)."""
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=D64)], 1)
    z = model(x)
    dz = torch.autograd.grad(F.mse_loss(z, y), z)[0]
    ds = dz * x.shape[0]
    return a.T @ a / x.shape[0], ds.T @ ds / x.shape[0]


def _grad_matrix(model):
    return torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)


def test_linear_factors_and_running_average_match_first_principles() -> None:
    model, opt = _linear_setup(lr=0.0)
    x0, y0 = _batch(0)
    a0, g0 = _linear_oracle_factors(model, x0, y0)
    opt.step(_mse_closure(model, opt, x0, y0))
    torch.testing.assert_close(opt.stats.A["<root>"].double(), a0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.stats.G["<root>"].double(), g0, rtol=1e-5, atol=1e-6)
    x1, y1 = _batch(1)
    a1, g1 = _linear_oracle_factors(model, x1, y1)
    opt.step(_mse_closure(model, opt, x1, y1))
    torch.testing.assert_close(
        opt.stats.A["<root>"].double(), 0.95 * a0 + 0.05 * a1, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        opt.stats.G["<root>"].double(), 0.95 * g0 + 0.05 * g1, rtol=1e-5, atol=1e-6
    )


def _dense_split(a, g, damping):
    gamma = math.sqrt(damping)
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0]))
    ia, ig = torch.eye(a.shape[0], dtype=D64), torch.eye(g.shape[0], dtype=D64)
    return torch.kron(a + pi * gamma * ia, g + gamma / pi * ig)


@pytest.mark.parametrize("form", ["split", "exact"])
def test_kfac_step_equals_dense_inverse_with_frozen_statistics(form: str) -> None:
    damping, lr = 0.05, 0.3
    model, opt = _linear_setup(lr=lr, momentum=0.0, kl_clip=None, damping=damping,
                               damping_form=form)  # fmt: skip
    for step in range(3):
        x, y = _batch(step)
        opt.step(_mse_closure(model, opt, x, y))
    a, g = opt.stats.A["<root>"].double(), opt.stats.G["<root>"].double()
    opt.stats.collecting = False  # freeze the statistics for the step under test
    opt.inv_update_freq = 10**6
    x, y = _batch(9)
    before = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
    closure = _mse_closure(model, opt, x, y)
    closure()
    gmat = _grad_matrix(model).clone()
    opt.step()
    after = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    if form == "split":
        dense = _dense_split(a, g, damping)
    else:
        dense = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=D64)
    expected = unvec(torch.linalg.solve(dense, vec(gmat)), gmat.shape)
    torch.testing.assert_close(after - before, -lr * expected, rtol=1e-7, atol=1e-10)


def test_precondition_is_differentiable_in_damping_and_grads() -> None:
    model, opt = _linear_setup(kl_clip=None)
    for step in range(2):
        x, y = _batch(step)
        opt.step(_mse_closure(model, opt, x, y))
    a, g = opt.stats.A["<root>"].double(), opt.stats.G["<root>"].double()
    gen = torch.Generator().manual_seed(7)
    gw = torch.randn(3, 4, generator=gen, dtype=D64, requires_grad=True)
    gb = torch.randn(3, generator=gen, dtype=D64, requires_grad=True)
    probe = torch.randn(3, 5, generator=gen, dtype=D64)
    damping = torch.tensor(0.02, dtype=D64, requires_grad=True)
    out = opt.precondition({"weight": gw, "bias": gb}, damping=damping)
    got = (torch.cat([out["weight"], out["bias"][:, None]], 1) * probe).sum()
    got_grads = torch.autograd.grad(got, (damping, gw, gb))

    d2 = damping.detach().clone().requires_grad_(True)
    gw2, gb2 = gw.detach().clone().requires_grad_(True), gb.detach().clone().requires_grad_(True)
    gamma = d2.sqrt()
    pi = torch.sqrt((torch.trace(a) / 5) / (torch.trace(g) / 3))
    dense = torch.kron(a + pi * gamma * torch.eye(5, dtype=D64),
                       g + gamma / pi * torch.eye(3, dtype=D64))  # fmt: skip
    sol = unvec(torch.linalg.solve(dense, vec(torch.cat([gw2, gb2[:, None]], 1))), (3, 5))
    ref = (sol * probe).sum()
    ref_grads = torch.autograd.grad(ref, (d2, gw2, gb2))
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
    # a float damping takes the cached-inverse path (two products): same direction
    fast = opt.precondition({"weight": gw.detach(), "bias": gb.detach()}, damping=0.02)
    torch.testing.assert_close(fast["weight"], out["weight"].detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast["bias"], out["bias"].detach(), rtol=1e-9, atol=1e-12)
    for x, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(x, r, rtol=1e-6, atol=1e-9)


def test_kl_clip_scales_the_direction_by_nu() -> None:
    damping, lr, kl = 0.05, 0.5, 1e-6
    model, opt = _linear_setup(lr=lr, momentum=0.0, kl_clip=kl, damping=damping)
    x, y = _batch(0)
    closure = _mse_closure(model, opt, x, y)
    before = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
    closure()
    gmat = _grad_matrix(model).clone()
    a0, g0 = _linear_oracle_factors(model, x, y)
    opt.step()
    v = unvec(torch.linalg.solve(_dense_split(a0, g0, damping), vec(gmat)), gmat.shape)
    nu = min(1.0, math.sqrt(kl / (lr**2 * float((v * gmat).sum()))))
    assert nu < 1.0
    after = torch.cat([model.weight, model.bias[:, None]], 1).detach()
    torch.testing.assert_close(after - before, -lr * nu * v, rtol=1e-5, atol=1e-9)


def _conv_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 2)
    ).double()


def _conv_batch(b=5):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(b, 2, 5, 5, generator=gen, dtype=D64), torch.randn(
        b, 2, generator=gen, dtype=D64
    )


def test_conv_factors_match_a_patch_loop() -> None:
    model = _conv_model()
    opt = KFAC(model, lr=0.0, factor_update_freq=1, inv_update_freq=1)
    x, y = _conv_batch()
    xpad = F.pad(x, (1, 1, 1, 1))
    rows = []
    for n in range(x.shape[0]):
        for i in range(3):
            for j in range(3):
                patch = xpad[n, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1)
                rows.append(torch.cat([patch, torch.ones(1, dtype=D64)]))
    a = torch.stack(rows)
    conv_out = {}
    handle = model[0].register_forward_hook(lambda m, i, o: conv_out.setdefault("z", o))
    loss = F.mse_loss(model(x), y)
    dz = torch.autograd.grad(loss, conv_out["z"])[0]  # (B, out, 3, 3)
    handle.remove()
    ds = dz.permute(0, 2, 3, 1).reshape(-1, 3) * x.shape[0]
    opt.step(_mse_closure(model, opt, x, y))
    torch.testing.assert_close(opt.stats.A["0"].double(), a.T @ a / a.shape[0], rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    torch.testing.assert_close(opt.stats.G["0"].double(), ds.T @ ds / x.shape[0], rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    # end to end: the conv direction equals the dense split-damped inverse of the oracle
    gen = torch.Generator().manual_seed(5)
    gw = torch.randn(3, 2, 3, 3, generator=gen, dtype=D64)
    gb = torch.randn(3, generator=gen, dtype=D64)
    out = opt.precondition({"0.weight": gw, "0.bias": gb}, damping=0.05)
    dense = _dense_split(a.T @ a / a.shape[0], ds.T @ ds / x.shape[0], 0.05)
    gmat = torch.cat([gw.reshape(3, 18), gb[:, None]], 1)
    expected = unvec(torch.linalg.solve(dense, vec(gmat)), gmat.shape)
    got = torch.cat([out["0.weight"].reshape(3, 18), out["0.bias"][:, None]], 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def _per_example_grad_matrices(model, x, y, layer):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.mse_loss(functional_call(model, p, (xi[None],)), yi[None])

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    w, b = per[f"{layer}weight"], per[f"{layer}bias"]
    return torch.cat([w.reshape(w.shape[0], w.shape[1], -1), b[..., None]], 2)  # (B, out, in)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_ekfac_equals_dense_eigenbasis_formula(kind: str) -> None:
    damping, lr = 0.01, 0.2
    if kind == "linear":
        torch.manual_seed(0)
        model, (x, y), layer, name = nn.Linear(4, 3).double(), _batch(0), "", "<root>"
    else:
        model, (x, y), layer, name = _conv_model(), _conv_batch(), "0.", "0"
    opt = EKFAC(model, lr=lr, momentum=0.0, kl_clip=None, damping=damping,
                factor_update_freq=1, inv_update_freq=1, eigh_dtype=D64)  # fmt: skip
    with opt.statistics_paused():
        per_ex = _per_example_grad_matrices(model, x, y, layer)
    closure = _mse_closure(model, opt, x, y)
    closure()
    mod = model if kind == "linear" else model[0]
    gmat = torch.cat([mod.weight.grad.reshape(mod.weight.shape[0], -1),
                      mod.bias.grad[:, None]], 1).clone()  # fmt: skip
    before = torch.cat([mod.weight.reshape(mod.weight.shape[0], -1), mod.bias[:, None]], 1)
    before = before.detach().clone()
    opt.step()
    e = opt.eigen[name]
    qa, qg = e["QA"], e["QG"]
    # the eigenbasis is the one of the (independently checked) KFAC factors
    torch.testing.assert_close(qa @ torch.diag(e["dA"]) @ qa.T, opt.stats.A[name].double(),
                               rtol=1e-6, atol=1e-8)  # fmt: skip
    s = (qg.T @ per_ex @ qa).square().mean(0)  # per-example losses' gradients, squared
    torch.testing.assert_close(e["S"], s, rtol=1e-6, atol=1e-10)  # rows are kept in fp32
    q = torch.kron(qa, qg)
    dense = q @ torch.diag(vec(e["S"]) + damping) @ q.T
    expected = unvec(torch.linalg.solve(dense, vec(gmat)), gmat.shape)
    after = torch.cat([mod.weight.reshape(mod.weight.shape[0], -1), mod.bias[:, None]], 1)
    torch.testing.assert_close(after.detach() - before, -lr * expected, rtol=1e-6, atol=1e-9)


def test_schedule_collects_every_factor_step_and_decomposes_every_inverse_step() -> None:
    model, _ = _linear_setup()
    opt = KFAC(model, lr=0.0, factor_update_freq=2, inv_update_freq=4, kl_clip=None,
               eigh_dtype=D64)  # fmt: skip
    factors = []
    for step in range(6):
        x, y = _batch(step)
        factors.append(_linear_oracle_factors(model, x, y)[0])
        opt.step(_mse_closure(model, opt, x, y))
        if step == 3:  # eigenbasis still from step 0's factors (recomputed at 0 and 4)
            q, d = opt.eigen["<root>"]["QA"], opt.eigen["<root>"]["dA"]
            torch.testing.assert_close(q @ torch.diag(d) @ q.T, factors[0], rtol=1e-5, atol=1e-6)
    expected = factors[0]
    for k in (2, 4):
        expected = 0.95 * expected + 0.05 * factors[k]
    torch.testing.assert_close(opt.stats.A["<root>"].double(), expected, rtol=1e-5, atol=1e-6)
    q, d = opt.eigen["<root>"]["QA"], opt.eigen["<root>"]["dA"]
    torch.testing.assert_close(q @ torch.diag(d) @ q.T, opt.stats.A["<root>"].double(),
                               rtol=1e-6, atol=1e-8)  # fmt: skip


def test_statistics_paused_and_eval_mode_record_nothing() -> None:
    model, opt = _linear_setup(lr=0.0)
    x, y = _batch(0)
    opt.step(_mse_closure(model, opt, x, y))
    a = opt.stats.A["<root>"].clone()
    x2, y2 = _batch(1)
    with opt.statistics_paused():
        F.mse_loss(model(x2 * 3), y2).backward()
    model.eval()
    F.mse_loss(model(x2 * 5), y2).backward()
    model.train()
    opt.update_curvature()
    torch.testing.assert_close(opt.stats.A["<root>"], a, rtol=0, atol=0)
    opt.step()
    assert opt.steps == 2
    # advance(): a step without a parameter update that still folds its statistics
    before = model.weight.detach().clone()
    F.mse_loss(model(x2), y2).backward()
    opt.advance()
    assert opt.steps == 3 and torch.equal(model.weight.detach(), before)
    expected = 0.95 * a.double() + 0.05 * _linear_oracle_factors(model, x2, y2)[0]
    torch.testing.assert_close(opt.stats.A["<root>"].double(), expected, rtol=1e-5, atol=1e-6)


def test_step_with_given_grads_and_identity_fallback_for_norm_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)).double()
    opt = KFAC(model, lr=0.1, momentum=0.0, kl_clip=None, factor_update_freq=1)
    x, y = torch.randn(6, 4, dtype=D64), torch.randn(6, 2, dtype=D64)
    F.mse_loss(model(x), y).backward()
    opt.update_curvature()
    gen = torch.Generator().manual_seed(1)
    given = {n: torch.randn(p.shape, generator=gen, dtype=D64) for n, p in model.named_parameters()}
    expected = opt.precondition(given)
    # the LayerNorm parameters have no Kronecker view: their direction is the gradient
    for n in ("1.weight", "1.bias"):
        torch.testing.assert_close(expected[n], given[n], rtol=0, atol=0)
    assert not torch.allclose(expected["0.weight"], given["0.weight"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(grads=given)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * expected[n])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(directions={"2.bias": given["2.bias"]})
    for n, p in model.named_parameters():
        moved = before[n] - 0.1 * given[n] if n == "2.bias" else before[n]
        torch.testing.assert_close(p.detach(), moved)
    with pytest.raises(ValueError, match="directions"):
        opt.step(directions={"nope": given["2.bias"]})


def _bf16_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, stride=2),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 3),
    )  # fmt: skip
    return {"mlp": (mlp, (10,)), "cnn": (cnn, (1, 8, 8))}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_bf16_model_trains_100_steps_at_default_damping(cls, arch: str) -> None:
    model, shape = _bf16_models()[arch]
    model = model.to(torch.bfloat16)
    opt = cls(model)
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
    assert all(v.dtype == torch.float32 for v in opt.stats.A.values())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_state_dict_carries_factors_eigenbases_and_steps() -> None:
    model, opt = _linear_setup()
    x, y = _batch(0)
    opt.step(_mse_closure(model, opt, x, y))
    curv = opt.state_dict()["curvature"]
    assert curv["steps"] == 1
    assert set(curv["stats"]["A"]) == {"<root>"} and set(curv["eigen"]["<root>"]) >= {
        "QA", "dA", "QG", "dG"
    }  # fmt: skip
    with pytest.raises(ValueError, match="curvature"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"damping": 0.0}, "damping"), ({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"),
     ({"kl_clip": 0.0}, "kl_clip"), ({"factor_update_freq": 0}, "factor_update_freq"),
     ({"inv_update_freq": 2.5}, "inv_update_freq"), ({"damping_form": "x"}, "damping_form"),
     ({"stat_decay": 1.0}, "decay"), ({"eigh_dtype": torch.float16}, "eigh_dtype")],
)  # fmt: skip
def test_bad_hyperparameters_name_the_field(kwargs, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        KFAC(nn.Linear(2, 2), **kwargs)


def test_precondition_rejects_partial_layers_and_unknown_names() -> None:
    model, opt = _linear_setup()
    with pytest.raises(ValueError, match="needs all"):
        opt.precondition({"weight": torch.zeros(3, 4, dtype=D64)})
    with pytest.raises(ValueError, match="unknown"):
        opt.precondition({"nope": torch.zeros(1)})


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_a_second_param_group_is_refused_and_the_scheduler_still_drives_the_lr(cls):
    """The step reads the one group built from the model: a second group (which it would
    silently mis-scale) is refused, while schedulers edit that group's lr as usual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = cls(model, lr=0.1)
    extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=rf"param_group: {cls.__name__} keeps one param group"):
        opt.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 1
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(5, 3)).pow(2).mean().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
