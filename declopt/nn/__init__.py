"""Ready-made declarative layers, declared with the same machinery users have."""

from declopt.nn.robust_pool import RobustPool

__all__ = ["RobustPool"]
