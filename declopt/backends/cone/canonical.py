"""A DPP declaration as a parameter-affine cone program, mapped once to batched torch tensors.

CVXPY's own DPP canonicalisation (``Problem.get_problem_data``, the machinery cvxpylayers builds
on) turns the declaration into

    minimize 1/2 x^T P x + q^T x + d   subject to   A_c x + b_c in K

where ``P``, ``q``, ``A_c``, ``b_c`` are *affine* in the parameter vector ``theta`` (every
parameter's entries, Fortran order, then a constant 1). Each is stored as a sparse tensor
``(entries of the data, theta)``; here those tensors become coordinate lists so that a batch's
data is one gather-multiply-``index_add`` from the ``(B, |theta|)`` matrix of its parameters, on
the parameters' device. Data that no batched parameter touches is built once (leading dim 1) and
broadcast, so shared layer weights cost one copy.

The map back: the layer's variables are columns of ``x`` (CVXPY's ``var_id_to_col``), and each
declared constraint's dual is a slice of the cone program's ``z`` (the rows of its canonical
constraint, in the solver's cone order: zero, nonnegative, second-order). declopt's multipliers
are ``-z`` on those slices (CVXPY's duals enter the Lagrangian as ``f + y^T r``; declopt's as
``f - lambda^T r``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from declopt.backends.cone.arrow import ArrowPattern
from declopt.backends.cone.cones import ConeData, Cones
from declopt.backends.cvxpy_source import constraint_kinds, lower_domains
from declopt.batched import bmtv, bmv
from declopt.program import BatchedParams

__all__ = ["Batch", "Blocks", "CanonicalProgram", "Elimination", "Unsupported", "canonicalise"]

_CANON_SOLVERS = ("CLARABEL", "SCS", "ECOS")
"""Solvers whose canonicalisation CVXPY is asked for (the first installed): all three take
the zero, nonnegative and second-order cones; Clarabel and SCS keep a quadratic objective."""


class Unsupported(ValueError):
    """The declaration has a part this backend does not solve (the message says which)."""


@dataclass(frozen=True)
class _AffineMap:
    """``data[b, rows[k]] += theta[b, cols[k]] * values[k]``: one data block affine in
    ``theta`` (the coordinate lists live on the CPU; their copies on the parameters' device and
    dtype are made once, not per call)."""

    size: int
    rows: Tensor
    cols: Tensor
    values: Tensor
    _on: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def of(cls, tensor: sp.sparray | sp.spmatrix | None, size: int) -> _AffineMap:
        if tensor is None:
            empty = torch.zeros(0, dtype=torch.int64)
            return cls(size, empty, empty, torch.zeros(0, dtype=torch.float64))
        coo = sp.coo_array(tensor)
        keep = coo.data != 0
        return cls(
            size,
            torch.as_tensor(coo.row[keep].astype(np.int64)),
            torch.as_tensor(coo.col[keep].astype(np.int64)),
            torch.as_tensor(coo.data[keep].astype(np.float64)),
        )

    @property
    def empty(self) -> bool:
        return self.cols.numel() == 0

    def block(
        self, leading: int, rows: Tensor, cols: Tensor, row_scale: Tensor | None = None
    ) -> _AffineMap:
        """The map of a sub-matrix of this map's matrix ``M`` (stored Fortran order, ``leading``
        rows: ``M[r, c]`` at position ``c * leading + r``): ``S[i, j] = row_scale[i] *
        M[rows[i], cols[j]]``, stored row-major (``apply(theta).reshape(-1, len(rows),
        len(cols))`` is ``S``). Built once, so a call writes each block directly, never the
        whole matrix."""
        position = self.rows
        r, c = position % leading, position // leading
        row_at = torch.full((leading,), -1, dtype=torch.int64)
        row_at[rows] = torch.arange(rows.numel())
        span = max((int(t.max()) + 1 for t in (c, cols) if t.numel()), default=0)
        col_at = torch.full((span,), -1, dtype=torch.int64)
        col_at[cols] = torch.arange(cols.numel())
        i, j = row_at[r], col_at[c]
        keep = (i >= 0) & (j >= 0)
        i, j = i[keep], j[keep]
        values = self.values[keep]
        if row_scale is not None:
            values = values * row_scale[i]
        return _AffineMap(
            rows.numel() * cols.numel(), i * cols.numel() + j, self.cols[keep], values
        )

    def apply(self, theta: Tensor) -> Tensor:
        """``(lead, size)`` the block for parameters ``theta (|theta|, lead)``, by row: the
        gather and the scatter then move whole rows (measured on the CPU: 0.4 ms for the 2,500
        entries of a batch of 64 50 x 50 matrices, against 6.4 ms along columns)."""
        key = (theta.device, theta.dtype)
        lists = self._on.get(key)
        if lists is None:
            lists = (
                self.rows.to(theta.device),
                self.cols.to(theta.device),
                self.values.to(device=theta.device, dtype=theta.dtype),
            )
            self._on[key] = lists
        rows, cols, values = lists
        out = theta.new_zeros(self.size, theta.shape[1])
        if cols.numel():
            out.index_add_(0, rows, theta.index_select(0, cols) * values.unsqueeze(-1))
        # Problem-major again, contiguous: a transposed view reshaped to (lead, r, c) would keep
        # a batch stride of 1, which batched products take one problem at a time.
        return out.T.contiguous()


@dataclass(frozen=True)
class _Slot:
    """Where one layer parameter's entries go in ``theta``: columns ``start:start + size``, in
    Fortran order (:func:`_fortran_flat`)."""

    parameter: int
    start: int
    size: int


@dataclass(frozen=True)
class CanonicalProgram:
    """A declaration's cone program, ready for batches (see the module docstring).

    Attributes:
        cones: the cone of the rows.
        n: columns of ``x``.
        width: ``|theta|`` (the parameters' entries plus the constant).
        slots: per layer parameter that the program uses, its place in ``theta``.
        constant: ``theta``'s column that holds 1.
        P, q, A: the data blocks (``A`` holds ``[A_c, b_c]``, Fortran order).
        variables: ``(m,)`` the column of ``x`` of each entry of the layer's packed ``u``.
        eq_rows, ineq_rows: ``(p,)``, ``(q,)`` the row of ``z`` holding the dual of each of the
            program's equality and inequality rows (front-end order); ``None`` if the program's
            rows could not be matched (the backward then fits multipliers itself).
        has_quadratic: ``P`` is not identically zero.
        elimination: the columns solved for before the interior point; ``blocks``: the
            reduced program's data maps.
        arrow: the block-arrow plan of the reduced program's sparsity (``None``: dense KKT
            factorisations; see :mod:`.arrow`).
    """

    cones: Cones
    n: int
    width: int
    slots: tuple[_Slot, ...]
    constant: int
    P: _AffineMap
    q: _AffineMap
    A: _AffineMap
    variables: Tensor
    eq_rows: Tensor | None
    ineq_rows: Tensor | None
    has_quadratic: bool
    elimination: Elimination
    blocks: Blocks
    arrow: ArrowPattern | None = None

    @property
    def rows(self) -> int:
        return self.cones.rows

    def theta(self, params: BatchedParams, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(theta_batch (width, B), theta_shared (width, 1))``: the parameter vectors of the
        batch, one column per problem, and the one built from the shared parameters alone
        (batched ones left at 0)."""
        batch = params.size
        device = params.values[0].device if params.values else torch.device("cpu")
        full = torch.zeros(self.width, batch, dtype=dtype, device=device)
        shared = torch.zeros(self.width, 1, dtype=dtype, device=device)
        full[self.constant] = 1
        shared[self.constant] = 1
        for slot in self.slots:
            value = params.values[slot.parameter].to(dtype)
            entries = slice(slot.start, slot.start + slot.size)
            if params.in_dims[slot.parameter] is None:
                flat = _fortran_flat(value.unsqueeze(0))
                shared[entries] = flat
                full[entries] = flat
            else:
                full[entries] = _fortran_flat(value)
        return full, shared

    def data(self, params: BatchedParams, dtype: torch.dtype) -> Batch:
        """The batch's cone programs in the solver's form ``A x + s = b`` (``A = -A_c``),
        with the defined variables eliminated (see :class:`Elimination`)."""
        full, shared = self.theta(params, dtype)
        batched_cols = self._batched_columns(params)

        def build(m: _AffineMap, *shape: int) -> Tensor:
            uses_batch = bool(batched_cols[m.cols].any()) if m.cols.numel() else False
            out = m.apply(full if uses_batch else shared)
            return out.reshape(out.shape[0], *shape)

        batch = self.elimination.reduce(self.blocks, build, self.cones)
        if self.arrow is None:
            return batch
        return dataclasses.replace(batch, data=dataclasses.replace(batch.data, arrow=self.arrow))

    def _batched_columns(self, params: BatchedParams) -> Tensor:
        mask = torch.zeros(self.width, dtype=torch.bool)
        for slot in self.slots:
            if params.in_dims[slot.parameter] is not None:
                mask[slot.start : slot.start + slot.size] = True
        return mask

    def unpack(
        self, batch: Batch, x: Tensor, z: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(u (B, m), eq (B, p), ineq (B, q))`` from the reduced program's ``x`` and ``z``:
        the layer's variables and its multipliers (seed convention)."""
        x, z = batch.expand(x, z)
        u = x[:, self.variables.to(x.device)]
        eq = None if self.eq_rows is None else -z[:, self.eq_rows.to(z.device)]
        ineq = None if self.ineq_rows is None else -z[:, self.ineq_rows.to(z.device)]
        return u, eq, ineq


@dataclass(frozen=True)
class Elimination:
    """Variables that one equality row defines, solved for before the interior-point method.

    DPP canonicalisation introduces a variable per quadratic term: ``sum_squares(Q @ w)``
    becomes ``y'y`` with the equality row ``y - Q w = 0`` (``Q`` a parameter), which doubles the
    columns and adds as many equality rows as ``y`` has entries. A column that occurs in exactly
    one row of ``A_c``, a zero-cone row, with a constant coefficient ``c`` (no parameter in it),
    is *defined* by that row: ``y = T x + t`` with ``T = -A_c[row, rest] / c``, ``t =
    -b_c[row] / c``. Substituting it into the objective (``P``, ``q``; ``y`` is in no other
    row) removes the column and the row exactly; afterwards ``y`` is recovered from ``x`` and
    the row's dual from stationarity in ``y``: ``z_row = (P_y [x; y] + q_y) / c``.

    Attributes:
        columns: ``(e,)`` the eliminated columns; ``rows``: their defining rows; ``coefficients``:
            the ``c`` of each; ``kept_columns``, ``kept_rows``: the rest, in order.
    """

    columns: Tensor
    rows: Tensor
    coefficients: Tensor
    kept_columns: Tensor
    kept_rows: Tensor

    @classmethod
    def find(cls, A: _AffineMap, n: int, rows: int, zero: int, constant: int) -> Elimination:
        """The defined columns of the map ``A`` of ``[A_c, b_c]`` (see the class)."""
        position = A.rows.numpy()
        row, col = position % rows, position // rows
        in_matrix = col < n
        row, col, theta = row[in_matrix], col[in_matrix], A.cols.numpy()[in_matrix]
        values = A.values.numpy()[in_matrix]
        count = np.bincount(col, minlength=n)  # entries (row, theta) per column
        chosen_rows: set[int] = set()
        picked: list[tuple[int, int, float]] = []
        for k in np.flatnonzero((theta == constant) & (row < zero)):
            j, i = int(col[k]), int(row[k])
            if count[j] == 1 and i not in chosen_rows and values[k] != 0:
                chosen_rows.add(i)
                picked.append((j, i, float(values[k])))
        # A row that defines one column may not hold another defined column.
        defined = {j for j, _, _ in picked}
        others = {int(i): set() for _, i, _ in picked}
        for i, j in zip(row, col):
            if int(i) in others and int(j) in defined:
                others[int(i)].add(int(j))
        picked = [(j, i, c) for j, i, c in picked if others[i] == {j}]
        picked.sort()
        columns = torch.tensor([j for j, _, _ in picked], dtype=torch.int64)
        drop_rows = torch.tensor([i for _, i, _ in picked], dtype=torch.int64)
        keep_c = torch.ones(n, dtype=torch.bool)
        keep_c[columns] = False
        keep_r = torch.ones(rows, dtype=torch.bool)
        keep_r[drop_rows] = False
        return cls(
            columns,
            drop_rows,
            torch.tensor([c for _, _, c in picked], dtype=torch.float64),
            keep_c.nonzero().squeeze(-1),
            keep_r.nonzero().squeeze(-1),
        )

    def blocks(
        self, P: _AffineMap | None, q: _AffineMap, A: _AffineMap, n: int, rows: int
    ) -> Blocks:
        """The reduced program's data maps (see :class:`Blocks`) from CVXPY's maps of ``P``
        (``None``: no quadratic part), ``q`` and ``[A_c, b_c]``."""
        R, E, K, rows_e = self.kept_columns, self.columns, self.kept_rows, self.rows
        last, first = torch.tensor([n]), torch.tensor([0])
        minus = torch.full((K.numel(),), -1.0, dtype=torch.float64)
        by_c = -1 / self.coefficients
        P_rr = P_re = P_ee = None
        diagonal = False
        if P is not None:
            P_rr = P.block(n, R, R)
            P_re = P.block(n, R, E)
            P_ee = P.block(n, E, E)
            e = E.numel()
            i, j = P_ee.rows // max(e, 1), P_ee.rows % max(e, 1)
            diagonal = bool((i == j).all())
            if diagonal:  # store the diagonal alone: T^T P_ee T is then one product
                P_ee = _AffineMap(e, i, P_ee.cols, P_ee.values)
        return Blocks(
            A=A.block(rows, K, R, minus),
            b=A.block(rows, K, last),
            q=q.block(n + 1, R, first),
            P=P_rr,
            T=A.block(rows, rows_e, R, by_c),
            t=A.block(rows, rows_e, last, by_c),
            q_e=q.block(n + 1, E, first),
            P_re=None if P_re is None or P_re.empty else P_re,
            P_ee=None if P_ee is None or P_ee.empty else P_ee,
            P_ee_diagonal=diagonal,
        )

    def pattern(self, blocks: Blocks) -> tuple[np.ndarray, np.ndarray | None]:
        """The reduced program's structural patterns ``(A (k, r), P (r, r) or None)``: the
        entries that some parameter value makes nonzero (the maps' positions, and for ``P`` the
        fill of the elimination's ``T^T P_ee T + P_re T + T^T P_er``)."""
        r, k, e = self.kept_columns.numel(), self.kept_rows.numel(), self.columns.numel()

        def mask(m: _AffineMap | None, *shape: int) -> np.ndarray:
            out = np.zeros(int(np.prod(shape)), dtype=bool)
            if m is not None:
                out[m.rows.numpy()] = True
            return out.reshape(shape)

        a_mask = mask(blocks.A, k, r)
        if blocks.P is None:
            return a_mask, None
        p_mask = mask(blocks.P, r, r)
        if e:
            T = mask(blocks.T, e, r).astype(np.int64)
            if blocks.P_ee is not None:
                if blocks.P_ee_diagonal:
                    P_ee = np.diag(mask(blocks.P_ee, e)).astype(np.int64)
                else:
                    P_ee = mask(blocks.P_ee, e, e).astype(np.int64)
                p_mask |= (T.T @ P_ee @ T) > 0
            if blocks.P_re is not None:
                cross = (mask(blocks.P_re, r, e).astype(np.int64) @ T) > 0
                p_mask |= cross | cross.T
        return a_mask, p_mask

    def reduce(self, blocks: Blocks, build: Callable[..., Tensor], cones: Cones) -> Batch:
        """The reduced batch (solver form) from the data maps; ``build(map, *shape)`` evaluates
        one map at the batch's parameters as a ``(L, *shape)`` tensor (``L``: ``B`` or 1)."""
        r, k, e = self.kept_columns.numel(), self.kept_rows.numel(), self.columns.numel()
        A, b, q = build(blocks.A, k, r), build(blocks.b, k), build(blocks.q, r)
        P = None if blocks.P is None else build(blocks.P, r, r)
        reduced = Cones(cones.zero - e, cones.nonneg, cones.soc)
        if e == 0:
            return Batch(self, ConeData(P, q, A, b, reduced), None, None, None, None, None, False)
        T, t, q_e = build(blocks.T, e, r), build(blocks.t, e), build(blocks.q_e, e)
        q = q + bmtv(T, q_e)
        P_re = P_ee = None
        if P is not None:
            # P_red = P_rr + P_re T + T^T P_er + T^T P_ee T, q_red += (P_re + T^T P_ee) t, with
            # the structurally zero blocks skipped and a diagonal P_ee applied as a product.
            if blocks.P_ee is not None:
                if blocks.P_ee_diagonal:
                    P_ee = build(blocks.P_ee, e)
                    PT = P_ee.unsqueeze(-1) * T
                else:
                    P_ee = build(blocks.P_ee, e, e)
                    PT = P_ee @ T
                P = P + T.mT @ PT
                q = q + bmtv(PT, t)
            if blocks.P_re is not None:
                P_re = build(blocks.P_re, r, e)
                cross = P_re @ T
                P = P + cross + cross.mT
                q = q + bmv(P_re, t)
        data = ConeData(P, q, A, b, reduced)
        return Batch(self, data, T, t, q_e, P_re, P_ee, blocks.P_ee_diagonal)


@dataclass(frozen=True)
class Blocks:
    """A program's data maps for the reduced batch: blocks of CVXPY's ``P``, ``q`` and
    ``[A_c, b_c]`` with the elimination's signs and scales folded in (``R``: kept columns,
    ``K``: kept rows, ``E``: eliminated columns, defined by rows ``e`` with coefficients
    ``c``): ``A = -A_c[K, R]``, ``b = b_c[K]``, ``q = q[R]``, ``P = P[R, R]`` (``None``: a
    linear objective); ``T = -A_c[e, R] / c``, ``t = -b_c[e] / c``, ``q_e = q[E]``, ``P_re =
    P[R, E]`` and ``P_ee = P[E, E]`` (``None`` when structurally zero; ``P_ee`` its diagonal
    alone when ``P_ee_diagonal``). A call writes each block straight from the parameters: no
    full matrix is formed and cut up."""

    A: _AffineMap
    b: _AffineMap
    q: _AffineMap
    P: _AffineMap | None
    T: _AffineMap
    t: _AffineMap
    q_e: _AffineMap
    P_re: _AffineMap | None
    P_ee: _AffineMap | None
    P_ee_diagonal: bool


@dataclass(frozen=True)
class Batch:
    """One call's reduced cone programs, and what recovers the full ``x``, ``z`` from their
    solution: the elimination's ``T``, ``t`` and the eliminated columns' ``q_e``, ``P_re``,
    ``P_ee`` (see :class:`Blocks`; ``None`` without eliminated columns)."""

    elimination: Elimination
    data: ConeData
    T: Tensor | None
    t: Tensor | None
    q_e: Tensor | None
    P_re: Tensor | None
    P_ee: Tensor | None
    P_ee_diagonal: bool

    def expand(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """The full program's ``x (B, n)`` and ``z (B, rows)`` from the reduced ones."""
        if self.T is None:
            return x, z
        el = self.elimination
        E, R = el.columns.to(x.device), el.kept_columns.to(x.device)
        rows_e, K = el.rows.to(x.device), el.kept_rows.to(x.device)
        n, rows = E.numel() + R.numel(), rows_e.numel() + K.numel()
        x_e = bmv(self.T, x) + self.t
        full_x = x.new_zeros(x.shape[0], n)
        full_x[:, R] = x
        full_x[:, E] = x_e
        # Stationarity in the eliminated columns: z_row c = q_e + P_er x + P_ee x_e.
        gradient = self.q_e.expand(x.shape[0], -1)
        if self.P_re is not None:
            gradient = gradient + bmtv(self.P_re, x)
        if self.P_ee is not None:
            if self.P_ee_diagonal:
                gradient = gradient + self.P_ee * x_e
            else:
                gradient = gradient + bmv(self.P_ee, x_e)
        c = el.coefficients.to(device=x.device, dtype=x.dtype)
        full_z = z.new_zeros(z.shape[0], rows)
        full_z[:, K] = z
        full_z[:, rows_e] = gradient / c
        return full_x, full_z


def _fortran_flat(value: Tensor) -> Tensor:
    """``(size, L)``: each array of ``value (L, *shape)`` flattened in Fortran order (CVXPY's
    order of a parameter's entries in ``theta``) as a column, by one strided copy (a gather by
    an index, its alternative, took 2.6 ms for a batch of 64 50 x 50 matrices)."""
    return value.permute(*range(value.dim() - 1, 0, -1), 0).reshape(-1, value.shape[0])


def _c_to_fortran_positions(shape: Sequence[int]) -> np.ndarray:
    """``pos`` with ``fortran_flat[pos] == c_flat``: where each row-major entry sits."""
    size = int(np.prod(shape)) if len(shape) else 1
    return np.arange(size).reshape(tuple(shape) or (1,), order="F").flatten().astype(np.int64)


def _problem_data(problem: cp.Problem) -> tuple[dict, object]:
    installed = set(cp.installed_solvers())
    for name in _CANON_SOLVERS:
        if name in installed:
            try:
                data, chain, _ = problem.get_problem_data(solver=name)
            except cp.error.SolverError:
                continue
            return data, chain
    raise Unsupported(
        f"no installed solver canonicalises it (tried {', '.join(_CANON_SOLVERS)}); install "
        "clarabel (pip install clarabel)"
    )


def canonicalise(
    problem: cp.Problem,
    parameters: Sequence[cp.Parameter],
    variables: Sequence[cp.Variable],
    num_eq: int,
    num_ineq: int,
) -> CanonicalProgram:
    """The cone program of ``problem`` for a layer with these ``parameters`` and ``variables``
    (whose rows the layer's program has ``num_eq`` equality and ``num_ineq`` inequality rows).

    Raises:
        Unsupported: exponential, power or PSD cones, lowered (symmetric, ...) parameters, or
            variables CVXPY eliminated.
    """
    from cvxpy.constraints import SOC, NonNeg, Zero

    problem, variables = lower_domains(problem, variables)
    data, chain = _problem_data(problem)
    prog = data[cp.settings.PARAM_PROB]
    dims = data["dims"]
    others = {
        "exponential": dims.exp,
        "PSD": len(dims.psd),
        "power": len(dims.p3d) + len(getattr(dims, "pnd", []) or []),
    }
    unsupported = [name for name, count in others.items() if count]
    if unsupported:
        raise Unsupported(
            f"it needs {' and '.join(unsupported)} cones (this backend has the zero, "
            "nonnegative and second-order cones); use backend='cvxpylayers'"
        )
    if getattr(prog, "lb_tensor", None) is not None or getattr(prog, "ub_tensor", None) is not None:
        raise Unsupported("CVXPY kept variable bounds outside the constraints")
    cones = Cones(int(dims.zero), int(dims.nonneg), tuple(int(k) for k in dims.soc))
    n = int(prog.x.size)
    width = int(prog.total_param_size) + 1

    param_ids = _composed(chain, "compose_param_id_map")
    slots = []
    for index, parameter in enumerate(parameters):
        pid = param_ids.get(parameter.id, parameter.id)
        rewritten = pid != parameter.id or (
            pid in prog.param_id_to_size and prog.param_id_to_size[pid] != parameter.size
        )
        if rewritten:
            # CVXPY stores e.g. a symmetric parameter as its upper triangle: its entries are
            # not the declared ones, and writing those would shift every later parameter.
            raise Unsupported(
                f"CVXPY rewrites parameter {parameter.name()!r} (an attribute such as "
                "symmetric=True or PSD=True); use backend='cvxpylayers'"
            )
        if pid not in prog.param_id_to_col:
            continue  # the parameter does not occur in the problem
        slots.append(_Slot(index, int(prog.param_id_to_col[pid]), max(parameter.size, 1)))
    constant = int(prog.param_id_to_col[-1])

    var_ids = _composed(chain, "compose_var_id_map")
    columns = []
    for variable in variables:
        vid = var_ids.get(variable.id, variable.id)
        if vid not in prog.var_id_to_col:
            raise Unsupported(f"CVXPY eliminated variable {variable.name()!r}")
        if prog.id_to_var[vid].size != variable.size:
            raise Unsupported(
                f"CVXPY rewrites variable {variable.name()!r} (an attribute such as "
                "symmetric=True); use backend='cvxpylayers'"
            )
        start = int(prog.var_id_to_col[vid])
        columns.append(start + _c_to_fortran_positions(variable.shape))
    variable_columns = torch.as_tensor(np.concatenate(columns) if columns else np.zeros(0, int))

    eq_rows, ineq_rows = _dual_rows(problem, prog, chain, cones, (Zero, NonNeg, SOC))
    if eq_rows is not None and (eq_rows.numel(), ineq_rows.numel()) != (num_eq, num_ineq):
        eq_rows = ineq_rows = None

    P_tensor = getattr(prog, "P", None)
    A_map = _AffineMap.of(prog.A, cones.rows * (n + 1))
    P_map, q_map = _AffineMap.of(P_tensor, n * n), _AffineMap.of(prog.q, n + 1)
    has_quadratic = P_tensor is not None and sp.coo_array(P_tensor).nnz > 0
    elimination = Elimination.find(A_map, n, cones.rows, cones.zero, constant)
    canonical = CanonicalProgram(
        cones=cones,
        n=n,
        width=width,
        slots=tuple(slots),
        constant=constant,
        P=P_map,
        q=q_map,
        A=A_map,
        variables=variable_columns,
        eq_rows=eq_rows,
        ineq_rows=ineq_rows,
        has_quadratic=has_quadratic,
        elimination=elimination,
        blocks=elimination.blocks(P_map if has_quadratic else None, q_map, A_map, n, cones.rows),
    )
    _check_against_cvxpy(canonical, prog, parameters)
    return _with_arrow_plan(canonical, P_map if has_quadratic else None, q_map, A_map)


def _with_arrow_plan(
    canonical: CanonicalProgram, P: _AffineMap | None, q: _AffineMap, A: _AffineMap
) -> CanonicalProgram:
    """``canonical`` with the block-arrow plan of its reduced program's sparsity, if it has one
    (:mod:`.arrow`), and its kept columns reordered so that the plan's groups are contiguous
    (their rows then move as views, not gathers; the blocks follow the kept columns' order, and
    the map back puts each column where it was)."""
    elimination, cones = canonical.elimination, canonical.cones
    reduced = Cones(cones.zero - elimination.columns.numel(), cones.nonneg, cones.soc)
    soc_start = reduced.zero + reduced.nonneg

    def plan(el: Elimination, blocks: Blocks) -> ArrowPattern | None:
        a_mask, p_mask = el.pattern(blocks)
        return ArrowPattern.plan(a_mask, p_mask, soc_start, reduced.soc)

    arrow = plan(elimination, canonical.blocks)
    if arrow is None:
        return canonical
    order = torch.as_tensor(arrow.layout_order())
    if bool((order == torch.arange(order.numel())).all()):
        return dataclasses.replace(canonical, arrow=arrow)
    elimination = dataclasses.replace(elimination, kept_columns=elimination.kept_columns[order])
    blocks = elimination.blocks(P, q, A, canonical.n, cones.rows)
    return dataclasses.replace(
        canonical, elimination=elimination, blocks=blocks, arrow=plan(elimination, blocks)
    )


def _sample(parameter: cp.Parameter, generator: np.random.Generator) -> np.ndarray:
    """A value for ``parameter`` that its sign attributes allow."""
    value = generator.standard_normal(parameter.shape)
    if parameter.is_nonneg():
        value = np.abs(value) + 0.5
    elif parameter.is_nonpos():
        value = -np.abs(value) - 0.5
    return value


def _check_against_cvxpy(
    canonical: CanonicalProgram, prog: object, parameters: Sequence[cp.Parameter]
) -> None:
    """The batched data maps against CVXPY's own ``apply_parameters`` at random parameter values
    (the parameters' own values are restored): a layout this module misreads (another CVXPY
    version, a reduction it does not know) is refused, never solved wrongly."""
    saved = [p.value for p in parameters]
    generator = np.random.default_rng(0)
    try:
        values = [_sample(p, generator) for p in parameters]
        for p, value in zip(parameters, values):
            p.value = value
        if getattr(prog, "P", None) is not None:
            P, q, _, A, b = prog.apply_parameters(quad_obj=True)  # type: ignore[attr-defined]
        else:
            P = None
            q, _, A, b = prog.apply_parameters()  # type: ignore[attr-defined]
        batch = BatchedParams(
            tuple(torch.as_tensor(v, dtype=torch.float64) for v in values),
            tuple(None for _ in values),
            1,
        )
        full, _ = canonical.theta(batch, torch.float64)
        n, rows = canonical.n, canonical.rows
        theta = full[:, 0].numpy()
        mine_q = canonical.q.apply(full)[0, :n].numpy()
        errors = [np.abs(mine_q - q).max(initial=0.0)]
        if rows:
            expected_A = sp.hstack([sp.csr_array(A), sp.csr_array(np.reshape(b, (-1, 1)))])
            errors.append(_sparse_gap(canonical.A, theta, rows, (rows, n + 1), expected_A))
        if canonical.has_quadratic and P is not None:
            errors.append(_sparse_gap(canonical.P, theta, n, (n, n), sp.csr_array(P)))
        scale = max(1.0, float(np.abs(q).max(initial=0.0)))
    except (ValueError, TypeError, AttributeError, IndexError) as error:
        raise Unsupported(
            f"its canonical data could not be checked against CVXPY ({error})"
        ) from error
    finally:
        for p, value in zip(parameters, saved):
            p.value = value
    if max(errors) > 1e-9 * scale:
        raise Unsupported(
            "declopt's map of CVXPY's canonical data does not reproduce CVXPY's own (a layout "
            "of this CVXPY version it does not know); use backend='cvxpylayers'"
        )


def _sparse_gap(
    block: _AffineMap, theta: np.ndarray, leading: int, shape: tuple[int, int], expected: object
) -> float:
    """``max |mine - expected|`` of one data block at ``theta``, both sparse (a large program's
    dense data is never formed just to be checked). ``leading``: the Fortran layout's row count."""
    position = block.rows.numpy()
    values = theta[block.cols.numpy()] * block.values.numpy()
    mine = sp.coo_array((values, (position % leading, position // leading)), shape=shape)
    gap = (mine.tocsr() - expected).tocoo()
    return float(np.abs(gap.data).max(initial=0.0))


def _composed(chain: object, method: str) -> dict[int, int]:
    """CVXPY's map from the problem's ids to the canonical program's (identity on versions
    that keep ids and have no such map)."""
    compose = getattr(chain, method, None)
    if compose is None:
        return {}
    out = {}
    for key, value in compose().items():
        out[key] = value[0] if isinstance(value, (list, tuple)) else value
    return out


def _dual_rows(
    problem: cp.Problem, prog: object, chain: object, cones: Cones, order: tuple[type, ...]
) -> tuple[Tensor | None, Tensor | None]:
    """The rows of ``z`` holding the declared constraints' duals, row-major within each
    constraint, equalities then inequalities (the front end's order)."""
    start, where = 0, {}
    for kind in order:
        for constraint in prog.constr_map.get(kind, []):
            where[constraint.id] = start
            start += constraint.size
    if start != cones.rows:
        return None, None
    ids = _composed(chain, "compose_constr_id_map")
    eqs, ineqs = constraint_kinds(problem)
    blocks: list[list[np.ndarray]] = [[], []]
    for block, constraints in zip(blocks, (eqs, ineqs)):
        for constraint in constraints:
            cid = ids.get(constraint.id, constraint.id)
            if cid not in where:
                return None, None
            if type(constraint).__name__ == "SOC":
                # One row per cone (norm(X) - t <= 0): its multiplier is the dual of the cone's
                # first row, t; the cones are stored one after another, (t_k, x_k).
                cone = constraint.cone_sizes()[0]
                block.append(where[cid] + cone * np.arange(constraint.num_cones()))
            else:
                block.append(where[cid] + _c_to_fortran_positions(constraint.shape))

    def rows(parts: list[np.ndarray]) -> Tensor:
        return torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0, np.int64))

    return rows(blocks[0]), rows(blocks[1])
