"""Which rows of an inequality a kink site can bind (see docs/design.md, 'Kinks').

A kink site that appears only inside inequalities matters only while an inequality row that
depends on it is active, so its margin is raised to the smallest gap ``max(0, -g_r)`` among the
rows ``r`` that depend on the atom-output entry the site belongs to (``inf`` if none does). Gating
by the whole inequality vector instead would let one active row switch on the kinks of every
other row (``abs(u) <= 1`` with one bound active would pin every ``u_i = 0``).

The dependence ``row r <- output entry e`` is found once, at compile time, and structurally:

* along a path of elementwise atoms (the common ``abs(u) <= 1``, ``maximum(u, 0) <= t``), row
  ``r`` depends on the entry that broadcasting maps it to: an index array, no Jacobian;
* otherwise, from the nonzeros of the Jacobian of the rows with respect to the atom's output, at a
  random point of the *smoothed* declaration: every smoothed atom is smooth with generically
  nonzero partial derivatives wherever the original depends on an entry at all (a max picks one
  branch at a point, its smoothing weighs them all), so the pattern is the structural one.

Compile-time and structural rather than at the current point: no extra cost per evaluation, and
nothing to differentiate or vmap. Where the pattern is unavailable (too large to form, or the
random point leaves the declaration's domain), every row of the inequality gates the site: the
conservative choice, as a site is then held at least as often as it needs to be.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import cvxpy as cp
import numpy as np
import torch

from declopt.frontend.atoms import RULES, operands

MAX_PATTERN = 4_000_000
"""Largest ``rows x entries`` Jacobian formed to find a dependence pattern."""

Pattern = tuple[np.ndarray, np.ndarray]
"""``(rows, entries)``: row ``rows[i]`` depends on output entry ``entries[i]``."""


def _shape(expr: cp.Expression) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.shape)


def _contains(root: cp.Expression, node: cp.Expression) -> dict[int, bool]:
    """``id -> whether it contains node`` for every sub-expression of ``root``."""
    memo: dict[int, bool] = {}

    def visit(e: cp.Expression) -> bool:
        key = id(e)
        if key not in memo:
            memo[key] = e is node or (type(e) in RULES and any([visit(a) for a in operands(e)]))
        return memo[key]

    visit(root)
    return memo


def elementwise_pattern(root: cp.Expression, node: cp.Expression) -> Pattern | None:
    """The pattern when every atom between ``node`` and ``root`` is elementwise (each root entry
    depends on the one entry of ``node`` broadcasting maps it to), else ``None``."""
    inside = _contains(root, node)
    maps: dict[int, np.ndarray] = {}

    def visit(e: cp.Expression) -> np.ndarray | None:
        if e is node:
            return np.arange(math.prod(_shape(e)), dtype=np.int64).reshape(_shape(e))
        if id(e) in maps:
            return maps[id(e)]
        rule = RULES[type(e)]
        if not rule.elementwise:
            return None
        found = None
        for a in operands(e):
            if not inside.get(id(a)):
                continue
            sub = visit(a)
            if sub is None:
                return None
            try:
                mapped = np.broadcast_to(sub, _shape(e))
            except ValueError:
                return None
            if found is not None and not np.array_equal(found, mapped):
                return None
            found = mapped
        maps[id(e)] = found
        return found

    mapping = visit(root)
    if mapping is None:
        return None
    entries = np.ascontiguousarray(mapping).reshape(-1)
    return np.arange(entries.size, dtype=np.int64), entries


def jacobian_pattern(
    downstream: Callable[[torch.Tensor], torch.Tensor], value: torch.Tensor
) -> Pattern | None:
    """The nonzeros of ``d downstream / d value`` (``downstream``: the smoothed rows as a function
    of the atom's output, at a random point), or ``None`` if unavailable."""
    try:
        with torch.no_grad():
            rows = downstream(value)
        if rows.numel() * value.numel() > MAX_PATTERN or not bool(torch.isfinite(rows).all()):
            return None
        jac = torch.func.jacrev(downstream)(value).reshape(rows.numel(), value.numel())
    except Exception:  # an atom without a reverse-mode rule, a domain error: be conservative
        return None
    r, e = np.nonzero((jac != 0).numpy())  # nan counts as a dependence
    return r.astype(np.int64), e.astype(np.int64)


def random_env(root: cp.Expression, seed: int = 0) -> Mapping[int, torch.Tensor]:
    """Generic values in ``(0.2, 0.8)`` for every leaf of ``root`` (inside most atoms' domains)."""
    rng = np.random.default_rng(seed)
    leaves = [*root.parameters(), *root.variables()]
    return {
        leaf.id: torch.from_numpy(rng.uniform(0.2, 0.8, _shape(leaf))).to(torch.float64)
        for leaf in leaves
    }
