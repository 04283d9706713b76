"""The family contract, checked for every registered preconditioner family.

On a model with a Linear, a Conv2d, a BatchNorm and a lone parameter, every family in
``FAMILIES.available()``:

* starts at the identity, ``P ~ I`` at its default options;
* has ``dense()`` equal to an oracle built here from ``torch.kron``, and ``apply`` equal to
  ``dense() @ vec(g)`` (block by block and for the whole preconditioner);
* is differentiable wherever the contract says so (``apply``, ``apply_blocks``,
  ``metric_apply``, ``bregman``, ``min_eigenvalue``, ``squared_distance_to_identity``):
  ``torch.autograd.gradcheck`` in float64 against central differences;
* accumulates in place as ``beta * t + alpha * apply(g)``;
* refuses keyword options it does not take, naming the bad one and the allowed ones;
* when it has a metric, gives ``metric_apply(v) = inv(dense()) v``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

from metaopt.kron import (
    FAMILIES,
    DiagFamily,
    EKFACFamily,
    Family,
    KroneckerPreconditioner,
    LowRankFamily,
    ScalarFamily,
    family_options,
    make_family,
    register_family,
)
from tests._kron import randomize, vec

F64 = torch.float64
NAMES = FAMILIES.available()

# lowrank's default init_scale = 1e-3 draws U, V with E ||U||_F^2 = rank * 1e-6, and
# ||P - I||_2 <= ||A - I|| + ||B - I|| + ||A - I|| ||B - I|| with ||A - I||_2 = ||U||_2^2
# <= ||U||_F^2, so the distance to I is ~2e-6; 1e-4 is 50 times that (a chi-square draw
# that far above its mean has probability below 1e-11). The other families are exact.
IDENTITY_ATOL = 1e-4


class _Net(nn.Module):
    """A conv, a BatchNorm (diag views), a linear layer and a lone parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 2)  # view 2 x (1*2*2 + 1)
        self.bn = nn.BatchNorm2d(2)  # weight and bias: 1 x 2 diag views
        self.fc = nn.Linear(3, 4)  # view 4 x (3 + 1)
        self.gain = nn.Parameter(torch.ones(3))  # lone parameter: a 1 x 3 diag view


def _preconditioner(name: str, seed: int | None = 1) -> tuple[nn.Module, KroneckerPreconditioner]:
    model = _Net().double()
    pre = KroneckerPreconditioner.for_model(model, name).double()
    if seed is not None:
        randomize(pre, 0.4, seed)
    return model, pre


def _oracle(fam: Family) -> Tensor:
    """Dense ``P`` (row-major vec) from the family's meta-parameters, via ``torch.kron``."""
    out_dim, in_dim = fam.shape
    if isinstance(fam, EKFACFamily):
        C = torch.kron(fam.B.detach(), fam.A.detach())
        return C @ torch.diag((fam.S.detach() ** 2).reshape(-1)) @ C.T
    if isinstance(fam, LowRankFamily):
        U, V = fam.U.detach(), fam.V.detach()
        A = torch.eye(in_dim, dtype=F64) + U @ U.T
        B = torch.eye(out_dim, dtype=F64) + V @ V.T
        c = fam.log_scale.detach().exp() if fam.learn_scale else torch.ones((), dtype=F64)
        return torch.linalg.inv(c * torch.kron(B, A))
    if isinstance(fam, DiagFamily):
        return torch.diag(fam.log_scale.detach().exp().reshape(-1))
    if isinstance(fam, ScalarFamily):
        return fam.log_scale.detach().exp() * torch.eye(out_dim * in_dim, dtype=F64)
    raise AssertionError(f"{type(fam).__name__}: add its dense oracle to this test")


def _blocks(pre: KroneckerPreconditioner) -> list[tuple[str, Family]]:
    return [(v.name, pre.block(v)) for v in pre.views]


# --- identity at init, dense oracle ------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_starts_at_the_identity(name: str) -> None:
    _, pre = _preconditioner(name, seed=None)
    P = pre.dense()
    torch.testing.assert_close(P, torch.eye(P.shape[0], dtype=F64), rtol=0, atol=IDENTITY_ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_apply_equals_the_dense_kron_oracle(name: str) -> None:
    model, pre = _preconditioner(name)
    g = torch.Generator().manual_seed(2)
    for view_name, fam in _blocks(pre):
        P = _oracle(fam)
        torch.testing.assert_close(fam.dense(), P, msg=view_name)
        G = torch.randn(fam.shape, generator=g, dtype=F64)
        torch.testing.assert_close(fam.apply(G).reshape(-1), P @ G.reshape(-1), msg=view_name)
    names = [n for n, _ in model.named_parameters()]
    grads = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in model.named_parameters()}
    torch.testing.assert_close(vec(pre.apply(grads), names), pre.dense() @ vec(grads, names))


