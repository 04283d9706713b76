"""MetaMD's lowrank Kronecker family: ``M = c (A kron B)``, ``A = I + U U^T``, ``B = I + V V^T``.

The direction ``M^{-1} g = B^{-1} G A^{-1} / c`` goes through Woodbury (Sherman-Morrison at
rank 1) in ``O(r out in)``; ``bregman``, ``min_eigenvalue`` and
``squared_distance_to_identity`` use the identities of MetaMD appendix A.4-A.5 without
forming ``M``. The deploy optimizer's in-place hot path (``accumulate_``) writes its thin
factors into a cached workspace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from metaopt.kron.family_base import Family, decay_

__all__ = ["LowRankFamily"]


class LowRankFamily(Family):
    """MetaMD's ``M = c (A kron B)`` with ``A = I + U U^T``, ``B = I + V V^T`` (paper order).

    In metaopt's row-major vec the metric (of the Bregman potential
    ``1/2 theta^T M theta``) is ``M = c * kron(B, A)``; the preconditioner is
    ``P = M^{-1}``, the direction ``M^{-1} g = B^{-1} G A^{-1} / c``.

    Args:
        shape: ``(out, in)``.
        rank: ``r`` (columns of ``U`` and ``V``); must not exceed ``min(out, in)``.
        learn_scale: add a learnable ``c = exp(log_scale)`` (default ``False``, ``c = 1``).
        init_scale: ``U, V ~ N(0, init_scale^2 / dim)`` so that ``||U||_F ~ init_scale``.
            Exactly zero is the identity but is a stationary point of every objective in
            ``U U^T`` (the gradient ``2 sym(dA) U`` vanishes), so the default ``1e-3``
            starts a hair away from the identity.
    """

    has_metric = True

    def __init__(
        self,
        shape: tuple[int, int],
        *,
        rank: int = 1,
        learn_scale: bool = False,
        init_scale: float = 1e-3,
    ) -> None:
        super().__init__(shape)
        out_dim, in_dim = self.shape
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r}: must be a positive integer")
        if rank > min(out_dim, in_dim):
            raise ValueError(
                f"rank={rank} is larger than a {out_dim}x{in_dim} block allows "
                f"(at most {min(out_dim, in_dim)})"
            )
        self.rank = rank
        self.learn_scale = learn_scale
        self.U = nn.Parameter(torch.randn(in_dim, rank) * (init_scale / math.sqrt(in_dim)))
        self.V = nn.Parameter(torch.randn(out_dim, rank) * (init_scale / math.sqrt(out_dim)))
        if learn_scale:
            self.log_scale = nn.Parameter(torch.zeros(()))

    # --- factors -------------------------------------------------------------------------
    def factor_A(self) -> Tensor:
        """``A = I + U U^T`` (in x in)."""
        return _identity_plus(self.U)

    def factor_B(self) -> Tensor:
        """``B = I + V V^T`` (out x out)."""
        return _identity_plus(self.V)

    def scale(self) -> Tensor:
        if self.learn_scale:
            return self.log_scale.exp()
        return torch.ones((), dtype=self.U.dtype, device=self.U.device)

    # --- action ------------------------------------------------------------------------
    def woodbury_factors(
        self, blocks: list[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, list[Tensor]]:
        """``L`` (out x 2r) and ``R_i`` (k_i x 2r) with ``B^{-1} G A^{-1} = G - L R^T``.

        ``G = [blocks[0] | blocks[1] | ...]`` (column blocks, ``R = [R_0; R_1; ...]``).
        With ``alpha = (I_r + U^T U)^{-1}``, ``beta = (I_r + V^T V)^{-1}`` (Woodbury),
        ``p = G U``, ``q = V^T G`` and ``s = V^T p``::

            (I - V beta V^T) G (I - U alpha U^T) = G - [(p - V beta s) alpha] U^T - (V beta) q

        so ``L = [(p - V beta s) alpha | V beta]`` and ``R = [U | q^T]``. Only ``r x r``
        systems are solved; the cost is ``O(r * out * in)``.
        """
        U, V = self._p(self.U, dtype), self._p(self.V, dtype)
        if self.rank == 1:  # Sherman-Morrison: 1 x 1 "inverses" without a solver call
            alpha, beta = 1 / (1 + U.T @ U), 1 / (1 + V.T @ V)
        else:
            eye = torch.eye(self.rank, dtype=dtype, device=U.device)
            alpha = torch.linalg.inv(eye + U.T @ U)  # r x r
            beta = torch.linalg.inv(eye + V.T @ V)
        U_parts = U.split([b.shape[1] for b in blocks], dim=0)
        p = sum(b @ u for b, u in zip(blocks, U_parts, strict=True))  # out x r
        q_parts = [V.T @ b for b in blocks]  # r x k_i
        V_beta = V @ beta
        L = torch.cat([(p - V_beta @ (V.T @ p)) @ alpha, V_beta], dim=1)
        R = [torch.cat([u, q.T], dim=1) for u, q in zip(U_parts, q_parts, strict=True)]
        return L, R

    def apply_blocks(self, grads: list[Tensor], meta_constant: bool = False) -> list[Tensor]:
        """``B^{-1} G A^{-1} / c`` block by block: ``G_i - L R_i^T`` (no copy of ``G``).

        With ``meta_constant=True`` (e.g. ``M^{-1} v`` inside ``implicit_grad``) the factors
        that depend on ``U``, ``V`` alone come from the ``accumulate_`` cache, as constants
        (still differentiable in ``grads``)."""
        dtype = torch.promote_types(grads[0].dtype, self.U.dtype)
        if meta_constant:
            gs = [self._p(g, dtype) for g in grads]
            L, Rts, inv_c = self._cached_woodbury(gs, dtype)
            out = []
            for g, g0, Rt in zip(gs, grads, Rts, strict=True):
                g = g if inv_c is None else g * inv_c  # L is already divided by c
                out.append(torch.addmm(g, L, Rt, alpha=-1).to(g0.dtype))
            return out
        L, R = self.woodbury_factors([self._p(g, dtype) for g in grads], dtype)
        if self.learn_scale:
            inv_c = self._p(torch.exp(-self.log_scale), dtype)
            out = [(self._p(g, dtype) - L @ r.T) * inv_c for g, r in zip(grads, R, strict=True)]
        else:
            out = [
                torch.addmm(self._p(g, dtype), L, r.T, alpha=-1)
                for g, r in zip(grads, R, strict=True)
            ]
        return [o.to(g.dtype) for o, g in zip(out, grads, strict=True)]

    def _direction(self, grad: Tensor, dtype: torch.dtype) -> Tensor:
        L, (R,) = self.woodbury_factors([grad], dtype)
        out = torch.addmm(grad, L, R.T, alpha=-1)
        if self.learn_scale:
            out = out * self._p(torch.exp(-self.log_scale), dtype)
        return out

    @torch.no_grad()
    def accumulate_(
        self, targets: list[Tensor], grads: list[Tensor], alpha: float, beta: float = 1.0
    ) -> None:
        """``targets = beta * targets + alpha * (G - L R^T) / c`` block by block.

        The deploy optimizer's hot path, so it minimises passes over ``out x in`` memory
        and kernel launches: two thin products that read ``G`` (``G U`` and ``V^T G``,
        written straight into a cached workspace, no ``cat``), one pass
        ``target = G + beta * target`` (a separate ``mul_`` then ``add_``, as
        ``torch.optim.SGD`` does on CPU, is two; BLAS's own ``beta`` scaling in ``addmm`` is
        a pass of its own too) and one rank-``2r`` ``addmm_`` with ``beta=1``. Everything
        that depends on ``U``, ``V`` (and ``c``) alone is cached (see ``_deploy_factors``).
        """
        dtype = torch.promote_types(grads[0].dtype, self.U.dtype)
        gs = [self._p(g, dtype) for g in grads]
        L, Rts, inv_c = self._workspace_woodbury(gs, dtype)
        for target, g, Rt in zip(targets, gs, Rts, strict=True):
            if target.dtype != dtype:
                g, L_, Rt = g.to(target.dtype), L.to(target.dtype), Rt.to(target.dtype)
            else:
                L_ = L
            if beta == 0.0:  # overwrite (a scratch buffer): its old values are not read
                torch.mul(g, alpha if inv_c is None else alpha * inv_c.to(target.dtype), out=target)
            elif inv_c is not None:
                decay_(target, beta)
                target.addcmul_(g, inv_c.to(target.dtype), value=alpha)
            elif beta == 1.0:
                target.add_(g, alpha=alpha)
            elif alpha == 1.0:
                torch.add(g, target, alpha=beta, out=target)  # one pass: g + beta * target
            else:
                target.mul_(beta).add_(g, alpha=alpha)
            target.addmm_(L_, Rt, alpha=-alpha)

    def _workspace_woodbury(
        self, gs: list[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """No-grad ``(L / c, [R_i^T], 1/c or None)`` of ``woodbury_factors`` for blocks
        ``gs`` (already in ``dtype``), written into the cached workspace of
        ``_deploy_factors``: the halves that depend on ``U``, ``V`` alone are filled once,
        each call writes ``(p - V beta s)^T`` and ``V^T G_i`` in place. The returned
        tensors are overwritten by the next call."""
        f = self._deploy_factors(dtype, tuple(g.shape[1] for g in gs))
        p_t = f.p_t  # p^T = U^T G^T (r x out), then p^T - (p^T V) (V beta)^T
        torch.mm(f.U_t[0], gs[0].T, out=p_t)
        for g, u_t in zip(gs[1:], f.U_t[1:], strict=True):
            p_t.addmm_(u_t, g.T)
        p_t.addmm_(p_t @ f.V, f.V_beta_t, alpha=-1)
        if f.inv_c is not None:
            p_t.mul_(f.inv_c)
        for g, q_t in zip(gs, f.q_t, strict=True):
            torch.mm(f.V_t, g, out=q_t)  # q_i = V^T G_i
        return f.L, f.Rts, f.inv_c

    def _cached_woodbury(
        self, gs: list[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """``(L / c, [R_i^T], 1/c or None)`` of ``woodbury_factors`` for blocks ``gs``
        (already in ``dtype``) from the cached ``_deploy_factors``: differentiable in
        ``gs`` (no workspace), constant in the meta-parameters."""
        f = self._deploy_factors(dtype, tuple(g.shape[1] for g in gs))
        p = gs[0] @ f.U_t[0].T  # G U (out x r)
        for g, u_t in zip(gs[1:], f.U_t[1:], strict=True):
            p = p + g @ u_t.T
        # L = [(p - V beta s) | V beta] with s = V^T p, R_i^T = [(U alpha)_i^T ; V^T G_i]
        L = torch.cat([torch.addmm(p, f.V_beta_t.T, f.V_t @ p, alpha=-1), f.V_beta_t.T], dim=1)
        if f.inv_c is not None:
            L = L * f.inv_c
        Rts = [torch.cat([ua, f.V_t @ g], dim=0) for g, ua in zip(gs, f.Ua_t, strict=True)]
        return L, Rts, f.inv_c

    def _deploy_factors(self, dtype: torch.dtype, sizes: tuple[int, ...]) -> _DeployFactors:
        """No-grad factors that depend on the meta-parameters alone (see
        :class:`_DeployFactors`), for column blocks of widths ``sizes``; cached until ``U``,
        ``V`` or ``log_scale`` change or the dtype or block sizes differ
        (:meth:`~metaopt.kron.family_base.Family._meta_cache`)."""
        return self._meta_cache(
            "_deploy_cache", (dtype, sizes), lambda: self._build_deploy_factors(dtype, sizes)
        )

    def _build_deploy_factors(self, dtype: torch.dtype, sizes: tuple[int, ...]) -> _DeployFactors:
        U, V = self._p(self.U.detach(), dtype), self._p(self.V.detach(), dtype)
        eye = torch.eye(self.rank, dtype=dtype, device=U.device)
        alpha = torch.linalg.inv(eye + U.T @ U)  # r x r, symmetric
        beta = torch.linalg.inv(eye + V.T @ V)
        inv_c = torch.exp(-self.log_scale.detach()).to(dtype) if self.learn_scale else None
        scale = 1.0 if inv_c is None else inv_c
        V_beta_t = (V @ beta).T.contiguous()
        Lt = torch.empty(2 * self.rank, V.shape[0], dtype=dtype, device=U.device)
        Lt[self.rank :] = V_beta_t * scale
        Rts = []
        for ua in (U @ alpha).split(list(sizes), dim=0):
            Rt = torch.empty(2 * self.rank, ua.shape[0], dtype=dtype, device=U.device)
            Rt[: self.rank] = ua.T
            Rts.append(Rt)
        return _DeployFactors(
            U_t=[u.T.contiguous() for u in U.split(list(sizes), dim=0)],
            V=V,
            V_t=V.T.contiguous(),
            V_beta_t=V_beta_t,
            inv_c=inv_c,
            Lt=Lt,
            Rts=Rts,
        )

    def metric_apply(self, X: Tensor) -> Tensor:
        """``M vec(X)`` reshaped: ``c B X A`` (no inverse)."""
        dtype = torch.promote_types(X.dtype, self.U.dtype)
        X = X.to(dtype)
        U, V = self._p(self.U, dtype), self._p(self.V, dtype)
        XA = X + (X @ U) @ U.T
        out = XA + V @ (V.T @ XA)
        return out * self._p(self.scale(), dtype) if self.learn_scale else out

    @torch.no_grad()
    def metric_mixed(self, X: list[Tensor], delta: list[Tensor]) -> tuple[Tensor, ...]:
        """``(dU, dV[, d log_scale])`` of ``f = c <X, B delta A>`` in thin products.

        With ``S = delta^T B X``: ``df/dA = S``, ``df/dB = X A delta^T``, hence
        ``dU = c (delta^T B X U + X^T B delta U)``, ``dV = c (X A delta^T V + delta A X^T V)``
        and ``df/d log c = f``, against a double backward through ``bregman``. Done on the
        column blocks (no concatenation) with the thin factors as rows (``r x n``, the
        fast orientation of a thin-times-matrix product on CPU) in six passes over
        ``out x in`` memory: ``(X U)^T``, ``V^T X``, ``[U^T; (A X^T V)^T] delta^T``,
        ``[V^T; (B X U)^T] delta``, ``(B delta U)^T X``, ``(A delta^T V)^T X^T`` (plus one
        pass over ``X`` and ``delta`` for ``f``).
        """
        dtype = torch.promote_types(torch.promote_types(X[0].dtype, delta[0].dtype), self.U.dtype)
        Xs, Ds = [self._p(x, dtype) for x in X], [self._p(d, dtype) for d in delta]
        U, V = self._p(self.U.detach(), dtype), self._p(self.V.detach(), dtype)
        r, sizes = U.shape[1], [x.shape[1] for x in Xs]
        Us, Ut = U.split(sizes), U.T.contiguous().split(sizes, dim=1)  # k_i x r, r x k_i
        Vt = V.T.contiguous()
        # rows: PX = (X U)^T (r x out), QX_i = V^T X_i (r x k_i); then B, A applied
        PX = _row_products(Ut, [x.T for x in Xs])
        QX = [Vt @ x for x in Xs]
        BPX = torch.addmm(PX, PX @ V, Vt)  # (B X U)^T
        AQX = _times_A(QX, Us, Ut)  # (A X^T V)^T blocks
        # delta, two products per pass: [(delta U)^T; (delta A X^T V)^T] and
        # [V^T delta_i; (B X U)^T delta_i]
        rows = [torch.cat(p) for p in zip(Ut, AQX, strict=True)]
        DL = _row_products(rows, [d.T for d in Ds])  # 2r x out
        VB = torch.cat([Vt, BPX])
        DR = [VB @ d for d in Ds]  # 2r x k_i
        PD = DL[:r]
        BPD = torch.addmm(PD, PD @ V, Vt)  # (B delta U)^T
        QD = [t[:r] for t in DR]
        AQD = _times_A(QD, Us, Ut)  # (A delta^T V)^T blocks
        dUt = [torch.addmm(t[r:], BPD, x) for t, x in zip(DR, Xs, strict=True)]
        dVt = DL[r:].clone()
        for a, x in zip(AQD, Xs, strict=True):
            dVt.addmm_(a, x.T)
        dU, dV = (dUt[0] if len(dUt) == 1 else torch.cat(dUt, dim=1)).T, dVt.T
        out: list[Tensor] = [dU, dV]
        if self.learn_scale:
            c = torch.exp(self.log_scale.detach()).to(dtype)
            # f = c (<X, D> + <XU, DU> + <X^T V, D^T V> + <V^T X U, V^T D U>)
            f = sum((x * d).sum() for x, d in zip(Xs, Ds, strict=True))
            f = f + (PX * PD).sum() + ((PX @ V) * (PD @ V)).sum()
            f = f + sum((a * b).sum() for a, b in zip(QX, QD, strict=True))
            out = [c * dU, c * dV, c * f]
        metas = (self.U, self.V, self.log_scale) if self.learn_scale else (self.U, self.V)
        return tuple(self._p(t, m.dtype) for t, m in zip(out, metas, strict=True))

    @torch.no_grad()
    def metric_inverse_mixed(self, V: list[Tensor], delta: list[Tensor]) -> tuple[Tensor, ...]:
        """``metric_mixed(M^{-1} V, delta)`` fused: ``M^{-1} V`` is never formed.

        With ``X = M^{-1} V = B^{-1} V A^{-1} / c`` (``V`` here the ``out x in`` vector
        ``v``), ``B X = V A^{-1} / c`` and ``X A = B^{-1} V / c``, so ``metric_mixed``'s
        ``dU = c (delta^T B X U + X^T B delta U)`` and ``dV = c (X A delta^T V' + delta A X^T V')``
        (``V'`` the factor) become ``dU = delta^T v (U alpha) + A^{-1} v^T (delta U)`` and
        ``dV = B^{-1} v (delta^T V') + delta v^T (V' beta)``, and ``d/d log c = <v, delta>``
        (``alpha = (I + U^T U)^{-1}``, ``beta = (I + V'^T V')^{-1}``, ``U alpha = A^{-1} U``,
        ``V' beta = B^{-1} V'``). Six passes over ``out x in`` memory, in thin products
        with the factors as rows: ``(delta U)^T``, ``[(delta U)^T; (V' beta)^T] v``,
        ``(v U alpha)^T``, ``[(v U alpha)^T; V'^T] delta``, ``(v delta^T V')^T``,
        ``(delta v^T V' beta)^T``, against nine for ``apply`` then ``metric_mixed``.
        """
        dtype = torch.promote_types(torch.promote_types(V[0].dtype, delta[0].dtype), self.U.dtype)
        f = self._deploy_factors(dtype, tuple(v.shape[1] for v in V))
        Vs, Ds = [self._p(v, dtype) for v in V], [self._p(d, dtype) for d in delta]
        r = f.V_t.shape[0]
        # delta U (as rows, r x out), then [(delta U)^T; (V' beta)^T] v_i (2r x k_i)
        DU = _row_products(f.U_t, [d.T for d in Ds])
        left_v = torch.cat([DU, f.V_beta_t])
        W = [left_v @ v for v in Vs]  # rows: (v^T delta U)^T_i ; (v^T V' beta)^T_i
        # v U alpha (rows, r x out), then [(v U alpha)^T; V'^T] delta_i (2r x k_i)
        VUa = _row_products(f.Ua_t, [v.T for v in Vs])
        left_d = torch.cat([VUa, f.V_t])
        S = [left_d @ d for d in Ds]  # rows: (delta^T v U alpha)^T_i ; (V'^T delta)_i
        # dU_i^T = (delta^T v U alpha)^T_i + (A^{-1} w)^T_i, w = v^T delta U:
        # A^{-1} w = w - U alpha (U^T w)
        wt = [w[:r] for w in W]
        wtU = _row_products(wt, [u.T for u in f.U_t])  # (U^T w)^T = w^T U (r x r)
        dUt = [s[:r] + w - torch.mm(wtU, ua) for s, w, ua in zip(S, wt, f.Ua_t, strict=True)]
        # dV^T = (B^{-1} y)^T + (delta z^T)^T with y = v (delta^T V'), z = V' beta^T v
        y_t = _row_products([s[r:] for s in S], [v.T for v in Vs])  # (v delta^T V')^T
        y_t = y_t - torch.mm(torch.mm(y_t, f.V), f.V_beta_t)  # (B^{-1} y)^T
        dVt = y_t
        for w, d in zip(W, Ds, strict=True):
            dVt.addmm_(w[r:], d.T)
        dU = (dUt[0] if len(dUt) == 1 else torch.cat(dUt, dim=1)).T
        out: list[Tensor] = [dU, dVt.T]
        metas: tuple[Tensor, ...] = (self.U, self.V)
        if self.learn_scale:
            out.append(sum((v * d).sum() for v, d in zip(Vs, Ds, strict=True)))
            metas = (self.U, self.V, self.log_scale)
        return tuple(self._p(t, m.dtype) for t, m in zip(out, metas, strict=True))

    def dense(self) -> Tensor:
        return torch.linalg.inv(self.dense_metric())

    def dense_metric(self) -> Tensor:
        """``M = c kron(B, A)`` in row-major vec (tests only)."""
        return self.scale() * torch.kron(self.factor_B(), self.factor_A())

    # --- identities (MetaMD appendix A.4-A.5) -------------------------------------------
    def bregman(self, delta: Tensor) -> Tensor:
        """``1/2 vec(D)^T M vec(D)`` for ``D = theta - theta_ref`` (out x in)."""
        return 0.5 * (delta * self.metric_apply(delta)).sum()

    def min_eigenvalue(self) -> Tensor:
        """``c * lambda_min(A) * lambda_min(B)``; ``lambda_min(I + U U^T) = 1`` for r < dim."""
        return self.scale() * _min_eig_identity_plus(self.U) * _min_eig_identity_plus(self.V)

    def squared_distance_to_identity(self) -> Tensor:
        """``||M - I||_F^2`` from traces, without cancellation.

        With ``P = U U^T``, ``Q = V V^T`` (so ``A = I + P``, ``B = I + Q``) and
        ``X = P kron I + I kron Q + P kron Q``: ``M - I = (c - 1) I + c X``, hence
        ``||M - I||^2 = (c-1)^2 n + 2 c (c-1) tr X + c^2 ||X||^2`` with
        ``tr X = tP dB + dA tQ + tP tQ`` and
        ``||X||^2 = fP dB + dA fQ + fP fQ + 2 tP tQ + 2 fP tQ + 2 tP fQ``,
        where ``tP = ||U||_F^2``, ``fP = ||U^T U||_F^2`` (same for ``Q``), ``dA = in``,
        ``dB = out`` and ``n = dA dB``. Every term is non-negative at ``c = 1``.
        """
        dA, dB = float(self.shape[1]), float(self.shape[0])
        tP, tQ = (self.U * self.U).sum(), (self.V * self.V).sum()
        UtU, VtV = self.U.T @ self.U, self.V.T @ self.V
        fP, fQ = (UtU * UtU).sum(), (VtV * VtV).sum()
        x_sq = fP * dB + dA * fQ + fP * fQ + 2 * (tP * tQ + fP * tQ + tP * fQ)
        if not self.learn_scale:
            return x_sq
        c = self.scale()
        tr_x = tP * dB + dA * tQ + tP * tQ
        return (c - 1) ** 2 * (dA * dB) + 2 * c * (c - 1) * tr_x + c * c * x_sq


@dataclass
class _DeployFactors:
    """``LowRankFamily``'s no-grad factors for column blocks ``G = [G_0 | G_1 | ...]``.

    ``U_t[i]``: ``(U_i)^T`` (r x k_i); ``V`` (out x r), ``V_t = V^T``;
    ``V_beta_t = (V beta)^T`` (r x out) with ``beta = (I + V^T V)^{-1}``; ``inv_c = 1/c``
    or ``None``. Workspace: ``Lt`` (2r x out) whose lower half is ``(V beta)^T / c`` and
    ``Rts[i]`` (2r x k_i) whose upper half is ``(U alpha)_i^T`` (``alpha =
    (I + U^T U)^{-1}``); the other halves are written per call.
    """

    U_t: list[Tensor]
    V: Tensor
    V_t: Tensor
    V_beta_t: Tensor
    inv_c: Tensor | None
    Lt: Tensor
    Rts: list[Tensor]

    def __post_init__(self) -> None:
        """Views of the workspace, made once: ``L = Lt^T``; ``p_t`` / ``q_t[i]`` the halves
        written per call; ``Ua_t[i]`` the constant halves of ``Rts``."""
        r = self.Lt.shape[0] // 2
        self.L = self.Lt.T
        self.p_t = self.Lt[:r]
        self.q_t = [Rt[r:] for Rt in self.Rts]
        self.Ua_t = [Rt[:r] for Rt in self.Rts]


def _row_products(rows: list[Tensor], mats: list[Tensor]) -> Tensor:
    """``sum_i rows[i] @ mats[i]`` (row blocks of a thin factor times matching blocks)."""
    out = rows[0] @ mats[0]
    for a, m in zip(rows[1:], mats[1:], strict=True):
        out.addmm_(a, m)
    return out


def _times_A(blocks: list[Tensor], Us: tuple[Tensor, ...], Ut: tuple[Tensor, ...]) -> list[Tensor]:
    """Column blocks of ``W A = W + (W U) U^T`` for ``W`` (``r' x in``) given as blocks."""
    wu = _row_products(blocks, list(Us))  # r' x r
    return [torch.addmm(w, wu, u) for w, u in zip(blocks, Ut, strict=True)]


def _identity_plus(U: Tensor) -> Tensor:
    return torch.eye(U.shape[0], dtype=U.dtype, device=U.device) + U @ U.T


def _min_eig_identity_plus(U: Tensor) -> Tensor:
    dim, r = U.shape
    if r < dim:
        return torch.ones((), dtype=U.dtype, device=U.device)
    # r >= dim: I + U U^T is dim x dim and small here
    return 1 + torch.linalg.eigvalsh(U @ U.T)[0]
