"""Checkpoints: exact round trip, refusal of damaged or foreign files, atomic replacement,
and resume after SIGKILL / SIGTERM giving the uninterrupted run's learned optimizer exactly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import meta_train_lsq  # noqa: F401  (registers learner "lsq-diag" and family "lsq-test")
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import meta_train
import meta_train.checkpoint as ckpt
import metaopt
from meta_train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from meta_train.cli import main
from meta_train.metrics import read_metrics
from tests._cli import assert_identical, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
MD = ["--learner", "metamd", "--family", "lsq-test", "--no-progress"]
# 10-step inner runs in 5-step windows: every checkpoint holds inner runs in flight
MD += ["--inner-steps", "10", "--inner-lr", "0.02", "--meta-lr", "0.05", "--option", "window=5"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --- format ---------------------------------------------------------------------------------
def test_round_trip_of_every_kind_of_state(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3, 2)
    opt.step()
    gen = torch.Generator().manual_seed(7)
    state = {
        "opt": opt.state_dict(),  # int keys, nested dicts, 0-dim tensors
        "gen": gen.get_state(),
        "python": random.getstate(),  # nested tuples
        "numpy": np.random.get_state(),  # ndarray inside a tuple
        "floats": [float("inf"), -0.0, 1e-300, float("nan")],
        "bf16": torch.arange(4, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 5),
        "view": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
        "shared": (p.data, p.data),  # two references to one storage
        "misc": {"s": "x", "b": True, "none": None, 3: "int key"},
    }
    save_checkpoint(state, tmp_path / "c.safetensors")
    back = load_checkpoint(tmp_path / "c.safetensors")
    opt2 = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3, 2))])
    opt2.load_state_dict(back["opt"])
    assert torch.equal(
        opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"], opt.state[p]["exp_avg"]
    )
    gen2 = torch.Generator()
    gen2.set_state(back["gen"])
    assert torch.equal(torch.rand(5, generator=gen2), torch.rand(5, generator=gen))
    random.setstate(back["python"])  # raises unless the exact tuple structure came back
    np.random.set_state(back["numpy"])
    assert (
        back["floats"][:3] == [float("inf"), -0.0, 1e-300]
        and back["floats"][3] != back["floats"][3]
    )
    assert str(back["floats"][1]) == "-0.0"
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], state["bf16"])
    assert back["empty"].shape == (0, 5)
    assert torch.equal(back["view"], state["view"])
    assert torch.equal(back["shared"][0], p.data) and isinstance(back["shared"], tuple)
    assert back["misc"] == {"s": "x", "b": True, "none": None, 3: "int key"}


def _good_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ck.safetensors"
    save_checkpoint({"w": torch.randn(64, 64), "step": 5, "note": "good"}, path)
    return path


@pytest.mark.parametrize("keep", [0, 7, 100, -1, -4096])
def test_truncated_checkpoint_is_refused(tmp_path: Path, keep: int) -> None:
    path = _good_checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
        load_checkpoint(path)


def test_flipped_bit_is_refused(tmp_path: Path) -> None:
    path = _good_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the tensor bytes: only the checksum can notice
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a meta_train checkpoint"):
        load_checkpoint(plain)
    pre = meta_train_lsq.DiagLSQ(meta_train_lsq.LSQFamily()).preconditioner
    import metaopt

    metaopt.save_preconditioner(pre, tmp_path / "pre.safetensors")
    with pytest.raises(CheckpointError, match="not a meta_train checkpoint"):
        load_checkpoint(tmp_path / "pre.safetensors")
    (tmp_path / "text").write_text("hello, not a checkpoint at all\n")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "text")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = _good_checkpoint(tmp_path)
    before = path.read_bytes()

    def crash_midway(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(50)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.ones(3), "step": 6}, path)

    def silently_short(tensors, filename, metadata=None):  # the write "succeeds" but is short
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) - 3)

    monkeypatch.setattr(ckpt, "save_file", silently_short)
    with pytest.raises(CheckpointError):
        save_checkpoint({"w": torch.ones(3), "step": 6}, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["note"] == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]  # no temp files left


# --- resume ---------------------------------------------------------------------------------
def _cli(out: Path, steps: int, *extra: str) -> list[str]:
    return [*MD, "--out", str(out), "--outer-steps", str(steps), *extra]


def test_sigkill_at_a_random_step_then_resume_is_identical(tmp_path: Path) -> None:
    """The victim runs in a subprocess; the resume and the uninterrupted run in-process."""
    steps, every = 60, 4
    script = str(ROOT / "tests" / "meta_train_lsq.py")
    # past the first checkpoint: a step's metrics line precedes its checkpoint, so at
    # `every` lines the first may not exist yet (that case has its own test below)
    kill_at = random.randint(every + 1, 45)
    victim = subprocess.Popen(
        [sys.executable, script, *_cli(tmp_path / "killed", steps, "--checkpoint-every", "4")],
        env=subprocess_env(),
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while len(read_metrics(metrics)) < kill_at:
        assert victim.poll() is None, f"run ended before step {kill_at}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done = len(read_metrics(metrics))
    assert done < steps, f"killed too late (step {done})"
    assert not (tmp_path / "killed" / "learned_optimizer.safetensors").exists()
    ck_step = load_checkpoint(tmp_path / "killed" / "checkpoint.safetensors")["step"]
    # the last boundary (the kill may land between a step's metrics line and its checkpoint)
    assert ck_step % every == 0 and done - every <= ck_step <= done, (ck_step, done)
    assert main([*_cli(tmp_path / "killed", steps, "--checkpoint-every", "4"), "--resume"]) == 0
    assert main(_cli(tmp_path / "full", steps, "--checkpoint-every", "4")) == 0
    assert_identical(
        tmp_path / "full" / "learned_optimizer.safetensors",
        tmp_path / "killed" / "learned_optimizer.safetensors",
    )
    a = read_metrics(tmp_path / "full" / "metrics.jsonl")
    b = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, steps + 1)), f"killed at {kill_at}"
    assert [r["meta_objective"] for r in a] == [r["meta_objective"] for r in b]


class _TermAt(meta_train_lsq.Wrapped):
    """Wraps a learner; sends the process SIGTERM during meta-step ``term_at``."""

    def __init__(self, inner, term_at: int) -> None:
        super().__init__(inner)
        self.term_at = term_at

    def meta_step(self, **kw):
        if self.inner.meta_steps + 1 == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.inner.meta_step(**kw)


def _build_term(config, source, device):
    import dataclasses

    from meta_train.learners import get_learner_spec

    opts = dict(config.options)
    term_at = int(opts.pop("term_at"))
    inner_name = opts.pop("inner")
    inner_cfg = dataclasses.replace(config, learner=inner_name, options=opts)
    return _TermAt(get_learner_spec(inner_name).builder()(inner_cfg, source, device), term_at)


meta_train.register_learner("term-at", _build_term)


# apo: 10 APO steps per outer step, 25 per domain, so the stop and the resume fall inside a
# domain visit and the run crosses several visits (fresh model, new batch streams)
APO_ARGS = ["--steps-per-domain", "25", "--option", 'fsd="mse"', "--option", "warmup=30"]


@pytest.mark.parametrize(
    ("learner", "extra"),
    [("lsq-diag", []), ("metamd", ["--option", "window=5"]), ("apo", APO_ARGS)],
)
def test_sigterm_checkpoints_the_finished_step_and_resume_is_identical(
    tmp_path, capsys, learner, extra
) -> None:
    steps = 13
    args = ["--checkpoint-every", "5", "--family", "lsq-test", "--no-progress"]
    args += ["--inner-steps", "10", "--inner-lr", "0.02", "--meta-lr", "0.05"]
    args += ["--outer-steps", str(steps), *extra]
    assert main(["--learner", learner, "--out", str(tmp_path / "full"), *args]) == 0
    stopped = ["--learner", "term-at", "--out", str(tmp_path / "t"), *args]
    stopped += ["--option", "term_at=7", "--option", f'inner="{learner}"']
    assert main(stopped) == 128 + signal.SIGTERM
    assert "continue with --resume" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "t" / "checkpoint.safetensors")["step"] == 7
    assert not (tmp_path / "t" / "learned_optimizer.safetensors").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert main([*stopped, "--resume"]) == 0
    assert_identical(
        tmp_path / "full" / "learned_optimizer.safetensors",
        tmp_path / "t" / "learned_optimizer.safetensors",
    )
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "t" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for key in ("meta_objective", "hypergrad_norm"):  # the whole trajectory, bit for bit
        assert [r[key] for r in full] == [r[key] for r in resumed]
    assert len({r["meta_objective"] for r in full}) > steps // 2  # it is actually training


def test_resume_refuses_a_truncated_checkpoint_and_touches_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(_cli(out, 6, "--checkpoint-every", "3")) == 0
    ck = out / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[:-10])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*_cli(out, 9), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meta_train: error:") and err.count("\n") == 1 and "truncated" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# --- layout ---------------------------------------------------------------------------------
def _through(state: dict, path: Path) -> dict:
    save_checkpoint(state, path)
    return load_checkpoint(path)


def _contiguous(tree):
    """``tree`` with every tensor made contiguous: what a layout-losing format restores."""
    if isinstance(tree, torch.Tensor):
        return tree.contiguous()
    if isinstance(tree, dict):
        return {k: _contiguous(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_contiguous(v) for v in tree)
    return tree


def test_permuted_layouts_come_back_with_their_strides(tmp_path: Path) -> None:
    state = {
        "t": torch.randn(5, 3).t(),  # stride (1, 3)
        "p": torch.randn(2, 3, 4).permute(2, 0, 1),
        "gaps": torch.randn(6, 4)[:, ::2],  # not dense: restored contiguous, same values
        "expanded": torch.randn(3, 1).expand(3, 4),  # overlapping: the same
        "plain": torch.randn(2, 2),
    }
    back = _through(state, tmp_path / "c.safetensors")
    for key in ("t", "p", "plain"):
        assert back[key].stride() == state[key].stride() and torch.equal(back[key], state[key])
    for key in ("gaps", "expanded"):
        assert back[key].is_contiguous() and torch.equal(back[key], state[key])


def test_non_finite_state_is_refused_and_the_previous_checkpoint_stays(tmp_path: Path) -> None:
    path = _good_checkpoint(tmp_path)
    before = path.read_bytes()
    state = {"learner": {"pre": {"u": torch.tensor([1.0, float("nan")])}}, "step": 12}
    with pytest.raises(
        ckpt.NonFiniteState, match="tensor 'learner.pre.u' is not finite at step 12"
    ):
        save_checkpoint(state, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.safetensors"]


def _kfac_run(name: str):
    """(make, train, params): a K-FAC-family optimizer from ``metaopt.optim`` on the resume
    test's conv net."""
    from test_optim_resume import _model, _train

    from metaopt.optim.registry import get_optimizer

    def make(seed: int):
        model = _model(seed)
        return model, get_optimizer(name, model)

    def train(pair, steps: range) -> None:
        _train(pair[0], pair[1], steps)

    return make, train, lambda pair: list(pair[0].parameters())


