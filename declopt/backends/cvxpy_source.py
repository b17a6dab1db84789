"""What the backends that solve a CVXPY declaration themselves (cvxpylayers, the cone backend)
share: lowering variable attributes to constraints, the front end's order of constraint rows, and
the KKT point of the declaration at an external solver's answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cvxpy as cp
import torch
from cvxpy.constraints import PSD, SOC, Equality, Inequality, NonNeg, NonPos, Zero
from cvxpy.expressions.leaf import Leaf
from torch import Tensor

from declopt.derivatives import BatchedObjective
from declopt.frontend.compile import is_symmetric_leaf
from declopt.kkt.point import KKTPoint, kkt_point
from declopt.kkt.tolerances import Tolerances
from declopt.program import BatchedParams, Program

__all__ = ["AnswerJudge", "constraint_kinds", "dual_rows", "lower_domains", "num_rows"]

EQUALITY_KINDS = (Equality, Zero)
INEQUALITY_KINDS = (Inequality, NonPos, NonNeg, PSD, SOC)


def num_rows(constraint: cp.Constraint) -> int:
    """How many rows of the front end's residuals ``constraint`` is: its size, but one row per
    cone for a ``cp.SOC`` (``norm(X) - t <= 0``, whose multiplier is the dual of ``t``,
    ``constraint.dual_variables[0]``) and one per matrix for a PSD constraint
    (``lambda_max(-(A + A^T)/2) <= 0``)."""
    if isinstance(constraint, SOC):
        return int(constraint.args[0].size)
    if isinstance(constraint, PSD):
        return int(constraint.num_cones())
    return int(constraint.size)


def dual_rows(constraint: cp.Constraint, dual: Tensor) -> Tensor:
    """``(n, num_rows(constraint))``: CVXPY's dual of ``constraint`` for ``n`` problems
    (``dual (n, *shape)``) on the program's rows. A PSD constraint's row is the extreme
    eigenvalue of its matrix, whose gradient is the mean projector on the tied cluster; the dual
    matrix's part along it is its trace (the rest lies along the kink rows, whose multipliers
    are always fitted)."""
    n = dual.shape[0]
    if isinstance(constraint, PSD):
        return torch.diagonal(dual, dim1=-2, dim2=-1).sum(-1).reshape(n, -1)
    return dual.reshape(n, -1)


def symmetry_rows(variables: Sequence[cp.Variable]) -> int:
    """How many equality rows the front end adds for symmetric (``symmetric``, ``PSD``,
    ``NSD``) variables (their multipliers have no counterpart among CVXPY's duals)."""
    return sum(
        int(v.shape[0]) * (int(v.shape[0]) - 1) // 2
        for v in variables
        if is_symmetric_leaf(v) and v.ndim == 2
    )


def constraint_kinds(problem: cp.Problem) -> tuple[list[cp.Constraint], list[cp.Constraint]]:
    """The problem's equality and inequality constraints, each in declaration order: the order
    of the front end's rows (:func:`declopt.frontend.compile_problem`)."""
    eqs = [c for c in problem.constraints if isinstance(c, EQUALITY_KINDS)]
    ineqs = [c for c in problem.constraints if isinstance(c, INEQUALITY_KINDS)]
    return eqs, ineqs


def lower_domains(
    problem: cp.Problem, variables: Sequence[cp.Variable]
) -> tuple[cp.Problem, list[cp.Variable]]:
    """Replace variables declared with sign/bound attributes by plain ones plus explicit
    constraints (CVXPY gives attribute constraints no dual variable)."""
    if not any(v.domain for v in variables):
        return problem, list(variables)
    # A PSD/NSD variable's domain is its cone; its plain stand-in stays symmetric (the cone
    # constrains only the symmetric part).
    plain = {
        v.id: cp.Variable(v.shape, name=v.name(), symmetric=is_symmetric_leaf(v)) if v.domain else v
        for v in variables
    }
    memo: dict[int, cp.Expression] = {}

    def sub(expr: cp.Expression) -> cp.Expression:
        if isinstance(expr, cp.Variable):
            return plain.get(expr.id, expr)
        if isinstance(expr, Leaf):
            return expr
        if id(expr) not in memo:  # shared subexpressions stay shared
            memo[id(expr)] = expr.copy([sub(a) for a in expr.args])
        return memo[id(expr)]

    def sub_constraint(c: cp.Constraint) -> cp.Constraint:
        if isinstance(c, SOC):
            return SOC(*[sub(a) for a in c.args], axis=c.axis)
        return type(c)(*[sub(a) for a in c.args])

    domain = [c for v in variables for c in v.domain]
    objective = type(problem.objective)(sub(problem.objective.expr))
    constraints = [sub_constraint(c) for c in (*problem.constraints, *domain)]
    return cp.Problem(objective, constraints), [plain[v.id] for v in variables]


@dataclass(frozen=True)
class AnswerJudge:
    """The declaration's KKT point at a conic solver's answers, with the solver's multipliers.

    Activity and weak activity are judged against the solver's accuracy (``tolerances``), not
    an exact forward's rounding: SCS leaves a weakly active bound ``~1e-9`` away with a ``~1e-8``
    multiplier, which the exact tests read as strictly active, so ``degenerate=`` was ignored.
    Its stopping test measures residuals against the size of the gradient's *terms*
    (``|P x|``, ``|c|``), which ``|D_u f|`` does not see where ``f`` and its gradient vanish at
    the solution (a zero-residual least squares): ``|D2_uu f u|`` is the multipliers' unit too.
    """

    program: Program
    params: BatchedParams
    tolerances: Tolerances

    def __call__(self, u: Tensor, eq: Tensor | None, ineq: Tensor | None) -> KKTPoint:
        """The KKT point at ``u (B, m)`` with multipliers ``eq (B, p)``, ``ineq (B, q)`` (seed
        convention; ``None``: unknown, fitted by least squares)."""
        program, params = self.program, self.params
        u = u.detach()
        eq = eq.detach() if eq is not None and program.equalities is not None else None
        ineq = ineq.detach() if ineq is not None and program.inequalities is not None else None
        with torch.no_grad():
            unit = BatchedObjective(program.objective, params).hvp(u, u).abs().amax(-1)
            unit = torch.where(torch.isfinite(unit), unit, torch.zeros_like(unit))
            return kkt_point(
                program,
                params,
                u,
                eq_multipliers=eq,
                ineq_multipliers=ineq,
                tolerances=self.tolerances,
                gradient_unit=unit,
            )
