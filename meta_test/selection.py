"""How a search trial is scored: the selected quantity, its aggregate over seeds, and ties.

``select_on`` (:func:`meta_test.run_comparison`, ``--select-on``):

- ``"auto"``: ``"accuracy"`` (maximised) for classification, ``"loss"`` for synthetic tasks
  (``task.info["synthetic"]``), else the task's metric (e.g. MSE, minimised);
- ``"loss"`` or the task's metric: on the validation split after training;
- ``"train-loss"``: the loss on the whole training split after training (the protocol of
  the APO paper, Bae, Vicol, HaoChen & Grosse 2022, appendix C.3-C.4);
- ``"steps-to-target"`` (needs ``target_loss``): the fewest training steps until the
  training-loss curve reaches ``target_loss`` (:func:`meta_test.metrics.steps_to_target`);
  configurations that never reach it rank after all that do, by their final training loss
  (the loss of the last step). Useful when every stable configuration reaches the optimum
  within the budget, so the final loss would rank them by rounding noise.

A diverged run scores the worst value. **Ties** are broken by a second quantity, lower is
better, the same for every optimizer: the validation loss when selecting on the task's
metric (a few validation examples decide an accuracy, so equal accuracies are common), the
final training loss for ``"steps-to-target"``, none when selecting on a loss. What is still
tied goes to the first configuration in evaluation order (the grid's order under
``hpo="grid"``; see :mod:`meta_test.search`).

**Seeds**: a configuration trains once per search seed; its score is the aggregate
(``"median"``, the default, or ``"mean"``) of its per-seed scores, a diverged seed counting
as the worst value (``+inf`` when minimising, ``-inf`` when maximising); tie-break values
are aggregated the same way. The per-seed scores are kept with the trial (``seed_values``,
``None`` for a diverged seed).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meta_test.metrics import steps_to_target
from meta_test.runs import RunResult
from meta_test.search import Score

__all__ = ["AGGREGATES", "SELECT_ON", "Selection", "selection_objective"]

#: how per-seed scores combine into a configuration's score
AGGREGATES: dict[str, Callable[[Sequence[float]], float]] = {
    "median": statistics.median,
    "mean": statistics.fmean,
}
#: the task-independent ``select_on`` values (the task's metric name is valid too)
SELECT_ON = ("auto", "loss", "train-loss", "steps-to-target")


def selection_objective(task: Any, select_on: str = "auto") -> tuple[str, bool]:
    """``(key, maximize)``: the quantity the search optimises (see the module doc).

    ``key`` is ``"accuracy"``, ``"loss"`` or the task's metric (validation split),
    ``"train_loss"`` or ``"steps_to_target"``.
    """
    if select_on == "auto":
        if task.metric == "accuracy":
            return "accuracy", True
        return ("loss" if task.info.get("synthetic") else task.metric), False
    if select_on in ("train-loss", "steps-to-target"):
        return select_on.replace("-", "_"), False
    if select_on not in ("loss", task.metric):
        raise ValueError(
            f"select_on={select_on!r}: must be one of {', '.join(map(repr, SELECT_ON))} "
            f"or the task's metric {task.metric!r}"
        )
    return select_on, select_on == "accuracy"


@dataclass(frozen=True)
class Selection:
    """The scoring rule of one comparison: ``key`` optimised (``maximize``), with
    ``target_loss`` for ``"steps_to_target"``."""

    key: str
    maximize: bool
    target_loss: float | None = None

    @classmethod
    def for_task(
        cls, task: Any, select_on: str = "auto", target_loss: float | None = None
    ) -> Selection:
        key, maximize = selection_objective(task, select_on)
        if key == "steps_to_target" and target_loss is None:
            raise ValueError("select_on='steps-to-target': needs target_loss (--target-loss)")
        return cls(key, maximize, target_loss)

    @property
    def label(self) -> str:
        """The quantity as ``results.json`` names it (``val_accuracy``, ``train_loss``, ...)."""
        return self.key if self.key in ("train_loss", "steps_to_target") else f"val_{self.key}"

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits a search run evaluates after training."""
        return {"train_loss": ("train",), "steps_to_target": ()}.get(self.key, ("val",))

    def score(self, run: RunResult) -> tuple[float, float | None]:
        """``(value, tiebreak)`` of one search run (non-finite ``value``: diverged)."""
        if self.key == "steps_to_target":
            if run.diverged:
                return math.inf, math.inf
            hit = steps_to_target(run.train_loss, self.target_loss)
            return (math.inf if hit is None else float(hit)), run.train_loss[-1]
        value = run.final[self.label]
        if self.key in ("loss", "train_loss"):
            return value, None
        return value, run.final["val_loss"]

    def aggregate(
        self, scores: Mapping[int, tuple[float, float | None]], how: str = "median"
    ) -> Score:
        """The configuration's :class:`~meta_test.search.Score` from ``{seed: score}``."""
        combine = AGGREGATES[how]
        worst = -math.inf if self.maximize else math.inf
        values = [v if math.isfinite(v) else worst for v, _ in scores.values()]
        ties = [t for _, t in scores.values()]
        tiebreak = None
        if all(t is not None for t in ties):
            tiebreak = combine([t if math.isfinite(t) else math.inf for t in ties])  # type: ignore[arg-type]
        seed_values = {str(s): v if math.isfinite(v) else None for s, (v, _) in scores.items()}
        return Score(combine(values), tiebreak, {"seed_values": seed_values})