def _apo_run():
    """The same for APO adapting K-FAC's damping (``adapt="kfac-damping"``) on digits."""
    import torch.nn.functional as F
    from test_apo import _digits_like, _mlp

    from metaopt import APO

    x, y = _digits_like()

    def make(seed: int):
        model = _mlp(seed=seed)
        options = {"factor_update_freq": 2}
        apo = APO(model, F.cross_entropy, adapt="kfac-damping", lr=0.05, meta_interval=3,
                  kfac_options=options)  # fmt: skip
        return model, apo

    def train(pair, steps: range) -> None:
        for step in steps:
            g = torch.Generator().manual_seed(500 + step)
            i = torch.randint(0, len(x), (10,), generator=g)
            j = torch.randint(0, len(x), (10,), generator=g)
            pair[1].step((x[i], y[i]), (x[j], y[j]))

    return make, train, lambda pair: list(pair[0].parameters())


@pytest.mark.parametrize("which", ["kfac", "ekfac", "apo-kfac-damping"])
def test_resume_through_a_checkpoint_is_bit_identical_for_eigenvector_states(
    tmp_path: Path, which: str
) -> None:
    """K-FAC/EKFAC keep transposed eigenvector matrices; a checkpoint that stored them
    contiguous made the resumed run round differently (8.6e-7 for EKFAC)."""
    make, train, params = _apo_run() if which == "apo-kfac-damping" else _kfac_run(which)
    steps, split = 16, 5
    ref = make(0)
    train(ref, range(steps))
    first = make(0)
    train(first, range(split))
    state = {"model": first[0].state_dict(), "opt": first[1].state_dict()}
    path = tmp_path / "c.safetensors"
    save_checkpoint(state, path)
    assert any(
        isinstance(t, torch.Tensor) and not t.is_contiguous()
        for t in torch.utils._pytree.tree_leaves(state)
    ), "no permuted tensor in the state: the test would not exercise the layout"

    def resumed(transform) -> list[torch.Tensor]:
        back = transform(load_checkpoint(path))
        pair = make(1)  # another initialisation: everything must come from the checkpoint
        pair[0].load_state_dict(back["model"])
        pair[1].load_state_dict(back["opt"])
        train(pair, range(split, steps))
        return params(pair)

    exact = resumed(lambda s: s)
    assert all(torch.equal(a, b) for a, b in zip(params(ref), exact, strict=True))
    # control: the same state with its layout lost does not reproduce the run bit for bit
    lost = resumed(_contiguous)
    assert not all(torch.equal(a, b) for a, b in zip(params(ref), lost, strict=True))


