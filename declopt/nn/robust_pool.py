"""Robust pooling: ``y(x) = argmin_y sum_i phi(y - x_i; alpha)`` over one dimension.

Declared in CVXPY with :mod:`declopt.penalties` and run through :class:`declopt.Layer`, so its
gradient (with respect to ``x`` and ``alpha``) is the implicit one from the declaration. The forward
uses a fast exact solver for this one-dimensional problem (:mod:`declopt.nn.pool_solver`).

The pseudo-Huber penalty is declared as ``alpha sqrt(alpha^2 + z^2) - alpha^2``, the same function
as :func:`declopt.penalties.pseudo_huber` (which is written through a column norm of ``[z; alpha]``
to stay DCP for cvxpylayers): its derivatives, which the implicit backward takes, are a few
elementwise operations instead of a stacked norm (about 4x faster eagerly). A fixed ``alpha`` (not a
learnable ``nn.Parameter``) is a constant of the declaration, so that the backward does not form
an alpha-gradient nobody asked for (a full reduction over the batch: ~25% of the compiled Welsch
backward); changing it re-declares.
"""

from __future__ import annotations

import cvxpy as cp
import torch
from torch import Tensor, nn

from declopt import penalties
from declopt.layer import Layer
from declopt.nn._checks import moved_to_last
from declopt.nn._scalar import register_positive_scalar
from declopt.nn.pool_solver import solve_pool


