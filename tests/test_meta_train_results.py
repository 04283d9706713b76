"""meta_train refuses to write a learned optimizer that nothing was learned into, or that
diverged to absurd values (exit 1, one line, no file)."""

import subprocess
import sys
from pathlib import Path

from tests._cli import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
LSQ = ["--family", "lsq-test", "--no-progress", "--outer-steps", "3", "--inner-steps", "4"]


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tests" / "meta_train_lsq.py"), *LSQ, *extra,
           "--out", str(tmp_path / "run")]  # fmt: skip
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_an_absurd_result_is_refused(tmp_path):
    # meta-SGD at meta-lr 1e30: the first update throws the log-scales to ~1e30 (finite)
    done = _run(tmp_path, "--learner", "metasgd", "--meta-lr", "1e30", "--meta-optimizer", "sgd")
    assert done.returncode == 1
    line = done.stderr.strip().splitlines()[-1]
    assert "beyond 1e+06: the meta-training diverged" in line and "--meta-lr (now 1e+30)" in line
    assert not (tmp_path / "run" / "learned_optimizer.safetensors").exists()


def test_a_run_whose_every_task_was_dropped_is_refused(tmp_path):
    # meta-SGD at an inner lr that overflows every inner run: no meta-update is ever applied
    done = _run(tmp_path, "--learner", "metasgd", "--inner-lr", "1e300")  # float64 tasks
    assert done.returncode == 1
    assert "no meta-step applied an update" in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "learned_optimizer.safetensors").exists()


def test_a_sound_run_writes_its_file(tmp_path):
    done = _run(tmp_path, "--learner", "metasgd")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "learned_optimizer.safetensors").exists()