# --- divergence ------------------------------------------------------------------------------
class _DivergeAt(_TermAt):
    """Wraps lsq-diag; from outer step ``at`` on, when the inner lr is above ``limit``, its
    preconditioner turns NaN (``how="poison"``, as a too-large learning rate would make it),
    or only its ``check_finite()`` reports the divergence (``how="report"``)."""

    def __init__(self, inner, at: int, limit: float, lr: float, how: str) -> None:
        super().__init__(inner, term_at=-1)
        self.at, self.diverging, self.how = at, lr > limit, how

    def meta_step(self, **kw):
        record = self.inner.meta_step(**kw)
        if self.diverging and self.meta_steps >= self.at and self.how == "poison":
            with torch.no_grad():
                self.meta_parameters()[0].view(-1)[0] = float("nan")
        return record

    def check_finite(self) -> None:
        if self.diverging and self.meta_steps >= self.at and self.how == "report":
            raise FloatingPointError(f"loss of inner step {self.meta_steps * 10} is inf")


def _build_diverging(config, source, device):
    import dataclasses

    opts = dict(config.options)
    at, limit, how = int(opts.pop("at")), float(opts.pop("limit")), opts.pop("how")
    inner_cfg = dataclasses.replace(config, learner="lsq-diag", options=opts)
    inner = meta_train_lsq.build(inner_cfg, source, device)
    return _DivergeAt(inner, at, limit, config.inner_lr, how)


