"""Spec registry, the Trainer loop and training runs, against hand-written torch loops."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import metaopt
from meta_test import specs
from meta_test.runs import run_training
from meta_test.space import ADAM_LR_GRID, LR_GRID, SearchSpace
from metaopt.kron import KroneckerPreconditioner
from tasks import Task


def tiny_task(out_features: int = 1, n: int = 64) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.randn(4, out_features, generator=g)
    data = TensorDataset(x, y)
    return Task(
        "tiny-regression",
        lambda: nn.Linear(4, out_features),
        nn.functional.mse_loss,
        "mse",
        data,
        data,
        data,
        batch_size=16,
    )


def manual_losses(task: Task, make_opt, steps: int, seed: int = 0) -> list[float]:
    """The reference loop, written directly against torch."""
    model = task.make_model(seed)
    opt = make_opt(model)
    stream = task.train_batches(seed)
    out = []
    for _ in range(steps):
        x, y = next(stream)
        opt.zero_grad()
        loss = task.loss(model(x), y)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def test_optimizer_spec_run_matches_a_hand_written_torch_loop() -> None:
    task = tiny_task()
    r = run_training(task, "sgdm", {"lr": 0.05}, seed=3, steps=30, log_every=7)
    ref = manual_losses(task, lambda m: torch.optim.SGD(m.parameters(), 0.05, 0.9), 30, seed=3)
    assert r.train_loss == pytest.approx(ref, rel=1e-6)  # the loss BEFORE each update
    assert not r.diverged and r.steps_done == 30
    assert r.hparam_steps == [7, 14, 21, 28, 30]
    assert r.hparams_adapted == {"lr": [0.05] * 5}
    assert set(r.final) == {f"{s}_{k}" for s in ("train", "val", "test") for k in ("loss", "mse")}
    assert r.mean_sec_per_iter >= r.sec_per_iter * 0.5 > 0 and r.peak_memory_mb is None


def test_l4_goes_through_its_closure_and_reports_its_step_size() -> None:
    r = run_training(tiny_task(), "l4-adam", {"alpha": 0.15}, seed=0, steps=12, log_every=4)
    assert len(r.hparams_adapted["l4_step_size"]) == 3
    assert r.train_loss[-1] < r.train_loss[0]


def test_divergence_stops_the_run_and_scores_it_worst() -> None:
    r = run_training(tiny_task(), "sgd", {"lr": 50.0}, seed=0, steps=200, log_every=10)
    assert r.diverged
    assert r.steps_done < 200 and all(math.isfinite(v) for v in r.train_loss)
    assert math.isnan(r.final["val_mse"])


def test_eval_curve_starts_at_step_zero() -> None:
    task = tiny_task()
    r = run_training(task, "adam", {"lr": 0.1}, seed=0, steps=20, log_every=5, eval_every=10)
    assert r.eval_steps == [0, 10, 20]
    assert r.eval_metric[0] == pytest.approx(task.evaluate(task.make_model(0), "test")["mse"])


def test_learned_identity_preconditioner_is_sgd(tmp_path) -> None:
    task = tiny_task()
    pre = KroneckerPreconditioner.for_model(task.make_model(0), "scalar")  # log s = 0: identity
    path = tmp_path / "pre.safetensors"
    metaopt.save_learned_optimizer(metaopt.LearnedOptimizer(pre, "sgd", {}, 0.2), path)
    spec = f"learned:{path}"
    r = run_training(task, spec, {"lr": 0.1, "momentum": 0.5}, seed=1, steps=15, log_every=5)
    ref = manual_losses(task, lambda m: torch.optim.SGD(m.parameters(), 0.1, 0.5), 15, seed=1)
    assert r.train_loss == pytest.approx(ref, rel=1e-5)
    assert r.num_meta_parameters == pre.num_meta_parameters() > 0
    assert specs.search_space(spec).names == ["lr", "weight_decay"]
    # the lr grid: the file's meta-trained lr 0.2 in steps of sqrt(2), from 0.2 / 2 to 0.2 * 2
    grid = (0.1, 0.2 / 2**0.5, 0.2, 0.2 * 2**0.5, 0.4)
    assert specs.search_space(spec).dims[0].grid == pytest.approx(grid)
    bare = tmp_path / "bare.safetensors"
    metaopt.save_preconditioner(pre, bare)  # no update rule: not a learned optimizer
    with pytest.raises(ValueError, match="without an update rule"):
        run_training(task, f"learned:{bare}", {"lr": 0.1}, seed=0, steps=1)
    with pytest.raises(ValueError, match="does not fit this model"):
        run_training(tiny_task(out_features=3), spec, {"lr": 0.1}, seed=0, steps=1)


def test_unknown_spec_lists_the_valid_ones_and_spaces_follow_the_papers() -> None:
    with pytest.raises(ValueError, match="unknown; valid specs: adam, .*, sgdm, .*learned:<arg>"):
        specs.check_spec("sgdx")
    assert specs.search_space("adam").dims[0].grid == ADAM_LR_GRID
    assert specs.search_space("sgdm").dims[0].grid == LR_GRID
    assert specs.search_space("l4-sgdm").names == ["alpha", "weight_decay"]  # L4 has no lr
    assert "apo-lr:<arg>" in specs.available_specs()


def test_register_spec_exact_and_prefix() -> None:
    calls = []

    class Fixed:
        """A trainer that takes a fixed-size gradient step and says so."""

        num_meta_parameters = 7

        def __init__(self, model, task, lr):
            self.model, self.task, self.lr = model, task, lr

        def step(self, batch, draw_batch):
            x, y = batch
            extra = draw_batch()  # the fresh batch comes from a separate stream
            assert extra[0].shape == x.shape
            loss = self.task.loss(self.model(x), y)
            grads = torch.autograd.grad(loss, list(self.model.parameters()))
            with torch.no_grad():
                for p, g in zip(self.model.parameters(), grads, strict=True):
                    p.sub_(self.lr * g)
            return loss.detach()

        def hparam_log(self):
            return {}

    def build(spec, model, task, hp):
        calls.append(spec)
        return Fixed(model, task, float(spec.split(":")[1]) if ":" in spec else hp["lr"])

    specs.register_spec("test-fixed", build, search_space=SearchSpace(), replace=True)
    specs.register_spec("test-fixed-lr:<lr>", build, replace=True)
    task = tiny_task()
    a = run_training(task, "test-fixed", {"lr": 0.1}, seed=0, steps=5, log_every=5)
    b = run_training(task, "test-fixed-lr:0.1", {}, seed=0, steps=5, log_every=5)
    ref = manual_losses(task, lambda m: torch.optim.SGD(m.parameters(), 0.1), 5)
    assert a.train_loss == pytest.approx(ref, rel=1e-6) and b.train_loss == a.train_loss
    assert a.num_meta_parameters == 7 and calls == ["test-fixed", "test-fixed-lr:0.1"]
    with pytest.raises(ValueError, match="already registered"):
        specs.register_spec("test-fixed", build)
