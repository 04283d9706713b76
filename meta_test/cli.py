"""``python -m meta_test``: compare optimizers on a task with the fair-tuning protocol.

Example::

    python -m meta_test --task rosenbrock --optimizers sgdm,adam,kfac --steps 500 \\
        --seeds 0,1,2 --hpo grid --out runs/rosenbrock

Bad input (unknown task / suite / domain / optimizer, non-positive steps, a non-empty
``--out`` without ``--overwrite``, a ``learned:<path>`` file for another architecture, ...)
exits with code 2 and one line on stderr, before any file is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _int_list(text: str, name: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise UsageError(f"{name}={text!r}: must be comma-separated integers") from None


def _grid(items: Sequence[str]) -> dict[str, list[float]]:
    grids: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        try:
            parsed = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            parsed = []
        if not sep or not name.strip() or not parsed:
            raise UsageError(f"--grid {item!r}: write NAME=v1,v2,... (e.g. lr=0.1,0.01)")
        grids[name.strip()] = parsed
    return grids


def _options(items: Sequence[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--task-option {item!r}: write KEY=VALUE (VALUE parsed as JSON)")
        try:
            opts[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key.strip()] = raw
    return opts


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m meta_test", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a registered task name (tasks.available())")
    src.add_argument("--suite", help="a registered suite name (with --domain)")
    p.add_argument("--domain", help="the suite's domain to train on")
    p.add_argument("--optimizers", required=True, help="comma-separated specs: sgdm,adam,kfac")
    p.add_argument("--steps", type=int, required=True, help="training steps per run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--hpo", default="grid", help="none | grid | botorch | random (default grid)")
    p.add_argument("--out", required=True, help="output directory (must be empty or new)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the task's)")
    p.add_argument("--data-root", default=None, help="dataset folder for file-backed tasks")
    p.add_argument("--iterations", type=int, default=25, help="botorch/random budget (25)")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help="override a hyperparameter's grid and box (repeatable)")  # fmt: skip
    p.add_argument("--log-every", type=int, default=None, help="curve resolution in steps")
    p.add_argument("--eval-every", type=int, default=None, help="test-curve resolution")
    p.add_argument("--target-loss", type=float, default=None, help="for steps-to-target")
    p.add_argument("--search-seed", type=int, default=None, help="seed of the search trials")
    p.add_argument("--select-on", default="auto", help="auto | loss | the task's metric")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra task/suite option, VALUE as JSON (repeatable)")  # fmt: skip
    p.add_argument("--allow-unequal-budget", action="store_true",
                   help="accept grids of different sizes (the report says so)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    return p


def _resolve_task(args: argparse.Namespace) -> Any:
    import tasks

    options = _options(args.task_option)
    if args.data_root is not None:
        options["data_root"] = args.data_root
    try:
        if args.task is not None:
            if args.domain is not None:
                raise UsageError("--domain: only with --suite")
            return tasks.get_task(args.task, **options)
        if args.domain is None:
            raise UsageError(f"--suite {args.suite!r} needs --domain")
        suite = tasks.get_suite(args.suite, **options)
        return suite.task(suite.check_domain(args.domain, "--domain"))
    except TypeError as err:
        raise UsageError(f"task options {sorted(options)}: {err}") from None


def _run(argv: Sequence[str] | None) -> int:
    from meta_test.comparison import run_comparison
    from meta_test.report import check_out_dir

    args = build_parser().parse_args(argv)
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be a positive integer")
    check_out_dir(args.out, args.overwrite)
    specs = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    task = _resolve_task(args)
    results = run_comparison(
        task,
        specs,
        steps=args.steps,
        seeds=_int_list(args.seeds, "--seeds"),
        hpo=args.hpo,
        out=args.out,
        overwrite=args.overwrite,
        iterations=args.iterations,
        grids=_grid(args.grid),
        log_every=args.log_every,
        eval_every=args.eval_every,
        target_loss=args.target_loss,
        search_seed=args.search_seed,
        select_on=args.select_on,
        device=args.device,
        progress=not args.no_progress,
        allow_unequal_budget=args.allow_unequal_budget,
    )
    for spec, r in results["optimizers"].items():
        print(f"{spec}: hparams={r['hparams']} final_train_loss={r['final_train_loss']['mean']}")
    print(f"wrote {args.out}/results.json, report.md and plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 on bad input, with one line on stderr)."""
    try:
        return _run(argv)
    except ValueError as err:  # UsageError included: every bad input is a ValueError
        message = " ".join(str(err).split())
        print(f"meta_test: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
