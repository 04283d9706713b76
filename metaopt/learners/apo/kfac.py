"""``adapt="kfac-damping"``: APO on K-FAC's learning rate and damping (Bae et al. 2022,
earlier version, section 5.2.2).

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

from metaopt.learners.apo.adapts import (
    ADAPTS,
    Rule,
    base_rule,
    base_step,
    init_states,
    meta_param,
)
from metaopt.optim.kfac import KFAC

__all__ = ["KfacDampingRule"]


@ADAPTS.register("kfac-damping", bases=("kfac",), lr_adapt=True)
class KfacDampingRule(Rule):
    """``phi = (log lr, log damping)``; K-FAC built with ``lr=0, momentum=0, kl_clip=None``
    (it only keeps the curvature and its schedule; ``kfac_options`` reach its constructor).
    """

    def __init__(self, cfg: Any, model: nn.Module) -> None:
        super().__init__(cfg, model)
        ref = next(model.parameters())
        options = {"factor_update_freq": 10, "inv_update_freq": 100, **cfg.kfac_options}
        options.update(lr=0.0, momentum=0.0, kl_clip=None, damping=cfg.damping)
        self.kfac = KFAC(model, **options)
        self.meta = {
            "log_lr": meta_param(math.log(cfg.lr), ref),
            "log_damping": meta_param(math.log(cfg.damping), ref),
        }
        # K-FAC's own step: SGD (with momentum on top, Eq. 18-19) on the K-FAC direction
        self.sgd, self.sgd_hp = base_rule(cfg, "sgd")
        self.sgdm, self.sgdm_hp = base_rule(cfg, "sgdm")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self.kfac.statistics_paused():
            yield

    def update(self, params, grads, states, meta, *, lookahead, step):
        self.kfac.update_curvature()  # once per K-FAC step; folds this step's statistics
        direction = self.kfac.precondition(grads, damping=meta["log_damping"].exp())
        lr = meta["log_lr"].exp()
        if lookahead:
            empty = init_states(self.sgd, self.sgd_hp, params)
            return base_step(self.sgd, self.sgd_hp, params, direction, empty, lr, count=1)
        states = {
            n: states[n] if n in states else self.sgdm.init(p, self.sgdm_hp)
            for n, p in params.items()
        }
        return base_step(self.sgdm, self.sgdm_hp, params, direction, states, lr, count=step + 1)

    def after_step(self) -> None:
        # advance K-FAC's statistics/eigenbasis schedule without a preconditioning pass
        self.kfac.advance()

    def current(self, meta):
        return {"lr": meta["log_lr"].detach().exp(), "damping": meta["log_damping"].detach().exp()}

    def learned_optimizer(self, meta):
        raise ValueError(
            "adapt='kfac-damping' learns K-FAC's lr and damping for this run; K-FAC's curvature "
            "is re-estimated by every run, so there is no learned optimizer file to deploy "
            "(use the adapted values with metaopt.optim.KFAC)"
        )

    def extra_state(self) -> dict[str, Any]:
        return {"kfac": copy.deepcopy(self.kfac.state_dict())}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kfac.load_state_dict(state["kfac"])
