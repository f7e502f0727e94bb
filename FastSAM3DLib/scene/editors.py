"""Segment Editor settings and the two editors a write goes through (a private logic, or the effect's own)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import slicer
import vtk

from ..errors import FastSAM3DError

#: The MRML classes whose enums name the masking and overwrite modes.
SegmentEditorNode = slicer.vtkMRMLSegmentEditorNode
SegmentationNode = slicer.vtkMRMLSegmentationNode
MASK_MODES = {
    "everywhere": SegmentationNode.EditAllowedEverywhere,
    "inside_all_segments": SegmentationNode.EditAllowedInsideAllSegments,
    "inside_visible_segments": SegmentationNode.EditAllowedInsideVisibleSegments,
    "outside_all_segments": SegmentationNode.EditAllowedOutsideAllSegments,
    "outside_visible_segments": SegmentationNode.EditAllowedOutsideVisibleSegments,
    "inside_segment": SegmentationNode.EditAllowedInsideSingleSegment,
}
OVERWRITE_MODES = {
    "all": SegmentEditorNode.OverwriteAllSegments,
    "visible": SegmentEditorNode.OverwriteVisibleSegments,
    "none": SegmentEditorNode.OverwriteNone,
}
#: The Segment Editor logic's modification modes: add the mask to the segment, or remove it.
MODIFY_ADD = slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd
MODIFY_REMOVE = slicer.vtkSlicerSegmentEditorLogic.ModificationModeRemove

NO_MASK_SEGMENT = ("The editable area is 'inside a segment', but no segment is chosen, so nothing could change. "
                   "Choose the segment (or another editable area) in the Segment Editor's Masking section.")

# Errors the logic reports after a successful edit (it could not re-parent the segmentation in the subject
# hierarchy, e.g. for nodes that have no subject hierarchy item); they do not affect the segment.
_BENIGN_LOGIC_ERRORS = ("Subject hierarchy items not found",)


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
        """The settings of a ``vtkMRMLSegmentEditorNode`` (the Segment Editor's parameter node).

        FastSAM3DError when its editable area is "inside a segment" that it does not name (Slicer would allow no
        edit at all there).
        """
        mask_mode = {v: k for k, v in MASK_MODES.items()}[editor_node.GetMaskMode()]
        if mask_mode == "inside_segment" and not editor_node.GetMaskSegmentID():
            raise FastSAM3DError(NO_MASK_SEGMENT)
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
        node = SegmentEditorNode()
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
        """The Segment Editor parameter node whose masking and overwrite settings the write honours."""
        return self.node

    def reference_geometry(self):
        """The segmentation's reference geometry as an image (the grid edits are made on), or None."""
        return self.logic.GetReferenceGeometryImage() if self.logic.UpdateReferenceGeometryImage() else None

    def save_state_for_undo(self) -> None:
        """Record the segmentation as it is now: the next edit becomes one undo step."""
        self.logic.SaveStateForUndo()

    def modify(self, segmentation_node, segment_id: str, labelmap, mode: int) -> None:
        """Add (``mode`` set) or remove (erase) ``labelmap``'s voxels in the segment, as Paint and Erase do."""
        self.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap, mode, True, False)

    def take_errors(self):
        """The logic's error messages since the last call (benign ones left out); the list is emptied."""
        errors, self._errors = self._errors, []
        return errors

    # --- undo for scripts and tests
    def undo(self) -> None:
        """Restore the segmentation as it was before the last write (Segment Editor undo)."""
        self.logic.Undo()

    def redo(self) -> None:
        """Apply the last undone write again (Segment Editor redo)."""
        self.logic.Redo()

    def can_undo(self) -> bool:
        """Whether there is a write to undo."""
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
        """Check that the Segment Editor still shows these nodes and this segment (the user may have changed them
        while the model worked); its own settings apply, so other ``settings`` are refused."""
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
        """The Segment Editor's own parameter node."""
        return self.effect.parameterSetNode()

    def reference_geometry(self):
        """The Segment Editor's reference geometry image."""
        return self.effect.referenceGeometryImage()

    def save_state_for_undo(self) -> None:
        """Record an undo state on the Segment Editor's own stack (Ctrl+Z there undoes the write)."""
        self.effect.saveStateForUndo()

    def modify(self, segmentation_node, segment_id: str, labelmap, mode: int) -> None:
        """Add or remove ``labelmap``'s voxels through the effect, as :meth:`LogicEditor.modify`."""
        effect_class = getattr(slicer, "qSlicerSegmentEditorAbstractEffect", None)
        if effect_class is not None:  # same values as the logic's enum, typed for PythonQt
            mode = effect_class.ModificationModeAdd if mode == MODIFY_ADD else effect_class.ModificationModeRemove
        self.effect.modifySegmentByLabelmap(segmentation_node, segment_id, labelmap, mode)

    def take_errors(self):
        """Always empty: the effect's logic belongs to the Segment Editor, whose error events this editor does not
        observe (Slicer logs them)."""
        return []
