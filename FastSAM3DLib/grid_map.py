"""Where the voxels of one grid fall in another: continuous indices and ITK's linear-interpolation rules (NumPy only).

Shared by :mod:`.resample` (the PyTorch resampling) and the SimpleITK paste-back paths, which use
:func:`inside_field` so that a voxel centre exactly on a face of the model's grid counts as inside or outside
by the same rule everywhere (ITK's own float noise decides such ties either way). No PyTorch here: the
torch-free client of a server uses it.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

# An axis counts as following a single output axis when the other output axes move its continuous index by
# less than this many voxels over the whole output grid (float noise of oblique direction matrices is ~1e-13).
_ALIGNED_TOLERANCE = 1e-9
# Continuous indices are snapped to multiples of 1 / _SNAP when within 1e-9 voxel of one.
_SNAP = float(2 ** 24)


def index_map(input_index_to_ras: np.ndarray, output_index_to_ras: np.ndarray) -> np.ndarray:
    """4x4 float64 matrix taking an output voxel index (i, j, k, 1) to the input's continuous index."""
    return np.linalg.inv(np.asarray(input_index_to_ras, dtype=np.float64)) @ np.asarray(output_index_to_ras,
                                                                                        dtype=np.float64)


def aligned_axes(mapping: np.ndarray, output_size: Sequence[int]) -> Optional[Tuple[int, int, int]]:
    """For each input axis the one output axis its continuous index follows, or None if the map mixes axes."""
    linear = np.asarray(mapping, dtype=np.float64)[:3, :3]
    spans = np.maximum(np.asarray(output_size, dtype=np.float64) - 1, 0)
    axes = []
    for axis in range(3):
        follows = int(np.argmax(np.abs(linear[axis])))
        others = sum(abs(linear[axis, o]) * spans[o] for o in range(3) if o != follows)
        if linear[axis, follows] == 0 or others > _ALIGNED_TOLERANCE:
            return None
        axes.append(follows)
    return tuple(axes) if sorted(axes) == [0, 1, 2] else None


def axis_coordinates(mapping: np.ndarray, axis: int, follows: int, count: int) -> np.ndarray:
    """Continuous input index along ``axis`` for output indices 0..count-1 along ``follows`` (float64).

    Values within 1e-9 voxel of a multiple of 2^-24 are snapped to it: grids whose spacings have simple
    ratios put many voxels exactly on such fractions, and the snap makes them exact whatever float noise the
    matrices carry (so a voxel gets the same value in any box of the same grid).
    """
    c = mapping[axis, 3] + mapping[axis, follows] * np.arange(count, dtype=np.float64)
    scaled = c * _SNAP
    nearest = np.round(scaled)
    return np.where(np.abs(scaled - nearest) <= 1e-9 * _SNAP, nearest / _SNAP, c)


def itk_taps(c: np.ndarray, n: int):
    """ITK's linear taps along one axis: (inside, base, upper, d), numpy, for continuous indices ``c``."""
    inside = (c >= -0.5) & (c < n - 0.5)
    base = np.clip(np.floor(c), 0, n - 1)
    d = c - base
    upper = base + 1
    interpolate = inside & (d > 0) & (upper <= n - 1)
    upper = np.where(interpolate, upper, base)
    d = np.where(interpolate, d, 0.0)
    return inside, base.astype(np.int64), upper.astype(np.int64), d


def inside_range(inside: np.ndarray) -> Tuple[int, int]:
    """The [first, stop) range of True values (a monotone map makes them contiguous); (0, 0) if none."""
    where = np.flatnonzero(inside)
    if where.size == 0:
        return 0, 0
    return int(where[0]), int(where[-1]) + 1


def inside_field(mapping: np.ndarray, output_size: Sequence[int], field_size: Sequence[int]) -> np.ndarray:
    """(K, J, I) bool: which output voxels lie inside the field grid by ITK's rule (``[-0.5, n - 0.5)`` per axis),
    with the continuous indices :mod:`.resample` uses (snapped where each field axis follows one output axis,
    else float64). ``mapping``: :func:`index_map` (output voxel -> field continuous index)."""
    size = [int(n) for n in output_size]
    axes = aligned_axes(mapping, size)
    if axes is not None:
        per_axis = [None, None, None]
        for axis in range(3):
            c = axis_coordinates(mapping, axis, axes[axis], size[axes[axis]])
            per_axis[axes[axis]] = (c >= -0.5) & (c < field_size[axis] - 0.5)
        return per_axis[2][:, None, None] & per_axis[1][None, :, None] & per_axis[0][None, None, :]
    inside = np.ones(size[::-1], dtype=bool)
    j, i = np.meshgrid(np.arange(size[1], dtype=np.float64), np.arange(size[0], dtype=np.float64), indexing="ij")
    for k in range(size[2]):  # one output plane at a time: a few (J, I) float64 arrays
        for axis in range(3):
            c = mapping[axis, 0] * i + mapping[axis, 1] * j + (mapping[axis, 2] * k + mapping[axis, 3])
            inside[k] &= (c >= -0.5) & (c < field_size[axis] - 0.5)
    return inside
