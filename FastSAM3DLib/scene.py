"""Scene adapter: the only library module that talks to Slicer's MRML scene (no Qt, no threads).

It turns MRML nodes into library inputs and library results into Segment Editor edits:

* :func:`volume_from_node` - a scalar volume node as a :class:`~FastSAM3DLib.geometry.Volume` in world RAS
  (linear parent transforms folded into ``ijk_to_ras``; a non-linear one is refused with instructions).
* :func:`ras_points_from_markups` - the defined control points of a point list in world RAS, with their
  include (1) / exclude (0) labels. The prompt-point helpers (:func:`prompt_points_node`,
  :func:`add_prompt_point` ...) keep one point list per segment, polarity shown by colour.
* :func:`write_region` - writes a model result (``region``, ``mask`` on the source volume grid) into a
  segment through the Segment Editor's own logic (``vtkSlicerSegmentEditorLogic``, Slicer 5.10+), so the
  editable area, the "modify other segments" (overwrite) mode and the editable intensity range apply exactly
  as they do for Paint and Erase, and the edit is one undo step.
* :func:`segment_mask` / :class:`SegmentBaseline` - a segment's voxels on the source grid, kept before the
  first point so that removing every point gives the segment back as it was.
* :func:`segment_volume_node` - the batch call for the Slicer Python console.

The write goes through an *editor*: :class:`LogicEditor` (a Segment Editor logic of its own, for scripts,
batch use and tests) or :class:`EffectEditor` (the Segment Editor effect's own logic, inside Slicer, so that
Ctrl+Z in the Segment Editor undoes the edit).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .errors import FastSAM3DError, InputImageError, PromptError
from .geometry import Volume

Region = Tuple[slice, slice, slice]

INCLUDE_COLOR = (0.20, 0.85, 0.25)  # include points: the markups "selected" colour
EXCLUDE_COLOR = (0.95, 0.20, 0.20)  # exclude points: the markups (unselected) colour
PROMPTS_ATTRIBUTE = "FastSAM3D.PromptsFor"  # "<segmentation node ID>/<segment ID>" on a prompt point list
MODEL_TAG = "FastSAM3D.Model"  # segment tag recording which model wrote the segment

_SEN = slicer.vtkMRMLSegmentEditorNode
_SN = slicer.vtkMRMLSegmentationNode
MASK_MODES = {
    "everywhere": _SN.EditAllowedEverywhere,
    "inside_all_segments": _SN.EditAllowedInsideAllSegments,
    "inside_visible_segments": _SN.EditAllowedInsideVisibleSegments,
    "outside_all_segments": _SN.EditAllowedOutsideAllSegments,
    "outside_visible_segments": _SN.EditAllowedOutsideVisibleSegments,
    "inside_segment": _SN.EditAllowedInsideSingleSegment,
}
OVERWRITE_MODES = {
    "all": _SEN.OverwriteAllSegments,
    "visible": _SEN.OverwriteVisibleSegments,
    "none": _SEN.OverwriteNone,
}
_ADD = slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd
_REMOVE = slicer.vtkSlicerSegmentEditorLogic.ModificationModeRemove

# Errors the logic reports after a successful edit (it could not re-parent the segmentation in the subject
# hierarchy, e.g. for nodes that have no subject hierarchy item); they do not affect the segment.
_BENIGN_LOGIC_ERRORS = ("Subject hierarchy items not found",)

# A segmentation grid counts as "the source volume's grid shifted by whole voxels" within these tolerances
# (voxel units); any other grid is resampled nearest-neighbour.
_SAME_AXES_TOLERANCE = 1e-4
_WHOLE_VOXEL_TOLERANCE = 1e-3


# ------------------------------------------------------------------------------------------------------
# matrices and transforms


def _array_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def node_to_world(node) -> np.ndarray:
    """4x4 matrix from ``node``'s own coordinates to world RAS (its parent transforms, hardened).

    Raises :class:`FastSAM3DError` telling the user to harden the transform when it is not linear.
    """
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise FastSAM3DError(
            f"'{node.GetName()}' is moved by the non-linear transform '{transform_node.GetName()}'. FastSAM3D "
            "works on a linear geometry: harden the transform on it (Data module: right-click the node > "
            "'Harden transform') or remove the transform, then try again."
        )
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _array_from_vtk_matrix(matrix)


# ------------------------------------------------------------------------------------------------------
# inputs: volume and points


def volume_from_node(volume_node, copy: bool = True) -> Volume:
    """The scalar volume node as a :class:`Volume`: (K, J, I) voxel array and IJK->world-RAS matrix.

    Linear parent transforms are folded into ``ijk_to_ras``; a non-linear one raises :class:`FastSAM3DError`.
    ``copy=True`` (default) copies the voxels so that a worker thread never reads VTK memory the scene may
    change; ``copy=False`` returns a view (as ``slicer.util.arrayFromVolume`` does).
    """
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "nothing" if volume_node is None else volume_node.GetClassName()
        raise InputImageError(f"Select a scalar volume as source volume (got {kind}).")
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None or image.GetNumberOfPoints() == 0:
        raise InputImageError(f"Volume '{volume_node.GetName()}' has no voxels. Load the image data again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputImageError(
            f"Volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per voxel "
            "(colour or vector data). Convert it to a scalar volume first (module 'Vector to Scalar Volume')."
        )
    array = numpy_support.vtk_to_numpy(scalars).reshape(image.GetDimensions()[::-1])
    return Volume(np.array(array, copy=True) if copy else array, volume_from_node_matrix(volume_node))


def ras_points_from_markups(point_list_node) -> Tuple[np.ndarray, np.ndarray]:
    """World-RAS positions (N, 3) and labels (N,) of a point list's defined control points.

    A point's label is 1 (include) when the point is *selected* (drawn in the include colour) and 0
    (exclude) otherwise; points still being placed (position not defined) are skipped. Parent transforms of
    the point list are applied.
    """
    points, labels = [], []
    for index in range(point_list_node.GetNumberOfControlPoints()):
        if point_list_node.GetNthControlPointPositionStatus(index) != point_list_node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        point_list_node.GetNthControlPointPositionWorld(index, position)
        points.append(position)
        labels.append(1 if point_list_node.GetNthControlPointSelected(index) else 0)
    return np.asarray(points, dtype=np.float64).reshape(-1, 3), np.asarray(labels, dtype=np.int64)


def prompt_points_node(segmentation_node, segment_id: str, create: bool = True):
    """The point list holding the FastSAM3D clicks of one segment (created on demand).

    Include points are drawn in :data:`INCLUDE_COLOR`, exclude points in :data:`EXCLUDE_COLOR`. The list is
    locked so that clicking near a point never drags it. Returns None when it does not exist and
    ``create`` is False.
    """
    scene = segmentation_node.GetScene()
    key = f"{segmentation_node.GetID()}/{segment_id}"
    for node in _nodes_by_class(scene, "vtkMRMLMarkupsFiducialNode"):
        if node.GetAttribute(PROMPTS_ATTRIBUTE) == key:
            return node
    if not create:
        return None
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    name = f"FastSAM3D points {segment.GetName() if segment else segment_id}"
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    node.SetAttribute(PROMPTS_ATTRIBUTE, key)
    node.SetLocked(True)
    node.SetMarkupLabelFormat("")
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSelectedColor(*INCLUDE_COLOR)
    display.SetColor(*EXCLUDE_COLOR)
    display.SetPointLabelsVisibility(False)
    return node


def add_prompt_point(point_list_node, ras, include: bool) -> int:
    """Append a click at world RAS ``ras``; returns its index. Polarity is the point's *selected* flag."""
    position = [float(v) for v in np.asarray(ras, dtype=np.float64).reshape(3)]
    index = point_list_node.AddControlPointWorld(vtk.vtkVector3d(*position), "")
    point_list_node.SetNthControlPointSelected(index, bool(include))
    point_list_node.SetNthControlPointDescription(index, "include" if include else "exclude")
    point_list_node.SetNthControlPointLocked(index, True)
    return index


