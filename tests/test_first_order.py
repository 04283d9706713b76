"""Hypergradient descent, L4 and PowerSign/AddSign against their published update equations,
worked by hand (plain Python float64 arithmetic) on tiny problems."""

from __future__ import annotations

import io
import math

import pytest
import torch

from metaopt.optim.hypergradient_descent import SGDHD, AdamHD
from metaopt.optim.l4 import L4
from metaopt.optim.sign import AddSign, PowerSign, sign_decay

# f(theta) = 0.5 * (theta_1^2 + 4 theta_2^2), gradient (theta_1, 4 theta_2), theta_0 = (1, 1).
A = (1.0, 4.0)


def _quadratic_param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))


def _loss(theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * (A[0] * theta[0] ** 2 + A[1] * theta[1] ** 2)


def _closure(opt: torch.optim.Optimizer, theta: torch.Tensor):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(theta)
        loss.backward()
        return loss

    return closure


def _run(opt: torch.optim.Optimizer, theta: torch.Tensor, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        opt.step(_closure(opt, theta))
        out.append(theta.detach().tolist())
    return out


def _lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[0]["lr"])


# ----------------------------------------------------------------- hypergradient descent


def test_sgd_hd_matches_hand_computed_steps() -> None:
    # Baydin et al. Alg. 1, alpha_0 = 0.1, beta = 0.01.
    # t=1: g=(1,4), h=0 (u_0=0), alpha=0.1, u=(-1,-4), theta=(0.9, 0.6)
    # t=2: g=(0.9,2.4), h=g.u_1=-0.9-9.6=-10.5, alpha=0.1+0.105=0.205,
    #      theta=(0.9-0.205*0.9, 0.6-0.205*2.4)=(0.7155, 0.108)
    # t=3: g=(0.7155,0.432), h=-(0.7155*0.9+0.432*2.4)=-1.68075, alpha=0.2218075,
    #      theta=(0.7155*(1-0.2218075), 0.108-0.2218075*0.432)=(0.55679673375, 0.01217916)
    theta = _quadratic_param()
    opt = SGDHD([theta], lr=0.1, hypergrad_lr=0.01)
    opt.step(_closure(opt, theta))
    assert theta.tolist() == pytest.approx([0.9, 0.6], abs=1e-14)
    assert _lr(opt) == pytest.approx(0.1, abs=1e-14)
    opt.step(_closure(opt, theta))
    assert _lr(opt) == pytest.approx(0.205, abs=1e-14)
    assert theta.tolist() == pytest.approx([0.7155, 0.108], abs=1e-14)
    opt.step(_closure(opt, theta))
    assert _lr(opt) == pytest.approx(0.2218075, abs=1e-14)
    assert theta.tolist() == pytest.approx([0.55679673375, 0.01217916], abs=1e-14)


def test_sgdn_hd_matches_hand_computed_steps() -> None:
    # Baydin et al. Alg. 2 (Nesterov), mu = 0.5, alpha_0 = 0.1, beta = 0.01.
    # t=1: g=(1,4), v=(1,4), u=-g-mu v=(-1.5,-6), alpha=0.1, theta=(0.85, 0.4)
    # t=2: g=(0.85,1.6), h=-1.275-9.6=-10.875, alpha=0.20875, v=(1.35,3.6),
    #      u=(-0.85-0.675, -1.6-1.8)=(-1.525,-3.4), theta=(0.53165625, -0.30975)
    theta = _quadratic_param()
    opt = SGDHD([theta], lr=0.1, hypergrad_lr=0.01, momentum=0.5, nesterov=True)
    opt.step(_closure(opt, theta))
    assert theta.tolist() == pytest.approx([0.85, 0.4], abs=1e-14)
    opt.step(_closure(opt, theta))
    assert _lr(opt) == pytest.approx(0.20875, abs=1e-14)
    assert theta.tolist() == pytest.approx([0.53165625, -0.30975], abs=1e-14)


def test_sgd_heavy_ball_hd_matches_hand_computed_steps() -> None:
    # Heavy-ball variant (nesterov=False): u_t = -v_t, v_t = mu v_{t-1} + g_t, mu = 0.5.
    # t=1: v=(1,4), u=(-1,-4), theta=(0.9, 0.6)
    # t=2: g=(0.9,2.4), h=-10.5, alpha=0.205, v=(1.4,4.4), theta=(0.9-0.287, 0.6-0.902)
    theta = _quadratic_param()
    opt = SGDHD([theta], lr=0.1, hypergrad_lr=0.01, momentum=0.5)
    _run(opt, theta, 2)
    assert _lr(opt) == pytest.approx(0.205, abs=1e-14)
    assert theta.tolist() == pytest.approx([0.613, -0.302], abs=1e-14)


def test_adam_hd_matches_hand_computed_steps() -> None:
    # Baydin et al. Alg. 3, b1=0.9, b2=0.999, eps=0, alpha_0=0.1, beta=0.01.
    # t=1: g=(1,4), m_hat=g, v_hat=g^2, u=-sign(g)=(-1,-1), alpha=0.1, theta=(0.9,0.9)
    theta = _quadratic_param()
    opt = AdamHD([theta], lr=0.1, hypergrad_lr=0.01, eps=0.0)
    opt.step(_closure(opt, theta))
    assert theta.tolist() == pytest.approx([0.9, 0.9], abs=1e-14)
    # t=2: g=(0.9,3.6), h=g.u_1=-4.5, alpha=0.1+0.045=0.145
    #      m=0.9*(0.1,0.4)+0.1*g=(0.18,0.72), v=0.999*(0.001,0.016)+0.001*g^2=(0.001809,0.028944)
    alpha = 0.145
    m = (0.18, 0.72)
    v = (0.001809, 0.028944)
    u = [-(mi / (1 - 0.9**2)) / math.sqrt(vi / (1 - 0.999**2)) for mi, vi in zip(m, v, strict=True)]
    expected = [0.9 + alpha * u[0], 0.9 + alpha * u[1]]
    opt.step(_closure(opt, theta))
    assert _lr(opt) == pytest.approx(alpha, abs=1e-14)
    assert theta.tolist() == pytest.approx(expected, abs=1e-13)
    assert opt.state[theta]["prev_update"].tolist() == pytest.approx(u, abs=1e-12)


def test_hd_param_groups_adapt_separately_and_state_dict_keeps_the_rate() -> None:
    a, b = _quadratic_param(), _quadratic_param()
    opt = SGDHD([{"params": [a]}, {"params": [b], "hypergrad_lr": 0.0}], lr=0.1, hypergrad_lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        (_loss(a) + _loss(b)).backward()
        opt.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.205, abs=1e-14)
    assert float(opt.param_groups[1]["lr"]) == pytest.approx(0.1, abs=1e-14)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = SGDHD([{"params": [a]}, {"params": [b], "hypergrad_lr": 0.0}], lr=0.1)
    fresh.load_state_dict(torch.load(buf))
    assert float(fresh.param_groups[0]["lr"]) == pytest.approx(0.205, abs=1e-14)
    assert fresh.state[a]["prev_update"].tolist() == pytest.approx([-0.9, -2.4], abs=1e-14)


def test_hd_chainable_scheduler_scales_the_adapted_rate() -> None:
    theta = _quadratic_param()
    opt = SGDHD([theta], lr=0.1, hypergrad_lr=0.01)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    _run(opt, theta, 2)
    sched.step()
    assert _lr(opt) == pytest.approx(0.205 * 0.5, abs=1e-14)


def test_hd_rejects_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="hypergrad_lr"):
        SGDHD([_quadratic_param()], hypergrad_lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGDHD([_quadratic_param()], nesterov=True)


# ----------------------------------------------------------------------------------- L4


def test_l4_momentum_matches_hand_computed_steps() -> None:
    # Rolinek & Martius: eta = alpha (L - gamma L_min) / (g_hat . v), L_min0 = gamma0 L_0,
    # L_min <- min(L_min, L) then *= (1 + 1/tau). alpha=0.15, gamma=0.9, gamma0=0.75, tau=1000.
    theta = _quadratic_param()
    opt = L4([theta], direction="momentum", epsilon=0.0)
    # t=1: L=2.5, L_min=1.875, g=(1,4), m=(0.1,0.4), g_hat=v=(1,4), g_hat.v=17
    eta1 = 0.15 * (2.5 - 0.9 * 1.875) / 17.0
    th1 = [1.0 - eta1 * 1.0, 1.0 - eta1 * 4.0]
    opt.step(_closure(opt, theta))
    assert theta.tolist() == pytest.approx(th1, abs=1e-14)
    assert float(opt.state[theta]["l4_min_loss"]) == pytest.approx(1.875 * 1.001, abs=1e-14)
    # t=2: L = 0.5 (th1_1^2 + 4 th1_2^2); L_min = min(1.876875, L); g = (th1_1, 4 th1_2)
    loss2 = 0.5 * (th1[0] ** 2 + 4 * th1[1] ** 2)
    lmin2 = min(1.875 * 1.001, loss2)
    g2 = [th1[0], 4 * th1[1]]
    m2 = [0.9 * 0.1 + 0.1 * g2[0], 0.9 * 0.4 + 0.1 * g2[1]]
    gh = [mi / (1 - 0.9**2) for mi in m2]
    eta2 = 0.15 * (loss2 - 0.9 * lmin2) / (gh[0] ** 2 + gh[1] ** 2)
    opt.step(_closure(opt, theta))
    assert theta.tolist() == pytest.approx(
        [th1[0] - eta2 * gh[0], th1[1] - eta2 * gh[1]], abs=1e-14
    )
    assert float(opt.state[theta]["l4_step_size"]) == pytest.approx(eta2, abs=1e-14)
    assert float(opt.state[theta]["l4_min_loss"]) == pytest.approx(lmin2 * 1.001, abs=1e-14)


def test_l4_min_loss_tracks_the_minimum_and_forgets_slowly() -> None:
    # Constant gradient g=(1,2) so g_hat = v = g and g_hat . v = 5; losses 2.0, 1.0, 1.2.
    # t=1: L_min=0.75*2=1.5,  eta=0.15*(2.0-0.9*1.5)/5=0.0195,    L_min -> 1.5015
    # t=2: L_min=min(1.5015,1.0)=1.0, eta=0.15*(1.0-0.9)/5=0.003,  L_min -> 1.001
    # t=3: L_min=min(1.001,1.2)=1.001, eta=0.15*(1.2-0.9009)/5=0.008973, L_min -> 1.002001
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = L4([w], direction="momentum", epsilon=0.0)
    expected = [(2.0, 0.0195, 1.5015), (1.0, 0.003, 1.001), (1.2, 0.008973, 1.002001)]
    for loss, eta, min_loss in expected:

        def closure(loss: float = loss) -> torch.Tensor:
            w.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
            return torch.tensor(loss, dtype=torch.float64)

        opt.step(closure)
        assert float(opt.state[w]["l4_step_size"]) == pytest.approx(eta, abs=1e-14)
        assert float(opt.state[w]["l4_min_loss"]) == pytest.approx(min_loss, abs=1e-14)
    assert w.tolist() == pytest.approx([-0.031473, -0.062946], abs=1e-14)


def test_l4_adam_matches_hand_computed_step() -> None:
    theta = _quadratic_param()
    opt = L4([theta], direction="adam", epsilon=0.0, eps=1e-4)
    # t=1: g_hat=(1,4), s_hat=g^2, v=g/(|g|+1e-4), g_hat.v = 1/1.0001 + 16/4.0001
    v = [1.0 / 1.0001, 4.0 / 4.0001]
    eta = 0.15 * (2.5 - 0.9 * 1.875) / (1.0 * v[0] + 4.0 * v[1])
    opt.step(_closure(opt, theta))
    assert theta.tolist() == pytest.approx([1 - eta * v[0], 1 - eta * v[1]], abs=1e-14)


def test_l4_needs_a_closure() -> None:
    theta = _quadratic_param()
    opt = L4([theta])
    _loss(theta).backward()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="alpha"):
        L4([theta], lr=1e-3)


