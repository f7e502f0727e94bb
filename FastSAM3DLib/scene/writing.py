"""Writing a model result into a segment through the Segment Editor logic, and reading a segment back."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import FastSAM3DError, InputImageError
from .editors import _ADD, _REMOVE, _SEN, _SN, NO_MASK_SEGMENT, EditorSettings, EffectEditor, LogicEditor
from .nodes import _array_from_vtk_matrix, _vtk_matrix, node_to_world, volume_from_node_matrix

Region = Tuple[slice, slice, slice]

# A segmentation grid counts as "the source volume's grid shifted by whole voxels" within these tolerances
# (voxel units); any other grid is resampled nearest-neighbour.
_SAME_AXES_TOLERANCE = 1e-4
_WHOLE_VOXEL_TOLERANCE = 1e-3
# Voxels per slab when finding what an edit changes (a few MB of temporaries, reused from the cache).
_SLAB_VOXELS = 1 << 20


def write_region(segmentation_node, segment_id: str, source_volume_node, region: Region, mask: np.ndarray,
                 editor_settings=None, *, editor=None, taken=None) -> bool:
    """Make the segment equal ``mask`` inside ``region`` of the source volume grid, as one Segment Editor edit.

    ``region``: ``(slice_k, slice_j, slice_i)`` of the source volume array; ``mask``: bool (or 0/1 integer)
    array of the region's shape. Inside the region the segment becomes exactly ``mask`` (voxels are set
    *and* cleared) wherever the Segment Editor allows editing; outside the region nothing changes. It is what
    a user gets by painting ``mask`` and erasing the rest of the region with the Paint and Erase effects,
    after one saved undo state: the editable area, the editable intensity range and the overwrite mode
    ("modify other segments") apply exactly as they do for them. In particular, as for Erase, a segment's own
    voxels may always be cleared, and with the editable area "inside segment X" cleared voxels go back to X.
    Only the box of the voxels where the segmentation changes is edited (a refining click's write costs what
    it changes, not its region's size), with the same result as editing the whole region, except where
    Slicer's logic itself depends on the edit's extent: with overwrite "visible", a hidden segment in the
    region but outside the changed box made it move a visible segment to a new layer and leave voxels it
    should have taken (the cut edit takes them). A result that changes nothing edits nothing and saves no undo
    state (Slicer's segmentation history would merge it with the previous one anyway: Ctrl+Z undoes the last
    write that changed something).

    ``editor_settings``: a ``vtkMRMLSegmentEditorNode``, an :class:`EditorSettings`, or None (the editor's
    own settings; Slicer's defaults - edit everywhere, overwrite all other segments, any intensity - for a
    new editor). ``editor``: a :class:`LogicEditor` (reuse one to undo/redo across writes) or an
    :class:`EffectEditor` inside the Segment Editor; None uses a temporary :class:`LogicEditor`. ``taken``: the
    :class:`~FastSAM3DLib.scene.series.TakenVoxels` of a series of points (one per series; see
    :class:`SegmentBaseline`): voxels earlier writes of the series took from other segments and this write
    leaves in no segment go back to them, in the same edit.

    Returns whether the segmentation was edited (False: it already showed the result in the region). If
    anything fails, the segmentation node is left exactly as it was and the exception propagates
    (:class:`FastSAM3DError` subclasses carry a message for the user).
    """
    segmentation = _checked_segmentation(segmentation_node, segment_id)
    bounds = _checked_region(region, _checked_source(source_volume_node))
    mask = _checked_mask(mask, bounds)
    settings = editor_settings
    if settings is not None and not isinstance(settings, EditorSettings) and not isinstance(editor, EffectEditor):
        settings = EditorSettings.from_node(settings)  # a parameter node: copy its values, never modify it
    # source voxel (i, j, k) -> segmentation node coordinates; both transforms must be linear
    mask_to_segmentation = np.linalg.inv(node_to_world(segmentation_node)) @ \
        volume_from_node_matrix(source_volume_node)
    if any(s.stop <= s.start for s in bounds):
        return False  # an empty region changes nothing

    own_editor = editor is None
    if own_editor:
        editor = LogicEditor(segmentation_node.GetScene())
    geometry = _GeometryParameter(segmentation_node)
    rollback = record = None
    try:
        editor.prepare(segmentation_node, source_volume_node, segment_id, settings)
        _check_mask_segment(editor.parameter_node(), segmentation)
        reference = editor.reference_geometry()
        if reference is None:
            raise FastSAM3DError("The segmentation has no geometry; select a source volume in the Segment Editor.")
        grid, mask_ijk_to_grid_ijk = _reference_grid(reference, mask_to_segmentation)
        _refuse_voxels_outside(reference, mask_ijk_to_grid_ijk, bounds, mask)
        on_grid = _region_on_grid(reference, grid, mask_ijk_to_grid_ijk, mask_to_segmentation, bounds, mask)
        if on_grid is None:
            return False  # the region misses the segmentation's geometry: nothing to write
        edit = _changed_part(segmentation, segment_id, grid, *on_grid)
        if edit is None:  # the segmentation already shows the result: no edit, no undo state that changes nothing
            if taken is not None:
                taken.catch_up(segmentation, grid)  # what the series owes follows the labels, as after any write
            return False
        to_add, to_remove = _modifiers(grid, *edit)
        if not _segment_has_voxels_in(segmentation, segment_id, to_remove):
            to_remove = None  # nothing of the segment to clear: skip the Erase step (65-80 ms in Slicer's logic)
        steps = [(image, mode) for image, mode in ((to_remove, _REMOVE), (to_add, _ADD))
                 if image is not None and _has_voxels(image)]
        if not steps:
            return False  # nothing to erase or paint: no snapshot, no undo state that would change nothing
        editor.take_errors()
        rollback = _Rollback(segmentation_node, [to_add, to_remove], editor.parameter_node())
        record = taken.snapshot() if taken is not None else None
        before = _before_write(taken, segmentation, [to_add, to_remove])
        editor.save_state_for_undo()
        for image, mode in steps:
            editor.modify(segmentation_node, segment_id, image, mode)
        errors = editor.take_errors()
        if errors:
            raise FastSAM3DError("The Segment Editor could not apply the result (" + "; ".join(errors)[:500] +
                                 "). The segment was left unchanged.")
        if before is not None:
            taken.after_write(segmentation_node, before)
        return True
    except BaseException:
        if rollback is not None:
            rollback.restore()
        if record is not None:
            taken.restore(record)  # what the failed write recorded or gave back is undone with it
        geometry.restore()
        raise
    finally:
        if rollback is not None:
            rollback.close()
        if own_editor:
            editor.close()


def _before_write(taken, segmentation, modifiers):
    """``taken``'s record of the other segments in the edit's box, or None (no series, or a labelmap layer on
    another voxel grid than the edit, where voxel indices do not match: nothing is given back then)."""
    modifiers = [m for m in modifiers if m is not None]
    if taken is None or not modifiers or _layers_off_grid(segmentation, modifiers):
        return None
    box = _union_extent(modifiers)
    if box is None:
        return None
    grid = vtk.vtkMatrix4x4()
    modifiers[0].GetImageToWorldMatrix(grid)
    return taken.before_write(segmentation, box, _array_from_vtk_matrix(grid))


def segment_mask(segmentation_node, segment_id: str, source_volume_node) -> np.ndarray:
    """The segment's voxels on the source volume's grid, (K, J, I) bool, through both nodes' transforms.

    Nearest-neighbour where the segmentation has another voxel lattice (exact on the same lattice).
    """
    _checked_segmentation(segmentation_node, segment_id)  # refuses a missing node or segment with a message
    dims = _checked_source(source_volume_node)
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
    reference = _oriented_image(None, _array_from_vtk_matrix(ijk_to_ras), extent)
    segmentation_to_volume = np.linalg.inv(node_to_world(source_volume_node)) @ node_to_world(segmentation_node)
    transform = vtk.vtkTransform()
    transform.SetMatrix(_vtk_matrix(segmentation_to_volume))
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, resampled, False, False, transform):
        raise FastSAM3DError("Could not map the segment onto the source volume's grid.")
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return _values_in_extent(resampled, extent) == label  # the segment's layer may be shared: pick its label


def segment_voxels_on_lattice(segmentation_node, segment_id: str, source_volume_node):
    """``(region, voxels)``: the segment inside its labelmap layer's box on the source volume's grid (``region``
    (k, j, i) slices of the source array, None when the layer misses the volume or is empty), read straight
    from the layer where it lies on the source volume's voxel lattice (shifted by whole voxels: the usual case);
    None on another lattice (use :func:`segment_mask`). Slicer's resampling took 7-11 s for a 512 x 512 x 300
    volume, even on the same lattice."""
    segmentation = _checked_segmentation(segmentation_node, segment_id)
    dims = _checked_source(source_volume_node)
    layer_index = segmentation.GetLayerIndex(segment_id)
    layer = segmentation.GetLayerDataObject(layer_index) if layer_index >= 0 else None
    if layer is None or layer.GetPointData().GetScalars() is None:
        return None, None
    layer_to_node, ijk_to_ras = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(layer_to_node)
    source_volume_node.GetIJKToRASMatrix(ijk_to_ras)
    layer_to_volume_ijk = np.linalg.inv(node_to_world(source_volume_node) @ _array_from_vtk_matrix(ijk_to_ras)) @ \
        node_to_world(segmentation_node) @ _array_from_vtk_matrix(layer_to_node)
    shift = _whole_voxel_shift(layer_to_volume_ijk)  # layer index + shift = volume index
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
    return region, _values_in_extent(layer, extent) == label


def check_target(segmentation_node, editor_settings=None) -> None:
    """FastSAM3DError unless ``segmentation_node`` can take a result with ``editor_settings`` (a segmentation
    node stored as binary labelmaps, whose editable-area segment exists): for checks before a model runs."""
    if not hasattr(segmentation_node, "IsA") or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        kind = getattr(segmentation_node, "GetClassName", lambda: type(segmentation_node).__name__)()
        raise FastSAM3DError(f"Give a segmentation node to write the result into (got {kind}), or none to make one.")
    segmentation = _checked_representation(segmentation_node)
    settings = editor_settings
    if settings is not None and not isinstance(settings, EditorSettings):
        settings = EditorSettings.from_node(settings)
    if settings is not None and settings.mask_mode == "inside_segment":
        _refuse_missing_mask_segment(segmentation, settings.mask_segment_id)


def _checked_segmentation(segmentation_node, segment_id):
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise FastSAM3DError("Select a segmentation to write the result into.")
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id) if segment_id else None
    if segment is None:
        raise FastSAM3DError(f"Segment '{segment_id}' does not exist in '{segmentation_node.GetName()}'. "
                             "Select or add a segment first.")
    return _checked_representation(segmentation_node)


def _checked_representation(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != labelmap_name:
        raise FastSAM3DError(f"'{segmentation_node.GetName()}' is stored as "
                             f"'{segmentation.GetSourceRepresentationName()}', not as a binary labelmap. Open it "
                             "in the Segment Editor once (it offers the conversion), then try again.")
    return segmentation


def _check_mask_segment(editor_node, segmentation) -> None:
    if editor_node.GetMaskMode() == _SN.EditAllowedInsideSingleSegment:
        mask_segment_id = editor_node.GetMaskSegmentID() or ""
        if not mask_segment_id:
            raise FastSAM3DError(NO_MASK_SEGMENT)
        _refuse_missing_mask_segment(segmentation, mask_segment_id)


def _refuse_missing_mask_segment(segmentation, mask_segment_id: str) -> None:
    if segmentation.GetSegment(mask_segment_id) is None:
        raise FastSAM3DError(f"The editable area is 'inside segment {mask_segment_id}', which is not in this "
                             "segmentation. Choose another editable area in the Segment Editor.")


def _checked_source(volume_node):
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.GetImageData() is None:
        raise InputImageError("Select the source volume the result was computed on.")
    return tuple(volume_node.GetImageData().GetDimensions())  # (I, J, K)


def _checked_region(region, dims_ijk):
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


def _checked_mask(mask, bounds):
    mask = np.asarray(mask)
    shape = tuple(s.stop - s.start for s in bounds)
    if mask.shape != shape:
        raise ValueError(f"mask has shape {mask.shape} but the region has shape {shape}")
    if mask.dtype != np.bool_:
        if not np.issubdtype(mask.dtype, np.integer) or mask.size and (mask.min() < 0 or mask.max() > 1):
            raise ValueError(f"mask must be boolean (or 0/1 integers), got {mask.dtype}")
        mask = mask.astype(bool)
    return mask


class _GeometryParameter:
    """The segmentation's reference geometry (the Segment Editor logic may set it): remembered, restorable."""

    def __init__(self, segmentation_node) -> None:
        self.node = segmentation_node
        self.name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        self.role = _SN.GetReferenceImageGeometryReferenceRole()
        self.value = segmentation_node.GetSegmentation().GetConversionParameter(self.name)
        self.reference_id = segmentation_node.GetNodeReferenceID(self.role)

    def restore(self) -> None:
        segmentation = self.node.GetSegmentation()
        if segmentation.GetConversionParameter(self.name) != self.value:
            segmentation.SetConversionParameter(self.name, self.value)
        if self.node.GetNodeReferenceID(self.role) != self.reference_id:
            self.node.SetNodeReferenceID(self.role, self.reference_id)


def _oriented_image(array_kji: np.ndarray, image_to_world: np.ndarray, extent) -> "slicer.vtkOrientedImageData":
    """A uint8 vtkOrientedImageData with the given geometry and extent (i0, i1, j0, j1, k0, k1) holding the array."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*[int(v) for v in extent])
    image.SetGeometryFromImageToWorldMatrix(_vtk_matrix(image_to_world))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    if array_kji is not None:
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = \
            np.ascontiguousarray(array_kji, dtype=np.uint8).ravel()
    return image


def _image_array(image) -> np.ndarray:
    """Writable (K, J, I) view of a single-component vtkImageData."""
    e = image.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def _values_in_extent(image, extent) -> np.ndarray:
    """(K, J, I) copy of ``image``'s voxel values over ``extent``; zero where the image does not reach."""
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if image is None or image.GetPointData().GetScalars() is None:
        return np.zeros(shape, np.uint8)
    source = _image_array(image)
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


def _array_in_extent(image, extent) -> np.ndarray:
    """(K, J, I) uint8 mask of ``image``'s nonzero voxels over ``extent``; zero where the image does not reach."""
    return (_values_in_extent(image, extent) != 0).astype(np.uint8)


def _reference_grid(reference, mask_to_segmentation: np.ndarray):
    """(the reference geometry's image-to-segmentation matrix, the map from source voxel indices to its indices)."""
    matrix = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(matrix)
    grid = _array_from_vtk_matrix(matrix)
    return grid, np.linalg.inv(grid) @ mask_to_segmentation


def _refuse_voxels_outside(reference, mask_ijk_to_grid_ijk: np.ndarray, bounds, mask: np.ndarray) -> None:
    """FastSAM3DError, before anything is written, when voxels of ``mask`` lie outside the segmentation's geometry
    (a segmentation made for a smaller volume, or moved by a transform): the edit would cut them off silently."""
    extent = np.array(reference.GetExtent()).reshape(3, 2)

    def outside(ijk: np.ndarray) -> np.ndarray:
        mapped = np.rint(ijk @ mask_ijk_to_grid_ijk[:3, :3].T + mask_ijk_to_grid_ijk[:3, 3])
        return ((mapped < extent[:, 0]) | (mapped > extent[:, 1])).any(axis=1)

    start = np.array([bounds[2].start, bounds[1].start, bounds[0].start])
    stop = np.array([bounds[2].stop, bounds[1].stop, bounds[0].stop]) - 1
    corners = np.array([[x, y, z] for x in (start[0], stop[0]) for y in (start[1], stop[1])
                        for z in (start[2], stop[2])])
    if not outside(corners).any():  # the usual case: the whole region lies inside (a box maps to a convex hull)
        return
    kji = np.argwhere(np.asarray(mask, dtype=bool))
    cut = int(np.count_nonzero(outside(kji[:, ::-1] + start))) if len(kji) else 0
    if cut:
        raise FastSAM3DError(
            f"{cut} of the result's {len(kji)} voxels lie outside the segmentation's geometry (it was made "
            "for a smaller volume, or moved by a transform), and would be cut off; nothing was written. Make its "
            "geometry cover the source volume (Segment Editor: the 'Specify geometry' button next to the source "
            "volume; in Python: segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)), "
            "or write into a new segmentation.")


def _region_on_grid(reference, grid: np.ndarray, mask_ijk_to_grid_ijk: np.ndarray,
                    mask_to_segmentation: np.ndarray, bounds, mask: np.ndarray):
    """The region on the segmentation's grid: (extent, voxels the result sets, the region's footprint), the arrays
    (K, J, I) bool over ``extent`` (clipped to the segmentation's extent), the footprint None where it is the whole
    extent; or None when the region misses the segmentation's extent. ``grid``, ``mask_ijk_to_grid_ijk``:
    :func:`_reference_grid`.
    """
    ref_extent = reference.GetExtent()
    shift = _whole_voxel_shift(mask_ijk_to_grid_ijk)
    start_ijk = np.array([bounds[2].start, bounds[1].start, bounds[0].start])
    stop_ijk = np.array([bounds[2].stop, bounds[1].stop, bounds[0].stop])  # exclusive

    if shift is not None:
        # same voxel lattice (the usual case): copy, shifting by whole voxels
        lo = np.maximum(start_ijk + shift, [ref_extent[0], ref_extent[2], ref_extent[4]])
        hi = np.minimum(stop_ijk - 1 + shift, [ref_extent[1], ref_extent[3], ref_extent[5]])
        if np.any(lo > hi):
            return None
        crop = tuple(slice(lo[a] - shift[a] - start_ijk[a], hi[a] - shift[a] - start_ijk[a] + 1) for a in (2, 1, 0))
        return [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]], mask[crop], None
    # another lattice (oversampled segmentation, other reference volume): nearest-neighbour resampling
    corners = np.array([[x, y, z] for x in (start_ijk[0] - 0.5, stop_ijk[0] - 0.5)
                        for y in (start_ijk[1] - 0.5, stop_ijk[1] - 0.5)
                        for z in (start_ijk[2] - 0.5, stop_ijk[2] - 0.5)])
    mapped = corners @ mask_ijk_to_grid_ijk[:3, :3].T + mask_ijk_to_grid_ijk[:3, 3]
    lo = np.maximum(np.floor(mapped.min(axis=0)).astype(int), [ref_extent[0], ref_extent[2], ref_extent[4]])
    hi = np.minimum(np.ceil(mapped.max(axis=0)).astype(int), [ref_extent[1], ref_extent[3], ref_extent[5]])
    if np.any(lo > hi):
        return None
    extent = [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]]
    source_extent = [start_ijk[0], stop_ijk[0] - 1, start_ijk[1], stop_ijk[1] - 1, start_ijk[2], stop_ijk[2] - 1]
    target = _oriented_image(None, grid, extent)
    inside, footprint = (
        _resampled(_oriented_image(values, mask_to_segmentation, source_extent), target, extent)
        for values in (mask, np.ones(mask.shape, np.uint8)))
    return extent, inside & footprint, footprint


