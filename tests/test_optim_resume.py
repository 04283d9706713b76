"""Resume from a mid-run ``state_dict`` reproduces the uninterrupted run, for every name.

A Conv2d + BatchNorm2d + Linear net trains on deterministic batches for ``STEPS`` steps.
A second run stops after ``SPLIT`` steps, saves the model and optimizer state through
``torch.save`` bytes, loads them into a fresh model and a fresh optimizer, and continues.
Parameters and BatchNorm buffers must match the uninterrupted run to 1e-6. A control run
that continues with a fresh optimizer *without* loading its state must differ, so the test
fails if the state that matters (adapted rates, moments, min-loss, factors) is dropped.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from metaopt.optim.registry import available_optimizers, get_optimizer

STEPS, SPLIT = 8, 4
MODEL_ONLY = {
    "kfac": "metaopt.optim.kfac",
    "ekfac": "metaopt.optim.kfac",
    "shampoo": "metaopt.optim.shampoo",
}
STATELESS = {"sgd"}
# Larger hypergradient steps than the defaults so that the adapted rates visibly move in
# eight steps (and the control run can tell a dropped rate apart); a decaying sign schedule
# so that the restored step counter matters.
HPARAMS: dict[str, dict] = {
    "sgd-hd": {"hypergrad_lr": 0.05},
    "sgdm-hd": {"hypergrad_lr": 0.05},
    "adam-hd": {"hypergrad_lr": 1e-4},
    "powersign": {"decay": "restart", "decay_steps": STEPS, "decay_periods": 2},
    "addsign": {"decay": "linear", "decay_steps": STEPS},
}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 2, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = _batch(step)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _roundtrip(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


@pytest.mark.parametrize("name", available_optimizers())
def test_resume_reproduces_uninterrupted_run(name: str) -> None:
    if name in MODEL_ONLY:
        pytest.importorskip(MODEL_ONLY[name])
    hp = HPARAMS.get(name, {})

    ref = _model(0)
    _train(ref, get_optimizer(name, ref, **hp), range(STEPS))
    assert all(torch.isfinite(v).all() for v in ref.state_dict().values())

    first = _model(0)
    opt = get_optimizer(name, first, **hp)
    _train(first, opt, range(SPLIT))
    saved_model = _roundtrip(first.state_dict())
    saved_opt = _roundtrip(opt.state_dict())
    del first, opt

    resumed = _model(1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = get_optimizer(name, resumed, **hp)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, range(SPLIT, STEPS))
    assert _max_diff(ref, resumed) < 1e-6, f"{name}: resumed run drifted"

    if name not in STATELESS:
        control = _model(1)
        control.load_state_dict(saved_model)
        _train(control, get_optimizer(name, control, **hp), range(SPLIT, STEPS))
        assert _max_diff(ref, control) > 1e-5, f"{name}: optimizer state had no effect"
