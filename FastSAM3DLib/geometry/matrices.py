"""4x4 matrices from voxel indices to RAS millimetres: applied to points, and turned into SimpleITK images (LPS)
and resampling on the grids they define."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: SimpleITK is imported where it is used, so importing this module needs none
    import SimpleITK as sitk


def flip_xy(matrix: np.ndarray) -> np.ndarray:
    """Convert a 4x4 voxel->RAS matrix to voxel->LPS (or back): negate the first two rows."""
    flipped = np.array(matrix, dtype=np.float64, copy=True)
    flipped[:2] *= -1.0
    return flipped


def box_corners(low, high) -> np.ndarray:
    """The 8 corners (8, 3) of the axis-aligned box [low, high]."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    return np.array([np.where(bits, high, low) for bits in np.ndindex(2, 2, 2)])


def translation(offset) -> np.ndarray:
    """4x4 matrix translating homogeneous voxel indices by ``offset``."""
    matrix = np.eye(4)
    matrix[:3, 3] = np.asarray(offset, dtype=np.float64)
    return matrix


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine matrix to points of shape (..., 3); returns float64 of the same shape."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape[-1:] != (3,):
        raise ValueError(f"points must have shape (N, 3) or (3,), got {points.shape}")
    flat = points.reshape(-1, 3)
    return affine_rows(flat, matrix).reshape(points.shape)


def affine_rows(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``points @ matrix[:3, :3].T + matrix[:3, 3]`` for (N, 3) float64 points, without a BLAS call.

    NumPy's matrix product hands large (N, 3) x (3, 3) products to OpenBLAS threads, which then busy-wait on the
    other cores for ~0.1 s and slow down the PyTorch work of the click that follows (2-3x with two threads);
    three scaled columns cost the same and use one core.
    """
    linear = np.asarray(matrix, dtype=np.float64)
    out = points[:, 0:1] * linear[:3, 0] + linear[:3, 3]
    out += points[:, 1:2] * linear[:3, 1]
    out += points[:, 2:3] * linear[:3, 2]
    return out


def sitk_geometry(index_to_ras: np.ndarray):
    """(origin, spacing, direction) in SimpleITK's LPS convention for a 4x4 voxel->RAS matrix."""
    to_lps = flip_xy(index_to_ras)
    spacing = np.linalg.norm(to_lps[:3, :3], axis=0)
    direction = to_lps[:3, :3] / spacing
    return tuple(to_lps[:3, 3]), tuple(spacing), tuple(direction.ravel())


def sitk_image(array_kji: np.ndarray, index_to_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image holding ``array_kji`` (copied) on the grid ``index_to_ras``."""
    import SimpleITK as sitk
    array = np.asarray(array_kji)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(array)
    origin, spacing, direction = sitk_geometry(index_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def sitk_resample(image: sitk.Image, grid_to_ras: np.ndarray, size_ijk, interpolator, default: float,
              output_pixel=None) -> np.ndarray:
    """Resample ``image`` onto the grid (``grid_to_ras``, size in i,j,k order); returns the (k, j, i) array."""
    import SimpleITK as sitk
    origin, spacing, direction = sitk_geometry(grid_to_ras)
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputDirection(direction)
    resampler.SetSize([int(n) for n in size_ijk])
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(default)
    if output_pixel is not None:
        resampler.SetOutputPixelType(output_pixel)
    return sitk.GetArrayFromImage(resampler.Execute(image))