meta_train.register_learner("diverge-at", _build_diverging)


@pytest.mark.parametrize("how", ["poison", "report"])
def test_a_diverging_run_keeps_its_last_good_checkpoint_and_resumes_with_a_lower_lr(
    tmp_path, capsys, how
) -> None:
    out = tmp_path / "run"
    args = ["--learner", "diverge-at", "--family", "lsq-test", "--no-progress", "--out", str(out)]
    args += ["--inner-steps", "5", "--meta-lr", "0.05", "--outer-steps", "8"]
    args += ["--checkpoint-every", "2", "--option", "at=5", "--option", "limit=0.05"]
    args += ["--option", f"how={how}"]
    assert main([*args, "--inner-lr", "0.08"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meta_train: error: outer step 6: ")
    if how == "poison":
        assert "tensor 'learner.preconditioner." in err and "is not finite" in err
    else:
        assert "the learner reports: loss of inner step 60 is inf" in err
    assert "the checkpoint of outer step 4 is kept" in err
    assert "--resume and a lower learning rate: --inner-lr (now 0.08) or --meta-lr" in err
    assert load_checkpoint(out / "checkpoint.safetensors")["step"] == 4
    assert not (out / "learned_optimizer.safetensors").exists()
    kept = [r["meta_objective"] for r in read_metrics(out / "metrics.jsonl")][:4]
    # the learning rates may change on --resume (said in --help); the run goes on from step 4
    assert main([*args, "--inner-lr", "0.02", "--resume"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["meta_objective"] for r in rows][:4] == kept
    meta = metaopt.read_metadata(out / "learned_optimizer.safetensors")
    assert meta["user"]["config"]["inner_lr"] == 0.02
    assert all(
        torch.isfinite(t).all() for t in _tensors(out / "learned_optimizer.safetensors").values()
    )


def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch(tmp_path, capsys) -> None:
    out, full = tmp_path / "killed", tmp_path / "full"
    args = [*MD, "--outer-steps", "4", "--checkpoint-every", "10"]
    assert main([*args, "--out", str(full)]) == 0
    # what a kill after step 1 leaves: config.json, one metrics line, a torn write's temp file
    out.mkdir()
    (out / "config.json").write_text((full / "config.json").read_text())
    (out / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    (out / ".checkpoint.safetensors.k1ll3d0x.tmp").write_bytes(b"\0" * 100)
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert_identical(full / "learned_optimizer.safetensors", out / "learned_optimizer.safetensors")
    ours, theirs = read_metrics(out / "metrics.jsonl"), read_metrics(full / "metrics.jsonl")
    assert [(r["step"], r["meta_objective"]) for r in ours] == [
        (r["step"], r["meta_objective"]) for r in theirs
    ]
    assert not list(out.glob(".*.tmp"))
    # a fresh run on such a folder starts too; one that holds anything else is refused
    (out / "checkpoint.safetensors").unlink()
    (out / "learned_optimizer.safetensors").unlink()
    (out / "meta_objective.png").unlink()
    assert main([*args, "--out", str(out)]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((full / "config.json").read_text())
    (other / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*args, "--out", str(other)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main([*args, "--out", str(other), "--resume"]) == 2
    assert "has no checkpoint.safetensors" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"name": "my project"}')
    assert main([*args, "--out", str(foreign)]) == 2  # not a meta_train config: left alone
    assert (foreign / "config.json").read_text() == '{"name": "my project"}'


def test_temp_files_of_killed_writes_are_removed_when_the_run_resumes(tmp_path) -> None:
    out = tmp_path / "run"
    assert main([*MD, "--out", str(out), "--outer-steps", "2", "--checkpoint-every", "1"]) == 0
    stale = [".checkpoint.safetensors.ab12cd34.tmp", ".metrics.jsonl.zz99yy88.tmp"]
    for name in stale:
        (out / name).write_bytes(b"partial")
    (out / ".mine.tmp").write_text("not ours")
    assert main([*MD, "--out", str(out), "--outer-steps", "3", "--resume"]) == 0
    assert sorted(p.name for p in out.glob(".*")) == [".mine.tmp"]


def test_resuming_a_finished_run_with_fewer_outer_steps_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main([*MD, "--out", str(out), "--outer-steps", "4", "--checkpoint-every", "2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*MD, "--out", str(out), "--outer-steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outer_steps=2" in err and "at outer step 4" in err
    assert "--outer-steps 4 or more" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (b'{"meta_objective": 1.0}\n', "line 3: has no integer 'step'"),
        (b'{"step": "3"}\n', "line 3: has no integer 'step'"),
        (b"[3]\n", "line 3: has no integer 'step'"),
        (b"not json\n", "line 3: is not JSON"),
        (b'{"step": 3, "x": "\xff\xfe"}\n', "is not UTF-8 text"),
    ],
)
def test_a_damaged_metrics_file_is_refused_on_resume(tmp_path, capsys, damage, needle) -> None:
    out = tmp_path / "run"
    assert main([*MD, "--out", str(out), "--outer-steps", "2", "--checkpoint-every", "1"]) == 0
    with open(out / "metrics.jsonl", "ab") as fh:
        fh.write(damage)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main([*MD, "--out", str(out), "--outer-steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "metrics.jsonl" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


class _CountLoads(meta_train_lsq.Wrapped):
    """Wraps a learner; records every ``load_state_dict`` call in ``loads``."""

    loads: list[int] = []

    def load_state_dict(self, state):
        self.loads.append(int(state["meta_steps"]))
        super().load_state_dict(state)


def test_a_resumed_run_loads_the_checkpoint_into_the_learner_once(tmp_path) -> None:
    """Loading re-draws MetaMD's inner runs in flight: a resume does it once, not twice."""
    build = meta_train_lsq.build
    _CountLoads.loads.clear()
    meta_train.register_learner("count-loads", lambda *a: _CountLoads(build(*a)))
    args = ["--learner", "count-loads", "--family", "lsq-test", "--no-progress"]
    args += ["--out", str(tmp_path / "run"), "--checkpoint-every", "2"]
    try:
        assert main([*args, "--outer-steps", "2"]) == 0
        assert main([*args, "--outer-steps", "4", "--resume"]) == 0
    finally:
        meta_train.learners.LEARNERS.unregister("count-loads")
    assert _CountLoads.loads == [2]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["step"] == 4
