"""Families and KroneckerPreconditioner against dense float64 oracles built here from torch.kron."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from metaopt.kron import KroneckerPreconditioner, make_family
from tests._kron import randomize, vec

torch.set_default_dtype(torch.float32)
F64 = torch.float64


def _lowrank(shape, rank, learn_scale=False, seed=0):
    fam = make_family("lowrank", shape, rank=rank, learn_scale=learn_scale).double()
    randomize(fam, 0.7, seed)
    return fam


def _oracle_forward(fam):
    """c * kron(B, A) with A = I + U U^T, B = I + V V^T, built independently of the family."""
    U, V = fam.U.detach(), fam.V.detach()
    A = torch.eye(U.shape[0], dtype=F64) + U @ U.T
    B = torch.eye(V.shape[0], dtype=F64) + V @ V.T
    c = fam.log_scale.detach().exp() if fam.learn_scale else torch.tensor(1.0, dtype=F64)
    return c * torch.kron(B, A)


# --- per-family dense oracles -------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4), (5, 2), (1, 6)])
def test_ekfac_direction_matches_dense_formula(shape):
    fam = make_family("ekfac-shaped", shape).double()
    randomize(fam)
    A, B, S = fam.A.detach(), fam.B.detach(), fam.S.detach()
    C = torch.kron(B, A)
    P = C @ torch.diag(S.reshape(-1) ** 2) @ C.T
    G = torch.randn(shape, dtype=F64)
    torch.testing.assert_close(fam.apply(G).reshape(-1), P @ G.reshape(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fam.dense(), P)


@pytest.mark.parametrize("learn_scale", [False, True])
@pytest.mark.parametrize(("shape", "rank"), [((3, 4), 1), ((5, 6), 2), ((4, 4), 4), ((2, 7), 2)])
def test_lowrank_matches_dense_inverse_and_identities(shape, rank, learn_scale):
    fam = _lowrank(shape, rank, learn_scale)
    if learn_scale:
        with torch.no_grad():
            fam.log_scale.fill_(0.3)
    M = _oracle_forward(fam)
    Minv = torch.linalg.inv(M)
    G = torch.randn(shape, dtype=F64)
    torch.testing.assert_close(fam.apply(G).reshape(-1), Minv @ G.reshape(-1))
    torch.testing.assert_close(fam.dense(), Minv)
    D = torch.randn(shape, dtype=F64)
    d = D.reshape(-1)
    torch.testing.assert_close(fam.bregman(D), 0.5 * d @ M @ d)
    torch.testing.assert_close(fam.min_eigenvalue(), torch.linalg.eigvalsh(M).min())
    eye = torch.eye(M.shape[0], dtype=F64)
    torch.testing.assert_close(
        fam.squared_distance_to_identity(), torch.linalg.matrix_norm(M - eye) ** 2
    )


def test_min_eigenvalue_of_identity_plus_low_rank_is_one():
    """For rank < dim, I + U U^T has eigenvalue exactly 1 (U U^T is singular)."""
    fam = _lowrank((6, 5), 2)
    A = torch.eye(5, dtype=F64) + fam.U.detach() @ fam.U.detach().T
    assert torch.linalg.eigvalsh(A).min().item() == pytest.approx(1.0, abs=1e-12)
    assert fam.min_eigenvalue().item() == pytest.approx(1.0, abs=1e-12)
    # ... and rank == dim of a factor lifts it above 1
    full = _lowrank((3, 3), 3)
    assert full.min_eigenvalue().item() > 1.0


@pytest.mark.parametrize("family", ["diag", "scalar"])
def test_diag_and_scalar_families(family):
    fam = make_family(family, (3, 4)).double()
    randomize(fam)
    s = fam.log_scale.detach().exp()
    P = torch.diag(s.expand(3, 4).reshape(-1))
    G = torch.randn(3, 4, dtype=F64)
    torch.testing.assert_close(fam.apply(G).reshape(-1), P @ G.reshape(-1))
    torch.testing.assert_close(fam.dense(), P)
    M = torch.linalg.inv(P)
    D = torch.randn(3, 4, dtype=F64)
    torch.testing.assert_close(fam.bregman(D), 0.5 * D.reshape(-1) @ M @ D.reshape(-1))
    torch.testing.assert_close(fam.min_eigenvalue(), torch.linalg.eigvalsh(M).min())
    torch.testing.assert_close(
        fam.squared_distance_to_identity(),
        torch.linalg.matrix_norm(M - torch.eye(12, dtype=F64)) ** 2,
    )


def test_families_start_at_identity():
    for family in ["ekfac-shaped", "diag", "scalar"]:
        fam = make_family(family, (3, 4))
        G = torch.randn(3, 4)
        assert torch.equal(fam.apply(G), G), family
    fam = make_family("lowrank", (3, 4), init_scale=0.0)
    G = torch.randn(3, 4)
    assert torch.equal(fam.apply(G), G)


def test_lowrank_rank_errors():
    with pytest.raises(
        ValueError, match=r"layer 'fc': rank=5 is larger than a 3x4 block allows .at most 3"
    ):
        make_family("lowrank", (3, 4), rank=5, name="fc")
    with pytest.raises(ValueError, match="rank=0"):
        make_family("lowrank", (3, 4), rank=0)
    with pytest.raises(ValueError, match="family='nope' is unknown"):
        make_family("nope", (3, 4))


@settings(max_examples=25, deadline=None)
@given(
    out_dim=st.integers(1, 6),
    in_dim=st.integers(1, 6),
    rank=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_property_lowrank_apply_inverts_forward(out_dim, in_dim, rank, seed):
    rank = min(rank, out_dim, in_dim)
    fam = _lowrank((out_dim, in_dim), rank, seed=seed)
    M = _oracle_forward(fam)
    G = torch.randn(out_dim, in_dim, dtype=F64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(M @ fam.apply(G).reshape(-1), G.reshape(-1), rtol=1e-9, atol=1e-9)
    eig = torch.linalg.eigvalsh(fam.dense())
    assert eig.min() > 0


@settings(max_examples=25, deadline=None)
@given(out_dim=st.integers(1, 5), in_dim=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_property_ekfac_dense_is_symmetric_psd(out_dim, in_dim, seed):
    fam = make_family("ekfac-shaped", (out_dim, in_dim)).double()
    randomize(fam, 1.0, seed)
    P = fam.dense()
    torch.testing.assert_close(P, P.T)
    assert torch.linalg.eigvalsh(P).min() > -1e-9 * P.abs().max()


# --- the whole preconditioner --------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 4),
        nn.Linear(4, 3, bias=False),
    ).double()


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("ekfac-shaped", {}),
        ("lowrank", {"rank": 2}),
        ("rank1", {}),
        ("diag", {}),
        ("scalar", {}),
        ("lowrank", {"learn_scale": True}),
    ],
)
def test_preconditioner_apply_equals_dense(family, options):
    model = _model()
    pre = KroneckerPreconditioner.for_model(model, family, **options).double()
    randomize(pre, 0.4)
    names = [n for n, _ in model.named_parameters()]
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    out = pre.apply(grads)
    P = pre.dense()
    torch.testing.assert_close(vec(out, names), P @ vec(grads, names))
    for _ in range(2):  # lowrank's cached-factor path must agree (and its cache be reused)
        got = pre.apply(grads, meta_constant=True)
        torch.testing.assert_close(vec(got, names), P @ vec(grads, names))
    torch.testing.assert_close(P, P.T)
    assert torch.linalg.eigvalsh(P).min() > -1e-9
    assert pre.num_meta_parameters() == sum(p.numel() for p in pre.parameters())


def test_preconditioner_skip_is_identity_and_lowrank_identities_match_dense():
    model = _model()
    pre = KroneckerPreconditioner.for_model(model, "lowrank", rank=1, skip=r"^5\.").double()
    randomize(pre, 0.6)
    names = [n for n, _ in model.named_parameters()]
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    out = pre.apply(grads)
    for n in ("5.weight", "5.bias"):
        assert torch.equal(out[n], grads[n])
    P = pre.dense()
    M = torch.linalg.inv(P)
    theta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    ref = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    d = vec(theta, names) - vec(ref, names)
    torch.testing.assert_close(pre.bregman(theta, ref), 0.5 * d @ M @ d)
    # lambda and ||M - I||_F are over the covered (non-skipped) blocks
    covered = torch.tensor(
        [
            not n.startswith("5.")
            for n in names
            for _ in range(dict(model.named_parameters())[n].numel())
        ]
    )
    Mc = M[covered][:, covered]
    torch.testing.assert_close(pre.min_eigenvalue(), torch.linalg.eigvalsh(Mc).min())
    torch.testing.assert_close(
        pre.frobenius_distance_to_identity(),
        torch.linalg.matrix_norm(Mc - torch.eye(Mc.shape[0], dtype=F64)),
    )


@pytest.mark.parametrize(
    ("family", "options"),
    [("rank1", {}), ("lowrank", {"rank": 2, "learn_scale": True}), ("diag", {}), ("scalar", {})],
)
def test_preconditioner_metric_apply_equals_inverse_of_dense(family, options):
    """``metric_apply(v) = M v`` with ``M = inv(dense())`` (skipped parameters: identity)."""
    model = _model()
    pre = KroneckerPreconditioner.for_model(model, family, skip=r"^5\.", **options).double()
    randomize(pre, 0.5)
    names = [n for n, _ in model.named_parameters()]
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    got = pre.metric_apply(v)
    want = torch.linalg.solve(pre.dense(), vec(v, names))
    torch.testing.assert_close(vec(got, names), want)


def test_identities_refused_for_ekfac():
    pre = KroneckerPreconditioner.for_model(_model(), "ekfac-shaped")
    with pytest.raises(ValueError, match="has no metric M"):
        pre.min_eigenvalue()
    with pytest.raises(ValueError, match="has no metric M"):
        pre.metric_apply({n: p for n, p in _model().named_parameters()})


@pytest.mark.parametrize("family", ["ekfac-shaped", "lowrank", "diag", "scalar"])
def test_meta_gradient_matches_finite_differences(family):
    """d/dphi of a scalar function of apply(g): autograd vs central differences (gradcheck)."""
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(8, 2)).double()
    pre = KroneckerPreconditioner.for_model(model, family).double()
    randomize(pre, 0.3)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    weights = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    names = [n for n, _ in pre.named_parameters()]

    def f(*meta):
        out = torch.func.functional_call(pre, dict(zip(names, meta, strict=True)), (grads,))
        return sum((torch.tanh(out[n]) * weights[n]).sum() for n in out)

    meta = tuple(p.detach().clone().requires_grad_(True) for p in pre.parameters())
    assert torch.autograd.gradcheck(f, meta, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_bf16_gradient_with_fp32_preconditioner():
    model = nn.Linear(6, 4)
    pre = KroneckerPreconditioner.for_model(model, "rank1")
    randomize(pre, 0.5)
    g32 = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    g16 = {n: g.bfloat16() for n, g in g32.items()}
    out16 = pre.apply(g16)
    assert all(v.dtype == torch.bfloat16 for v in out16.values())
    ref = pre.apply({n: g.float() for n, g in g16.items()})
    for n in ref:
        torch.testing.assert_close(out16[n].float(), ref[n], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "family, shape, options",
    [
        ("lowrank", (4, 5), {"rank": 1}),
        ("lowrank", (6, 3), {"rank": 2, "learn_scale": True}),
        ("lowrank", (3, 3), {"rank": 3}),
        ("diag", (2, 5), {}),
        ("scalar", (3, 4), {}),
    ],
)
def test_metric_mixed_matches_dense_oracle_and_autograd(family, shape, options):
    """``metric_mixed(X, D) = d/d phi <X, M(phi) D>`` against autograd of the dense
    ``x^T inv(P) d`` (float64) and against autograd of ``<X, metric_apply(D)>``."""
    fam = make_family(family, shape, **options).double()
    randomize(fam, 0.7, seed=3)
    g = torch.Generator().manual_seed(4)
    X, D = (torch.randn(shape, generator=g, dtype=F64) for _ in range(2))
    got = fam.metric_mixed([X], [D])
    if family != "diag":  # as column blocks (a layer with a bias column): the same
        cut = shape[1] - 1
        blocks = fam.metric_mixed([X[:, :cut], X[:, cut:]], [D[:, :cut], D[:, cut:]])
        for a, b in zip(blocks, got, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    params = tuple(fam.parameters())
    M = torch.linalg.inv(fam.dense())  # the metric M = P^-1, from the family's dense P
    want = torch.autograd.grad(X.reshape(-1) @ M @ D.reshape(-1), params)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if family == "lowrank":
        auto = torch.autograd.grad((X * fam.metric_apply(D)).sum(), params)
        for a, b in zip(got, auto, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # <X, M D> = <D, M X> (M symmetric): swapping the arguments must not change it
    for a, b in zip(fam.metric_mixed([D], [X]), got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "family, shape, options",
    [
        ("lowrank", (4, 5), {"rank": 1}),
        ("lowrank", (6, 3), {"rank": 2, "learn_scale": True}),
        ("lowrank", (5, 7), {"rank": 4, "learn_scale": True}),
        ("diag", (2, 5), {}),
        ("scalar", (3, 4), {}),
    ],
)
def test_metric_inverse_mixed_matches_dense_oracle(family, shape, options):
    """``metric_inverse_mixed(V, D) = d/d phi <M0^{-1} v, M(phi) D>`` with ``M0^{-1}``
    held constant: against autograd of the dense ``(P0 v)^T inv(P(phi)) d`` (float64),
    whole and as column blocks (a layer with a bias column)."""
    fam = make_family(family, shape, **options).double()
    randomize(fam, 0.7, seed=8)
    g = torch.Generator().manual_seed(9)
    v, D = (torch.randn(shape, generator=g, dtype=F64) for _ in range(2))
    params = tuple(fam.parameters())
    with torch.no_grad():
        x = fam.dense() @ v.reshape(-1)  # M0^{-1} v, a constant
    want = torch.autograd.grad(x @ torch.linalg.inv(fam.dense()) @ D.reshape(-1), params)
    got = fam.metric_inverse_mixed([v], [D])
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if family != "diag":
        cut = shape[1] - 1
        blocks = fam.metric_inverse_mixed([v[:, :cut], v[:, cut:]], [D[:, :cut], D[:, cut:]])
        for a, b in zip(blocks, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _conv_bn_bregman_case(learn_scale, seed):
    """A lowrank preconditioner (rank 2) on a conv / BatchNorm / linear model whose last
    layer is skipped, with random meta-parameters (``seed``), a reference point, a point
    ``theta`` and a random vector ``x`` (``seed + 1``), all float64."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 2)
    ).double()
    pre = KroneckerPreconditioner.for_model(
        model, "lowrank", rank=2, learn_scale=learn_scale, skip=r"^4\."
    ).double()
    randomize(pre, 0.5, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    theta = {n: r + torch.randn(r.shape, generator=g, dtype=F64) for n, r in ref.items()}
    x = {n: torch.randn(r.shape, generator=g, dtype=F64) for n, r in ref.items()}
    return pre, ref, theta, x


def _mixed_by_double_backward(pre, x, theta, ref):
    """The oracle: d/d phi of <x, d_theta B_M(theta, ref)> by autograd (zeros if unused)."""
    th = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    gth = torch.autograd.grad(pre.bregman(th, ref), list(th.values()), create_graph=True)
    inner = sum((x[n] * gi).sum() for n, gi in zip(th, gth, strict=True))
    metas = tuple(pre.parameters())
    want = torch.autograd.grad(inner, metas, allow_unused=True)
    return [torch.zeros_like(p) if w is None else w for p, w in zip(metas, want, strict=True)]


def test_preconditioner_bregman_inverse_mixed_matches_autograd_of_bregman():
    """Whole-model fused term against the double backward it replaces:
    d/d phi of <stopgrad(M^{-1} v), d_theta B_M(theta, ref)> (bias columns, BatchNorm diag
    blocks, a skipped layer), with and without a learnable scale."""
    for learn_scale in (False, True):
        pre, ref, theta, v = _conv_bn_bregman_case(learn_scale, seed=7)
        with torch.no_grad():
            x = pre.apply(v)
        want = _mixed_by_double_backward(pre, x, theta, ref)
        got = pre.bregman_inverse_mixed(v, theta, ref)
        for (pname, _), a, b in zip(pre.named_parameters(), got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=pname)


def test_preconditioner_bregman_mixed_matches_autograd_of_bregman():
    """Whole-model mixed product (bias columns, BatchNorm diag blocks, a skipped layer)
    against the double backward it replaces: d/d phi of <x, d_theta B_M(theta, ref)>."""
    pre, ref, theta, x = _conv_bn_bregman_case(learn_scale=True, seed=5)
    got = pre.bregman_mixed(x, theta, ref)
    want = _mixed_by_double_backward(pre, x, theta, ref)
    for (pname, _), a, b in zip(pre.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=pname)