def remove_last_prompt_point(point_list_node) -> bool:
    """Remove the newest click; False when there was none."""
    count = point_list_node.GetNumberOfControlPoints()
    if count == 0:
        return False
    point_list_node.RemoveNthControlPoint(count - 1)
    return True


def _nodes_by_class(scene, class_name):
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


# ------------------------------------------------------------------------------------------------------
# Segment Editor settings and editors


@dataclass
class EditorSettings:
    """The Segment Editor settings that decide where an edit may change voxels (its defaults are Slicer's).

    ``mask_mode``: one of :data:`MASK_MODES` ("everywhere", "inside_all_segments", "inside_visible_segments",
    "outside_all_segments", "outside_visible_segments", "inside_segment" with ``mask_segment_id``).
    ``overwrite``: which other segments lose the voxels the edit adds: "all", "visible" or "none".
    ``intensity_range``: ``(low, high)`` source-volume intensities that may be edited, or None for any.
    """

    mask_mode: str = "everywhere"
    mask_segment_id: Optional[str] = None
    overwrite: str = "all"
    intensity_range: Optional[Tuple[float, float]] = None

    def __post_init__(self):
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {sorted(MASK_MODES)}, got {self.mask_mode!r}")
        if self.overwrite not in OVERWRITE_MODES:
            raise ValueError(f"overwrite must be one of {sorted(OVERWRITE_MODES)}, got {self.overwrite!r}")
        if self.mask_mode == "inside_segment" and not self.mask_segment_id:
            raise ValueError("mask_mode 'inside_segment' needs mask_segment_id")
        if self.intensity_range is not None:
            low, high = (float(v) for v in self.intensity_range)
            self.intensity_range = (low, high)

    @classmethod
    def from_node(cls, editor_node) -> "EditorSettings":
        """The settings of a ``vtkMRMLSegmentEditorNode`` (the Segment Editor's parameter node)."""
        mask_mode = {v: k for k, v in MASK_MODES.items()}[editor_node.GetMaskMode()]
        overwrite = {v: k for k, v in OVERWRITE_MODES.items()}[editor_node.GetOverwriteMode()]
        intensity = tuple(editor_node.GetSourceVolumeIntensityMaskRange()) \
            if editor_node.GetSourceVolumeIntensityMask() else None
        return cls(mask_mode, editor_node.GetMaskSegmentID() or None, overwrite, intensity)

    def apply_to(self, editor_node) -> None:
        """Copy these settings into a ``vtkMRMLSegmentEditorNode``."""
        editor_node.SetMaskMode(MASK_MODES[self.mask_mode])
        editor_node.SetMaskSegmentID(self.mask_segment_id or "")
        editor_node.SetOverwriteMode(OVERWRITE_MODES[self.overwrite])
        editor_node.SetSourceVolumeIntensityMask(self.intensity_range is not None)
        if self.intensity_range is not None:
            editor_node.SetSourceVolumeIntensityMaskRange(*self.intensity_range)


