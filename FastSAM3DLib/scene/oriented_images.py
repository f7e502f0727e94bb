"""numpy views and copies of ``vtkOrientedImageData`` voxels over extents, and voxel-lattice comparisons.

An extent is VTK's ``(i0, i1, j0, j1, k0, k1)``, inclusive; arrays are (K, J, I). Two grids are on the same
lattice when one's voxel indices are the other's shifted by whole voxels, within these tolerances (voxel units).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .nodes import array_from_vtk_matrix, vtk_matrix_from_array

SAME_AXES_TOLERANCE = 1e-4
WHOLE_VOXEL_TOLERANCE = 1e-3
#: The extent of an image without voxels.
EMPTY_EXTENT = (0, -1, 0, -1, 0, -1)


def oriented_image(array_kji: np.ndarray, image_to_world: np.ndarray, extent) -> "slicer.vtkOrientedImageData":
    """A uint8 vtkOrientedImageData with the given geometry and extent (i0, i1, j0, j1, k0, k1) holding the array."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*[int(v) for v in extent])
    image.SetGeometryFromImageToWorldMatrix(vtk_matrix_from_array(image_to_world))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    if array_kji is not None:
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = \
            np.ascontiguousarray(array_kji, dtype=np.uint8).ravel()
    return image


def image_array(image) -> np.ndarray:
    """Writable (K, J, I) view of a single-component vtkImageData."""
    e = image.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def values_in_extent(image, extent) -> np.ndarray:
    """(K, J, I) copy of ``image``'s voxel values over ``extent``; zero where the image does not reach."""
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if image is None or image.GetPointData().GetScalars() is None:
        return np.zeros(shape, np.uint8)
    source = image_array(image)
    out = np.zeros(shape, source.dtype)
    e = image.GetExtent()
    lo = [max(extent[2 * a], e[2 * a]) for a in range(3)]
    hi = [min(extent[2 * a + 1], e[2 * a + 1]) for a in range(3)]
    if any(l > h for l, h in zip(lo, hi)):
        return out
    src = tuple(slice(lo[a] - e[2 * a], hi[a] - e[2 * a] + 1) for a in (2, 1, 0))
    dst = tuple(slice(lo[a] - extent[2 * a], hi[a] - extent[2 * a] + 1) for a in (2, 1, 0))
    out[dst] = source[src]
    return out


def array_in_extent(image, extent) -> np.ndarray:
    """(K, J, I) uint8 mask of ``image``'s nonzero voxels over ``extent``; zero where the image does not reach."""
    return (values_in_extent(image, extent) != 0).astype(np.uint8)


def has_voxels(image) -> bool:
    """Whether ``image`` has a nonzero voxel."""
    return bool(image_array(image).any())


def whole_voxel_shift(index_to_index: np.ndarray) -> Optional[np.ndarray]:
    """The whole-voxel (i, j, k) shift of a 4x4 voxel-index map between two grids of the same lattice (same axes
    and spacing), or None when the lattices differ."""
    linear, offset = index_to_index[:3, :3], index_to_index[:3, 3]
    if np.allclose(linear, np.eye(3), atol=SAME_AXES_TOLERANCE) and \
            np.allclose(offset, np.round(offset), atol=WHOLE_VOXEL_TOLERANCE):
        return np.round(offset).astype(int)
    return None


def layers_off(segmentation, grid: np.ndarray) -> bool:
    """Whether a labelmap layer's voxel grid differs from ``grid`` (an image-to-world matrix)."""
    layer_to_world = vtk.vtkMatrix4x4()
    for index in range(segmentation.GetNumberOfLayers()):
        image = segmentation.GetLayerDataObject(index)
        if image is None:
            continue
        image.GetImageToWorldMatrix(layer_to_world)
        if not np.allclose(array_from_vtk_matrix(layer_to_world), grid, atol=SAME_AXES_TOLERANCE):
            return True
    return False


def union_extent(images):
    """The smallest extent holding every non-empty extent of ``images``, or None when all are empty."""
    extents = [image.GetExtent() for image in images if intersect_extent(image.GetExtent(), image.GetExtent())]
    if not extents:
        return None
    return tuple(min(e[a] for e in extents) if a % 2 == 0 else max(e[a] for e in extents) for a in range(6))


def reallocate(image, extent) -> None:
    """Give ``image`` the extent ``extent``, keeping the voxels inside both the old and the new extent; the rest
    of the new one is zero (Slicer's logic crops a layer only where it is empty)."""
    values = values_in_extent(image, extent) if extent != EMPTY_EXTENT else None
    scalar_type = image.GetScalarType()
    image.SetExtent(*extent)
    image.AllocateScalars(scalar_type, 1)
    if values is not None:
        write_into(image, extent, values)


def intersect_extent(a, b):
    """The extent both ``a`` and ``b`` cover, or None when they do not meet."""
    box = tuple(max(a[i], b[i]) if i % 2 == 0 else min(a[i], b[i]) for i in range(6))
    return box if box[0] <= box[1] and box[2] <= box[3] and box[4] <= box[5] else None


def write_into(image, extent, values) -> None:
    """Copy ``values`` ((K, J, I) over ``extent``, or one number) into ``image``'s voxels."""
    target = image_array(image)
    e = image.GetExtent()
    target[tuple(slice(extent[2 * a] - e[2 * a], extent[2 * a + 1] - e[2 * a] + 1) for a in (2, 1, 0))] = values
