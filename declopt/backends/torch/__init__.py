"""The batched torch backend: Newton / L-BFGS (``minimize``), an augmented Lagrangian for
constraints (``augmented_lagrangian``) and smoothing continuation for kinks (``nonsmooth``)."""

from declopt.backends.torch.backend import TorchBackend

__all__ = ["TorchBackend"]
