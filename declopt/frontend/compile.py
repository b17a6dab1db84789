"""Compile a CVXPY declaration into torch functions.

The expression tree is walked once, in :func:`compile_expression` / :func:`compile_problem`, into a
flat list of steps (a post-order of the tree; a sub-expression object that occurs several times is
computed once). Evaluating the result runs the steps on torch tensors; see :mod:`.atoms` for the
per-atom rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import cvxpy as cp
import numpy as np
import scipy.sparse as sp
import torch
from cvxpy.atoms.lambda_max import lambda_max
from cvxpy.constraints import PSD, SOC, Equality, Inequality, NonNeg, NonPos, Zero
from cvxpy.expressions.constants.callback_param import CallbackParam
from torch import Tensor

from declopt.errors import DeclarationError, UnsupportedAtomError
from declopt.frontend import gating
from declopt.frontend.atoms import RULES, KinkSite, TensorCache, operands, supported_atom_names
from declopt.frontend.atoms.base import polynomial_degree
from declopt.frontend.log_log import in_declared_parameters
from declopt.frontend.simplify import hoisted
from declopt.frontend.taylor import compile_taylor
from declopt.program import Program

__all__ = [
    "DeclarationError",
    "UnsupportedAtomError",
    "compile_expression",
    "compile_layer",
    "compile_log_log",
    "compile_problem",
    "source_program",
]


Env = Mapping[int, Tensor]
Step = Callable[[list, Env, Tensor | None], Tensor]
KinkFn = Callable[..., tuple[Tensor, Tensor]]

SMOOTHING_WIDTH = -1
"""Env key of the smoothing width ``mu`` read by the smoothed atoms (leaf ids are positive)."""

# Leaf attributes that are not a plain sign/bound restriction of the entries (``symmetric`` is
# compiled: a variable's as equality rows, a parameter's checked on input; ``PSD``/``NSD``
# variables are symmetric ones with their domain ``X >> 0`` / ``X << 0`` as a constraint).
_UNSUPPORTED_VARIABLE_ATTRIBUTES = (
    "integer",
    "boolean",
    "diag",
    "hermitian",
    "complex",
    "imag",
    "sparsity",
)


def _unsupported_atom(expr: cp.Expression) -> UnsupportedAtomError:
    name = type(expr).__name__
    return UnsupportedAtomError(
        f"atom {name} in `{expr}` is not supported by declopt's torch front end. "
        f"Rewrite the expression with supported atoms ({', '.join(supported_atom_names())}), "
        "or give the layer torch callables instead of a CVXPY declaration."
    )


def _leaf_kind(leaf: cp.Expression) -> str:
    return "parameter" if isinstance(leaf, cp.Parameter) else "variable"


def _leaf_step(leaf: cp.Expression) -> Step:
    if isinstance(leaf, CallbackParam):
        raise UnsupportedAtomError(
            f"atom CallbackParam `{leaf}` is not supported by declopt's torch front end; "
            "write its callback as a CVXPY expression of the underlying parameters instead."
        )
    if leaf.is_complex():
        raise DeclarationError(
            f"{_leaf_kind(leaf)} {leaf.name()} is complex-valued; declopt supports real data only. "
            "Split it into real and imaginary parts."
        )
    lid = leaf.id
    shape = tuple(int(d) for d in leaf.shape)
    desc = f"{_leaf_kind(leaf)} {leaf.name()} (id {lid}, shape {shape})"

    def step(slots: list, env: Env, ref: Tensor | None) -> Tensor:
        try:
            t = env[lid]
        except KeyError:
            raise KeyError(f"no tensor given for {desc}; the mapping is keyed by leaf.id") from None
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor for {desc} has shape {tuple(t.shape)}; expected {shape}")
        return t

    return step


def _constant_array(const: cp.Constant) -> np.ndarray:
    value = const.value
    if sp.issparse(value):
        value = value.toarray()
    arr = np.asarray(value)
    if np.iscomplexobj(arr):
        raise DeclarationError(
            f"constant `{const}` is complex-valued; declopt supports real data only."
        )
    # bool/int constants become floats: all arithmetic happens in the parameters' float dtype.
    return np.array(arr, dtype=np.float64).reshape(tuple(int(d) for d in const.shape))


def _constant_step(const: cp.Constant) -> Step:
    tensors = TensorCache(_constant_array(const))
    default_device = torch.device("cpu")

    def step(slots: list, env: Env, ref: Tensor | None) -> Tensor:
        # Constants follow the dtype/device of the first tensor of the mapping.
        if ref is not None and ref.is_floating_point():
            return tensors.get(ref.dtype, ref.device)
        return tensors.get(torch.get_default_dtype(), default_device)

    return step


def _atom_step(expr: cp.Expression, inputs: list[int], smooth: bool = False) -> Step:
    rule = RULES.get(type(expr))
    if rule is None:
        raise _unsupported_atom(expr)
    smoothed = rule.smoothed(expr) if smooth and rule.smoothed is not None else None
    if smoothed is not None:
        idx = tuple(inputs)
        return lambda slots, env, ref: smoothed(env[SMOOTHING_WIDTH], *[slots[k] for k in idx])
    ev = rule.evaluate(expr)
    if len(inputs) == 1:
        (i,) = inputs
        return lambda slots, env, ref: ev(slots[i])
    if len(inputs) == 2:
        i, j = inputs
        return lambda slots, env, ref: ev(slots[i], slots[j])
    idx = tuple(inputs)
    return lambda slots, env, ref: ev(*[slots[k] for k in idx])


def _build(
    exprs: Sequence[cp.Expression],
    nodes: list[cp.Expression] | None = None,
    smooth: bool = False,
) -> tuple[list[Step], list[int], list[bool]]:
    """Post-order the expression DAG into steps; returns steps, the slot of each root, and whether
    each root is a constant (its cached tensor must not be handed out). When ``nodes`` is given it
    receives the expression of every slot, in slot order. With ``smooth``, the nonsmooth atoms
    are replaced by their smoothed forms (:mod:`.smoothing`), which read ``env[SMOOTHING_WIDTH]``.
    """
    steps: list[Step] = []
    slot_of: dict[int, int] = {}
    keep_alive: list[cp.Expression] = []  # id() keys are only unique while the objects live
    is_const: list[bool] = []
    for root in exprs:
        if not isinstance(root, cp.Expression):
            raise DeclarationError(f"expected a cvxpy Expression, got {type(root).__name__}")
        stack: list[tuple[cp.Expression, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if id(node) in slot_of:
                continue
            if isinstance(node, cp.Constant):
                step = _constant_step(node)
            elif isinstance(node, (cp.Parameter, cp.Variable)):
                step = _leaf_step(node)
            else:
                if type(node) not in RULES:
                    raise _unsupported_atom(node)
                ops = operands(node)
                if not expanded:
                    stack.append((node, True))
                    stack.extend((a, False) for a in reversed(ops) if id(a) not in slot_of)
                    continue
                step = _atom_step(node, [slot_of[id(a)] for a in ops], smooth)
            keep_alive.append(node)
            slot_of[id(node)] = len(steps)
            is_const.append(isinstance(node, cp.Constant))
            steps.append(step)
    roots = [slot_of[id(r)] for r in exprs]
    if nodes is not None:
        nodes.extend(keep_alive)
    return steps, roots, [is_const[r] for r in roots]


def _kink_site(node: cp.Expression) -> KinkSite | None:
    rule = RULES.get(type(node))
    return None if rule is None or rule.kinks is None else rule.kinks(node)


def _pattern(root: cp.Expression, node: cp.Expression) -> gating.Pattern | None:
    """Which rows of the inequality ``root`` depend on which entries of ``node``'s output
    (:mod:`.gating`): broadcasting along elementwise paths, else the Jacobian's nonzeros at a
    random point of the smoothed rows."""
    pattern = gating.elementwise_pattern(root, node)
    if pattern is not None:
        return pattern
    nodes: list[cp.Expression] = []
    steps, (root_slot,), _ = _build([root], nodes, smooth=True)
    k = next(i for i, e in enumerate(nodes) if e is node)
    env = dict(gating.random_env(root))
    env[SMOOTHING_WIDTH] = torch.tensor(1.0, dtype=torch.float64)
    ref = torch.zeros((), dtype=torch.float64)

    def downstream(value: Tensor) -> Tensor:
        slots: list[Tensor] = []
        for i, step in enumerate(steps):
            slots.append(value if i == k else step(slots, env, ref))
        return slots[root_slot].reshape(-1)

    with torch.no_grad():
        slots: list[Tensor] = []
        for step in steps[: k + 1]:
            slots.append(step(slots, env, ref))
    return gating.jacobian_pattern(downstream, slots[k].detach())


class _Gate:
    """The smallest gap ``max(0, -g_r)`` over the inequality rows that depend on each output
    entry of one kink node (``inf`` for entries no row depends on)."""

    def __init__(self, roots: list[tuple[int, int, gating.Pattern | None]], size: int) -> None:
        self.size = size
        self.roots = [slot for slot, _, _ in roots]
        rows, entries = [], []
        offset = 0
        for _, q, pattern in roots:
            if pattern is None:  # unknown: every row of this inequality may bind every entry
                r, e = np.meshgrid(np.arange(q), np.arange(size), indexing="ij")
                pattern = (r.reshape(-1), e.reshape(-1))
            rows.append(pattern[0] + offset)
            entries.append(pattern[1])
            offset += q
        self.rows = TensorCache(np.concatenate(rows).astype(np.int64))
        self.entries = TensorCache(np.concatenate(entries).astype(np.int64))

    def __call__(self, slots: list[Tensor]) -> Tensor:
        g = torch.cat([slots[s].reshape(-1) for s in self.roots])
        gap = (-g).clamp(min=0)
        rows = self.rows.get(torch.long, g.device)
        entries = self.entries.get(torch.long, g.device)
        start = torch.full((self.size,), float("inf"), dtype=g.dtype, device=g.device)
        return start.scatter_reduce(0, entries, gap.index_select(0, rows), "amin")


def _nodes(roots: Sequence[cp.Expression]) -> Iterator[cp.Expression]:
    """Every node reachable from ``roots``, once each (a shared subexpression is one node)."""
    stack, seen = list(roots), set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(operands(node) if type(node) in RULES else [])


def kinks_are_isolated(exprs: Sequence[cp.Expression]) -> bool:
    """Whether every nonsmooth atom in ``exprs`` has only isolated kinks
    (:attr:`AtomRule.isolated_kinks`)."""
    return all(
        RULES[type(node)].isolated_kinks
        for node in _nodes(exprs)
        if type(node) in RULES and _kink_site(node) is not None
    )


VarSlices = Sequence[tuple[int, int, int, tuple[int, ...]]]
"""``(variable id, start, stop, shape)`` of each variable in the flat ``u``."""


def _selection(node: cp.Expression, var_slices: VarSlices, m: int) -> tuple[np.ndarray, ...] | None:
    """``(index, coef)`` (each ``(size,)``) with ``node`` (flattened row-major) ``= coef *
    u[index] +`` terms free of ``u``, for every value of the parameters; ``None`` where ``node``
    is not such a signed, scaled selection of ``u`` (``coef = 0``: the entry is free of ``u``).

    Found numerically on an affine ``node``: forward-mode products with ``1`` and with the
    positions ``1..m`` give each entry's coefficient and its position (one nonzero per entry),
    a random direction checks them, and a second random parameter point checks that they do
    not depend on the parameters.
    """
    if not _degree_at_most(node, 1):
        return None
    steps, (root,), _ = _build([node])
    found = []
    for seed in (0, 1):
        env = dict(gating.random_env(node, seed))
        rng = np.random.default_rng(seed)
        u0 = torch.from_numpy(rng.uniform(0.2, 0.8, m))

        def value(u: Tensor, env: dict = env) -> Tensor:
            env = {**env, **{vid: u[a:b].reshape(shape) for vid, a, b, shape in var_slices}}
            slots: list[Tensor] = []
            for step in steps:
                slots.append(step(slots, env, u))
            return slots[root].reshape(-1)

        def along(direction: Tensor, value: Callable = value, u0: Tensor = u0) -> Tensor:
            return torch.func.jvp(value, (u0,), (direction,))[1]

        coef = along(torch.ones(m, dtype=torch.float64))
        ramp = along(torch.arange(1, m + 1, dtype=torch.float64))
        free = coef == 0
        index = torch.where(free, 1.0, ramp / torch.where(free, 1.0, coef)).round() - 1
        if not bool(((index >= 0) & (index < m)).all()):
            return None
        index = index.long()
        probe = torch.from_numpy(rng.standard_normal(m))
        expected = coef * probe[index]
        if not torch.allclose(along(probe), expected, rtol=1e-12, atol=1e-12):
            return None
        found.append((index.numpy(), coef.numpy()))
    (index, coef), (index2, coef2) = found
    if not (np.array_equal(index, index2) and np.array_equal(coef, coef2)):
        return None
    return index, coef


class _SiteRows:
    """Maps a linear site's :data:`~declopt.frontend.kinks.Rows` from operand positions to
    coordinates of ``u``: the positions it hands the site, and each position's coordinate and
    coefficient (the operands' :func:`_selection`)."""

    def __init__(self, operands_: Sequence[cp.Expression], maps: Sequence[tuple]) -> None:
        self.positions, offset = [], 0
        for a in operands_:
            shape = tuple(int(d) for d in a.shape)
            size = math.prod(shape)
            self.positions.append(TensorCache(np.arange(offset, offset + size).reshape(shape)))
            offset += size
        self.index = TensorCache(np.concatenate([index for index, _ in maps]).astype(np.int64))
        self.coef = TensorCache(np.concatenate([coef for _, coef in maps]))

    def operand_positions(self, device: torch.device) -> list[Tensor]:
        return [p.get(torch.long, device) for p in self.positions]

    def in_u(self, index: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """``(index (K, 2), value (K, 2))`` in coordinates of ``u``; a row whose two entries
        land on one coordinate keeps their sum in its first slot."""
        at = self.index.get(torch.long, index.device)[index]
        value = value * self.coef.get(value.dtype, value.device)[index]
        same = at[..., 0] == at[..., 1]
        first = value[..., 0] + torch.where(same, value[..., 1], torch.zeros_like(value[..., 1]))
        second = torch.where(same, torch.zeros_like(value[..., 1]), value[..., 1])
        return at, torch.stack([first, second], -1)


def _compile_kinks(
    exprs: Sequence[cp.Expression],
    inequality_roots: frozenset[int] = frozenset(),
    var_slices: VarSlices | None = None,
    m: int = 0,
) -> KinkFn | None:
    """``env -> (residuals (K,), margins (K,))`` of every kink site in ``exprs``, or ``None``.

    See :mod:`declopt.frontend.kinks`: each nonsmooth atom contributes residuals that vanish when
    the solution sits on one of its kinks, and margins whose size says how far it is from one.
    Given a second env (a reference point), ties are represented by the extremum *there*.
    A site that only appears inside inequalities (roots listed in ``inequality_roots``, each an
    expression ``<= 0``) counts only while an inequality row that depends on it is active: its
    margin is at least the smallest gap ``max(0, -g_r)`` among those rows (:mod:`.gating`).

    With ``var_slices``, and when every site is linear (:attr:`KinkSite.linear`) in operands that
    are selections of ``u`` (:func:`_selection`), ``evaluate(env, reference_env, rows=True)``
    also returns the residuals' Jacobian as index sets: ``index (K, 2)``, ``value (K, 2)`` in
    coordinates of ``u``; the returned function's ``structured`` attribute says whether it can.
    """
    nodes: list[cp.Expression] = []
    steps, roots, _ = _build(exprs, nodes)
    slot_of = {id(node): i for i, node in enumerate(nodes)}
    owners: dict[int, list[int]] = {}  # kink node id -> the roots (in order) that contain it
    for r, root in enumerate(exprs):
        for node in _nodes([root]):
            rule = RULES.get(type(node))
            if rule is not None and rule.kinks is not None:
                owners.setdefault(id(node), []).append(r)
    sites = []
    for node in nodes:
        site = _kink_site(node)
        if site is None:
            continue
        containing = owners[id(node)]
        gate = None
        if all(r in inequality_roots for r in containing):
            size = math.prod(int(d) for d in node.shape)
            gate = _Gate(
                [
                    (roots[r], math.prod(int(d) for d in exprs[r].shape), _pattern(exprs[r], node))
                    for r in containing
                ],
                size,
            )
        owner_index = TensorCache(np.asarray(site.owners, dtype=np.int64))
        site_rows = None
        if site.linear and var_slices is not None:
            maps = [_selection(a, var_slices, m) for a in operands(node)]
            if all(map_ is not None for map_ in maps):
                site_rows = _SiteRows(operands(node), maps)
        inputs = [slot_of[id(a)] for a in operands(node)]
        sites.append((site.fn, inputs, gate, owner_index, site_rows))
    if not sites:
        return None
    structured = all(site_rows is not None for *_, site_rows in sites)

    def run(env: Env) -> list[Tensor]:
        ref = next(iter(env.values()), None)
        slots: list[Tensor] = []
        for step in steps:
            slots.append(step(slots, env, ref))
        return slots

    def evaluate(
        env: Env, reference_env: Env | None = None, rows: bool = False
    ) -> tuple[Tensor, ...]:
        slots = run(env)
        reference = run(reference_env) if reference_env is not None else None
        residuals, margins, indices, values = [], [], [], []
        for site, inputs, gate, owner_index, site_rows in sites:
            at_reference = None if reference is None else [reference[i] for i in inputs]
            operand_values = [slots[i] for i in inputs]
            if rows:
                positions = site_rows.operand_positions(operand_values[0].device)
                residual, margin, (index, value) = site(
                    *operand_values, reference=at_reference, positions=positions
                )
                index, value = site_rows.in_u(index, value)
                indices.append(index)
                values.append(value)
            else:
                residual, margin = site(*operand_values, reference=at_reference)
            if gate is not None:
                # A site of an inequality is only as close to binding as the rows it affects:
                # its margin is at least their smallest gap, so one tolerance decides both.
                gap = gate(slots).index_select(0, owner_index.get(torch.long, margin.device))
                margin = torch.where(gap > margin.abs(), gap, margin)
            residuals.append(residual.reshape(-1))
            margins.append(margin.reshape(-1))
        if rows:
            return torch.cat(residuals), torch.cat(margins), torch.cat(indices), torch.cat(values)
        return torch.cat(residuals), torch.cat(margins)

    evaluate.structured = structured  # type: ignore[attr-defined]
    return evaluate


def _compile_many(
    exprs: Sequence[cp.Expression], smooth: bool = False
) -> Callable[[Env], list[Tensor]]:
    steps, roots, const_root = _build(exprs, smooth=smooth)

    def evaluate(env: Env) -> list[Tensor]:
        ref = next(iter(env.values()), None)
        slots: list[Tensor] = []
        for step in steps:
            slots.append(step(slots, env, ref))
        return [slots[r].clone() if c else slots[r] for r, c in zip(roots, const_root)]

    return evaluate


def compile_expression(expr: cp.Expression) -> Callable[[Mapping[int, Tensor]], Tensor]:
    """Compile a CVXPY expression into a torch function of its leaves.

    The tree is walked now, once. The returned function maps ``{leaf.id: tensor}`` (leaves are
    the ``cp.Parameter`` and ``cp.Variable`` objects in ``expr``; each tensor has exactly the leaf's
    shape) to a tensor of exactly ``expr.shape`` that equals ``expr.value`` for the same values.
    Constants take the dtype and device of the first tensor in the mapping. The function works on
    unbatched tensors and under ``torch.func.vmap``/``grad``/``jvp`` and double backward.

    Raises:
        UnsupportedAtomError: ``expr`` contains an atom without a torch rule (the message names it).
        DeclarationError: complex-valued data.
    """
    evaluate = _compile_many([expr])

    def f(env: Mapping[int, Tensor]) -> Tensor:
        return evaluate(env)[0]

    return f


# ---------------------------------------------------------------------------------------------
# problems


def _names(items: Sequence[Any]) -> str:
    return ", ".join(item.name() for item in items)


def _dual_owner(problem: cp.Problem) -> dict[int, cp.Constraint]:
    """The constraint of each dual variable of the problem (by the dual variable's id)."""
    return {dv.id: c for c in problem.constraints for dv in c.dual_variables}


def _check_leaves(
    problem: cp.Problem,
    parameters: Sequence[cp.Parameter],
    variables: Sequence[cp.Variable],
    *,
    subset: bool = False,
) -> None:
    """Validate the parameter / variable lists. With ``subset``, ``variables`` may list only some
    of the problem's variables and dual variables of its constraints (``c.dual_variables[0]``)."""
    if not isinstance(problem, cp.Problem):
        raise DeclarationError(f"expected a cvxpy Problem, got {type(problem).__name__}")
    for p in parameters:
        if not isinstance(p, cp.Parameter):
            raise DeclarationError(
                f"parameters must be cp.Parameter objects; got {type(p).__name__} `{p}`. "
                "Declare inputs of the layer as cp.Parameter."
            )
    for v in variables:
        if not isinstance(v, cp.Variable):
            raise DeclarationError(
                f"variables must be cp.Variable objects; got {type(v).__name__} `{v}`. "
                "List the cp.Variable objects whose optimal values the layer returns."
            )
    for kind, items in (("parameter", parameters), ("variable", variables)):
        seen: set[int] = set()
        for item in items:
            if item.id in seen:
                raise DeclarationError(
                    f"{kind} {item.name()} is listed twice in {kind}s; list each once."
                )
            seen.add(item.id)

    if not variables:
        raise DeclarationError(
            "variables is empty; list the cp.Variable objects of the problem "
            f"({'some or all' if subset else 'all'} of them)."
        )
    problem_vars = problem.variables()
    if not problem_vars:
        raise DeclarationError("the problem has no variables; there is nothing to optimise.")
    listed = {v.id for v in variables}
    missing_v = [v for v in problem_vars if v.id not in listed]
    if missing_v and not subset:
        raise DeclarationError(
            f"the problem's variables {_names(missing_v)} are not listed in variables; "
            "list every variable of the problem."
        )
    in_problem = {v.id for v in problem_vars}
    if subset:
        in_problem |= set(_dual_owner(problem))
    extra_v = [v for v in variables if v.id not in in_problem]
    if extra_v:
        also = " or dual variables of its constraints" if subset else ""
        raise DeclarationError(
            f"variables {_names(extra_v)} do not occur in the problem; list variables of the "
            f"problem{also} (c.dual_variables[0])."
        )

    problem_params = problem.parameters()
    listed_p = {p.id for p in parameters}
    missing_p = [p for p in problem_params if p.id not in listed_p]
    if missing_p:
        raise DeclarationError(
            f"the problem's parameters {_names(missing_p)} are not listed in parameters; the "
            "parameters must be exactly the problem's parameters (problem.parameters())."
        )
    in_problem_p = {p.id for p in problem_params}
    extra_p = [p for p in parameters if p.id not in in_problem_p]
    if extra_p:
        raise DeclarationError(
            f"parameters {_names(extra_p)} do not occur in the problem; the parameters must be "
            "exactly the problem's parameters (problem.parameters())."
        )
    if not subset:
        _check_supported_leaves(parameters, variables)


def _check_supported_leaves(
    parameters: Sequence[cp.Parameter], variables: Sequence[cp.Variable]
) -> None:
    """What the torch front end cannot evaluate among the leaves: complex data, variable
    attributes other than sign/bounds, symmetric and PSD/NSD."""
    for leaf in (*parameters, *variables):
        if leaf.is_complex():
            raise DeclarationError(
                f"{_leaf_kind(leaf)} {leaf.name()} is complex-valued; declopt supports real data "
                "only. Split it into real and imaginary parts."
            )
    # PSD=True / NSD=True *parameters* are taken as they were before symmetric ones were: their
    # values are used as given (what quad_form(x, P) needs to be DCP), not checked.
    for v in variables:
        bad = [a for a in _UNSUPPORTED_VARIABLE_ATTRIBUTES if v.attributes.get(a)]
        if bad:
            raise UnsupportedAtomError(
                f"variable {v.name()} is declared with {', '.join(bad)}=...; declopt's torch "
                "front end supports only nonneg/nonpos/pos/neg/bounds, symmetric and PSD/NSD as "
                "variable attributes. Declare a plain variable and state the restriction as "
                "explicit constraints (or use backend='cvxpylayers', which takes it as declared)."
            )


def compile_layer(
    problem: cp.Problem,
    parameters: Sequence[cp.Parameter],
    variables: Sequence[cp.Variable],
    *,
    gp: bool = False,
) -> Program:
    """The :class:`~declopt.program.Program` of a layer returning ``variables``.

    ``variables`` may be a subset of the problem's variables: the compiled program then solves
    for all of them, the listed ones first (a layer returns the first ``len(variables)``).
    With ``gp=True`` the declaration is a log-log convex program, compiled through CVXPY's
    log-space reduction (:func:`compile_log_log`).
    When the torch front end cannot compile the declaration (an unsupported atom, cone or
    variable attribute, a ``gp=True`` problem that is not log-log convex), or when ``variables``
    lists dual variables, the result is a *source-only* program (:func:`source_program`) that
    only cvxpylayers can solve.

    Raises:
        DeclarationError: bad parameter/variable lists (never deferred).
    """
    parameters, variables = list(parameters), list(variables)
    _check_leaves(problem, parameters, variables, subset=True)
    duals = _dual_owner(problem)
    listed_duals = [v for v in variables if v.id in duals]
    if gp and listed_duals:
        return source_program(
            problem,
            parameters,
            variables,
            DeclarationError(
                f"dual variables as outputs ({_names(listed_duals)}) of a log-log program "
                "(gp=True) are returned by the cvxpylayers backend only"
            ),
            log_log=True,
        )
    if gp:
        try:
            return compile_log_log(problem, parameters, variables)
        except DeclarationError as error:
            return source_program(problem, parameters, variables, error, log_log=True)
    if listed_duals:
        return source_program(
            problem,
            parameters,
            variables,
            DeclarationError(
                f"dual variables as outputs ({_names(listed_duals)}) are returned by the "
                "cvxpylayers backend only; with backend='torch' read layer.info.eq_multipliers / "
                "ineq_multipliers (seed convention: lambda = -dual)"
            ),
        )
    listed = {v.id for v in variables}
    rest = [v for v in problem.variables() if v.id not in listed]
    try:
        return compile_problem(problem, parameters, [*variables, *rest])
    except DeclarationError as error:
        return source_program(problem, parameters, variables, error)


def compile_log_log(
    problem: cp.Problem, parameters: Sequence[cp.Parameter], variables: Sequence[cp.Variable]
) -> Program:
    """The Program of a log-log convex (DGP) problem, ``gp=True``, returning ``variables`` (some
    or all of the problem's, the listed ones first as in :func:`compile_layer`).

    CVXPY's ``Dgp2Dcp`` reduces the problem to a convex one in log space, which
    :func:`compile_problem` compiles; :func:`.log_log.in_declared_parameters` then wraps its
    functions to take the declared ``parameters`` (the log of those the reduction reads in log
    form) and to return ``exp`` of the solved log-variables (``Program.output_transform``).
    ``source`` is the declaration as written; ``is_convex`` is ``problem.is_dgp()``, ``is_dpp``
    ``problem.is_dgp(dpp=True)``; parameters the reduction takes the log of must be positive
    (sign ``"pos"``, checked on input).

    Raises:
        DeclarationError: the problem is not log-log convex, or the torch front end cannot
            compile its reduction (UnsupportedAtomError).
    """
    parameters, variables = list(parameters), list(variables)
    if not _safe(problem.is_dgp):
        raise DeclarationError(
            "gp=True, but the problem is not log-log convex (DGP: problem.is_dgp() is False); "
            "declare it following CVXPY's DGP rules, or drop gp=True for a DCP problem"
        )
    listed = {v.id for v in variables}
    ordered = [*variables, *(v for v in problem.variables() if v.id not in listed)]
    reduction = _log_space_reduction()
    try:
        with np.errstate(divide="ignore", invalid="ignore"):  # log of unset / bad values
            reduced, _ = reduction.apply(problem)
    except ValueError as error:
        raise DeclarationError(f"gp=True: CVXPY's log-log reduction failed: {error}") from error
    reduced_vars = {v.id: v for v in reduced.variables()}
    log_vars = []
    for v in ordered:
        new = reduction.var_id_map.get(v.id)
        if not new or new[0] not in reduced_vars:
            raise DeclarationError(
                f"gp=True: variable {v.name()} has no log-space counterpart in CVXPY's reduction"
            )
        log_vars.append(reduced_vars[new[0]])
    auxiliary = [v for v in reduced.variables() if v.id not in {w.id for w in log_vars}]
    if auxiliary:
        raise DeclarationError(
            f"gp=True: CVXPY's log-space reduction of this problem introduces auxiliary "
            f"variables ({_names(auxiliary)}; eye_minus_inv, pf_eigenvalue), which declopt's torch "
            "front end does not solve for; cvxpylayers takes it"
        )
    index = {p.id: i for i, p in enumerate(parameters)}
    log_of = {new[0]: index[orig] for orig, new in reduction.param_id_map.items() if new}
    reduced_params = list(reduced.parameters())
    uses = []
    for rp in reduced_params:
        if rp.id in log_of:
            uses.append((log_of[rp.id], True))
        elif rp.id in index:
            uses.append((index[rp.id], False))
        else:
            raise DeclarationError(
                f"gp=True: parameter {rp.name()} of CVXPY's log-space reduction is neither a "
                "declared parameter nor the log of one"
            )
    program = compile_problem(reduced, reduced_params, log_vars)
    logged = {i for i, log in uses if log}
    signs = tuple(
        "pos" if i in logged or p.attributes.get("pos") else _sign(p)
        for i, p in enumerate(parameters)
    )
    return in_declared_parameters(
        program,
        tuple(uses),
        parameter_names=tuple(p.name() for p in parameters),
        parameter_shapes=tuple(tuple(int(d) for d in p.shape) for p in parameters),
        parameter_signs=signs,
        variable_names=tuple(v.name() for v in ordered),
        source=(problem, tuple(parameters), tuple(ordered)),
        is_convex=True,
        is_dpp=_safe(lambda: problem.is_dgp(dpp=True)),
    )


def _log_space_reduction() -> Any:
    """CVXPY's ``Dgp2Dcp``, except that ``max``/``min``/``maximum``/``minimum`` stay the same atom
    of the log-space arguments (``log max x_i = max log x_i``: log is increasing) instead of
    becoming CVXPY's epigraph variables: the reduced problem then has exactly the declared
    variables (as their logs), and its kinks are the torch front end's."""
    from cvxpy.atoms.elementwise.maximum import maximum
    from cvxpy.atoms.elementwise.minimum import minimum
    from cvxpy.atoms.max import max as max_
    from cvxpy.atoms.min import min as min_
    from cvxpy.reductions.dgp2dcp.dgp2dcp import Dgp2Dcp

    class LogSpace(Dgp2Dcp):
        def canonicalize_expr(
            self, expr: cp.Expression, args: list, canonicalize_params: bool = True
        ) -> tuple[cp.Expression, list]:
            if type(expr) in (maximum, minimum, max_, min_):
                return expr.copy(args), []
            return super().canonicalize_expr(expr, args, canonicalize_params)

    return LogSpace()


def source_program(
    problem: cp.Problem,
    parameters: Sequence[cp.Parameter],
    outputs: Sequence[cp.Variable],
    error: Exception,
    *,
    log_log: bool = False,
) -> Program:
    """A *source-only* Program: the declaration and its outputs (primal or dual variables), no
    torch functions; ``error`` says why the torch front end did not compile it."""
    if log_log:
        convex = _safe(lambda: problem.is_dgp(dpp=True))
        dpp = convex
    else:
        convex, dpp = _safe(problem.is_dcp), _safe(problem.is_dpp)
    return Program(
        parameter_names=tuple(p.name() for p in parameters),
        parameter_shapes=tuple(tuple(int(d) for d in p.shape) for p in parameters),
        variable_names=tuple(v.name() for v in outputs),
        variable_shapes=tuple(tuple(int(d) for d in v.shape) for v in outputs),
        objective=None,
        is_convex=convex,
        is_dpp=dpp,
        parameter_signs=tuple(_sign(p) for p in parameters),
        parameter_symmetric=tuple(bool(p.attributes.get("symmetric")) for p in parameters),
        maximize=isinstance(problem.objective, cp.Maximize),
        source=(problem, tuple(parameters), tuple(outputs)),
        frontend_error=error,
        log_log=log_log,
    )


def _objective_taylor(
    expr: cp.Expression,
    env_of: Callable[[Sequence[Tensor], Tensor], Env],
    var_slices: Sequence[tuple[int, int, int, tuple[int, ...]]],
    m: int,
    sign: float,
) -> Callable[..., tuple[Tensor, ...]] | None:
    """``(x, u, second=True, value=True) -> (f, grad (m,), hess (m, m))`` of the (sign-adjusted)
    objective in one pass (:mod:`.taylor`; ``second=False`` leaves out ``hess``, ``value=False``
    ``f``), or ``None`` where an atom on the variables' path has no jet rule."""
    nodes: list[cp.Expression] = []
    steps, roots, _ = _build([expr], nodes)
    taylor = compile_taylor(nodes, steps, roots[0], var_slices, m)
    if taylor is None:
        return None

    def fn(
        x: Sequence[Tensor], u: Tensor, second: bool = True, value: bool = True
    ) -> tuple[Tensor, ...]:
        out = taylor(env_of(x, u), u, second, value)
        return tuple(-t for t in out) if sign < 0 else out

    return fn


def _soc_rows(c: SOC) -> cp.Expression:
    """``norm(X, 2, axis) - t``, one row per cone of ``cp.SOC(t, X, axis)`` (``<= 0``).

    CVXPY's conventions: ``t`` is 1-D (a scalar ``t`` is stored flattened, ``(1,)``), one entry
    per cone; a 0-D or 1-D ``X`` is one cone; a 2-D ``X`` has a cone per column (``axis=0``) or
    per row (``axis=1``). The 2-norm atom brings its kink at the apex ``X = 0`` with it.
    """
    t, X = c.args
    if X.ndim == 0:
        norms = cp.abs(X)
    elif X.ndim == 1:
        norms = cp.norm(X, 2)
    else:
        norms = cp.norm(X, 2, axis=c.axis)
    return cp.reshape(norms, t.shape, order="C") - t


def is_symmetric_leaf(leaf: cp.Leaf) -> bool:
    """The leaf is declared symmetric (``symmetric``, ``PSD`` or ``NSD=True``)."""
    return any(leaf.attributes.get(a) for a in ("symmetric", "PSD", "NSD"))


def _symmetry_rows(v: cp.Variable) -> cp.Expression | None:
    """``X[i, j] - X[j, i]`` for ``i < j`` of a symmetric variable (``symmetric``, ``PSD`` or
    ``NSD=True``; ``== 0``), else ``None``. The variable keeps all ``n * n`` entries in ``u``
    (so its output is the full matrix, and gradients with respect to it are those of the full
    matrix, as for any other variable); these rows make it symmetric."""
    if not is_symmetric_leaf(v) or v.ndim != 2 or int(v.shape[0]) < 2:
        return None
    n = int(v.shape[0])
    rows, cols = np.triu_indices(n, k=1)
    return v[rows, cols] - v[cols, rows]


def _split_constraints(
    problem: cp.Problem, variables: Sequence[cp.Variable]
) -> tuple[list[cp.Expression], list[cp.Expression]]:
    """(equality expressions h = 0, inequality expressions g <= 0), in constraint order, then the
    sign/bound attributes of the variables (``Variable(nonneg=True)``, ``bounds=...``), then the
    symmetry rows of ``symmetric=True`` variables (equalities). A ``cp.SOC`` constraint is one
    inequality row per cone, ``norm(X, 2) - t <= 0``."""
    eqs: list[cp.Expression] = []
    ineqs: list[cp.Expression] = []
    domain = [c for v in variables for c in v.domain]
    for c in [*problem.constraints, *domain]:
        kind = type(c)
        if kind in (Equality, Zero):
            eqs.append(c.expr)  # Equality.expr is lhs - rhs
        elif kind in (Inequality, NonPos):
            ineqs.append(c.expr)  # lhs - rhs; `a >= b` is stored as Inequality(b, a)
        elif kind is NonNeg:
            ineqs.append(-c.expr)
        elif kind is PSD:
            ineqs.append(_psd_row(c))
        elif kind is SOC:
            ineqs.append(_soc_rows(c))
        else:
            raise UnsupportedAtomError(
                f"constraint {kind.__name__} `{c}` is not supported by declopt's torch front end; "
                "only ==, <= and >= constraints (Equality, Zero, Inequality, NonPos, NonNeg), "
                "second-order cones (cp.SOC) and PSD constraints (>>) are. Rewrite it with those "
                "if it can be (e.g. an exponential cone as exp/log inequalities), or use "
                "backend='cvxpylayers'."
            )
    for v in variables:
        rows = _symmetry_rows(v)
        if rows is not None:
            eqs.append(rows)
    return eqs, ineqs


def _psd_row(c: PSD) -> cp.Expression:
    """``A >> 0`` (CVXPY: the symmetric part of ``A`` is PSD) as the row ``-lambda_min <= 0``:
    ``lambda_max(-(A + A^T) / 2)``, one row per matrix of a stacked ``A`` (docs/design.md,
    "Spectral atoms")."""
    a = c.args[0]
    transposed = a.T if a.ndim == 2 else cp.swapaxes(a, -2, -1)
    return lambda_max(-(a + transposed) / 2)


def _sign(p: cp.Parameter) -> str | None:
    a = p.attributes
    if a.get("nonneg") or a.get("pos"):
        return "nonneg"
    if a.get("nonpos") or a.get("neg"):
        return "nonpos"
    return None


def _safe(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except Exception:
        return False


def _degree_at_most(expr: cp.Expression, degree: int) -> bool:
    found = polynomial_degree(expr, RULES)
    return found is not None and found <= degree


def compile_problem(
    problem: cp.Problem, parameters: Sequence[cp.Parameter], variables: Sequence[cp.Variable]
) -> Program:
    """Compile a CVXPY problem into a :class:`~declopt.program.Program`.

    Args:
        problem: the declaration; any objective and ``==``/``<=``/``>=`` and ``cp.SOC``
            constraints built from supported atoms (DCP is not required).
        parameters: exactly the problem's parameters, in the order the layer takes them.
        variables: all the problem's variables; ``u`` is their row-major concatenation in this
            order.

    Returns:
        A Program with ``objective(x, u)`` (negated for ``cp.Maximize``: declopt minimises; then
        ``maximize`` is True),
        ``equalities(x, u)`` (lhs - rhs of the ``==`` constraints, flattened row-major and
        concatenated, then the symmetry rows of ``symmetric=True`` variables) and
        ``inequalities(x, u)`` (lhs - rhs of ``<=``, rhs - lhs of ``>=``, ``norm(X) - t`` per
        cone of a ``cp.SOC``, then the variables' sign/bound attributes), or None where there
        are none.

    Raises:
        DeclarationError: bad parameter/variable lists, complex data, unsupported variable
            attributes. UnsupportedAtomError (a DeclarationError) for unsupported atoms or
            constraint types.
    """
    parameters = list(parameters)
    variables = list(variables)
    _check_leaves(problem, parameters, variables)

    objective = problem.objective
    sign = -1.0 if isinstance(objective, cp.Maximize) else 1.0
    eqs, ineqs = _split_constraints(problem, variables)
    # Full sums pushed through scalings and shifts (one pass fewer per term); every later step
    # (kink sites, gating, the Taylor expansion, the smoothed program) reads these trees.
    objective_expr = hoisted(objective.expr)
    eqs, ineqs = [hoisted(e) for e in eqs], [hoisted(e) for e in ineqs]

    param_ids = [p.id for p in parameters]
    n_params = len(parameters)
    var_slices: list[tuple[int, int, int, tuple[int, ...]]] = []
    offset = 0
    for v in variables:
        shape = tuple(int(d) for d in v.shape)
        size = math.prod(shape)
        var_slices.append((v.id, offset, offset + size, shape))
        offset += size
    m = offset

    first_ineq = 1 + len(eqs)
    kink_eval = _compile_kinks(
        [objective_expr, *eqs, *ineqs],
        frozenset(range(first_ineq, first_ineq + len(ineqs))),
        var_slices,
        m,
    )

    def functions(smooth: bool) -> tuple[Callable, Callable | None, Callable | None, Callable]:
        """``(objective, equalities, inequalities, env_of)``; with ``smooth``, the nonsmooth
        atoms are smoothed and the parameter tuple carries the width ``mu`` last."""
        obj_eval = _compile_many([objective_expr], smooth)
        eq_eval = _compile_many(eqs, smooth) if eqs else None
        ineq_eval = _compile_many(ineqs, smooth) if ineqs else None
        expected = n_params + int(smooth)

        def env_of(x: Sequence[Tensor], u: Tensor) -> dict[int, Tensor]:
            if len(x) != expected:
                raise ValueError(f"expected {expected} parameter tensors, got {len(x)}")
            if tuple(u.shape) != (m,):
                raise ValueError(
                    f"u must have shape ({m},) (unbatched; vmap for batches), got {tuple(u.shape)}"
                )
            # Variables first: u is always a float tensor, so it is the dtype/device reference
            # for constants.
            env = {vid: u[a:b].reshape(shape) for vid, a, b, shape in var_slices}
            env.update(zip(param_ids, x))
            if smooth:
                env[SMOOTHING_WIDTH] = x[-1]
            return env

        def objective_fn(x: Sequence[Tensor], u: Tensor) -> Tensor:
            val = obj_eval(env_of(x, u))[0].reshape(())
            return -val if sign < 0 else val

        def residuals(
            evaluate: Callable[[Env], list[Tensor]] | None,
        ) -> Callable[[Sequence[Tensor], Tensor], Tensor] | None:
            if evaluate is None:
                return None

            def fn(x: Sequence[Tensor], u: Tensor) -> Tensor:
                return torch.cat([r.reshape(-1) for r in evaluate(env_of(x, u))])

            return fn

        return objective_fn, residuals(eq_eval), residuals(ineq_eval), env_of

    objective_fn, equalities, inequalities, env_of = functions(smooth=False)
    objective_taylor = _objective_taylor(objective_expr, env_of, var_slices, m, sign)

    def kinks_fn(
        x: Sequence[Tensor], u: Tensor, reference: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        return kink_eval(env_of(x, u), None if reference is None else env_of(x, reference))

    def kink_rows_fn(
        x: Sequence[Tensor], u: Tensor, reference: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        reference_env = None if reference is None else env_of(x, reference)
        return kink_eval(env_of(x, u), reference_env, rows=True)

    structured = kink_eval is not None and kink_eval.structured

    names = tuple(p.name() for p in parameters)
    shapes = tuple(tuple(int(d) for d in p.shape) for p in parameters)
    variable_names = tuple(v.name() for v in variables)
    variable_shapes = tuple(shape for _, _, _, shape in var_slices)
    smoothed = None
    if kink_eval is not None:
        s_objective, s_equalities, s_inequalities, _ = functions(smooth=True)
        smoothed = Program(
            parameter_names=(*names, "smoothing width"),
            parameter_shapes=(*shapes, ()),
            variable_names=variable_names,
            variable_shapes=variable_shapes,
            objective=s_objective,
            equalities=s_equalities,
            inequalities=s_inequalities,
            maximize=sign < 0,
        )
    return Program(
        parameter_names=names,
        parameter_shapes=shapes,
        variable_names=variable_names,
        variable_shapes=variable_shapes,
        objective=objective_fn,
        objective_taylor=objective_taylor,
        objective_quadratic=_degree_at_most(objective_expr, 2),
        constraints_affine=all(_degree_at_most(e, 1) for e in (*eqs, *ineqs)),
        equalities=equalities,
        inequalities=inequalities,
        is_convex=_safe(problem.is_dcp),
        is_dpp=_safe(problem.is_dpp),
        parameter_signs=tuple(_sign(p) for p in parameters),
        parameter_symmetric=tuple(bool(p.attributes.get("symmetric")) for p in parameters),
        maximize=sign < 0,
        source=(problem, tuple(parameters), tuple(variables)),
        kinks=kinks_fn if kink_eval is not None else None,
        kink_rows=kink_rows_fn if structured else None,
        kinks_isolated=kink_eval is not None and kinks_are_isolated([objective_expr, *eqs, *ineqs]),
        smoothed=smoothed,
    )
