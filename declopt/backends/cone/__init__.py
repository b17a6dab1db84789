"""The cone-program backend: DPP-convex declarations canonicalised by CVXPY to
``min 1/2 x^T P x + q^T x, A x + s = b, s in K`` and solved in batches by an interior-point method
in torch (:mod:`declopt.backends.cone.ipm`)."""

from declopt.backends.cone.backend import ConeBackend

__all__ = ["ConeBackend"]