def _changed_part(segmentation, segment_id: str, grid: np.ndarray, extent, inside: np.ndarray, footprint):
    """The region (:func:`_region_on_grid`'s extent, set voxels, footprint) cut to the box of the voxels whose edit
    changes the segmentation, or None when none does.

    Writing a voxel changes something only where the segment gains it (set, not held), loses it (in the
    footprint, not set, held), or keeps it while a segment of another labelmap layer holds it too (Paint takes
    it from that one, as the overwrite mode allows). Elsewhere the segmentation already shows the result, so a
    click that moves the boundary in one place edits that place alone: Slicer's logic, the undo state and the
    rollback then work on that box, not the whole region (seconds for a segment grown over many regions). The
    edit is the same as the whole region's. Where a labelmap layer lies on another voxel grid (Slicer's logic
    resamples it), nothing is cut.
    """
    if _layers_off(segmentation, grid):
        return extent, inside, footprint
    own_layer = segmentation.GetLayerIndex(segment_id)
    own_image = segmentation.GetLayerDataObject(own_layer) if own_layer >= 0 else None
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    others = [image for image in (segmentation.GetLayerDataObject(index)
                                  for index in range(segmentation.GetNumberOfLayers()) if index != own_layer)
              if image is not None and image.GetPointData().GetScalars() is not None
              and _intersect_extent(tuple(image.GetExtent()), tuple(extent)) is not None]  # layers that reach the box
    shape = inside.shape
    changed_k, changed_j, changed_i = (np.zeros(n, dtype=bool) for n in shape)
    step = max(1, _SLAB_VOXELS // (shape[1] * shape[2]))  # slabs of k: the temporaries stay small and cached
    for k0 in range(0, shape[0], step):
        k1 = min(k0 + step, shape[0])
        slab = (extent[0], extent[1], extent[2], extent[3], extent[4] + k0, extent[4] + k1 - 1)
        own = _values_in_extent(own_image, slab) == label
        changed = inside[k0:k1] != own
        if footprint is not None:
            changed &= footprint[k0:k1]
        if others:
            kept = inside[k0:k1] & own
            if kept.any():
                for image in others:
                    changed |= kept & (_values_in_extent(image, slab) != 0)
        rows = changed.any(axis=2)
        changed_k[k0:k1] = rows.any(axis=1)
        changed_j |= rows.any(axis=0)
        changed_i |= changed.any(axis=(0, 1))
    if not changed_k.any():
        return None
    box = tuple(slice(int(found[0]), int(found[-1]) + 1)
                for found in (np.flatnonzero(c) for c in (changed_k, changed_j, changed_i)))
    cut = [extent[2 * a] + (box[2 - a].start if b == 0 else box[2 - a].stop - 1) for a in range(3) for b in (0, 1)]
    return cut, inside[box], footprint[box] if footprint is not None else None


def _modifiers(grid: np.ndarray, extent, inside: np.ndarray, footprint):
    """(add, remove) labelmaps on the segmentation's grid over ``extent``: the voxels the edit sets and clears."""
    to_remove = ~inside if footprint is None else footprint & ~inside
    return _oriented_image(inside, grid, extent), _oriented_image(to_remove, grid, extent)


def _whole_voxel_shift(index_to_index: np.ndarray) -> Optional[np.ndarray]:
    """The whole-voxel (i, j, k) shift of a 4x4 voxel-index map between two grids of the same lattice (same axes
    and spacing), or None when the lattices differ."""
    linear, offset = index_to_index[:3, :3], index_to_index[:3, 3]
    if np.allclose(linear, np.eye(3), atol=_SAME_AXES_TOLERANCE) and \
            np.allclose(offset, np.round(offset), atol=_WHOLE_VOXEL_TOLERANCE):
        return np.round(offset).astype(int)
    return None


def _resampled(image, target, extent) -> np.ndarray:
    output = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, target, output, False, False):
        raise FastSAM3DError("Could not map the result onto the segmentation's grid.")
    return _array_in_extent(output, extent).astype(bool)