class LogicEditor:
    """A Segment Editor without a GUI: ``vtkSlicerSegmentEditorLogic`` on a private, unsaved parameter node.

    Keep one for a series of edits of the same segmentation so that :meth:`undo`/:meth:`redo` work across
    them; :meth:`close` (or a ``with`` block) removes its parameter node from the scene.
    """

    def __init__(self, scene, settings: Optional[EditorSettings] = None, undo_states: int = 10) -> None:
        self.scene = scene
        self._errors = []
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetVerbose(True)  # report failures as ErrorEvents (observed below), never silently
        self._observer = self.logic.AddObserver(vtk.vtkCommand.ErrorEvent, self._on_error)
        node = _SEN()
        node.SetName(scene.GenerateUniqueName("FastSAM3D editor settings"))
        node.SetHideFromEditors(True)
        node.SetSaveWithScene(False)
        self.node = scene.AddNode(node)
        self.logic.SetSegmentEditorNode(self.node)
        self.logic.SetMaximumNumberOfUndoStates(undo_states)
        (settings or EditorSettings()).apply_to(self.node)

    def _on_error(self, caller, event, calldata=None):
        message = str(calldata) if calldata is not None else "Segment Editor logic error"
        if not any(benign in message for benign in _BENIGN_LOGIC_ERRORS):
            self._errors.append(message)

    _on_error.CallDataType = vtk.VTK_STRING

    # --- the interface write_region uses
    def prepare(self, segmentation_node, source_volume_node, segment_id: str, settings) -> None:
        """Point the logic at these nodes and settings (keeps the undo history while the nodes stay)."""
        if isinstance(settings, EditorSettings):
            settings.apply_to(self.node)
        elif settings is not None and settings is not self.node:
            EditorSettings.from_node(settings).apply_to(self.node)
        if self.node.GetSegmentationNode() is not segmentation_node:
            self.logic.SetSegmentationNode(segmentation_node)
        if self.node.GetSourceVolumeNode() is not source_volume_node:
            self.logic.SetSourceVolumeNode(source_volume_node)
        self.logic.SetCurrentSegmentID(segment_id)

    def parameter_node(self):
        return self.node

    def reference_geometry(self):
        return self.logic.GetReferenceGeometryImage() if self.logic.UpdateReferenceGeometryImage() else None

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def modify(self, segmentation_node, segment_id: str, labelmap, mode: int) -> None:
        self.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap, mode, True, False)

    def take_errors(self):
        errors, self._errors = self._errors, []
        return errors

    # --- undo for scripts and tests
    def undo(self) -> None:
        """Restore the segmentation as it was before the last write (Segment Editor undo)."""
        self.logic.Undo()

    def redo(self) -> None:
        self.logic.Redo()

    def can_undo(self) -> bool:
        return bool(self.logic.CanUndo())

    def close(self) -> None:
        """Remove the private parameter node from the scene; the editor cannot be used afterwards."""
        if self.node is not None:
            self.logic.SetSegmentEditorNode(None)
            if self.node.GetScene() is not None:
                self.scene.RemoveNode(self.node)
            self.node = None
        if self._observer is not None:
            self.logic.RemoveObserver(self._observer)
            self._observer = None
            self.logic.SetMRMLScene(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EffectEditor:
    """The editor of a Segment Editor effect (inside Slicer): edits go through the effect's own logic.

    ``scripted_effect`` is ``self.scriptedEffect`` of an ``AbstractScriptedSegmentEditorEffect``. Masking,
    overwrite and intensity settings are those of the Segment Editor (its parameter node), and the edit lands
    on the Segment Editor's undo stack.
    """

    def __init__(self, scripted_effect) -> None:
        self.effect = scripted_effect

    def prepare(self, segmentation_node, source_volume_node, segment_id: str, settings) -> None:
        node = self.effect.parameterSetNode()
        if settings is not None and settings is not node:
            raise ValueError("Inside the Segment Editor the editable area and overwrite settings are the "
                             "Segment Editor's own; do not pass other editor settings.")
        if node.GetSegmentationNode() is not segmentation_node or node.GetSelectedSegmentID() != segment_id:
            raise FastSAM3DError("The segmentation or the selected segment changed while FastSAM3D was "
                                 "working, so that result was not written. Select the segment again and go on.")
        if node.GetSourceVolumeNode() is not source_volume_node:
            raise FastSAM3DError("The source volume changed while FastSAM3D was working, so that result was not "
                                 "written. Click again.")

    def parameter_node(self):
        return self.effect.parameterSetNode()

    def reference_geometry(self):
        return self.effect.referenceGeometryImage()

    def save_state_for_undo(self) -> None:
        self.effect.saveStateForUndo()

    def modify(self, segmentation_node, segment_id: str, labelmap, mode: int) -> None:
        effect_class = getattr(slicer, "qSlicerSegmentEditorAbstractEffect", None)
        if effect_class is not None:  # same values as the logic's enum, typed for PythonQt
            mode = effect_class.ModificationModeAdd if mode == _ADD else effect_class.ModificationModeRemove
        self.effect.modifySegmentByLabelmap(segmentation_node, segment_id, labelmap, mode)

    def take_errors(self):
        return []


# ------------------------------------------------------------------------------------------------------
# writing a region


def write_region(segmentation_node, segment_id: str, source_volume_node, region: Region, mask: np.ndarray,
                 editor_settings=None, *, editor=None) -> None:
    """Make the segment equal ``mask`` inside ``region`` of the source volume grid, as one Segment Editor edit.

    ``region``: ``(slice_k, slice_j, slice_i)`` of the source volume array; ``mask``: bool (or 0/1 integer)
    array of the region's shape. Inside the region the segment becomes exactly ``mask`` (voxels are set
    *and* cleared) wherever the Segment Editor allows editing; outside the region nothing changes. It is what
    a user gets by painting ``mask`` and erasing the rest of the region with the Paint and Erase effects,
    after one saved undo state: the editable area, the editable intensity range and the overwrite mode
    ("modify other segments") apply exactly as they do for them. In particular, as for Erase, a segment's own
    voxels may always be cleared, and with the editable area "inside segment X" cleared voxels go back to X.

    ``editor_settings``: a ``vtkMRMLSegmentEditorNode``, an :class:`EditorSettings`, or None (the editor's
    own settings; Slicer's defaults - edit everywhere, overwrite all other segments, any intensity - for a
    new editor). ``editor``: a :class:`LogicEditor` (reuse one to undo/redo across writes) or an
    :class:`EffectEditor` inside the Segment Editor; None uses a temporary :class:`LogicEditor`.

    If anything fails, the segmentation node is left exactly as it was and the exception propagates
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
        return  # an empty region changes nothing

    own_editor = editor is None
    if own_editor:
        editor = LogicEditor(segmentation_node.GetScene())
    geometry = _GeometryParameter(segmentation_node)
    rollback = None
    try:
        editor.prepare(segmentation_node, source_volume_node, segment_id, settings)
        _check_mask_segment(editor.parameter_node(), segmentation)
        reference = editor.reference_geometry()
        if reference is None:
            raise FastSAM3DError("The segmentation has no geometry; select a source volume in the Segment Editor.")
        to_add, to_remove = _region_modifiers(reference, mask_to_segmentation, bounds, mask)
        editor.take_errors()
        rollback = _Rollback(segmentation_node)
        editor.save_state_for_undo()
        for image, mode in ((to_remove, _REMOVE), (to_add, _ADD)):
            if image is not None and _has_voxels(image):
                editor.modify(segmentation_node, segment_id, image, mode)
        errors = editor.take_errors()
        if errors:
            raise FastSAM3DError("The Segment Editor could not apply the result (" + "; ".join(errors)[:500] +
                                 "). The segment was left unchanged.")
    except BaseException:
        if rollback is not None:
            rollback.restore()
        geometry.restore()
        raise
    finally:
        if rollback is not None:
            rollback.close()
        if own_editor:
            editor.close()


def segment_mask(segmentation_node, segment_id: str, source_volume_node) -> np.ndarray:
    """The segment's voxels on the source volume's grid, (K, J, I) bool, through both nodes' transforms.

    Nearest-neighbour where the segmentation has another voxel lattice (exact on the same lattice).
    """
    _checked_segmentation(segmentation_node, segment_id)
    dims = _checked_source(source_volume_node)
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


class SegmentBaseline:
    """The segment as it was before the first point of a series, so that removing every point restores it.

    Each click makes the segment equal the prediction inside the click's region; when the user then removes
    the last remaining point, the effect writes :meth:`mask_in` of the final region instead of an empty mask,
    so the segment's own earlier voxels come back (other segments' voxels that the prediction overwrote are
    restored by the Segment Editor's undo, Ctrl+Z). Only the bounding box of the segment's voxels is kept.
    """

    def __init__(self, segmentation_node, segment_id: str, source_volume_node) -> None:
        full = segment_mask(segmentation_node, segment_id, source_volume_node)
        self.region: Optional[Region] = None
        self.mask: Optional[np.ndarray] = None
        if full.any():
            nonzero = [np.flatnonzero(full.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
            self.region = tuple(slice(int(n[0]), int(n[-1]) + 1) for n in nonzero)
            self.mask = full[self.region].copy()

    def mask_in(self, region: Region) -> np.ndarray:
        """The baseline segment inside ``region`` (bounded (k, j, i) slices of the source grid), bool."""
        out = np.zeros(tuple(s.stop - s.start for s in region), dtype=bool)
        if self.region is None:
            return out
        lo = [max(r.start, b.start) for r, b in zip(region, self.region)]
        hi = [min(r.stop, b.stop) for r, b in zip(region, self.region)]
        if any(l >= h for l, h in zip(lo, hi)):
            return out
        out[tuple(slice(l - r.start, h - r.start) for l, h, r in zip(lo, hi, region))] = \
            self.mask[tuple(slice(l - b.start, h - b.start) for l, h, b in zip(lo, hi, self.region))]
        return out


def volume_from_node_matrix(volume_node) -> np.ndarray:
    """IJK -> world RAS matrix of a volume node (parent transforms hardened; non-linear refused)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return node_to_world(volume_node) @ _array_from_vtk_matrix(ijk_to_ras)


def _checked_segmentation(segmentation_node, segment_id):
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise FastSAM3DError("Select a segmentation to write the result into.")
    segmentation = segmentation_node.GetSegmentation()
    segment = segmentation.GetSegment(segment_id) if segment_id else None
    if segment is None:
        raise FastSAM3DError(f"Segment '{segment_id}' does not exist in '{segmentation_node.GetName()}'. "
                             "Select or add a segment first.")
    labelmap_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != labelmap_name:
        raise FastSAM3DError(f"'{segmentation_node.GetName()}' is stored as "
                             f"'{segmentation.GetSourceRepresentationName()}', not as a binary labelmap. Open it "
                             "in the Segment Editor once (it offers the conversion), then try again.")
    return segmentation


def _check_mask_segment(editor_node, segmentation) -> None:
    if editor_node.GetMaskMode() == _SN.EditAllowedInsideSingleSegment:
        mask_segment_id = editor_node.GetMaskSegmentID() or ""
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


def _region_modifiers(reference, mask_to_segmentation: np.ndarray, bounds, mask: np.ndarray):
    """(add, remove) labelmaps on the segmentation's grid: voxels the region sets and clears.

    Each is a vtkOrientedImageData covering only the region (clipped to the segmentation's extent), or None
    when the region misses the segmentation's extent altogether.
    """
    reference_to_segmentation = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(reference_to_segmentation)
    grid = _array_from_vtk_matrix(reference_to_segmentation)
    ref_extent = reference.GetExtent()
    mask_ijk_to_grid_ijk = np.linalg.inv(grid) @ mask_to_segmentation
    linear, offset = mask_ijk_to_grid_ijk[:3, :3], mask_ijk_to_grid_ijk[:3, 3]
    start_ijk = np.array([bounds[2].start, bounds[1].start, bounds[0].start])
    stop_ijk = np.array([bounds[2].stop, bounds[1].stop, bounds[0].stop])  # exclusive

    if np.allclose(linear, np.eye(3), atol=_SAME_AXES_TOLERANCE) and \
            np.allclose(offset, np.round(offset), atol=_WHOLE_VOXEL_TOLERANCE):
        # same voxel lattice (the usual case): copy, shifting by whole voxels
        shift = np.round(offset).astype(int)
        lo = np.maximum(start_ijk + shift, [ref_extent[0], ref_extent[2], ref_extent[4]])
        hi = np.minimum(stop_ijk - 1 + shift, [ref_extent[1], ref_extent[3], ref_extent[5]])
        if np.any(lo > hi):
            return None, None
        crop = tuple(slice(lo[a] - shift[a] - start_ijk[a], hi[a] - shift[a] - start_ijk[a] + 1) for a in (2, 1, 0))
        inside = mask[crop]
        footprint = np.ones_like(inside)
    else:
        # another lattice (oversampled segmentation, other reference volume): nearest-neighbour resampling
        corners = np.array([[x, y, z] for x in (start_ijk[0] - 0.5, stop_ijk[0] - 0.5)
                            for y in (start_ijk[1] - 0.5, stop_ijk[1] - 0.5)
                            for z in (start_ijk[2] - 0.5, stop_ijk[2] - 0.5)])
        mapped = corners @ linear.T + offset
        lo = np.maximum(np.floor(mapped.min(axis=0)).astype(int), [ref_extent[0], ref_extent[2], ref_extent[4]])
        hi = np.minimum(np.ceil(mapped.max(axis=0)).astype(int), [ref_extent[1], ref_extent[3], ref_extent[5]])
        if np.any(lo > hi):
            return None, None
        extent = [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]]
        source_extent = [start_ijk[0], stop_ijk[0] - 1, start_ijk[1], stop_ijk[1] - 1, start_ijk[2], stop_ijk[2] - 1]
        target = _oriented_image(None, grid, extent)
        inside, footprint = (
            _resampled(_oriented_image(values, mask_to_segmentation, source_extent), target, extent)
            for values in (mask, np.ones(mask.shape, np.uint8)))
        inside &= footprint.astype(bool)
    extent = [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]]
    to_add = _oriented_image(inside, grid, extent)
    to_remove = _oriented_image(footprint.astype(bool) & ~inside.astype(bool), grid, extent)
    return to_add, to_remove


