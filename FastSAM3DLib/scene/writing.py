"""Writing a model result into a segment through the Segment Editor logic, one edit of the box it changes."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import slicer
import vtk

from ..errors import FastSAM3DError
from .editors import MODIFY_ADD, MODIFY_REMOVE, EditorSettings, EffectEditor, LogicEditor
from .nodes import array_from_vtk_matrix, node_to_world, volume_from_node_matrix
from .oriented_images import SAME_AXES_TOLERANCE, array_in_extent, has_voxels, image_array, intersect_extent, \
    layers_off, oriented_image, union_extent, values_in_extent, whole_voxel_shift
from .rollback import GeometryParameter, Rollback, layers_off_grid
from .target_checks import check_mask_segment, checked_mask, checked_region, checked_segmentation, checked_source

Region = Tuple[slice, slice, slice]

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
    segmentation = checked_segmentation(segmentation_node, segment_id)
    bounds = checked_region(region, checked_source(source_volume_node))
    mask = checked_mask(mask, bounds)
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
    geometry = GeometryParameter(segmentation_node)
    rollback = record = None
    try:
        editor.prepare(segmentation_node, source_volume_node, segment_id, settings)
        check_mask_segment(editor.parameter_node(), segmentation)
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
        steps = [(image, mode) for image, mode in ((to_remove, MODIFY_REMOVE), (to_add, MODIFY_ADD))
                 if image is not None and has_voxels(image)]
        if not steps:
            return False  # nothing to erase or paint: no snapshot, no undo state that would change nothing
        editor.take_errors()
        rollback = Rollback(segmentation_node, [to_add, to_remove], editor.parameter_node())
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
    if taken is None or not modifiers or layers_off_grid(segmentation, modifiers):
        return None
    box = union_extent(modifiers)
    if box is None:
        return None
    grid = vtk.vtkMatrix4x4()
    modifiers[0].GetImageToWorldMatrix(grid)
    return taken.before_write(segmentation, box, array_from_vtk_matrix(grid))


def _reference_grid(reference, mask_to_segmentation: np.ndarray):
    """(the reference geometry's image-to-segmentation matrix, the map from source voxel indices to its indices)."""
    matrix = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(matrix)
    grid = array_from_vtk_matrix(matrix)
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
    shift = whole_voxel_shift(mask_ijk_to_grid_ijk)
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
    target = oriented_image(None, grid, extent)
    inside, footprint = (
        _resampled(oriented_image(values, mask_to_segmentation, source_extent), target, extent)
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
    if layers_off(segmentation, grid):
        return extent, inside, footprint
    own_layer = segmentation.GetLayerIndex(segment_id)
    own_image = segmentation.GetLayerDataObject(own_layer) if own_layer >= 0 else None
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    others = [image for image in (segmentation.GetLayerDataObject(index)
                                  for index in range(segmentation.GetNumberOfLayers()) if index != own_layer)
              if image is not None and image.GetPointData().GetScalars() is not None
              and intersect_extent(tuple(image.GetExtent()), tuple(extent)) is not None]  # layers that reach the box
    shape = inside.shape
    changed_k, changed_j, changed_i = (np.zeros(n, dtype=bool) for n in shape)
    step = max(1, _SLAB_VOXELS // (shape[1] * shape[2]))  # slabs of k: the temporaries stay small and cached
    for k0 in range(0, shape[0], step):
        k1 = min(k0 + step, shape[0])
        slab = (extent[0], extent[1], extent[2], extent[3], extent[4] + k0, extent[4] + k1 - 1)
        own = values_in_extent(own_image, slab) == label
        changed = inside[k0:k1] != own
        if footprint is not None:
            changed &= footprint[k0:k1]
        if others:
            kept = inside[k0:k1] & own
            if kept.any():
                for image in others:
                    changed |= kept & (values_in_extent(image, slab) != 0)
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
    return oriented_image(inside, grid, extent), oriented_image(to_remove, grid, extent)


def _resampled(image, target, extent) -> np.ndarray:
    output = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, target, output, False, False):
        raise FastSAM3DError("Could not map the result onto the segmentation's grid.")
    return array_in_extent(output, extent).astype(bool)


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
    if not np.allclose(array_from_vtk_matrix(layer_to_world), array_from_vtk_matrix(modifier_to_world),
                       atol=SAME_AXES_TOLERANCE):
        return True
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    held = values_in_extent(image, modifier.GetExtent()) == label
    return bool((held & (image_array(modifier) != 0)).any())
