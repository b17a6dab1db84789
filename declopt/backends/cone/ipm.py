"""A batched primal-dual interior-point method for cone programs

    minimize    1/2 x^T P x + q^T x
    subject to  A x + s = b,   s in K = {0}^z x R_+^l x SOC(k_1) x ...

for ``B`` problems at once, on any device, with a per-problem verdict (solved, primal
infeasible, dual infeasible = unbounded, iteration limit, numerical failure).

The method is the homogeneous self-dual embedding of Clarabel (Goulart and Chen, 2024) with
Mehrotra's predictor-corrector and NT scaling: iterates ``(x, s, z, tau, kappa)``; the solution
is ``(x, s, z) / tau`` when ``tau`` stays away from zero, and a certificate of infeasibility when
``kappa`` wins (``b^T z < 0`` with ``A^T z ~ 0``: primal infeasible; ``q^T x < 0`` with
``P x ~ 0``, ``A x + s ~ 0``: unbounded). No phase one, no feasible start needed.

Each Newton step solves the reduced KKT system ``[P, A^T; A, -H] [dx; dz] = [r1; r2]``
(``H = W^T W`` on the conic rows, 0 on the zero cone) by block elimination on dense batched
Cholesky factors: ``M = P + (W^{-1} A_C)^T (W^{-1} A_C) + rho I`` (``n x n``) and, with
equalities, the Schur complement ``A_E M^{-1} A_E^T + delta I``; the small static
regularisation is removed by iterative refinement against the unregularised system. Problems that
have finished stop moving (their step is zero); ``torch.linalg.cholesky_ex`` reports a failed
factorisation per problem instead of raising for the batch.

The method works on the equilibrated program (:mod:`.equilibrate`: unit-free by construction),
and there each stopping test measures its piece against the size of its own terms, floored at
the data's unit 1; rescaling the data changes no verdict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from declopt.backends.cone.arrow import ArrowFactor, low_rank_terms
from declopt.backends.cone.cones import ConeData, Scaling
from declopt.backends.cone.equilibrate import equilibrate
from declopt.batched import abs_max, bmtv, bmv
from declopt.diagnostics import Status

__all__ = ["IPMResult", "Settings", "solve"]

STATIC_REGULARISATION = {torch.float64: 1e-8, torch.float32: 1e-5}
"""The diagonal added to the reduced KKT system (in equilibrated units; iterative refinement then
removes its effect): Clarabel's 1e-8 in float64, and about sqrt(eps) above float32's rounding."""


@dataclass(frozen=True)
class Settings:
    """Stopping rules.

    Attributes:
        tol: relative tolerance of the primal residual, dual residual and duality gap (each
            against the size of its own terms) and of infeasibility certificates.
        max_iter: iterations before a problem is reported ``ITERATION_LIMIT``.
        step_fraction: the fraction of the step to the cone's boundary taken.
        refinement: iterative-refinement passes per linear solve of an iteration; default
            (``None``): none with the row-space factorisation (its only perturbation is the
            1e-8 static regularisation, which the next iteration's exact residuals correct)
            and with the block-arrow one on programs of inequalities alone without rank-one
            rows (the same; measured on Huber pooling: the same iterations, a quarter fewer
            kernels; a rank-one row over a nearly singular rest leaves backward errors up to
            2e-10, which one pass takes to 1e-15), one with the
            column-space one otherwise (its equality block is a regularised Schur complement;
            with second-order cones the rank-two terms' Schur complement: without the pass
            the L2-ball projection took 11 iterations instead of 6); the polish always refines
            twice (up to five times with the block-arrow factors, until settled).
        polish: for programs without second-order cones, finish each solved problem on its
            active set (see :func:`_polish`).
    """

    tol: float = 1e-8
    max_iter: int = 100
    step_fraction: float = 0.99
    refinement: int | None = None
    polish: bool = True


@dataclass
class IPMResult:
    """The answers, ``x (B, n)``, ``s``, ``z (B, rows)`` (the solution, divided by ``tau``),
    ``status (B,)`` (:class:`~declopt.diagnostics.Status` codes), ``iterations (B,)``,
    ``objective (B,)`` (``1/2 x^T P x + q^T x``) and ``residual (B,)`` (the largest relative
    residual piece at the answer)."""

    x: Tensor
    s: Tensor
    z: Tensor
    status: Tensor
    iterations: Tensor
    objective: Tensor
    residual: Tensor


def _per_problem(v: Tensor, factor: Tensor) -> Tensor:
    """``v (B, ...)`` with each problem's entries multiplied by its ``factor (B,)``."""
    return v * factor.reshape(-1, *([1] * (v.dim() - 1)))


def _p_times(data: ConeData, v: Tensor) -> Tensor:
    """``P v`` (with the per-problem scale, if any) for ``v (B, n)`` or ``(B, n, k)``; zeros
    for a linear objective."""
    if data.P is None:
        return torch.zeros_like(v)
    arrow = data.arrow
    out = bmv(data.P, v) if arrow is None else arrow.p_times(data.structural("P"), v)
    return out if data.P_scale is None else _per_problem(out, data.P_scale)


def _a_times(data: ConeData, v: Tensor) -> Tensor:
    """``A v`` for ``v (B, n)`` or ``(B, n, k)`` (over ``A``'s structural entries where the
    program has a sparsity plan)."""
    if data.arrow is None:
        return bmv(data.A, v)
    return data.arrow.a_times(data.structural("A"), v)


def _at_times(data: ConeData, v: Tensor) -> Tensor:
    """``A^T v`` for ``v (B, rows)`` or ``(B, rows, k)`` (as :func:`_a_times`)."""
    if data.arrow is None:
        return bmtv(data.A, v)
    return data.arrow.a_times(data.structural("A"), v, transpose=True)


def _dense_p(data: ConeData) -> Tensor | None:
    """``P (B|1, n, n)`` with its per-problem scale applied."""
    if data.P is None or data.P_scale is None:
        return data.P
    return _per_problem(data.P, data.P_scale)


def _cholesky_solve(L: Tensor, r: Tensor) -> Tensor:
    """``(L L^T)^{-1} r`` by two triangular solves (several times faster than
    ``torch.cholesky_solve`` on batches of small systems on the CPU)."""
    y = torch.linalg.solve_triangular(L, r, upper=False)
    return torch.linalg.solve_triangular(L.mT, y, upper=True)


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).sum(-1)


def _inf_norm(v: Tensor) -> Tensor:
    return v.abs().amax(-1) if v.shape[-1] else v.new_zeros(v.shape[:-1])