def _has_voxels(image) -> bool:
    return bool(_image_array(image).any())


def _segment_has_voxels_in(segmentation, segment_id: str, modifier) -> bool:
    """Whether the segment holds any of ``modifier``'s nonzero voxels; True (keep the step) when the segment's
    layer is on another voxel lattice, where the Segment Editor resamples and the answer is not a lookup.

    Erasing voxels a segment does not hold changes nothing: not the segment, not the others (Erase never
    touches them), and with the editable area "inside segment X" the voxels handed back to X are its own.
    """
    layer = segmentation.GetLayerIndex(segment_id)
    image = segmentation.GetLayerDataObject(layer) if layer >= 0 else None
    if image is None or image.GetPointData().GetScalars() is None:
        return False
    layer_to_world, modifier_to_world = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(layer_to_world)
    modifier.GetImageToWorldMatrix(modifier_to_world)
    if not np.allclose(_array_from_vtk_matrix(layer_to_world), _array_from_vtk_matrix(modifier_to_world),
                       atol=_SAME_AXES_TOLERANCE):
        return True
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    held = _values_in_extent(image, modifier.GetExtent()) == label
    return bool((held & (_image_array(modifier) != 0)).any())


class _Rollback:
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
        if editor_node.GetOverwriteMode() != _SEN.OverwriteAllSegments or \
                _layers_off_grid(self.segmentation, [m for m in modifiers if m is not None]):
            self.history = slicer.vtkSegmentationHistory()
            self.history.SetMaximumNumberOfStates(2)
            self.history.SetSegmentation(self.segmentation)
            self.history.SaveState()
            return
        self.box = _union_extent([m for m in modifiers if m is not None])
        if self.box is None:
            return
        for index in range(self.segmentation.GetNumberOfLayers()):
            image = self.segmentation.GetLayerDataObject(index)
            if image is None:
                continue
            extent = tuple(image.GetExtent()) if image.GetPointData().GetScalars() is not None else _EMPTY
            saved = _intersect_extent(extent, self.box)
            self.boxes.append((image, extent, saved, None if saved is None else _values_in_extent(image, saved)))

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
            now = tuple(image.GetExtent()) if image.GetPointData().GetScalars() is not None else _EMPTY
            if now != extent:  # the edit grew the layer, or the Erase step cropped it to what is left
                _reallocate(image, extent)
            if saved is not None:
                _write_into(image, saved, values)  # the whole box of the old extent: every voxel the edit reached
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
        if self.history is not None:
            self.history.SetSegmentation(None)


