"""``metrics.jsonl`` (one JSON object per outer step) and the meta-objective plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from metaopt.io import atomic_write

__all__ = ["MetricsLog", "plot_metrics", "read_metrics"]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # "nan" / "inf": keep every line valid JSON
    return v


class MetricsLog:
    """Append-only ``metrics.jsonl``; each line ``{"step": n, "meta_objective": ..., ...}``.

    ``truncate_after(step)`` drops lines of steps later than a checkpoint, so a resumed run
    rewrites exactly the steps it repeats and the file has one line per outer step.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def truncate_after(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete line of a ``metrics.jsonl``; text after the last newline (a line torn
    by a kill) is dropped.

    Raises:
        ValueError: the file is not UTF-8, or a complete line is not a JSON object with an
            integer ``step`` (the file and line are named).
    """
    path = Path(path)
    if not path.exists():
        return []
    name = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"metrics {name!r}: byte {err.start} is not UTF-8 text") from None
    lines = text.split("\n")[:-1]  # the last piece is "" or a torn line
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"metrics {name!r} line {number}: is not JSON") from None
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"metrics {name!r} line {number}: has no integer 'step'")
        out.append(record)
    return out


def plot_metrics(metrics_path: str | os.PathLike[str], png_path: str | os.PathLike[str]) -> None:
    """Meta-objective and hypergradient norm against the outer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[key])) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in (
        (axes[0], "meta_objective", "meta-objective"),
        (axes[1], "hypergrad_norm", "hypergradient norm"),
    ):
        xs, ys = series(key)
        ax.plot(xs, ys, lw=1.2)
        ax.set_xlabel("outer step")
        ax.set_title(title)
        if ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
