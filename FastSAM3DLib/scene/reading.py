"""Reading a segment back onto the source volume's grid."""
from __future__ import annotations

import numpy as np
import slicer
import vtk

from ..errors import FastSAM3DError
from .nodes import array_from_vtk_matrix, vtk_matrix_from_array, node_to_world
from .oriented_images import oriented_image, values_in_extent, whole_voxel_shift
from .target_checks import checked_segmentation, checked_source


def segment_mask(segmentation_node, segment_id: str, source_volume_node) -> np.ndarray:
    """The segment's voxels on the source volume's grid, (K, J, I) bool, through both nodes' transforms.

    Nearest-neighbour where the segmentation has another voxel lattice (exact on the same lattice).
    """
    checked_segmentation(segmentation_node, segment_id)  # refuses a missing node or segment with a message
    dims = checked_source(source_volume_node)
    on_lattice = segment_voxels_on_lattice(segmentation_node, segment_id, source_volume_node)
    if on_lattice is not None:
        region, voxels = on_lattice
        full = np.zeros(dims[::-1], dtype=bool)
        if region is not None:
            full[region] = voxels
        return full
    image = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentation_node, segment_id, image, False) or image.GetPointData().GetScalars() is None:
        return np.zeros(dims[::-1], dtype=bool)
    extent = [0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1]
    ijk_to_ras = vtk.vtkMatrix4x4()
    source_volume_node.GetIJKToRASMatrix(ijk_to_ras)
    reference = oriented_image(None, array_from_vtk_matrix(ijk_to_ras), extent)
    segmentation_to_volume = np.linalg.inv(node_to_world(source_volume_node)) @ node_to_world(segmentation_node)
    transform = vtk.vtkTransform()
    transform.SetMatrix(vtk_matrix_from_array(segmentation_to_volume))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, resampled, False, False, transform):
        raise FastSAM3DError("Could not map the segment onto the source volume's grid.")
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return values_in_extent(resampled, extent) == label  # the segment's layer may be shared: pick its label


def segment_voxels_on_lattice(segmentation_node, segment_id: str, source_volume_node):
    """``(region, voxels)``: the segment inside its labelmap layer's box on the source volume's grid (``region``
    (k, j, i) slices of the source array, None when the layer misses the volume or is empty), read straight
    from the layer where it lies on the source volume's voxel lattice (shifted by whole voxels: the usual case);
    None on another lattice (use :func:`segment_mask`). Slicer's resampling took 7-11 s for a 512 x 512 x 300
    volume, even on the same lattice."""
    segmentation = checked_segmentation(segmentation_node, segment_id)
    dims = checked_source(source_volume_node)
    layer_index = segmentation.GetLayerIndex(segment_id)
    layer = segmentation.GetLayerDataObject(layer_index) if layer_index >= 0 else None
    if layer is None or layer.GetPointData().GetScalars() is None:
        return None, None
    layer_to_node, ijk_to_ras = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(layer_to_node)
    source_volume_node.GetIJKToRASMatrix(ijk_to_ras)
    layer_to_volume_ijk = np.linalg.inv(node_to_world(source_volume_node) @ array_from_vtk_matrix(ijk_to_ras)) @ \
        node_to_world(segmentation_node) @ array_from_vtk_matrix(layer_to_node)
    shift = whole_voxel_shift(layer_to_volume_ijk)  # layer index + shift = volume index
    if shift is None:
        return None
    e = layer.GetExtent()
    lo = [max(e[2 * a] + shift[a], 0) for a in range(3)]
    hi = [min(e[2 * a + 1] + shift[a], dims[a] - 1) for a in range(3)]
    if any(l > h for l, h in zip(lo, hi)):
        return None, None
    extent = [v for a in range(3) for v in (lo[a] - shift[a], hi[a] - shift[a])]
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    region = tuple(slice(lo[a], hi[a] + 1) for a in (2, 1, 0))
    return region, values_in_extent(layer, extent) == label