def _finite_factor(L: Tensor) -> Tensor:
    """``(B,)`` whether the Cholesky factor ``L (B, k, k)`` is finite: a NaN or Inf in the
    factored matrix's lower triangle reaches the diagonal of ``L`` (each pivot subtracts the
    squares of its row), so the diagonal is checked, not the whole matrix."""
    return torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(-1)


DUAL_CONDITION = 1e-8
"""The dual (row-space) factorisation is used when ``P``'s Cholesky factor has every pivot
squared above this times the largest (``P`` comfortably positive definite)."""


class _DualBase:
    """What the row-space factorisation keeps for a whole solve: ``P = L_P L_P^T``,
    ``Y = P^{-1} A^T (B, n, rows)`` and ``K0 = A P^{-1} A^T (B, rows, rows)``. With them each
    iteration factors only ``A P^{-1} A^T + H`` (``rows x rows``) instead of forming and
    factoring ``P + A^T H^{-1} A`` (``n x n``), as qpth does: cheaper when the program has
    fewer rows than columns (a QP with a few constraints)."""

    def __init__(self, data: ConeData, eps: float) -> None:
        assert data.P is not None
        P = data.P  # (B|1, n, n): a shared P is factored once
        eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
        self.L, info = torch.linalg.cholesky_ex(P + eps * eye)
        pivots = self.L.diagonal(dim1=-2, dim2=-1) ** 2
        self.usable = bool((info == 0).all()) and bool(
            (pivots.amin(-1) >= DUAL_CONDITION * pivots.amax(-1)).all()
        )
        # (c P)^{-1} = P^{-1} / c for the per-problem cost scale c: the factors stay shared.
        self.inv_scale = None if data.P_scale is None else 1 / data.P_scale
        if self.usable:
            # P is well conditioned (above): its explicit inverse turns every later solve with
            # it into one product (iterative refinement absorbs the rounding).
            self.P_inv = torch.cholesky_inverse(self.L)
            self.Y = self.P_inv @ data.A.mT
            self.K0 = data.A @ self.Y

    def _scaled(self, v: Tensor) -> Tensor:
        return v if self.inv_scale is None else _per_problem(v, self.inv_scale)

    def p_inv(self, r: Tensor) -> Tensor:
        """``P^{-1} r`` for ``r (B, n, k)``."""
        return self._scaled(bmv(self.P_inv, r))

    def y(self, v: Tensor) -> Tensor:
        """``P^{-1} A^T v`` for ``v (B, rows, k)``."""
        return self._scaled(bmv(self.Y, v))

    def k0(self) -> Tensor:
        """``A P^{-1} A^T (B|1, rows, rows)``."""
        return self._scaled(self.K0)

    def select(self, index: Tensor) -> _DualBase:
        """The factors of the programs ``index (b,)`` of the batch."""
        out = _DualBase.__new__(_DualBase)
        out.usable = self.usable
        for name in ("L", "P_inv", "Y", "K0", "inv_scale"):
            value = getattr(self, name)
            shared = value is None or value.shape[0] == 1
            setattr(out, name, value if shared else value[index])
        return out

    @staticmethod
    def worthwhile(data: ConeData) -> bool:
        """Fewer rows than columns and a quadratic objective."""
        return data.P is not None and data.cones.rows < data.q.shape[-1]


