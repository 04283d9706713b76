"""The proximal meta-objective and its output divergences against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from metaopt.objectives import MetaContext, evaluate_meta_objective
from metaopt.objectives.proximal import fsd_divergence

NEW = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
OLD = [[0.0, 0.0, 0.0], [1.0, 1.0, -1.0]]


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_kl_is_the_mean_over_rows_of_kl_old_new_by_hand():
    want = 0.0
    for new, old in zip(NEW, OLD, strict=True):
        p, q = _softmax(old), _softmax(new)
        want += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    want /= 2
    got = fsd_divergence(
        "kl", torch.tensor(NEW, dtype=torch.float64), torch.tensor(OLD, dtype=torch.float64)
    )
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_mse_is_half_the_mean_squared_row_norm_by_hand():
    want = sum(
        sum((a - b) ** 2 for a, b in zip(n, o, strict=True)) for n, o in zip(NEW, OLD, strict=True)
    )
    want = 0.5 * want / 2
    got = fsd_divergence(
        "mse", torch.tensor(NEW, dtype=torch.float64), torch.tensor(OLD, dtype=torch.float64)
    )
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_bregman_of_cross_entropy_is_kl_and_of_mse_loss_is_mean_squared_difference():
    new = torch.tensor(NEW, dtype=torch.float64)
    old = torch.tensor(OLD, dtype=torch.float64)
    labels = torch.tensor([2, 0])
    got = fsd_divergence("bregman", new, old, labels, F.cross_entropy)
    # Bregman divergence of log-sum-exp is KL(softmax(old) || softmax(new)), label-free
    assert got.item() == pytest.approx(fsd_divergence("kl", new, old).item(), rel=1e-10)
    targets = torch.zeros(2, 3, dtype=torch.float64)
    got = fsd_divergence("bregman", new, old, targets, F.mse_loss)
    want = (
        sum((a - b) ** 2 for n, o in zip(NEW, OLD, strict=True) for a, b in zip(n, o, strict=True))
        / 6
    )
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_unknown_fsd_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="fsd='l1'"):
        fsd_divergence("l1", torch.zeros(1, 2), torch.zeros(1, 2))


def _linear_ctx(**extras):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2, bias=False).double()
    x, xf = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    w0 = model.weight.detach().clone()
    w1 = w0 + 0.1 * torch.randn_like(w0)

    def forward(params, inp):
        return inp @ params["weight"].T

    ctx = MetaContext(
        params_before={"weight": w0},
        params_after={"weight": w1},
        forward=forward,
        loss=F.mse_loss,
        batch=(x, y),
        fsd_batch=(xf, None),
        extras=dict(extras),
    )
    return ctx, x, y, xf, w0, w1


def test_proximal_equals_loss_plus_weighted_fsd_and_wsd_by_hand():
    ctx, x, y, xf, w0, w1 = _linear_ctx()
    loss = ((x @ w1.T - y) ** 2).mean()
    fsd = 0.5 * ((xf @ (w1 - w0).T) ** 2).sum(1).mean()
    wsd = ((w1 - w0) ** 2).sum()
    got = evaluate_meta_objective("proximal", ctx, lambda_fsd=0.3, lambda_wsd=2.0, fsd="mse")
    assert got.item() == pytest.approx((loss + 0.3 * fsd + 0.5 * 2.0 * wsd).item(), rel=1e-12)


def test_proximal_loss_term_uses_the_fresh_batch_when_given():
    x2, y2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    ctx, *_, w1 = _linear_ctx(loss_batch=(x2, y2))
    got = evaluate_meta_objective("proximal", ctx)
    assert got.item() == pytest.approx(((x2 @ w1.T - y2) ** 2).mean().item(), rel=1e-12)


def test_proximal_without_fsd_batch_names_the_missing_field():
    ctx, *_ = _linear_ctx()
    ctx.fsd_batch = None
    with pytest.raises(ValueError, match="fsd_batch"):
        evaluate_meta_objective("proximal", ctx, lambda_fsd=1.0)
