"""Procedural point clouds: points sampled on the surfaces of simple solids (the ModelNet40
stand-in). Every sampler returns ``(n, 3)`` float64 points on a surface of size about 1, in
canonical pose (upright along z); :func:`random_cloud` adds a random anisotropic scale, rotation
and surface noise, then centres the cloud and scales it into the unit ball (as the ModelNet40 HDF5
files are).

Sampling is uniform in area on each face (faces chosen in proportion to their area), so the
classes differ by their geometry, not by how the points are spread.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.spatial.transform import Rotation

Sampler = Callable[[np.random.Generator, int], np.ndarray]


def _unit_sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _disc(rng: np.random.Generator, n: int, r_in: float, r_out: float, z: float) -> np.ndarray:
    """Uniform on the annulus ``r_in <= r <= r_out`` in the plane ``z``."""
    r = np.sqrt(rng.uniform(r_in**2, r_out**2, n))
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(t), r * np.sin(t), np.full(n, z)], 1)


def _tube(rng: np.random.Generator, n: int, r: float, z0: float, z1: float) -> np.ndarray:
    """Uniform on the side of the cylinder of radius ``r`` between heights ``z0`` and ``z1``."""
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(t), r * np.sin(t), rng.uniform(z0, z1, n)], 1)


def _triangles(rng: np.random.Generator, n: int, corners: np.ndarray) -> np.ndarray:
    """Uniform on a union of triangles ``corners: (T, 3, 3)``, each picked by its area."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    pick = rng.choice(len(corners), n, p=areas / areas.sum())
    u, v = rng.uniform(size=(2, n))
    flip = u + v > 1  # reflect into the triangle
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    return a[pick] + u[:, None] * (b - a)[pick] + v[:, None] * (c - a)[pick]


def _mixture(rng: np.random.Generator, n: int, parts: list[tuple[float, Sampler]]) -> np.ndarray:
    """Points from several surface parts, each getting its share of ``n`` by area."""
    areas = np.array([area for area, _ in parts])
    counts = rng.multinomial(n, areas / areas.sum())
    return np.concatenate([sample(rng, k) for (_, sample), k in zip(parts, counts)])


def sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    return _unit_sphere(rng, n)


def ellipsoid(rng: np.random.Generator, n: int) -> np.ndarray:
    # Axes 1 : 0.6 : 0.35, far beyond what the random anisotropic scale does to a sphere.
    return _unit_sphere(rng, n) * np.array([1.0, 0.6, 0.35])


def bowl(rng: np.random.Generator, n: int) -> np.ndarray:
    """An open hemisphere."""
    p = _unit_sphere(rng, n)
    p[:, 2] = -np.abs(p[:, 2])
    return p


def cube(rng: np.random.Generator, n: int) -> np.ndarray:
    face = rng.integers(0, 6, n)
    uv = rng.uniform(-1, 1, (n, 2))
    axis, sign = face // 2, np.where(face % 2 == 0, -1.0, 1.0)
    p = np.empty((n, 3))
    for k in range(3):  # the fixed axis gets +-1, the other two the face coordinates
        others = [j for j in range(3) if j != k]
        on = axis == k
        p[on, k] = sign[on]
        p[np.ix_(on, others)] = uv[on]
    return p


def cylinder(rng: np.random.Generator, n: int) -> np.ndarray:
    r, h = 0.5, 1.0
    return _mixture(
        rng,
        n,
        [
            (2 * np.pi * r * 2 * h, lambda g, k: _tube(g, k, r, -h, h)),
            (np.pi * r**2, lambda g, k: _disc(g, k, 0, r, -h)),
            (np.pi * r**2, lambda g, k: _disc(g, k, 0, r, h)),
        ],
    )


def cone(rng: np.random.Generator, n: int) -> np.ndarray:
    r, h = 0.8, 2.0

    def side(g: np.random.Generator, k: int) -> np.ndarray:
        s = np.sqrt(g.uniform(size=k))  # distance from the apex, uniform in area
        t = g.uniform(0, 2 * np.pi, k)
        return np.stack([r * s * np.cos(t), r * s * np.sin(t), 1 - h * s], 1)

    slant = np.hypot(r, h)
    return _mixture(
        rng, n, [(np.pi * r * slant, side), (np.pi * r**2, lambda g, k: _disc(g, k, 0, r, -1))]
    )


