"""``python -m meta_train``: meta-train a preconditioner on a task suite or family.

Examples::

    python -m meta_train --learner metamd --suite rotated-digits --holdout 75 --out runs/md
    python -m meta_train --learner metamd --preset metamd-paper --suite rotated-digits \
        --holdout 75 --out runs/paper
    python -m meta_train --config md.toml --out runs/md --resume
    torchrun --nproc_per_node=2 -m meta_train --learner metamd --family meta-quadratics --out r

Options come from the defaults, then ``--config FILE.toml``, then the flags (flags win); the
effective configuration is written to ``OUT/config.json``. Bad input exits with code 2 and
one line on stderr, before any file is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import meta_train.builtin  # noqa: F401  (registers the built-in learners)
from meta_train.checkpoint import CheckpointError
from meta_train.config import FIELDS, TrainConfig, load_toml, merge
from meta_train.distributed import setup
from meta_train.learners import available_learners, get_learner_spec
from meta_train.runner import CHECKPOINT, LEARNED, Stopped, check_resumable, run
from metaopt.io import atomic_write

__all__ = ["build_parser", "main", "prepare"]


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(message)


def _kv(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]  # numbers, booleans, lists, quoted strings
    except tomllib.TOMLDecodeError:
        value = raw
    return key.replace("-", "_"), value


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
    ("--preset", "preset", str, "recipe of a MetaMD learner: kron-adam, metamd-paper, ..."),
    ("--outer-steps", "outer_steps", int, "meta-steps (meta-updates) in total"),
    ("--tasks-per-step", "tasks_per_step", int, "inner runs per meta-step (k), split over ranks"),
    ("--inner-steps", "inner_steps", int, "inner training steps per task (T)"),
    ("--inner-lr", "inner_lr", float, "inner learning rate (eta)"),
    ("--meta-lr", "meta_lr", float, "meta learning rate"),
    ("--meta-optimizer", "meta_optimizer", str, "meta-optimizer: adam or sgd"),
    ("--engine", "engine", str, "hypergradient engine (unroll, forward, neumann, es, pes, ...)"),
    ("--rank", "rank", int, "rank of the lowrank Kronecker factors (metamd)"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint every N outer steps"),
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
        help="continue the run checkpointed in --out (default: off)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the tqdm progress bar"
    )
    p.add_argument(
        "--option",
        dest="options",
        type=_kv,
        action="append",
        metavar="KEY=VALUE",
        help="extra learner option, repeatable (TOML [options]; default: none)",
    )
    p.add_argument(
        "--source-option",
        dest="source_options",
        type=_kv,
        action="append",
        metavar="KEY=VALUE",
        help='extra suite/family option, e.g. model="mlp" (TOML [source_options]; default: none)',
    )
    return p


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def resolve_source(config: TrainConfig) -> Any:
    """The task source: a suite's training tasks (a list) or a ``TaskFamily``."""
    import tasks

    opts = dict(config.source_options)
    if config.data_root is not None:
        opts["data_root"] = config.data_root
    if config.device != "cpu":
        opts.setdefault("device", config.device)
    try:
        if config.family is not None:
            return tasks.get_family(config.family, **opts)
        suite = tasks.get_suite(config.suite, **opts)
    except TypeError as err:  # an option the suite/family does not take
        name = config.family or config.suite
        raise UsageError(f"source options {sorted(opts)} for {name!r}: {_one_line(err)}") from None
    if config.holdout is None:
        return [suite.task(d) for d in suite.domains]
    return suite.meta_train_tasks(config.holdout)


def prepare(argv: Sequence[str] | None) -> tuple[TrainConfig, Any, dict[str, Any] | None]:
    """Parse, merge and validate everything; read (never write) ``out``.

    Returns ``(config, learner spec, resume state or None)``.
    """
    ns = vars(build_parser().parse_args(argv))
    file_values = load_toml(ns.pop("config_file")) if "config_file" in ns else {}
    for key in ("options", "source_options"):
        if key in ns:
            ns[key] = dict(ns[key])
    config = merge(file_values, ns)
    spec = get_learner_spec(config.learner)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"out={config.out!r}: exists and is not a directory")
    resume_state = None
    if config.resume:
        if not (out / CHECKPOINT).exists():
            raise UsageError(f"out={config.out!r}: has no {CHECKPOINT} to --resume from")
        resume_state = check_resumable(config, out)
    elif out.exists() and any(out.iterdir()):
        raise UsageError(
            f"out={config.out!r}: is not empty; pass --resume to continue the run in it "
            "or choose another directory"
        )
    return config, spec, resume_state


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 done, 2 bad input, 128+signal when stopped)."""
    try:
        config, spec, resume_state = prepare(argv)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and not spec.distributed:
            raise UsageError(f"learner={config.learner!r}: runs online in one process only")
        seed_everything(config.seed)  # factor initialisations etc. drawn from global RNGs
        source = resolve_source(config)
        build = spec.builder()
        try:
            learner = build(config, source, _local_device(config.device))
        except TypeError as err:  # an option the learner does not take
            raise UsageError(f"learner={config.learner!r} options: {_one_line(err)}") from None
    except (ValueError, CheckpointError) as err:
        print(f"meta_train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    dist = setup(config.device)
    out = Path(config.out)
    try:
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
            atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
        dist.barrier()
        run(config, learner, dist, out, total_steps(config, learner), resume_state=resume_state)
    except Stopped as stop:
        if dist.is_main:
            print(f"meta_train: {stop}; continue with --resume", file=sys.stderr)
        return 128 + int(stop.signum)
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