def _resampled(image, target, extent) -> np.ndarray:
    output = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, target, output, False, False):
        raise FastSAM3DError("Could not map the result onto the segmentation's grid.")
    return _array_in_extent(output, extent).astype(bool)


def _has_voxels(image) -> bool:
    return bool(_image_array(image).any())


class _Rollback:
    """A private snapshot of the segmentation (Slicer's own segmentation history) to undo a failed write."""

    def __init__(self, segmentation_node) -> None:
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetMaximumNumberOfStates(2)
        self.history.SetSegmentation(segmentation_node.GetSegmentation())
        self.history.SaveState()

    def restore(self) -> None:
        if self.history.IsRestorePreviousStateAvailable():
            self.history.RestorePreviousState()

    def close(self) -> None:
        self.history.SetSegmentation(None)


# ------------------------------------------------------------------------------------------------------
# batch use

Predictor = Callable[[Volume, np.ndarray, np.ndarray], object]


def segment_volume_node(volume_node, points_ras, labels=None, segmentation_node=None,
                        segment_name: str = "FastSAM3D", model: str = "fastsam3d",
                        predictor: Optional[Predictor] = None, editor_settings=None, device: str = "auto"):
    """Segment one object of ``volume_node`` from clicks and write it into a segment; returns (node, segment ID).

    ``points_ras``: (N, 3) world RAS clicks in the order a user would click them (the first must be an include
    point); ``labels``: N values, 1 = include, 0 = exclude (default: all include). ``segmentation_node``:
    where to write (default: a new segmentation named after the volume); the segment named ``segment_name`` is
    reused if it exists, else added. ``predictor(volume, points_ras, labels)`` returns ``(region, mask)`` (or an
    object with ``.region`` and ``.mask``); the default runs ``model`` on ``device`` ("auto", "cuda", "cpu",
    "mps") with an :class:`~FastSAM3DLib.session.InteractiveSession`. ``editor_settings``: see
    :func:`write_region` (default: the Segment Editor's defaults, so voxels the result takes are removed from
    other segments; pass ``EditorSettings(overwrite="none")`` to keep them). A failure leaves the scene as it
    was. Example for the Slicer Python console::

        from FastSAM3DLib.scene import segment_volume_node
        clicks = {"CTChest": [[-40.0, 20.0, -110.0]], "CTLiver": [[-60.0, 15.0, 30.0]]}
        for name, points in clicks.items():
            volume = slicer.util.getNode(name)
            segmentation, segment_id = segment_volume_node(volume, points, segment_name="lesion")
            slicer.util.saveNode(segmentation, f"/tmp/{name}.seg.nrrd")
    """
    points = np.asarray(points_ras, dtype=np.float64)
    if points.ndim == 1 and points.size == 3:
        points = points[None]
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0 or not np.all(np.isfinite(points)):
        raise PromptError(f"points_ras must be N x 3 finite RAS coordinates (got shape {points.shape}).")
    labels = np.ones(len(points), np.int64) if labels is None else np.asarray(labels).astype(np.int64).ravel()
    if labels.shape != (len(points),) or not np.isin(labels, (0, 1)).all():
        raise PromptError("labels must hold one 1 (include) or 0 (exclude) per point.")
    if not labels.any():
        raise PromptError("Give at least one include point (label 1) inside the object.")
    volume = volume_from_node(volume_node)
    predict = predictor or session_predictor(model, device=device)
    result = predict(volume, points, labels)
    region, mask = (result.region, result.mask) if hasattr(result, "region") else tuple(result)[:2]
    _checked_mask(mask, _checked_region(region, volume.shape[::-1]))  # a bad result adds nothing to the scene

    scene = volume_node.GetScene()
    created_node = segmentation_node is None
    if created_node:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                    scene.GenerateUniqueName(f"{volume_node.GetName()} FastSAM3D"))
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(segment_name)
    created_segment = not segment_id
    try:
        if created_segment:
            segment_id = segmentation.AddEmptySegment("", segment_name)
            segment = segmentation.GetSegment(segment_id)
            segment.SetNameAutoGenerated(False)
        write_region(segmentation_node, segment_id, volume_node, region, mask, editor_settings)
        segmentation.GetSegment(segment_id).SetTag(MODEL_TAG, model if predictor is None else "custom predictor")
    except BaseException:
        if created_node:
            _remove_with_display_nodes(scene, segmentation_node)
        elif created_segment and segment_id:
            segmentation.RemoveSegment(segment_id)
        raise
    return segmentation_node, segment_id