def test_l4_load_keeps_min_loss_in_fp32_for_bf16_params() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.bfloat16))
    opt = L4([w], direction="momentum")
    opt.step(_closure(opt, w))
    saved = opt.state[w]["l4_min_loss"]
    assert saved.dtype == torch.float32
    fresh = L4([w], direction="momentum")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[w]["l4_min_loss"].dtype == torch.float32
    assert torch.equal(fresh.state[w]["l4_min_loss"], saved)


# ------------------------------------------------------------------------ sign rules

G1 = [1.0, -2.0, 0.5]
G2 = [-0.5, 1.0, 0.2]  # beta=0.9: m_2 = (0.04, -0.08, 0.065); sign(g)sign(m) = (-1, -1, +1)


def _two_manual_steps(opt: torch.optim.Optimizer, w: torch.Tensor) -> list[list[float]]:
    out = []
    for g in (G1, G2):
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(w.detach().tolist())
    return out


def test_powersign_matches_published_rule_with_linear_decay() -> None:
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = PowerSign([w], lr=0.1, decay="linear", decay_steps=4)
    (s1, s2) = _two_manual_steps(opt, w)
    e = math.e
    # t=0: f=1, all signs agree: w = -0.1 * e * g1
    w1 = [-0.1 * e * g for g in G1]
    assert s1 == pytest.approx(w1, abs=1e-14)
    # t=1: f = 1 - 1/4 = 0.75; exponents 0.75 * (-1, -1, +1)
    scale = [e**-0.75, e**-0.75, e**0.75]
    assert s2 == pytest.approx([w1[i] - 0.1 * scale[i] * G2[i] for i in range(3)], abs=1e-14)


