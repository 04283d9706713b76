"""``python -m meta_train``: meta-train a preconditioner on a task suite or family.

Examples::

    python -m meta_train --learner metamd --suite rotated-digits --holdout 75 --out runs/md
    python -m meta_train --learner metamd --preset metamd-paper --suite rotated-digits \
        --holdout 75 --out runs/paper
    python -m meta_train --config md.toml --out runs/md --resume
    python -m meta_train --import mypkg.tasks --learner metamd --family mine --out runs/mine
    torchrun --nproc_per_node=2 -m meta_train --learner metamd --family meta-quadratics --out r

Options come from the defaults, then ``--config FILE.toml``, then the flags (flags win); the
effective configuration is written to ``OUT/config.json``. Bad input exits with code 2 and
one line on stderr, before any file is written. A run whose learner state turns non-finite
stops with exit code 1 before it would write a checkpoint or the artefact: the last good
checkpoint stays, and ``--resume`` with a lower ``--inner-lr`` / ``--meta-lr`` continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import meta_train.builtin  # noqa: F401  (registers the built-in learners)
from meta_train.checkpoint import CheckpointError, NonFiniteState, load_checkpoint
from meta_train.config import FIELDS, IDENTITY_EXEMPT, TrainConfig, load_toml, merge
from meta_train.distributed import CollectiveFailed, setup
from meta_train.learners import available_learners, get_learner_spec
from meta_train.metrics import read_metrics
from meta_train.runner import (
    CHECKPOINT,
    LEARNED,
    METRICS,
    PLOT,
    Stopped,
    check_resumable,
    run,
)
from metaopt.cli_support import (
    VALUE_SYNTAX,
    check_output_dir,
    import_modules,
    imports_in,
    one_line,
    parse_options,
    typed_task_options,
)
from metaopt.io import atomic_write, stale_temp_files

__all__ = ["build_parser", "main", "prepare"]


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(message)


#: the flags a --resume may change (the rest must match the checkpointed run)
_RESUME_MAY_CHANGE = [
    "--" + n.replace("_", "-") for n in IDENTITY_EXEMPT - {"out", "resume", "progress"}
]
#: what a run writes in --out
_OUTPUTS = ["config.json", METRICS, CHECKPOINT, LEARNED, PLOT]


def _default(name: str) -> str:
    f = FIELDS[name]
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None and name in _LEARNER_SETTINGS:
        return "the learner's own"
    return "none, required" if value == "" else repr(value)


#: settings whose default is the learner's (its preset's) own value
_LEARNER_SETTINGS = {"outer_steps", "tasks_per_step", "inner_steps", "inner_lr", "meta_lr",
                     "meta_optimizer", "engine", "rank", "preset"}  # fmt: skip

# (flag, field, type, help) for every plain option; --help shows each default
_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--suite", "suite", str, "task suite to meta-train on, e.g. rotated-digits"),
    ("--family", "family", str, "task family to sample tasks from, e.g. meta-quadratics"),
    ("--holdout", "holdout", str, "suite domain left out of meta-training (for meta-testing)"),
    ("--out", "out", str, "output directory (must be empty or absent unless --resume)"),
    ("--seed", "seed", int, "seed of task draws, initialisations and batch order"),
    ("--device", "device", str, "cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK)"),
    ("--data-root", "data_root", str, "dataset folder for file-backed tasks"),
    ("--preset", "preset", str, "recipe of a MetaMD learner: kron-adamw, metamd-paper, ..."),
    ("--outer-steps", "outer_steps", int, "meta-steps (meta-updates) in total"),
    ("--tasks-per-step", "tasks_per_step", int, "inner runs per meta-step (k), split over ranks"),
    ("--inner-steps", "inner_steps", int, "inner training steps per task (T)"),
    ("--inner-lr", "inner_lr", float, "inner learning rate (eta)"),
    ("--meta-lr", "meta_lr", float, "meta learning rate"),
    ("--meta-optimizer", "meta_optimizer", str, "meta-optimizer: adam or sgd"),
    ("--engine", "engine", str, "hypergradient engine (unroll, forward, neumann, es, pes, ...)"),
    ("--rank", "rank", int, "rank of the lowrank Kronecker factors (metamd)"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint every N outer steps"),
    (
        "--dist-timeout",
        "dist_timeout",
        float,
        "seconds a collective waits for the other ranks under torchrun before the job fails"
        " (a hung or stopped rank then ends the run instead of stalling it)",
    ),
    ("--steps-per-domain", "steps_per_domain", int, "apo: training steps on each domain in turn"),
]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m meta_train",
        description="Meta-train an optimizer; writes OUT/learned_optimizer.safetensors (deploy "
        "it with metaopt.load_optimizer or learned:<path>), OUT/metrics.jsonl, OUT/config.json, "
        "OUT/checkpoint.safetensors and a plot.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config
    )
    p.add_argument(
        "--learner",
        help=f"meta-learner, one of {available_learners()} (required, here or in --config)",
    )
    for flag, name, typ, text in _OPTIONS:
        p.add_argument(flag, dest=name, type=typ, help=f"{text} (default: {_default(name)})")
    p.add_argument(
        "--config", dest="config_file", help="TOML file of options; flags win (default: none)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run checkpointed in --out; a folder whose run was killed before its"
        " first checkpoint (config.json, no checkpoint) starts from scratch; these may differ"
        f" from the checkpointed run: {', '.join(sorted(_RESUME_MAY_CHANGE))} (default: off)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the tqdm progress bar"
    )
    p.add_argument(
        "--option",
        dest="options",
        action="append",
        metavar="KEY=VALUE",
        help=f"extra learner option, repeatable (TOML [options]; {VALUE_SYNTAX}; default: none)",
    )
    p.add_argument(
        "--source-option",
        dest="source_options",
        action="append",
        metavar="KEY=VALUE",
        help='extra suite/family option, e.g. model="mlp" or dtype=float64 (TOML'
        f" [source_options]; {VALUE_SYNTAX}; default: none)",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import MODULE (a dotted name or a .py file) before anything is resolved, so the"
        " tasks, families, objectives, engines or learners it registers can be named;"
        " repeatable (default: none)",
    )
    return p


def resolve_source(config: TrainConfig) -> Any:
    """The task source: a suite's training tasks (a list) or a ``TaskFamily``."""
    import tasks

    opts = typed_task_options(config.source_options, "--source-option")
    if config.data_root is not None:
        opts["data_root"] = config.data_root
    if config.device != "cpu":
        opts.setdefault("device", config.device)
    try:
        if config.family is not None:
            family = tasks.get_family(config.family, **opts)
        else:
            suite = tasks.get_suite(config.suite, **opts)
    except TypeError as err:  # an option the suite/family does not take
        name = config.family or config.suite
        raise UsageError(f"source options {sorted(opts)} for {name!r}: {one_line(err)}") from None
    if config.family is not None:
        _check_draw(family, config)
        return family
    if config.holdout is None:
        return [suite.task(d) for d in suite.domains]
    return suite.meta_train_tasks(config.holdout)


