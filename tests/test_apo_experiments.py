"""``experiments/apo_experiments.py``: the greedy-lr probe against a closed form, and the
multi-seed grid selection against hand-computed medians."""

from __future__ import annotations

import torch
from torch import nn

from experiments.apo_experiments import PROBE_ETAS, _greedy_eta


def test_greedy_eta_matches_the_closed_form_minimiser_of_a_one_weight_quadratic():
    # J(w) = mean((w x - y)^2), minimised at w* = <x, y> / <x, x>. With no RMSprop state
    # the step is g / (sqrt(0.01 g^2) + eps) = 10 sign(g) (to 1e-7), so J(w - 10 eta
    # sign(g)) is minimised at eta* = |w - w*| / 10, here 0.01, a grid point
    x = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    y = 0.7 * x.squeeze(1)
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.8)  # w - w* = 0.1

    def loss(pred, target):
        return ((pred.squeeze(1) - target) ** 2).mean()

    got = _greedy_eta(model, loss, (x, y), lambda p: None)
    assert got["greedy_lr"] == 0.01
    assert got["loss_after_greedy_step"] < 1e-12
    assert float(model.weight) == 0.8  # the probe leaves the model as it found it
    # with a large RMSprop state the step is g / sqrt(0.99 v): eta* moves accordingly
    v = torch.full_like(model.weight, 100.0)
    g = float(torch.autograd.grad(loss(model(x), y), model.weight)[0])
    step = g / ((0.99 * 100.0 + 0.01 * g * g) ** 0.5 + 1e-8)
    best = min(PROBE_ETAS, key=lambda e: abs(0.8 - e * step - 0.7))
    assert _greedy_eta(model, loss, (x, y), lambda p: v)["greedy_lr"] == best


def test_seeded_grid_ranks_configurations_by_median_with_diverged_seeds_as_infinite(monkeypatch):
    import experiments.apo_experiments as exp

    finals = {  # (lr, seed) -> final loss; None = diverged
        (0.1, 0): 1e-9, (0.1, 1): None, (0.1, 2): None,  # best single run, median +inf
        (0.01, 0): 3e-6, (0.01, 1): 1e-6, (0.01, 2): 2e-6,  # median 2e-6
        (0.03, 0): 5e-6, (0.03, 1): 1e-7, (0.03, 2): None,  # median 5e-6
    }  # fmt: skip

    def fake_run(task, spec, hp, steps, seed=0):
        return {"spec": spec, "hparams": hp, "final_train_loss": finals[hp["lr"], seed]}

    monkeypatch.setattr(exp, "_run", fake_run)
    out = exp._seeded_grid(None, "sgd", [{"lr": lr} for lr in (0.1, 0.01, 0.03)], 1, (0, 1, 2))
    assert out["best"]["hparams"] == {"lr": 0.01}
    assert out["best"]["final_train_loss"] == 2e-6
    scores = {r["hparams"]["lr"]: r["final_train_loss"] for r in out["runs"]}
    assert scores == {0.1: None, 0.01: 2e-6, 0.03: 5e-6}
    assert out["runs"][0]["final_train_loss_per_seed"] == {"0": 1e-9, "1": None, "2": None}