def _layers_off_grid(segmentation, modifiers) -> bool:
    """Whether a labelmap layer's voxel grid (image-to-world matrix) differs from the edit's (the modifiers')."""
    if not modifiers:
        return False
    modifier_to_world = vtk.vtkMatrix4x4()
    modifiers[0].GetImageToWorldMatrix(modifier_to_world)
    return _layers_off(segmentation, _array_from_vtk_matrix(modifier_to_world))


def _layers_off(segmentation, grid: np.ndarray) -> bool:
    """Whether a labelmap layer's voxel grid differs from ``grid`` (an image-to-world matrix)."""
    layer_to_world = vtk.vtkMatrix4x4()
    for index in range(segmentation.GetNumberOfLayers()):
        image = segmentation.GetLayerDataObject(index)
        if image is None:
            continue
        image.GetImageToWorldMatrix(layer_to_world)
        if not np.allclose(_array_from_vtk_matrix(layer_to_world), grid, atol=_SAME_AXES_TOLERANCE):
            return True
    return False


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


def _union_extent(images):
    extents = [image.GetExtent() for image in images if _intersect_extent(image.GetExtent(), image.GetExtent())]
    if not extents:
        return None
    return tuple(min(e[a] for e in extents) if a % 2 == 0 else max(e[a] for e in extents) for a in range(6))


_EMPTY = (0, -1, 0, -1, 0, -1)


def _reallocate(image, extent) -> None:
    """Give ``image`` the extent ``extent``, keeping the voxels inside both the old and the new extent; the rest
    of the new one is zero (Slicer's logic crops a layer only where it is empty)."""
    values = _values_in_extent(image, extent) if extent != _EMPTY else None
    scalar_type = image.GetScalarType()
    image.SetExtent(*extent)
    image.AllocateScalars(scalar_type, 1)
    if values is not None:
        _write_into(image, extent, values)


def _intersect_extent(a, b):
    box = tuple(max(a[i], b[i]) if i % 2 == 0 else min(a[i], b[i]) for i in range(6))
    return box if box[0] <= box[1] and box[2] <= box[3] and box[4] <= box[5] else None


def _write_into(image, extent, values) -> None:
    """Copy ``values`` ((K, J, I) over ``extent``, or one number) into ``image``'s voxels."""
    target = _image_array(image)
    e = image.GetExtent()
    target[tuple(slice(extent[2 * a] - e[2 * a], extent[2 * a + 1] - e[2 * a] + 1) for a in (2, 1, 0))] = values