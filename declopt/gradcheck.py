"""``dl.gradcheck``: a layer's gradient against finite differences of its own forward, per problem.

``torch.autograd.gradcheck`` compares full Jacobians with central differences and fails (or,
worse, passes) for the wrong reason at the points declarative layers live on: a solution on a
bound or a kink has a one-sided derivative, where the central difference averages the two sides.
This check works per problem of a batch, along random directions, and accepts a problem whose
gradient matches either one-sided difference there, saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GradcheckReport", "gradcheck"]


@dataclass
class GradcheckReport:
    """Per-problem outcome of :func:`gradcheck` (tensors have the call's batch shape).

    Attributes:
        ok: the analytic directional derivative matched a finite difference (central, or a
            one-sided one where ``one_sided``) along every probe.
        error: the largest relative mismatch with the best-matching difference.
        one_sided: only a one-sided difference matched (the problem sits where the derivative is
            one-sided: an active bound with a ~zero multiplier, a kink); the layer's
            ``degenerate=`` side decides which one it returns.
        probes: random directions tried per problem.
    """

    ok: Tensor
    error: Tensor
    one_sided: Tensor
    probes: int

    def __bool__(self) -> bool:
        return bool(self.ok.all())

    def __str__(self) -> str:
        total = self.ok.numel()
        failed = (~self.ok).nonzero().tolist()[:5]
        lines = [
            f"gradcheck: {int(self.ok.sum())} of {total} problem(s) agree with finite differences "
            f"({self.probes} random direction(s) each); largest relative error "
            f"{float(self.error.max()) if total else 0.0:.2e}",
            f"  one-sided (degenerate) points: {int(self.one_sided.sum())}",
        ]
        if failed:
            lines.append(f"  first failing batch indices: {[tuple(i) for i in failed]}")
        return "\n".join(lines)


def gradcheck(
    layer: Callable[..., Sequence[Tensor] | Tensor],
    *inputs: Tensor,
    probes: int = 3,
    eps: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> GradcheckReport:
    """Check ``layer``'s gradient at ``inputs`` against finite differences, problem by problem.

    Every input is broadcast to the batch and copied to float64 (a shared parameter then has one
    copy per problem, so every problem's derivative is separable). Along ``probes`` random
    directions ``d`` (one per input) and upstream gradients ``v`` (one per output), the analytic
    ``<grad, d>`` of ``sum v . outputs`` is compared with the central difference of the same
    scalar per problem and, where that disagrees, with second-order one-sided differences.

    Args:
        layer: a ``dl.Layer`` (or any module with its calling convention: leading dims of the
            inputs are batch dims, problems independent).
        inputs: one tensor per parameter, as the layer is called.
        eps: finite-difference step relative to each problem's largest input entry (default
            ``1e-6``).
        rtol: tolerance relative to ``max(|analytic|, |difference|)`` (default ``1e-5``).
    Returns:
        A :class:`GradcheckReport`, truthy when every problem agrees.
    """
    eps = 1e-6 if eps is None else eps
    rtol = 1e-5 if rtol is None else rtol
    generator = torch.Generator().manual_seed(seed)
    program = getattr(layer, "program", None)
    if program is None:
        raise ValueError("gradcheck takes a dl.Layer (it needs the declared parameter shapes)")
    outputs = _outputs(layer, inputs)
    shape0 = program.variable_shapes[0]
    batch = outputs[0].shape[: outputs[0].dim() - len(shape0)]
    nb = len(batch)
    xs = [
        torch.as_tensor(t).double().expand(*batch, *shape).clone()
        for t, shape in zip(inputs, program.parameter_shapes)
    ]
    scale = torch.stack(
        [x.detach().abs().reshape(*batch, -1).amax(-1) for x in xs if x.numel()]
    ).amax(0)
    step = eps * torch.where(scale > 0, scale, torch.ones_like(scale))  # (*batch)
    device = xs[0].device if xs else torch.device("cpu")
    ok = torch.ones(batch, dtype=torch.bool, device=device)
    one_sided = torch.zeros(batch, dtype=torch.bool, device=device)
    worst = torch.zeros(batch, dtype=torch.float64, device=device)
    for _ in range(probes):
        leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in xs]
        outs = _outputs(layer, leaves)
        # Drawn on the CPU (one seeded stream whatever the device), then moved to the data.
        vs = [_normal(o.shape, generator, o.device) for o in outs]
        ds = [_normal(x.shape, generator, x.device) for x in xs]
        total = sum((o.double() * v).sum() for o, v in zip(outs, vs))
        wrt = [leaf for leaf in leaves if leaf.requires_grad]
        grads = torch.autograd.grad(total, wrt, allow_unused=True)
        analytic = torch.zeros(batch, dtype=torch.float64, device=device)
        for g, d in zip(grads, (d for d, x in zip(ds, leaves) if x.requires_grad)):
            if g is not None:
                analytic = analytic + (g.double() * d).reshape(*batch, -1).sum(-1)

        def scalar(t: float, ds: list = ds, vs: list = vs) -> Tensor:
            moved = [
                x + (t * _expand(step, x, nb) * d).to(x.dtype) if x.is_floating_point() else x
                for x, d in zip(xs, ds)
            ]
            with torch.no_grad():
                values = _outputs(layer, moved)
            return sum((o.double() * v).reshape(*batch, -1).sum(-1) for o, v in zip(values, vs))

        f0, fp, fm, fp2, fm2 = (scalar(t) for t in (0.0, 1.0, -1.0, 2.0, -2.0))
        central = (fp - fm) / (2 * step)
        right = (-3 * f0 + 4 * fp - fp2) / (2 * step)
        left = (3 * f0 - 4 * fm + fm2) / (2 * step)
        # Rounding of the forward itself (its solver's accuracy, ~1e-12 relative) divided by
        # the step: differences below it are noise.
        noise = 1e-12 * torch.stack([f0, fp, fm, fp2, fm2]).abs().amax(0) / step
        errors = [_relative(analytic, fd, noise / rtol) for fd in (central, right, left)]
        central_ok = errors[0] <= rtol
        side_ok = (errors[1] <= rtol) | (errors[2] <= rtol)
        best = torch.minimum(errors[0], torch.minimum(errors[1], errors[2]))
        ok &= central_ok | side_ok
        one_sided |= ~central_ok & side_ok
        worst = torch.maximum(worst, best)
    return GradcheckReport(ok, worst, one_sided, probes)


def _outputs(layer: Callable[..., Sequence[Tensor] | Tensor], inputs: Sequence[Tensor]) -> list:
    out = layer(*inputs)
    return [out] if isinstance(out, Tensor) else list(out)


def _normal(shape: torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device)


def _expand(step: Tensor, x: Tensor, nb: int) -> Tensor:
    return step.reshape(*step.shape, *([1] * (x.dim() - nb)))


def _relative(a: Tensor, b: Tensor, floor: Tensor) -> Tensor:
    """``|a - b| / (max(|a|, |b|) + floor)``."""
    size = (torch.maximum(a.abs(), b.abs()) + floor).clamp_min(torch.finfo(torch.float64).tiny)
    return (a - b).abs() / size
