"""The FastSAM3D clicks of a segment, kept as a markups point list in the scene (one list per segment)."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import numpy as np
import vtk

from ..errors import FastSAM3DError
from .nodes import nodes_by_class

INCLUDE_COLOR = (0.20, 0.85, 0.25)  # include points: the markups "selected" colour
EXCLUDE_COLOR = (0.95, 0.20, 0.20)  # exclude points: the markups (unselected) colour
PROMPTS_ATTRIBUTE = "FastSAM3D.PromptsForSegment"  # the segment ID, on a prompt point list
SEGMENTATION_ROLE = "FastSAM3DPromptsSegmentation"  # node reference from a prompt list to its segmentation
INCLUDE, EXCLUDE = "include", "exclude"  # a prompt point's description: its polarity


def ras_points_from_markups(point_list_node) -> Tuple[np.ndarray, np.ndarray]:
    """World-RAS positions (N, 3) and labels (N,) of a point list's defined control points.

    A point's label is 1 (include) or 0 (exclude): the polarity FastSAM3D wrote in the point's description
    when there is one (so "select all" in the Markups module cannot change it), otherwise the *selected* flag
    (drawn in the include colour). Points still being placed (position not defined) are skipped. Parent
    transforms of the point list are applied.
    """
    points, labels = [], []
    for index in range(point_list_node.GetNumberOfControlPoints()):
        if point_list_node.GetNthControlPointPositionStatus(index) != point_list_node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        point_list_node.GetNthControlPointPositionWorld(index, position)
        points.append(position)
        labels.append(1 if _includes(point_list_node, index) else 0)
    return np.asarray(points, dtype=np.float64).reshape(-1, 3), np.asarray(labels, dtype=np.int64)


def prompt_point_nodes(segmentation_node) -> List:
    """Every FastSAM3D prompt list of ``segmentation_node`` (one per segment that has been clicked)."""
    scene = segmentation_node.GetScene()
    if scene is None:
        return []
    return [node for node in nodes_by_class(scene, "vtkMRMLMarkupsFiducialNode")
            if node.GetAttribute(PROMPTS_ATTRIBUTE) is not None
            and node.GetNodeReference(SEGMENTATION_ROLE) is segmentation_node]


def prompt_points_node(segmentation_node, segment_id: str, create: bool = True):
    """The point list holding the FastSAM3D clicks of one segment (created on demand).

    The list refers to its segmentation by a node reference (kept right when a scene is imported and node IDs
    change) and names its segment in an attribute. It is hidden from node selectors, locked (clicking near
    a point never drags it), and creating it leaves the user's active place list as it was: Slicer's markups
    logic makes every new point list the active one, which would send the user's next landmark into it.
    Include points are drawn in :data:`INCLUDE_COLOR`, exclude points in :data:`EXCLUDE_COLOR`. Returns None
    when it does not exist and ``create`` is False.
    """
    for node in prompt_point_nodes(segmentation_node):
        if node.GetAttribute(PROMPTS_ATTRIBUTE) == segment_id:
            return node
    if not create:
        return None
    scene = segmentation_node.GetScene()
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:  # a hidden point list for nothing would stay in the scene
        raise FastSAM3DError(f"Segment '{segment_id}' does not exist in '{segmentation_node.GetName()}'. "
                             "Select or add a segment first.")
    name = f"FastSAM3D points {segment.GetName()}"
    with _active_place_node_kept(scene):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", scene.GenerateUniqueName(name))
    node.SetHideFromEditors(True)
    node.SetAttribute(PROMPTS_ATTRIBUTE, segment_id)
    node.SetNodeReferenceID(SEGMENTATION_ROLE, segmentation_node.GetID())
    node.SetLocked(True)
    node.SetMarkupLabelFormat("")
    with _active_place_node_kept(scene):
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSelectedColor(*INCLUDE_COLOR)
    display.SetColor(*EXCLUDE_COLOR)
    display.SetPointLabelsVisibility(False)
    return node


def remove_orphan_prompt_lists(scene) -> int:
    """Remove the prompt lists whose segmentation node was removed (with their display nodes); returns how many.
    They are hidden, so nobody else would, and a saved scene would keep them. The list of a removed segment
    stays while its segmentation does: the Segment Editor's Ctrl+Z brings the segment back under its ID."""
    removed = 0
    for node in nodes_by_class(scene, "vtkMRMLMarkupsFiducialNode"):
        if node.GetAttribute(PROMPTS_ATTRIBUTE) is None or node.GetNodeReference(SEGMENTATION_ROLE) is not None:
            continue
        for index in range(node.GetNumberOfDisplayNodes()):
            display = node.GetNthDisplayNode(index)
            if display is not None:
                scene.RemoveNode(display)
        scene.RemoveNode(node)
        removed += 1
    return removed


@contextlib.contextmanager
def _active_place_node_kept(scene):
    """Restore every selection node's active place node (ID and class) as it was before the block."""
    selections = [(node, node.GetActivePlaceNodeID(), node.GetActivePlaceNodeClassName())
                  for node in nodes_by_class(scene, "vtkMRMLSelectionNode")]
    try:
        yield
    finally:
        for node, place_id, place_class in selections:
            if node.GetActivePlaceNodeID() != place_id or node.GetActivePlaceNodeClassName() != place_class:
                node.SetActivePlaceNodeID(place_id)
                node.SetActivePlaceNodeClassName(place_class)


def add_prompt_point(point_list_node, ras, include: bool) -> int:
    """Append a click at world RAS ``ras``; returns its index. Polarity: the description (colour: *selected*)."""
    position = [float(v) for v in np.asarray(ras, dtype=np.float64).reshape(3)]
    index = point_list_node.AddControlPointWorld(vtk.vtkVector3d(*position), "")
    point_list_node.SetNthControlPointSelected(index, bool(include))
    point_list_node.SetNthControlPointDescription(index, INCLUDE if include else EXCLUDE)
    point_list_node.SetNthControlPointLocked(index, True)
    return index


def remove_last_prompt_point(point_list_node) -> Optional[Tuple[List[float], bool]]:
    """Remove the newest click; its (world RAS, include), which :func:`add_prompt_point` puts back; None when
    there was none."""
    count = point_list_node.GetNumberOfControlPoints()
    if count == 0:
        return None
    position = [0.0, 0.0, 0.0]
    point_list_node.GetNthControlPointPositionWorld(count - 1, position)
    include = _includes(point_list_node, count - 1)
    point_list_node.RemoveNthControlPoint(count - 1)
    return position, include


def _includes(point_list_node, index: int) -> bool:
    """A point's polarity: the one FastSAM3D wrote in its description, else its *selected* flag."""
    polarity = point_list_node.GetNthControlPointDescription(index)
    return polarity == INCLUDE if polarity in (INCLUDE, EXCLUDE) else bool(
        point_list_node.GetNthControlPointSelected(index))


def show_polarity(point_list_node) -> None:
    """Make each prompt point's colour (its *selected* flag) match its polarity again, e.g. after the user
    pressed "select all" in the Markups module."""
    for index in range(point_list_node.GetNumberOfControlPoints()):
        polarity = point_list_node.GetNthControlPointDescription(index)
        include = polarity == INCLUDE
        if polarity in (INCLUDE, EXCLUDE) and point_list_node.GetNthControlPointSelected(index) != include:
            point_list_node.SetNthControlPointSelected(index, include)
