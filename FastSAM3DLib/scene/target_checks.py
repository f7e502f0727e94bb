"""Checks that refuse a bad write target or result before anything is written, with a message for the user."""
from __future__ import annotations

import numpy as np
import slicer

from ..errors import FastSAM3DError, InputImageError
from .editors import SegmentationNode, NO_MASK_SEGMENT, EditorSettings


def check_target(segmentation_node, editor_settings=None) -> None:
    """FastSAM3DError unless ``segmentation_node`` can take a result with ``editor_settings`` (a segmentation
    node stored as binary labelmaps, whose editable-area segment exists): for checks before a model runs."""
    if not hasattr(segmentation_node, "IsA") or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        kind = getattr(segmentation_node, "GetClassName", lambda: type(segmentation_node).__name__)()
        raise FastSAM3DError(f"Give a segmentation node to write the result into (got {kind}), or none to make one.")
    segmentation = checked_representation(segmentation_node)
    settings = editor_settings
    if settings is not None and not isinstance(settings, EditorSettings):
        settings = EditorSettings.from_node(settings)
    if settings is not None and settings.mask_mode == "inside_segment":
        refuse_missing_mask_segment(segmentation, settings.mask_segment_id)


def checked_segmentation(segmentation_node, segment_id):
    """The node's segmentation, after refusing a missing node or segment, or one not stored as labelmaps."""
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise FastSAM3DError("Select a segmentation to write the result into.")
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id) if segment_id else None
    if segment is None:
        raise FastSAM3DError(f"Segment '{segment_id}' does not exist in '{segmentation_node.GetName()}'. "
                             "Select or add a segment first.")
    return checked_representation(segmentation_node)


def checked_representation(segmentation_node):
    """The node's segmentation, after refusing one whose source representation is not a binary labelmap."""
    segmentation = segmentation_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != labelmap_name:
        raise FastSAM3DError(f"'{segmentation_node.GetName()}' is stored as "
                             f"'{segmentation.GetSourceRepresentationName()}', not as a binary labelmap. Open it "
                             "in the Segment Editor once (it offers the conversion), then try again.")
    return segmentation


def check_mask_segment(editor_node, segmentation) -> None:
    """Refuse an editable area 'inside segment X' whose segment is unset or not in ``segmentation``."""
    if editor_node.GetMaskMode() == SegmentationNode.EditAllowedInsideSingleSegment:
        mask_segment_id = editor_node.GetMaskSegmentID() or ""
        if not mask_segment_id:
            raise FastSAM3DError(NO_MASK_SEGMENT)
        refuse_missing_mask_segment(segmentation, mask_segment_id)


def refuse_missing_mask_segment(segmentation, mask_segment_id: str) -> None:
    """FastSAM3DError when the editable area's segment ``mask_segment_id`` is not in ``segmentation``."""
    if segmentation.GetSegment(mask_segment_id) is None:
        raise FastSAM3DError(f"The editable area is 'inside segment {mask_segment_id}', which is not in this "
                             "segmentation. Choose another editable area in the Segment Editor.")


def checked_source(volume_node):
    """The (I, J, K) dimensions of the source volume node, after refusing a missing or empty one."""
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.GetImageData() is None:
        raise InputImageError("Select the source volume the result was computed on.")
    return tuple(volume_node.GetImageData().GetDimensions())  # (I, J, K)


def checked_region(region, dims_ijk):
    """Region as three (start, stop) pairs in (k, j, i) order, inside the volume."""
    shape_kji = tuple(int(d) for d in dims_ijk[::-1])
    if not isinstance(region, (tuple, list)) or len(region) != 3 or \
            not all(isinstance(s, slice) and s.step in (None, 1) for s in region):
        raise ValueError(f"region must be three unit-step slices (k, j, i), got {region!r}")
    bounds = []
    for axis, (s, size) in enumerate(zip(region, shape_kji)):
        start = 0 if s.start is None else int(s.start)
        stop = size if s.stop is None else int(s.stop)
        if not 0 <= start <= stop <= size:
            raise ValueError(f"region {region!r} lies outside the volume of shape {shape_kji} (axis {axis})")
        bounds.append(slice(start, stop))
    return tuple(bounds)


def checked_mask(mask, bounds):
    """``mask`` as a bool array, after refusing one whose shape is not the region's or whose values are not 0/1."""
    mask = np.asarray(mask)
    shape = tuple(s.stop - s.start for s in bounds)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {mask.shape} but the region has shape {shape}")
    if mask.dtype != np.bool_:
        if not np.issubdtype(mask.dtype, np.integer) or mask.size and (mask.min() < 0 or mask.max() > 1):
            raise ValueError(f"mask must be boolean (or 0/1 integers), got {mask.dtype}")
        mask = mask.astype(bool)
    return mask
