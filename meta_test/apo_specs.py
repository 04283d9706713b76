"""APO in the evaluation harness: ``build(spec, model, task, hparams) -> Trainer``.

Specs (registered by :mod:`meta_test.specs`):

==========================  ============================================================
``apo-lr:<base>``           global lr of ``sgd | sgdm | rmsprop | adam``
``apo-layer-lr:<base>``     per-layer lrs of the same bases
``apo-rmsprop-eps-rho``     RMSprop's lr, eps and power rho
``apo-kfac-damping``        K-FAC's lr and damping
``apo-precond``             APO-Precond (warm-up ``sgdm``; ``hparams={"base": "adam"}``)
==========================  ============================================================

``hparams`` are :class:`metaopt.APOConfig` fields. Defaults where they are not given:
``fsd="kl"`` for classification tasks (``task.metric == "accuracy"``), else ``"mse"``;
initial ``lr`` 0.1 for sgd/sgdm, 3e-4 for rmsprop/adam (Bae et al. 2022, appendix C.2), 1e-3
for K-FAC. The search spaces follow Bae et al. 2022, appendix C.5 (learning-rate adaptation:
``lambda_fsd`` over
``{0.3, 0.1, 0.03, 0.01, 0.001, 0.0001}``) and C.3-C.5 (APO-Precond: ``lambda_fsd`` in
``{0.3, 0.1, 0.03}`` x ``lambda_wsd`` in ``{3, 1, 0.3, 0.1, 0.03}``, the paper's grid plus
0.03 on each axis: 15 points, the size of every learning-rate x weight-decay grid).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from meta_test.space import Dim, SearchSpace
from metaopt import APO, APOConfig

__all__ = ["APOTrainer", "build", "parse_spec", "search_space"]

_ADAPTS = {
    "apo-lr": "lr",
    "apo-layer-lr": "layer-lr",
    "apo-rmsprop-eps-rho": "rmsprop-eps-rho",
    "apo-kfac-damping": "kfac-damping",
    "apo-precond": "precond",
}
_INITIAL_LR = {"sgd": 0.1, "sgdm": 0.1, "rmsprop": 3e-4, "adam": 3e-4, "kfac": 1e-3}


class APOTrainer:
    """:class:`metaopt.APO` as a harness ``Trainer`` (``draw_batch`` supplies B')."""

    def __init__(self, apo: APO) -> None:
        self.apo = apo
        self.num_meta_parameters = apo.num_meta_parameters

    def step(
        self, batch: tuple[Tensor, Tensor], draw_batch: Callable[[], tuple[Tensor, Tensor]]
    ) -> Tensor:
        return self.apo.step(batch, draw_batch)["loss"]

    def hparam_log(self) -> dict[str, float]:
        return self.apo.hparam_log()


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"apo-lr:sgdm" -> ("lr", "sgdm")``; ``"apo-precond" -> ("precond", None)``."""
    name, _, arg = spec.strip().partition(":")
    if name not in _ADAPTS:
        raise ValueError(f"spec={spec!r}: unknown APO spec; choose one of {sorted(_ADAPTS)}")
    if name in ("apo-lr", "apo-layer-lr") and not arg:
        raise ValueError(f"spec={spec!r}: name the base optimizer, e.g. '{name}:sgdm'")
    if name in ("apo-rmsprop-eps-rho", "apo-kfac-damping", "apo-precond") and arg:
        raise ValueError(f"spec={spec!r}: {name} takes no ':<base>'")
    return _ADAPTS[name], arg or None


def build(spec: str, model: nn.Module, task: Any, hparams: dict[str, Any]) -> APOTrainer:
    """The :class:`APOTrainer` for ``spec`` on ``task``'s ``model`` (see the module doc)."""
    adapt, base = parse_spec(spec)
    config = APOConfig(adapt=adapt, base=base)  # resolves the default base
    options: dict[str, Any] = {
        "adapt": adapt,
        "base": config.base,
        "fsd": "kl" if getattr(task, "metric", None) == "accuracy" else "mse",
    }
    if adapt != "precond":
        options["lr"] = _INITIAL_LR[config.base]
    options.update(hparams)
    try:
        config = APOConfig(**options)
    except TypeError as err:
        raise ValueError(f"hparams={hparams!r}: not APOConfig fields ({err})") from err
    return APOTrainer(APO(model, task.loss, config))


def search_space(spec: str) -> SearchSpace:
    """What the harness tunes for an APO spec (Bae et al. 2022, appendix C)."""
    adapt, _ = parse_spec(spec)
    if adapt == "precond":
        # appendix C.3-C.5's grid, extended by one value of each (0.03) to the 15 points of
        # the learning-rate x weight-decay grids, so the harness's equal budget holds
        fsd, wsd = (0.3, 0.1, 0.03), (3.0, 1.0, 0.3, 0.1, 0.03)
        return SearchSpace((Dim("lambda_fsd", fsd), Dim("lambda_wsd", wsd)))
    return SearchSpace((Dim("lambda_fsd", (0.3, 0.1, 0.03, 0.01, 0.001, 0.0001)),))