class _KKT:
    """Factors of ``[P, A^T; A, -H]`` at one scaling, and solves with it: in the column space
    (``P + A_C^T H^{-1} A_C + A_E^T A_E``, then the equalities' Schur complement), or with a
    :class:`_DualBase` in the row space (``A P^{-1} A^T + H``)."""

    def __init__(
        self,
        data: ConeData,
        scaling: Scaling | None,
        eps: float,
        dual: _DualBase | None = None,
        h_diagonal: Tensor | None = None,
        row_mask: Tensor | None = None,
        exact_h: Tensor | None = None,
    ) -> None:
        """``h_diagonal (B, rows)``: an explicit diagonal ``H`` instead of the scaling's (the
        polish: 1 on the rows it drops); ``row_mask (B, rows)``: rows of ``A`` zeroed in
        ``data`` (the row space's ``K0`` is masked to match); ``exact_h (B, rows)``: the
        diagonal ``H`` of the system the refinement solves when ``h_diagonal`` regularises it
        (the block-arrow polish: ``[P, A^T; A, -delta I]`` refined towards ``delta = 0``)."""
        cones = data.cones
        self.data, self.scaling, self.cones, self.dual = data, scaling, cones, dual
        self.h_diagonal, self.exact_h = h_diagonal, exact_h
        self.arrow: ArrowFactor | None = None
        self._w2: Tensor | None = None  # the orthant's w^2 and H's diagonal, formed once
        self._h: Tensor | None = None
        batch = data.batch
        A = data.A.expand(batch, -1, -1)
        self.A_eq = A[:, : cones.zero]
        if dual is not None:
            rows = cones.rows
            diagonal = self._diagonal()
            if diagonal is None and scaling is None:  # H = I on the conic rows
                diagonal = torch.zeros(batch, rows, dtype=A.dtype, device=A.device)
                diagonal[:, cones.conic] = 1
            K0 = dual.k0()
            if row_mask is not None:
                K0 = K0 * (row_mask.unsqueeze(-1) * row_mask.unsqueeze(-2))
            # S = K0 + H + eps I, written into one fresh (B, rows, rows): each further
            # temporary of that size costs as much as the factorisation on the CPU.
            if diagonal is not None:
                S = K0.expand(batch, rows, rows).clone()
                S.diagonal(dim1=-2, dim2=-1).add_(diagonal + eps)
            else:
                eye = torch.eye(rows, dtype=A.dtype, device=A.device).expand(batch, rows, rows)
                S = self.h(eye).add_(K0)  # H: W^2 on the conic rows, 0 on the zero rows
                S.diagonal(dim1=-2, dim2=-1).add_(eps)
            self.Ls, info = torch.linalg.cholesky_ex(S)
            self.failed = (info != 0) | ~_finite_factor(self.Ls)
            return
        if data.arrow is not None:
            self._factor_arrow(eps)
            return
        if scaling is None:  # H = I on the conic rows (the starting point's system)
            scaled = A[:, cones.conic]
        else:
            scaled = scaling.apply(A, inverse=True)[:, cones.conic]
        self.scaled = scaled  # W^{-1} A_C
        M = torch.bmm(scaled.mT, scaled)
        if data.P is not None:
            M = M + _dense_p(data)
        if cones.zero:
            # Augmented with gamma A_E^T A_E (gamma = 1 in equilibrated units): [M, A_E^T; A_E, 0]
            # is nonsingular iff this is positive definite, however singular P + A_C^T H^-1 A_C
            # is (a linear objective, a variable that only an equality pins down).
            M = M + self.A_eq.transpose(-1, -2) @ self.A_eq
        # Static regularisation: absolute in the equilibrated units (Clarabel's 1e-8), plus a
        # multiple of eps^2 of the largest pivot.
        diag = M.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
        self.rho = eps + torch.finfo(M.dtype).eps ** 2 * diag
        M.diagonal(dim1=-2, dim2=-1).add_(self.rho[:, None])  # M is this step's own
        self.L, info = torch.linalg.cholesky_ex(M)
        self.failed = self._factor_equalities(eps, (info != 0) | ~_finite_factor(self.L))

    def _factor_arrow(self, eps: float) -> None:
        """The column-space factors by the program's block-arrow plan (:mod:`.arrow`): ``M =
        P + A^T D A + V C V^T`` with ``D`` the diagonal part of ``H^{-1}`` (1 on the zero rows:
        the augmentation) and ``V C V^T`` the second-order cones' rank-two remainder and the
        plan's dense rows."""
        data, cones, scaling = self.data, self.cones, self.scaling
        batch, rows = data.batch, cones.rows
        cone_terms = None
        if self.h_diagonal is not None:
            weights = 1 / self.h_diagonal
        elif scaling is None:
            weights = data.q.new_ones(batch, rows)
        else:
            w2, blocks = scaling.squares()
            weights = data.q.new_ones(batch, rows) if w2 is None else 1 / w2
            if cones.soc:
                a = torch.zeros_like(weights)
                eta_rows = torch.zeros_like(weights)  # each cone's eta on its rows
                for group, ((eta2, v, jw), (eta, _)) in enumerate(zip(blocks, scaling.blocks)):
                    cones.put(weights, group, (1 / eta2).expand_as(v))
                    cones.put(a, group, jw)
                    cones.put(eta_rows, group, eta.expand_as(v))
                heads = data.arrow.on(weights.device)["soc_heads"]
                cone_terms = (a, eta_rows[:, heads])
        low_rank = low_rank_terms(data, weights, cone_terms)
        self.arrow = ArrowFactor(data, weights, eps, low_rank)
        self.failed = self._factor_equalities(eps, self.arrow.failed)

    def _factor_equalities(self, eps: float, failed: Tensor) -> Tensor:
        """With equality rows, their regularised Schur complement ``A_E M^{-1} A_E^T + delta
        I``, factored after ``M``; returns ``failed (B,)`` with its failures added."""
        zero = self.cones.zero
        if not zero:
            return failed
        self.Y = self._m_solve(self.A_eq.transpose(-1, -2))  # M^{-1} A_E^T
        S = self.A_eq @ self.Y
        size = S.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
        self.delta = eps + torch.finfo(S.dtype).eps ** 2 * size
        eye = torch.eye(zero, dtype=S.dtype, device=S.device)
        self.Ls, info = torch.linalg.cholesky_ex(S + self.delta[:, None, None] * eye)
        return failed | (info != 0) | ~_finite_factor(self.Ls)

    def _m_solve(self, r: Tensor) -> Tensor:
        """``M^{-1} r`` for the column-space ``M`` (``r (B, n, k)``)."""
        if self.arrow is not None:
            return self.arrow.solve(r)
        return _cholesky_solve(self.L, r)

    def _diagonal(self) -> Tensor | None:
        """``(B, rows)`` the diagonal of ``H`` (``w^2`` on the orthant, 0 on the zero rows) when
        ``H`` is diagonal (no second-order cones, or given), else ``None``; formed once (every
        solve of the step applies it)."""
        if self.h_diagonal is not None:
            return self.h_diagonal
        if self.scaling is None or self.cones.soc or self.scaling.w is None:
            return None
        if self._h is None:
            w = self.scaling.w
            self._w2 = self.scaling.squares()[0]  # 1 on the zero rows: H^{-1}'s divisor
            self._h = self._w2 * self.cones.mask(w)
        return self._h

    def h(self, v: Tensor) -> Tensor:
        """``H v`` on the conic rows of ``v (B, rows)`` or ``(B, rows, k)`` (0 on the zero
        rows)."""
        diagonal = self._diagonal()
        if diagonal is not None:
            return v * (diagonal if v.dim() == 2 else diagonal.unsqueeze(-1))
        out = v.clone() if self.scaling is None else self.scaling.square(v)
        out[:, : self.cones.zero] = 0
        return out

    def _h_inv(self, v: Tensor) -> Tensor:
        """``H^{-1} v`` on the conic rows (the zero rows are the caller's to set)."""
        if self.h_diagonal is not None:
            return v / self.h_diagonal.reshape(*self.h_diagonal.shape, *([1] * (v.dim() - 2)))
        if self.scaling is None:
            return v.clone()
        if self._diagonal() is not None and self._w2 is not None:  # no second-order cones
            return v / self._w2.reshape(*self._w2.shape, *([1] * (v.dim() - 2)))
        return self.scaling.square(v, inverse=True)

    def _solve_regularised(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        zero = self.cones.zero
        if self.dual is not None:
            # dz = (A P^-1 A^T + H)^-1 (A P^-1 r1 - r2), dx = P^-1 (r1 - A^T dz)
            t = self.dual.p_inv(r1)
            dz = _cholesky_solve(self.Ls, _a_times(self.data, t) - r2)
            return t - self.dual.y(dz), dz
        hr = self._h_inv(r2)  # a new tensor
        if zero:
            hr[:, :zero] = r2[:, :zero]  # the augmentation's gamma A_E^T r2_E
        rt = r1 + _at_times(self.data, hr)  # r1 + A_C^T H^{-1} r2_C + A_E^T r2_E
        v = self._m_solve(rt)
        if zero:
            rhs = bmv(self.A_eq, v) - r2[:, :zero]
            dz_eq = _cholesky_solve(self.Ls, rhs)
            dx = v - bmv(self.Y, dz_eq)
        else:
            dx = v
        dz = self._h_inv(_a_times(self.data, dx) - r2)
        if zero:
            dz = torch.cat([dz_eq, dz[:, zero:]], 1)
        return dx, dz

    def solve(
        self, r1: Tensor, r2: Tensor, refinement: int, settled: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(dx (B, n, k), dz (B, rows, k))`` for right-hand sides ``r1 (B, n, k)``, ``r2
        (B, rows, k)``, with ``refinement`` passes; with ``settled``, fewer once every
        problem's last correction is at most ``settled`` times its solution (one host sync
        per pass)."""
        dx, dz = self._solve_regularised(r1, r2)
        for _ in range(refinement):
            e1 = r1 - _at_times(self.data, dz)
            if self.data.P is not None:
                e1 = e1 - _p_times(self.data, dx)
            held = self.h(dz) if self.exact_h is None else self.exact_h.unsqueeze(-1) * dz
            e2 = r2 - _a_times(self.data, dx) + held
            cx, cz = self._solve_regularised(e1, e2)
            dx, dz = dx + cx, dz + cz
            if settled is not None:
                correction = torch.maximum(abs_max(cx, (1, 2)), abs_max(cz, (1, 2)))
                size = torch.maximum(abs_max(dx, (1, 2)), abs_max(dz, (1, 2)))
                if not bool((correction > settled * size).any()):  # NaN: stays settled
                    break
        return dx, dz


class _Step:
    """One Newton step of the embedding at an iterate: the residuals ``r_x``, ``r_z``, ``r_tau``
    and the KKT factors, from which :meth:`direction` solves for any complementarity
    right-hand side. The ``dtau`` coefficient system ``K [x1; z1] = [-q; b]`` is solved once
    and shared by the predictor and the corrector."""

    def __init__(
        self,
        data: ConeData,
        kkt: _KKT,
        refinement: int,
        r_x: Tensor,
        r_z: Tensor,
        r_tau: Tensor,
        pxi: Tensor,
        xpx: Tensor,
        tau: Tensor,
        kappa: Tensor,
    ) -> None:
        self.data, self.kkt, self.refinement = data, kkt, refinement
        self.r_x, self.r_z, self.r_tau = r_x, r_z, r_tau
        self.tau, self.kappa = tau, kappa
        batch = data.batch
        self.q, self.b = data.q.expand(batch, -1), data.b.expand(batch, -1)
        self.c = 2 * pxi + self.q  # the tau row's coefficient of dx
        self.xpx = xpx  # xi' P xi for xi = x / tau
        self.constant: tuple[Tensor, Tensor] | None = None
        self.den = tau  # set with the constant solution
        self.positive: Tensor | None = None  # the coordinates to_boundary keeps positive

    def direction(self, eta: Tensor | None, d_s: Tensor, d_kappa: Tensor) -> tuple[Tensor, ...]:
        """``(dx, ds, dz, dtau, dkappa)`` for residuals scaled by ``eta (B,)`` (``None``: 1)
        and the complementarity right-hand sides ``d_s (B, rows)`` (0 on the zero rows),
        ``d_kappa``."""
        q, b, tau, kappa = self.q, self.b, self.tau, self.kappa
        if eta is None:  # the predictor: eta = 1
            r1, r2 = -self.r_x, d_s - self.r_z
        else:
            scale = eta[:, None]
            r1 = -scale * self.r_x
            r2 = torch.addcmul(d_s, scale, self.r_z, value=-1)
        if self.constant is None:
            dx, dz = self.kkt.solve(
                torch.stack([-q, r1], -1), torch.stack([b, r2], -1), self.refinement
            )
            x1, z1 = self.constant = dx[..., 0], dz[..., 0]
            x2, z2 = dx[..., 1], dz[..., 1]
            # den < 0 always (docs/design.md, "The cone backend")
            den = _dot(self.c, x1) + _dot(b, z1) - self.xpx - kappa / tau
            self.den = torch.where(den != 0, den, -1.0)
        else:
            dx, dz = self.kkt.solve(r1.unsqueeze(-1), r2.unsqueeze(-1), self.refinement)
            x2, z2 = dx[..., 0], dz[..., 0]
        x1, z1 = self.constant
        r_tau = self.r_tau if eta is None else eta * self.r_tau
        num = d_kappa / tau - r_tau - _dot(self.c, x2) - _dot(b, z2)
        dtau = num / self.den
        along = dtau[:, None]
        dx = torch.addcmul(x2, along, x1)
        dz = torch.addcmul(z2, along, z1)
        ds = (d_s + self.kkt.h(dz)).neg_()
        dkappa = torch.addcmul(d_kappa, kappa, dtau).div_(tau).neg_()
        return dx, ds, dz, dtau, dkappa

    def to_boundary(
        self, s: Tensor, z: Tensor, ds: Tensor, dz: Tensor, dtau: Tensor, dkappa: Tensor
    ) -> Tensor:
        """``(B,)`` the largest step keeping ``s``, ``z``, ``tau``, ``kappa`` in their cones."""
        cones = self.data.cones
        # Every coordinate that must stay positive (the orthant's rows of s and z, tau, kappa)
        # in one ratio test; a direction that never leaves gives a huge step (or inf).
        o = cones.orthant
        if self.positive is None:  # the same point for the predictor and the corrector
            self.positive = torch.cat([s[:, o], z[:, o], self.tau[:, None], self.kappa[:, None]], 1)
        v = self.positive
        d = torch.cat([ds[:, o], dz[:, o], dtau[:, None], dkappa[:, None]], 1)
        alpha = (v / -d.clamp_max(-torch.finfo(d.dtype).tiny)).amin(-1)
        if cones.soc:
            # s and z in one pass: stacked along the batch dim
            both = cones.soc_max_step(torch.cat([s, z]), torch.cat([ds, dz]))
            alpha = torch.minimum(alpha, torch.minimum(*both.chunk(2)))
        return alpha


def _starting_point(
    data: ConeData, settings: Settings, eps: float, dual: _DualBase | None
) -> tuple[Tensor, ...]:
    """CVXOPT's and Clarabel's start: the solution of the system with ``H = I``
    (``[P, A^T; A, -I] [x; z] = [-q; b]``), ``s = -z`` on the conic rows, both moved into the
    cone's interior; ``tau = kappa = 1``."""
    cones, batch = data.cones, data.batch
    kkt = _KKT(data, None, eps, dual)
    q = data.q.expand(batch, -1)
    b = data.b.expand(batch, -1)
    x, z = kkt.solve(-q.unsqueeze(-1), b.unsqueeze(-1), settings.refinement)
    x, z = x.squeeze(-1), z.squeeze(-1)
    s = -z.clone()
    s[:, : cones.zero] = 0
    s = cones.shift_inside(s)
    zc = cones.shift_inside(z.clone())
    z = torch.cat([z[:, : cones.zero], zc[:, cones.zero :]], 1)
    one = q.new_ones(batch)
    return x, s, z, one, one.clone(), kkt.failed


def _norms(data: ConeData) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(B,)`` the largest entries of ``q``, ``b``, ``A`` and ``P`` (the data's units)."""
    batch = data.batch

    def size(t: Tensor | None, dims: int) -> Tensor:
        if t is None or t.numel() == 0:
            return data.q.new_zeros(batch)
        return abs_max(t, tuple(range(1, 1 + dims))).expand(batch)

    P_size = size(data.P, 2)
    if data.P_scale is not None:
        P_size = P_size * data.P_scale
    return size(data.q, 1), size(data.b, 1), size(data.A, 2), P_size


def solve(data: ConeData, settings: Settings | None = None) -> IPMResult:
    """Solve every problem of the batch (see the module docstring), in equilibrated units."""
    settings = Settings() if settings is None else settings
    scaled, scaling = equilibrate(data)
    eps = STATIC_REGULARISATION[scaled.q.dtype]
    # The block-arrow plan, where the program has one, beats both dense factorisations; but
    # it works in the column space, whose normal equations A^T H^-1 A lose float32's few
    # digits once H spans 1e-12 .. 1e7 (measured on Huber pooling: 3 of 6 problems end in a
    # numerical failure, with the dense column-space factors too), so in float32 a usable row
    # space is kept.
    arrow_first = scaled.arrow is not None and scaled.q.dtype != torch.float32
    dual = None
    if not arrow_first and _DualBase.worthwhile(scaled):
        dual = _DualBase(scaled, eps)
        dual = dual if dual.usable else None
    if dual is not None and scaled.arrow is not None:
        scaled = dataclasses.replace(scaled, arrow=None)
    polishing = settings.polish and not data.cones.soc
    if not polishing:
        result, _ = _solve(scaled, settings, dual)
    else:
        # The polish is exact once the active set shows: stop the interior point early, polish,
        # and take up again (from where it stopped) only the problems the polish could not
        # finish, to the full tolerance.
        early = dataclasses.replace(settings, tol=max(settings.tol, POLISH_FROM))
        result, kappa = _solve(scaled, early, dual)
        result, polished = _polish(scaled, result, settings, dual)
        again = (result.status == int(Status.SOLVED)) & ~polished
        if early.tol > settings.tol and bool(again.any()):
            result = _resume(scaled, result, kappa, again, settings, dual)
    x, s, z = scaling.unscale(result.x, result.s, result.z)
    objective = scaling.objective(result.objective)
    return IPMResult(x, s, z, result.status, result.iterations, objective, result.residual)


POLISH_FROM = 1e-6
"""With a polish (programs without second-order cones) the interior point stops at this relative
tolerance (or the requested one, if looser), where the active set is plain on problems that are
not degenerate (measured: the 50-variable QP and cvxpylayers' README LP polish exactly from
1e-6 .. 1e-5, saving 1-3 of 7-14 iterations); a problem its polish does not finish continues to
the requested tolerance."""


def _resume(
    data: ConeData,
    result: IPMResult,
    kappa: Tensor,
    which: Tensor,
    settings: Settings,
    dual: _DualBase | None,
) -> IPMResult:
    """``result`` with the problems ``which (B,)`` solved on to ``settings.tol`` from where they
    stopped (the embedding is homogeneous: ``(x, s, z, 1, kappa) / tau`` is the same iterate)
    and polished again."""
    index = which.nonzero().squeeze(-1)
    part = data.select(index)
    part_dual = None if dual is None else dual.select(index)
    start = (result.x[index], result.s[index], result.z[index], kappa[index])
    more, _ = _solve(part, settings, part_dual, start)
    more, _ = _polish(part, more, settings, part_dual)
    merged = {}
    for field in dataclasses.fields(IPMResult):
        value = getattr(result, field.name).clone()
        update = getattr(more, field.name)
        value[index] = value[index] + update if field.name == "iterations" else update
        merged[field.name] = value
    return IPMResult(**merged)


REDUCED_TOL = {torch.float32: 1e-4, torch.float64: 1e-8}
"""The residual a solve accepts from its best iterate when it cannot reach its tolerance.
float32: Clarabel's reduced feasibility tolerance, 1e-4; measured on the L2-ball projection (d =
40), float32 iterates reach 1e-5 .. 8e-5 after 3-4 iterations, then the NT scaling's rounding
makes them diverge (residuals 1e-2 .. 0.5, then non-finite), with the dense factors as with the
block-arrow ones; 6 of 6 problems ended in a numerical failure or the iteration limit. float64:
CVXPY's solvers' own 1e-8 (the default tolerance asks for 1e-9); measured on the weighted
L2-ball projection (``|s * z - q|^2 / 2``, ``|z| <= 1``, d = 8 .. 256), the iterates reach
1e-9 .. 1e-8, then lose accuracy (the primal residual grew 1.4e-9 -> 1e-3 in four iterations)
until a factorisation fails: 24-39 of 64 problems ended ``NUMERICAL``, none now."""

REDUCED_CERTIFICATE = 5e-5
"""The relative tolerance of an infeasibility certificate read at a breakdown (Clarabel's
reduced ``tol_infeas_rel``): measured on QPs with a second-order cone made primal infeasible
(``tests/test_cone_arrow.py``), the iterates grow as ``1 / tau`` (``|z|`` 1e16 by iteration 19)
until a factorisation fails with the certificate's ratio at 1e-8 .. 1e-6, short of the full
tolerance: 2 of 3 such problems were reported ``NUMERICAL`` (Clarabel: primal infeasible)."""

STALL_ITERATIONS = 5
"""A problem whose best iterate is within the reduced tolerance and has not improved for this
many iterations stops there (instead of running to the iteration limit)."""

COMPACT_SHARE = 8
"""Finished problems leave the working batch once at least ``1/COMPACT_SHARE`` of it has finished
(their answers are stored aside): the batch's iteration count is its slowest member's (10-16 on
the 50-variable QP against a mean of 9-10), and every batched factorisation costs per member."""


@dataclass
class _Answers:
    """The batch's iterates by original index, filled in as members leave the working batch."""

    x: Tensor
    s: Tensor
    z: Tensor
    tau: Tensor
    kappa: Tensor
    status: Tensor
    iterations: Tensor
    residual: Tensor
    best: tuple[Tensor, ...] | None = None  # (x, s, z, tau, kappa, residual) at the best residual

    def store(
        self, members: Tensor | None, *values: Tensor, best: tuple[Tensor, ...] | None
    ) -> None:
        """Write the working batch's ``values`` (in field order) and ``best`` at ``members``
        (``None``: the whole batch, in order)."""
        for field, value in zip(dataclasses.fields(self), values):
            name = field.name
            if members is None:
                setattr(self, name, value)
            else:
                getattr(self, name)[members] = value
        if best is not None:
            if members is None:
                self.best = tuple(v.clone() for v in best)
            else:
                for stored, value in zip(self.best, best):
                    stored[members] = value


def _inf_norms(*vectors: Tensor) -> Tensor:
    """``(k, B)`` the largest absolute entry of each of ``k`` same-shaped ``(B, w)`` vectors
    (0 when ``w = 0``), in one reduction."""
    stacked = torch.stack(vectors)
    if stacked.shape[-1] == 0:
        return stacked.new_zeros(stacked.shape[:-1])
    return stacked.abs().amax(-1)


def _solve(
    data: ConeData,
    settings: Settings,
    dual: _DualBase | None,
    start: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> tuple[IPMResult, Tensor]:
    """The interior point on every problem of ``data`` (equilibrated), with the row-space
    factors ``dual`` (``None``: the column space), from CVXOPT's starting point or from
    ``start = (x, s, z, kappa)`` (``tau = 1``). Returns the result and ``kappa / tau`` (with the
    result's ``x, s, z``, the iterate to resume from)."""
    cones, batch = data.cones, data.batch
    tol = settings.tol
    eps = STATIC_REGULARISATION[data.q.dtype]
    tiny = torch.finfo(data.q.dtype).tiny

    refinement = settings.refinement
    if refinement is None:
        arrow = data.arrow
        plain = arrow is not None and not (cones.zero or cones.soc or arrow.dense_rows.numel())
        refinement = 0 if dual is not None or plain else 1
    settings = dataclasses.replace(settings, refinement=refinement)
    if start is None:
        x, s, z, tau, kappa, failed = _starting_point(data, settings, eps, dual)
    else:
        x, s, z, kappa = start
        tau, failed = torch.ones_like(kappa), torch.zeros_like(kappa, dtype=torch.bool)
    device = x.device
    status = torch.where(failed, int(Status.NUMERICAL), -1)  # -1: running
    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    residual = torch.full_like(tau, float("inf"))
    answers = _Answers(x, s, z, tau, kappa, status, iterations, residual)
    # Where the working precision cannot reach the tolerance (float32), keep each problem's best
    # iterate: one that stalls or breaks down after reaching the reduced tolerance returns it.
    reduced = max(tol, REDUCED_TOL.get(data.q.dtype, tol))
    best: tuple[Tensor, ...] | None = None
    stale = torch.zeros_like(iterations)
    if reduced > tol:
        best = (x, s, z, tau, kappa, torch.full_like(tau, float("inf")))
    degree = cones.degree + 1
    # The working batch: its members (None: all, in order), data and row-space factors.
    members: Tensor | None = None
    work, work_dual = data, dual
    q_size, b_size, A_size, P_size = _norms(data)
    # The certificates' thresholds (fixed for the solve)
    tol_A, tol_P = tol * A_size, tol * P_size.clamp_min(tiny)
    # A breakdown on the way to a certificate (the iterates of an infeasible problem grow
    # without bound, and their scaling with them) reports the certificate that the last finite
    # iterate satisfied to the reduced tolerance, as Clarabel's "almost infeasible".
    loose = max(tol, REDUCED_CERTIFICATE) / tol
    almost = torch.full_like(iterations, -1)

    for k in range(settings.max_iter + 1):
        size = x.shape[0]
        q, b = work.q.expand(size, -1), work.b.expand(size, -1)
        running = status < 0
        # -------- verdicts on the current iterate
        px = _p_times(work, x)
        ax, atz = _a_times(work, x), _at_times(work, z)
        # The embedding's residuals; the verdicts divide them by tau, the step takes them as
        # they are.
        t = tau[:, None]
        r_x = torch.addcmul(px + atz, q, t)
        axs = ax + s  # s is 0 on the zero rows
        r_z = torch.addcmul(axs, b, t, value=-1)
        n_rz, n_ax, n_s, n_axs = _inf_norms(r_z, ax, s, axs)
        n_rx, n_px, n_atz = _inf_norms(r_x, px, atz)
        xpx, qx, bz = _dot(x, px), _dot(q, x), _dot(b, z)
        # tau (pobj - dobj) = x'Px / tau + q'x + b'z, the tau row's residual less kappa
        xpx_t = xpx / tau
        scaled_gap = xpx_t + qx + bz
        r_tau = scaled_gap + kappa
        pobj = (0.5 * xpx_t + qx) / tau
        gap_t = scaled_gap / tau
        dobj = pobj - gap_t
        # Each piece against the size of its own terms, and never below 1: the data are
        # equilibrated (|b| = 1 unless b = 0, |q| <= 1, the cost scaled to 1), so 1 is the data's
        # own unit. Without that floor a solution at exactly 0 with b = 0 (min x, x >= 0) is never
        # accepted: its residuals shrink with the terms they are measured against. (Sizes of
        # iterates divided by tau: |r_z| / tau / max(|b|, |ax| / tau, |s| / tau, 1).)
        pres = n_rz / torch.maximum(torch.maximum(b_size * tau, n_ax), torch.maximum(n_s, tau))
        dres = n_rx / torch.maximum(torch.maximum(q_size * tau, n_px), torch.maximum(n_atz, tau))
        gap = gap_t.abs() / torch.minimum(pobj.abs(), dobj.abs()).clamp_min(1)
        worst = torch.maximum(torch.maximum(pres, dres), gap)
        residual = torch.where(running, worst, residual)
        # Certificates, normalised by the certificate's own objective (scale-free in z and x).
        # (the same terms against the full and, for a breakdown, the reduced tolerance)
        p_lhs, p_scale = n_atz * b_size, (-bz).clamp_min(tiny)
        d_lhs_A, d_lhs_P, d_scale = n_axs * q_size, n_px * q_size, (-qx).clamp_min(tiny)
        p_infeasible = (bz < 0) & (p_lhs <= tol_A * p_scale)
        d_infeasible = (qx < 0) & (d_lhs_A <= tol_A * d_scale) & (d_lhs_P <= tol_P * d_scale)
        p_almost = (bz < 0) & (p_lhs <= loose * tol_A * p_scale)
        d_almost = (qx < 0) & (d_lhs_A <= loose * tol_A * d_scale)
        d_almost = d_almost & (d_lhs_P <= loose * tol_P * d_scale)
        # A NaN or Inf anywhere in x, s, z reaches a norm (amax propagates NaN).
        nonfinite = ~torch.isfinite(worst + n_axs + tau + kappa)
        near = torch.where(d_almost, int(Status.UNBOUNDED), -1)
        near = torch.where(p_almost, int(Status.INFEASIBLE), near)
        almost = torch.where(nonfinite, almost, near)
        verdict = torch.where(d_infeasible, int(Status.UNBOUNDED), -1)
        verdict = torch.where(p_infeasible, int(Status.INFEASIBLE), verdict)
        verdict = torch.where(worst <= tol, int(Status.SOLVED), verdict)
        verdict = torch.where(nonfinite, _breakdown(almost), verdict)
        if best is not None:
            better = running & (worst < best[-1])
            keep_best = better.unsqueeze(-1)
            best = (
                *(torch.where(keep_best, v, b) for v, b in zip((x, s, z), best[:3])),
                *(torch.where(better, v, b) for v, b in zip((tau, kappa, worst), best[3:])),
            )
            stale = torch.where(better, 0, stale + 1)
            stalled = (best[-1] <= reduced) & (stale >= STALL_ITERATIONS) & (verdict < 0)
            verdict = torch.where(stalled, int(Status.NUMERICAL), verdict)
        status = torch.where(running, verdict, status)
        running = status < 0
        left = int(running.sum())  # the iteration's one host sync
        if left == 0:
            break
        if k >= settings.max_iter:  # every running member has taken k steps
            status = torch.where(running, int(Status.ITERATION_LIMIT), status)
            break
        if (size - left) * COMPACT_SHARE >= size:
            answers.store(members, x, s, z, tau, kappa, status, iterations, residual, best=best)
            keep = running.nonzero().squeeze(-1)
            if best is not None:
                best, stale = tuple(v[keep] for v in best), stale[keep]
            members = keep if members is None else members[keep]
            x, s, z, tau, kappa = x[keep], s[keep], z[keep], tau[keep], kappa[keep]
            status, iterations, residual = status[keep], iterations[keep], residual[keep]
            r_x, r_z, px, r_tau, xpx_t = r_x[keep], r_z[keep], px[keep], r_tau[keep], xpx_t[keep]
            q_size, b_size, tol_A, tol_P = (v[keep] for v in (q_size, b_size, tol_A, tol_P))
            almost = almost[keep]
            work = work.select(keep)
            work_dual = None if work_dual is None else work_dual.select(keep)
            running = torch.ones_like(running[keep])
            size = left
        iterations = iterations + running.long()

        # -------- one predictor-corrector step
        tk = tau * kappa
        mu = (cones.dot(s, z) + tk).div_(degree)
        e = cones.unit(s)
        if left < size:  # finished members keep a well-defined (unused) step
            safe = running.unsqueeze(-1)
            s_w, z_w = torch.where(safe, s, e), torch.where(safe, z, e)
        else:
            s_w, z_w = s, z
        scaling = cones.scaling(s_w, z_w)
        lam = scaling.apply(z_w)
        kkt = _KKT(work, scaling, eps, work_dual)
        status = torch.where(running & kkt.failed, _breakdown(almost), status)
        running = status < 0

        t = tau[:, None]
        xpx_i = xpx_t / tau
        step = _Step(work, kkt, settings.refinement, r_x, r_z, r_tau, px / t, xpx_i, tau, kappa)
        # predictor (affine scaling): d_s = s, d_kappa = tau kappa
        _, ds_a, dz_a, dtau_a, dkappa_a = step.direction(None, s_w, tk)
        alpha_a = step.to_boundary(s_w, z_w, ds_a, dz_a, dtau_a, dkappa_a).clamp_max(1)
        sigma = (1 - alpha_a) ** 3
        sigma_mu = sigma * mu
        # corrector: d_s = W (lambda \ (lambda o lambda + (W^{-1} ds_a) o (W dz_a) - sigma mu e))
        second = cones.circ(scaling.apply(ds_a, inverse=True), scaling.apply(dz_a))
        target = cones.circ(lam, lam) + second - sigma_mu[:, None] * e
        d_s = scaling.apply(cones.circ_solve(lam, target))
        d_kappa = torch.addcmul(tk, dtau_a, dkappa_a).sub_(sigma_mu)
        dx, ds, dz, dtau, dkappa = step.direction(1 - sigma, d_s, d_kappa)
        alpha = step.to_boundary(s_w, z_w, ds, dz, dtau, dkappa)
        alpha = (settings.step_fraction * alpha).clamp_max(1)
        # Clamped above, so only a NaN step is not finite; stopped problems do not move.
        alpha = torch.where(running, alpha.nan_to_num(0.0), 0.0)
        a = alpha[:, None]
        x = torch.addcmul(x, a, dx)
        s = torch.addcmul(s, a, ds)
        z = torch.addcmul(z, a, dz)
        tau = torch.addcmul(tau, alpha, dtau)
        kappa = torch.addcmul(kappa, alpha, dkappa)

    answers.store(members, x, s, z, tau, kappa, status, iterations, residual, best=best)
    if answers.best is not None:
        _fall_back_to_best(answers, reduced)
    t = answers.tau[:, None]
    xb, sb, zb = answers.x / t, answers.s / t, answers.z / t
    q = data.q.expand(batch, -1)
    objective = 0.5 * _dot(xb, _p_times(data, xb)) + _dot(q, xb)
    result = IPMResult(xb, sb, zb, answers.status, answers.iterations, objective, answers.residual)
    return result, answers.kappa / answers.tau


def _breakdown(almost: Tensor) -> Tensor:
    """The status of problems whose iteration broke down (a failed factorisation, a non-finite
    iterate): the certificate their last finite iterate nearly satisfied, else ``NUMERICAL``."""
    return torch.where(almost >= 0, almost, int(Status.NUMERICAL))


def _fall_back_to_best(answers: _Answers, reduced: float) -> None:
    """Problems that broke down or ran out of iterations after their best iterate reached the
    reduced tolerance ``reduced`` are answered by that iterate, as solved to its residual."""
    x, s, z, tau, kappa, residual = answers.best  # type: ignore[misc]
    failed = (answers.status == int(Status.NUMERICAL)) | (
        answers.status == int(Status.ITERATION_LIMIT)
    )
    fall = failed & (residual <= reduced)
    row = fall.unsqueeze(-1)
    answers.x = torch.where(row, x, answers.x)
    answers.s = torch.where(row, s, answers.s)
    answers.z = torch.where(row, z, answers.z)
    answers.tau = torch.where(fall, tau, answers.tau)
    answers.kappa = torch.where(fall, kappa, answers.kappa)
    answers.residual = torch.where(fall, residual, answers.residual)
    answers.status = torch.where(fall, int(Status.SOLVED), answers.status)


POLISH_ROUNDS = 3
"""Active-set guesses per polish: a row the polished point holds with a wrong-sign multiplier is
released (as the torch backend's polish does), a row it violates is held, and the solve
repeated (measured on Huber pooling n=64, 128 problems: the first guess at the interior point's
early stop misses a row that is active in 51 problems, whose resumed interior point cost more
than the polish; a second guess finishes them)."""


def _polish(
    data: ConeData, result: IPMResult, settings: Settings, dual: _DualBase | None = None
) -> tuple[IPMResult, Tensor]:
    """The exact solution on the active set the interior point identifies (as OSQP polishes).

    An interior-point answer sits ``~mu`` inside the cone: ``s_i z_i ~ mu`` on every row, so an
    inactive inequality carries a multiplier ``mu / s_i`` and a nearly degenerate one is off by
    ``sqrt(mu)``. Rows with ``z_i > s_i`` (equilibrated units) are taken as active: one
    equality-constrained solve ``[P, A_act^T; A_act, 0] [x; z] = [-q; b_act]`` gives the exact
    point, which replaces the answer where it is primal feasible on the other rows, its
    multipliers have the right sign and its stationarity and active rows hold (all to the
    tolerance, each against the size of its own terms); a row held with a wrong-sign multiplier
    is released and the solve repeated (:data:`POLISH_ROUNDS`); elsewhere the answer is kept.
    Returns the result and which problems ``(B,)`` were polished (their ``residual`` is the
    polished point's).
    """
    cones = data.cones
    rows, zero = cones.rows, cones.zero
    solved = result.status == int(Status.SOLVED)
    if not bool(solved.any()) or rows == 0:
        return result, torch.zeros_like(solved)
    x, s, z = result.x, result.s, result.z
    active = z > s
    active[:, :zero] = True
    batch = data.batch
    q = data.q.expand(batch, -1)
    tol = settings.tol
    q_size, b_size, A_size, _ = _norms(data)
    eps = STATIC_REGULARISATION[x.dtype]
    # The block-arrow polish solves the delta-regularised system and refines towards delta = 0,
    # where a rank-one row weighs 1 / delta: up to five passes, stopping once the corrections
    # reach rounding (measured: with two, 1-2 of 6 random QPs with a budget row missed the
    # exactness check and kept their interior answer; with three, 64 of 128 simplex
    # projections d=256 did, answers 1.7e-6 off; five polish all).
    refinement = max(settings.refinement or 0, 5 if data.arrow is not None else 2)
    settled = 64 * torch.finfo(x.dtype).eps if data.arrow is not None else None
    pending = solved.clone()
    polished = torch.zeros_like(solved)
    out_x, out_s, out_z, out_residual = x, s, z, result.residual
    for _ in range(POLISH_ROUNDS):
        mask = active.to(x.dtype)
        b = data.b.expand(batch, -1) * mask
        if data.arrow is not None:
            # [P, A^T; A, -delta I] on the active rows by the block-arrow factors (the
            # equalities' dense Schur complement would be rows x rows), refined towards
            # delta = 0 as OSQP's polish is; the dropped rows get H = inf (so z = 0 there),
            # which leaves A as it is (shared, its structural entries gathered once).
            equalities = dataclasses.replace(data, q=q, b=b, cones=type(cones)(0, rows))
            delta = torch.where(active, eps, torch.inf).to(x.dtype)
            kkt = _KKT(equalities, None, eps, h_diagonal=delta, exact_h=torch.zeros_like(mask))
        else:
            A = data.A.expand(batch, -1, -1) * mask.unsqueeze(-1)
            equalities = ConeData(data.P, q, A, b, type(cones)(rows, 0), data.P_scale)
            if dual is None:
                kkt = _KKT(equalities, None, eps)
            else:  # row space: the dropped rows get H = 1 (so z = 0 there), K0 masked
                kkt = _KKT(equalities, None, eps, dual, h_diagonal=1 - mask, row_mask=mask)
        xp, zp = kkt.solve(-q.unsqueeze(-1), b.unsqueeze(-1), refinement, settled)
        xp, zp = xp.squeeze(-1), zp.squeeze(-1) * mask
        axp = _a_times(data, xp)
        sp = data.b - axp
        # The solve's own residuals (stationarity; the active rows), as the interior point
        # measures them: a singular active set (more active rows than the point can hold)
        # fails here rather than being taken.
        pxp, atzp = _p_times(data, xp), _at_times(data, zp)
        n_rx, n_px, n_atz = _inf_norms(pxp + atzp + q, pxp, atzp)
        n_ract, n_ax = _inf_norms(sp * mask, axp)
        dres = n_rx / torch.maximum(torch.maximum(q_size, n_px), n_atz).clamp_min(1)
        pres = n_ract / torch.maximum(b_size, n_ax).clamp_min(1)
        exact = (dres <= tol) & (pres <= tol)
        sp = torch.where(active, torch.zeros_like(sp), sp)
        # Accept where the other rows stay feasible and the multipliers keep their sign, both
        # relative to the data's sizes, floored at the equilibrated unit 1.
        slack_floor = tol * (b_size + A_size * _inf_norm(xp)).clamp_min(1).unsqueeze(-1)
        violated = torch.zeros_like(active)
        violated[:, zero:] = sp[:, zero:] < -slack_floor
        slack_ok = ~violated.any(-1)
        z_floor = tol * torch.maximum(_inf_norm(zp), q_size).clamp_min(1).unsqueeze(-1)
        wrong_sign = torch.zeros_like(active)
        wrong_sign[:, zero:] = zp[:, zero:] < -z_floor
        finite = torch.isfinite(xp).all(-1) & torch.isfinite(zp).all(-1) & ~kkt.failed
        take = pending & slack_ok & ~wrong_sign.any(-1) & finite & exact
        polished = polished | take
        out_residual = torch.where(take, torch.maximum(dres, pres), out_residual)
        keep = take.unsqueeze(-1)
        out_x = torch.where(keep, xp, out_x)
        out_s = torch.where(keep, sp.clamp_min(0), out_s)
        polished_z = torch.cat([zp[:, :zero], zp[:, zero:].clamp_min(0)], 1)
        out_z = torch.where(keep, polished_z, out_z)
        pending = pending & ~take & finite & (wrong_sign.any(-1) | violated.any(-1))
        if not bool(pending.any()):
            break
        # The next guess, as a primal-dual active-set step: release the rows held with a
        # wrong-sign multiplier, hold the rows the point violates.
        retry = pending.unsqueeze(-1)
        active = (active & ~(wrong_sign & retry)) | (violated & retry)
    objective = _dot(q, out_x)
    if data.P is not None:
        objective = objective + 0.5 * _dot(out_x, _p_times(data, out_x))
    polished_result = IPMResult(
        out_x, out_s, out_z, result.status, result.iterations, objective, out_residual
    )
    return polished_result, polished
