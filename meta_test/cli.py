"""``python -m meta_test``: compare optimizers on a task with the fair-tuning protocol.

Example::

    python -m meta_test --task rosenbrock --optimizers sgdm,adam,kfac --steps 500 \\
        --seeds 0,1,2 --hpo grid --out runs/rosenbrock
    python -m meta_test --import my_tasks.py --task mine --optimizers sgd --steps 100 --out r

Fixed hyperparameters per optimizer: ``SPEC?key=value&key=value`` (``sgdm?momentum=0.5``,
``apo-precond?warmup=100``, ``learned:run/learned_optimizer.safetensors?momentum=0.9``);
a fixed value is not searched. Selection (``meta_test.selection``): ``--select-on``
auto | loss | METRIC | train-loss | steps-to-target (with ``--target-loss``);
``--search-seeds 0,1,2 --search-aggregate median`` scores each configuration by the median
over several seeds; ``--search-steps N`` tunes on N-step runs while the reported runs
train ``--steps``. Ties go to the lower validation loss (selecting on the metric) or the
lower final training loss (steps-to-target), then to the first in grid order::

    python -m meta_test --task rosenbrock --optimizers "sgd,sgdm?momentum=0.5" --steps 2000 \\
        --search-steps 500 --select-on steps-to-target --target-loss 1e-6 \\
        --search-seeds 0,1,2 --out runs/rosenbrock-fast

Bad input (unknown task / suite / domain / optimizer, an out-of-range number, a device
that is not here, a non-empty ``--out`` without ``--overwrite``, an ``--out`` that cannot be
written, a ``learned:<path>`` file for another architecture, ...) exits with code 2 and one
line on stderr, before any training and before any file is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from metaopt.cli_support import (
    MAX_SEED,
    VALUE_SYNTAX,
    check_device,
    check_int,
    float_arg,
    import_modules,
    imports_in,
    int_arg,
    one_line,
    parse_options,
    typed_task_options,
)

__all__ = ["build_parser", "main"]


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _seed_list(text: str, name: str) -> list[int]:
    try:
        seeds = [int(s, 10) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise UsageError(f"{name}={text!r}: must be comma-separated integers") from None
    return [check_int(name, s, 0, MAX_SEED) for s in seeds]


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


def _spec_list(text: str) -> list[str]:
    """Comma-separated specs; a comma inside brackets or quotes belongs to a query value
    (``adam?betas=[0.9,0.99]``)."""
    specs, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            specs.append(text[start:i])
            start = i + 1
    specs.append(text[start:])
    return [s.strip() for s in specs if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m meta_test", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a registered task name (tasks.available())")
    src.add_argument("--suite", help="a registered suite name (with --domain)")
    p.add_argument("--domain", help="the suite's domain to train on")
    p.add_argument(
        "--optimizers",
        required=True,
        help="comma-separated specs, each once: sgdm,adam,kfac; "
        "SPEC?key=value&key=value fixes hyperparameters (sgdm?momentum=0.5)",
    )
    p.add_argument("--steps", type=int_arg(1), required=True,
                   help="training steps per run, 1 to 100000000")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--hpo", default="grid", help="none | grid | botorch | random (default grid)")
    p.add_argument("--out", required=True, help="output directory (must be empty or new)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out (never one that holds an input of this run, "
                   "a learned preconditioner or a meta_train run)")  # fmt: skip
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N, one that is here (default: the task's)")  # fmt: skip
    p.add_argument("--data-root", default=None, help="dataset folder for file-backed tasks")
    p.add_argument("--iterations", type=int_arg(1), default=25, help="botorch/random budget (25)")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help="override a hyperparameter's grid and box (repeatable)")  # fmt: skip
    p.add_argument("--log-every", type=int_arg(1), default=None,
                   help="curve resolution in steps, >= 1 (default steps // 100)")  # fmt: skip
    p.add_argument("--eval-every", type=int_arg(1), default=None,
                   help="test-curve resolution, >= 1 (default steps // 10)")  # fmt: skip
    p.add_argument("--target-loss", type=float_arg(), default=None, help="for steps-to-target")
    p.add_argument("--search-seed", type=int_arg(0, MAX_SEED), default=None,
                   help="seed of the search trials (default: the first seed)")  # fmt: skip
    p.add_argument("--select-on", default="auto",
                   help="auto | loss | the task's metric | train-loss | steps-to-target "
                   "(needs --target-loss)")  # fmt: skip
    p.add_argument("--search-seeds", default=None,
                   help="comma-separated seeds of every search trial, scored by "
                   "--search-aggregate over them (default: --search-seed)")  # fmt: skip
    p.add_argument("--search-aggregate", default="median",
                   help="median | mean over --search-seeds (default median)")  # fmt: skip
    p.add_argument("--search-steps", type=int_arg(1), default=None,
                   help="training steps of each search trial (default --steps)")  # fmt: skip
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra task/suite option, e.g. dtype=float64 (repeatable; "
                   f"{VALUE_SYNTAX})")  # fmt: skip
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE (a dotted name or a .py file) first, so the tasks, "
                   "suites or specs it registers can be named (repeatable)")  # fmt: skip
    p.add_argument("--allow-unequal-budget", action="store_true",
                   help="accept grids of different sizes (the report says so)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    return p


def _resolve_task(args: argparse.Namespace) -> Any:
    import tasks

    options = typed_task_options(parse_options(args.task_option, "--task-option"), "--task-option")
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
    from meta_test.specs import input_files

    args = build_parser().parse_args(argv)
    if args.device is not None:
        check_device(args.device, "--device")
    specs = _spec_list(args.optimizers)
    inputs = [] if args.data_root is None else [args.data_root]
    check_out_dir(args.out, args.overwrite, [*inputs, *(f for s in specs for f in input_files(s))])
    seeds = _seed_list(args.seeds, "--seeds")
    search_seeds = (
        None if args.search_seeds is None else _seed_list(args.search_seeds, "--search-seeds")
    )
    task = _resolve_task(args)
    results = run_comparison(
        task,
        specs,
        steps=args.steps,
        seeds=seeds,
        hpo=args.hpo,
        out=args.out,
        overwrite=args.overwrite,
        iterations=args.iterations,
        grids=_grid(args.grid),
        log_every=args.log_every,
        eval_every=args.eval_every,
        target_loss=args.target_loss,
        search_seed=args.search_seed,
        search_seeds=search_seeds,
        search_aggregate=args.search_aggregate,
        search_steps=args.search_steps,
        select_on=args.select_on,
        device=args.device,
        progress=not args.no_progress,
        allow_unequal_budget=args.allow_unequal_budget,
        inputs=inputs,
    )
    for spec, r in results["optimizers"].items():
        print(f"{spec}: hparams={r['hparams']} final_train_loss={r['final_train_loss']['mean']}")
    print(f"wrote {args.out}/results.json, report.md and plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 on bad input, with one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import_modules(imports_in(argv))
        return _run(argv)
    except ValueError as err:  # UsageError included: every bad input is a ValueError
        print(f"meta_test: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
