"""The offline learner's meta-step: dropped runs, distributed equivalence, resume with inner
runs in flight, deployment."""

from __future__ import annotations

import math
import threading

import pytest
import torch

import metaopt
from metaopt.learners import MetaCurvature, MetaMD, MetaSGD
from metaopt.optim import Preconditioned
from tests._metamd_tasks import RegressionFamily, regression_task

SMALL = {
    "inner_steps": 8,
    "tasks_per_step": 4,
    "lr": 0.2,
    "preconditioner_options": {"init_scale": 0.3},
}
PAPER = {"preset": "metamd-paper", **SMALL}


def _meta(learner):
    return [p.detach().clone() for p in learner.preconditioner.parameters()]


def _trajectory(history):
    """The records without their wall times."""
    return [(r.step, r.meta_objective, r.hypergrad_norm, r.skipped, r.extra) for r in history]


def test_non_finite_inner_runs_are_dropped_and_counted():
    tasks = [regression_task(i) for i in range(4)]
    learner = MetaMD(tasks, **{**PAPER, "lr": 1e6, "inner_steps": 30})
    before = _meta(learner)
    record = learner.meta_step()
    assert record.skipped == 4
    assert learner.meta_steps == 1 and learner.history == [record]
    assert math.isnan(record.meta_objective) and math.isnan(record.hypergrad_norm)
    for a, b in zip(before, _meta(learner), strict=True):
        assert torch.equal(a, b)  # no meta-step without a kept task


@pytest.mark.parametrize("cls", [MetaMD, MetaSGD, MetaCurvature])
def test_distributed_meta_step_equals_single_process(cls):
    # windows of 4 of the 8 inner steps: each rank carries its own runs between meta-steps
    family = RegressionFamily()
    single = cls(family, **SMALL, window=4)
    for _ in range(3):
        single.meta_step()
    ranks = [cls(family, **SMALL, window=4) for _ in range(2)]
    barrier = threading.Barrier(2)
    # one rank computes at a time (task.make_model seeds the process-global RNG, which two
    # threads would race on; real ranks are processes); the lock is released while waiting
    lock = threading.Lock()
    slots: list[list[torch.Tensor] | None] = [None, None]

    def make_all_reduce(rank):
        def all_reduce(tensors):
            slots[rank] = [t.clone() for t in tensors]
            lock.release()
            barrier.wait()
            other = slots[1 - rank]
            barrier.wait()
            lock.acquire()
            for t, o in zip(tensors, other, strict=True):
                t.add_(o)

        return all_reduce

    def run(rank):
        for _ in range(3):
            with lock:
                ranks[rank].meta_step(rank=rank, world_size=2, all_reduce=make_all_reduce(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in ranks:
        for a, b in zip(_meta(single), _meta(r), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for x, y in zip(single.history, r.history, strict=True):
            assert x.meta_objective == pytest.approx(y.meta_objective, rel=1e-10)


@pytest.mark.parametrize(
    "fields",
    [PAPER, {**SMALL, "window": 4}, {**SMALL, "window": 3, "engine": "pes"}],
    ids=["paper", "window", "pes"],
)
def test_resume_from_state_dict_continues_exactly(fields):
    """Resumed after 3 meta-steps: with windows the runs are in flight (at step 4 of 8, or
    with a Persistent-ES carry) and continue from the saved state, not from scratch."""
    family = RegressionFamily()
    straight = MetaMD(family, **fields)
    straight.meta_train(5)
    first = MetaMD(family, **fields)
    first.meta_train(3)
    state = first.state_dict()
    first.meta_train(1)  # the saved state is a copy: stepping on does not change it
    resumed = MetaMD(family, **fields)
    resumed.load_state_dict(state)
    assert resumed.meta_steps == 3
    assert _trajectory(resumed.history) == _trajectory(straight.history[:3])
    resumed.meta_train(2)
    for a, b in zip(_meta(straight), _meta(resumed), strict=True):
        assert torch.equal(a, b)
    assert _trajectory(resumed.history) == _trajectory(straight.history)


def test_load_state_dict_rejects_another_config():
    family = RegressionFamily()
    state = MetaMD(family, **PAPER).state_dict()
    with pytest.raises(ValueError, match="inner_steps"):
        MetaMD(family, **{**PAPER, "inner_steps": 9}).load_state_dict(state)


def test_meta_training_changes_M_and_deploys_through_files(tmp_path):
    family = RegressionFamily()
    learner = MetaMD(family, **PAPER, objective_options={"gamma": 0.01}, meta_lr=0.05)
    start = _meta(learner)
    learned = learner.meta_train(3)
    assert any(not torch.equal(a, b) for a, b in zip(start, _meta(learner), strict=True))
    assert (learned.rule, learned.lr, learned.compose) == ("sgd", 0.2, "gradient")
    path = tmp_path / "metamd.safetensors"
    metaopt.save_learned_optimizer(learned, path)
    model = family.sample(torch.Generator().manual_seed(0)).make_model(42)
    opt = metaopt.load_optimizer(path, model, lr=0.1)
    assert isinstance(opt, Preconditioned)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    torch.nn.functional.mse_loss(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    opt.step()
    after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    # oracle: the mirror step theta - eta M^{-1} g with the dense learned M
    M = torch.linalg.inv(learned.preconditioner.dense()).detach()
    torch.testing.assert_close(after, before - 0.1 * torch.linalg.solve(M, g))


def test_one_user_defined_meta_objective_runs_with_metamd_and_apo():
    calls = []

    @metaopt.register_meta_objective("test-user-distance-loss")
    def user_objective(ctx, weight=0.5):
        x, y = ctx.batch
        calls.append(type(ctx.params_after).__name__)
        out = ctx.forward(ctx.params_after, x)
        return ctx.loss(out, y) + weight * ctx.squared_distance()

    learner = MetaMD(
        RegressionFamily(),
        **PAPER,
        engine="unroll",
        meta_objective="test-user-distance-loss",
        objective_options={"weight": 0.1},
    )
    before = _meta(learner)
    record = learner.meta_step()
    assert record.skipped == 0 and calls
    assert any(not torch.equal(a, b) for a, b in zip(before, _meta(learner), strict=True))

    n_metamd = len(calls)
    task = regression_task(0)
    model = task.make_model(0)
    apo = metaopt.APO(
        model,
        task.loss,
        base="sgd",
        adapt="lr",
        lr=0.05,
        meta_interval=1,
        warmup=0,
        meta_objective="test-user-distance-loss",
        objective_options={"weight": 0.1},
    )
    stream = task.train_batches(0)
    lr0 = dict(apo.hparam_log())
    for _ in range(3):
        apo.step(next(stream), fsd_batch=next(stream))
    assert len(calls) > n_metamd  # the same function ran inside APO's meta steps
    assert apo.hparam_log() != lr0  # and its meta-gradient moved APO's learning rate