def _remove_with_display_nodes(scene, node) -> None:
    display_nodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    scene.RemoveNode(node)
    for display_node in display_nodes:
        if display_node is not None and display_node.GetScene() is not None:
            scene.RemoveNode(display_node)


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" if available, else "mps" if available, else "cpu"; other names are returned checked."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FastSAM3DError("CUDA was requested but this PyTorch has no usable CUDA GPU. Choose 'auto' or "
                             "'cpu', or reinstall PyTorch with CUDA support (PyTorch Util module).")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FastSAM3DError("Apple MPS was requested but is not available here. Choose 'auto' or 'cpu'.")
    return device


@functools.lru_cache(maxsize=1)
def load_model(model: str = "fastsam3d", device: str = "cpu", checkpoint: str = "cached"):
    """Build ``model`` on ``device`` (a resolved name, see :func:`resolve_device`) with its cached weights.

    The last model built is kept, so a loop over volumes or a series of clicks loads the weights once.
    """
    from .registry import build_model

    return build_model(model, checkpoint=checkpoint, device=device)


def session_predictor(model: str = "fastsam3d", device: str = "auto", prompt_mode: Optional[str] = None,
                      checkpoint: str = "cached") -> Predictor:
    """The default predictor: a fresh :class:`InteractiveSession` per volume, clicks fed in order.

    The model is built once and kept for the next call with the same model and device.
    """

    def predict(volume: Volume, points_ras: Sequence, labels: Sequence):
        from .session import InteractiveSession

        session = InteractiveSession(load_model(model, resolve_device(device), checkpoint), volume,
                                     prompt_mode=prompt_mode)
        return replay_clicks(session, points_ras, labels)

    return predict


