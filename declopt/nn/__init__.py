"""Ready-made declarative layers, declared with the same machinery users have."""

from declopt.nn._scalar import Positive
from declopt.nn.projections import BallProjection, SphereProjection
from declopt.nn.robust_pool import RobustPool

__all__ = ["BallProjection", "Positive", "RobustPool", "SphereProjection"]