# --- differentiability -------------------------------------------------------------------
class _Method(nn.Module):
    """``family.<method>(*inputs)`` as a module, so ``functional_call`` can swap its
    meta-parameters for gradcheck's inputs."""

    def __init__(self, fam: Family, method: str) -> None:
        super().__init__()
        self.fam = fam
        self.method = method

    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        fn = getattr(self.fam, self.method)
        if self.method == "apply_blocks":
            return tuple(fn(list(inputs)))
        return fn(*inputs)


def _differentiable_calls(fam: Family, g: torch.Generator) -> list[tuple[str, tuple[Tensor, ...]]]:
    X = torch.randn(fam.shape, generator=g, dtype=F64)
    cut = max(fam.shape[1] // 2, 1)
    calls = [
        ("apply", (X,)),
        ("apply_blocks", (X[:, :cut], X[:, cut:]) if cut < fam.shape[1] else (X,)),
    ]
    if fam.has_metric:
        calls += [
            ("metric_apply", (X,)),
            ("bregman", (X,)),
            ("min_eigenvalue", ()),
            ("squared_distance_to_identity", ()),
        ]
    return calls


def _gradcheck(fam: Family, method: str, args: tuple[Tensor, ...]) -> bool:
    """gradcheck of ``fam.<method>(*args)`` in the meta-parameters and ``args`` at once."""
    wrapper = _Method(fam, method)
    pnames = [n for n, _ in wrapper.named_parameters()]
    metas = tuple(p.detach().clone().requires_grad_(True) for p in wrapper.parameters())
    inputs = tuple(a.clone().requires_grad_(True) for a in args)

    def f(*xs: Tensor) -> tuple[Tensor, ...]:
        params = dict(zip(pnames, xs[: len(pnames)], strict=True))
        out = torch.func.functional_call(wrapper, params, xs[len(pnames) :])
        outs = out if isinstance(out, tuple) else (out,)
        # a value constant in every input (lowrank's lambda_min(I + U U^T) = 1 for
        # rank < dim) still goes through gradcheck: its numerical derivative must be 0
        anchor = sum((x * 0).sum() for x in xs)
        return tuple(o + anchor for o in outs)

    return torch.autograd.gradcheck(f, metas + inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_documented_differentiable_methods_pass_gradcheck(name: str) -> None:
    _, pre = _preconditioner(name, seed=3)
    g = torch.Generator().manual_seed(4)
    for view_name, fam in _blocks(pre):
        for method, args in _differentiable_calls(fam, g):
            assert _gradcheck(fam, method, args), f"{name} {view_name}: {method}"


# --- in-place accumulation ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("alpha", "beta"), [(1.0, 1.0), (-0.3, 1.0), (1.0, 0.9), (-0.3, 0.9), (1.0, 0.0), (-0.3, 0.0)]
)
@pytest.mark.parametrize("name", NAMES)
def test_accumulate_is_beta_t_plus_alpha_apply(name: str, alpha: float, beta: float) -> None:
    _, pre = _preconditioner(name, seed=5)
    g = torch.Generator().manual_seed(6)
    for view_name, fam in _blocks(pre):
        G = torch.randn(fam.shape, generator=g, dtype=F64)
        sizes = [fam.shape[1]] if fam.shape[1] < 2 else [fam.shape[1] - 1, 1]
        grads = list(G.split(sizes, dim=1))
        targets = [torch.randn(t.shape, generator=g, dtype=F64) for t in grads]
        if beta == 0.0:  # beta 0 overwrites a scratch target without reading it
            targets = [torch.full_like(t, float("nan")) for t in targets]
        want = [
            (0.0 if beta == 0.0 else beta * t) + alpha * d
            for t, d in zip(targets, fam.apply(G).split(sizes, 1), strict=True)
        ]
        for _ in range(2):  # a second call reuses the families' cached factors
            got = [t.clone() for t in targets]
            fam.accumulate_(got, grads, alpha, beta)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, msg=view_name)


