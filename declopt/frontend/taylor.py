"""The objective's second-order Taylor expansion in one forward pass, from the atoms' local rules.

:func:`compile_taylor` turns the post-ordered steps of an expression (``compile._build``) into
``env -> (value, grad (m,), hess (m, m))``: each step computes its value as the plain evaluator
does, and, where it depends on the variables, its jet from its operands' jets with the atom's
closed-form local derivatives (:mod:`.atoms.jets`). No autograd graph is built and nothing is
evaluated twice; the nodes that do not depend on the variables (parameter-only subexpressions)
carry no derivatives at all.

The expansion exists only when every atom on the variables' path has a jet rule for its pattern of
variable-dependent operands; otherwise :func:`compile_taylor` returns ``None`` and the program's
derivatives come from autograd (:mod:`declopt.derivatives`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import cvxpy as cp
import torch
from torch import Tensor

from declopt.frontend.atoms import RULES, operands
from declopt.frontend.atoms.jets import (
    JetFn,
    accepts_scaled,
    expanded,
    is_fused,
    plain,
    reads_of,
    takes_compact,
)

Env = Mapping[int, Tensor]
Step = Callable[[list, Env, Tensor | None], Tensor]
TaylorFn = Callable[..., tuple[Tensor, ...]]
"""``(env, u, second=True, value=True) -> (value (), grad (m,), hess (m, m))`` of a scalar
expression; ``second=False`` leaves out the curvature (nothing of it is formed) and
``value=False`` the value (only the node values some jet reads are computed): the tuple then
holds the rest, in order."""

_VARIABLE = "variable"


def compile_taylor(
    nodes: Sequence[cp.Expression],
    steps: Sequence[Step],
    root: int,
    var_slices: Sequence[tuple[int, int, int, tuple[int, ...]]],
    m: int,
) -> TaylorFn | None:
    """The Taylor evaluator of the scalar node ``nodes[root]``, or ``None`` (see module doc).

    Args:
        nodes, steps: the expression of every slot and its value step, in post-order.
        root: the slot of the expression to expand (scalar).
        var_slices: ``(variable id, start, stop, shape)`` of each variable in ``u``.
        m: the length of ``u``.
    """
    slot_of = {id(node): k for k, node in enumerate(nodes)}
    var_of = {vid: (a, b, shape) for vid, a, b, shape in var_slices}
    plan: list[tuple[str, JetFn | None, tuple[int, ...]] | None] = []
    dependent: list[bool] = []
    for node in nodes:
        if isinstance(node, cp.Variable):
            dependent.append(True)
            plan.append((_VARIABLE, None, (node.id,)))
            continue
        rule = RULES.get(type(node))
        if rule is None or isinstance(node, (cp.Constant, cp.Parameter)):
            dependent.append(False)
            plan.append(None)
            continue
        inputs = tuple(slot_of[id(a)] for a in operands(node))
        flags = tuple(dependent[i] for i in inputs)
        if not any(flags):
            dependent.append(False)
            plan.append(None)
            continue
        jet = None if rule.jet is None else rule.jet(node, flags)
        if jet is None:
            return None
        dependent.append(True)
        plan.append(("atom", jet, inputs))
    if not dependent[root]:
        return None
    # The last step that reads each slot: after it, the slot's value and jet are dropped, so a
    # pass holds only the live nodes' tensors (the jets are 2-3 node-sized tensors each).
    last_use = list(range(len(nodes)))
    for k, node in enumerate(nodes):
        if isinstance(node, (cp.Constant, cp.Parameter, cp.Variable)) or type(node) not in RULES:
            continue
        for a in operands(node):
            last_use[slot_of[id(a)]] = k
    last_use[root] = len(nodes)
    released = [[i for i in range(len(nodes)) if last_use[i] == k] for k in range(len(nodes))]
    computed = {want: _values_read(nodes, plan, slot_of, root, want) for want in (True, False)}
    # A fused jet computes its node's value with its derivatives (the step is skipped).
    fused = [e is not None and e[0] != _VARIABLE and is_fused(e[1]) for e in plan]  # type: ignore[arg-type]

    def evaluate(
        env: Env, u: Tensor, second: bool = True, value: bool = True
    ) -> tuple[Tensor, ...]:
        eye = torch.eye(m, dtype=u.dtype, device=u.device)
        values: list[Tensor | None] = []
        grads: list[Tensor | None] = []
        hesses: list[Tensor | None] = []
        wanted = computed[value]
        for k, (step, entry) in enumerate(zip(steps, plan)):
            out = step(values, env, u) if wanted[k] and not fused[k] else None
            values.append(out)
            if entry is None:
                grads.append(None)
                hesses.append(None)
            elif entry[0] == _VARIABLE:
                a, b, shape = var_of[entry[2][0]]
                grads.append(eye[a:b].reshape(*shape, m))
                hesses.append(None)
            else:
                _, jet, inputs = entry
                operand_values = [values[i] for i in inputs]
                operand_grads = [grads[i] for i in inputs]
                operand_hesses = [hesses[i] for i in inputs] if second else None
                if not accepts_scaled(jet):  # type: ignore[arg-type]
                    operand_grads = [plain(g) for g in operand_grads]
                    if operand_hesses is not None:
                        operand_hesses = [plain(h) for h in operand_hesses]
                if not takes_compact(jet):  # type: ignore[arg-type]
                    operand_grads, operand_hesses = expanded(
                        operand_values, operand_grads, operand_hesses
                    )
                if fused[k]:
                    g, h, values[k] = jet(  # type: ignore[misc]
                        operand_values, operand_grads, operand_hesses, wanted[k]
                    )
                else:
                    g, h = jet(  # type: ignore[misc]
                        operand_values, operand_grads, operand_hesses, out
                    )
                grads.append(g)
                hesses.append(h)
            for i in released[k]:
                values[i] = grads[i] = hesses[i] = None  # type: ignore[call-overload]
        grad, hess = plain(grads[root]), plain(hesses[root])
        assert grad is not None  # the root depends on u
        head = (values[root].reshape(()),) if value else ()  # type: ignore[union-attr]
        if not second:
            return (*head, grad.reshape(m))
        hess = torch.zeros(m, m, dtype=u.dtype, device=u.device) if hess is None else hess
        return (*head, grad.reshape(m), hess.reshape(m, m))

    return evaluate


def _values_read(
    nodes: Sequence[cp.Expression],
    plan: Sequence[tuple[str, JetFn | None, tuple[int, ...]] | None],
    slot_of: Mapping[int, int],
    root: int,
    value: bool,
) -> list[bool]:
    """Per slot, whether the pass computes its value: the root's when the caller asks for it,
    and every value a jet or a computed value reads. (A declared penalty's backward reads
    ``huber(y - x)``'s operand but not the huber values or their sum: five of its passes.)"""
    needed = [False] * len(nodes)
    needed[root] = value
    for k in reversed(range(len(nodes))):  # post-order: every reader of k comes after it
        node, entry = nodes[k], plan[k]
        if isinstance(node, (cp.Constant, cp.Parameter, cp.Variable)) or type(node) not in RULES:
            continue
        args = operands(node)
        read = [False] * len(args)
        if entry is not None and entry[0] != _VARIABLE:
            read_values, read_out = reads_of(entry[1], len(args))  # type: ignore[arg-type]
            needed[k] = needed[k] or read_out
            read = list(read_values)
        for i, a in enumerate(args):
            if needed[k] or read[i]:  # a computed value reads every operand
                needed[slot_of[id(a)]] = True
    return needed
