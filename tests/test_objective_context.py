"""What a custom meta-objective sees: a missing field is named with the learner that fills
it, and APO's hyperparameters reach the objective in log space, hparam_log() in linear."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import metaopt
from metaopt.objectives.base import OBJECTIVES


@pytest.fixture
def recorded():
    seen = {}

    @metaopt.register_meta_objective("test-needs-fsd")
    def needs_fsd(ctx):
        ctx.require("fsd_batch")
        return ctx.loss(ctx.forward(ctx.params_after, ctx.fsd_batch[0]), ctx.fsd_batch[1])

    @metaopt.register_meta_objective("test-records")
    def records(ctx):
        seen["hparams"] = {k: v.detach().clone() for k, v in ctx.extras["hparams"].items()}
        seen["fsd_batch"] = ctx.fsd_batch
        x, y = ctx.batch
        return ctx.loss(ctx.forward(ctx.params_after, x), y)

    yield seen
    OBJECTIVES.unregister("test-needs-fsd")
    OBJECTIVES.unregister("test-records")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3))


def _batch():
    return torch.randn(8, 4), torch.randint(0, 3, (8,))


def test_a_missing_b_prime_is_named_with_what_to_pass(recorded):
    apo = metaopt.APO(_model(), F.cross_entropy, adapt="lr", lambda_fsd=0.0,
                      meta_objective="test-needs-fsd")  # fmt: skip
    with pytest.raises(ValueError, match=r"ctx\.fsd_batch.*fsd_batch=") as err:
        apo.step(_batch())
    assert "\n" not in str(err.value)
    apo.step(_batch(), fsd_batch=_batch())  # with B' the same objective runs


def test_objective_sees_log_space_meta_parameters_and_hparam_log_linear(recorded):
    apo = metaopt.APO(_model(), F.cross_entropy, adapt="lr", lr=0.05, lambda_fsd=0.0,
                      meta_objective="test-records")  # fmt: skip
    stats = apo.step(_batch())
    assert set(recorded["hparams"]) == {"log_lr"}
    assert recorded["hparams"]["log_lr"].item() == pytest.approx(math.log(0.05))
    assert recorded["fsd_batch"] is None  # lambda_fsd=0 and no B' given
    assert set(apo.hparam_log()) == {"lr"} and set(stats) >= {"lr"}
    assert apo.hparam_log()["lr"] == pytest.approx(math.exp(apo.meta_parameters()[0].item()))


def test_step_returns_the_documented_types(recorded):
    apo = metaopt.APO(_model(), F.cross_entropy, adapt="lr", lambda_fsd=0.0, meta_interval=2,
                      meta_objective="test-records")  # fmt: skip
    first, second = apo.step(_batch()), apo.step(_batch())
    for stats in (first, second):
        assert isinstance(stats["loss"], torch.Tensor) and stats["loss"].dim() == 0
        assert isinstance(stats["meta_step"], bool)
        assert isinstance(stats["skipped_meta_steps"], int)
        assert isinstance(stats["lr"], torch.Tensor) and stats["lr"].dim() == 0
    assert first["meta_step"] and first["meta_objective"].dim() == 0
    assert not second["meta_step"] and second["meta_objective"] is None