def _check_draw(family: Any, config: TrainConfig) -> None:
    """Draw one task (from a generator of its own) so a family whose ``sample`` does not
    return a ``tasks.Task`` fails here, before anything is written."""
    import torch

    import tasks

    try:
        task = family.sample(torch.Generator().manual_seed(config.seed))
    except TypeError as err:  # tasks.TaskFamily's own check of what sample() returned
        raise UsageError(f"family={config.family!r}: {one_line(err)}") from None
    if not isinstance(task, tasks.Task):
        raise UsageError(
            f"family={config.family!r}: sample() returned a {type(task).__name__}, not a tasks.Task"
        )


def _killed_before_first_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds only what a run killed before its first checkpoint leaves: a
    meta_train ``config.json``, maybe ``metrics.jsonl`` and temporary files."""
    if not (out / "config.json").is_file() or (out / CHECKPOINT).exists():
        return False
    stale = set(stale_temp_files(out, _OUTPUTS))
    if any(p.name not in ("config.json", METRICS) and p not in stale for p in out.iterdir()):
        return False
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"learner", "outer_steps", "out"} <= set(saved)


def prepare(argv: Sequence[str] | None) -> tuple[TrainConfig, Any, dict[str, Any] | None]:
    """Parse, merge and validate everything; read (never write) ``out``.

    Returns ``(config, learner spec, resume state or None)``; ``None`` also when ``--resume``
    finds a run killed before its first checkpoint (it starts from scratch).
    """
    ns = vars(build_parser().parse_args(argv))
    ns.pop("imports", None)  # imported by main() before the parser was built
    file_values = load_toml(ns.pop("config_file")) if "config_file" in ns else {}
    for key, flag in (("options", "--option"), ("source_options", "--source-option")):
        if key in ns:
            ns[key] = parse_options(ns[key], flag)
    config = merge(file_values, ns)
    spec = get_learner_spec(config.learner)
    out = check_output_dir(config.out)
    fresh = not out.exists() or not any(out.iterdir()) or _killed_before_first_checkpoint(out)
    resume_state = None
    if config.resume and (out / CHECKPOINT).exists():
        resume_state = check_resumable(config, out)
        done = int(resume_state["step"])
        if config.outer_steps is not None and done > config.outer_steps:
            raise UsageError(
                f"outer_steps={config.outer_steps}: the run in out={config.out!r} is at outer "
                f"step {done} already; pass --outer-steps {done} or more (nothing was changed)"
            )
        read_metrics(out / METRICS)  # a damaged metrics.jsonl is refused before any write
    elif config.resume and not (out.exists() and fresh):
        raise UsageError(f"out={config.out!r}: has no {CHECKPOINT} to --resume from")
    elif not config.resume and not fresh:
        raise UsageError(
            f"out={config.out!r}: is not empty; pass --resume to continue the run in it "
            "or choose another directory"
        )
    return config, spec, resume_state


def _build(config: TrainConfig, spec: Any, resume_state: dict[str, Any] | None) -> Any:
    """The learner (its config checks its options' values and types) and, on resume, the
    checkpoint loaded into it once here, so a checkpoint that does not fit it is refused
    before anything is written."""
    seed_everything(config.seed)  # factor initialisations etc. drawn from global RNGs
    source = resolve_source(config)
    try:
        learner = spec.builder()(config, source, _local_device(config.device))
    except TypeError as err:  # an option the learner does not take
        raise UsageError(f"learner={config.learner!r} options: {one_line(err)}") from None
    if resume_state is not None:
        try:
            learner.load_state_dict(resume_state["learner"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"checkpoint {str(Path(config.out) / CHECKPOINT)!r} does not fit learner "
                f"{config.learner!r} with these settings: {one_line(err)}"
            ) from None
    return learner


def _learning_rates(config: TrainConfig, learner: Any) -> tuple[str, str]:
    """The run's inner and meta learning rates as the error shows them: the flag's value,
    else the learner's own (its ``config.lr`` / ``config.meta_lr``, as MetaMD's and APO's)."""
    own = getattr(learner, "config", None)
    shown = []
    for ours, theirs in (("inner_lr", "lr"), ("meta_lr", "meta_lr")):
        value = getattr(config, ours)
        value = getattr(own, theirs, None) if value is None else value
        number = isinstance(value, int | float) and not isinstance(value, bool)
        shown.append(f"{value:g}" if number else "the learner's own")
    return shown[0], shown[1]


def _non_finite(err: NonFiniteState, config: TrainConfig, learner: Any) -> str:
    """The one-line report of a diverged run: where, what was kept, how to go on."""
    try:
        kept = (
            f"the checkpoint of outer step {load_checkpoint(Path(config.out) / CHECKPOINT)['step']}"
        )
        kept += " is kept"
    except CheckpointError:
        kept = "no checkpoint was written yet, so --resume starts from scratch"
    inner_lr, meta_lr = _learning_rates(config, learner)
    return (
        f"meta_train: error: outer step {err.step}: {err.detail} (the run diverged); "
        f"nothing of this step was saved and {kept}; continue with "
        f"--resume and a lower learning rate: --inner-lr (now {inner_lr}) or "
        f"--meta-lr (now {meta_lr})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 done, 1 diverged or a rank failed, 2 bad input,
    128+signal when stopped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import_modules(imports_in(argv))
        config, spec, resume_state = prepare(argv)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not spec.distributed:
            raise UsageError(f"learner={config.learner!r}: runs online in one process only")
        learner = _build(config, spec, resume_state)
    except (ValueError, CheckpointError) as err:
        print(f"meta_train: error: {one_line(err)}", file=sys.stderr)
        return 2
    dist = setup(config.device, timeout_s=config.dist_timeout)
    out = Path(config.out)
    try:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            for stale in stale_temp_files(out, _OUTPUTS):  # left by a killed write
                stale.unlink(missing_ok=True)
            if resume_state is None:  # the lines of a run killed before its first checkpoint
                (out / METRICS).unlink(missing_ok=True)
            text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
            atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
        dist.barrier()
        run(config, learner, dist, out, total_steps(config, learner), resume_state=resume_state)
    except Stopped as stop:
        if dist.is_main:
            print(f"meta_train: {stop}; continue with --resume", file=sys.stderr)
        return 128 + int(stop.signum)
    except NonFiniteState as err:
        if dist.is_main:
            print(_non_finite(err, config, learner), file=sys.stderr)
        return 1
    except CollectiveFailed as err:
        print(
            f"meta_train: error: {one_line(err)}; another rank hung or died, so this run "
            f"stops (raise --dist-timeout, now {config.dist_timeout:g} s, only if ranks are "
            "legitimately that slow; --resume continues from the last checkpoint)",
            file=sys.stderr,
        )
        return 1
    finally:
        dist.close()
    if dist.is_main:
        print(f"meta_train: wrote {out / LEARNED}", file=sys.stderr)
    return 0


def total_steps(config: TrainConfig, learner: Any) -> int:
    """``--outer-steps``, else the recipe's own run length (``learner.config.meta_steps``),
    else 100."""
    if config.outer_steps is not None:
        return config.outer_steps
    return int(getattr(getattr(learner, "config", None), "meta_steps", 100))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy's global generators."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _local_device(device: str) -> str:
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
