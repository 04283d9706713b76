"""Optimizers built from a model (K-FAC, EKFAC, Shampoo): one param group over its layers."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ModelBoundOptimizer"]


class ModelBoundOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose single param group is the model it was built from.

    Its steps read ``param_groups[0]`` (LR schedulers and in-place edits of that group's
    ``lr``, ``momentum``, ... work as usual), and its per-layer curvature couples a layer's
    parameters, so a second group would be silently ignored or mis-scaled:
    :meth:`add_param_group` after construction is refused with a clear error.
    """

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_groups_fixed", False):
            raise ValueError(
                f"param_group: {type(self).__name__} keeps one param group, the layers of "
                "the model it was built with; build another optimizer for other parameters"
            )
        super().add_param_group(param_group)

    def _fix_groups(self) -> None:
        """Call right after ``super().__init__``."""
        self._groups_fixed = True
