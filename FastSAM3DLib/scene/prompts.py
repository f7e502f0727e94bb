"""The FastSAM3D clicks of a segment, kept as a markups point list in the scene (one list per segment)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import vtk

from .nodes import _nodes_by_class

INCLUDE_COLOR = (0.20, 0.85, 0.25)  # include points: the markups "selected" colour
EXCLUDE_COLOR = (0.95, 0.20, 0.20)  # exclude points: the markups (unselected) colour
PROMPTS_ATTRIBUTE = "FastSAM3D.PromptsFor"  # "<segmentation node ID>/<segment ID>" on a prompt point list


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
