"""``make demo`` / ``python -m meta_train.demo``: the whole product on real data, offline.

1. Meta-trains MetaMD on ``rotated-digits`` (the 1,797 real sklearn digits, rotated by 0, 15,
   30, 45 and 60 degrees) holding out the 75-degree domain, with ``python -m meta_train``
   -> ``OUT/meta_train/`` (preconditioner, metrics, checkpoint, plot, config).
2. Meta-tests the learned preconditioner (``learned:<path>``) on the held-out 75-degree
   domain against SGD, SGD-momentum, Adam and APO-Precond, every one tuned by a grid search
   of the same size (``GRIDS``) on validation accuracy and re-run on the same seeds, with the
   evaluation harness
   (``meta_test.run_comparison``) -> ``OUT/meta_test/`` (results.json, report.md, plots).
3. Prints the results table.

Sized to finish in under 15 minutes on 2 CPU cores; ``--quick`` is a smoke-sized run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

#: the meta-training run of the demo (flags of ``python -m meta_train``)
META_TRAIN = {
    "outer-steps": 40,
    "tasks-per-step": 4,
    "inner-steps": 50,
    "inner-lr": 0.1,
    "meta-lr": 0.01,
    "checkpoint-every": 10,
}
QUICK = {"outer-steps": 2, "inner-steps": 5}
COMPETITORS = ("sgd", "sgdm", "adam", "apo-precond")
#: one lr x weight-decay grid for sgd, sgdm, adam and the learned preconditioner, spanning
#: the MetaMD appendix A.7 grids of SGD (0.1 .. 0.001) and Adam (0.3 .. 0.001); 4 x 2 = 8
#: points, the size of APO-Precond's own lambda_fsd x lambda_wsd grid (the harness gives
#: every optimizer the same budget)
GRIDS = {"lr": (0.3, 0.1, 0.01, 0.001), "weight_decay": (0.0005, 0.0001)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meta_train.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--holdout", default="75", help="held-out rotation domain (default: 75)")
    p.add_argument("--steps", type=int, default=300, help="meta-test steps per run (default: 300)")
    p.add_argument("--seeds", default="0,1,2", help="meta-test seeds (default: 0,1,2)")
    p.add_argument("--hpo", default="grid", help="meta-test search: none|grid (default: grid)")
    p.add_argument("--quick", action="store_true", help="smoke-sized run (seconds, not minutes)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def _check_out(out: Path, overwrite: bool) -> None:
    """``--out`` must be writable and empty; ``--overwrite`` replaces only an earlier demo's
    output (``meta_train/`` and ``meta_test/``), never a folder holding anything else."""
    from metaopt.cli_support import check_output_dir

    check_output_dir(out)
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"out={str(out)!r} is not empty; pass --overwrite")
    other = sorted(p.name for p in out.iterdir() if p.name not in ("meta_train", "meta_test"))
    if other:
        raise ValueError(
            f"out={str(out)!r} holds {other}, which are not a demo's outputs; --overwrite "
            "would delete them: choose another --out"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    try:
        _check_out(out, args.overwrite)
    except ValueError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    if out.exists() and args.overwrite:
        import shutil

        shutil.rmtree(out)

    import meta_test
    import tasks
    from meta_test.report import render_markdown
    from meta_train.cli import main as meta_train_main

    start = time.perf_counter()
    settings = {**META_TRAIN, **(QUICK if args.quick else {})}
    flags = [f"--{k}={v}" for k, v in settings.items()]
    train_dir = out / "meta_train"
    rc = meta_train_main(
        ["--learner", "metamd", "--suite", "rotated-digits", "--holdout", args.holdout,
         "--out", str(train_dir), *flags]
    )  # fmt: skip
    if rc != 0:
        return rc
    trained = time.perf_counter() - start
    task = tasks.get_suite("rotated-digits").meta_test_task(args.holdout)
    learned = f"learned:{train_dir / 'preconditioner.safetensors'}"
    steps = 20 if args.quick else args.steps
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    results = meta_test.run_comparison(
        task,
        [*COMPETITORS, learned],
        steps=steps,
        seeds=seeds,
        hpo="none" if args.quick else args.hpo,
        grids=GRIDS,
        out=out / "meta_test",
        progress=True,
    )
    print(render_markdown(results))
    total = time.perf_counter() - start
    print(
        f"demo: meta-training {trained:.0f} s, meta-testing {total - trained:.0f} s, "
        f"total {total:.0f} s; outputs under {out}/",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