# --- strict options ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_are_refused_naming_the_allowed_ones(name: str) -> None:
    allowed = family_options(name)
    assert "init_scal" not in allowed
    message = f"family '{name}': unknown option(s) ['init_scal']; its options are {allowed}"
    with pytest.raises(ValueError, match=re.escape(message)):
        KroneckerPreconditioner.for_model(_Net(), name, init_scal=0.1)
    with pytest.raises(ValueError, match="init_scal"):
        make_family(name, (3, 4), init_scal=0.1)


def test_rank1_is_lowrank_with_rank_one_declared_once() -> None:
    entry = FAMILIES.get("rank1")
    assert entry.obj is LowRankFamily and dict(entry.options) == {"rank": 1}
    _, pre = _preconditioner("rank1", seed=None)
    assert all(fam.rank == 1 for _, fam in _blocks(pre) if isinstance(fam, LowRankFamily))
    with pytest.raises(ValueError, match="family 'rank1' fixes rank=1; got rank=2"):
        KroneckerPreconditioner.for_model(_Net(), "rank1", rank=2)
    assert KroneckerPreconditioner.for_model(_Net(), "lowrank", rank=2).blocks["fc"].rank == 2


def test_diag_views_of_other_families_get_default_diag_blocks() -> None:
    """Options belong to the named family; its diag views get the fallback's defaults."""
    pre = KroneckerPreconditioner.for_model(_Net(), "lowrank", rank=2, init_scale=0.5)
    kinds = {v.name: type(pre.block(v)) for v in pre.views}
    assert kinds == {
        "conv": LowRankFamily,
        "bn.weight": DiagFamily,
        "bn.bias": DiagFamily,
        "fc": LowRankFamily,
        "gain": DiagFamily,
    }
    assert torch.equal(pre.blocks["bn__weight"].log_scale, torch.zeros(1, 2))
    scalar = KroneckerPreconditioner.for_model(_Net(), "scalar", init_scale=0.5)
    assert {type(b) for b in scalar.blocks.values()} == {ScalarFamily}
    assert all(float(b.log_scale.detach()) != 0.0 for b in scalar.blocks.values())


# --- metric families ---------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_metric_apply_is_the_inverse_of_dense(name: str) -> None:
    model, pre = _preconditioner(name, seed=7)
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(8)
    v = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in model.named_parameters()}
    if not all(fam.has_metric for _, fam in _blocks(pre)):
        with pytest.raises(ValueError, match="has no metric"):
            pre.metric_apply(v)
        return
    want = torch.linalg.solve(pre.dense(), vec(v, names))
    torch.testing.assert_close(vec(pre.metric_apply(v), names), want)


# --- a user's family ---------------------------------------------------------------------
class _LayerScale(Family):
    """``P = exp(s) I`` with one learned ``s`` per block: a minimal user family."""

    def __init__(self, shape: tuple[int, int], *, start: float = 0.0) -> None:
        super().__init__(shape)
        self.s = nn.Parameter(torch.full((), float(start)))

    def _direction(self, grad: Tensor, dtype: torch.dtype) -> Tensor:
        return self._p(self.s.exp(), dtype) * grad

    def dense(self) -> Tensor:
        return self.s.exp() * torch.eye(self.shape[0] * self.shape[1], dtype=self.s.dtype)


def test_a_user_family_is_registered_once_and_built_by_name() -> None:
    try:
        register_family("test-layer-scale", _LayerScale)
        assert "test-layer-scale" in FAMILIES.available()
        pre = KroneckerPreconditioner.for_model(_Net(), "test-layer-scale", start=0.5)
        assert type(pre.blocks["fc"]) is _LayerScale and float(pre.blocks["fc"].s.detach()) == 0.5
        assert type(pre.blocks["gain"]) is DiagFamily  # its diag views: the default fallback
        with pytest.raises(ValueError, match="'test-layer-scale' is already registered"):
            register_family("test-layer-scale", _LayerScale)
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\].*\['start'\]"):
            KroneckerPreconditioner.for_model(_Net(), "test-layer-scale", rank=2)
        with pytest.raises(ValueError, match="not a Family subclass"):
            register_family("test-not-a-family", nn.Linear)  # type: ignore[arg-type]
    finally:
        if "test-layer-scale" in FAMILIES:
            FAMILIES.unregister("test-layer-scale")