class RobustPool(nn.Module):
    """Pool ``x`` over ``dim`` with a robust penalty.

    Args:
        penalty: ``"quadratic"`` (the mean), ``"pseudo_huber"``, ``"huber"``, ``"welsch"`` or
            ``"truncated_quadratic"``.
        alpha: the penalty's scale, a positive number or a tensor (an ``nn.Parameter`` makes it
            learnable).
        dim: the dimension pooled over (removed from the output unless ``keepdim``).
        keepdim: keep ``dim`` with size 1.
        solver: ``"fast"`` (default: the exact 1-D solver of :mod:`declopt.nn.pool_solver`) or
            ``"generic"`` (the declared problem through the torch backend; slower, same answer).
        compile: run the solver's iterations and the implicit backward under ``torch.compile``:
            5-20x faster forward+backward at large sizes, after a first call that compiles
            (10-30 s per penalty and dtype on a CPU, and ~4 s for the backward of each new pooled
            length). Falls back to eager, with a warning, where compilation fails.

    The forward is exact: the convex penalties' minimiser (unique but for Huber, whose minimisers
    form an interval where the objective is flat, e.g. two entries more than ``2 alpha`` apart:
    the solver returns a point of it, and the backward differentiates the piece that point sits
    on, the inside one on a threshold ``|y - x_i| = alpha``); for welsch the better of the local
    minima reached from the mean and from the median (the seed paper's rule); for the truncated
    quadratic the global minimiser. An empty pooled dim or a 0-d input is an ``InputError``.
    """

    def __init__(
        self,
        penalty: str,
        alpha: float | Tensor = 1.0,
        dim: int = -1,
        keepdim: bool = False,
        solver: str = "fast",
        compile: bool = False,
    ) -> None:
        super().__init__()
        penalties.get(penalty)
        if solver not in ("fast", "generic"):
            raise ValueError(f"solver must be 'fast' or 'generic', got {solver!r}")
        self.penalty = penalty
        self.dim = dim
        self.keepdim = keepdim
        self.solver = solver
        self.compiled = compile  # not `compile`: nn.Module.compile stays the method
        register_positive_scalar(self, "alpha", alpha)
        self._layers: dict[tuple[int, float | None], Layer] = {}

    @property
    def uses_alpha(self) -> bool:
        return self.penalty != "quadratic"

    @property
    def learnable_alpha(self) -> bool:
        # A plain nn.Parameter, or a parametrized one (dl.nn.Positive): any alpha with a graph.
        # The quadratic ignores alpha (the mean), so its alpha is never an input of the layer.
        return self.uses_alpha and isinstance(self.alpha, Tensor) and self.alpha.requires_grad

    def layer(self, n: int, alpha: float | None = None) -> Layer:
        """The declarative layer pooling ``n`` values (declared once per ``n``).

        With ``alpha=None`` alpha is a ``cp.Parameter`` (the layer takes ``(x, alpha)``, and
        differentiates in both); with a number it is a constant of the declaration (the layer
        takes ``x`` only, and its backward has no alpha-gradient to form).
        """
        key = (n, alpha if self.uses_alpha else None)
        if key not in self._layers:
            if len(self._layers) >= _MAX_DECLARATIONS:
                self._layers.pop(next(iter(self._layers)))
            self._layers[key] = self._declare(n, alpha)
        return self._layers[key]

    def _declare(self, n: int, alpha_value: float | None = None) -> Layer:
        x = cp.Parameter(n, name="x")
        y = cp.Variable(name="y")
        constant = not self.uses_alpha or alpha_value is not None
        alpha = alpha_value if constant else cp.Parameter(pos=True, name="alpha")
        phi = _pseudo_huber if self.penalty == "pseudo_huber" else penalties.get(self.penalty)
        objective = cp.sum(phi(y - x, alpha)) if self.uses_alpha else cp.sum(phi(y - x))
        parameters = [x] if constant else [x, alpha]
        problem = cp.Problem(cp.Minimize(objective))
        if self.solver == "generic":
            return Layer(
                problem,
                parameters,
                [y],
                backend="torch",
                initializers=_pool_starts(),
                compile=self.compiled,
            )
        penalty, compile = self.penalty, self.compiled

        def fast(x: Tensor, alpha: Tensor | None = None) -> tuple[Tensor]:
            if alpha is None and alpha_value is not None:
                alpha = torch.tensor(alpha_value, dtype=x.dtype, device=x.device)
            return (solve_pool(penalty, x, alpha, compile),)

        # Exact up to rounding: closed forms, the truncated quadratic's breakpoint sweep, and
        # 1-D Newton / majorise-minimise runs to a few ulps of |y| + alpha.
        fast.exact = True  # type: ignore[attr-defined]
        # The fast solver checks its own convergence (and warns), so the layer need not.
        return Layer(problem, parameters, [y], solver=fast, verify=False, compile=compile)

    @torch.compiler.disable  # declares CVXPY layers lazily; one graph break under torch.compile
    def forward(self, x: Tensor) -> Tensor:
        """``x: (..., n, ...)`` -> pooled over ``dim``: ``(..., ...)`` (or size 1 with keepdim)."""
        moved = moved_to_last(x, self.dim, f"RobustPool({self.penalty!r})")
        single = moved.dim() == 1  # one row: give the layer a batch dim of one
        if single:
            moved = moved.unsqueeze(0)
        n = moved.shape[-1]
        if self.learnable_alpha:
            (y,) = self.layer(n)(moved, self.alpha.to(moved.dtype))
        else:
            # A fixed alpha is a constant of the declaration: no alpha-gradient in the backward.
            (y,) = self.layer(n, float(self.alpha) if self.uses_alpha else None)(moved)
        if single:
            y = y.squeeze(0)
        return y.unsqueeze(self.dim) if self.keepdim else y

    def __getstate__(self) -> dict:
        # The declared layers are a cache (and hold closures): rebuilt on first use after load.
        state = dict(self.__dict__)
        state["_layers"] = {}
        return state

    def extra_repr(self) -> str:
        return f"penalty={self.penalty!r}, alpha={float(self.alpha):g}, dim={self.dim}"


_MAX_DECLARATIONS = 16
"""Declarations kept per pool (one per pooled length and fixed alpha); the oldest goes first."""


def _pseudo_huber(z: cp.Expression, alpha: cp.Parameter | float) -> cp.Expression:
    """:func:`declopt.penalties.pseudo_huber` with cheap derivatives (not DCP; see the module)."""
    return alpha * cp.sqrt(cp.square(alpha) + cp.square(z)) - cp.square(alpha)


def _pool_starts() -> list:
    def mean(x: Tensor, *_: Tensor) -> Tensor:
        return x.mean(-1)

    def median(x: Tensor, *_: Tensor) -> Tensor:
        return x.median(-1).values

    return [mean, median]
