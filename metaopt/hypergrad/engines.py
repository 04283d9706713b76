"""The registered engines: every one is ``engine(problem, carry=None, **options)``.

======================  =====================================================================
name                    what it computes for one window (:class:`~metaopt.hypergrad.Problem`)
======================  =====================================================================
``unroll``              backpropagation through the window's steps (truncated BPTT when the
                        learner splits an inner run into windows; Werbos 1990; Wu et al.
                        2018 on its short-horizon bias)
``forward``             forward-mode: one Jacobian-vector product per meta-parameter scalar
                        (MetaMD appendix A.6; Franceschi et al. 2017): memory does not grow
                        with the window, cost grows with the number of meta-parameters
``implicit``            the implicit function theorem at the window's end (MetaMD Eq. 13),
                        with ``solve="neumann"`` (default; ``iterations``, ``alpha``),
                        ``"cg"``, ``"exact"`` or ``"closed_form"`` (the problem's own
                        closed-form pieces); ``neumann``, ``cg``, ``exact`` and
                        ``closed_form`` are aliases that fix ``solve``
``es``                  antithetic evolution strategies (Salimans et al. 2017) over the window
``pes``                 Persistent ES (Vicol, Metz & Sohl-Dickstein 2021): unbiased across the
                        windows of one inner run, its perturbations accumulated in ``carry``
======================  =====================================================================

Add your own with :func:`register_engine` (``ENGINES.register``); a learner resolves its
``engine=`` name here, so a registered engine works wherever a built-in one does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from metaopt.hypergrad.errors import NonFiniteHypergradient
from metaopt.hypergrad.es import es_grad
from metaopt.hypergrad.implicit import implicit_grad
from metaopt.hypergrad.problem import EngineResult, Problem, detached, finite, run_window
from metaopt.hypergrad.unrolled import forward_window, reverse_window
from metaopt.registry import Entry, Registry, check_options

__all__ = [
    "ENGINES",
    "Engine",
    "available_engines",
    "check_engine",
    "get_engine",
    "register_engine",
]

Engine = Callable[..., EngineResult]

#: every hypergradient engine by name
ENGINES: Registry[Engine] = Registry("engine")


def register_engine(name: str, engine: Engine, *, replace: bool = False) -> Engine:
    """Register ``engine(problem, carry=None, **options) -> EngineResult`` as ``name``."""
    if not callable(engine):
        raise ValueError(f"engine={engine!r}: must be callable")
    ENGINES.register(name, engine, replace=replace)
    return engine


def get_engine(name: str) -> Entry[Engine]:
    """The engine registered as ``name`` (an :class:`~metaopt.registry.Entry`; call
    ``entry.obj(problem, carry, **entry.options, **options)``)."""
    return ENGINES.get(name)


def available_engines() -> list[str]:
    return ENGINES.available()


def check_engine(name: str, options: Mapping[str, Any]) -> Entry[Engine]:
    """The engine ``name`` after checking ``options`` against its keywords (and its optional
    ``validate(**options)`` hook), so a learner refuses bad options at construction."""
    entry = ENGINES.get(name)
    merged = {**entry.options, **options}
    check_options(entry.obj, merged, "engine_options", supplied=("problem", "carry"), hook=True)
    return entry


def _leaves(hparams: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(h.detach().requires_grad_(True) for h in hparams)


@ENGINES.register("unroll")
def unroll(problem: Problem, carry: Any = None) -> EngineResult:
    """Reverse mode through the window: ``d E / d lambda`` of ``run_window``."""
    grads, end, value = reverse_window(
        problem.step, problem.objective, detached(problem.state), _leaves(problem.hparams),
        problem.steps, problem.steps,
    )  # fmt: skip
    return EngineResult(grads, value, end)


@ENGINES.register("forward")
def forward(problem: Problem, carry: Any = None) -> EngineResult:
    """Forward mode: tangents ``d state / d lambda`` carried through the window (one per
    meta-parameter scalar, vectorised), contracted with one reverse pass of the objective
    (:func:`~metaopt.hypergrad.unrolled_grad`'s ``mode="forward"``)."""
    grads, end, value = forward_window(
        problem.step, problem.objective, detached(problem.state),
        tuple(h.detach() for h in problem.hparams), problem.steps, problem.steps,
        "engine='forward'",
    )  # fmt: skip
    return EngineResult(grads, value, end)


@ENGINES.register("implicit")
def implicit(
    problem: Problem, carry: Any = None, *, solve: str = "neumann", **options: Any
) -> EngineResult:
    """The implicit function theorem at the window's end (MetaMD Eq. 13, Algorithm 2).

    Runs the window without a graph, then :func:`~metaopt.hypergrad.implicit_grad` on
    ``problem.inner_objective`` at the end parameters with ``method=solve``;
    ``solve="closed_form"`` uses ``problem.closed_form``."""
    if problem.inner_objective is None and not problem.closed_form:
        raise ValueError(
            "engine='implicit': the problem has no inner_objective (its learner's objective "
            "is not the stationary point of a known function); use 'unroll', 'es' or 'pes'"
        )
    hparams = _leaves(problem.hparams)
    with torch.no_grad():
        end, _ = run_window(problem, detached(problem.state), tuple(h.detach() for h in hparams))
    if not finite(problem.params(end)):
        raise NonFiniteHypergradient("inner_run", "the window's end parameters are not finite")
    pieces = dict(problem.closed_form) if solve == "closed_form" else {}
    if "inner_grad" in problem.closed_form:
        pieces.setdefault("inner_grad", problem.closed_form["inner_grad"])
    params = tuple(t.detach().requires_grad_(True) for t in problem.params(end))

    def outer(ps: tuple[Tensor, ...], hp: tuple[Tensor, ...]) -> Tensor:
        return problem.objective(problem.with_params(end, ps), hp)

    grads = implicit_grad(
        problem.inner_objective, outer, params, hparams, method=solve, **pieces, **options
    )
    with torch.no_grad():
        value = outer(params, tuple(h.detach() for h in hparams))
    return EngineResult(tuple(grads), value.detach(), detached(end))


def _validate_implicit(*, solve: str = "neumann", **options: Any) -> None:
    """Check ``implicit``'s options before any run (a bad value fails at construction)."""
    from metaopt.hypergrad.implicit import IMPLICIT_METHODS

    if solve not in IMPLICIT_METHODS:
        raise ValueError(
            f"engine_options['solve']={solve!r}: choose one of {list(IMPLICIT_METHODS)}"
        )
    iterations = options.get("iterations", 1)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"engine_options['iterations']={iterations!r}: must be an integer >= 1")
    for name in ("alpha", "tol"):
        value = options.get(name, 1.0)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not value > 0):  # fmt: skip
            raise ValueError(f"engine_options[{name!r}]={value!r}: must be a positive number")


implicit.validate = _validate_implicit  # type: ignore[attr-defined]

for _solve in ("neumann", "cg", "exact", "closed_form"):
    ENGINES.alias(_solve, "implicit", solve=_solve)


ENGINES.register("es", es_grad)
ENGINES.alias("pes", "es", persistent=True)
