"""Batched linear solves for the implicit backward, with an explicit policy for bad systems.

The KKT matrix of a problem is symmetric, so one eigendecomposition per problem tells everything:
whether the system is singular (an eigenvalue below ``rcond * max|eigenvalue|``), and whether the
Hessian is positive definite on the null space of the active constraints (the second-order
sufficient condition: exactly ``m`` positive and ``k`` negative eigenvalues of the bordered matrix).
Well-posed systems are solved exactly; singular ones by the minimum-norm least-squares solution
(pseudo-inverse), and both facts are reported per problem, never hidden.

For large systems :func:`conjugate_gradient` solves ``H w = v`` matrix-free from Hessian-vector
products and reports problems whose curvature turned out non-positive; :func:`minres` solves the
symmetric indefinite KKT systems matrix-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from declopt.batched import abs_max, bmtv, bmv
from declopt.kkt.jacobian import RowJacobian

DENSE_MAX = 128
"""Up to this many variables, Newton and KKT systems are formed and factored; above, Krylov
methods run on Hessian-vector products (the backward, the constrained polish and the nonsmooth
finish alike; measurements in benchmarks/README.md)."""


@dataclass(frozen=True)
class LinearSolver:
    """How the Newton and KKT systems of a problem with ``m`` variables are solved.

    Attributes:
        kind: ``"dense"`` (form the matrix; eigendecomposition in the backward, which also counts
            its inertia, LU in solver steps), ``"krylov"`` (CG / MINRES on Hessian-vector
            products; the Hessian is never formed) or ``"auto"`` (dense up to ``dense_max``
            variables).
        dense_max: the ``"auto"`` threshold.
    """

    kind: str = "auto"
    dense_max: int = DENSE_MAX

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "dense", "krylov"):
            raise ValueError(
                f"LinearSolver kind must be 'auto', 'dense' or 'krylov', got {self.kind!r}"
            )
        if not isinstance(self.dense_max, int) or self.dense_max < 0:
            raise ValueError(f"dense_max must be a nonnegative int, got {self.dense_max!r}")

    def is_dense(self, m: int) -> bool:
        """Whether systems with ``m`` variables are formed densely."""
        return self.kind == "dense" or (self.kind == "auto" and m <= self.dense_max)


@dataclass
class LinearSolveReport:
    """Per-problem facts about one batched solve (all tensors ``(B,)``).

    Attributes:
        method: ``"eigh"`` (dense symmetric) or matrix-free: ``"cg"``, ``"minres"``,
            ``"diagonal"``, ``"diagonal+minres"``, ``"projected"``, ``"projected+minres"``
            (:func:`kkt_minres`).
        singular: the system was singular or numerically so; the minimum-norm least-squares
            solution was used, so the gradient is one of many (directions in the null space are 0).
        second_order_ok: the Hessian is positive definite on the null space of the active
            constraints (a strict local minimum); ``False`` means the solution is a saddle point or
            degenerate and the implicit gradient describes that stationary point.
        residual: ``max |K z - r|`` relative to ``max |r|``.
    """

    method: str
    singular: Tensor
    second_order_ok: Tensor
    residual: Tensor


def default_rcond(dtype: torch.dtype, size: int) -> float:
    """Relative eigenvalue cut-off below which a system counts as singular."""
    return 10.0 * max(size, 1) * torch.finfo(dtype).eps


def solve_symmetric(
    matrix: Tensor, rhs: Tensor, num_negative_expected: Tensor | int = 0, rcond: float | None = None
) -> tuple[Tensor, LinearSolveReport]:
    """Solve ``matrix @ z = rhs`` for a batch of symmetric matrices.

    Args:
        matrix: ``(B, n, n)`` symmetric.
        rhs: ``(B, n)``.
        num_negative_expected: per problem (or shared) number of negative eigenvalues that a
            well-posed KKT matrix has (the number of active constraints ``k``); ``0`` for a plain
            Hessian.
        rcond: eigenvalues with ``|lambda| <= rcond * max|lambda|`` count as zero.
    Returns:
        ``z: (B, n)`` and the report.

    Under grad mode (a differentiable backward, for second derivatives) the well-posed systems
    are solved by LU, whose derivative is well defined where eigenvectors are not (repeated
    eigenvalues, as in ``H = c I``); the eigendecomposition then only judges the systems.
    """
    n = matrix.shape[-1]
    rcond = default_rcond(matrix.dtype, n) if rcond is None else rcond
    # eigh reads one triangle only; symmetrise so autodiff rounding asymmetry is averaged.
    sym = (matrix + matrix.transpose(-1, -2)).mul_(0.5)  # one fresh (B, n, n), not two
    expected = torch.as_tensor(num_negative_expected, device=matrix.device)
    # The LDL path decides per batch (data-dependent control flow), which functorch transforms
    # (vmap, jacfwd through the layer) cannot trace.
    if not torch.is_grad_enabled() and n > 1 and not torch._C._are_functorch_transforms_active():
        fast = _solve_by_cholesky(sym, rhs, rcond) if not bool(expected.any()) else None
        fast = _solve_by_ldl(sym, rhs, rcond, expected) if fast is None else fast
        if fast is not None:
            return fast
    return _solve_by_eigh(sym, rhs, rcond, expected)


def _solve_by_cholesky(
    sym: Tensor, rhs: Tensor, rcond: float
) -> tuple[Tensor, LinearSolveReport] | None:
    """Cholesky for a batch of clearly positive definite matrices (a plain Hessian at a strict
    minimum: Bunch-Kaufman's flops without its pivoting, and no inertia to count), by the rule
    of :func:`_solve_by_schur`; ``None`` unless every matrix qualifies."""
    solution, _, clear, residual = _solve_by_schur(_HeldBlocks.without_rows(sym, rhs), rcond)
    if not bool(clear.all()):
        return None
    return solution, LinearSolveReport("eigh", ~clear, clear, residual)


LDL_MARGIN = 1e3
"""The Bunch-Kaufman path (:func:`_solve_by_ldl`) answers a system only when its smallest block
eigenvalue of ``D`` clears the singularity cut-off by this factor and its residual is at rounding
level; the rest go to the eigendecomposition, which decides singularity exactly as before."""


def _ldl_block_eigenvalues(LD: Tensor, pivots: Tensor) -> Tensor:
    """``(B, n)`` the eigenvalues of the block-diagonal ``D`` of a Bunch-Kaufman factorisation
    (LAPACK ``sytrf``, lower): a 1x1 block where the pivot is positive, a 2x2 block on each
    pair of equal negative pivots (a run of ``2m`` equal ones is ``m`` pairs from its start).
    ``D`` is congruent to the matrix, so it has the matrix's inertia (Sylvester)."""
    d = LD.diagonal(dim1=-2, dim2=-1)
    off = LD.diagonal(offset=-1, dim1=-2, dim2=-1)
    n = d.shape[-1]
    index = torch.arange(n, device=d.device).expand_as(pivots)
    previous = torch.cat([torch.zeros_like(pivots[:, :1]), pivots[:, :-1]], -1)
    starts = (pivots > 0) | (pivots != previous) | (index == 0)
    run_start = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values
    first = (pivots < 0) & ((index - run_start) % 2 == 0)
    first = first & (index < n - 1)
    a, c = d[:, :-1], d[:, 1:]
    mean, half = 0.5 * (a + c), 0.5 * (a - c)
    radius = torch.sqrt(half * half + off * off)
    values = d.clone()
    pair = first[:, :-1]
    values[:, :-1] = torch.where(pair, mean - radius, values[:, :-1])
    second = torch.cat([torch.zeros_like(pair[:, :1]), pair], -1)
    shifted = torch.cat([torch.zeros_like(mean[:, :1]), mean + radius], -1)
    return torch.where(second, shifted, values)


def _solve_by_ldl(
    sym: Tensor, rhs: Tensor, rcond: float, expected: Tensor
) -> tuple[Tensor, LinearSolveReport] | None:
    """Bunch-Kaufman ``LDL^T`` for the clearly nonsingular systems (~10x cheaper than ``eigh``
    at KKT sizes), with the inertia from ``D``; ``None`` unless every system qualifies (the
    batch then goes to :func:`_solve_by_eigh` whole, so one rule decides singularity)."""
    LD, pivots, info = torch.linalg.ldl_factor_ex(sym)
    values = _ldl_block_eigenvalues(LD, pivots)
    size = values.abs().amax(-1, keepdim=True)
    tiny = torch.finfo(sym.dtype).tiny
    clear = (values.abs() > LDL_MARGIN * rcond * size.clamp_min(tiny)).all(-1)
    clear = clear & (info == 0) & torch.isfinite(values).all(-1)
    if not bool(clear.all()):
        return None
    solution = torch.linalg.ldl_solve(LD, pivots, rhs.unsqueeze(-1)).squeeze(-1)
    residual = _relative_residual(sym @ solution.unsqueeze(-1), rhs)
    n = sym.shape[-1]
    if not bool((residual <= LDL_MARGIN * n * torch.finfo(sym.dtype).eps).all()):
        return None
    singular = torch.zeros_like(clear)
    second_order_ok = (values < 0).sum(-1) == expected
    return solution, LinearSolveReport("eigh", singular, second_order_ok, residual)


def _solve_by_eigh(
    sym: Tensor, rhs: Tensor, rcond: float, expected: Tensor
) -> tuple[Tensor, LinearSolveReport]:
    """The eigendecomposition: minimum-norm solutions of singular systems, exact inertia.

    A matrix with a NaN or an infinity (a Hessian evaluated where the declaration is not
    differentiable) has no eigendecomposition, and LAPACK's failure would end the whole batch:
    it is decomposed as the identity, and its problem answered NaN and reported singular."""
    differentiable = torch.is_grad_enabled()
    finite = torch.isfinite(sym).flatten(-2).all(-1)
    if not bool(finite.all()):
        eye = torch.eye(sym.shape[-1], dtype=sym.dtype, device=sym.device)
        sym = torch.where(finite[:, None, None], sym, eye)
    eigenvalues, eigenvectors = robust_eigh(sym.detach() if differentiable else sym)
    scale = eigenvalues.abs().amax(dim=-1, keepdim=True)
    tiny = torch.finfo(sym.dtype).tiny
    zero = eigenvalues.abs() <= rcond * scale.clamp_min(tiny)
    singular = zero.any(dim=-1)
    inverse = torch.where(
        zero, torch.zeros_like(eigenvalues), 1.0 / torch.where(zero, 1.0, eigenvalues)
    )
    coeffs = (eigenvectors.transpose(-1, -2) @ rhs.unsqueeze(-1)).squeeze(-1) * inverse
    solution = (eigenvectors @ coeffs.unsqueeze(-1)).squeeze(-1)
    if differentiable and not bool(singular.all()):
        exact = torch.linalg.solve_ex(sym, rhs)[0]
        solution = torch.where(singular.unsqueeze(-1), solution, exact)

    num_negative = (eigenvalues < 0).sum(dim=-1)
    second_order_ok = (num_negative == expected) & ~singular
    residual = _relative_residual(sym @ solution.unsqueeze(-1), rhs)
    if not bool(finite.all()):
        nan = torch.full_like(solution, float("nan"))
        solution = torch.where(finite.unsqueeze(-1), solution, nan)
        singular, second_order_ok = singular | ~finite, second_order_ok & finite
        residual = torch.where(finite, residual, torch.full_like(residual, float("inf")))
    report = LinearSolveReport("eigh", singular, second_order_ok, residual)
    return solution, report


def scalar_solve(h: Tensor, v: Tensor) -> tuple[Tensor, LinearSolveReport]:
    """:func:`solve_symmetric` for ``1 x 1`` systems ``h w = v``, ``(B, 1)`` each, without the
    eigendecomposition: ``w = v / h``, and ``w = 0`` where ``h`` is singular."""
    h1, v1 = h.squeeze(-1), v.squeeze(-1)
    singular = scalar_singular(h1)
    w = torch.where(singular, torch.zeros_like(v1), v1 / torch.where(singular, 1.0, h1))
    residual = (h1 * w - v1).abs() / v1.abs().clamp_min(torch.finfo(h.dtype).tiny)
    return w.unsqueeze(-1), LinearSolveReport("eigh", singular, (h1 > 0) & ~singular, residual)


def scalar_singular(h: Tensor) -> Tensor:
    """Where a ``1 x 1`` system ``h`` counts as singular (the cut-off of :func:`solve_symmetric`;
    a lone eigenvalue is its own scale, so only an exact or subnormal zero is singular)."""
    tiny = torch.finfo(h.dtype).tiny
    return h.abs() <= default_rcond(h.dtype, 1) * h.abs().clamp_min(tiny)


def solve_newton(matrix: Tensor, rhs: Tensor) -> Tensor:
    """``matrix @ z = rhs`` for a batch of (symmetric) Newton/KKT systems, ``(B, n, n)``,
    ``(B, n)``, by LU; problems whose LU fails or is not finite are solved by
    :func:`solve_symmetric` (minimum-norm least squares). For solver steps, which need no inertia
    or singularity report: LU is several times faster than the eigendecomposition."""
    z, info = torch.linalg.solve_ex(matrix, rhs)
    return _min_norm_where((info != 0) | ~torch.isfinite(z).all(-1), z, matrix, rhs)


def _min_norm_where(bad: Tensor, z: Tensor, matrix: Tensor, rhs: Tensor) -> Tensor:
    """``z`` with the problems in ``bad`` (``(B,)``) re-solved by :func:`solve_symmetric`."""
    if bool(bad.any()):
        z = z.clone()
        z[bad] = solve_symmetric(matrix[bad], rhs[bad])[0]
    return z


def bordered_kkt(hess: Tensor, jac: Tensor, mask: Tensor) -> Tensor:
    """``[[H, A^T], [A, D]]`` with ``D = 1`` on padded (inactive) rows so they solve to zero."""
    batch, m, _ = hess.shape
    k = jac.shape[1]
    top = torch.cat([hess, jac.transpose(-1, -2)], -1)
    corner = torch.diag_embed((~mask).to(hess.dtype))
    bottom = torch.cat([jac, corner], -1)
    return torch.cat([top, bottom], -2).reshape(batch, m + k, m + k)


def solve_held_kkt(
    hess: Tensor,
    jac: RowJacobian,
    held: Tensor,
    top: Tensor,
    bottom: Tensor,
    *,
    step: bool = False,
) -> tuple[Tensor, Tensor, LinearSolveReport | None]:
    """Solve ``[[H, A^T], [A, 0]] [w; z] = [top; bottom]`` on each problem's held rows:
    ``(w (B, m), z (B, k), report)``, ``z`` zero on the rows not held. ``hess: (B, m, m)``,
    ``jac`` the ``(B, k, m)`` rows, ``held: (B, k)``.

    The held rows are gathered to the front and padded to the batch's largest count ``r``
    (zero in ``A``, one on the diagonal: padding solves to zero); a batch holding few of many
    rows (the kinks of a truncated quadratic: ``k = n``, one or two held) solves ``m + r``
    unknowns, not ``m + k``. The system is equilibrated by blocks (:func:`kkt_block_scales`).

    Where ``H`` is positive definite and the held rows independent (a strict minimum with
    independent constraints: the common case), by its Schur complement: Cholesky of ``H``
    and of ``A H^-1 A^T`` (the flops of Bunch-Kaufman on the bordered matrix, ``(m + r)^3 /
    3``, but in Cholesky and triangular kernels, without pivoting: 64 systems of ``m = 50, r ~
    27``, refinement and checks included, 7.5 -> 5.5 ms). Such a system has
    exactly ``m`` positive and ``r`` negative eigenvalues, so its inertia needs no count. The
    other problems (an indefinite ``H``, dependent or near-dependent rows, a residual above
    rounding) fall back to the bordered matrix: :func:`solve_symmetric` (singularity and
    inertia reported) or, with ``step`` (a solver's Newton step, no report: ``None``),
    :func:`solve_newton`. Under autograd or functorch transforms every problem takes the
    bordered path (its per-problem choice is data-dependent control flow)."""
    blocks = _HeldBlocks.of(hess, jac, held, top, bottom)
    batch, m = top.shape
    r = blocks.row_mask.shape[-1]
    expected = held.sum(-1)
    traced = torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()
    if traced:
        clear = torch.zeros(batch, dtype=torch.bool, device=top.device)
    else:
        w, z, clear, residual = _solve_by_schur(blocks, default_rcond(hess.dtype, m + r))
        if bool(clear.all()):
            ok = torch.ones_like(clear)
            report = None if step else LinearSolveReport("eigh", ~ok, ok, residual)
            return *blocks.split(w, z), report
    rest = ~clear
    sub = blocks.select(rest)
    matrix = bordered_kkt(sub.hess, sub.jac, sub.row_mask)
    rhs = torch.cat([sub.top, sub.bottom], -1)
    if step:
        solution, sub_report = solve_newton(matrix, rhs), None
    else:
        solution, sub_report = solve_symmetric(matrix, rhs, expected[rest])
    if bool(rest.all()):
        return *blocks.split(solution[:, :m], solution[:, m:]), sub_report
    w, z = w.clone(), z.clone()
    w[rest], z[rest] = solution[:, :m], solution[:, m:]
    report = None
    if sub_report is not None:
        singular = torch.zeros_like(clear)
        singular[rest] = sub_report.singular
        ok = torch.ones_like(clear)
        ok[rest] = sub_report.second_order_ok
        residual = residual.clone()
        residual[rest] = sub_report.residual
        report = LinearSolveReport("eigh", singular, ok, residual)
    return *blocks.split(w, z), report


@dataclass(frozen=True)
class _HeldBlocks:
    """A held-row KKT system by blocks, compacted and equilibrated (:func:`solve_held_kkt`):
    ``hess (B, m, m)``, ``jac (B, r, m)`` (zero rows where ``row_mask`` is False), ``top (B,
    m)``, ``bottom (B, r)`` (zero on padding), all scaled; ``rows (B, r)`` the held rows' indices
    among the ``k``; ``u_scale``, ``c_scale`` ``(B, 1)`` the block scales."""

    hess: Tensor
    jac: Tensor
    row_mask: Tensor
    top: Tensor
    bottom: Tensor
    rows: Tensor
    u_scale: Tensor
    c_scale: Tensor
    k: int

    @classmethod
    def of(
        cls, hess: Tensor, jac: RowJacobian, held: Tensor, top: Tensor, bottom: Tensor
    ) -> _HeldBlocks:
        rows, row_mask = compact_rows(held)
        mask = row_mask.to(hess.dtype)
        rows_jac = jac.rows(rows, row_mask)
        s_u, s_c = kkt_block_scales(hess, rows_jac)
        u_scale, c_scale = s_u[:, None], s_c[:, None]
        return cls(
            hess * (u_scale * u_scale).unsqueeze(-1),
            rows_jac * (u_scale * c_scale).unsqueeze(-1),
            row_mask,
            top * u_scale,
            bottom.gather(1, rows) * mask * c_scale,
            rows,
            u_scale,
            c_scale,
            held.shape[-1],
        )

    @classmethod
    def without_rows(cls, hess: Tensor, top: Tensor) -> _HeldBlocks:
        """``H w = top`` as blocks: no rows, unit scales."""
        batch, m = top.shape
        none = hess.new_zeros(batch, 0)
        ones = hess.new_ones(batch, 1)
        return cls(
            hess, hess.new_zeros(batch, 0, m), none.bool(), top, none, none.long(), ones, ones, 0
        )

    def select(self, which: Tensor) -> _HeldBlocks:
        """The problems ``which (B,)`` (a mask)."""
        return _HeldBlocks(
            self.hess[which],
            self.jac[which],
            self.row_mask[which],
            self.top[which],
            self.bottom[which],
            self.rows[which],
            self.u_scale[which],
            self.c_scale[which],
            self.k,
        )

    def split(self, w: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """The unknowns in the caller's units: ``(w (B, m), z (B, k))``, ``z`` zero where no row
        is held."""
        values = z * self.row_mask.to(z.dtype) * self.c_scale
        out = torch.zeros(z.shape[0], self.k, dtype=z.dtype, device=z.device)
        return w * self.u_scale, out.scatter(1, self.rows, values)


def _solve_by_schur(blocks: _HeldBlocks, rcond: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(w (B, m), z (B, r), clear (B,), residual (B,))`` of the scaled blocks by the Schur
    complement ``S = A H^-1 A^T`` (padding rows: ``S_ii = 1``, decoupled). ``clear``: both
    Cholesky factorisations succeeded, every pivot of each clears the singularity cut-off by
    :data:`LDL_MARGIN` relative to that factor's largest (the rule of :func:`_solve_by_ldl`),
    and the bordered residual is at rounding level; elsewhere the values are not to be used.

    ``w = H^-1 (t - A^T z)`` cancels where the rows pin most of ``w`` (``|w| << |H^-1 t|``): its
    error is rounding of ``|H^-1 t|``, not of ``|w|``. One step of iterative refinement on the
    same factors (the residual is formed for the test anyway) brings it to rounding of the
    solution, as the bordered factorisations give."""
    hess, jac, row_mask = blocks.hess, blocks.jac, blocks.row_mask
    top, bottom = blocks.top, blocks.bottom
    pad = (~row_mask).to(hess.dtype)
    has_rows = jac.shape[1] > 0
    tiny = torch.finfo(hess.dtype).tiny
    cut = LDL_MARGIN * rcond

    def clear_pivots(factor: Tensor, valid: Tensor | None = None) -> Tensor:
        pivots = factor.diagonal(dim1=-2, dim2=-1).square()
        if valid is not None:  # padding pivots are exactly 1 and say nothing: the largest
            pivots = torch.where(valid, pivots, pivots.amax(-1, keepdim=True))
        size = pivots.amax(-1).clamp_min(tiny)
        return (pivots.amin(-1) > cut * size) & torch.isfinite(pivots).all(-1)

    factor, info = torch.linalg.cholesky_ex(hess)
    ok = (info == 0) & clear_pivots(factor)
    if has_rows:
        y = torch.linalg.solve_triangular(factor, jac.transpose(-1, -2), upper=False)  # L^-1 A'
        schur = y.mT @ y
        schur.diagonal(dim1=-2, dim2=-1).add_(pad)
        s_factor, s_info = torch.linalg.cholesky_ex(schur)
        # Each factor against its own largest pivot: S = A H^-1 A^T has the units of H^-1, and
        # an ill-conditioned H makes S's pivots large, not the bordered system singular.
        ok = ok & (s_info == 0) & clear_pivots(s_factor, row_mask)

    def solve(t: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.linalg.solve_triangular(factor, t.unsqueeze(-1), upper=False)  # L^-1 t
        if has_rows:
            z = torch.cholesky_solve(bmtv(y, g).sub_(b.unsqueeze(-1)), s_factor)
            g = g - bmv(y, z)
            z = z.squeeze(-1)
        else:
            z = b.new_zeros(b.shape)
        w = torch.linalg.solve_triangular(factor.mT, g, upper=True)
        return w.squeeze(-1), z

    def residual(w: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        top_res = top - bmv(hess, w)
        bottom_res = bottom - pad * z
        if has_rows:
            top_res = top_res - bmtv(jac, z)
            bottom_res = bottom_res - bmv(jac, w)
        return top_res, bottom_res

    w, z = solve(top, bottom)
    dw, dz = solve(*residual(w, z))
    w, z = w + dw, z + dz
    worst = abs_max(torch.cat(residual(w, z), -1), -1)
    relative = worst / abs_max(torch.cat([top, bottom], -1), -1).clamp_min(tiny)
    n = top.shape[-1] + bottom.shape[-1]
    ok = ok & torch.isfinite(relative) & (relative <= LDL_MARGIN * n * torch.finfo(hess.dtype).eps)
    return w, z, ok, relative


def kkt_block_scales(hess: Tensor, jac: Tensor) -> tuple[Tensor, Tensor]:
    """``(s_u (B,), s_c (B,))``, powers of two (exact scalings) that bring ``[[H, A^T], [A, 0]]``
    to ``[[s_u^2 H, s_u s_c A^T], [s_u s_c A, 0]]`` with both blocks' largest entries near 1.

    Without it the two blocks' units set the system's condition: projecting ``x`` onto the
    sphere of radius ``r`` gives ``H = 2 |x| / r I`` against ``A = 2 y^T``, condition ``(|x| /
    r)^2``, and in float32 at ``|x| = 1000 r`` the implicit gradient was 3-1200 times its size
    off. One scale per block keeps the minimum-norm multipliers of a singular system
    minimum-norm (every row is scaled alike). ``hess (B, m, m)``, ``jac (B, r, m)``; a zero (or
    non-finite) block gets 1.
    """
    h = abs_max(hess, (-2, -1)) if hess.numel() else hess.new_zeros(hess.shape[0])
    a = abs_max(jac, (-2, -1)) if jac.numel() else jac.new_zeros(jac.shape[0])
    return _block_scales(h, a, hess.dtype)


def _block_scales(h: Tensor, a: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`kkt_block_scales` from the blocks' sizes ``h``, ``a`` ``(B,)``."""

    def power_of_two(size: Tensor, exponent: Tensor) -> Tensor:
        usable = torch.isfinite(exponent) & (size > 0)
        return torch.where(usable, torch.exp2(-torch.round(exponent)), torch.ones_like(size))

    h, a = h.to(dtype), a.to(dtype)
    s_u = power_of_two(h, torch.log2(h) / 2)
    return s_u, power_of_two(a, torch.log2(a * s_u))


def compact_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per problem, the indices of its ``True`` rows first, cut to the batch's largest count.

    Returns ``(rows (B, k_max), row_mask (B, k_max))``; padded slots repeat some row index with
    ``row_mask`` False, so gathers stay in range and padding is masked out.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    k_max = int(mask.sum(-1).max()) if mask.numel() else 0
    rows = order[:, :k_max]
    return rows, mask.gather(1, rows)


def masked_least_squares(jac: RowJacobian | Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Least-squares ``lambda`` of ``A^T lambda = target`` over the rows of ``A`` in ``mask``.

    ``jac: (B, k, m)`` (a tensor or a :class:`~declopt.kkt.jacobian.RowJacobian`), ``target:
    (B, m)``, ``mask: (B, k)``; rows outside ``mask`` get 0. Dependent rows give the
    minimum-norm multipliers. Up to :data:`DENSE_LEAST_SQUARES_MAX` rows held, the normal
    equations are formed on the compacted held rows; beyond, CG runs on products with ``A``
    (cheap for index-set rows), dense only for the problems where it does not converge.
    """
    jac = RowJacobian.of_dense(jac) if isinstance(jac, Tensor) else jac
    batch, k = mask.shape
    if k == 0:
        return target.new_zeros(batch, 0).to(jac.dtype)
    rows, row_mask = compact_rows(mask)
    if rows.shape[1] == 0:
        return target.new_zeros(batch, k).to(jac.dtype)
    # The normal equations square the condition number (many tied kinks make it large): form and
    # solve them in float64 whatever the data's dtype.
    wide = torch.promote_types(jac.dtype, torch.float64)
    if rows.shape[1] <= DENSE_LEAST_SQUARES_MAX:
        active = jac.rows(rows, row_mask).to(wide)
        rhs = (active @ target.to(wide).unsqueeze(-1)).squeeze(-1)
        lam = _dense_normal(active, rhs, (~row_mask).to(wide))
        return target.new_zeros(batch, k).to(jac.dtype).scatter(1, rows, lam.to(jac.dtype))
    # Forming A A^T costs k^2 m; CG needs two products with A per iteration, and held rows of
    # kinks and constraints are usually near-orthogonal (few iterations).
    held = jac.to(wide).masked(mask)
    pad = (~mask).to(wide)
    rhs = held.matvec(target.to(wide))

    def normal_product(z: Tensor) -> Tensor:
        return held.matvec(held.rmatvec(z)) + pad * z

    lam, report = conjugate_gradient(normal_product, rhs, max_iter=LEAST_SQUARES_CG_ITER)
    slow = report.singular  # not converged: dense for those problems
    if bool(slow.any()):
        lam = lam.clone()
        sub_rows, sub_mask = rows[slow], row_mask[slow]
        active = held.select(slow.nonzero().squeeze(-1)).rows(sub_rows, sub_mask)
        sub_rhs = (active @ target[slow].to(wide).unsqueeze(-1)).squeeze(-1)
        fit = _dense_normal(active, sub_rhs, (~sub_mask).to(wide))
        lam[slow] = torch.zeros_like(lam[slow]).scatter(1, sub_rows, fit * sub_mask)
    return (lam * mask).to(jac.dtype)


DENSE_LEAST_SQUARES_MAX = DENSE_MAX
"""Up to this many active rows, least-squares multipliers solve the normal equations densely."""
LEAST_SQUARES_CG_ITER = 50


def _dense_normal(active: Tensor, rhs: Tensor, pad: Tensor) -> Tensor:
    """Solve ``(A A^T + diag(pad)) z = rhs`` densely (padding rows solve to zero)."""
    normal = active @ active.transpose(-1, -2)
    return _solve_psd(normal + torch.diag_embed(pad), rhs)


def _solve_psd(matrix: Tensor, rhs: Tensor) -> Tensor:
    """``matrix @ z = rhs`` for symmetric positive semidefinite ``(B, n, n)``: Cholesky (a third
    of LU, ~25x cheaper than an eigendecomposition) where it succeeds and reproduces ``rhs``;
    the minimum-norm solution of :func:`solve_symmetric` for the singular rest."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    z = torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
    residual = _relative_residual(matrix @ z.unsqueeze(-1), rhs)
    tol = default_rcond(matrix.dtype, matrix.shape[-1]) ** 0.5
    # A tiny pivot means (near) dependent rows: there the minimum-norm solution is wanted.
    pivots = factor.diagonal(dim1=-2, dim2=-1).abs()
    dependent = pivots.amin(-1) ** 2 <= tol**2 * pivots.amax(-1) ** 2
    bad = (info != 0) | ~torch.isfinite(z).all(-1) | (residual > tol) | dependent
    return _min_norm_where(bad, z, matrix, rhs)


def robust_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` that survives LAPACK's rare non-convergence.

    Rank-deficient matrices with many repeated eigenvalues (e.g. normal matrices of many tied
    kinks) can make the float32 solver fail; retry in float64, then with a jitter of a few ulps
    of the matrix scale, which moves eigenvalues by far less than the singularity cut-off.
    """
    try:
        return torch.linalg.eigh(matrix)
    except RuntimeError:
        pass
    wide = matrix.to(torch.float64)
    try:
        values, vectors = torch.linalg.eigh(wide)
    except RuntimeError:
        scale = wide.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1.0)
        eye = torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
        values, vectors = torch.linalg.eigh(wide + 64 * torch.finfo(matrix.dtype).eps * scale * eye)
    return values.to(matrix.dtype), vectors.to(matrix.dtype)


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    max_iter: int | None = None,
    rtol: float | None = None,
) -> tuple[Tensor, LinearSolveReport]:
    """Batched CG for ``H_b z_b = r_b`` with symmetric positive definite ``H_b``, matrix-free.

    Every problem has its own step sizes and stops on its own; problems where a search direction
    meets non-positive curvature are frozen at their current iterate and flagged as not
    ``second_order_ok`` (the Hessian is not positive definite there).

    Args:
        matvec: ``(B, n) -> (B, n)``, applies each problem's matrix to its own vector.
        rhs: ``(B, n)``.
    """
    batch, n = rhs.shape
    max_iter = 2 * n + 10 if max_iter is None else max_iter
    rtol = torch.finfo(rhs.dtype).eps ** 0.75 if rtol is None else rtol
    z = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rr = (residual * residual).sum(-1)
    target = (rtol * rhs.abs().amax(-1)) ** 2 * n
    done = rr <= target
    bad_curvature = torch.zeros(batch, dtype=torch.bool, device=rhs.device)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        hd = matvec(direction)
        curvature = (direction * hd).sum(-1)
        newly_bad = (curvature <= 0) & ~done
        bad_curvature |= newly_bad
        done |= newly_bad
        step = torch.where(done, torch.zeros_like(rr), rr / torch.where(done, 1.0, curvature))
        z = z + step.unsqueeze(-1) * direction
        residual = residual - step.unsqueeze(-1) * hd
        rr_new = (residual * residual).sum(-1)
        beta = torch.where(done, torch.zeros_like(rr), rr_new / torch.where(rr > 0, rr, 1.0))
        direction = residual + beta.unsqueeze(-1) * direction
        rr = torch.where(done, rr, rr_new)
        done |= rr <= target
    rel = _relative_residual(matvec(z), rhs)
    singular = ~done | (rel > rtol**0.5)
    report = LinearSolveReport("cg", singular & ~bad_curvature, ~bad_curvature, rel)
    return z, report


def minres(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    max_iter: int | None = None,
    rtol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batched MINRES (Paige & Saunders 1975) for symmetric ``K_b s_b = r_b``, matrix-free.

    Every problem has its own Lanczos recurrence and stops on its own (its iterate is frozen);
    the batch stops when all have. Returns ``(s (B, n), converged (B,), relative residual (B,))``
    with the residual ``max |K s - r| / max |r|`` recomputed from one final product.
    """
    n = rhs.shape[-1]
    max_iter = 2 * n + 10 if max_iter is None else max_iter
    rtol = torch.finfo(rhs.dtype).eps ** 0.75 if rtol is None else rtol
    tiny = torch.finfo(rhs.dtype).tiny

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(-1, keepdim=True)

    x = torch.zeros_like(rhs)
    beta1 = dot(rhs, rhs).sqrt()
    done = beta1 <= tiny
    r1, r2, y = rhs, rhs, rhs
    beta, old_beta = beta1, torch.zeros_like(beta1)
    dbar = epsilon = torch.zeros_like(beta1)
    phibar = beta1
    cs, sn = -torch.ones_like(beta1), torch.zeros_like(beta1)
    w, w2 = torch.zeros_like(rhs), torch.zeros_like(rhs)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        safe_beta = torch.where(done, 1.0, beta)
        vec = y / safe_beta
        y = matvec(vec)
        y = y - (beta / torch.where(old_beta > 0, old_beta, 1.0)) * r1 * (old_beta > 0)
        alpha = dot(vec, y)
        y = y - (alpha / safe_beta) * r2
        r1, r2 = r2, y
        old_beta, beta = beta, dot(y, y).sqrt()
        old_epsilon = epsilon
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsilon = sn * beta
        dbar = -cs * beta
        gamma = (gbar * gbar + beta * beta).sqrt().clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = torch.where(done, phibar, sn * phibar)
        w1, w2 = w2, w
        w = (vec - old_epsilon * w1 - delta * w2) / gamma
        x = torch.where(done, x, x + phi * w)
        # Converged, or the Krylov space is exhausted (beta = 0: the iterate is exact).
        done = done | (phibar <= rtol * beta1) | (beta <= tiny * beta1)
    product = matvec(x)
    scale = rhs.abs().amax(-1).clamp_min(tiny)
    residual = (product - rhs).abs().amax(-1) / scale
    return x, done.squeeze(-1) & (residual <= rtol**0.5), residual


def kkt_minres(
    hvp: Callable[[Tensor], Tensor],
    jac: RowJacobian | Tensor,
    row_mask: Tensor,
    rhs: Tensor,
    *,
    diagonal: bool | str = True,
) -> tuple[Tensor, LinearSolveReport]:
    """Solve the padded KKT systems ``[[H, A^T], [A, D]] s = rhs`` matrix-free by MINRES.

    ``hvp: (B, m) -> (B, m)`` applies each problem's Lagrangian Hessian ``H``; ``jac: (B, k, m)``
    (a tensor or a :class:`~declopt.kkt.jacobian.RowJacobian`) holds the rows ``A``, those
    outside ``row_mask`` padding: ``D = diag(~row_mask)`` puts a one on each. MINRES takes
    symmetric indefinite systems (the KKT matrix has ``k`` negative eigenvalues) and, started
    from zero, converges to the minimum-norm solution of a consistent singular system, as the
    dense pseudo-inverse does. It cannot count eigenvalues, so ``second_order_ok`` only checks
    the curvature ``w.Hw > 0`` along the solution's ``w`` (necessary, not sufficient, for a
    strict minimum).

    With ``diagonal``, a diagonal model of ``H`` is tried first (:class:`_DiagonalModel`: exact
    for separable declarations, where MINRES needs one product per distinct curvature) and kept
    for the problems whose residual under the true ``H`` it passes; where it is wrong, the
    diagonal read in the held rows' null space (:func:`_projected_diagonal`: exact for ``H =
    D + A^T C A``, the 2-norm's curvature beside its row); MINRES solves the rest.
    ``diagonal="projected"`` tries the second model alone (a function whose ``diag(H 1)``
    failed before). ``report.method``: ``"diagonal"`` / ``"projected"`` (that model answered
    every problem), ``"diagonal+minres"`` / ``"projected+minres"`` (some missed the residual
    target by a little), ``"minres"`` (not tried, or the models are wrong for this ``H``: a
    residual above ``rtol^0.5`` or a diagonal that is not positive).

    The recurrences run in float64 whatever the data's dtype (``H`` is applied in the data's):
    in float32 the Lanczos vectors of thousands of tied kink rows lose orthogonality, and the
    iteration stopped on its own residual estimate 10-1000x above the true one.
    """
    dtype = rhs.dtype
    wide = torch.promote_types(dtype, torch.float64)
    jac = RowJacobian.of_dense(jac) if isinstance(jac, Tensor) else jac
    jac = jac.masked(row_mask).to(wide)
    m = jac.m
    pad = (~row_mask).to(wide)
    # Equilibrated by blocks as the dense systems are (kkt_block_scales), with H's size read
    # from one product (the matrix is never formed): the unknowns are w / s_u and z / s_c.
    probe = torch.ones(rhs.shape[0], m, dtype=dtype, device=rhs.device)
    row_sizes = jac.norms()
    a = row_sizes.amax(-1) if row_sizes.shape[-1] else row_sizes.new_zeros(rhs.shape[0])
    h_ones = hvp(probe)
    s_u, s_c = _block_scales(h_ones.abs().amax(-1), a, dtype)
    u_scale, c_scale = s_u.to(wide)[:, None], s_c.to(wide)[:, None]

    def matvec(s: Tensor) -> Tensor:
        w, z = s[:, :m] * u_scale, s[:, m:] * c_scale
        top = hvp(w.to(dtype)).to(wide) + jac.rmatvec(z)
        bottom = jac.matvec(w) * c_scale + pad * s[:, m:]
        return torch.cat([top * u_scale, bottom], -1)

    rtol = torch.finfo(dtype).eps ** 0.75
    scaled = torch.cat([rhs[:, :m] * u_scale, rhs[:, m:] * c_scale], -1).to(wide)
    kinds = {True: ("diagonal", "projected"), "projected": ("projected",)}.get(diagonal, ())
    if kinds and not bool(row_mask.any()):  # no rows: nothing to project the probe on
        kinds = ("diagonal",)
    method = "minres"
    solution = accepted = residual = None
    for kind in kinds:
        if kind == "diagonal":
            d = h_ones.to(wide)
        else:
            d = _projected_diagonal(hvp, jac, pad, h_ones.to(wide), dtype, rtol)
        model = _DiagonalModel(
            d * u_scale**2,
            jac,
            u_scale * c_scale,
            pad,
            dtype,
            refit_multipliers=kind == "projected",
        )
        attempt, ok, attempt_residual, wrong = model.solve(scaled, matvec, rtol)
        if solution is None:
            solution, accepted, residual = attempt, ok, attempt_residual
        else:  # the problems an earlier model left out
            take = ok & ~accepted
            solution = torch.where(take.unsqueeze(-1), attempt, solution)
            residual = torch.where(take, attempt_residual, residual)
            accepted = accepted | take
        if bool(accepted.all()):
            method = kind
            break
        method = "minres" if bool((wrong & ~accepted).any()) else f"{kind}+minres"
        if method != "minres":
            break  # near misses: MINRES finishes them
    if solution is None:
        solution, converged, residual = minres(matvec, scaled, rtol=rtol)
    elif bool(accepted.all()):
        converged = accepted
    else:  # the others by MINRES; the accepted ones sit at a zero right-hand side
        rest = torch.where(accepted.unsqueeze(-1), torch.zeros_like(scaled), scaled)
        other, other_ok, other_residual = minres(matvec, rest, rtol=rtol)
        keep = accepted.unsqueeze(-1)
        solution = torch.where(keep, solution, other)
        converged = accepted | other_ok
        residual = torch.where(accepted, residual, other_residual)
    solution = torch.cat([solution[:, :m] * u_scale, solution[:, m:] * c_scale], -1)
    solution = solution.to(dtype)
    w = solution[:, :m]
    curvature = (w * hvp(w)).sum(-1)
    tiny = torch.finfo(dtype).tiny
    # w = 0 (the held rows leave no free direction, or v lies in their span) says nothing.
    size = (w * w).sum(-1)
    flat = (curvature <= torch.finfo(dtype).eps * size.clamp_min(tiny)) & (size > 0)
    singular = ~converged
    report = LinearSolveReport(method, singular, ~flat & ~singular, residual.to(dtype))
    return solution, report


DIAGONAL_MODEL_CG_ITER = 100
"""Most CG iterations the diagonal model's Schur complement may take (kink rows make it near
the identity: 2-6 measured); a problem it does not finish goes to MINRES, not wrong."""


GRAM_DENSE_MAX = 32
"""Up to this many held rows, all dense, the diagonal models' row systems (``A W A^T``) are
formed and factored at once instead of solved by CG (whose per-iteration dispatch cost more than
the solve: an L2 ball's one row)."""


def _row_gram_solve(
    jac: RowJacobian,
    weight: Tensor | None,
    scale: Tensor | float,
    pad: Tensor,
    rhs: Tensor,
    rtol: float,
) -> tuple[Tensor, Tensor]:
    """``(z (B, k), solved (B,))`` with ``(s A diag(weight) A^T s + P) z = rhs``: ``s = scale (B,
    1)`` (or a number), ``weight (B, m)`` (``None``: ones), ``P = diag(pad)``. A few dense rows
    by one batched factorisation; many, or index-set rows, by CG on the rows' products."""
    if jac.index.shape[1] == 0 and jac.k <= GRAM_DENSE_MAX:
        rows = jac.dense * (scale.unsqueeze(-1) if isinstance(scale, Tensor) else scale)
        weighted = rows if weight is None else rows * weight.unsqueeze(1)
        gram = weighted @ rows.mT + torch.diag_embed(pad)
        z, info = torch.linalg.solve_ex(gram, rhs.unsqueeze(-1))
        z = z.squeeze(-1)
        solved = (info == 0) & torch.isfinite(z).all(-1)
        return torch.where(solved.unsqueeze(-1), z, torch.zeros_like(z)), solved

    def product(y: Tensor) -> Tensor:
        spread = jac.rmatvec(y * scale)
        spread = spread if weight is None else spread * weight
        return jac.matvec(spread) * scale + pad * y

    z, report = conjugate_gradient(product, rhs, max_iter=DIAGONAL_MODEL_CG_ITER, rtol=rtol)
    return z, ~report.singular


def _projected_diagonal(
    hvp: Callable[[Tensor], Tensor],
    jac: RowJacobian,
    pad: Tensor,
    h_ones: Tensor,
    dtype: torch.dtype,
    rtol: float,
) -> Tensor:
    """``(B, m)``: the diagonal ``D`` of a Hessian ``H = D + A^T C A`` whose non-diagonal part
    lies in the held rows' span (a 2-norm's curvature ``(I - n n^T) / |u|`` beside its row
    ``n``: the L2 sphere and ball), read from one product with a probe ``p`` in the rows' null
    space, ``H p = D p`` (``A p = 0``): ``D = (H p) / p``.

    Such an ``H`` and ``D`` give the same KKT solution (``A^T C A w = 0`` for every ``w`` the
    rows allow), so :class:`_DiagonalModel` with this ``D`` is exact for it, where ``diag(H 1)``
    is not. ``p`` is a fixed +-1 pattern minus its projection on the rows (CG on ``A A^T``: the
    rows' products only). For a diagonal ``H`` it is ``diag(H)`` again."""
    batch, m = h_ones.shape
    index = torch.arange(m, device=h_ones.device)
    # A fixed sign pattern (a multiplicative hash of the index): no constant direction (a
    # row along the ones vector, u proportional to 1, would leave nothing of a probe of ones).
    signs = 1.0 - 2.0 * (((index * 2654435761) >> 16) & 1).to(h_ones.dtype)
    probe = signs.expand(batch, m)

    y, _ = _row_gram_solve(jac, None, 1.0, pad, jac.matvec(probe), 1e-2 * rtol)
    p = probe - jac.rmatvec(y)
    h_p = hvp(p.to(dtype)).to(h_ones.dtype)
    # Entries of p at rounding level (of its +-1 entries) are coordinates the rows pin, which
    # any positive D serves: they read D from |H 1|. A small entry elsewhere amplifies the
    # product's rounding into D_i; the check then decides.
    readable = p.abs() >= torch.finfo(dtype).eps ** 0.5
    # Positive there (the model needs a positive D): |H 1|, at least a small part of its size.
    floor = torch.finfo(dtype).eps ** 0.5 * h_ones.abs().amax(-1, keepdim=True)
    pinned = torch.maximum(h_ones.abs(), floor)
    return torch.where(readable, h_p / torch.where(readable, p, torch.ones_like(p)), pinned)


@dataclass(frozen=True)
class _DiagonalModel:
    """``[[D, A^T], [A, P]]``: the block-scaled KKT operator of :func:`kkt_minres` with ``H``
    replaced by a diagonal ``D`` (``diag(H 1)``, which equals ``H`` exactly when ``H`` is
    diagonal: a separable declaration, elementwise penalties, squared distances, piecewise
    linear constraints, kink rows; or :func:`_projected_diagonal`). ``d (B, m)`` the model's
    diagonal, ``jac`` the masked rows, ``row_scale (B, 1)`` the scaling of ``A`` (``s_u s_c``),
    ``pad (B, k)`` one on padding, ``dtype`` the one ``H`` is applied in (its rounding bounds
    the check)."""

    d: Tensor
    jac: RowJacobian
    row_scale: Tensor
    pad: Tensor
    dtype: torch.dtype
    refit_multipliers: bool = False
    """Refit ``z`` to the true ``H`` after the model's solve (the null-space model: for ``H = D +
    A^T C A`` the model's ``w`` is exact, its ``z`` off by ``C b`` where the rows' right-hand side
    ``b`` is not zero)."""

    def solve(
        self, rhs: Tensor, matvec: Callable[[Tensor], Tensor], rtol: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(s (B, m + k), accepted (B,), residual (B,), wrong (B,))``: the model's solution by
        its Schur complement ``A D^-1 A^T + P`` (CG on products with ``A``: no Hessian product),
        checked by one product with the true operator ``matvec``. A problem is accepted where
        ``D`` is positive, CG converged and the true relative residual is within ``rtol``
        (MINRES's own target): the check, not the model, decides, so a non-diagonal ``H`` only
        costs the attempt. ``wrong``: the model does not describe ``H`` (``D`` not positive, or
        a residual above ``rtol^0.5``; CG's own rounding on a correct model stays far below)."""
        d, jac, scale, pad = self.d, self.jac, self.row_scale, self.pad
        m = d.shape[-1]
        usable = (d > 0).all(-1) & torch.isfinite(d).all(-1)
        d = torch.where(usable.unsqueeze(-1), d, torch.ones_like(d))
        top, bottom = rhs[:, :m], rhs[:, m:]
        if bottom.shape[-1]:
            # The Schur complement A D^-1 A^T + P. Padding rows solve z = b: their right-hand
            # side keeps its sign. 100x inside the acceptance target: the Schur complement's
            # condition (many held kink rows) amplifies CG's residual into w's.
            target = jac.matvec(top / d) * scale - bottom * (1 - 2 * pad)
            z, converged = _row_gram_solve(jac, 1 / d, scale, pad, target, 1e-2 * rtol)
            w = (top - jac.rmatvec(z * scale)) / d
        else:
            z, w = bottom, top / d
            converged = torch.ones_like(usable)
        if self.refit_multipliers and bottom.shape[-1] and bool((bottom != 0).any()):
            # z = argmin |A^T z - (v - H w)|: one product with H, CG on A A^T (the rows only);
            # not needed where the rows' right-hand side is zero (the implicit backward's)
            hw = matvec(torch.cat([w, torch.zeros_like(z)], -1))[:, :m]
            # Padding rows keep their z = b.
            target = jac.matvec(top - hw) * scale + pad * bottom
            z, refit = _row_gram_solve(jac, None, scale, pad, target, 1e-2 * rtol)
            converged = converged & refit
        solution = torch.cat([w, z], -1)
        residual = _relative_residual(matvec(solution), rhs)
        # What rounding of the product itself allows, relative to the rhs: 64 ulps of its
        # largest term (|A w| sums terms far larger than a Newton step's tiny rhs near
        # convergence). The terms' own sizes, |A| |w| and |A|^T |z|: a bound by the largest
        # row entry times sum |w| was up to m times too loose, and accepted the wrong
        # diag(H 1) model of an L2 ball's Hessian at 8e-4 (float32, d = 1024).
        rows = jac.term_sizes(w) * scale
        columns = jac.magnitudes().rmatvec((z * scale).abs())
        terms = torch.maximum(abs_max(d * w, -1), abs_max(columns, -1))
        if rows.shape[-1]:
            terms = torch.maximum(terms, abs_max(rows, -1))
        size = abs_max(rhs, -1).clamp_min(torch.finfo(rhs.dtype).tiny)
        floor = 64 * torch.finfo(self.dtype).eps * terms / size
        accepted = usable & converged & (residual <= torch.clamp(floor, min=rtol))
        return solution, accepted, residual, ~usable | (residual > rtol**0.5)


def _relative_residual(product: Tensor, rhs: Tensor) -> Tensor:
    product = product.reshape(rhs.shape)
    scale = rhs.abs().amax(dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    return (product - rhs).abs().amax(dim=-1) / scale
