"""``adapt="kfac-damping"``: APO on K-FAC's learning rate and damping (``001_`` §5.2.2).

K-FAC (:class:`metaopt.optim.kfac.KFAC`) supplies the curvature: its hooks collect the
factor statistics during APO's ordinary gradient evaluation, and
:meth:`~metaopt.optim.kfac.KFAC.precondition` gives the direction ``P_d g`` for the stored
eigenbases, differentiable in a tensor damping ``d``. APO takes the step itself:
lookahead ``theta - lr (P_d g + wd theta)``; update with momentum on top. The lookahead
and meta-objective evaluations run inside ``statistics_paused()``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

from torch import nn

from metaopt.learners.apo_config import APOConfig
from metaopt.learners.apo_rules import Rule, _param
from metaopt.optim.functional import sgd_step
from metaopt.optim.kfac import KFAC

__all__ = ["KfacDampingRule"]


class KfacDampingRule(Rule):
    """``phi = (log lr, log damping)``; K-FAC built with ``lr=0, momentum=0, kl_clip=None``
    (it only keeps the curvature and its schedule; ``kfac_options`` reach its constructor).
    """

    def __init__(self, cfg: APOConfig, model: nn.Module) -> None:
        super().__init__(cfg, model)
        ref = next(model.parameters())
        options = {"factor_update_freq": 10, "inv_update_freq": 100, **cfg.kfac_options}
        options.update(lr=0.0, momentum=0.0, kl_clip=None, damping=cfg.damping)
        self.kfac = KFAC(model, **options)
        self.meta = {
            "log_lr": _param(math.log(cfg.lr), ref),
            "log_damping": _param(math.log(cfg.damping), ref),
        }

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self.kfac.statistics_paused():
            yield

    def update(self, params, grads, state, meta, *, lookahead, step):
        self.kfac.update_curvature()  # once per K-FAC step; folds this step's statistics
        direction = self.kfac.precondition(grads, damping=meta["log_damping"].exp())
        lr = meta["log_lr"].exp()
        cfg = self.cfg
        if lookahead:
            return sgd_step(params, direction, None, lr=lr, weight_decay=cfg.weight_decay)
        return sgd_step(
            params,
            direction,
            state,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )

    def after_step(self) -> None:
        # advance K-FAC's statistics/eigenbasis schedule without a preconditioning pass
        self.kfac.advance()

    def current(self, meta):
        return {"lr": meta["log_lr"].detach().exp(), "damping": meta["log_damping"].detach().exp()}

    def extra_state(self) -> dict[str, Any]:
        return {"kfac": copy.deepcopy(self.kfac.state_dict())}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kfac.load_state_dict(state["kfac"])