def replay_clicks(session, points_ras, labels):
    """Bring an :class:`~FastSAM3DLib.session.InteractiveSession` to exactly these clicks; return the last result.

    The point list is the user's record of the clicks: one more point than the session knows is a new click
    (``add_click``), one fewer is an undone click (``undo``); any other difference (points edited or removed
    elsewhere, a new session) resets the session and feeds every point again, in order. Returns None when
    nothing had to change or no point is left (then the session is empty).
    """
    wanted = [(np.asarray(p, dtype=np.float64).reshape(3), bool(label))
              for p, label in zip(np.asarray(points_ras, dtype=np.float64).reshape(-1, 3), labels)]
    known = [(np.asarray(c.ras, dtype=np.float64), bool(c.include)) for c in session.clicks]

    def same(a, b):
        return len(a) == len(b) and all(x[1] == y[1] and np.allclose(x[0], y[0], atol=1e-6) for x, y in zip(a, b))

    if same(known, wanted):
        return None
    if len(known) == len(wanted) + 1 and same(known[:-1], wanted):
        return session.undo()
    if len(known) + 1 == len(wanted) and same(known, wanted[:-1]):
        return session.add_click(wanted[-1][0], include=wanted[-1][1])
    session.reset()
    result = None
    for ras, include in wanted:
        result = session.add_click(ras, include=include)
    return result
