"""The effective meta-training configuration: defaults, then a TOML file, then flags.

``TrainConfig`` is the one place that names every option, its default and what is allowed;
the CLI builds its ``--help`` from the same fields. A TOML file uses the field names
(``outer_steps = 200`` or ``outer-steps = 200``) at top level, plus the tables
``[options]`` (passed to the learner's own config) and ``[source_options]`` (passed to the
suite or family factory, e.g. ``model = "metamd-mlp"``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaopt.cli_support import MAX_COUNT, MAX_SEED, check_device, check_int, check_types

__all__ = ["IDENTITY_EXEMPT", "TrainConfig", "load_toml", "merge"]

#: fields that may change between a run and its ``--resume`` (everything else must match);
#: the learning rates may, so a run that blew up resumes from its last good checkpoint
#: with a lower one
IDENTITY_EXEMPT = frozenset(
    {
        "out",
        "resume",
        "outer_steps",
        "checkpoint_every",
        "progress",
        "device",
        "data_root",
        "dist_timeout",
        "inner_lr",
        "meta_lr",
    }
)


@dataclass
class TrainConfig:
    """Every meta-training option (see ``python -m meta_train --help``).

    Attributes:
        learner: registered learner name (``metamd``, ``metasgd``, ``metacurvature``, ``apo``).
        preset: a MetaMD preset (``kron-adamw``, ``metamd-paper``, ``metasgd``,
            ``metacurvature``); ``None``: the learner's default recipe.
        suite: task suite to meta-train on (exclusive with ``family``).
        family: task family to sample training tasks from (exclusive with ``suite``).
        holdout: suite domain left out of meta-training (suites only).
        out: output directory.
        resume: continue the run checkpointed in ``out``.
        seed: seed of every task draw, initialisation and batch order.
        device: ``cpu`` or ``cuda`` (``cuda:i`` for one GPU).
        data_root: folder with datasets for file-backed tasks (passed as ``data_root``).
        outer_steps: total meta-steps (meta-updates); ``None``: the recipe's own.
        tasks_per_step: inner runs per meta-step (``k``), split across ranks.
        inner_steps: inner training steps per task (``T``).
        inner_lr: inner learning rate (``eta``).
        meta_lr: meta learning rate.
        meta_optimizer: ``adam``, ``sgd`` or ``rmsprop``.
        engine: hypergradient engine (a registered name).
        rank: rank of the lowrank Kronecker factors (MetaMD). For the learner settings
            from ``outer_steps`` to here ``None`` means the learner's (or preset's) own value.
        checkpoint_every: write a checkpoint every this many outer steps.
        dist_timeout: seconds a collective waits for the other ranks before the job fails
            (under torchrun; a hung rank then stops the run instead of stalling it).
        progress: show a tqdm progress bar.
        steps_per_domain: ``apo`` only: training steps on each training domain in turn.
        options: extra learner options (``--option KEY=VALUE``, TOML ``[options]``).
        source_options: extra suite/family options (``--source-option``, ``[source_options]``).
    """

    learner: str = ""
    preset: str | None = None
    suite: str | None = None
    family: str | None = None
    holdout: str | None = None
    out: str = ""
    resume: bool = False
    seed: int = 0
    device: str = "cpu"
    data_root: str | None = None
    outer_steps: int | None = None
    tasks_per_step: int | None = None
    inner_steps: int | None = None
    inner_lr: float | None = None
    meta_lr: float | None = None
    meta_optimizer: str | None = None
    engine: str | None = None
    rank: int | None = None
    checkpoint_every: int = 10
    dist_timeout: float = 300.0
    progress: bool = True
    steps_per_domain: int = 200
    options: dict[str, Any] = field(default_factory=dict)
    source_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.holdout, int) and not isinstance(self.holdout, bool):
            self.holdout = str(self.holdout)  # TOML ``holdout = 75`` names domain "75"
        check_types(self)  # e.g. ``progress = "no"`` in TOML is refused, not truthy
        if not self.learner:
            raise ValueError("learner: is required (--learner NAME)")
        if not self.out:
            raise ValueError("out: is required (--out DIR)")
        if (self.suite is None) == (self.family is None):
            raise ValueError(
                f"suite={self.suite!r}, family={self.family!r}: give exactly one of "
                "--suite NAME or --family NAME"
            )
        if self.holdout is not None and self.family is not None:
            raise ValueError(f"holdout={self.holdout!r}: applies to --suite only, not --family")
        for name in ("outer_steps", "tasks_per_step", "inner_steps", "checkpoint_every", "rank",
                     "steps_per_domain"):  # fmt: skip
            value = getattr(self, name)
            if value is not None or name in ("checkpoint_every", "steps_per_domain"):
                check_int(name, value, 1, MAX_COUNT)
        check_int("seed", self.seed, 0, MAX_SEED)
        for name in ("inner_lr", "meta_lr", "dist_timeout"):
            v = getattr(self, name)
            if v is None:
                continue
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not (math.isfinite(v) and v > 0)
            ):
                raise ValueError(f"{name}={v!r}: must be a positive finite number")
            setattr(self, name, float(v))
        if self.meta_optimizer not in (None, "adam", "sgd", "rmsprop"):
            raise ValueError(
                f"meta_optimizer={self.meta_optimizer!r}: must be 'adam', 'sgd' or 'rmsprop'"
            )
        check_device(self.device)
        for name in ("options", "source_options"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a table of key = value")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpointed one."""
        return {k: v for k, v in self.to_dict().items() if k not in IDENTITY_EXEMPT}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config; ``ValueError`` (one line) if it is unreadable or names bad keys."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as err:
        raise ValueError(f"config={str(path)!r}: cannot be read ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config={str(path)!r}: is not valid TOML ({err})") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS or name in ("out", "resume"):
            allowed = sorted(set(FIELDS) - {"out", "resume"})
            raise ValueError(f"config={str(path)!r}: unknown key {key!r}; allowed: {allowed}")
        out[name] = value
    return out


def merge(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """Defaults < config file < flags; the option tables merge key by key (flags win)."""
    values = dict(file_values)
    for key, value in flag_values.items():
        if key in ("options", "source_options"):
            values[key] = {**values.get(key, {}), **value}
        else:
            values[key] = value
    return TrainConfig(**values)
