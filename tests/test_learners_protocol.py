"""One meta-learner interface, one engine seam, one file that deploys the whole optimizer."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import metaopt
import tasks
from metaopt.hypergrad import ENGINES, EngineResult, register_engine
from metaopt.hypergrad.engines import unroll
from metaopt.learners import PRESETS, MetaLearner

TINY = {"inner_steps": 4, "window": 2, "tasks_per_step": 2, "batch_size": 16}


def _source():
    return tasks.get_suite("rotated-digits", model="mlp",
                           model_options={"widths": (8,)}).meta_train_tasks("75")  # fmt: skip


def test_every_learner_is_a_meta_learner_and_steps_through_it():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    apo = metaopt.APO(model, nn.functional.cross_entropy, adapt="lr", lambda_fsd=0.0,
                      data=iter([(torch.randn(5, 4), torch.randint(0, 3, (5,)))] * 40))  # fmt: skip
    offline = [cls(_source(), **TINY) for cls in (metaopt.MetaMD, metaopt.MetaSGD,
                                                   metaopt.MetaCurvature)]  # fmt: skip
    for learner in [apo, *offline]:
        assert isinstance(learner, MetaLearner), type(learner)
        record = learner.meta_step()
        assert isinstance(record, metaopt.MetaStep) and record.step == learner.meta_steps == 1
        assert learner.history[-1] is record
        assert all(isinstance(p, nn.Parameter) for p in learner.meta_parameters())
        assert isinstance(learner.learned_optimizer(), metaopt.LearnedOptimizer)
    assert [type(x).default_preset for x in offline] == ["kron-adamw", "metasgd", "metacurvature"]
    assert {"kron-adamw", "metamd-paper", "metasgd", "metacurvature"} <= set(PRESETS.available())
    # the protocol is structural: a plain torch optimizer must not pass for a meta-learner
    assert not isinstance(torch.optim.SGD(model.parameters(), lr=0.1), MetaLearner)


def test_a_user_engine_is_used_by_metamd_through_the_registry():
    calls = []

    def mine(problem, carry=None, *, scale=1.0):
        calls.append(problem.steps)
        r = unroll(problem, carry)
        return EngineResult(tuple(scale * g for g in r.grads), r.value, r.state)

    register_engine("test-mine", mine)
    try:
        base = metaopt.MetaMD(_source(), engine="unroll", **TINY)
        ours = metaopt.MetaMD(_source(), engine="test-mine", engine_options={"scale": 2.0}, **TINY)
        base.meta_step(), ours.meta_step()
        assert calls == [2, 2]  # one window of two steps per inner run
        # twice the hypergradient: Adam's first step is sign-like, so compare the norms
        assert ours.history[-1].hypergrad_norm == pytest.approx(2 * base.history[-1].hypergrad_norm)
        with pytest.raises(ValueError, match=r"engine_options: unknown option\(s\) \['scal'\]"):
            metaopt.MetaMD(_source(), engine="test-mine", engine_options={"scal": 2.0}, **TINY)
    finally:
        ENGINES.unregister("test-mine")


def test_a_user_engine_reaches_the_cli_through_import(tmp_path):
    module = tmp_path / "my_engine.py"
    module.write_text(
        textwrap.dedent("""
        from metaopt.hypergrad import register_engine
        from metaopt.hypergrad.engines import unroll

        def counted(problem, carry=None):
            counted.calls += 1
            return unroll(problem, carry)

        counted.calls = 0
        register_engine("counted-unroll", counted)
    """)
    )
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "meta_train", "--import", str(module), "--learner", "metamd",
           "--suite", "rotated-digits", "--holdout", "75", "--engine", "counted-unroll",
           "--outer-steps", "1", "--inner-steps", "4", "--option", "window=2",
           "--source-option", 'model="mlp"', "--source-option", "model_options={widths=[8]}",
           "--out", str(out), "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    meta = metaopt.read_metadata(out / "learned_optimizer.safetensors")
    assert meta["user"]["config"]["engine"] == "counted-unroll"
    bad = subprocess.run([*cmd[:-3], "--out", str(tmp_path / "b"), "--engine", "nope"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "engine='nope' is unknown" in bad.stderr
    assert not (tmp_path / "b").exists()


def test_the_file_rebuilds_the_exact_trained_optimizer(tmp_path):
    learner = metaopt.MetaMD(_source(), **TINY)
    for _ in range(3):
        learner.meta_step()
    learned = learner.learned_optimizer()
    path = tmp_path / "opt.safetensors"
    metaopt.save_learned_optimizer(learned, path)
    meta = metaopt.read_metadata(path)["optimizer"]
    assert meta == {
        "rule": "adamw",
        "hparams": {"betas": [0.9, 0.999], "eps": 1e-8, "eps_root": 0.0, "weight_decay": 0.01},
        "lr": 0.01,
        "compose": "gradient",
    }
    task = _source()[0]
    a, b = task.make_model(7), task.make_model(7)
    opt_a = learned.build(a.named_parameters())
    opt_b = metaopt.load_optimizer(path, b)
    assert isinstance(opt_b, torch.optim.Optimizer)
    stream = task.train_batches(3)
    for _ in range(5):
        x, y = next(stream)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            task.loss(model(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    tuned = metaopt.load_optimizer(path, b, lr=3e-3, weight_decay=1e-4)
    assert tuned.param_groups[0]["lr"] == 3e-3 and tuned.param_groups[0]["weight_decay"] == 1e-4
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        metaopt.load_optimizer(path, b, momentum=0.9)
    bare = tmp_path / "bare.safetensors"
    metaopt.save_preconditioner(learned.preconditioner, bare)
    with pytest.raises(ValueError, match="without an update rule"):
        metaopt.load_optimizer(bare, b)


def test_a_bad_objective_is_refused_when_apo_is_configured():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta_objective='bogus' is unknown"):
        metaopt.APO(model, nn.functional.cross_entropy, meta_objective="bogus")
    with pytest.raises(
        ValueError, match=r"objective_options: unknown option\(s\) \['lambda_fsdd'\]"
    ):
        metaopt.APO(model, nn.functional.cross_entropy, objective_options={"lambda_fsdd": 1.0})
