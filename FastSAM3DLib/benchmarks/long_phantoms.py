"""Synthetic objects longer than one 192 mm region, with exact ground truth, for growth tests and benchmarks.

* :func:`curved_tube`: a tube (a vessel, the colon) winding along x for ``length`` mm.
* :func:`long_bone`: a femur-like bone along z: a hollow shaft (bright cortex, darker marrow) with wider ends.

Both are CT-like (air -1000 HU outside a soft-tissue body of ~40 HU, int16) on any voxel grid: ``spacing`` (mm,
i, j, k) and ``direction`` (3x3, columns = voxel axes in RAS; default identity), so the same object can be
sampled obliquely and anisotropically. Returns ``(Volume, truth)``, truth a bool (K, J, I) array.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..geometry import Volume


def _grid(extent_mm: Sequence[float], spacing: Sequence[float], direction: Optional[np.ndarray]):
    """A volume grid covering the RAS box [-extent/2, extent/2] (x, y, z), and the RAS of its voxel centres."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(extent_mm, dtype=np.float64)
    # the voxel axes' reach needed to cover the box whatever the direction
    reach = np.abs(direction.T) @ (extent / 2)
    size = np.ceil(2 * reach / spacing).astype(int) + 1
    matrix = np.eye(4)
    matrix[:3, :3] = direction * spacing
    matrix[:3, 3] = -matrix[:3, :3] @ ((size - 1) / 2.0)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in size[::-1]), indexing="ij")
    m = matrix.astype(np.float32)
    ras = [m[r, 0] * i + m[r, 1] * j + m[r, 2] * k + m[r, 3] for r in range(3)]
    return matrix, ras


def _ct(matrix: np.ndarray, ras, body_radius: float, values: np.ndarray, seed: int, axis: int) -> Volume:
    """A CT-like volume: ``values`` (HU above soft tissue) inside a body cylinder along RAS ``axis``, air outside."""
    a, b = (ras[n] for n in range(3) if n != axis)
    body = (a / body_radius) ** 2 + (b / body_radius) ** 2 <= 1.0
    rng = np.random.default_rng(seed)
    image = np.where(body, 40.0, -1000.0) + values + rng.normal(0.0, 8.0, body.shape)
    return Volume(np.clip(np.round(image), -1024, 3071).astype(np.int16), matrix)


def curved_tube(length: float = 450.0, radius: float = 10.0, bend: float = 35.0, contrast: float = 300.0,
                spacing: Sequence[float] = (2.0, 2.0, 2.0), direction: Optional[np.ndarray] = None,
                seed: int = 0) -> Tuple[Volume, np.ndarray]:
    """A tube of ``radius`` mm whose centre line runs along x from -length/2 to length/2, winding by ``bend`` mm."""
    matrix, ras = _grid((length + 60.0, 4 * bend + 8 * radius, 2 * bend + 8 * radius), spacing, direction)
    x, y, z = ras
    cy, cz = tube_centre(x, length, bend)
    inside = ((y - cy) ** 2 + (z - cz) ** 2 <= radius ** 2) & (np.abs(x) <= length / 2)
    body_radius = 2 * bend + 4 * radius
    return _ct(matrix, ras, body_radius, np.where(inside, contrast, 0.0), seed, 0), inside


def tube_centre(x, length: float = 450.0, bend: float = 35.0):
    """(y, z) of the centre line of :func:`curved_tube` at ``x`` (mm)."""
    t = np.asarray(x, dtype=np.float64) / length
    return bend * np.sin(3.0 * np.pi * t), 0.5 * bend * np.cos(2.0 * np.pi * t)


def long_bone(length: float = 440.0, radius: float = 14.0, spacing: Sequence[float] = (1.5, 1.5, 3.0),
              direction: Optional[np.ndarray] = None, seed: int = 1) -> Tuple[Volume, np.ndarray]:
    """A bone along z from -length/2 to length/2: cortex (1200 HU, 4 mm) around marrow (300 HU), ends 1.8x wider."""
    matrix, ras = _grid((8 * radius, 8 * radius, length + 60.0), spacing, direction)
    x, y, z = ras
    u = np.clip(np.abs(z) / (length / 2), 0.0, 1.0)
    outer = radius * (1.0 + 0.8 * np.clip((u - 0.8) / 0.2, 0.0, 1.0) ** 2)
    r = np.sqrt(x ** 2 + y ** 2)
    inside = (r <= outer) & (np.abs(z) <= length / 2)
    cortex = inside & (r > outer - 4.0)
    values = np.where(cortex, 1200.0, np.where(inside, 300.0, 0.0))
    return _ct(matrix, ras, 3.5 * radius, values, seed, 2), inside
