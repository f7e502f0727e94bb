"""Putting a segmentation back as it was when a write fails: the edited box of each layer, or a whole snapshot."""
from __future__ import annotations

import slicer
import vtk

from ..errors import FastSAM3DError
from .editors import SegmentEditorNode, SegmentationNode
from .nodes import array_from_vtk_matrix
from .oriented_images import EMPTY_EXTENT, intersect_extent, layers_off, reallocate, union_extent, \
    values_in_extent, write_into


class GeometryParameter:
    """The segmentation's reference geometry (the Segment Editor logic may set it): remembered, restorable."""

    def __init__(self, segmentation_node) -> None:
        self.node = segmentation_node
        self.name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        self.role = SegmentationNode.GetReferenceImageGeometryReferenceRole()
        self.value = segmentation_node.GetSegmentation().GetConversionParameter(self.name)
        self.reference_id = segmentation_node.GetNodeReferenceID(self.role)

    def restore(self) -> None:
        """Put the geometry parameter and the reference node back where a failed write changed them."""
        segmentation = self.node.GetSegmentation()
        if segmentation.GetConversionParameter(self.name) != self.value:
            segmentation.SetConversionParameter(self.name, self.value)
        if self.node.GetNodeReferenceID(self.role) != self.reference_id:
            self.node.SetNodeReferenceID(self.role, self.reference_id)


class Rollback:
    """What a failed write must put back, without copying the whole segmentation on every click.

    The edit can change voxels only inside the modifiers' box, so each labelmap layer keeps just that box
    (and each segment's layer and label value, to check that nothing else moved). A layer whose extent the
    edit changed gets its old extent back: grown by the Paint step, or cropped by the Erase step to the voxels
    left (outside the box, the cropped voxels were empty before the edit too). Where the Segment Editor logic
    may move segments between layers to spare others (overwrite "visible" or "none"; Slicer's default is
    "all"), or where a layer lies on another voxel grid than the edit (an imported labelmap, an oblique volume's
    first segment: the logic resamples such a layer in place, so its voxels no longer sit at the saved
    indices), the segmentation is snapshotted whole instead (Slicer's segmentation history).
    """

    def __init__(self, segmentation_node, modifiers, editor_node) -> None:
        self.segmentation = segmentation_node.GetSegmentation()
        self.history = None
        self.boxes = []
        self.segments = _segment_layers(self.segmentation)
        self.statuses = _statuses(self.segmentation)  # the logic marks edited segments "in progress"
        if editor_node.GetOverwriteMode() != SegmentEditorNode.OverwriteAllSegments or \
                layers_off_grid(self.segmentation, [m for m in modifiers if m is not None]):
            self.history = slicer.vtkSegmentationHistory()
            self.history.SetMaximumNumberOfStates(2)
            self.history.SetSegmentation(self.segmentation)
            self.history.SaveState()
            return
        self.box = union_extent([m for m in modifiers if m is not None])
        if self.box is None:
            return
        for index in range(self.segmentation.GetNumberOfLayers()):
            image = self.segmentation.GetLayerDataObject(index)
            if image is None:
                continue
            extent = tuple(image.GetExtent()) if image.GetPointData().GetScalars() is not None else EMPTY_EXTENT
            saved = intersect_extent(extent, self.box)
            self.boxes.append((image, extent, saved, None if saved is None else values_in_extent(image, saved)))

    def restore(self) -> None:
        """Put the segmentation back as it was (raises FastSAM3DError if the logic rearranged its layers)."""
        if self.history is not None:
            if not self.history.IsRestorePreviousStateAvailable():
                # the failed edit changed layers without the events the history watches (Slicer's logic resamples
                # a layer in place before it modifies it): tell it, or it would think there is nothing to restore
                self.segmentation.InvokeEvent(slicer.vtkSegmentation.SourceRepresentationModified)
            if self.history.IsRestorePreviousStateAvailable():
                self.history.RestorePreviousState()
            return
        if _segment_layers(self.segmentation) != self.segments:
            raise FastSAM3DError("The Segment Editor rearranged the segmentation while the write failed; press "
                                 "Ctrl+Z to undo the partial change.")
        for image, extent, saved, values in self.boxes:
            now = tuple(image.GetExtent()) if image.GetPointData().GetScalars() is not None else EMPTY_EXTENT
            if now != extent:  # the edit grew the layer, or the Erase step cropped it to what is left
                reallocate(image, extent)
            if saved is not None:
                write_into(image, saved, values)  # the whole box of the old extent: every voxel the edit reached
            image.Modified()
        tag = slicer.vtkSlicerSegmentationsModuleLogic.GetStatusTagName()
        for segment_id, status in self.statuses.items():
            segment = self.segmentation.GetSegment(segment_id)
            if status is None:
                segment.RemoveTag(tag)
            else:
                segment.SetTag(tag, status)
        self.segmentation.InvokeEvent(slicer.vtkSegmentation.SourceRepresentationModified)

    def close(self) -> None:
        """Let go of the segmentation (the snapshot's history observes it)."""
        if self.history is not None:
            self.history.SetSegmentation(None)


def layers_off_grid(segmentation, modifiers) -> bool:
    """Whether a labelmap layer's voxel grid (image-to-world matrix) differs from the edit's (the modifiers')."""
    if not modifiers:
        return False
    modifier_to_world = vtk.vtkMatrix4x4()
    modifiers[0].GetImageToWorldMatrix(modifier_to_world)
    return layers_off(segmentation, array_from_vtk_matrix(modifier_to_world))


def _statuses(segmentation) -> dict:
    """Segment ID -> its status tag (None when it has none)."""
    tag = slicer.vtkSlicerSegmentationsModuleLogic.GetStatusTagName()
    statuses = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        value = vtk.reference("")
        statuses[segment_id] = str(value) if segmentation.GetSegment(segment_id).GetTag(tag, value) else None
    return statuses


def _segment_layers(segmentation) -> list:
    """(segment ID, its layer object, its label value) of every segment."""
    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        layer = segmentation.GetLayerIndex(segment_id)
        image = segmentation.GetLayerDataObject(layer) if layer >= 0 else None
        segments.append((segment_id, image.GetAddressAsString("vtkObject") if image is not None else "",
                         segmentation.GetSegment(segment_id).GetLabelValue()))
    return segments
