"""Faults at the command line: kills (inside checkpoint writes too), runs that diverge,
hostile learned-optimizer files, unwritable and overlapping output folders, a hung rank.

Every case checks the same two promises: no good checkpoint and no input file is ever lost,
and every failure is one line on stderr with a documented exit code (2 bad input, 1 a
diverged run or a failed rank). Slow cases are marked ``slow``.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import meta_train_lsq  # noqa: F401  (registers learner "lsq-diag" and family "lsq-test")
import pytest
import torch
from safetensors.torch import load_file

import metaopt
from meta_test.cli import main as meta_test_main
from meta_train.checkpoint import load_checkpoint
from meta_train.cli import main as train_main
from meta_train.metrics import read_metrics
from tests._cli import assert_identical, free_port, rewrite_safetensors, snapshot, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
LSQ = ["--learner", "lsq-diag", "--family", "lsq-test", "--no-progress"]
LSQ += ["--inner-steps", "10", "--inner-lr", "0.02", "--meta-lr", "0.05"]
DIGITS = ["--suite", "rotated-digits", "--holdout", "75", "--no-progress"]


def _one_line_error(err: str, tool: str) -> str:
    assert err.count("\n") == 1 and err.startswith(f"{tool}: error: "), err
    return err


# --- SIGKILL, inside checkpoint writes too ----------------------------------------------------
def _victim(out: Path, steps: int, pause: float) -> subprocess.Popen:
    script = str(ROOT / "tests" / "meta_train_lsq.py")
    argv = [sys.executable, script, *LSQ, "--out", str(out), "--outer-steps", str(steps)]
    argv += ["--checkpoint-every", "1", *(["--resume"] if (out / "config.json").exists() else [])]
    env = subprocess_env(META_TRAIN_LSQ_PAUSE_IN_CHECKPOINT_WRITE=str(pause))
    return subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)


def _kill(victim: subprocess.Popen, out: Path, *, in_write: bool, after_step: int) -> None:
    """SIGKILL ``victim`` inside a checkpoint write (its temporary file exists) or as soon as
    it has logged ``after_step`` steps."""
    deadline = time.monotonic() + 120
    while True:
        assert victim.poll() is None, "the run ended before the kill"
        assert time.monotonic() < deadline
        if in_write and (out / "checkpoint.safetensors").exists():
            if list(out.glob(".checkpoint.safetensors.*.tmp")):
                break
        elif not in_write and len(read_metrics(out / "metrics.jsonl")) >= after_step:
            break
        time.sleep(0.001)
    victim.send_signal(signal.SIGKILL)
    victim.wait()


def _check_after_kill(out: Path, last_step: int) -> int:
    """The checkpoint left is a good one, never older than the last one seen."""
    step = load_checkpoint(out / "checkpoint.safetensors")["step"]
    assert step >= last_step, f"a good checkpoint was lost: step {step} after {last_step}"
    assert not (out / "learned_optimizer.safetensors").exists()
    return step


def test_sigkill_inside_a_checkpoint_write_loses_nothing_and_resumes_identically(tmp_path):
    steps = 12
    out, full = tmp_path / "killed", tmp_path / "full"
    victim = _victim(out, steps, pause=0.5)
    _kill(victim, out, in_write=True, after_step=0)
    leftovers = list(out.glob(".checkpoint.safetensors.*.tmp"))
    assert leftovers, "the kill did not land inside a write"
    _check_after_kill(out, 1)
    assert train_main([*LSQ, "--out", str(out), "--outer-steps", str(steps), "--resume"]) == 0
    assert not any(p.exists() for p in leftovers)  # removed at the next start
    assert train_main([*LSQ, "--out", str(full), "--outer-steps", str(steps)]) == 0
    assert_identical(full / "learned_optimizer.safetensors", out / "learned_optimizer.safetensors")
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["meta_objective"] for r in a] == [r["meta_objective"] for r in b]


@pytest.mark.slow
def test_repeated_sigkills_at_random_points_resume_bit_identically(tmp_path):
    steps, seed = 60, random.randrange(10**6)
    rng = random.Random(seed)
    out, full = tmp_path / "killed", tmp_path / "full"
    last = 0
    for kill in range(6):
        in_write = kill % 2 == 0
        target = min(steps - 5, len(read_metrics(out / "metrics.jsonl")) + rng.randint(1, 8))
        victim = _victim(out, steps, pause=0.05 if in_write else 0.0)
        _kill(victim, out, in_write=in_write, after_step=target)
        last = _check_after_kill(out, last)
        assert len(read_metrics(out / "metrics.jsonl")) < steps, f"seed {seed}: killed too late"
    assert train_main([*LSQ, "--out", str(out), "--outer-steps", str(steps), "--resume"]) == 0
    assert not list(out.glob(".*.tmp"))
    assert train_main([*LSQ, "--out", str(full), "--outer-steps", str(steps)]) == 0
    assert_identical(full / "learned_optimizer.safetensors", out / "learned_optimizer.safetensors")
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), f"seed {seed}"


# --- runs that diverge ------------------------------------------------------------------------
def _diverge(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert train_main(argv) == 1
    return _one_line_error(capsys.readouterr().err, "meta_train")


def _finite_checkpoint_or_none(out: Path) -> int | None:
    path = out / "checkpoint.safetensors"
    if not path.exists():
        return None
    state = load_checkpoint(path)  # a checkpoint that exists is a good one: it loads ...
    leaves = torch.utils._pytree.tree_leaves(state)
    floats = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert all(torch.isfinite(t).all() for t in floats)  # ... and holds no NaN or inf
    return int(state["step"])


def test_apo_blowing_up_at_the_first_step_never_writes_a_nan_checkpoint(tmp_path, capsys):
    out = tmp_path / "apo"
    argv = ["--learner", "apo", *DIGITS, "--outer-steps", "8", "--steps-per-domain", "100"]
    argv += ["--checkpoint-every", "1", "--out", str(out)]
    err = _diverge(capsys, [*argv, "--inner-lr", "1e6"])
    assert "outer step 1:" in err and "is not finite" in err and "--inner-lr (now 1e+06)" in err
    assert "--resume starts from scratch" in err
    assert _finite_checkpoint_or_none(out) is None
    assert not (out / "learned_optimizer.safetensors").exists()
    assert train_main([*argv, "--inner-lr", "0.1", "--resume"]) == 0
    tensors = load_file(str(out / "learned_optimizer.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_apo_blowing_up_mid_run_resumes_from_the_last_good_checkpoint(tmp_path, capsys):
    """Two good outer steps, then ``--resume`` at an inner lr that blows up the next one: its
    checkpoint is refused (APO's ``check_finite()`` or its own raise), the one of step 2 and
    the earlier file stay, and a resume at a sane lr finishes the run."""
    out = tmp_path / "apo"
    argv = ["--learner", "apo", *DIGITS, "--outer-steps", "6", "--steps-per-domain", "100"]
    argv += ["--checkpoint-every", "1", "--out", str(out)]
    assert train_main([*argv, "--outer-steps", "2", "--inner-lr", "0.1"]) == 0
    earlier = (out / "learned_optimizer.safetensors").read_bytes()
    err = _diverge(capsys, [*argv, "--inner-lr", "1e6", "--resume"])
    assert _finite_checkpoint_or_none(out) == 2 and "the checkpoint of outer step 2 is kept" in err
    assert "outer step 3: " in err and "is not finite" in err and "--inner-lr (now 1e+06)" in err
    assert (out / "learned_optimizer.safetensors").read_bytes() == earlier
    assert train_main([*argv, "--inner-lr", "0.1", "--resume"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    tensors = load_file(str(out / "learned_optimizer.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    deployed = metaopt.read_metadata(out / "learned_optimizer.safetensors")["optimizer"]["lr"]
    assert deployed == pytest.approx(0.1 * 0.9)  # the resumed lr times APO's precond_scale


# MetaMD drops an inner run whose hypergradient or state turns non-finite, so its state only
# turns non-finite through the meta-update itself: Adam's first step moves each
# meta-parameter by about meta_lr, and at meta_lr = 1e308 that step overflows to infinity
MD = ["--learner", "metamd", *LSQ[2:], "--option", "window=5", "--checkpoint-every", "1"]


def _metamd_blowing_up_at_step_3(tmp_path: Path, capsys) -> tuple[Path, str, bytes]:
    """Two good meta-steps (checkpointed, and written as a file), then ``--resume`` with an
    absurd meta-lr: ``(out, the one-line error of outer step 3, the step-2 file)``."""
    out = tmp_path / "md"
    assert train_main([*MD, "--outer-steps", "2", "--out", str(out)]) == 0
    earlier = (out / "learned_optimizer.safetensors").read_bytes()
    err = _diverge(capsys, [*MD, "--outer-steps", "6", "--out", str(out), "--meta-lr", "1e308",
                            "--resume"])  # fmt: skip
    return out, err, earlier


def test_metamd_with_an_absurd_meta_lr_stops_before_its_checkpoint(tmp_path, capsys):
    out, err, earlier = _metamd_blowing_up_at_step_3(tmp_path, capsys)
    assert _finite_checkpoint_or_none(out) == 2
    assert "outer step 3: tensor 'learner.preconditioner." in err and "is not finite" in err
    assert "the checkpoint of outer step 2 is kept" in err and "--meta-lr (now 1e+308)" in err
    assert (out / "learned_optimizer.safetensors").read_bytes() == earlier  # not replaced


def test_metamd_resumes_its_last_good_checkpoint_with_a_lower_meta_lr(tmp_path, capsys):
    out, _, _ = _metamd_blowing_up_at_step_3(tmp_path, capsys)
    kept = [r["meta_objective"] for r in read_metrics(out / "metrics.jsonl")][:2]
    # a resume that kept the saved meta-optimizer's lr (1e308) would blow up again
    assert train_main([*MD, "--outer-steps", "6", "--out", str(out), "--meta-lr", "0.05",
                       "--resume"]) == 0  # fmt: skip
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["meta_objective"] for r in rows][:2] == kept
    tensors = load_file(str(out / "learned_optimizer.safetensors"))
    assert all(torch.isfinite(t).all() and t.abs().max() < 10 for t in tensors.values())
    config = metaopt.read_metadata(out / "learned_optimizer.safetensors")["user"]["config"]
    assert config["meta_lr"] == 0.05


def test_metamd_whose_meta_parameters_leave_the_bound_writes_no_result(tmp_path, capsys):
    """At meta_lr = 1e7 the first meta-step moves the factors to about 1e7 and every later
    run is dropped: the states stay finite, but the result is refused (beyond 1e6)."""
    out = tmp_path / "md"
    err = _diverge(capsys, [*MD, "--outer-steps", "4", "--out", str(out), "--meta-lr", "1e7"])
    assert "outer step 4: preconditioner tensor 'blocks." in err
    assert "beyond 1e+06: the meta-training diverged" in err and "--meta-lr (now 1e+07)" in err
    assert not (out / "learned_optimizer.safetensors").exists()


def test_a_bad_learner_option_is_refused_before_anything_is_written(tmp_path, capsys):
    """MetaMDConfig checks the objective, the engine and their options at construction, so a
    bad one is a one-line error before the folder is made (not a traceback in step 1)."""
    out = tmp_path / "md"
    argv = ["--learner", "metamd", *LSQ[2:], "--outer-steps", "2", "--out", str(out)]
    for option, needle in [
        ("meta_objective=bogus", "meta_objective='bogus' is unknown"),
        ("objective_options={bogus = 1}", "objective_options: unknown option(s) ['bogus']"),
        ("engine_options={iterations = 5}", "engine_options: unknown option(s) ['iterations']"),
    ]:
        capsys.readouterr()
        assert train_main([*argv, "--option", option]) == 2
        assert needle in _one_line_error(capsys.readouterr().err, "meta_train")
        assert not out.exists()
    capsys.readouterr()
    assert train_main([*argv, "--engine", "neumann", "--option", "window=10", "--option",
                       "engine_options={iterations = -5}"]) == 2  # fmt: skip
    err = _one_line_error(capsys.readouterr().err, "meta_train")
    assert "engine_options['iterations']=-5: must be an integer >= 1" in err
    assert not out.exists()
    assert train_main(argv) == 0  # the same folder then starts, with the option fixed


# --- hostile learned-optimizer files -----------------------------------------------------------
TASK = ["--suite", "rotated-digits", "--domain", "75", "--steps", "3", "--seeds", "0"]
TASK += ["--hpo", "none", "--no-progress"]


def _good_file(path: Path) -> Path:
    """A learned optimizer for the held-out task's model: rank-1 preconditioner on SGD."""
    import tasks

    model = tasks.get_suite("rotated-digits").task("75").make_model(0)
    pre = metaopt.KroneckerPreconditioner.for_model(model, "rank1")
    metaopt.save_learned_optimizer(metaopt.LearnedOptimizer(pre, "sgd", {}, 0.1), path)
    return path


def _nan(data):
    key = sorted(data)[0]
    data[key].view(-1)[0] = float("nan")


def _wrong_shape(data):
    key = sorted(data)[0]
    data[key] = torch.zeros(data[key].shape[0] + 1, *data[key].shape[1:])


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("pickle", "is not a safetensors file"),
        ("torch-save", "is not a safetensors file"),
        ("truncated", "safetensors"),
        ("nan", "holds NaN or infinity"),
        ("wrong-shape", "but the file's metadata (family, options, layers) gives"),
        ("no-layers", "metadata field 'layers' is missing"),
        ("bad-skip", "metadata skip='[' is not a valid regex"),
        ("other-model", "does not fit this model"),
    ],
)
def test_hostile_preconditioner_files_are_one_line_errors(tmp_path, capsys, kind, needle):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "inputs" / "pre.safetensors"
    path.parent.mkdir()
    if kind == "pickle":
        path.write_bytes(pickle.dumps(Payload()))
    elif kind == "torch-save":
        torch.save({"x": Payload()}, path)
    else:
        _good_file(path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    edits = {
        "nan": {"tensors": _nan},
        "wrong-shape": {"tensors": _wrong_shape},
        "no-layers": {"meta": lambda m: m.pop("layers")},
        "bad-skip": {"meta": lambda m: m.update(skip="[")},
        "other-model": {"meta": lambda m: m["layers"].update(extra=[3, 3])},
    }
    if kind in edits:
        rewrite_safetensors(path, **edits[kind])
    before = snapshot(tmp_path)
    capsys.readouterr()
    argv = [*TASK, "--optimizers", f"sgd,learned:{path}", "--out", str(tmp_path / "o")]
    assert meta_test_main(argv) == 2
    assert needle in _one_line_error(capsys.readouterr().err, "meta_test")
    assert not marker.exists() and snapshot(tmp_path) == before


# --- output folders -------------------------------------------------------------------------
def test_meta_test_overwrite_refuses_the_folder_of_its_own_meta_train_input(tmp_path, capsys):
    run = tmp_path / "D"
    train = ["--learner", "metamd", *DIGITS, "--outer-steps", "1", "--tasks-per-step", "1"]
    assert train_main([*train, "--inner-steps", "2", "--out", str(run)]) == 0
    before = snapshot(run)
    argv = [*TASK, "--optimizers", f"sgd,learned:{run / 'learned_optimizer.safetensors'}"]
    capsys.readouterr()
    assert meta_test_main([*argv, "--out", str(run), "--overwrite"]) == 2
    err = _one_line_error(capsys.readouterr().err, "meta_test")
    assert "an input of this run" in err and "choose another --out" in err
    assert snapshot(run) == before
    # a folder that holds a meta_train run in a subfolder is refused as well
    assert meta_test_main([*argv, "--out", str(tmp_path), "--overwrite"]) == 2
    assert "D/" in capsys.readouterr().err and snapshot(run) == before
    # elsewhere it deploys the learned file and leaves the run as it was
    assert meta_test_main([*argv, "--out", str(tmp_path / "elsewhere")]) == 0
    assert snapshot(run) == before


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_replaces_only_an_earlier_demo(tmp_path):
    """``make demo`` (two CLI commands) clears only its own two output folders before it
    runs, so a file of the user's in ``DEMO`` survives it; run its clearing command on a
    folder holding an earlier demo and such a file."""
    out = tmp_path / "demo"
    for name in ("meta_train", "meta_test"):
        (out / name).mkdir(parents=True)
        (out / name / "old.json").write_text("{}")
    (out / "thesis.tex").write_text("precious")
    plan = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", f"DEMO={out}"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    clearing = [line for line in plan.splitlines() if line.startswith("rm ")]
    assert len(clearing) == 1 and str(out) in clearing[0]
    subprocess.run(clearing[0], shell=True, check=True, cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "precious"
    # and the commands write only there: meta_train into the folder it just cleared
    assert f"--out {out}/meta_train" in plan and f"--out {out}/meta_test" in plan


def test_unwritable_outputs_are_one_line_errors_before_any_work(unwritable_out, capsys):
    locked = unwritable_out
    capsys.readouterr()
    assert train_main([*LSQ, "--out", str(locked)]) == 2
    assert "cannot write in" in _one_line_error(capsys.readouterr().err, "meta_train")
    assert meta_test_main([*TASK, "--optimizers", "sgd", "--out", str(locked)]) == 2
    assert "cannot write in" in _one_line_error(capsys.readouterr().err, "meta_test")


def test_a_family_whose_sample_is_not_a_task_is_named() -> None:
    import tasks

    class Broken(tasks.TaskFamily):
        name = "broken"

        def sample(self, generator):
            return {"not": "a task"}

    with pytest.raises(TypeError, match=r"family 'broken' \(Broken\): sample\(\) returned a dict"):
        Broken().sample(torch.Generator())


# --- a hung rank ------------------------------------------------------------------------------
def _rank_pid(parent: int, rank: int) -> int:
    kids = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True)
    for pid in kids.stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no rank {rank} among {kids.stdout.split()}")


@pytest.mark.slow
def test_a_stopped_rank_fails_the_job_within_the_dist_timeout(tmp_path):
    timeout = 5
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}",
            str(ROOT / "tests" / "meta_train_lsq.py"), "--learner", "metamd",
            *LSQ[2:], "--outer-steps", "100000", "--checkpoint-every", "2",
            "--dist-timeout", str(timeout), "--out", str(out)]  # fmt: skip
    job = subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    victim = None
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(out / "metrics.jsonl")) < 3:
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        victim = _rank_pid(job.pid, 1)
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = job.communicate(timeout=timeout + 90)
        elapsed = time.monotonic() - stopped
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert job.returncode != 0
    line = next(x for x in err.splitlines() if x.startswith("meta_train: error: rank 0"))
    assert f"failed (waited up to {timeout} s)" in line and "--dist-timeout" in line
    assert "[rank0]: Traceback" not in err
    # rank 0 gives up after the timeout; torchrun then waits its fixed 30 s grace before it
    # SIGKILLs the stopped rank (a stopped process cannot act on SIGTERM)
    assert elapsed < timeout + 30 + 20, elapsed
    assert load_checkpoint(out / "checkpoint.safetensors")["step"] >= 2
