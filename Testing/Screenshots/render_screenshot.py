#!/usr/bin/env python
"""Render the extension-catalog screenshot offscreen with 3D Slicer's own core (no Slicer GUI needed).

The catalog entry (CMakeLists.txt EXTENSION_SCREENSHOTURLS, fastsam3d.s4ext, FastSAM3D.json) points at
``Resources/Screenshots/FastSAM3D.png``. The full Slicer application cannot run on a headless build machine,
but the ``slicer-core`` wheel contains Slicer's MRML scene, module logics and displayable managers, and the
PyPI ``vtk`` wheel renders offscreen through EGL (Mesa llvmpipe works; no GPU or X server is needed).
This script uses them to build a real MRML scene and draw it the way Slicer's views draw it:

* the CT volume (storage node read, window/level 400/40 by default);
* the label file imported into a ``vtkMRMLSegmentationNode`` as one segment (every nonzero voxel), named
  "right kidney (FastSAM3D)" by default, shown with fill and outline in the slice views;
* the click prompts as one ``vtkMRMLMarkupsFiducialNode``: include points green, exclude points red
  (the point's Selected flag carries the polarity, as in the FastSAM3D effect);
* Red/Yellow/Green slice views (axial, coronal, sagittal) through the first include point, rendered by
  ``vtkMRMLSliceLogic`` plus the Segmentations2D and Markups displayable managers; Slicer's standard
  orientation presets are used, so the axial view has anterior up and patient right on the image left;
* optionally a 3D view of the segment's closed-surface representation (Segmentations3D, Markups and
  Camera displayable managers);

and composes them side by side with a caption bar into one PNG (1200x400, or 1600x400 with the 3D view).

Usage (from the repository root)::

    .venv/bin/python Testing/Screenshots/render_screenshot.py \\
        --volume CT.nii.gz --label result_label.nii.gz --points points.json \\
        --output Resources/Screenshots/FastSAM3D.png

``--points`` is JSON in RAS millimetres: ``{"include": [[R, A, S], ...], "exclude": [[R, A, S], ...]}``.
The label may be any volume file Slicer reads (NIfTI, NRRD, ...) whose nonzero voxels are the result,
or a ``.seg.nrrd`` (its first segment is used). Run ``--help`` for the optional settings.

Requirements: slicer-core (>= 5.10), vtk (>= 9.4 wheel), numpy; an EGL-capable OpenGL (Debian: libegl1,
libegl-mesa0, libgl1-mesa-dri). ``VTK_DEFAULT_OPENGL_WINDOW`` defaults to ``vtkEGLRenderWindow`` here; set it
to another render-window *class name* (e.g. ``vtkXOpenGLRenderWindow``) to override.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

# Must be set before vtk is imported. A non-class-name value makes VTK fall back to OSMesa (segfault if absent).
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import numpy as np  # noqa: E402
import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

CAPTION = "FastSAM3D for 3D Slicer \u2014 slice views rendered by Slicer's core (MRML displayable managers)"
KIDNEY_COLOR = (185 / 255, 102 / 255, 83 / 255)  # "kidney" in Slicer's GenericAnatomyColors
INCLUDE_COLOR = (0.15, 0.85, 0.2)
EXCLUDE_COLOR = (0.95, 0.15, 0.15)
HEADER_H = 20  # slice-controller-like bar above each view
CAPTION_H = 24
VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))  # Slicer's conventional layout
SLICE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager")
THREED_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                   "vtkMRMLModelDisplayableManager", "vtkMRMLSegmentationsDisplayableManager3D",
                   "vtkMRMLMarkupsDisplayableManager")


# ------------------------------------------------------------------------------------------------------
# a Qt-free "application": scene + application logic + the module logics the nodes need

class HeadlessSlicer:
    """Scene, application logic and module logics. Keep this object alive while the scene is in use:
    logics that are garbage-collected while still observing the scene make later calls crash."""

    def __init__(self):
        self.scene = slicer.vtkMRMLScene()
        crosshair = slicer.vtkMRMLCrosshairNode()
        crosshair.SetCrosshairName("default")
        self.scene.AddNode(crosshair)

        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        color_logic = self.app_logic.GetColorLogic()
        color_logic.SetMRMLScene(self.scene)
        color_logic.AddDefaultColorNodes()
        self.app_logic.SetModuleLogic("Colors", color_logic)
        self.app_logic.SetSliceLogics(vtk.vtkCollection())
        self.app_logic.SetViewLogics(vtk.vtkCollection())

        self.logics = {}
        for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic),
                          ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),  # registers converters
                          ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                          ("Markups", slicer.vtkSlicerMarkupsLogic)):
            logic = cls()
            logic.SetMRMLScene(self.scene)
            logic.SetMRMLApplicationLogic(self.app_logic)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(self.scene, True)

        # slicer.util helpers read these globals at call time
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            volumes=types.SimpleNamespace(logic=lambda: self.logics["Volumes"]),
            segmentations=types.SimpleNamespace(logic=lambda: self.logics["Segmentations"]),
            markups=types.SimpleNamespace(logic=lambda: self.logics["Markups"]))
        self.views = []  # keeps render windows and displayable managers alive too
        self.slice_nodes = {}


# ------------------------------------------------------------------------------------------------------
# loading

def load_volume(app, path, window, level):
    volume = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", _node_name(path))
    storage = app.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(volume):
        raise SystemExit(f"could not read volume {path}")
    volume.SetAndObserveStorageNodeID(storage.GetID())
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(window, level)
    return volume


def load_segmentation(app, path, volume, segment_name, color):
    """A segmentation node with one segment: the nonzero voxels of a label volume, or the first segment of
    a .seg.nrrd file."""
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FastSAM3D")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        storage = slicer.vtkMRMLSegmentationStorageNode()
        app.scene.AddNode(storage)
        storage.SetFileName(str(path))
        if not storage.ReadData(segmentation) or segmentation.GetSegmentation().GetNumberOfSegments() == 0:
            raise SystemExit(f"could not read a segment from {path}")
        seg = segmentation.GetSegmentation()
        for segment_id in list(seg.GetSegmentIDs())[1:]:
            seg.RemoveSegment(segment_id)
        segment_id = seg.GetNthSegmentID(0)
        segment = seg.GetSegment(segment_id)
        segment.SetName(segment_name)
        segment.SetColor(*color)
    else:
        label = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", _node_name(path))
        storage = app.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(label):
            raise SystemExit(f"could not read label {path}")
        mask = slicer.util.arrayFromVolume(label) != 0
        if not mask.any():
            raise SystemExit(f"label {path} has no nonzero voxel")
        slicer.util.updateVolumeFromArray(label, mask.astype(np.uint8))
        image = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(label)
        segment_id = segmentation.GetSegmentation().AddEmptySegment("", segment_name, list(color))
        ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            image, segmentation, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE,
            image.GetExtent())
        if not ok:
            raise SystemExit(f"could not import {path} into a segment")
        app.scene.RemoveNode(label)
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)

    segmentation.CreateDefaultDisplayNodes()
    display = segmentation.GetDisplayNode()
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DFill(0.5)
    display.SetOpacity2DOutline(1.0)
    display.SetSliceIntersectionThickness(2)
    return segmentation, segment_id


def load_points(app, path):
    """One point list; Selected = include (green), unselected = exclude (red)."""
    prompts = json.loads(Path(path).read_text())
    include = [list(map(float, p)) for p in prompts.get("include", [])]
    exclude = [list(map(float, p)) for p in prompts.get("exclude", [])]
    if not include and not exclude:
        raise SystemExit(f"{path} has no include or exclude point")
    node = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "FastSAM3D prompts")
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetSelectedColor(*INCLUDE_COLOR)
    display.SetColor(*EXCLUDE_COLOR)
    display.SetActiveColor(*INCLUDE_COLOR)
    display.SetGlyphTypeFromString("Sphere3D")
    display.SetGlyphScale(2.5)
    display.SetTextScale(3.0)
    display.SetSliceProjection(True)  # points off the displayed slice still show, faded
    display.SetSliceProjectionUseFiducialColor(True)
    display.SetSliceProjectionOpacity(0.6)
    for points, positive, sign in ((include, True, "+"), (exclude, False, "-")):
        for n, ras in enumerate(points, 1):
            index = node.AddControlPointWorld(vtk.vtkVector3d(*ras), f"{sign}{n}")
            node.SetNthControlPointSelected(index, positive)
            node.SetNthControlPointDescription(index, "include" if positive else "exclude")
            node.SetNthControlPointLocked(index, True)
    return node, (include or exclude)[0]


def _node_name(path):
    name = Path(path).name
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


# ------------------------------------------------------------------------------------------------------
# rendering

def _offscreen_window(width, height):
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(width, height)
    window.SetMultiSamples(0)
    renderer = vtk.vtkRenderer()
    window.AddRenderer(renderer)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    interactor.Initialize()
    return window, renderer, interactor


def _grab(window):
    """RGB pixels of a render window, top row first."""
    window.Render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.SetInputBufferTypeToRGB()
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return pixels[::-1, :, :3].copy()


def render_slice_view(app, layout_name, orientation, volume, ras, size):
    """A Slicer slice view of `volume` through `ras`; returns (RGB pixels, header text)."""
    width, height = size
    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(app.app_logic)
    app.app_logic.GetSliceLogics().AddItem(logic)
    logic.SetMRMLScene(app.scene)
    node = logic.AddSliceNode(layout_name)
    node.SetDefaultOrientation(orientation)  # normally set by the layout
    node.SetOrientation(orientation)
    node.SetLayoutColor(getattr(slicer.vtkMRMLAbstractViewNode, f"Get{layout_name}Color")())
    app.slice_nodes[layout_name] = node

    window, renderer, interactor = _offscreen_window(width, height)
    renderer.GetActiveCamera().ParallelProjectionOn()
    # The slice image first, then the displayable managers: otherwise the segment fill blends over black.
    mapper = vtk.vtkImageMapper()
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    image_actor = vtk.vtkActor2D()
    image_actor.SetMapper(mapper)
    image_actor.GetProperty().SetDisplayLocationToBackground()
    renderer.AddViewProp(image_actor)

    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app.app_logic)
    for manager in SLICE_MANAGERS:
        if not factory.IsDisplayableManagerRegistered(manager):
            factory.RegisterDisplayableManager(manager)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.SetRenderer(renderer)
    group.Initialize(factory, renderer)
    group.SetMRMLDisplayableNode(node)
    style = slicer.vtkMRMLSliceViewInteractorStyle()
    style.SetSliceLogic(logic)
    style.SetDisplayableManagers(group)
    interactor.SetInteractorStyle(vtk.vtkInteractorStyleUser())
    style.SetInteractor(interactor)

    logic.ResizeSliceNode(width, height)
    logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume.GetID())
    logic.FitSliceToBackground()
    node.JumpSliceByOffsetting(*ras)  # move the plane through the point, keep the in-plane view
    mapper.SetInputConnection(logic.GetImageDataConnection())
    group.RequestRender()
    pixels = _grab(window)
    app.views.append((logic, window, renderer, interactor, group, style, mapper, image_actor))

    # the plane's position as Slicer's slice controller shows it, e.g. "S: 127.3mm" / "L: 12.0mm"
    axis = {"Sagittal": 0, "Coronal": 1, "Axial": 2}[orientation]
    coordinate = node.GetSliceToRAS().GetElement(axis, 3)
    letter = ("RL", "AP", "SI")[axis][coordinate < 0]
    return pixels, node.GetLayoutColor(), f"{layout_name[0]}   {orientation}   {letter}: {abs(coordinate):.1f}mm"


def render_3d_view(app, segmentation, segment_id, size, slice_plane=True):
    """A Slicer 3D view of the segment's closed surface (translucent, so the include points inside show),
    with the Red (axial) slice shown in 3D as Slicer's eye icon does, seen from anterior-superior."""
    width, height = size
    segmentation.CreateClosedSurfaceRepresentation()
    display = segmentation.GetDisplayNode()
    display.SetVisibility3D(True)
    display.SetOpacity3D(0.75)
    if slice_plane:
        red = app.slice_nodes.get("Red")  # the axial slice view rendered above
        if red is not None:
            red.SetSliceVisible(True)

    window, renderer, interactor = _offscreen_window(width, height)
    window.SetAlphaBitPlanes(1)
    renderer.SetUseDepthPeeling(1)  # Slicer's 3D views render translucent surfaces with depth peeling
    renderer.SetMaximumNumberOfPeels(8)
    factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
    factory.SetMRMLApplicationLogic(app.app_logic)
    for manager in THREED_MANAGERS:
        if not factory.IsDisplayableManagerRegistered(manager):
            factory.RegisterDisplayableManager(manager)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.SetRenderer(renderer)
    group.Initialize(factory, renderer)
    view_logic = slicer.vtkMRMLViewLogic()
    view_logic.SetMRMLApplicationLogic(app.app_logic)
    app.app_logic.GetViewLogics().AddItem(view_logic)
    view_logic.SetMRMLScene(app.scene)
    view_node = view_logic.AddViewNode("1")
    view_node.SetBoxVisible(False)
    view_node.SetAxisLabelsVisible(False)
    group.SetMRMLDisplayableNode(view_node)
    renderer.SetBackground(*view_node.GetBackgroundColor())
    renderer.SetBackground2(*view_node.GetBackgroundColor2())
    renderer.GradientBackgroundOn()

    # Camera: anterior view (Slicer's default direction) fitted to the segment.
    polydata = vtk.vtkPolyData()
    segmentation.GetClosedSurfaceRepresentation(segment_id, polydata)
    bounds = np.array(polydata.GetBounds()).reshape(3, 2)
    center = bounds.mean(axis=1)
    radius = max(float(np.linalg.norm(bounds[:, 1] - bounds[:, 0])) / 2, 10.0)
    camera_node = view_logic.GetCameraNode()
    camera = camera_node.GetCamera() if camera_node is not None else renderer.GetActiveCamera()
    camera.SetFocalPoint(*center)
    direction = np.array([0.3, 0.9, 1.0]) / np.linalg.norm([0.3, 0.9, 1.0])  # from anterior-superior, a bit right
    camera.SetPosition(*(center + direction * radius * 6))
    camera.SetViewUp(0, 0, 1)
    camera.SetViewAngle(30)
    renderer.SetActiveCamera(camera)
    context = np.c_[center - 1.6 * (center - bounds[:, 0]), center + 1.6 * (bounds[:, 1] - center)]
    renderer.ResetCamera(*context.ravel())  # the segment plus some of the axial slice around it
    renderer.ResetCameraClippingRange()
    group.RequestRender()
    pixels = _grab(window)
    app.views.append((view_logic, window, renderer, interactor, group, polydata))
    return pixels, view_node.GetLayoutColor(), "1   3D   closed surface"


