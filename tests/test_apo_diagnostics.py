"""``metaopt.learners.apo.greedy_lr``: the one-step-optimal learning rate, against the
closed-form minimiser of a one-weight quadratic."""

from __future__ import annotations

import torch
from torch import nn

from metaopt.learners.apo import GREEDY_LRS, greedy_lr
from metaopt.optim.rules import MomentumState, RMSpropState

# J(w) = mean((w x - y)^2) with y = 0.7 x: minimised at w* = 0.7; the model starts at 0.8
X = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
Y = 0.7 * X.squeeze(1)


def _loss(pred, target):
    return ((pred.squeeze(1) - target) ** 2).mean()


def _model() -> nn.Linear:
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.8)  # w - w* = 0.1
    return model


def test_rmsprop_greedy_lr_matches_the_closed_form_minimiser() -> None:
    # From a fresh RMSprop state the step is g / (sqrt(0.01 g^2) + eps) = 10 sign(g) (to
    # 1e-7), so J(w - 10 eta sign(g)) is minimised at eta* = |w - w*| / 10 = 0.01, a grid point
    model = _model()
    got = greedy_lr(model, _loss, (X, Y))
    assert got.lr == 0.01 and got.loss < 1e-12
    assert model.weight.item() == 0.8  # the probe leaves the model as it found it
    # with square_avg v = 100 the step is g / sqrt(0.99 v + 0.01 g^2): J is a parabola in w,
    # so the best grid point is the one whose step lands closest to w*
    g = 2 * float(((0.8 * X.squeeze(1) - Y) * X.squeeze(1)).mean())  # dJ/dw by hand
    step = g / ((0.99 * 100.0 + 0.01 * g * g) ** 0.5 + 1e-8)
    best = min(GREEDY_LRS, key=lambda e: abs(0.8 - e * step - 0.7))
    v = torch.full_like(model.weight, 100.0)
    state = RMSpropState(torch.tensor(3.0, dtype=torch.float64), v, None)
    assert greedy_lr(model, _loss, (X, Y), states={"weight": state}).lr == best
    assert torch.equal(state.square_avg, torch.full_like(v, 100.0))  # read, not advanced


def test_sgd_greedy_lr_is_the_newton_step() -> None:
    # SGD: J(w - eta g) with g = 2 E[x^2] (w - w*) is minimised at eta* = 1 / (2 E[x^2]) = 0.25
    lrs = (0.1, 0.2, 0.25, 0.3, 0.5)
    got = greedy_lr(_model(), _loss, (X, Y), "sgd", lrs=lrs)
    assert got.lr == 0.25 and got.loss < 1e-20
    # heavy-ball momentum 0.5 on a buffer b = 0.2: the step is 0.5 b + g = 0.5 with g = 0.4,
    # so eta* = (w - w*) / 0.5 = 0.2 (the state is used: without it eta* is 0.25)
    buf = MomentumState(torch.full((1, 1), 0.2, dtype=torch.float64))
    got = greedy_lr(_model(), _loss, (X, Y), "sgd", states={"weight": buf},
                    hparams={"momentum": 0.5}, lrs=lrs)  # fmt: skip
    assert got.lr == 0.2 and got.loss < 1e-20
