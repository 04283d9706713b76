"""Per-step cost of the Task API on the in-memory tasks (synthetic, digits, tabular).

For each task: the time to draw one training batch from ``task.train_batches`` and the time
of one full SGD step through the generic loop (``next(stream)``, ``task.loss(model(x), y)``,
``backward``, ``step``), median of ``--repeats`` timed blocks of ``--steps`` steps. Prints
one JSON object as its last line.

    python bench/tasks_synthetic.py [--steps 500] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tasks


def _median_us(fn, steps: int, repeats: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - start) / steps)
    return round(statistics.median(times) * 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    built = {
        "rosenbrock": tasks.get_task("rosenbrock"),
        "ill-conditioned-regression": tasks.get_task("ill-conditioned-regression"),
        "meta-quadratics": tasks.get_family("meta-quadratics").sample(g),
        "linear-regression-family": tasks.get_family("linear-regression-family").sample(g),
        "digits": tasks.get_task("digits"),
        "rotated-digits/45": tasks.get_suite("rotated-digits").task("45"),
        "diabetes": tasks.get_task("diabetes"),
    }
    out: dict[str, object] = {"threads": args.threads, "steps": args.steps}
    for name, task in built.items():
        stream = task.train_batches(0)
        model = task.make_model(0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        batch_us = _median_us(lambda s=stream: next(s), args.steps, args.repeats)

        def step(s=stream, m=model, o=opt, t=task) -> None:
            x, y = next(s)
            o.zero_grad(set_to_none=True)
            t.loss(m(x), y).backward()
            o.step()

        out[f"{name}_batch_us"] = batch_us
        out[f"{name}_sgd_step_us"] = _median_us(step, args.steps, args.repeats)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
