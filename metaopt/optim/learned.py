"""The deployable product of every meta-learner: :class:`LearnedOptimizer`.

A learned optimizer is a preconditioner family's learned blocks, the base update rule
(``sgd``, ``sgdm``, ``adam``, ...), the rule's hyperparameters, the learning rate it was
meta-trained with and where the preconditioner acts (DESIGN.md seam 6).
:meth:`LearnedOptimizer.build` turns it into a :class:`~metaopt.optim.Preconditioned`
``torch.optim.Optimizer`` that runs exactly the update meta-training differentiated;
:func:`metaopt.save_learned_optimizer` / :func:`metaopt.load_optimizer` carry it in one file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from metaopt.kron.preconditioner import KroneckerPreconditioner
from metaopt.optim.preconditioned import Preconditioned
from metaopt.optim.rules import get_rule
from metaopt.optim.update import check_compose

__all__ = ["LearnedOptimizer"]


@dataclass
class LearnedOptimizer:
    """A preconditioner, an update rule and its hyperparameters: one deployable optimizer.

    Attributes:
        preconditioner: the learned blocks, or ``None`` (the plain rule, e.g. an APO-adapted
            learning rate).
        rule: a registered rule name (:data:`metaopt.optim.rules.RULES`).
        hparams: the rule's hyperparameters (all of them; see ``rule.hparams()``).
        lr: the learning rate it was meta-trained with (the default when deployed).
        compose: where the preconditioner acts, ``"gradient"`` or ``"direction"``.
    """

    preconditioner: KroneckerPreconditioner | None
    rule: str
    hparams: dict[str, Any]
    lr: float
    compose: str = "gradient"

    def __post_init__(self) -> None:
        self.hparams = get_rule(self.rule).hparams(self.hparams)
        check_compose(self.compose)
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be a positive number")
        self.lr = float(self.lr)

    def build(
        self, params: Iterable[Any], lr: float | None = None, **overrides: Any
    ) -> Preconditioned:
        """The optimizer for ``params`` (``model.named_parameters()``); ``lr`` and any rule
        hyperparameter may be overridden."""
        return Preconditioned(
            params,
            self.preconditioner,
            self.lr if lr is None else lr,
            rule=self.rule,
            compose=self.compose,
            **{**self.hparams, **overrides},
        )

    def metadata(self) -> dict[str, Any]:
        """The JSON-able description stored beside the tensors in a file."""
        hp = {k: list(v) if isinstance(v, tuple) else v for k, v in self.hparams.items()}
        return {"rule": self.rule, "hparams": hp, "lr": self.lr, "compose": self.compose}
