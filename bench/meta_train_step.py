"""Cost of an offline learner's meta-step relative to the bare hypergradient engine.

For each learner (the default ``kron-adamw`` recipe, ``metasgd``) on rotated digits, one
meta-step (``learner.meta_step()``: ``k`` inner-run windows, each an engine call, plus
drawing batches, averaging and the meta-optimizer step) is timed against ``k`` calls of
the same engine on the same kind of window built beforehand (``MetaMD.window_problem``,
outside the timer). Rounds are interleaved and the median of the per-round ratios is reported; the
target is at most 1.1. Prints one JSON object as its last line.

    python bench/meta_train_step.py [--rounds 15] [--threads 1] [--window 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tasks
from metaopt.learners import MetaMD
from metaopt.learners.metamd.window import InnerRun


def bench(preset: str, rounds: int, window: int) -> dict:
    suite = tasks.get_suite("rotated-digits")
    learner = MetaMD(suite.meta_train_tasks("75"), preset=preset, window=window,
                     inner_steps=10 * window)  # fmt: skip
    c = learner.config
    task = suite.task("0")

    def bare() -> float:
        runs = [InnerRun.start(task, 1 + i, 2 + i, 0, learner.rule, learner.rule_hparams,
                               c.batch_size) for i in range(c.tasks_per_step)]  # fmt: skip
        calls = [learner.window_problem(r, c.steps_per_window, i) for i, r in enumerate(runs)]
        t0 = time.perf_counter()
        for problem, options in calls:
            learner.engine.obj(problem, None, **options)
        return time.perf_counter() - t0

    def step() -> float:
        t0 = time.perf_counter()
        learner.meta_step()
        return time.perf_counter() - t0

    for _ in range(3):  # warm-up (first draws, caches)
        step()
        bare()
    steps, engines = [], []
    for _ in range(rounds):
        steps.append(step())
        engines.append(bare())
    ratios = [s / e for s, e in zip(steps, engines, strict=True)]
    return {
        "meta_step_ms": 1e3 * statistics.median(steps),
        "bare_engine_ms": 1e3 * statistics.median(engines),
        "ratio": statistics.median(ratios),
        "engine": c.engine,
        "tasks_per_step": c.tasks_per_step,
        "window": c.steps_per_window,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--window", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "bench": "meta_train_step",
        "threads": args.threads,
        "kron_adamw": bench("kron-adamw", args.rounds, args.window),
        "metasgd": bench("metasgd", args.rounds, args.window),
        "target_ratio": 1.1,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
