"""APO against independent oracles: closed-form meta-gradients on linear regression,
central finite differences, hand-computed K=1 updates, and exact resume."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metaopt
from metaopt import APO, APOConfig


def _regression(seed=0, n=8, d=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    xf = torch.randn(n + 2, d, generator=g, dtype=torch.float64)
    return x, y, xf


def _linear(d=3, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(d, 1, bias=False).double()


def _meta_grad_of_log_lr(x, y, xf, w, eta, lam_f, lam_w):
    """dQ/dlog(eta) for SGD on mean-squared error, by hand (numpy)."""
    x, y, xf, w = (np.asarray(a, dtype=np.float64) for a in (x, y, xf, w))
    n = len(x)
    g = 2 / n * x.T @ (x @ w - y)
    w1 = w - eta * g
    g1 = 2 / n * x.T @ (x @ w1 - y)
    d_eta = -(g * g1).sum() + lam_w * eta * (g * g).sum() + lam_f * eta * ((xf @ g) ** 2).mean()
    return eta * d_eta, w1


@pytest.mark.parametrize("lam_f,lam_w", [(0.0, 0.0), (0.7, 0.0), (0.3, 2.0)])
def test_one_k1_sgd_step_equals_hand_computed_meta_and_base_update(lam_f, lam_w):
    x, y, xf = _regression()
    model = _linear()
    w0 = model.weight.detach().numpy().T.copy()
    alpha, eta0 = 0.05, 0.1
    apo = APO(
        model,
        F.mse_loss,
        base="sgd",
        adapt="lr",
        lr=eta0,
        meta_interval=1,
        meta_optimizer="sgd",
        meta_lr=alpha,
        lambda_fsd=lam_f,
        lambda_wsd=lam_w,
        fsd="mse",
    )
    apo.step((x, y), (xf, None))
    grad, _ = _meta_grad_of_log_lr(x, y, xf, w0, eta0, lam_f, lam_w)
    eta1 = math.exp(math.log(eta0) - alpha * grad)
    assert apo.hparam_log()["lr"] == pytest.approx(eta1, rel=1e-10)
    g = 2 / len(x) * x.numpy().T @ (x.numpy() @ w0 - y.numpy())
    np.testing.assert_allclose(model.weight.detach().numpy().T, w0 - eta1 * g, rtol=1e-10)


def test_meta_gradient_matches_central_finite_differences_of_q_in_log_lr():
    x, y, xf = _regression(1)
    model = _linear(seed=1)
    w0 = model.weight.detach().clone()
    eta0, lam_f, lam_w = 0.2, 0.5, 0.1

    def q(log_eta):  # the proximal objective evaluated from scratch
        w = w0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.mse_loss(x @ w.T, y), [w])
        w1 = w0 - math.exp(log_eta) * g
        fsd = 0.5 * ((xf @ (w1 - w0).T) ** 2).sum(1).mean()
        return (F.mse_loss(x @ w1.T, y) + lam_f * fsd + lam_w / 2 * ((w1 - w0) ** 2).sum()).item()

    h = 1e-5
    fd = (q(math.log(eta0) + h) - q(math.log(eta0) - h)) / (2 * h)
    apo = APO(
        model,
        F.mse_loss,
        base="sgd",
        lr=eta0,
        meta_interval=1,
        meta_optimizer="sgd",
        meta_lr=1.0,
        lambda_fsd=lam_f,
        lambda_wsd=lam_w,
        fsd="mse",
    )
    apo.step((x, y), (xf, None))
    got = -(math.log(apo.hparam_log()["lr"]) - math.log(eta0))
    assert got == pytest.approx(fd, rel=1e-6)


def test_rmsprop_eps_rho_meta_gradient_matches_finite_differences():
    x, y, xf = _regression(2)
    model = _linear(seed=2)
    w0 = model.weight.detach().clone()
    lr, eps, rho, alpha, eps_root = 0.05, 1e-3, 0.5, 0.9, 1e-30

    def q(log_lr, log_eps, logit_rho):
        w = w0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.mse_loss(x @ w.T, y), [w])
        v = (1 - alpha) * g * g
        power = 1 / (1 + math.exp(-logit_rho))
        w1 = w0 - math.exp(log_lr) * g / ((v + eps_root) ** power + math.exp(log_eps))
        return (
            F.mse_loss(x @ w1.T, y) + 0.2 * 0.5 * ((xf @ (w1 - w0).T) ** 2).sum(1).mean()
        ).item()

    point = [math.log(lr), math.log(eps), 0.0]
    fd = []
    for i in range(3):
        hi, lo = list(point), list(point)
        hi[i] += 1e-5
        lo[i] -= 1e-5
        fd.append((q(*hi) - q(*lo)) / 2e-5)
    apo = APO(
        model,
        F.mse_loss,
        adapt="rmsprop-eps-rho",
        lr=lr,
        eps=eps,
        power=rho,
        alpha=alpha,
        meta_interval=1,
        meta_optimizer="sgd",
        meta_lr=1.0,
        lambda_fsd=0.2,
        fsd="mse",
    )
    meta = {k: v.detach().clone() for k, v in apo.rule.meta_parameters().items()}
    apo.step((x, y), (xf, None))
    new = apo.rule.meta_parameters()
    got = [-(new[k] - meta[k]).item() for k in ("log_lr", "log_eps", "rho_logit")]
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-9)


def test_precond_meta_gradient_matches_finite_differences_on_a_few_entries():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    xf = torch.randn(5, 3, dtype=torch.float64)
    cfg = dict(
        adapt="precond",
        lr=0.3,
        meta_interval=1,
        meta_optimizer="sgd",
        meta_lr=1.0,
        lambda_fsd=0.5,
        lambda_wsd=0.1,
        warmup=0,
    )
    apo = APO(model, F.cross_entropy, **cfg)
    pre = apo.preconditioner
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in pre.named_parameters()}

    def q():
        theta = {n: v.clone().requires_grad_(True) for n, v in w0.items()}
        with torch.enable_grad():
            out = torch.func.functional_call(model, theta, (x,))
            loss = F.cross_entropy(out, y)
            grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values())), strict=True))
        with torch.no_grad():
            d = pre.apply(grads)
            w1 = {n: w0[n] - 0.3 * d[n] for n in w0}
            new_f = torch.func.functional_call(model, w1, (xf,))
            old_f = torch.func.functional_call(model, w0, (xf,))
            kl = F.softmax(old_f, -1) * (F.log_softmax(old_f, -1) - F.log_softmax(new_f, -1))
            wsd = sum(((w1[n] - w0[n]) ** 2).sum() for n in w0)
            val = F.cross_entropy(torch.func.functional_call(model, w1, (x,)), y)
            return (val + 0.5 * kl.sum(-1).mean() + 0.05 * wsd).item()

    picks = [("blocks.0.S", (1, 2)), ("blocks.0.A", (0, 3)), ("blocks.2.B", (1, 0))]
    fd = []
    with torch.no_grad():
        for name, idx in picks:
            p = dict(pre.named_parameters())[name]
            p[idx] += 1e-6
            hi = q()
            p[idx] -= 2e-6
            lo = q()
            p[idx] += 1e-6
            fd.append((hi - lo) / 2e-6)
    apo.step((x, y), (xf, y))
    after = dict(pre.named_parameters())
    got = [-(after[n][i] - before[n][i]).item() for n, i in picks]
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-10)


def test_sgdm_lookahead_has_no_momentum_and_the_step_applies_it():
    x, y, xf = _regression(4)
    model = _linear(seed=4)
    w = model.weight.detach().numpy().T.copy()
    alpha, mu = 0.05, 0.9
    apo = APO(
        model,
        F.mse_loss,
        base="sgdm",
        momentum=mu,
        lr=0.1,
        meta_interval=1,
        meta_optimizer="sgd",
        meta_lr=alpha,
        lambda_fsd=0.0,
    )
    eta, buf = 0.1, None
    for _ in range(3):
        grad, _ = _meta_grad_of_log_lr(x, y, xf, w, eta, 0.0, 0.0)  # lookahead: plain SGD
        eta = math.exp(math.log(eta) - alpha * grad)
        g = 2 / len(x) * x.numpy().T @ (x.numpy() @ w - y.numpy())
        buf = g if buf is None else mu * buf + g
        w = w - eta * buf
        apo.step((x, y))
    assert apo.hparam_log()["lr"] == pytest.approx(eta, rel=1e-9)
    np.testing.assert_allclose(model.weight.detach().numpy().T, w, rtol=1e-9)


def test_precond_warms_up_with_sgdm_then_steps_with_scaled_preconditioner():
    torch.manual_seed(5)
    x, y, xf = _regression(5)
    model = _linear(seed=5)
    twin = _linear(seed=5)
    apo = APO(
        model,
        F.mse_loss,
        adapt="precond",
        lr=0.05,
        warmup=3,
        warmup_lr=0.02,
        meta_interval=1,
        meta_lr=1e-2,
        lambda_fsd=0.1,
        fsd="mse",
    )
    sgdm = torch.optim.SGD(twin.parameters(), lr=0.02, momentum=0.9)
    initial = [p.detach().clone() for p in apo.preconditioner.parameters()]
    for _ in range(3):
        sgdm.zero_grad()
        F.mse_loss(twin(x), y).backward()
        sgdm.step()
        apo.step((x, y), (xf, None))
    torch.testing.assert_close(model.weight, twin.weight, rtol=1e-12, atol=1e-12)
    moved = [
        not torch.equal(a, b) for a, b in zip(initial, apo.preconditioner.parameters(), strict=True)
    ]
    assert any(moved)  # P is meta-learned during the warm-up
    # steps 3 and 4: meta-update, then theta - 0.05 * 0.9 * P g with the *updated* P (the
    # second one fails if the in-place step's cache of S^2 misses the meta-optimizer's
    # update: fused Adam does not bump version counters)
    for _ in range(2):
        w = model.weight.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.mse_loss(x @ w.T, y), [w])
        apo.step((x, y), (xf, None))
        with torch.no_grad():
            want = w - 0.05 * 0.9 * apo.preconditioner.apply({"weight": g})["weight"]
        torch.testing.assert_close(model.weight.detach(), want, rtol=1e-12, atol=1e-12)


def _digits_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 6, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return x, y


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(
        dtype
    )


def _stream(x, y, seed):
    g = torch.Generator().manual_seed(seed)

    def draw():
        i = torch.randint(0, len(x), (10,), generator=g)
        return x[i], y[i]

    return draw, g


@pytest.mark.parametrize(
    "options",
    [
        dict(adapt="lr", base="sgdm"),
        dict(adapt="lr", base="adam", lr=1e-2),
        dict(adapt="layer-lr", base="rmsprop", lr=1e-2),
        dict(adapt="rmsprop-eps-rho", lr=1e-2),
        dict(adapt="precond", warmup=4, meta_lr=1e-3, precond_momentum=0.5),
        dict(adapt="kfac-damping", lr=0.05, kfac_options={"factor_update_freq": 2}),
    ],
)
def test_resume_from_state_dict_is_exact(options):
    x, y = _digits_like()
    cfg = dict(meta_interval=3, **options)
    model = _mlp()
    apo = APO(model, F.cross_entropy, **cfg)
    draw, gen = _stream(x, y, 1)
    for _ in range(7):
        apo.step(draw(), draw)
    saved = {k: v for k, v in apo.state_dict().items()}
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    gen_state = gen.get_state()
    for _ in range(8):
        apo.step(draw(), draw)
    model2 = _mlp(seed=9)
    model2.load_state_dict(saved_model)
    apo2 = APO(model2, F.cross_entropy, **cfg)
    apo2.load_state_dict(saved)
    gen.set_state(gen_state)
    for _ in range(8):
        apo2.step(draw(), draw)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert apo.history == apo2.history
    assert apo.hparam_log() == apo2.hparam_log()


def test_fsd_batch_callable_is_drawn_only_on_meta_steps():
    x, y = _digits_like()
    calls = []
    draw, _ = _stream(x, y, 2)

    def counted():
        calls.append(1)
        return draw()

    apo = APO(_mlp(), F.cross_entropy, meta_interval=4)
    for _ in range(10):
        apo.step(draw(), counted)
    assert len(calls) == 3 and apo.meta_steps == 3 and len(apo.history) == 3


@metaopt.register_meta_objective("test-nan-gradient")
def _nan_gradient(ctx):
    # finite value, non-finite derivative: d/dx sqrt(0 * x) = inf * 0
    return (
        torch.sqrt(0 * ctx.extras["hparams"]["log_lr"])
        + ctx.loss(ctx.forward(ctx.params_after, ctx.batch[0]), ctx.batch[1]) * 0
    )


def test_non_finite_meta_gradient_skips_the_meta_update_and_counts_it():
    x, y = _digits_like()
    apo = APO(_mlp(), F.cross_entropy, meta_interval=2, meta_objective="test-nan-gradient")
    draw, _ = _stream(x, y, 3)
    for _ in range(5):
        stats = apo.step(draw(), draw)
    assert apo.skipped_meta_steps == 3 and stats["skipped_meta_steps"] == 3
    assert apo.hparam_log()["lr"] == pytest.approx(0.1)
    assert all(torch.isfinite(p).all() for p in apo.model.parameters())


def test_non_finite_base_step_raises_naming_the_step():
    x, y = _digits_like()
    apo = APO(_mlp(), F.cross_entropy, meta_interval=5, lambda_fsd=0.0)
    draw, _ = _stream(x, y, 4)
    for t in range(5):
        bx, by = draw()
        if t == 3:
            bx = bx.clone()
            bx[0, 0] = float("inf")
        apo.step((bx, by))
    with pytest.raises(FloatingPointError, match="step 3"):
        apo.step(draw())


def test_bf16_model_with_fp32_preconditioner_trains_with_finite_decreasing_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)
    ).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 1, 8, 8, generator=g).to(torch.bfloat16)
    y = torch.randint(0, 3, (30,), generator=g)
    apo = APO(
        model, F.cross_entropy, adapt="precond", lr=0.05, warmup=5, meta_interval=2, meta_lr=1e-3
    )
    losses = [float(apo.step((x, y), (x, y))["loss"]) for _ in range(30)]
    assert all(p.dtype == torch.float32 for p in apo.preconditioner.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0]
    assert apo.skipped_meta_steps == 0


@pytest.mark.parametrize("adapt", ["layer-lr", "precond"])
def test_preconditioner_saves_and_loads_with_metaopt_io(tmp_path, adapt):
    x, y = _digits_like()
    model = _mlp()
    apo = APO(model, F.cross_entropy, adapt=adapt, meta_interval=1, warmup=0, meta_lr=1e-2)
    for _ in range(3):
        apo.step((x, y), (x, y))
    path = tmp_path / "p.safetensors"
    metaopt.save_preconditioner(apo.preconditioner, path)
    loaded = metaopt.load_preconditioner(path, _mlp(seed=1))
    for a, b in zip(apo.preconditioner.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_user_objective_from_the_readme_runs_with_apo():
    @metaopt.register_meta_objective("proximal-l1-outputs")
    def proximal_l1(ctx, lam=0.1):
        x, y = ctx.batch
        xf, _ = ctx.fsd_batch
        new = ctx.forward(ctx.params_after, xf)
        old = ctx.forward(ctx.params_before, xf).detach()
        return ctx.loss(ctx.forward(ctx.params_after, x), y) + lam * (new - old).abs().mean()

    x, y = _digits_like()
    apo = APO(
        _mlp(),
        F.cross_entropy,
        meta_objective="proximal-l1-outputs",
        objective_options={"lam": 0.5},
        meta_interval=1,
    )
    draw, _ = _stream(x, y, 5)
    for _ in range(5):
        stats = apo.step(draw(), draw)
    assert apo.meta_steps == 5 and torch.isfinite(stats["meta_objective"])
    assert apo.hparam_log()["lr"] != pytest.approx(0.1)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("adapt", "momentum", "adapt='momentum'"),
        ("base", "lbfgs", "base='lbfgs'"),
        ("lr", -1.0, "lr=-1.0"),
        ("meta_interval", 0, "meta_interval=0"),
        ("fsd", "l2", "fsd='l2'"),
        ("power", 1.5, "power=1.5"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        APOConfig(**{field: value})


def test_config_defaults_follow_the_paper():
    lr = APOConfig()
    assert (lr.meta_optimizer, lr.meta_lr, lr.meta_interval, lr.lambda_wsd) == (
        "rmsprop",
        0.1,
        10,
        0,
    )
    pre = APOConfig(adapt="precond")
    assert (pre.meta_optimizer, pre.meta_lr, pre.warmup, pre.precond_scale) == (
        "adam",
        1e-4,
        3000,
        0.9,
    )
    eps_rho = APOConfig(adapt="rmsprop-eps-rho")
    assert (eps_rho.base, eps_rho.meta_optimizer, eps_rho.meta_lr) == ("rmsprop", "rmsprop", 0.01)
    with pytest.raises(ValueError, match="base='rmsprop'"):
        APOConfig(adapt="precond", base="rmsprop")


def test_missing_fsd_batch_on_a_meta_step_is_a_clear_error():
    x, y = _digits_like()
    apo = APO(_mlp(), F.cross_entropy, lambda_fsd=0.1)
    with pytest.raises(ValueError, match="fsd_batch=None"):
        apo.step((x, y))


def test_kfac_damping_meta_gradient_matches_finite_differences():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.double()
    x, xf = torch.randn(12, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    lr, damping, lam_f, lam_w = 0.3, 0.05, 0.4, 0.2
    apo = APO(
        model,
        F.cross_entropy,
        adapt="kfac-damping",
        lr=lr,
        damping=damping,
        meta_interval=1,
        meta_optimizer="sgd",
        meta_lr=1.0,
        lambda_fsd=lam_f,
        lambda_wsd=lam_w,
        kfac_options={"eigh_dtype": torch.float64},
    )
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    apo.step((x, y), (xf, y))  # step 0 collects the factors and meta-updates
    kfac = apo.rule.kfac
    got = [
        -(math.log(apo.hparam_log()[k]) - math.log(v))
        for k, v in (("lr", lr), ("damping", damping))
    ]

    def q(log_lr, log_d):
        theta = {n: v.clone().requires_grad_(True) for n, v in w0.items()}
        with kfac.statistics_paused():
            out = torch.func.functional_call(model, theta, (x,))
            grads = torch.autograd.grad(F.cross_entropy(out, y), list(theta.values()))
            with torch.no_grad():
                d = kfac.precondition(dict(zip(theta, grads, strict=True)), math.exp(log_d))
                w1 = {n: w0[n] - math.exp(log_lr) * d[n] for n in w0}
                new_f = torch.func.functional_call(model, w1, (xf,))
                old_f = torch.func.functional_call(model, w0, (xf,))
                p_old = F.softmax(old_f, -1)
                kl = (p_old * (F.log_softmax(old_f, -1) - F.log_softmax(new_f, -1))).sum(-1)
                wsd = sum(((w1[n] - w0[n]) ** 2).sum() for n in w0)
                val = F.cross_entropy(torch.func.functional_call(model, w1, (x,)), y)
        return (val + lam_f * kl.mean() + lam_w / 2 * wsd).item()

    h = 1e-6
    fd = [
        (q(math.log(lr) + h, math.log(damping)) - q(math.log(lr) - h, math.log(damping))) / (2 * h),
        (q(math.log(lr), math.log(damping) + h) - q(math.log(lr), math.log(damping) - h)) / (2 * h),
    ]
    np.testing.assert_allclose(got, fd, rtol=1e-5)
    assert kfac.eigen  # the factors came from APO's own gradient evaluation


def test_dense_diag_max_gives_a_small_lone_parameter_a_full_ekfac_block(tmp_path):
    class Vec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.tensor([1.0, -1.5, 0.5]))

        def forward(self, x):
            return (self.theta * x).sum(-1, keepdim=True)

    model = Vec()
    pre = metaopt.KroneckerPreconditioner.for_model(model, "ekfac-shaped", dense_diag_max=3)
    blk = pre.blocks["theta"]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.3 * torch.randn_like(p))
    A, B, S = (t.detach().double() for t in (blk.A, blk.B, blk.S))
    assert A.shape == (3, 3)  # full block, not the diagonal family
    want_p = B.item() ** 2 * A @ torch.diag(S.reshape(-1) ** 2) @ A.T  # (B kron A) D (B kron A)^T
    g = torch.tensor([0.2, -1.0, 0.7])
    got = pre.apply({"theta": g})["theta"].double()
    torch.testing.assert_close(got, want_p @ g.double(), rtol=1e-5, atol=1e-6)
    path = tmp_path / "p.safetensors"
    metaopt.save_preconditioner(pre, path)
    loaded = metaopt.load_preconditioner(path, Vec())
    torch.testing.assert_close(loaded.apply({"theta": g})["theta"], got.float())
    small = metaopt.KroneckerPreconditioner.for_model(model, "ekfac-shaped", dense_diag_max=2)
    assert not hasattr(small.blocks["theta"], "A")  # larger than the limit: diagonal


def test_fresh_loss_batch_puts_the_loss_term_on_b_prime_by_hand():
    x, y, _ = _regression(7)
    x2, y2, _ = _regression(8)
    model = _linear(seed=7)
    w = model.weight.detach().numpy().T.copy()
    apo = APO(
        model,
        F.mse_loss,
        base="sgd",
        lr=0.1,
        meta_interval=1,
        meta_optimizer="sgd",
        meta_lr=0.5,
        lambda_fsd=0.0,
        fresh_loss_batch=True,
    )
    apo.step((x, y), (x2, y2))
    xn, yn, x2n, y2n = (a.numpy() for a in (x, y, x2, y2))
    g = 2 / len(xn) * xn.T @ (xn @ w - yn)  # gradient on B
    w1 = w - 0.1 * g
    g1 = 2 / len(x2n) * x2n.T @ (x2n @ w1 - y2n)  # loss term on B'
    grad_log = 0.1 * -(g * g1).sum()
    assert apo.hparam_log()["lr"] == pytest.approx(0.1 * math.exp(-0.5 * grad_log), rel=1e-10)


def test_eps_rho_with_fixed_lr_adapts_only_eps_and_rho():
    x, y = _digits_like()
    model = _mlp()
    apo = APO(
        model, F.cross_entropy, adapt="rmsprop-eps-rho", lr=1e-2, fixed_lr=True, meta_interval=2
    )
    assert set(apo.rule.meta_parameters()) == {"log_eps", "rho_logit"}
    draw, _ = _stream(x, y, 1)
    for _ in range(6):
        apo.step(draw(), draw)
    log = apo.hparam_log()
    assert apo.meta_steps == 3
    assert log["lr"] == torch.tensor(1e-2).item()
    assert log["rho"] != pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="fixed_lr"):
        APOConfig(adapt="lr", fixed_lr=True)


@pytest.mark.parametrize(
    ("adapt", "weight_decay"), [("lr", 0.0), ("lr", 0.05), ("layer-lr", 0.0), ("layer-lr", 0.05)]
)
def test_sgdm_lr_meta_gradient_on_an_mlp_with_kl_matches_finite_differences(adapt, weight_decay):
    """The linear-in-lr lookahead (analytic d theta'/d lr) and the joint forward of B and B'
    against central differences of Q recomputed from scratch, on a 2-layer MLP with KL."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    g = torch.Generator().manual_seed(8)
    x, xf = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g)
    xf = xf.double()
    y, yf = torch.randint(0, 3, (9,), generator=g), torch.randint(0, 3, (7,), generator=g)
    lr, lam_f, lam_w = 0.3, 0.4, 0.2
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = [("0.weight", "0.bias"), ("2.weight", "2.bias")]

    def q(log_scales):  # log_scales: one per layer (layer-lr) or one log lr (lr)
        from torch.func import functional_call

        th = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
        loss = F.cross_entropy(functional_call(model, th, (x,)), y)
        grads = dict(zip(th, torch.autograd.grad(loss, list(th.values())), strict=True))
        new = {}
        for k, names in enumerate(layers):
            rate = math.exp(log_scales[k]) * (lr if adapt == "layer-lr" else 1.0)
            for n in names:
                new[n] = theta[n] - rate * (grads[n] + weight_decay * theta[n])
        old = functional_call(model, theta, (xf,)).log_softmax(-1)
        cur = functional_call(model, new, (xf,)).log_softmax(-1)
        kl = (old.exp() * (old - cur)).sum(-1).mean()
        wsd = sum(((new[n] - theta[n]) ** 2).sum() for n in new)
        value = F.cross_entropy(functional_call(model, new, (x,)), y)
        return (value + lam_f * kl + lam_w / 2 * wsd).item()

    h = 1e-6
    base = [0.0, 0.0] if adapt == "layer-lr" else [math.log(lr)] * 2
    n_meta = 2 if adapt == "layer-lr" else 1
    fd = []
    for k in range(n_meta):
        hi, lo = list(base), list(base)
        for j in range(2) if n_meta == 1 else [k]:
            hi[j] += h
            lo[j] -= h
        fd.append((q(hi) - q(lo)) / (2 * h))
    apo = APO(
        model,
        F.cross_entropy,
        adapt=adapt,
        base="sgdm",
        lr=lr,
        weight_decay=weight_decay,
        meta_interval=1,
        meta_optimizer="sgd",
        meta_lr=1.0,
        lambda_fsd=lam_f,
        lambda_wsd=lam_w,
    )
    before = [p.detach().clone() for p in apo.rule.meta_parameters().values()]
    apo.step((x, y), (xf, yf))
    after = list(apo.rule.meta_parameters().values())
    got = [-(a - b).item() for a, b in zip(after, before, strict=True)]
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-9)


