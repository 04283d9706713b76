"""UCI regression tasks ``"uci:<name>"`` from ``<data root>/uci/<name>.csv`` (APO section 6.1).

The CSV is numeric, one example per row, with an optional header row (detected: a first
row that does not parse as numbers). The target is ``target_column`` (an index, or a header
name; default: the dataset's preset below, else the last column); ``drop_columns`` are
ignored (ids). Inputs and the target are standardised to zero mean and unit variance with
the TRAINING split's statistics (APO appendix C.3; columns with no spread are only
centred); ``task.info["target_mean"]`` / ``["target_std"]`` undo it. The split is a fixed
seeded ``test_fraction`` (0.1) / ``val_fraction`` (0.1) / rest partition
(``split_seed=0``). Default model: ``"mlp"`` with ``widths=(100, 100)`` and ReLU, the
network of APO section 6.1; batch size 128 (appendix C.3).

Presets (the official files, renamed to ``<name>.csv``):

* ``slice``: ``slice_localization_data.csv`` -- target ``reference``, drop ``patientId``.
* ``protein``: ``CASP.csv`` -- target ``RMSD`` (the first column).
* ``parkinsons``: ``parkinsons_updrs.data`` -- target ``total_UPDRS``, drop ``subject#``
  and ``motor_UPDRS`` (the other target).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.base import Task
from tasks.registry import register_task
from tasks.synthetic import with_defaults
from tasks.tabular import TABULAR_MODEL, split_three, standardise, tensor_task
from tasks.vision_data import DATA_ENV, DEFAULT_DATA_ROOT, resolve_data_root

__all__ = ["UCI_PRESETS", "UciPreset", "read_numeric_csv", "uci"]


@dataclass(frozen=True)
class UciPreset:
    """Where a known UCI dataset comes from and which columns are target and ids."""

    homepage: str
    original_file: str
    target: str | int = -1
    drop: tuple[str, ...] = ()


UCI_PRESETS: dict[str, UciPreset] = {
    "slice": UciPreset(
        "https://archive.ics.uci.edu/dataset/206/relative+location+of+ct+slices+on+axial+axis",
        "slice_localization_data.csv",
        "reference",
        ("patientId",),
    ),
    "protein": UciPreset(
        "https://archive.ics.uci.edu/dataset/265/"
        "physicochemical+properties+of+protein+tertiary+structure",
        "CASP.csv",
        "RMSD",
    ),
    "parkinsons": UciPreset(
        "https://archive.ics.uci.edu/dataset/189/parkinsons+telemonitoring",
        "parkinsons_updrs.data",
        "total_UPDRS",
        ("subject#", "motor_UPDRS"),
    ),
}


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_numeric_csv(path: Path) -> tuple[list[str] | None, torch.Tensor]:
    """``(header or None, float64 rows x columns)`` of a numeric CSV file."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"file {str(path)!r}: is empty")
    header = None
    if not all(_is_number(c) for c in rows[0]):
        header, rows = [c.strip() for c in rows[0]], rows[1:]
    width = len(header) if header is not None else len(rows[0])
    values = []
    for i, row in enumerate(rows, start=2 if header is not None else 1):
        if len(row) != width:
            raise ValueError(f"file {str(path)!r}, line {i}: {len(row)} columns, expected {width}")
        try:
            values.append([float(c) for c in row])
        except ValueError:
            bad = next(c for c in row if not _is_number(c))
            raise ValueError(f"file {str(path)!r}, line {i}: {bad!r} is not a number") from None
    if not values:
        raise ValueError(f"file {str(path)!r}: has a header but no data rows")
    return header, torch.tensor(values, dtype=torch.float64)


def _column(spec: str | int, header: list[str] | None, width: int, what: str) -> int:
    if isinstance(spec, str):
        if header is None or spec not in header:
            raise ValueError(f"{what}={spec!r}: no such column; columns are {header}")
        return header.index(spec)
    if not -width <= int(spec) < width:
        raise ValueError(f"{what}={spec!r}: the file has {width} columns")
    return int(spec) % width


@register_task("uci:<name>")
def uci(
    name: str,
    data_root: str | os.PathLike[str] | None = None,
    target_column: str | int | None = None,
    drop_columns: Sequence[str | int] | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    batch_size: int = 128,
    model: Any = "mlp",
    model_options: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Task:
    """The regression task of ``<data root>/uci/<name>.csv`` (see the module docstring)."""
    path = resolve_data_root(data_root) / "uci" / f"{name}.csv"
    preset = UCI_PRESETS.get(name.lower())
    if not path.is_file():
        how = (
            f"download {preset.original_file} from {preset.homepage} and save it as {str(path)!r}"
            if preset is not None
            else f"save the UCI dataset as a numeric CSV (target in the last column, or pass "
            f"target_column=) at {str(path)!r}"
        )
        raise ValueError(
            f"dataset 'uci:{name}': file not found at {str(path)!r}; {how} (the data root is "
            f"the data_root option, else ${DATA_ENV}, else {DEFAULT_DATA_ROOT})"
        )
    header, table = read_numeric_csv(path)
    width = table.shape[1]
    if width < 2:
        raise ValueError(f"file {str(path)!r}: needs at least one input and one target column")
    has_preset_columns = preset is not None and (
        isinstance(preset.target, int) or (header is not None and preset.target in header)
    )
    if target_column is None:
        target_column = preset.target if has_preset_columns else -1
    if drop_columns is None:
        drop_columns = preset.drop if has_preset_columns else ()
    target = _column(target_column, header, width, "target_column")
    drop = {_column(c, header, width, "drop_columns") for c in drop_columns}
    if target in drop:
        raise ValueError(f"drop_columns={list(drop_columns)!r}: includes the target column")
    inputs = [j for j in range(width) if j != target and j not in drop]
    if not inputs:
        raise ValueError(f"file {str(path)!r}: no input columns left after dropping {drop}")
    parts = split_three(table.shape[0], val_fraction, test_fraction, split_seed)
    x, mean, std = standardise(table[:, inputs], parts[0])
    y, t_mean, t_std = standardise(table[:, [target]], parts[0])
    info = {
        "path": str(path),
        "columns": [header[j] for j in inputs] if header is not None else inputs,
        "target": header[target] if header is not None else target,
        "feature_mean": mean,
        "feature_std": std,
        "target_mean": float(t_mean),
        "target_std": float(t_std),
        "split_seed": split_seed,
    }
    return tensor_task(
        f"uci:{name}",
        x.float(),
        y.float(),
        parts,
        classes=None,
        batch_size=batch_size,
        model=model,
        model_options=with_defaults(model, model_options, TABULAR_MODEL),
        device=device,
        dtype=dtype,
        info=info,
    )
