"""The cones of a cone program, batched: the zero cone, the nonnegative orthant and second-order
cones, and the Nesterov-Todd scaling the interior-point method takes steps in.

A vector of the cone program's rows is a ``(B, rows)`` tensor laid out as CVXPY's solver
interface orders them: ``zero`` rows first, then ``nonneg`` rows, then each second-order cone
``(t, x)`` (``||x||_2 <= t``) contiguously. Operations on the conic part leave the zero rows at
zero. Second-order cones of one size are handled together as a ``(B, g, k)`` block gathered from
the rows (a short loop over the *distinct* sizes, never over cones or problems); extra trailing
dims (columns of a matrix whose rows are the cone's) ride along.

The formulas are the standard ones of symmetric-cone interior-point methods (Vandenberghe, "The
CVXOPT linear and quadratic cone program solvers", 2010; Goulart and Chen, "Clarabel", 2024):
Jordan products ``u o v``, their inverse ``lambda \\ v``, and for each cone the NT scaling
``W`` (symmetric, ``W z = W^{-1} s = lambda``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from declopt.backends.cone.arrow import ArrowPattern

__all__ = ["ConeData", "Cones", "Scaling"]


@dataclass(frozen=True)
class Cones:
    """The cone ``K = {0}^zero x R_+^nonneg x SOC(k_1) x ...`` of a cone program's rows.

    Attributes:
        zero: rows of the zero cone (equalities).
        nonneg: rows of the nonnegative orthant.
        soc: the sizes ``k`` (including ``t``) of the second-order cones, in row order.
    """

    zero: int
    nonneg: int
    soc: tuple[int, ...] = ()
    _groups: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _on_device: dict[torch.device, list[Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _masks: dict[tuple[torch.device, torch.dtype], Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    _spans: list[tuple[int, int, int] | None] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        start = self.zero + self.nonneg
        rows: dict[int, list[list[int]]] = {}
        for k in self.soc:
            rows.setdefault(k, []).append(list(range(start, start + k)))
            start += k
        for k, index in rows.items():
            self._groups[k] = torch.tensor(index, dtype=torch.int64)
            first, count = index[0][0], len(index)
            contiguous = index[-1][-1] == first + count * k - 1
            self._spans.append((first, count, k) if contiguous else None)

    def take(self, v: Tensor, group: int) -> Tensor:
        """``(B, g, k, *rest)``: the rows of ``v (B, rows, *rest)`` of the ``group``-th size
        group (:meth:`groups`): a view where its cones are adjacent rows (a single cone, or
        cones of one size in a row: the common case), a gather otherwise (advanced indexing
        costs 5-10x a view's copy on the CPU)."""
        span = self._spans[group]
        if span is None:
            return v[:, self.groups(v.device)[group]]
        first, count, k = span
        return v[:, first : first + count * k].unflatten(1, (count, k))

    def put(self, out: Tensor, group: int, block: Tensor) -> None:
        """Write ``block (B, g, k, *rest)`` into the ``group``-th size group's rows of ``out``
        (as :meth:`take`)."""
        span = self._spans[group]
        if span is None:
            out[:, self.groups(out.device)[group]] = block
            return
        first, count, k = span
        out[:, first : first + count * k] = block.flatten(1, 2)

    @property
    def rows(self) -> int:
        return self.zero + self.nonneg + sum(self.soc)

    @property
    def degree(self) -> int:
        """``nu``: the barrier parameter (one per orthant row and per second-order cone)."""
        return self.nonneg + len(self.soc)

    @property
    def orthant(self) -> slice:
        return slice(self.zero, self.zero + self.nonneg)

    @property
    def conic(self) -> slice:
        """The rows that are not the zero cone's."""
        return slice(self.zero, self.rows)

    def groups(self, device: torch.device) -> list[Tensor]:
        """One ``(g, k)`` row index per distinct second-order cone size, on ``device`` (copied
        there once: the method asks for them several times per iteration)."""
        cached = self._on_device.get(device)
        if cached is None:
            cached = [index.to(device) for index in self._groups.values()]
            self._on_device[device] = cached
        return cached

    def mask(self, like: Tensor) -> Tensor:
        """``(rows,)`` 1 on the orthant's rows, 0 elsewhere, in ``like``'s device and dtype
        (built once per device and dtype)."""
        key = (like.device, like.dtype)
        cached = self._masks.get(key)
        if cached is None:
            cached = torch.zeros(self.rows, dtype=like.dtype, device=like.device)
            cached[self.orthant] = 1
            self._masks[key] = cached
        return cached

    # ---------------------------------------------------------------------------------------
    # elementwise algebra on (B, rows) vectors. Without second-order cones (LPs, QPs: the
    # common case) every operation is one or two elementwise products with the orthant's mask:
    # the iteration's cost is then its number of operations, so no slicing and copying there.

    def unit(self, like: Tensor) -> Tensor:
        """``e``: ones on the orthant, ``(1, 0, ..., 0)`` on each second-order cone (read-only:
        it may be a broadcast view)."""
        if not self.soc:
            return self.mask(like).expand_as(like)
        e = torch.zeros_like(like)
        e[:, self.orthant] = 1
        for index in self.groups(like.device):
            e[:, index[:, 0]] = 1
        return e

    def dot(self, u: Tensor, v: Tensor) -> Tensor:
        """``(B,)`` the inner product over the conic rows."""
        return (u[:, self.conic] * v[:, self.conic]).sum(-1)

    def min_eigenvalue(self, v: Tensor) -> Tensor:
        """``(B,)``: the smallest of the orthant entries and the ``t - ||x||`` of each cone
        (``+inf`` for a program with no conic rows); ``v`` is interior iff it is positive."""
        least = v.new_full(v.shape[:1], float("inf"))
        if self.nonneg:
            least = torch.minimum(least, v[:, self.orthant].amin(-1))
        for group in range(len(self._spans)):
            block = self.take(v, group)
            gap = block[..., 0] - torch.linalg.vector_norm(block[..., 1:], dim=-1)
            least = torch.minimum(least, gap.amin(-1))
        return least

    def circ(self, u: Tensor, v: Tensor) -> Tensor:
        """The Jordan product ``u o v`` (zero on the zero rows)."""
        if not self.soc:
            return u * v * self.mask(v)
        out = torch.zeros_like(v)
        out[:, self.orthant] = u[:, self.orthant] * v[:, self.orthant]
        for group in range(len(self._spans)):
            a, b = self.take(u, group), self.take(v, group)
            block = torch.cat(
                [
                    (a * b).sum(-1, keepdim=True),
                    a[..., :1] * b[..., 1:] + b[..., :1] * a[..., 1:],
                ],
                dim=-1,
            )
            self.put(out, group, block)
        return out

    def circ_solve(self, lam: Tensor, v: Tensor) -> Tensor:
        """``lam \\ v``: the ``x`` with ``lam o x = v``, for ``lam`` interior."""
        if not self.soc:
            return torch.where(self.mask(v) > 0, v / lam, torch.zeros_like(v))
        out = torch.zeros_like(v)
        out[:, self.orthant] = v[:, self.orthant] / lam[:, self.orthant]
        for group in range(len(self._spans)):
            a, b = self.take(lam, group), self.take(v, group)
            a0, a1, b0, b1 = a[..., :1], a[..., 1:], b[..., :1], b[..., 1:]
            det = a0 * a0 - (a1 * a1).sum(-1, keepdim=True)
            x0 = (a0 * b0 - (a1 * b1).sum(-1, keepdim=True)) / det
            self.put(out, group, torch.cat([x0, (b1 - x0 * a1) / a0], dim=-1))
        return out

    def max_step(self, v: Tensor, dv: Tensor) -> Tensor:
        """``(B,)``: the largest ``alpha`` (``inf`` if unbounded) with ``v + alpha dv`` in the
        cone, for ``v`` interior."""
        step = v.new_full(v.shape[:1], float("inf"))
        if self.nonneg:
            a, d = v[:, self.orthant], dv[:, self.orthant]
            ratio = torch.where(d < 0, -a / d.clamp_max(-torch.finfo(d.dtype).tiny), torch.inf)
            step = torch.minimum(step, ratio.amin(-1))
        if self.soc:
            step = torch.minimum(step, self.soc_max_step(v, dv))
        return step

    def soc_max_step(self, v: Tensor, dv: Tensor) -> Tensor:
        """``(B,)``: :meth:`max_step` for the second-order cones alone (``v``, ``dv`` may stack
        several points along the batch dim)."""
        step = v.new_full(v.shape[:1], float("inf"))
        for group in range(len(self._spans)):
            block = _soc_max_step(self.take(v, group), self.take(dv, group))
            step = torch.minimum(step, block.amin(-1))
        return step

    def shift_inside(self, v: Tensor) -> Tensor:
        """``v`` moved along ``e`` into the interior when it is not there: its smallest
        eigenvalue becomes the size of its conic part (1 for a zero vector), as CVXOPT's and
        Clarabel's starting points do, in the data's own units."""
        if not self.degree:
            return v
        least = self.min_eigenvalue(v)
        size = v[:, self.conic].abs().amax(-1)
        size = torch.where(size > 0, size, torch.ones_like(size))
        shift = torch.where(least > 0, torch.zeros_like(least), size - least)
        return v + shift.unsqueeze(-1) * self.unit(v)

    def scaling(self, s: Tensor, z: Tensor) -> Scaling:
        """The Nesterov-Todd scaling at interior ``s``, ``z``."""
        w = None
        if self.nonneg:
            # sqrt(s / z) on the orthant, 1 elsewhere: W on the orthant is one product
            mask = self.mask(s) > 0
            one = torch.ones_like(s)
            w = torch.where(mask, s / torch.where(mask, z, one), one).sqrt()
        blocks = []
        for group in range(len(self._spans)):
            blocks.append(_soc_nt_point(self.take(s, group), self.take(z, group)))
        return Scaling(self, w, blocks)


def _soc_max_step(v: Tensor, d: Tensor) -> Tensor:
    """``(B, g)``: the step to the boundary of each second-order cone block ``(B, g, k)``: the
    smallest positive root of ``(v + a d)^T J (v + a d) = 0`` (``J = diag(1, -1, ...)``), for
    ``v`` in the cone (``c = v^T J v >= 0``).

    With ``a = d^T J d`` and ``b = v^T J d``, the roots of ``a t^2 + 2 b t + c`` are ``q / a``
    and ``c / q`` for ``q = -(b + sign(b) disc)`` (the stable pair): for ``b < 0`` the smaller
    positive one is ``c / (disc - b)`` whatever the sign of ``a``; for ``b >= 0`` only ``a < 0``
    has a positive root, ``(b + disc) / -a``; otherwise the quadratic grows along ``d`` and
    the step is unbounded (``inf``)."""
    dd, vd, vv = (d * d).sum(-1), (v * d).sum(-1), (v * v).sum(-1)
    d0, v0 = d[..., 0], v[..., 0]
    a = 2 * d0 * d0 - dd
    b = 2 * v0 * d0 - vd
    c = (2 * v0 * v0 - vv).clamp_min(0)
    disc = (b * b - a * c).clamp_min(0).sqrt()
    inf = torch.full_like(a, float("inf"))
    falling = b < 0
    towards = torch.where(falling, disc - b, torch.ones_like(b))
    step = torch.where(falling, c / towards, inf)
    closing = ~falling & (a < 0)
    away = torch.where(closing, -a, torch.ones_like(a))
    return torch.where(closing, (b + disc) / away, step)


def _soc_nt_point(s: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """``(eta (B, g, 1), w (B, g, k))``: the NT scaling ``W = eta [w0, w1^T; w1, I + w1 w1^T /
    (1 + w0)]`` of each block, with ``w^T J w = 1``."""
    ss = (s[..., :1] ** 2 - (s[..., 1:] ** 2).sum(-1, keepdim=True)).clamp_min(0).sqrt()
    zz = (z[..., :1] ** 2 - (z[..., 1:] ** 2).sum(-1, keepdim=True)).clamp_min(0).sqrt()
    tiny = torch.finfo(s.dtype).tiny
    sb, zb = s / ss.clamp_min(tiny), z / zz.clamp_min(tiny)
    gamma = ((1 + (sb * zb).sum(-1, keepdim=True)) / 2).clamp_min(tiny).sqrt()
    w = torch.cat([sb[..., :1] + zb[..., :1], sb[..., 1:] - zb[..., 1:]], dim=-1) / (2 * gamma)
    eta = (ss / zz.clamp_min(tiny)).clamp_min(tiny).sqrt()
    return eta, w


@dataclass
class Scaling:
    """The NT scaling ``W`` of one interior pair ``(s, z)``: block diagonal over the cones,
    symmetric, ``W z = W^{-1} s``. ``w (B, rows)`` is the orthant's diagonal ``sqrt(s / z)``
    (1 on the other rows); ``blocks`` the second-order cones' ``(eta, w)`` per distinct size."""

    cones: Cones
    w: Tensor | None
    blocks: list[tuple[Tensor, Tensor]]
    _squares: tuple[Tensor | None, list[tuple[Tensor, Tensor, Tensor]]] | None = field(
        default=None, init=False, repr=False
    )

    def squares(self) -> tuple[Tensor | None, list[tuple[Tensor, Tensor, Tensor]]]:
        """``(w^2 (B, rows) or None, [(eta^2, w, J w) per size group])``, formed once (the
        interior point applies ``H`` and ``H^{-1}`` several times per scaling)."""
        if self._squares is None:
            w2 = None if self.w is None else self.w * self.w
            blocks = [
                (eta * eta, w, torch.cat([w[..., :1], -w[..., 1:]], dim=-1))
                for eta, w in self.blocks
            ]
            self._squares = (w2, blocks)
        return self._squares

    def apply(self, v: Tensor, inverse: bool = False) -> Tensor:
        """``W v`` (``W^{-1} v`` with ``inverse``) on the conic rows of ``v (B, rows, *rest)``;
        the zero rows come back unchanged."""
        extra = v.dim() - 2
        if self.w is not None:
            w = self.w.reshape(*self.w.shape, *([1] * extra))
            out = v / w if inverse else v * w
        else:
            out = v.clone()
        for group, (eta, w) in enumerate(self.blocks):
            block = self.cones.take(v, group)  # (B, g, k, *rest)
            eta = eta.reshape(*eta.shape, *([1] * extra))
            w = w.reshape(*w.shape, *([1] * extra))
            w0, w1 = w[:, :, :1], w[:, :, 1:]
            b0, b1 = block[:, :, :1], block[:, :, 1:]
            inner = (w1 * b1).sum(2, keepdim=True)
            if inverse:  # W^{-1} = J Wbar J / eta
                head = w0 * b0 - inner
                tail = b1 + (inner / (1 + w0) - b0) * w1
                self.cones.put(out, group, torch.cat([head, tail], dim=2) / eta)
            else:
                head = w0 * b0 + inner
                tail = b1 + (inner / (1 + w0) + b0) * w1
                self.cones.put(out, group, torch.cat([head, tail], dim=2) * eta)
        return out

    def square(self, v: Tensor, inverse: bool = False) -> Tensor:
        """``W^2 v`` (``W^{-2} v`` with ``inverse``) on the conic rows of ``v (B, rows,
        *rest)``, the zero rows unchanged: in one pass per cone from ``Wbar^2 = 2 w w^T - J``
        (``W^{-2} = (2 (J w) (J w)^T - J) / eta^2``), a third of two :meth:`apply` calls' work
        (the interior point applies ``H`` and ``H^{-1}`` several times per iteration)."""
        extra = v.dim() - 2
        w2, blocks = self.squares()
        if w2 is not None:
            w2 = w2.reshape(*w2.shape, *([1] * extra))
            out = v / w2 if inverse else v * w2
        else:
            out = v.clone()
        for group, (eta2, w, jw) in enumerate(blocks):
            block = self.cones.take(v, group)  # (B, g, k, *rest)
            eta2 = eta2.reshape(*eta2.shape, *([1] * extra))
            w = (jw if inverse else w).reshape(*w.shape, *([1] * extra))
            inner = (w * block).sum(2, keepdim=True)
            # 2 w (w^T v) - J v, with - J v = v - 2 v_0 e_0
            result = torch.addcmul(block, w, inner, value=2)
            result[:, :, :1] -= 2 * block[:, :, :1]
            result = result / eta2 if inverse else result * eta2
            self.cones.put(out, group, result)
        return out


@dataclass(frozen=True)
class ConeData:
    """A batch of cone programs; every tensor's leading dim is ``B`` or 1 (shared by the batch).

    Attributes:
        P: ``(B|1, n, n)`` symmetric PSD, or ``None`` (a linear objective).
        q: ``(B|1, n)``.
        A: ``(B|1, rows, n)``.
        b: ``(B|1, rows)``.
        cones: the cone of the rows.
    """

    P: Tensor | None
    q: Tensor
    A: Tensor
    b: Tensor
    cones: Cones
    P_scale: Tensor | None = None
    """``(B,)``: the quadratic is ``P_scale[i] P`` for one shared ``P (1, n, n)`` (the
    equilibration's per-problem cost scale kept apart, so that a shared ``P`` stays one matrix
    and is factored once); ``None``: 1."""
    arrow: ArrowPattern | None = None
    """The block-arrow plan of the program's static sparsity (:mod:`.arrow`), or ``None``: the
    interior point factors its KKT systems densely."""
    _structural: dict[str, Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def structural(self, name: str) -> Tensor:
        """The values the sparsity plan reads from this batch (see
        :meth:`~declopt.backends.cone.arrow.ArrowPattern.gather`), gathered once: the data
        do not change during a solve, and every product and factorisation reads them."""
        cached = self._structural.get(name)
        if cached is None:
            assert self.arrow is not None
            cached = self._structural[name] = self.arrow.gather(name, self)
        return cached

    @property
    def batch(self) -> int:
        tensors = (self.P, self.q, self.A, self.b, self.P_scale)
        sizes = [t.shape[0] for t in tensors if t is not None]
        return max(sizes)

    def select(self, index: Tensor) -> ConeData:
        """The programs ``index (b,)`` of the batch (shared tensors stay shared)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return t if t is None or t.shape[0] == 1 else t[index]

        return ConeData(
            pick(self.P),
            pick(self.q),
            pick(self.A),
            pick(self.b),
            self.cones,
            pick(self.P_scale),
            self.arrow,
        )