class _Center(torch.nn.Module):
    """Couples the rows of a batch (subtracts the batch mean), unknown to APO's check."""

    def forward(self, h):
        return h - h.mean(0, keepdim=True)


@pytest.mark.parametrize("joint", [False, True])
def test_joint_forward_can_be_turned_off_for_row_coupling_modules(joint):
    """With a module that couples rows, only ``joint_forward=False`` gives the proximal
    objective of separate forwards (central differences of Q recomputed from scratch)."""
    from torch.func import functional_call

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), _Center(), torch.nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(4)
    x, xf = (torch.randn(n, 4, generator=g, dtype=torch.float64) for n in (8, 6))
    y = torch.randint(0, 3, (8,), generator=g)
    lr, lam_f = 0.2, 0.5
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}

    def q(log_lr):
        th = {n: v.clone().requires_grad_(True) for n, v in theta.items()}
        loss = F.cross_entropy(functional_call(model, th, (x,)), y)
        grads = dict(zip(th, torch.autograd.grad(loss, list(th.values())), strict=True))
        new = {n: theta[n] - math.exp(log_lr) * grads[n] for n in theta}
        old = functional_call(model, theta, (xf,)).log_softmax(-1)
        cur = functional_call(model, new, (xf,)).log_softmax(-1)
        kl = (old.exp() * (old - cur)).sum(-1).mean()
        return (F.cross_entropy(functional_call(model, new, (x,)), y) + lam_f * kl).item()

    h = 1e-6
    fd = (q(math.log(lr) + h) - q(math.log(lr) - h)) / (2 * h)
    apo = APO(
        model,
        F.cross_entropy,
        base="sgd",
        lr=lr,
        meta_interval=1,
        meta_optimizer="sgd",
        meta_lr=1.0,
        lambda_fsd=lam_f,
        lambda_wsd=0.0,
        joint_forward=joint,
    )
    (before,) = [p.detach().clone() for p in apo.rule.meta_parameters().values()]
    apo.step((x, y), (xf, None))
    (after,) = apo.rule.meta_parameters().values()
    got = -(after - before).item()
    if joint:  # the concatenated batch is centred as a whole: a different objective
        assert abs(got - fd) > 1e-4 * abs(fd)
    else:
        assert got == pytest.approx(fd, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="joint_forward=1"):
        APOConfig(joint_forward=1)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("nesterov", "yes", "nesterov='yes': must be true or false"),
        ("check_every_step", "no", "check_every_step='no': must be true or false"),
        ("fresh_loss_batch", 1, "fresh_loss_batch=1: must be true or false"),
    ],
)
def test_config_refuses_values_of_the_wrong_type(field, value, needle):
    """The field annotations are the contract (``nesterov: bool``): ``"yes"``, truthy as it is,
    is not a boolean, and through the Python API as well as the CLI."""
    with pytest.raises(ValueError, match=re.escape(needle)):
        APOConfig(**{field: value})
