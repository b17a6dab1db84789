"""Block-arrow factorisation of the interior point's reduced KKT matrix, planned once from the
cone program's static sparsity.

Each Newton step of :mod:`.ipm` solves with ``M = P + A^T H^{-1} A + rho I`` (``n x n``). Dense,
forming and factoring ``M`` costs ``B (rows n^2 + n^3 / 3)`` flops per step; but the
declarations DDN layers are made of are *separable with a few couplings*: robust pooling couples
each residual's two or three columns and the one pooled value; a projection onto a ball couples
its ``d`` columns only through the cone, onto a simplex or an L1 ball only through one budget
row. This module finds that structure in the pattern of ``P + A^T A`` (fixed by the
canonicalisation, whatever the parameters' values) and splits ``M = P + A^T D A + V C V^T +
rho I``:

* ``D`` diagonal: the orthant's ``1 / w^2``, ``1 / eta^2`` on a second-order cone's rows (the
  diagonal part of ``W^{-2} = (I + 2 a a^T - 2 e_0 e_0^T) / eta^2``, ``a = J w``), 1 on the
  equalities' augmentation;
* ``V C V^T`` low rank (:func:`low_rank_terms`): each cone's rank-two remainder, and the rows
  over more than :data:`DENSE_ROW` columns as rank-one terms ``h_i a_i a_i^T``;
* a *border*: the few columns whose removal splits the rest of ``P + A^T D A``'s graph into
  small connected components (greedily, the densest column of the largest component, while
  that lowers the estimated cost);
* the *components*, grouped by size (rounded up to a power of two, padded with identity rows;
  the program's columns reordered so that groups are contiguous), each group's blocks ``(B, g,
  k, k)`` factored at once by a vectorised Cholesky (LAPACK's per-matrix overhead dominates for
  blocks this small);
* the border columns and the low-rank terms as one small dense system: its Schur complement
  ``S = F - X^T X`` with ``X = L^{-1} E`` (``E`` the components' coupling to the border
  columns and to ``V``), factored by LU (it is symmetric indefinite: ``C`` holds signs).

``M``'s entries are assembled straight into the blocks from a list of triples ``(row, A entry,
A entry, position)``: one gather, product and scatter per step, ``O(B nnz)`` instead of
``O(B rows n^2)``. A program whose pattern has no such structure (a QP with a dense quadratic)
keeps the dense factorisation: :meth:`ArrowPattern.plan` returns ``None`` unless the estimated
flops fall below :data:`WORTHWHILE` of the dense ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import scipy.sparse.csgraph as csgraph
import torch
from torch import Tensor

if TYPE_CHECKING:
    from declopt.backends.cone.cones import ConeData

__all__ = ["ArrowFactor", "ArrowPattern", "low_rank_terms"]

WORTHWHILE = 1 / 16
"""The block-arrow factorisation is planned when its estimated flops per step are at most this
share of the dense factorisation's: the dense path's few batched BLAS calls run many more flops
per second than the plan's small kernels. (A 120-variable QP with a dense quadratic had a plan,
a border of 56 columns and one block of 64, at 0.23 of the dense flops: no gain to expect;
Huber pooling's and the ball projection's plans are at 0.002 and 0.0003.)"""

MIN_COLUMNS = 16
"""Programs with fewer columns keep the dense factorisation: its few kernels on tiny matrices
cost less than the block-arrow path's many."""

DENSE_ROW = 16
"""A row of the zero cone or the orthant with more structural entries than this joins the
low-rank terms (``h_i a_i a_i^T``, one column of ``V``) instead of the blocks: a sum over all
columns (a simplex, an L1 ball's budget) would otherwise couple every column into one block."""

MAX_BORDER = 64
"""Border columns at most: the border's Schur complement is dense."""

PIVOT_FLOOR = 8
"""A block's Cholesky pivot is kept at least this many ulps of its diagonal entry (see
:func:`_small_cholesky_inverse`)."""

SWEEP_MAX = 8
"""Blocks up to this size are factored by vectorised elimination, larger ones by LAPACK."""


def _bucket(size: int) -> int:
    """The padded block size of a component of ``size`` columns: the next power of two."""
    return 1 << (size - 1).bit_length()


