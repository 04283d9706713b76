"""Outer steps per second of ``python -m meta_train`` at 1 and 2 torch.distributed ranks.

MetaMD on ``rotated-digits`` (holdout 75) with k tasks per outer step split across the
ranks (gloo on CPU, one thread per rank). Each run is launched with ``torchrun``; the rate
is 1 / median of the per-step wall time logged in ``metrics.jsonl`` after the first step
(startup and process-group setup excluded). 1- and 2-rank runs are interleaved and repeated;
the medians are reported. Prints one JSON object as its last line.

    python bench/meta_train_scaling.py [--repeats 3] [--outer-steps 8] [--tasks-per-step 4]
        [--inner-steps 50]  (T = 50 is the demo's inner horizon; with T = 20 the fixed
        per-outer-step work (task set-up, all-reduce, meta-optimizer step) weighs more)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(ranks: int, args: argparse.Namespace, out: Path) -> float:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
        f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1", f"--master_port={_port()}",
        "-m", "meta_train", "--learner", "metamd", "--suite", "rotated-digits",
        "--holdout", "75", "--out", str(out), "--outer-steps", str(args.outer_steps),
        "--tasks-per-step", str(args.tasks_per_step), "--inner-steps", str(args.inner_steps),
        "--checkpoint-every", str(args.outer_steps), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return 1.0 / statistics.median(r["wall_seconds"] for r in rows[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--outer-steps", type=int, default=8)
    p.add_argument("--tasks-per-step", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=50)
    args = p.parse_args()
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for ranks in (1, 2) if r % 2 == 0 else (2, 1):  # interleave against drift
                rates[ranks].append(one_run(ranks, args, Path(tmp) / f"{ranks}-{r}"))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    print(
        json.dumps(
            {
                "bench": "meta_train_scaling",
                "workload": f"metamd rotated-digits/holdout 75, k={args.tasks_per_step}, "
                f"T={args.inner_steps}",
                "outer_steps_per_s_1_rank": round(one, 4),
                "outer_steps_per_s_2_ranks": round(two, 4),
                "speedup": round(two / one, 3),
                "target_speedup": 1.6,
                "runs_1_rank": [round(x, 4) for x in rates[1]],
                "runs_2_ranks": [round(x, 4) for x in rates[2]],
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
