"""Ruiz equilibration of a batch of cone programs: rescale variables, rows and cost so that
every column and row of ``[P, A^T; A, 0]`` has a largest entry near 1.

The interior-point method then works in units where its static regularisation and step rules
mean the same for every problem, whatever the units of the data (Ruiz, "A scaling algorithm to
equilibrate both rows and columns norms in matrices", 2001; as OSQP and Clarabel do). Rows of one
second-order cone share one factor, so the scaled cone is the same cone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from declopt.backends.cone.cones import ConeData, Cones
from declopt.batched import abs_max

__all__ = ["Equilibration", "equilibrate"]

PASSES = 15
"""Ruiz passes at most (each halves the log of every row's and column's distance from 1)."""

SETTLED = 1e-1
"""The passes stop once a pass would move no row or column by more than this factor's
distance from 1. Equilibration needs to be rough, not exact: measured, stopping at 10% rather
than 1% (3 passes instead of 7 on the 50-variable QP, 4 ms fewer per call) changed the interior
point's mean iteration count by 0.04-0.08 and its largest by none on the QP (per-problem and
shared weights), the README LP and Huber pooling, float32 and float64."""

CLAMP = (1e-4, 1e4)
"""Each pass's factors stay in this range, so a zero row or a huge entry cannot run away."""


@dataclass(frozen=True)
class Equilibration:
    """The scaled program ``P' = c D P D``, ``q' = c D q / beta``, ``A' = E A D``,
    ``b' = E b / beta``: ``D (B|1, n)`` scales the variables, ``E (B|1, rows)`` the rows,
    ``beta (B|1,)`` the size of the solution and ``c (B|1,)`` the cost."""

    D: Tensor
    E: Tensor
    beta: Tensor
    c: Tensor

    def unscale(self, x: Tensor, s: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The original program's ``x = beta D x'``, ``s = beta s' / E``,
        ``z = beta E z' / c``."""
        beta = self.beta[:, None]
        return beta * self.D * x, beta * s / self.E, beta * self.E * z / self.c[:, None]

    def objective(self, value: Tensor) -> Tensor:
        """The original objective from the scaled one."""
        return self.beta**2 * value / self.c


def _cone_mean(v: Tensor, cones: Cones) -> Tensor:
    """``v (B, rows)`` with each second-order cone's entries replaced by their geometric mean."""
    out = v.clone()
    for group in range(len(cones.groups(v.device))):
        block = cones.take(v, group)
        cones.put(out, group, block.log().mean(-1, keepdim=True).exp().expand_as(block))
    return out


def _positive_or_one(size: Tensor) -> Tensor:
    return torch.where(size > 0, size, torch.ones_like(size))


def equilibrate(data: ConeData) -> tuple[ConeData, Equilibration]:
    """The equilibrated batch and its scaling (shared data gets shared factors).

    ``P`` is first divided by its largest entry, so that the Ruiz passes see the same matrix
    whatever the objective's units; then ``beta = |E b|_inf`` (or ``|D q| / |P|`` when ``b = 0``)
    makes the solution's size 1 and ``c`` the cost's."""
    P, q, A, b, cones = data.P, data.q, data.A, data.b, data.cones
    lead = max(A.shape[0], 1 if P is None else P.shape[0])
    n, rows = A.shape[-1], A.shape[-2]
    c0 = A.new_ones(P.shape[0] if P is not None else 1)
    if P is not None:
        c0 = 1 / _positive_or_one(abs_max(P, (-2, -1)))
        P = c0[:, None, None] * P
    D = A.new_ones(lead, n)
    E = A.new_ones(lead, rows)
    low, high = CLAMP
    Ps, As = P, A
    for _ in range(PASSES):
        col = abs_max(As, -2) if rows else A.new_zeros(lead, n)
        if Ps is not None:
            col = torch.maximum(col, abs_max(Ps, -2))
        row = abs_max(As, -1) if n else A.new_zeros(lead, rows)
        dcol = 1 / _positive_or_one(col).sqrt().clamp(low, high)
        drow = _cone_mean(1 / _positive_or_one(row).sqrt().clamp(low, high), cones)
        if bool((torch.cat([dcol.flatten(), drow.flatten()]) - 1).abs().amax() <= SETTLED):
            break
        D, E = D * dcol, E * drow
        As = (A * D.unsqueeze(-2)).mul_(E.unsqueeze(-1))
        if P is not None:
            Ps = (P * D.unsqueeze(-2)).mul_(D.unsqueeze(-1))
    bs, qs = E * b, D * q * c0[:, None]
    beta = bs.abs().amax(-1) if rows else bs.new_zeros(bs.shape[0])
    if Ps is not None:  # b = 0: the solution's size is |q| / |P|
        from_q = qs.abs().amax(-1) / _positive_or_one(abs_max(Ps, (-2, -1)))
        beta = torch.where(beta > 0, beta, from_q)
    beta = _positive_or_one(beta)
    bs, qs = bs / beta[:, None], qs / beta[:, None]
    size = qs.abs().amax(-1)
    if Ps is not None:
        size = torch.maximum(size, abs_max(Ps, -1).mean(-1))
    c = 1 / _positive_or_one(size)
    P_scale = None
    if Ps is not None and Ps.shape[0] == 1 and c.shape[0] > 1:
        P_scale = c  # a shared P stays shared: its per-problem cost scale rides along
    elif Ps is not None:
        Ps = c[:, None, None] * Ps
    scaled = ConeData(Ps, c[:, None] * qs, As, bs, cones, P_scale, data.arrow)
    # The original program's cost unit is c * c0 (P was divided by its largest entry).
    return scaled, Equilibration(D, E, beta, c * c0)