def _estimate(sizes: np.ndarray, border: int, low_rank: int, triples: int) -> float:
    """Flops per step of the block-arrow factorisation and one solve: the blocks' inverses, the
    Schur complement's products and factorisation, the assembly."""
    k = np.array([_bucket(int(s)) for s in sizes], dtype=np.float64)
    z = border + low_rank
    return float((k**3).sum() + 2 * z * (k**2).sum() + z**3 + triples)


@dataclass(frozen=True)
class _Group:
    """Components padded to one block size: ``columns (g, k)`` (padding: the dummy column
    ``n``), their blocks at ``offset`` in the assembly buffer and their border coupling at
    ``cross_offset`` (``(g, k, nb)``)."""

    columns: Tensor
    offset: int
    cross_offset: int
    span: tuple[int, int] | None = None
    """``(start, stop)`` where the columns are exactly ``start .. stop - 1`` in order (no
    padding): rows of a vector are then taken and written as views, not gathers (which cost
    10x an elementwise pass on the CPU). :func:`layout_order` makes every unpadded group so."""
    _on: dict[torch.device, Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def on(self, device: torch.device) -> Tensor:
        cached = self._on.get(device)
        if cached is None:
            cached = self._on[device] = self.columns.to(device)
        return cached

    def take(self, v: Tensor, padded: Callable[[], Tensor]) -> Tensor:
        """``(B, g, k, *rest)``: the group's rows of ``v (B, n, *rest)`` (``padded()``: ``v``
        with the dummy zero row ``n``, for a group that is not a span)."""
        if self.span is None:
            return padded()[:, self.on(v.device)]
        start, stop = self.span
        return v[:, start:stop].unflatten(1, tuple(self.columns.shape))

    def put(self, out: Tensor, x: Tensor) -> None:
        """Write ``x (B, g, k, *rest)`` into the group's rows of ``out (B, n (+1), *rest)``
        (padding goes to the dummy row ``n``)."""
        if self.span is None:
            out[:, self.on(out.device)] = x
        else:
            start, stop = self.span
            out[:, start:stop] = x.flatten(1, 2)


@dataclass(frozen=True)
class ArrowPattern:
    """The static plan: how the columns split into border and component groups, and where each
    entry of ``P + A^T D A + rho I`` goes in the per-problem assembly buffer (blocks of each
    group, then each group's border coupling, then the border's own ``(nb, nb)``).

    Attributes:
        n, rows: the program's columns and rows.
        groups: the component groups.
        border: ``(nb,)`` the border columns.
        size: the assembly buffer's length per problem.
        border_offset: where the border's ``(nb, nb)`` block starts in it.
        tri_row, tri_a, tri_b, tri_pos: ``(T,)`` the products ``D[row] A[a] A[b]`` (``a``, ``b``
            positions in ``A`` flattened row-major) added at buffer position ``pos``.
        p_index, p_pos: ``(Tp,)`` ``P``'s structural entries (flattened) and their positions.
        diag_pos: ``(n,)`` the position of each column's diagonal entry; ``pad_pos``: those of
            the padding (set to 1).
        soc_entries: ``(Ts,)`` positions in ``A`` (flattened) of the entries in second-order
            cone rows, with ``soc_rows``, ``soc_cols``, ``soc_cone`` their row, column and cone
            (the products ``A^T a`` of the rank-two terms take only these); ``soc_heads (c,)``
            the cones' first rows.
        a_row, a_col, p_row, p_col: ``A``'s and ``P``'s structural entries (the products
            :meth:`a_times`, :meth:`p_times` take only these).
        dense_rows: ``(d,)`` the rows whose terms are rank-one (see :data:`DENSE_ROW`).
        border_span: ``(start, stop)`` where the border columns are exactly ``start .. stop -
            1`` (views instead of gathers, as a group's ``span``).
    """

    n: int
    rows: int
    groups: tuple[_Group, ...]
    border: Tensor
    size: int
    border_offset: int
    tri_row: Tensor
    tri_a: Tensor
    tri_b: Tensor
    tri_pos: Tensor
    p_index: Tensor
    p_pos: Tensor
    diag_pos: Tensor
    pad_pos: Tensor
    soc_entries: Tensor
    soc_rows: Tensor
    soc_cols: Tensor
    soc_cone: Tensor
    soc_heads: Tensor
    a_row: Tensor
    a_col: Tensor
    p_row: Tensor
    p_col: Tensor
    dense_rows: Tensor
    border_span: tuple[int, int] | None = None
    _on: dict[torch.device, dict[str, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def on(self, device: torch.device) -> dict[str, Tensor]:
        """The index tensors on ``device`` (copied once)."""
        cached = self._on.get(device)
        if cached is None:
            tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
            cached = {k: v.to(device) for k, v in tensors.items() if isinstance(v, Tensor)}
            cached["a_flat"] = cached["a_row"] * self.n + cached["a_col"]
            cached["p_flat"] = cached["p_row"] * self.n + cached["p_col"]
            self._on[device] = cached
        return cached

    @property
    def padded(self) -> bool:
        """Whether some group is not a span (its rows are gathered from a vector with a dummy
        zero row ``n``)."""
        return any(group.span is None for group in self.groups)

    def layout_order(self) -> np.ndarray:
        """``(n,)`` a column order that lays every group's components out contiguously, in the
        plan's order, then the border: the program's columns permuted by it, the plan of the
        permuted pattern has a ``span`` for every group without padding."""
        parts = [g.columns.flatten() for g in self.groups] + [self.border]
        order = torch.cat(parts)
        return order[order < self.n].numpy()

    def border_columns(self, r: Tensor) -> Tensor:
        """``(B, nb, *rest)``: the border's rows of ``r (B, n, *rest)``."""
        if self.border_span is None:
            return r[:, self.on(r.device)["border"]]
        return r[:, self.border_span[0] : self.border_span[1]]

    def put_border(self, out: Tensor, y: Tensor) -> None:
        """Write ``y (B, nb, *rest)`` into the border's rows of ``out``."""
        if self.border_span is None:
            out[:, self.on(out.device)["border"]] = y
        else:
            out[:, self.border_span[0] : self.border_span[1]] = y

    def gather(self, name: str, data: ConeData) -> Tensor:
        """``(B|1, count)`` values of ``data`` the plan reads, by ``name``: ``"A"``, ``"P"``
        (the structural entries the products take), ``"pairs"`` (the products ``A[a] A[b]``
        the assembly weighs), ``"P_blocks"`` (``P``'s entries the assembly adds, with its
        per-problem scale), ``"soc"`` (the entries of the cone rows). Constant for a batch:
        :meth:`ConeData.structural` gathers each once."""
        index = self.on(data.A.device)
        flat_a = data.A.reshape(data.A.shape[0], -1)
        if name == "A":
            return flat_a[:, index["a_flat"]]
        if name == "pairs":
            return flat_a[:, index["tri_a"]] * flat_a[:, index["tri_b"]]
        if name == "soc":
            return flat_a[:, index["soc_entries"]]
        assert data.P is not None
        flat_p = data.P.reshape(data.P.shape[0], -1)
        if name == "P":
            return flat_p[:, index["p_flat"]]
        values = flat_p[:, index["p_index"]]
        return values if data.P_scale is None else values * data.P_scale.unsqueeze(-1)

    @classmethod
    def plan(
        cls,
        a_mask: np.ndarray,
        p_mask: np.ndarray | None,
        soc_start: int,
        soc: Sequence[int],
        *,
        threshold: float = WORTHWHILE,
        min_columns: int = MIN_COLUMNS,
        dense_row: int = DENSE_ROW,
    ) -> ArrowPattern | None:
        """The plan for a program whose ``A`` has the structural pattern ``a_mask (rows, n)``
        and ``P`` ``p_mask (n, n)`` (``None``: linear), with second-order cones of sizes
        ``soc`` from row ``soc_start`` on; ``None`` where the dense factorisation is cheaper
        (see the module docstring): fewer than ``min_columns`` columns, or estimated flops
        above ``threshold`` times the dense ones. Rows with more than ``dense_row`` entries
        (outside the cones) become rank-one terms."""
        rows, n = a_mask.shape
        if n == 0 or n < min_columns:
            return None
        in_cone = np.zeros(rows, dtype=bool)
        in_cone[soc_start:] = True
        dense_rows = np.flatnonzero((a_mask.sum(1) > dense_row) & ~in_cone)
        a_mask = a_mask.copy()
        full_mask = a_mask.copy()
        a_mask[dense_rows] = False  # their rank-one terms leave the blocks' pattern
        a = sp.csr_array(a_mask.astype(np.float64))
        graph = (a.T @ a).astype(bool).astype(np.float64)
        if p_mask is not None:
            graph = graph + sp.csr_array((p_mask | p_mask.T).astype(np.float64))
        graph = sp.csr_array(graph)
        graph.setdiag(0)
        graph.eliminate_zeros()
        graph = graph.astype(bool).astype(np.int8).tocsr()
        row_counts = np.asarray(a_mask.sum(1), dtype=np.float64)
        triples = float((row_counts**2).sum() + (0 if p_mask is None else p_mask.sum()))
        low_rank = 2 * len(soc) + dense_rows.size
        dense = n**3 / 3 + rows * n**2
        removed = np.zeros(n, dtype=bool)
        # (cost, border, the other columns, their component labels) of the cheapest split
        best: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None = None
        for _ in range(min(MAX_BORDER, n) + 1):
            keep = np.flatnonzero(~removed)
            sub = graph[keep][:, keep]
            count, labels = csgraph.connected_components(sub, directed=False)
            sizes = np.bincount(labels, minlength=count)
            cost = _estimate(sizes, int(removed.sum()), low_rank, triples)
            if best is None or cost < best[0]:
                best = (cost, np.flatnonzero(removed), keep, labels)
            largest = int(sizes.argmax()) if count else 0
            if count == 0 or sizes[largest] <= 1:
                break
            members = np.flatnonzero(labels == largest)
            degree = np.asarray(sub[members].sum(1)).ravel()
            removed[keep[members[degree.argmax()]]] = True
        assert best is not None
        cost, border, inner, labels = best
        if cost > threshold * dense:
            return None
        return cls._build(full_mask, dense_rows, p_mask, soc_start, soc, border, inner, labels)

    @classmethod
    def _build(
        cls,
        a_mask: np.ndarray,
        dense_rows: np.ndarray,
        p_mask: np.ndarray | None,
        soc_start: int,
        soc: Sequence[int],
        border: np.ndarray,
        inner: np.ndarray,
        labels: np.ndarray,
    ) -> ArrowPattern:
        """The plan of a split: ``border`` columns, the ``inner`` ones (sorted) with their
        component ``labels``."""
        rows, n = a_mask.shape
        nb = border.size
        count = int(labels.max()) + 1 if labels.size else 0
        # Where each column lives: (buffer offset of its block row, its index in the block,
        # the block size) for components, or its border index.
        block_row = np.full(n, -1, dtype=np.int64)  # offset of the column's block row start
        local = np.full(n, -1, dtype=np.int64)
        cross_row = np.full(n, -1, dtype=np.int64)
        border_at = np.full(n, -1, dtype=np.int64)
        border_at[border] = np.arange(nb)
        components: dict[int, list[np.ndarray]] = {}
        for label in range(count):
            members = inner[labels == label]
            components.setdefault(_bucket(members.size), []).append(members)
        groups, pad_pos = [], []
        offset = 0
        cross = sum(k * k * len(c) for k, c in components.items())
        for k in sorted(components):
            members = components[k]
            columns = np.full((len(members), k), n, dtype=np.int64)
            for c, cols in enumerate(members):
                columns[c, : cols.size] = cols
                start = offset + c * k * k
                block_row[cols] = start + np.arange(cols.size) * k
                local[cols] = np.arange(cols.size)
                cross_row[cols] = cross + (c * k + np.arange(cols.size)) * nb
                pad = np.arange(cols.size, k)
                pad_pos.extend((start + pad * k + pad).tolist())
            first = int(columns[0, 0])
            exact = np.array_equal(columns.ravel(), np.arange(first, first + columns.size))
            span = (first, first + columns.size) if exact else None
            groups.append(_Group(torch.as_tensor(columns), offset, cross, span))
            offset += k * k * len(members)
            cross += k * nb * len(members)
        border_offset = cross
        size = border_offset + nb * nb

        def position(j: np.ndarray, m: np.ndarray) -> np.ndarray:
            """Buffer positions of the entries ``(j, m)`` of ``M`` (-1: the coupling's
            transpose, stored once)."""
            out = np.full(j.shape, -1, dtype=np.int64)
            jb, mb = border_at[j], border_at[m]
            both = (jb < 0) & (mb < 0)
            out[both] = block_row[j[both]] + local[m[both]]
            to_border = (jb < 0) & (mb >= 0)
            out[to_border] = cross_row[j[to_border]] + mb[to_border]
            on_border = (jb >= 0) & (mb >= 0)
            out[on_border] = border_offset + jb[on_border] * nb + mb[on_border]
            return out

        tri = [[], [], [], []]
        for i in np.setdiff1d(np.arange(rows), dense_rows):
            cols = np.flatnonzero(a_mask[i])
            j, m = np.meshgrid(cols, cols, indexing="ij")
            j, m = j.ravel(), m.ravel()
            pos = position(j, m)
            keep = pos >= 0
            tri[0].append(np.full(int(keep.sum()), i, dtype=np.int64))
            tri[1].append(i * n + j[keep])
            tri[2].append(i * n + m[keep])
            tri[3].append(pos[keep])
        tri_row, tri_a, tri_b, tri_pos = (
            torch.as_tensor(np.concatenate(t) if t else np.zeros(0, dtype=np.int64)) for t in tri
        )
        if p_mask is None:
            p_index = p_pos = torch.zeros(0, dtype=torch.int64)
        else:
            j, m = np.nonzero(p_mask)
            pos = position(j, m)
            keep = pos >= 0
            p_index = torch.as_tensor(j[keep] * n + m[keep])
            p_pos = torch.as_tensor(pos[keep])
        columns = np.arange(n)
        diag_pos = torch.as_tensor(position(columns, columns))
        cone_of_row = np.full(rows, -1, dtype=np.int64)
        heads = soc_start + np.concatenate([[0], np.cumsum(soc)[:-1]]).astype(np.int64)
        for c, (head, k) in enumerate(zip(heads, soc)):
            cone_of_row[head : head + k] = c
        soc_r, soc_c = np.nonzero(a_mask & (cone_of_row >= 0)[:, None])
        border_span = None
        if nb and np.array_equal(border, np.arange(border[0], border[0] + nb)):
            border_span = (int(border[0]), int(border[0]) + nb)
        return cls(
            n,
            rows,
            tuple(groups),
            torch.as_tensor(border.astype(np.int64)),
            size,
            border_offset,
            tri_row,
            tri_a,
            tri_b,
            tri_pos,
            p_index,
            p_pos,
            diag_pos,
            torch.as_tensor(np.asarray(pad_pos, dtype=np.int64)),
            torch.as_tensor(soc_r * n + soc_c),
            torch.as_tensor(soc_r),
            torch.as_tensor(soc_c),
            torch.as_tensor(cone_of_row[soc_r]),
            torch.as_tensor(heads[: len(soc)]),
            *(torch.as_tensor(t.astype(np.int64)) for t in np.nonzero(a_mask)),
            *(
                torch.as_tensor(t.astype(np.int64))
                for t in (np.nonzero(p_mask) if p_mask is not None else (np.zeros(0),) * 2)
            ),
            torch.as_tensor(dense_rows.astype(np.int64)),
            border_span,
        )

    def a_times(self, values: Tensor, v: Tensor, transpose: bool = False) -> Tensor:
        """``A v`` (``A^T v`` with ``transpose``) for ``A``'s structural entries ``values (B|1,
        nnz)`` (:meth:`gather`) and ``v (B, n|rows)`` or ``(B, n|rows, k)``: ``O(B nnz)``, where
        the dense product is ``O(B rows n)``."""
        index = self.on(v.device)
        size = self.n if transpose else self.rows
        return _sparse_times(values, index["a_row"], index["a_col"], v, size, transpose)

    def p_times(self, values: Tensor, v: Tensor) -> Tensor:
        """``P v`` from ``P``'s structural entries (as :meth:`a_times`)."""
        index = self.on(v.device)
        return _sparse_times(values, index["p_row"], index["p_col"], v, self.n, False)


def _sparse_times(
    values: Tensor, row: Tensor, col: Tensor, v: Tensor, size: int, transpose: bool
) -> Tensor:
    """``M v`` (``M^T v``) over the entries ``values (B|1, nnz)`` at ``(row, col)``: a gather,
    a product and an ``index_add`` along the last dim (several right-hand sides ``v (B, N, k)``
    as a ``(B, k, N)`` view: gathering ``(B, nnz, k)`` with a trailing dim of 2 took 1.6-2.3x as
    long, measured at 128 x 128 .. 258 entries)."""
    if transpose:
        row, col = col, row
    if v.dim() == 2:
        out = v.new_zeros(v.shape[0], size)
        return out.index_add_(1, row, v.index_select(1, col) * values)
    columns = v.transpose(1, 2)  # (B, k, N)
    out = v.new_zeros(v.shape[0], v.shape[2], size)
    out.index_add_(2, row, columns.index_select(2, col) * values.unsqueeze(1))
    return out.transpose(1, 2)


def low_rank_terms(
    data: ConeData, h: Tensor, cones: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, Tensor] | None:
    """``(V (B, n, r), sign (B, r))`` with ``V diag(sign) V^T`` the part of ``A^T H^{-1} A``
    the blocks leave out, or ``None``: the plan's dense rows, ``h_i a_i a_i^T`` for the weights
    ``h (B, rows)``, and with ``cones = (a (B, rows), eta (B, c))`` the second-order cones'
    rank-two terms, from ``W_c^{-2} = (I + 2 a a^T - 2 e_0 e_0^T) / eta_c^2`` (``a`` each
    cone's ``J w`` on its rows): ``A^T a_c`` (from the cone rows' structural entries alone) and
    ``A^T e_{head_c}`` with weights ``+-2 / eta_c^2``. Each column is scaled by the root of its
    weight's size, so the signs are +-1 (a zero weight, a polish's dropped row, leaves a zero
    column rather than a ``1 / 0`` in the Schur complement)."""
    pattern, A = data.arrow, data.A
    assert pattern is not None
    index = pattern.on(A.device)
    batch, n = h.shape[0], pattern.n
    columns, weights = [], []
    if cones is not None:
        a, eta = cones
        count = eta.shape[-1]
        values = data.structural("soc") * a[:, index["soc_rows"]]  # (B, Ts)
        V = a.new_zeros(batch, n * count)
        V.index_add_(1, index["soc_cols"] * count + index["soc_cone"], values)
        columns += [V.reshape(batch, n, count), A[:, index["soc_heads"]].mT.expand(batch, -1, -1)]
        weight = 2 / (eta * eta)
        weights += [weight, -weight]
    dense = index["dense_rows"]
    if dense.numel():
        columns.append(A[:, dense].mT.expand(batch, -1, -1))
        weights.append(h[:, dense])
    if not columns:
        return None
    V, c = torch.cat(columns, -1), torch.cat(weights, -1)
    sign = torch.where(c < 0, -1.0, 1.0).to(c.dtype)
    return V * c.abs().sqrt().unsqueeze(-2), sign


def _small_cholesky_inverse(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``(L^{-1}, failed (...))`` for ``blocks (..., k, k) = L L^T``, vectorised over the blocks:
    ``k`` column steps of Cholesky and ``k`` row steps of forward substitution, a few
    elementwise kernels each, where LAPACK would pay its per-matrix overhead on each of tens of
    thousands of tiny matrices.

    A pivot below :data:`PIVOT_FLOOR` ulps of its diagonal entry is rounding noise (the
    interior point's weights span 1e-12 .. 1e7 near a float32 solution, and ``h_1 + h_2 -
    (h_1 - h_2)^2 / (h_1 + h_2)`` cancels to either sign): it is raised to that floor, a
    dynamic regularisation of the size the dtype cannot resolve (as Clarabel's), which the
    interior point's iterative refinement and next iterate absorb. A pivot that is not finite
    marks its block failed."""
    k = blocks.shape[-1]
    diagonal = blocks.diagonal(dim1=-2, dim2=-1)
    floor = (PIVOT_FLOOR * torch.finfo(blocks.dtype).eps) * diagonal.abs()
    L = torch.zeros_like(blocks)
    for j in range(k):
        pivot = diagonal[..., j]
        if j:
            pivot = pivot - (L[..., j, :j] ** 2).sum(-1)
        root = torch.maximum(pivot, floor[..., j]).sqrt()  # a NaN stays NaN
        L[..., j, j] = root
        if j + 1 < k:
            column = blocks[..., j + 1 :, j]
            if j:
                column = column - (L[..., j + 1 :, :j] * L[..., j : j + 1, :j]).sum(-1)
            L[..., j + 1 :, j] = column / root.unsqueeze(-1)
    # Blocks are independent: a failed one spoils only its own problem, which is reported.
    failed = ~torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(-1)
    inverse = torch.zeros_like(blocks)
    roots = L.diagonal(dim1=-2, dim2=-1)
    for i in range(k):
        if i:
            row = -(L[..., i, :i].unsqueeze(-1) * inverse[..., :i, :i]).sum(-2)
            inverse[..., i, :i] = row / roots[..., i : i + 1]
        inverse[..., i, i] = 1 / roots[..., i]
    return inverse, failed


def _block_cholesky_inverse(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``(L^{-1} (B, g, k, k), failed (B, g))`` of the Cholesky factors of positive definite
    ``blocks (B, g, k, k) = L L^T``. The factors' inverses, not the blocks': the border's Schur
    complement is then ``F - X^T X`` with ``X = L^{-1} E``, a Cholesky step (backward stable
    however ill-conditioned the blocks), where ``E^T (L L^T)^{-1} E`` loses the small Schur
    complement of a nearly singular border to cancellation (measured: backward errors 1e-9
    against 1e-17)."""
    k = blocks.shape[-1]
    if k == 1:  # no elimination, no cancellation: the pivot is the entry
        pivot = blocks[..., 0, 0]
        failed = ~(pivot > 0) | ~torch.isfinite(pivot)
        safe = torch.where(failed, torch.ones_like(pivot), pivot)
        return safe.rsqrt()[..., None, None], failed
    if k <= SWEEP_MAX:
        return _small_cholesky_inverse(blocks)
    L, info = torch.linalg.cholesky_ex(blocks)
    failed = (info != 0) | ~torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(-1)
    eye = torch.eye(k, dtype=blocks.dtype, device=blocks.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False), failed


def _times(inverse: Tensor, v: Tensor) -> Tensor:
    """``inverse (B, g, k, k) @ v (B, g, k, m)``: for tiny blocks one fused multiply-add per
    column of ``inverse`` and per right-hand side, each over every block at once (measured, 128
    x 64 blocks of 2 x 2, two right-hand sides: 140 us, against 220 us for the batched matrix
    product, which runs one tiny matrix at a time, and 1.35 ms for a broadcast product and sum,
    whose 5-d temporary takes torch's slow strided path)."""
    k, m = inverse.shape[-1], v.shape[-1]
    if k > SWEEP_MAX:
        return inverse @ v
    if k == 1:
        return inverse * v
    columns = []
    for c in range(m):
        right = v[..., c]  # (B, g, k)
        out = inverse[..., :, 0] * right[..., 0:1]
        for j in range(1, k):
            out = torch.addcmul(out, inverse[..., :, j], right[..., j : j + 1])
        columns.append(out)
    return columns[0].unsqueeze(-1) if m == 1 else torch.stack(columns, -1)


class ArrowFactor:
    """The factorisation of ``M = P + A^T diag(h) A + V diag(c) V^T + rho I`` for a batch (see
    the module docstring), and solves with it.

    Args:
        data: the batch, with its plan ``data.arrow``.
        h: ``(B, rows)`` the diagonal weights.
        eps: the static regularisation: ``rho = eps + eps_dtype^2 max_j |M_jj|`` (as the dense
            factorisation's), kept as ``rho (B,)``.
        low_rank: ``(V (B, n, r), sign (B, r))`` (:func:`low_rank_terms`) or ``None``.
    """

    def __init__(
        self,
        data: ConeData,
        h: Tensor,
        eps: float,
        low_rank: tuple[Tensor, Tensor] | None,
    ) -> None:
        pattern = data.arrow
        assert pattern is not None
        index = pattern.on(h.device)
        batch = h.shape[0]
        self.pattern, self.batch = pattern, batch
        buffer = h.new_zeros(batch, pattern.size)
        products = data.structural("pairs")
        buffer.index_add_(1, index["tri_pos"], h[:, index["tri_row"]] * products)
        if data.P is not None and index["p_index"].numel():
            values = data.structural("P_blocks")
            buffer.index_add_(1, index["p_pos"], values.expand(batch, -1))
        V, c = low_rank if low_rank is not None else (None, None)
        diagonal = buffer[:, index["diag_pos"]]
        if V is not None and c is not None:
            diagonal = diagonal + (V * V * c.unsqueeze(-2)).sum(-1)
        rho = eps + torch.finfo(h.dtype).eps ** 2 * diagonal.abs().amax(-1)
        self.rho = rho
        buffer[:, index["diag_pos"]] += rho.unsqueeze(-1)
        buffer[:, index["pad_pos"]] = 1
        nb = pattern.border.numel()
        r = 0 if c is None else c.shape[-1]
        z = nb + r
        # E: each component row's coupling to the border columns and to V (B, g, k, z)
        failed = torch.zeros(batch, dtype=torch.bool, device=h.device)
        V_padded = None
        if V is not None and pattern.padded:
            V_padded = torch.cat([V, V.new_zeros(batch, 1, r)], 1)  # the padding column: 0
        self.inverses: list[Tensor] = []  # per group, L^{-1} of its blocks (M_cc = L L^T)
        self.couplings: list[Tensor] = []  # per group, X = L^{-1} E (B, g k, z)
        schur = h.new_zeros(batch, z, z)
        for group in pattern.groups:
            g, k = group.columns.shape
            blocks = buffer[:, group.offset : group.offset + g * k * k].reshape(batch, g, k, k)
            inverse, bad = _block_cholesky_inverse(blocks)  # L^{-1}
            failed |= bad.any(-1)
            parts = []
            if nb:
                start = group.cross_offset
                parts.append(buffer[:, start : start + g * k * nb].reshape(batch, g, k, nb))
            if V is not None:
                parts.append(group.take(V, lambda: V_padded))
            self.inverses.append(inverse)
            if parts:
                E = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
                X = _times(inverse, E).reshape(batch, g * k, z)  # L^{-1} E
                schur -= X.mT @ X
                self.couplings.append(X)
        self.z = z
        if z:
            start = pattern.border_offset
            schur[:, :nb, :nb] += buffer[:, start : start + nb * nb].reshape(batch, nb, nb)
            if V is not None and c is not None:
                V_border = pattern.border_columns(V)  # (B, nb, r)
                schur[:, :nb, nb:] += V_border
                schur[:, nb:, :nb] += V_border.mT
                # -C^{-1} for C = diag(signs): -C
                schur[:, nb:, nb:].diagonal(dim1=-2, dim2=-1).sub_(c)
            self.lu, self.pivots, info = torch.linalg.lu_factor_ex(schur)
            lu_diagonal = self.lu.diagonal(dim1=-2, dim2=-1)
            failed |= (
                (info != 0) | ~torch.isfinite(lu_diagonal).all(-1) | (lu_diagonal == 0).any(-1)
            )
        self.failed = failed

    def solve(self, r: Tensor) -> Tensor:
        """``M^{-1} r`` for ``r (B, n, m)``."""
        pattern = self.pattern
        batch, n, m = r.shape
        padding: list[Tensor] = []

        def padded() -> Tensor:  # r with the dummy zero row n, made once if a group needs it
            if not padding:
                padding.append(torch.cat([r, r.new_zeros(batch, 1, m)], 1))
            return padding[0]

        nb = pattern.border.numel()
        border = pattern.border_columns(r)
        partial = []
        rhs = None
        if self.z:
            rhs = r.new_zeros(batch, self.z, m)
            if nb:
                rhs[:, :nb] = border
        for i, group in enumerate(pattern.groups):
            t = _times(self.inverses[i], group.take(r, padded))
            partial.append(t)
            if rhs is not None:
                rhs -= self.couplings[i].mT @ t.reshape(batch, -1, m)
        out = r.new_zeros(batch, n + 1 if pattern.padded else n, m)
        y = None
        if rhs is not None:
            y = torch.linalg.lu_solve(self.lu, self.pivots, rhs)
            if nb:
                pattern.put_border(out, y[:, :nb])
        for i, group in enumerate(pattern.groups):
            x = partial[i]
            if y is not None:
                x = x - (self.couplings[i] @ y).reshape(x.shape)
            group.put(out, _times(self.inverses[i].mT, x))  # L^{-T} (t - X y)
        return out[:, :n]
