"""Why a CVXPY declaration is not DPP-convex: the smallest subexpression that breaks the rules.

Used by backend selection (``backend="auto"`` says why a problem went to torch) and by the
cvxpylayers backend (its refusal names the culprit).
"""

from __future__ import annotations

import cvxpy as cp


def dpp_culprit(problem: cp.Problem) -> str | None:
    """``None`` if ``problem`` is DPP-convex, else a sentence naming the smallest offending part.

    Walks the objective and the constraints and descends into the first argument that is neither
    convex nor concave under DPP rules (parameters count as affine, not constant), so the named
    subexpression is the smallest one that breaks the rules, e.g. ``mu @ mu`` in
    ``mu @ mu * sum_squares(x)`` or ``exp(-square(y - x))`` in a Welsch penalty.
    """
    objective = problem.objective
    if not objective.is_dcp(dpp=True):
        expr = objective.expr
        if not expr.is_dcp(dpp=True):
            return _describe_non_dcp(_smallest_non_dcp(expr))
        want = "convex" if isinstance(objective, cp.Minimize) else "concave"
        has = "concave" if expr.is_concave() else "convex"
        return (
            f"the objective `{expr}` is {has} under DPP rules; "
            f"{type(objective).__name__} needs it {want}"
        )
    for constraint in problem.constraints:
        if constraint.is_dcp(dpp=True):
            continue
        for arg in constraint.args:
            if not arg.is_dcp(dpp=True):
                return _describe_non_dcp(_smallest_non_dcp(arg))
        return (
            f"the constraint `{constraint}` is not DPP-convex (`==` needs both sides affine; "
            "`<=` needs a convex left and a concave right side)"
        )
    return None


def _smallest_non_dcp(expr: cp.Expression) -> cp.Expression:
    """Descend from a non-DCP ``expr`` to a non-DCP node whose arguments are all DCP."""
    while True:
        bad = [a for a in expr.args if not a.is_dcp(dpp=True)]
        if not bad:
            return expr
        expr = bad[0]


def _describe_non_dcp(expr: cp.Expression) -> str:
    if expr.is_dcp():  # DCP with parameters as constants, so only the parameters break it
        return (
            f"`{expr}` is DCP but not DPP (under DPP, parameters count as affine: a product or "
            "quotient of parameters, or a parameter multiplying a nonlinear term, breaks DPP)"
        )
    return (
        f"`{expr}` is neither convex nor concave by CVXPY's DCP rules (the declaration is "
        "nonconvex, or not written in DCP form)"
    )