def torus(rng: np.random.Generator, n: int) -> np.ndarray:
    big, small = 0.75, 0.25
    out: list[np.ndarray] = []
    while sum(len(o) for o in out) < n:
        # Area element ~ (R + r cos phi): rejection sampling on phi.
        phi = rng.uniform(0, 2 * np.pi, 2 * n)
        keep = rng.uniform(size=2 * n) < (big + small * np.cos(phi)) / (big + small)
        phi = phi[keep]
        theta = rng.uniform(0, 2 * np.pi, len(phi))
        ring = big + small * np.cos(phi)
        out.append(np.stack([ring * np.cos(theta), ring * np.sin(theta), small * np.sin(phi)], 1))
    return np.concatenate(out)[:n]


def pyramid(rng: np.random.Generator, n: int) -> np.ndarray:
    """A square pyramid, base included."""
    apex = np.array([0.0, 0.0, 1.0])
    base = np.array([[-1, -1, -1], [1, -1, -1], [1, 1, -1], [-1, 1, -1]], dtype=float)
    sides = [np.stack([base[i], base[(i + 1) % 4], apex]) for i in range(4)]
    bottom = [base[[0, 1, 2]], base[[0, 2, 3]]]
    return _triangles(rng, n, np.stack(sides + bottom))


def tetrahedron(rng: np.random.Generator, n: int) -> np.ndarray:
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=float)
    faces = [v[[0, 1, 2]], v[[0, 1, 3]], v[[0, 2, 3]], v[[1, 2, 3]]]
    return _triangles(rng, n, np.stack(faces))


def capsule(rng: np.random.Generator, n: int) -> np.ndarray:
    r, h = 0.4, 0.6

    def cap(g: np.random.Generator, k: int, top: bool) -> np.ndarray:
        p = _unit_sphere(g, k) * r
        p[:, 2] = np.abs(p[:, 2]) if top else -np.abs(p[:, 2])
        return p + np.array([0, 0, h if top else -h])

    return _mixture(
        rng,
        n,
        [
            (2 * np.pi * r * 2 * h, lambda g, k: _tube(g, k, r, -h, h)),
            (2 * np.pi * r**2, lambda g, k: cap(g, k, True)),
            (2 * np.pi * r**2, lambda g, k: cap(g, k, False)),
        ],
    )


def disc(rng: np.random.Generator, n: int) -> np.ndarray:
    return _disc(rng, n, 0.0, 1.0, 0.0)


def ring(rng: np.random.Generator, n: int) -> np.ndarray:
    """A flat annulus (a washer)."""
    return _disc(rng, n, 0.7, 1.0, 0.0)


SHAPES: dict[str, Sampler] = {
    "sphere": sphere,
    "cube": cube,
    "cylinder": cylinder,
    "cone": cone,
    "torus": torus,
    "pyramid": pyramid,
    "ellipsoid": ellipsoid,
    "capsule": capsule,
    "disc": disc,
    "ring": ring,
    "tetrahedron": tetrahedron,
    "bowl": bowl,
}
"""The stand-in classes, in label order."""


def random_cloud(
    shape: str,
    rng: np.random.Generator,
    n: int,
    scale_range: tuple[float, float] = (0.75, 1.25),
    noise: float = 0.01,
    max_tilt: float = 15.0,
) -> np.ndarray:
    """``n`` points ``(n, 3)`` on a randomly scaled, rotated ``shape`` with Gaussian surface noise,
    centred and scaled so that the farthest point is at distance 1.

    Like ModelNet's models the shapes stay roughly upright: a uniform rotation about the vertical
    (z) axis and a tilt of up to ``max_tilt`` degrees about a random horizontal axis.
    """
    points = SHAPES[shape](rng, n) * rng.uniform(*scale_range, size=3)
    heading = Rotation.from_euler("z", rng.uniform(0, 360), degrees=True)
    axis = np.array([*_unit_sphere(rng, 1)[0, :2], 0.0])
    axis /= np.linalg.norm(axis)
    tilt = Rotation.from_rotvec(np.radians(rng.uniform(0, max_tilt)) * axis)
    points = (tilt * heading).apply(points)
    points = points + noise * rng.standard_normal(points.shape)
    points -= points.mean(0)
    return points / np.linalg.norm(points, axis=1).max()


def uniform_ball(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Points ``(*shape, 3)`` uniform in the unit ball (direction uniform, radius ~ U^(1/3))."""
    v = rng.standard_normal((*shape, 3))
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return v * rng.uniform(size=(*shape, 1)) ** (1 / 3)
