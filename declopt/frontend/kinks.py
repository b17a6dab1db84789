"""Kink-site builders shared by the nonsmooth atoms (see docs/design.md, 'Kinks').

A site is a smooth *residual* that vanishes on a kink, with a *margin* measuring the distance to
it (``inf`` where the site cannot be on one). When a solution sits on a kink (``|margin| ~ 0``)
the implicit backward adds ``residual = 0`` as one more active equality, so the declaration is
differentiated along the piece it sits on. The builders work on ``(R, n)`` *rows*: one row per
atom-output entry, ``n`` the entries it depends on nonsmoothly.

Ties are represented by an entry chosen at a ``chooser`` (the rows at the reference point when
one is given, else the rows themselves): at an exact tie the extremum itself is an arbitrary
member of the tied set, so the rows keep their meaning only if the representative is pinned.

Scope: a site registers where the atom's value depends on it locally; an explicit ``abs`` nested
inside ``max`` registers its own zeros too (over-constraining entries at zero that are not
maximisers): write ``norm(e, "inf")`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

INF = float("inf")

Rows = tuple[Tensor, Tensor]
"""A site's residuals as linear rows of its operands: ``(index (..., 2), value (..., 2))`` with
``residual = value[..., 0] * x[index[..., 0]] + value[..., 1] * x[index[..., 1]]``, ``x`` the
site's operands flattened and concatenated. Every site's residual is linear in its operands
(an entry, or an entry less its tie representative), with the signs and representatives
piecewise constant: these rows are its exact Jacobian, two index sets instead of a dense row."""


def entry_rows(positions: Tensor, scale: Tensor) -> Rows:
    """Rows of residuals that are entries themselves, ``scale * x_j`` (``scale`` shaped like
    ``positions``, in the data's dtype)."""
    return (
        torch.stack([positions, positions], -1),
        torch.stack([scale, torch.zeros_like(scale)], -1),
    )


def _tie_rows(positions: Tensor, pick: Tensor, scale: Tensor) -> Rows:
    """Rows ``s_j x_j - s_rep x_rep`` (``s`` = ``scale``, shaped like ``positions``) for the
    representatives ``pick`` (an index along the last axis)."""
    rep = positions.gather(-1, pick).expand_as(positions)
    s_rep = scale.gather(-1, pick).expand_as(scale)
    return torch.stack([positions, rep], -1), torch.stack([scale, -s_rep], -1)


def unit_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0``, else ``-1`` (piecewise constant: no derivative)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def ties(
    rows: Tensor,
    chooser: Tensor,
    largest: bool,
    positions: Tensor | None = None,
    scale: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Entries tied with the extremum of each row: residual ``x_j - x_rep``, margin the residual
    itself (``inf`` for the representative ``rep``, the extremum of ``chooser``).

    With ``positions`` (the operand position of each entry of ``rows``, which are ``scale *
    x``), also the residuals' :data:`Rows`."""
    pick = chooser.argmax(-1, keepdim=True) if largest else chooser.argmin(-1, keepdim=True)
    residual = rows - rows.gather(-1, pick)
    chosen = torch.zeros_like(rows, dtype=torch.bool).scatter(-1, pick, True)
    margin = torch.where(chosen, torch.full_like(residual, INF), residual)
    if positions is None:
        return residual, margin
    scale = torch.ones_like(rows) if scale is None else scale
    return residual, margin, _tie_rows(positions, pick, scale)


def boundary_ties(
    rows: Tensor, chooser: Tensor, b: int, positions: Tensor | None = None
) -> tuple[Tensor, ...]:
    """Ties across the boundary between the ``b`` largest entries of each row and the rest
    (``1 <= b < n``): the kink is ``v_b = v_{b+1}`` (sorted values). Residual ``x_j - x_rep``
    with ``rep`` the ``b``-th largest entry of ``chooser``; margin ``max(|x_j - x_rep|, v_b -
    v_{b+1})``: an entry tied with ``rep`` is on a kink only while the tie straddles the boundary
    (a tie among the ``b`` largest, or among the rest, does not change the sum). With
    ``positions``, also the :data:`Rows` (as :func:`ties`)."""
    rep = torch.topk(chooser, b, dim=-1).indices[..., b - 1 : b]
    top = torch.topk(rows, b + 1, dim=-1).values
    gap = (top[..., b - 1 : b] - top[..., b : b + 1]).clamp(min=0)
    residual = rows - rows.gather(-1, rep)
    chosen = torch.zeros_like(rows, dtype=torch.bool).scatter(-1, rep, True)
    margin = torch.maximum(residual.abs(), gap)
    margin = torch.where(chosen, torch.full_like(margin, INF), margin)
    if positions is None:
        return residual, margin
    return residual, margin, _tie_rows(positions, rep, torch.ones_like(rows))


def prefix_ties(
    rows: Tensor, chooser: Tensor, positions: Tensor | None = None
) -> tuple[Tensor, ...]:
    """Ties inside each prefix (``cummax``): ``(R, n, n)`` sites ``[r, i, j]``, entry ``j <= i``
    tied with the maximiser of ``rows[r, :i+1]`` (``inf`` margin for ``j > i`` and the
    maximiser itself). A prefix whose maximiser is also the next prefix's registers nothing:
    the next one repeats its sites (duplicate rows would make the KKT systems singular). With
    ``positions``, also the :data:`Rows` (as :func:`ties`)."""
    n = rows.shape[-1]
    rep = torch.cummax(chooser, dim=-1).indices  # (R, n): maximiser of each prefix
    best = rows.gather(-1, rep)  # (R, n)
    residual = rows.unsqueeze(-2) - best.unsqueeze(-1)  # [r, i, j] = x_j - x_rep(i)
    j = torch.arange(n, device=rows.device)
    later = j.view(1, 1, n) > j.view(1, n, 1)
    chosen = j.view(1, 1, n) == rep.unsqueeze(-1)
    repeated = torch.cat(
        [rep[..., 1:] == rep[..., :-1], torch.zeros_like(rep[..., :1], dtype=torch.bool)], -1
    )
    skip = later | chosen | repeated.unsqueeze(-1)
    margin = torch.where(skip, torch.full_like(residual, INF), residual.abs())
    if positions is None:
        return residual, margin
    # [r, i, j]: x_j less x_rep(i); the representative of prefix i is gathered once per prefix.
    own = positions.unsqueeze(-2).expand(residual.shape)
    best_at = positions.gather(-1, rep).unsqueeze(-1).expand(residual.shape)
    one = torch.ones_like(residual)
    return residual, margin, (torch.stack([own, best_at], -1), torch.stack([one, -one], -1))
