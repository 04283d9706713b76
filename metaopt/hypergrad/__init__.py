"""Hypergradient engines behind one seam (:class:`Problem` in, :class:`EngineResult` out).

* :data:`ENGINES` / :func:`get_engine` / :func:`register_engine`: engines by name
  (``unroll``, ``forward``, ``implicit`` and its solver aliases ``neumann``, ``cg``,
  ``exact``, ``closed_form``, ``es``, ``pes``); every learner resolves ``engine=`` here.
* The building blocks, usable on their own: :func:`implicit_grad` (the implicit function
  theorem; its linear solver is ``method=``), :func:`unrolled_grad` (through ``steps``
  applications of a step map, reverse or forward mode), :func:`es_grad` / :func:`pes_grad`,
  :func:`higher_grad` (unrolls a real ``torch.optim`` optimizer with ``higher``, an optional
  dependency) and :func:`check_hypergradient` (central finite differences in float64).
* :class:`NonFiniteHypergradient` — raised with ``.term`` naming the non-finite term.
"""

from metaopt.hypergrad.check import check_hypergradient, finite_difference_grad
from metaopt.hypergrad.engines import ENGINES, available_engines, get_engine, register_engine
from metaopt.hypergrad.errors import NonFiniteHypergradient
from metaopt.hypergrad.es import es_grad, pes_grad
from metaopt.hypergrad.higher_engine import higher_grad
from metaopt.hypergrad.implicit import IMPLICIT_METHODS, implicit_grad
from metaopt.hypergrad.linalg import cg_solve, neumann_solve
from metaopt.hypergrad.problem import EngineResult, Problem, run_window
from metaopt.hypergrad.unrolled import unrolled_grad

__all__ = [
    "ENGINES",
    "IMPLICIT_METHODS",
    "EngineResult",
    "NonFiniteHypergradient",
    "Problem",
    "available_engines",
    "cg_solve",
    "check_hypergradient",
    "es_grad",
    "finite_difference_grad",
    "get_engine",
    "higher_grad",
    "implicit_grad",
    "neumann_solve",
    "pes_grad",
    "register_engine",
    "run_window",
    "unrolled_grad",
]
