"""torchrun with 2 gloo ranks on 127.0.0.1 gives the 1-process result (MetaMD, to 1e-6).

The meta-optimizer is SGD here: Adam's first steps are ``g / |g|`` elementwise, which turns
float32 rounding differences of near-zero hypergradient entries (the order of the sum
differs between 1 and 2 ranks) into full-size steps, a property of Adam, not of the
reduction being tested.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import meta_train_lsq  # noqa: F401  (registers family "lsq-test")
import torch
from safetensors.torch import load_file

from meta_train.cli import main
from meta_train.metrics import read_metrics
from tests._cli import free_port, subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    steps = 5
    args = ["--learner", "metamd", "--family", "lsq-test", "--tasks-per-step", "4"]
    # 8-step inner runs in 4-step windows: each rank carries its runs from one step to the next
    args += ["--inner-steps", "8", "--option", "window=4", "--inner-lr", "0.02", "--meta-lr", "0.5"]
    args += ["--meta-optimizer", "sgd"]
    args += ["--outer-steps", str(steps), "--checkpoint-every", "2", "--no-progress"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(ROOT / "tests" / "meta_train_lsq.py"),
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = load_file(str(tmp_path / "one" / "learned_optimizer.safetensors"))
    two = load_file(str(tmp_path / "two" / "learned_optimizer.safetensors"))
    assert one.keys() == two.keys()
    moved = 0.0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6)
        moved = max(moved, float((one[k] - one[k].mean()).abs().max()))
    assert moved > 1e-4  # training moved the factors: equality is not trivially at init
    a = read_metrics(tmp_path / "one" / "metrics.jsonl")
    b = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, steps + 1))  # rank 0 alone wrote lines
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["meta_objective"] - rb["meta_objective"]) <= 1e-6 * abs(ra["meta_objective"])
        assert ra["skipped"] == rb["skipped"] == 0


HUNG_AT_GATHER = """
import sys, time
from meta_train.distributed import CollectiveFailed, setup

d = setup("cpu", timeout_s=2)
d.barrier()
if d.rank == 1:  # hangs where rank 0 gathers the checkpoint's states
    time.sleep(20)
    sys.exit(0)
try:
    d.gather_objects({"rank": d.rank})
except CollectiveFailed as err:
    print(f"CollectiveFailed: {err}", flush=True)
    sys.exit(3)
"""


def test_a_rank_hung_at_the_checkpoint_gather_is_a_collective_failure(tmp_path: Path) -> None:
    """The gather of the ranks' states (every checkpoint) waits ``timeout_s`` like every other
    collective and then raises ``CollectiveFailed`` (the CLI's one-line exit 1), not torch's
    error with a traceback."""
    script = tmp_path / "hung.py"
    script.write_text(HUNG_AT_GATHER)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script)]  # fmt: skip
    proc = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CollectiveFailed")), None)
    assert line is not None, proc.stderr[-3000:]
    assert "rank 0: gather_object failed (waited up to 2 s)" in line
