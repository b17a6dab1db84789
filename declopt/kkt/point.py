"""The KKT point of a batch of solutions: computed once, read by the solvers, ``layer.info`` and
the implicit backward.

Conventions (the seed paper's): rows ``c = [h (p); g (q); kink residuals (K)]``; a point is a KKT
point of the rows it *holds* (all of ``h``, the active ``g``, the kinks it sits on) when
``D_u f = lambda^T D_u c`` over the held rows (stationarity), ``h = 0``, ``g <= 0``, held kink
residuals ``= 0`` (feasibility), ``lambda_g <= 0`` and ``lambda_g g = 0`` (complementarity).

:func:`kkt_point` evaluates the declaration twice per batch, whatever is asked of the point: one
pass for ``f`` and ``D_u f``, one for the rows, their Jacobian and the kink margins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache

import torch
from torch import Tensor
from torch.func import grad_and_value, jacfwd, jacrev, vmap

from declopt.derivatives import BatchedObjective
from declopt.kkt.functions import equality_fn, inequality_fn, lagrangian
from declopt.kkt.jacobian import RowJacobian
from declopt.kkt.tolerances import (
    Tolerances,
    gradient_scale,
    on_kink,
    problem_scale,
    solution_scale,
    table,
)
from declopt.linalg import masked_least_squares
from declopt.program import BatchedParams, Params, Program

InDims = tuple[int | None, ...]


@dataclass(frozen=True)
class Sizes:
    """Row counts of a program: ``p`` equalities, ``q`` inequalities, ``kinks`` kink sites."""

    p: int
    q: int
    kinks: int

    @property
    def total(self) -> int:
        return self.p + self.q + self.kinks


@lru_cache(maxsize=256)
def sizes(program: Program, m: int) -> Sizes:
    """The row counts of ``program`` (one evaluation at an example point, then cached)."""
    x = tuple(torch.zeros(s, dtype=torch.float64) for s in program.parameter_shapes)
    u = torch.zeros(m, dtype=torch.float64)
    with torch.no_grad():
        p = equality_fn(program)(x, u).numel()
        q = inequality_fn(program)(x, u).numel()
        k = 0 if program.kinks is None else program.kinks(x, u)[0].numel()
    return Sizes(p, q, k)


@dataclass
class KKTPoint:
    """Solutions ``u: (B, m)`` with everything the KKT conditions say about them.

    Attributes:
        u: ``(B, m)`` the points.
        objective: ``(B,)`` ``f``.
        grad_f: ``(B, m)`` ``D_u f``.
        rows: ``(B, k)`` ``c = [h; g; kinks]`` (kinks only when the point was made with them).
        jacobian: ``D_u c`` (every row, held or not), ``(B, k, m)`` as a
            :class:`~declopt.kkt.jacobian.RowJacobian` (kink rows as index sets where the
            declaration gives them: :attr:`~declopt.program.Program.kink_rows`).
        margins: ``(B, K)`` kink margins (~0 on a kink).
        multipliers: ``(B, k)`` seed convention, zero on rows not held.
        held: ``(B, k)`` rows held as equalities.
        sizes: the row counts.
        scale: ``(B,)`` :func:`~declopt.kkt.tolerances.problem_scale`.
        grad_lagrangian: ``(B, m)`` ``D_u f - lambda^T D_u c``.
        stationarity, infeasibility, complementarity: ``(B,)`` max-abs residual pieces (see the
            module docstring; wrong-sign inequality multipliers count as complementarity).
        relative_residual: ``(B,)`` the largest piece relative to its scale: stationarity to the
            gradient scale, infeasibility as a distance (in ``u``) to ``scale``, complementarity
            to the objective's unit; unit-free, so solvers compare and stop on it.
        distance: ``(B,)`` the largest violation of a constraint or held kink as a distance (in
            ``u``, first order) relative to ``scale``.
        weakly_active: ``(B, q)`` active inequalities with a ~zero multiplier.
        sign_violation: ``(B,)`` an active inequality has a clearly positive multiplier.
        converged: ``(B,)`` finite, no sign violation and ``relative_residual`` within
            ``Tolerances.converged``.
    """

    u: Tensor
    objective: Tensor
    grad_f: Tensor
    rows: Tensor
    jacobian: RowJacobian
    margins: Tensor
    multipliers: Tensor
    held: Tensor
    sizes: Sizes
    scale: Tensor
    grad_lagrangian: Tensor
    stationarity: Tensor
    infeasibility: Tensor
    complementarity: Tensor
    relative_residual: Tensor
    distance: Tensor
    weakly_active: Tensor
    sign_violation: Tensor
    converged: Tensor

    @property
    def residual(self) -> Tensor:
        """``(B,)`` the largest residual piece (``layer.info.kkt_residual``)."""
        return torch.maximum(
            torch.maximum(self.stationarity, self.infeasibility), self.complementarity
        )

    @property
    def active(self) -> Tensor:
        """``(B, q)`` inequalities held."""
        p, q = self.sizes.p, self.sizes.q
        return self.held[:, p : p + q]

    @property
    def on_kinks(self) -> Tensor:
        """``(B, K)`` kinks held (the solution sits on them)."""
        return self.held[:, self.sizes.p + self.sizes.q :]

    @property
    def eq_multipliers(self) -> Tensor:
        return self.multipliers[:, : self.sizes.p]

    @property
    def ineq_multipliers(self) -> Tensor:
        p, q = self.sizes.p, self.sizes.q
        return self.multipliers[:, p : p + q]

    def held_rows(self, side: str = "active") -> Tensor:
        """``(B, k)`` rows of the backward's KKT system: :attr:`held`, less the weakly active
        inequalities when ``side == "inactive"`` (the derivative for perturbations that move
        the solution off them)."""
        if side == "active" or self.sizes.q == 0:
            return self.held
        p, q = self.sizes.p, self.sizes.q
        dropped = torch.zeros_like(self.held)
        dropped[:, p : p + q] = self.weakly_active
        return self.held & ~dropped

    def to(self, dtype: torch.dtype, device: torch.device) -> KKTPoint:
        """The same point with its floating tensors in ``dtype`` on ``device``."""

        def move(value: object) -> object:
            if isinstance(value, RowJacobian):
                return value.to(dtype, device)
            if not isinstance(value, Tensor):
                return value
            return value.to(device=device, dtype=dtype if value.is_floating_point() else None)

        return KKTPoint(*(move(getattr(self, f.name)) for f in fields(self)))

    def select(self, index: Tensor) -> KKTPoint:
        """The points ``index`` (a 1-D long tensor) of the batch."""

        def take(value: object) -> object:
            if isinstance(value, RowJacobian):
                return value.select(index)
            return value[index] if isinstance(value, Tensor) else value

        return KKTPoint(*(take(getattr(self, f.name)) for f in fields(self)))

    def index_copy(self, index: Tensor, sub: KKTPoint) -> KKTPoint:
        """This point with the problems ``index`` (1-D long) replaced by ``sub``'s (same row
        layout)."""

        def put(full: object, part: object) -> object:
            if isinstance(full, RowJacobian):
                return full.index_copy(index, part)
            if not isinstance(full, Tensor):
                return full
            return full.index_copy(0, index, part.to(full.dtype))

        pairs = ((getattr(self, f.name), getattr(sub, f.name)) for f in fields(self))
        return KKTPoint(*(put(a, b) for a, b in pairs))

    def where(self, take: Tensor, other: KKTPoint) -> KKTPoint:
        """Per problem, this point where ``take`` (``(B,)``), else ``other``."""

        def pick(a: object, b: object) -> object:
            if isinstance(a, RowJacobian):
                return a.where(take, b)
            if not isinstance(a, Tensor):
                return a
            return torch.where(take.reshape(-1, *[1] * (a.dim() - 1)), a, b)

        pairs = ((getattr(self, f.name), getattr(other, f.name)) for f in fields(self))
        return KKTPoint(*(pick(a, b) for a, b in pairs))


def lagrangian_derivatives(
    program: Program,
    params: BatchedParams,
    point: KKTPoint,
    multipliers: Tensor | None = None,
    compile: bool = False,
) -> BatchedObjective:
    """The derivatives of ``L = f - lambda . c`` at ``point`` (``multipliers`` ``(B, k)``,
    default the point's), for the Hessian products and parameter VJPs of the backward and the
    Newton-KKT steps.

    Kink rows given as index sets (:attr:`~declopt.program.Program.kink_rows`) are linear in
    ``u`` with coefficients free of ``x``: they add nothing to ``D2_uu L`` or ``D_x D_u L`` and
    are left out, so no Hessian product passes through the kink sites. Where every row is
    affine (:attr:`~declopt.program.Program.constraints_affine`) the Hessian and its products
    are the objective's.
    """
    lam = point.multipliers if multipliers is None else multipliers
    with_kinks = point.sizes.kinks > 0 and program.kink_rows is None
    if point.sizes.kinks and not with_kinks:
        lam = lam[:, : point.sizes.p + point.sizes.q]
    extended = BatchedParams((*params.values, lam), (*params.in_dims, 0), params.size)
    # Affine rows have no curvature: D2_uu L = D2_uu f, from the objective alone (its Taylor
    # pass where it has one; the Lagrangian's double backward also runs through every row).
    curvature = None
    if program.constraints_affine and not with_kinks and program.objective is not None:
        curvature = BatchedObjective.of(program, params, compile=compile)
    return BatchedObjective(
        lagrangian(program, with_kinks), extended, compile=compile, curvature=curvature
    )


def kkt_point(
    program: Program,
    params: BatchedParams,
    u: Tensor,
    *,
    eq_multipliers: Tensor | None = None,
    ineq_multipliers: Tensor | None = None,
    multipliers: Tensor | None = None,
    held: Tensor | Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    with_kinks: bool | None = None,
    tolerances: Tolerances | None = None,
    scale: Tensor | None = None,
    gradient_unit: Tensor | None = None,
) -> KKTPoint:
    """The KKT point of ``u: (B, m)``.

    Args:
        eq_multipliers, ineq_multipliers: ``(B, p)``, ``(B, q)`` a backend's multipliers (seed
            convention); ``None`` where unknown. Unknown multipliers, and always the kinks', are
            fitted by least squares to what the known ones leave of ``D_u f`` on the held rows.
        multipliers: ``(B, k)`` all multipliers, used as they are (a Newton-KKT iterate).
        held: the rows held, ``(B, k)``, or a rule ``(rows, margins, row_norms) -> (B, k)``.
            Default: at a returned solution, every equality, an inequality within
            ``activity * |D_u g_i| * |u|_inf`` of its boundary or with a clearly negative known
            multiplier, and a kink whose margin is within ``activity * |u|_inf``
            (:func:`~declopt.kkt.tolerances.solution_scale`).
        with_kinks: include the kink rows (default: whenever the program has kinks).
        tolerances: default :func:`~declopt.kkt.tolerances.table` of ``u``'s dtype.
        scale: ``(B,)`` default :func:`~declopt.kkt.tolerances.problem_scale`.
        gradient_unit: ``(B,)`` a floor for the gradient scale the multiplier tests use (the
            size of the gradient's terms, ``|D2_uu f u|``, where ``f`` and ``D_u f`` both vanish
            at the solution; see :func:`~declopt.kkt.tolerances.gradient_scale`).
    """
    tol = table(u.dtype) if tolerances is None else tolerances
    with_kinks = program.kinks is not None if with_kinks is None else with_kinks
    batch, m = u.shape
    count = sizes(program, m)
    scale = problem_scale(params, u) if scale is None else scale
    f, grad_f = _objective_and_gradient(program.objective, params.in_dims)(params.values, u)
    margins = None
    # Kink rows as index sets (their exact Jacobian, no derivative pass) where the declaration
    # gives them; else dense rows from the Jacobian pass of [h; g; kinks].
    structured = with_kinks and bool(count.kinks) and program.kink_rows is not None
    if structured:
        residuals, margins, index, value = _kink_rows(program, params.in_dims)(params.values, u)
    if with_kinks and held is None and count.kinks:
        # The default rule holds a kink only where a solution sits on it: the margins first
        # (one evaluation, no derivatives), then one Jacobian pass, with the kink rows (for a
        # 2-norm's origin, m rows) only if some solution of the batch is on a kink. (Carrying
        # the margins along a first Jacobian pass of [h; g] instead paid for a second pass
        # whenever a kink was held: the README LP's KKT point 7.1 -> 5.6 ms, unchanged without.)
        if margins is None:
            margins = kink_margins(program, params, u)
        with_kinks = bool(on_kink(margins, u, scale, tol.kinks, tol.resolution).any())
    if not with_kinks:
        count = Sizes(count.p, count.q, 0)
        margins = u.new_zeros(batch, 0)
    if structured and with_kinks:
        dense, constraint_rows = _constraint_rows(program, params, u)
        jac = RowJacobian(dense, index, value.to(u.dtype))
        rows = torch.cat([constraint_rows, residuals], -1)
    elif count.total:
        dense, (rows, found) = _rows_and_jacobian(
            program, params.in_dims, "kinks" if with_kinks else "constraints", m
        )(params.values, u)
        jac = RowJacobian.of_dense(dense)
        margins = found if with_kinks else margins
    else:
        jac = RowJacobian.of_dense(u.new_zeros(batch, 0, m))
        rows = u.new_zeros(batch, 0)
    return _assess(
        u,
        f,
        grad_f,
        rows,
        jac,
        margins,
        count,
        scale,
        tol,
        eq_multipliers=eq_multipliers,
        ineq_multipliers=ineq_multipliers,
        multipliers=multipliers,
        held=held,
        gradient_unit=gradient_unit,
    )


def reassess(
    point: KKTPoint,
    *,
    eq_multipliers: Tensor | None = None,
    ineq_multipliers: Tensor | None = None,
    multipliers: Tensor | None = None,
    held: Tensor | Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    tolerances: Tolerances | None = None,
    gradient_unit: Tensor | None = None,
) -> KKTPoint:
    """The KKT point at ``point.u`` with other multipliers or held rows (arguments as for
    :func:`kkt_point`), from the evaluations ``point`` already holds: no pass over the
    declaration."""
    u = point.u
    return _assess(
        u,
        point.objective,
        point.grad_f,
        point.rows,
        point.jacobian,
        point.margins,
        point.sizes,
        point.scale,
        table(u.dtype) if tolerances is None else tolerances,
        eq_multipliers=eq_multipliers,
        ineq_multipliers=ineq_multipliers,
        multipliers=multipliers,
        held=held,
        gradient_unit=gradient_unit,
    )


def _assess(
    u: Tensor,
    f: Tensor,
    grad_f: Tensor,
    rows: Tensor,
    jac: RowJacobian,
    margins: Tensor,
    count: Sizes,
    scale: Tensor,
    tol: Tolerances,
    *,
    eq_multipliers: Tensor | None,
    ineq_multipliers: Tensor | None,
    multipliers: Tensor | None,
    held: Tensor | Callable[[Tensor, Tensor, Tensor], Tensor] | None,
    gradient_unit: Tensor | None = None,
) -> KKTPoint:
    """Activity, multipliers and residual pieces from the evaluations at ``u``."""
    p, q = count.p, count.q
    norms = jac.norms()  # (B, k)

    known_lam_g = ineq_multipliers
    if multipliers is not None and q:
        known_lam_g = multipliers[:, p : p + q]
    if callable(held):
        held = held(rows, margins, norms)
    elif held is None:
        unit = solution_scale(u, scale)
        kinks_on = on_kink(margins, u, scale, tol.kinks, tol.resolution)
        # A row's value sums terms of size |D_u g_ij| |u_j|, and rounds by them: the largest
        # gradient entry times the largest |u| is far smaller for a norm over many entries
        # (float32 L2 ball, d = 1,024: ||u|| - 1 = -2 ulps read as inactive, gradient 98x off).
        sizes = torch.maximum(norms * unit.unsqueeze(-1), jac.term_sizes(u).to(norms.dtype))
        held = _held_at_solution(
            rows, kinks_on, norms, sizes, unit, known_lam_g, grad_f, f, count, tol, gradient_unit
        )

    if multipliers is None:
        multipliers = _multipliers(jac, grad_f, held, eq_multipliers, ineq_multipliers, count)
    multipliers = torch.where(held, multipliers.to(u.dtype), torch.zeros_like(rows))
    grad_l = grad_f - jac.rmatvec(multipliers)

    g, lam_g = rows[:, p : p + q], multipliers[:, p : p + q]
    held_rows = torch.where(held, rows, torch.zeros_like(rows)).abs()
    violation = torch.cat([held_rows[:, :p], g.clamp_min(0), held_rows[:, p + q :]], -1)
    complementarity = torch.cat([(lam_g * g).abs(), lam_g.clamp_min(0)], -1)

    # Relative pieces: stationarity in the gradient's unit, feasibility as a distance (in u)
    # relative to the problem's scale, complementarity in the objective's unit.
    gscale = gradient_scale(f, grad_f, scale)
    if gradient_unit is not None:
        gscale = torch.maximum(gscale, gradient_unit.to(gscale.dtype))
    if count.total:
        gscale = torch.maximum(gscale, (multipliers.abs() * norms).amax(-1))
    row_scale = norms * scale.unsqueeze(-1)
    tiny = torch.finfo(u.dtype).tiny
    distance = torch.where(violation > 0, violation / row_scale.clamp_min(tiny), 0.0)
    size_g = lam_g.abs() * norms[:, p : p + q]
    weakly = held[:, p : p + q] & (size_g <= tol.multiplier * gscale.unsqueeze(-1))
    sign_violation = held[:, p : p + q] & (lam_g > 0) & ~weakly
    stationarity = _max(grad_l)
    relative = torch.stack(
        [stationarity / gscale, _max(distance), _max(lam_g * g) / (gscale * scale)]
    ).amax(0)
    relative = torch.where(torch.isfinite(f), relative, torch.full_like(relative, float("inf")))
    converged = (relative <= tol.converged) & ~sign_violation.any(-1)
    return KKTPoint(
        u=u,
        objective=f,
        grad_f=grad_f,
        rows=rows,
        jacobian=jac,
        margins=margins,
        multipliers=multipliers,
        held=held,
        sizes=count,
        scale=scale,
        grad_lagrangian=grad_l,
        stationarity=stationarity,
        infeasibility=_max(violation),
        complementarity=_max(complementarity),
        relative_residual=relative,
        distance=_max(distance),
        weakly_active=weakly,
        sign_violation=sign_violation.any(-1),
        converged=converged,
    )


def kink_margins(program: Program, params: BatchedParams, u: Tensor) -> Tensor:
    """``(B, K)`` the kink margins of every problem at ``u: (B, m)`` (~0 on a kink)."""
    kinks = program.kinks
    assert kinks is not None
    margins = vmap(lambda x, uu: kinks(x, uu)[1].reshape(-1), in_dims=(params.in_dims, 0))
    return margins(params.values, u)


def _max(rows: Tensor) -> Tensor:
    """Row-wise max of ``|rows|`` ``(B, k)``; zero when ``k == 0``."""
    if rows.shape[-1] == 0:
        return rows.new_zeros(rows.shape[0])
    return rows.abs().amax(-1)


def _held_at_solution(
    rows: Tensor,
    kinks_on: Tensor,
    norms: Tensor,
    sizes: Tensor,
    scale: Tensor,
    lam_g: Tensor | None,
    grad_f: Tensor,
    f: Tensor,
    count: Sizes,
    tol: Tolerances,
    gradient_unit: Tensor | None = None,
) -> Tensor:
    """The default activity rule at a returned solution (see :func:`kkt_point`): an inequality
    within ``tol.activity`` of its row's term ``sizes`` from its bound, or with a clearly
    nonzero multiplier."""
    p, q = count.p, count.q
    g = rows[:, p : p + q]
    active = g >= -tol.activity * sizes[:, p : p + q]
    if lam_g is not None and q:
        gscale = gradient_scale(f, grad_f, scale)
        if gradient_unit is not None:
            gscale = torch.maximum(gscale, gradient_unit.to(gscale.dtype))
        gscale = gscale.unsqueeze(-1)
        clearly = lam_g.to(g.dtype).abs() * norms[:, p : p + q] > tol.multiplier * gscale
        active = active | (clearly & (lam_g < 0))
    every_h = torch.ones_like(rows[:, :p], dtype=torch.bool)
    return torch.cat([every_h, active, kinks_on], -1)


def _multipliers(
    jac: RowJacobian,
    grad_f: Tensor,
    held: Tensor,
    lam_h: Tensor | None,
    lam_g: Tensor | None,
    count: Sizes,
) -> Tensor:
    """Known multipliers as given; the rest (and always the kinks') by least squares on what
    the known ones leave of ``D_u f`` over the held rows."""
    p, q = count.p, count.q
    known = torch.zeros_like(held)
    given = torch.zeros(held.shape, dtype=jac.dtype, device=jac.device)
    if lam_h is not None and p:
        known[:, :p] = True
        given[:, :p] = lam_h.to(jac.dtype)
    if lam_g is not None and q:
        known[:, p : p + q] = True
        given[:, p : p + q] = lam_g.to(jac.dtype)
    given = torch.where(held & known, given, torch.zeros_like(given))
    leftover = grad_f - jac.rmatvec(given)
    fit = held & ~known
    fitted = masked_least_squares(jac.masked(fit), leftover, fit)
    return torch.where(known, given, fitted)


@lru_cache(maxsize=256)
def _objective_and_gradient(
    objective: Callable[[Params, Tensor], Tensor], in_dims: InDims
) -> Callable[[Params, Tensor], tuple[Tensor, Tensor]]:
    """``(values, u) -> (f (B,), D_u f (B, m))`` in one reverse pass."""
    per_problem = vmap(grad_and_value(objective, argnums=1), in_dims=(in_dims, 0))

    def fn(values: Params, u: Tensor) -> tuple[Tensor, Tensor]:
        gradient, value = per_problem(values, u)
        return value, gradient

    return fn


def _constraint_rows(program: Program, params: BatchedParams, u: Tensor) -> tuple[Tensor, Tensor]:
    """``(D_u [h; g] (B, p + q, m), [h; g] (B, p + q))``."""
    count = sizes(program, u.shape[-1])
    if not count.p + count.q:
        return u.new_zeros(u.shape[0], 0, u.shape[-1]), u.new_zeros(u.shape[0], 0)
    jac, (rows, _) = _rows_and_jacobian(program, params.in_dims, "constraints", u.shape[-1])(
        params.values, u
    )
    return jac, rows


@lru_cache(maxsize=256)
def _kink_rows(
    program: Program, in_dims: InDims
) -> Callable[[Params, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``(values, u) -> (residuals, margins (B, K), index, value (B, K, 2))``: the kink sites
    with their rows as index sets (:attr:`~declopt.program.Program.kink_rows`)."""
    kink_rows = program.kink_rows
    assert kink_rows is not None
    return vmap(lambda x, uu: kink_rows(x, uu), in_dims=(in_dims, 0))


@lru_cache(maxsize=256)
def _rows_and_jacobian(
    program: Program, in_dims: InDims, mode: str, m: int
) -> Callable[[Params, Tensor], tuple[Tensor, tuple[Tensor, Tensor]]]:
    """``(values, u) -> (D_u c (B, k, m), (c (B, k), margins (B, K)))`` in one pass.

    ``mode``: ``"constraints"`` (rows ``[h; g]``, no margins) or ``"kinks"`` (rows ``[h; g;
    kink residuals]`` and margins). Reverse mode (``k`` probes) when there are no more
    rows than variables, forward mode (``m`` probes) otherwise; eager forward mode runs through
    Python decompositions, so reverse mode is also faster per probe.
    """
    h, g, kinks = equality_fn(program), inequality_fn(program), program.kinks
    count = sizes(program, m)
    k = count.p + count.q + (count.kinks if mode == "kinks" else 0)

    def rows(x: Params, u: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        parts = [h(x, u), g(x, u)]
        margins = u.new_zeros(0)
        if mode != "constraints" and kinks is not None:
            residuals, margins = kinks(x, u)
            margins = margins.reshape(-1)
            parts.append(residuals.reshape(-1))
        c = torch.cat(parts)
        return c, (c, margins)

    jac = (jacrev if k <= m else jacfwd)(rows, argnums=1, has_aux=True)
    return vmap(jac, in_dims=(in_dims, 0))