def text_strip(width, height, background, foreground, left, right="", font_size=13, bold=False):
    """RGB pixels of a one-line text bar, drawn with VTK's own fonts."""
    window, renderer, _ = _offscreen_window(width, height)
    renderer.SetBackground(*background)
    for text, justify, x in ((left, "left", 8), (right, "right", width - 8)):
        if not text:
            continue
        actor = vtk.vtkTextActor()
        actor.SetInput(text)
        prop = actor.GetTextProperty()
        prop.SetFontFamilyToArial()
        prop.SetFontSize(font_size)
        prop.SetBold(bold)
        prop.SetColor(*foreground)
        prop.SetVerticalJustificationToCentered()
        prop.SetJustificationToLeft() if justify == "left" else prop.SetJustificationToRight()
        actor.SetDisplayPosition(x, height // 2)
        renderer.AddViewProp(actor)
    return _grab(window)


def compose(tiles, caption, tile_size):
    width, view_height = tile_size
    columns = []
    for pixels, layout_color, header in tiles:
        bar = text_strip(width, HEADER_H, layout_color, (0.0, 0.0, 0.0), header, font_size=12, bold=True)
        column = np.concatenate([bar, pixels], axis=0)
        column[:, -1] = 40  # thin separator, like the gap between Slicer's views
        columns.append(column)
    top = np.concatenate(columns, axis=1)
    bottom = text_strip(top.shape[1], CAPTION_H, (0.13, 0.13, 0.15), (0.92, 0.92, 0.92), caption, font_size=14)
    return np.concatenate([top, bottom], axis=0)


def write_png(pixels, path):
    height, width, _ = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    array = numpy_support.numpy_to_vtk(np.ascontiguousarray(pixels[::-1]).reshape(-1, 3), deep=True,
                                       array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(array)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()


# ------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", required=True, help="image volume (NIfTI, NRRD, ...)")
    parser.add_argument("--label", required=True, help="result label volume (nonzero = segment) or .seg.nrrd")
    parser.add_argument("--points", required=True, help='JSON {"include": [[R,A,S],...], "exclude": [...]}')
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--segment-name", default="right kidney (FastSAM3D)")
    parser.add_argument("--color", type=float, nargs=3, default=KIDNEY_COLOR, metavar=("R", "G", "B"),
                        help="segment colour, 0..1 (default: Slicer's kidney colour)")
    parser.add_argument("--window-level", type=float, nargs=2, default=(400.0, 40.0), metavar=("W", "L"))
    parser.add_argument("--tile", type=int, nargs=2, default=(400, 400 - HEADER_H - CAPTION_H),
                        metavar=("W", "H"), help="size of each view in pixels (default 400 356)")
    parser.add_argument("--no-3d", action="store_true", help="only the three slice views")
    parser.add_argument("--no-slice-in-3d", action="store_true", help="3D view without the axial slice plane")
    parser.add_argument("--caption", default=CAPTION)
    args = parser.parse_args(argv)

    app = HeadlessSlicer()
    volume = load_volume(app, args.volume, *args.window_level)
    segmentation, segment_id = load_segmentation(app, args.label, volume, args.segment_name, tuple(args.color))
    _points, first_point = load_points(app, args.points)

    tile = tuple(args.tile)
    tiles = [render_slice_view(app, name, orientation, volume, first_point, tile) for name, orientation in VIEWS]
    if not args.no_3d:
        try:
            tiles.append(render_3d_view(app, segmentation, segment_id, tile, not args.no_slice_in_3d))
        except Exception as error:  # the slice views are the required part
            print(f"3D view skipped: {error}", file=sys.stderr)
    composed = compose(tiles, args.caption, tile)
    write_png(composed, args.output)
    print(f"wrote {args.output} ({composed.shape[1]}x{composed.shape[0]}) with "
          f"{', '.join(t[2].split('   ')[1] for t in tiles)} views")
    return 0


if __name__ == "__main__":
    sys.exit(main())
