"""Scene adapter: the only part of the library that talks to Slicer's MRML scene (no Qt, no threads).

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
* :func:`segment_mask` - a segment's voxels on the source grid. :class:`SegmentBaseline` /
  :class:`TakenVoxels` - what a series of points changed: the segment before its first point (removing every
  point gives it back) and the voxels the series took from other segments (given back where a later result
  leaves them empty).
* :func:`segment_volume_node` - the batch call for the Slicer Python console.

The write goes through an *editor*: :class:`LogicEditor` (a Segment Editor logic of its own, for scripts,
batch use and tests) or :class:`EffectEditor` (the Segment Editor effect's own logic, inside Slicer, so that
Ctrl+Z in the Segment Editor undoes the edit).

One module per responsibility: :mod:`.nodes` (matrices, transforms, volumes), :mod:`.prompts` (the click
point lists), :mod:`.editors` (settings and editors), :mod:`.target_checks` (refusing a bad target or result
before anything is written), :mod:`.writing` (one edit of the box a result changes), :mod:`.rollback` (a failed
write leaves the segmentation as it was), :mod:`.reading` (a segment on the source grid), :mod:`.oriented_images`
(voxels of VTK images over extents), :mod:`.series` (what a series of points changed), :mod:`.batch` (the console
call and model loading).
"""
from .batch import MODEL_TAG, Predictor, load_model, replay_clicks, resolve_device, segment_volume_node, \
    session_predictor, slicer_cache_dir
from .editors import MASK_MODES, OVERWRITE_MODES, EditorSettings, EffectEditor, LogicEditor
from .nodes import node_to_world, volume_from_node, volume_from_node_matrix
from .prompts import EXCLUDE_COLOR, INCLUDE_COLOR, add_prompt_point, prompt_point_nodes, prompt_points_node, \
    ras_points_from_markups, remove_last_prompt_point, remove_orphan_prompt_lists, show_polarity
from .series import SegmentBaseline, TakenVoxels, region_on
from .reading import segment_mask
from .writing import Region, write_region

__all__ = ["MODEL_TAG", "Predictor", "load_model", "replay_clicks", "resolve_device", "segment_volume_node",
           "session_predictor", "slicer_cache_dir", "MASK_MODES", "OVERWRITE_MODES", "EditorSettings", "EffectEditor",
           "LogicEditor", "node_to_world", "volume_from_node", "volume_from_node_matrix", "EXCLUDE_COLOR",
           "INCLUDE_COLOR", "add_prompt_point", "prompt_point_nodes", "prompt_points_node", "show_polarity",
           "ras_points_from_markups", "remove_last_prompt_point", "remove_orphan_prompt_lists", "Region",
           "SegmentBaseline", "TakenVoxels", "region_on", "segment_mask", "write_region"]
