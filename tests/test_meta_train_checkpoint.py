"""Checkpoints: exact round trip, refusal of damaged or foreign files, atomic replacement,
and resume after SIGKILL / SIGTERM giving the uninterrupted run's preconditioner exactly."""

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
from meta_train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from meta_train.cli import main
from meta_train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
MD = ["--learner", "metamd", "--family", "lsq-test", "--no-progress"]
MD += ["--inner-steps", "10", "--inner-lr", "0.02", "--meta-lr", "0.05"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


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
    kill_at = random.randint(3, 45)
    victim = subprocess.Popen(
        [sys.executable, script, *_cli(tmp_path / "killed", steps, "--checkpoint-every", "4")],
        env=_env(),
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
    _assert_identical(
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
    ("learner", "extra"), [("lsq-diag", []), ("metamd", []), ("apo", APO_ARGS)]
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
    _assert_identical(
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