def test_addsign_matches_published_rule() -> None:
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = AddSign([w], lr=0.1)
    (s1, s2) = _two_manual_steps(opt, w)
    w1 = [-0.1 * 2.0 * g for g in G1]  # (1 + 1) g
    assert s1 == pytest.approx(w1, abs=1e-14)
    scale = [0.0, 0.0, 2.0]  # 1 + (-1, -1, +1)
    assert s2 == pytest.approx([w1[i] - 0.1 * scale[i] * G2[i] for i in range(3)], abs=1e-14)
    assert opt.state[w]["step"] == 2


def test_sign_decays_match_formulas() -> None:
    assert sign_decay("constant", 123) == 1.0
    assert sign_decay("linear", 2, 8) == pytest.approx(0.75)
    assert sign_decay("linear", 10, 8) == pytest.approx(0.0)
    assert sign_decay("cyclic", 2, 8) == pytest.approx(0.5)  # 0.5 (1 + cos(pi/2))
    assert sign_decay("cyclic", 4, 8) == pytest.approx(0.0, abs=1e-15)  # cos(pi)
    assert sign_decay("cyclic", 2, 8, periods=2) == pytest.approx(0.0, abs=1e-15)
    assert sign_decay("restart", 2, 8) == pytest.approx(0.5 + math.sqrt(2) / 4)
    assert sign_decay("restart", 4, 8, periods=2) == pytest.approx(1.0)  # restarted
    assert sign_decay("restart", 6, 8, periods=2) == pytest.approx(0.5)  # (12 mod 8) = 4


def test_sign_step_lr_scheduler_and_bad_input() -> None:
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = AddSign([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w.grad = torch.tensor(G1, dtype=torch.float64)
    opt.step()
    sched.step()
    before = w.detach().clone()
    w.grad = torch.tensor(G1, dtype=torch.float64)
    opt.step()  # signs agree again: factor 2, lr 0.05
    assert (w - before).tolist() == pytest.approx([-0.05 * 2 * g for g in G1], abs=1e-14)
    with pytest.raises(ValueError, match="decay_steps"):
        PowerSign([w], decay="cyclic")
    with pytest.raises(ValueError, match="decay="):
        AddSign([w], decay="cosine", decay_steps=3)
