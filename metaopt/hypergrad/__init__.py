"""Hypergradient engines behind one interface (issue 3).

* :func:`implicit_grad` — implicit function theorem at a stationary point: ``"exact"``,
  ``"neumann"``, ``"cg"``, ``"closed_form"``.
* :func:`unrolled_grad` — through ``steps`` applications of a step map, reverse or forward
  mode, optionally truncated.
* :func:`higher_grad` — unrolls a real ``torch.optim`` optimizer with ``higher``.
* :func:`check_hypergradient` — central finite differences in float64.
* :func:`get_engine` / :func:`available_engines` — the same engines by name.
* :class:`NonFiniteHypergradient` — raised with ``.term`` naming the non-finite term.
"""

from metaopt.hypergrad.check import check_hypergradient, finite_difference_grad
from metaopt.hypergrad.errors import NonFiniteHypergradient
from metaopt.hypergrad.higher_engine import higher_grad
from metaopt.hypergrad.implicit import IMPLICIT_METHODS, implicit_grad
from metaopt.hypergrad.linalg import cg_solve, neumann_solve
from metaopt.hypergrad.registry import Engine, available_engines, get_engine, register_engine
from metaopt.hypergrad.unrolled import unrolled_grad

__all__ = [
    "IMPLICIT_METHODS",
    "Engine",
    "NonFiniteHypergradient",
    "available_engines",
    "cg_solve",
    "check_hypergradient",
    "finite_difference_grad",
    "get_engine",
    "higher_grad",
    "implicit_grad",
    "neumann_solve",
    "register_engine",
    "unrolled_grad",
]
