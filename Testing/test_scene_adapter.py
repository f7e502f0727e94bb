"""The scene adapter against real MRML (slicer-core): geometry, clicks, Segment Editor writes, undo, failures.

No MRML object is mocked: scenes, volumes, segmentations, point lists and ``vtkSlicerSegmentEditorLogic`` are
Slicer's own C++ classes from the ``slicer-core`` wheel. The expected results of the masking and overwrite
modes are computed by that same logic applying Paint- and Erase-like modifiers to the whole volume.
"""
import hashlib
import itertools
import math
import time
import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")
vtk = pytest.importorskip("vtk")
from vtk.util import numpy_support  # noqa: E402

from FastSAM3DLib import scene as sc  # noqa: E402
from FastSAM3DLib.errors import FastSAM3DError, PromptError  # noqa: E402

Logic = slicer.vtkSlicerSegmentEditorLogic
SHAPE = (14, 22, 26)  # (K, J, I)


# ------------------------------------------------------------------------------------------------------
# a headless "Slicer application": scene + the module logics segmentations and markups need


@pytest.fixture
def app():
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    logics = []
    for name, logic in [("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic()),
                        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
                        ("Markups", slicer.vtkSlicerMarkupsLogic())]:
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics.append(logic)
    # keep the logics alive as long as the scene: they observe it (a collected logic crashes the next event)
    yield types.SimpleNamespace(scene=scene, app_logic=app_logic, logics=logics)
    scene.Clear(True)


def rotation(axis, degrees):
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    a, b = [(1, 2), (2, 0), (0, 1)][axis]
    m = np.eye(4)
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


def translated(matrix, offset):
    out = np.array(matrix, dtype=float)
    out[:3, 3] += offset
    return out


def oblique_ijk_to_ras():
    """Anisotropic, flipped and rotated about two axes, off-centre origin."""
    m = rotation(2, 17) @ rotation(0, -11) @ np.diag([-0.8, -0.9, 2.5, 1.0])
    m[:3, 3] = (12.5, -31.0, 44.0)
    return m


def make_volume(scene, ijk_to_ras=None, array=None, name="CT"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    if array is None:
        kk, jj, ii = np.indices(SHAPE)
        array = (ii * 10 + jj - kk).astype(np.int16)  # a ramp along i: distinct intensities
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(sc.nodes.vtk_matrix_from_array(np.eye(4) if ijk_to_ras is None else ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


def linear_transform(scene, matrix, parent=None, name="T"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(sc.nodes.vtk_matrix_from_array(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def make_segmentation(scene, volume, name="Seg"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return node


def set_segment(segmentation_node, volume, name, mask_kji):
    """Add segment ``name`` holding ``mask_kji`` (on the volume's grid, no transforms); returns its ID."""
    segment_id = segmentation_node.GetSegmentation().AddEmptySegment("", name)
    ijk = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk)
    image = sc.oriented_images.oriented_image(mask_kji.astype(np.uint8), sc.nodes.array_from_vtk_matrix(ijk),
                               [0, mask_kji.shape[2] - 1, 0, mask_kji.shape[1] - 1, 0, mask_kji.shape[0] - 1])
    L = slicer.vtkSlicerSegmentationsModuleLogic
    assert L.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, L.MODE_REPLACE, image.GetExtent())
    return segment_id


def segment_array(segmentation_node, segment_id, volume):
    """The segment on the volume's voxel grid (K, J, I) as bool, through both nodes' transforms."""
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, image, False)  # in the segmentation node's own coordinates
    ijk = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk)
    dims = volume.GetImageData().GetDimensions()
    extent = [0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1]
    reference = sc.oriented_images.oriented_image(None, sc.nodes.array_from_vtk_matrix(ijk), extent)
    seg_to_volume = np.linalg.inv(sc.node_to_world(volume)) @ sc.node_to_world(segmentation_node)
    transform = vtk.vtkTransform()
    transform.SetMatrix(sc.nodes.vtk_matrix_from_array(seg_to_volume))
    out = slicer.vtkOrientedImageData()
    if image.GetPointData().GetScalars() is None:
        return np.zeros(dims[::-1], bool)
    assert slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        image, reference, out, False, False, transform)
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return raw_values(out, extent) == label  # the image is the segment's whole layer: pick its label


def raw_values(image, extent):
    """(K, J, I) voxel values of ``image`` over ``extent`` (zero where it does not reach)."""
    out = np.zeros((extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1), np.int64)
    e = image.GetExtent()
    lo = [max(extent[2 * a], e[2 * a]) for a in range(3)]
    hi = [min(extent[2 * a + 1], e[2 * a + 1]) for a in range(3)]
    if image.GetPointData().GetScalars() is None or any(a > b for a, b in zip(lo, hi)):
        return out
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    out[tuple(slice(lo[a] - extent[2 * a], hi[a] - extent[2 * a] + 1) for a in (2, 1, 0))] = \
        values[tuple(slice(lo[a] - e[2 * a], hi[a] - e[2 * a] + 1) for a in (2, 1, 0))]
    return out


def all_segments(segmentation_node, volume):
    segmentation = segmentation_node.GetSegmentation()
    return {segmentation.GetNthSegmentID(i): segment_array(segmentation_node, segmentation.GetNthSegmentID(i), volume)
            for i in range(segmentation.GetNumberOfSegments())}


def fingerprint(segmentation_node):
    """Everything a segmentation node stores about its segments: metadata, layers, voxels (hashed)."""
    segmentation = segmentation_node.GetSegmentation()
    segments = []
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        s = segmentation.GetSegment(sid)
        tags = {}
        for key in ("Segmentation.Status", sc.MODEL_TAG, s.GetTerminologyEntryTagName()):
            value = vtk.reference("")
            if s.GetTag(key, value):
                tags[key] = str(value)
        segments.append((sid, s.GetName(), tuple(np.round(s.GetColor(), 6)), s.GetLabelValue(),
                         segmentation.GetLayerIndex(sid), s.GetNameAutoGenerated(), s.GetColorAutoGenerated(),
                         tuple(sorted(tags.items()))))
    layers = []
    for i in range(segmentation.GetNumberOfLayers()):
        image = segmentation.GetLayerDataObject(i)
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        scalars = image.GetPointData().GetScalars()
        data = numpy_support.vtk_to_numpy(scalars).tobytes() if scalars is not None else b""
        layers.append((tuple(image.GetExtent()), tuple(np.round(sc.nodes.array_from_vtk_matrix(matrix), 9).ravel()),
                       image.GetScalarType(), hashlib.sha256(data).hexdigest()))
    return {"segments": segments, "layers": layers,
            "parameters": segmentation.SerializeAllConversionParameters(),
            "source": segmentation.GetSourceRepresentationName(),
            "reference": segmentation_node.GetNodeReferenceID(
                slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())}


def placed(region, mask, shape=SHAPE):
    full = np.zeros(shape, bool)
    full[region] = mask
    return full


def ball(shape, centre_kji, radius):
    kk, jj, ii = np.indices(shape)
    return (kk - centre_kji[0]) ** 2 + (jj - centre_kji[1]) ** 2 + (ii - centre_kji[2]) ** 2 <= radius ** 2


# A three-segment scene: A and C are other structures (C hidden), B receives the model result.
REGION = (slice(3, 12), slice(4, 18), slice(5, 21))


def oblique_volume_and_transformed_segmentation(app):
    """An oblique volume and a segmentation under its own rotation, its grid following the volume's."""
    volume = make_volume(app.scene, oblique_ijk_to_ras())
    t_seg = linear_transform(app.scene, translated(rotation(2, 25), (3.0, 1.0, -2.0)))
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(t_seg.GetID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return volume, segmentation


def three_segments(app, ijk_to_ras=None):
    volume = make_volume(app.scene, ijk_to_ras)
    segmentation = make_segmentation(app.scene, volume)
    kk, jj, ii = np.indices(SHAPE)
    masks = {
        "A": (ii < 12) & (jj < 12),                          # overlaps the region's left part
        "C": (ii >= 16) & (kk >= 6),                          # overlaps the region's right part (hidden)
        "B": ((ii >= 9) & (ii < 14) & (jj >= 8) & (jj < 14) & (kk >= 5) & (kk < 9))  # old result inside region
        | ((ii >= 1) & (ii < 4) & (jj >= 18) & (kk < 2)),   # and a part outside the region, away from A and C
    }
    ids = {name: set_segment(segmentation, volume, name, mask) for name, mask in masks.items()}
    segmentation.GetDisplayNode().SetSegmentVisibility(ids["C"], False)
    rng = np.random.default_rng(7)
    shape = tuple(s.stop - s.start for s in REGION)
    new = ball(shape, (4, 7, 8), 5.5) & (rng.random(shape) > 0.15)  # a ragged blob: sets and clears voxels
    return volume, segmentation, ids, masks, new


# ------------------------------------------------------------------------------------------------------
# geometry: volumes and clicks


def test_volume_from_node_folds_nested_linear_transforms(app):
    local = oblique_ijk_to_ras()
    volume_node = make_volume(app.scene, local)
    outer = linear_transform(app.scene, translated(rotation(1, 23), (7.0, -3.0, 11.0)), name="outer")
    inner = linear_transform(app.scene, rotation(2, -9), parent=outer, name="inner")
    volume_node.SetAndObserveTransformNodeID(inner.GetID())

    volume = sc.volume_from_node(volume_node)
    expected = sc.nodes.array_from_vtk_matrix(outer.GetMatrixTransformToParent()) @ rotation(2, -9) @ local
    np.testing.assert_allclose(volume.ijk_to_ras, expected, atol=1e-9)
    assert volume.array.shape == SHAPE
    np.testing.assert_array_equal(volume.array, slicer.util.arrayFromVolume(volume_node))
    volume.array[0, 0, 0] += 1  # a copy: the scene's voxels are untouched
    assert slicer.util.arrayFromVolume(volume_node)[0, 0, 0] == volume.array[0, 0, 0] - 1
    assert np.shares_memory(sc.volume_from_node(volume_node, copy=False).array,
                            slicer.util.arrayFromVolume(volume_node))


def test_clicks_in_world_ras_land_on_the_clicked_voxels(app):
    volume_node = make_volume(app.scene, oblique_ijk_to_ras())
    t_volume = linear_transform(app.scene, translated(rotation(0, 31), (4.0, 9.0, -6.0)))
    volume_node.SetAndObserveTransformNodeID(t_volume.GetID())
    volume = sc.volume_from_node(volume_node)

    # the point list lives under a different transform: its world positions are what counts
    points_node = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    t_points = linear_transform(app.scene, rotation(1, -40), name="points transform")
    points_node.SetAndObserveTransformNodeID(t_points.GetID())
    targets = np.array([[5, 4, 3], [20, 15, 9], [0, 0, 0], [25, 21, 13], [12, 10, 7]])  # (i, j, k)
    polarity = [True, False, True, False, True]
    rng = np.random.default_rng(3)
    jitter = rng.uniform(-0.3, 0.3, targets.shape)  # clicks are never on voxel centres
    world = (np.c_[targets + jitter, np.ones(len(targets))] @ volume.ijk_to_ras.T)[:, :3]
    for ras, include in zip(world, polarity):
        sc.add_prompt_point(points_node, ras, include)
    points_node.AddControlPoint(vtk.vtkVector3d(0, 0, 0), "being placed")
    points_node.UnsetNthControlPointPosition(points_node.GetNumberOfControlPoints() - 1)

    points, labels = sc.ras_points_from_markups(points_node)
    np.testing.assert_allclose(points, world, atol=1e-6)
    np.testing.assert_array_equal(labels, [1, 0, 1, 0, 1])
    ijk = (np.c_[points, np.ones(len(points))] @ np.linalg.inv(volume.ijk_to_ras).T)[:, :3]
    np.testing.assert_array_equal(np.floor(ijk + 0.5).astype(int), targets)


def test_nonlinear_transform_is_refused_with_instructions(app):
    volume_node = make_volume(app.scene)
    spline = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(0, 0, 0), (30, 0, 0), (0, 30, 0), (0, 0, 30), (30, 30, 30)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 2 * (p[1] > 0), p[1], p[2])
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    spline.SetBasisToR()
    warp = app.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    warp.SetAndObserveTransformToParent(spline)
    volume_node.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(FastSAM3DError, match="[Hh]arden"):
        sc.volume_from_node(volume_node)
    segmentation = make_segmentation(app.scene, make_volume(app.scene, name="other"))
    sid = segmentation.GetSegmentation().AddEmptySegment("", "B")
    before = fingerprint(segmentation)
    with pytest.raises(FastSAM3DError, match="[Hh]arden"):
        sc.write_region(segmentation, sid, volume_node, REGION, np.ones((9, 14, 16), bool))
    assert fingerprint(segmentation) == before


def test_prompt_points_are_kept_per_segment_with_polarity_colours(app):
    volume = make_volume(app.scene)
    segmentation = make_segmentation(app.scene, volume)
    a = segmentation.GetSegmentation().AddEmptySegment("", "liver")
    b = segmentation.GetSegmentation().AddEmptySegment("", "tumour")
    assert sc.prompt_points_node(segmentation, a, create=False) is None
    node_a = sc.prompt_points_node(segmentation, a)
    assert sc.prompt_points_node(segmentation, a) is node_a
    node_b = sc.prompt_points_node(segmentation, b)
    assert node_b is not node_a and "tumour" in node_b.GetName()
    sc.add_prompt_point(node_a, (1.0, 2.0, 3.0), include=True)
    sc.add_prompt_point(node_a, (4.0, 5.0, 6.0), include=False)
    display = node_a.GetDisplayNode()
    assert np.allclose(display.GetSelectedColor(), sc.INCLUDE_COLOR)
    assert np.allclose(display.GetColor(), sc.EXCLUDE_COLOR)
    points, labels = sc.ras_points_from_markups(node_a)
    np.testing.assert_allclose(points, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(labels, [1, 0])
    assert sc.remove_last_prompt_point(node_a)
    assert sc.ras_points_from_markups(node_a)[1].tolist() == [1]
    assert sc.ras_points_from_markups(node_b)[0].shape == (0, 3)


def test_looking_up_prompt_lists_holds_no_reference_to_the_nodes(app):
    """vtkMRMLScene::GetNodesByClass hands its collection to the caller: unreleased, every panel refresh kept
    each point list (and its markups) alive past a scene close."""
    volume = make_volume(app.scene)
    segmentation = make_segmentation(app.scene, volume)
    node = sc.prompt_points_node(segmentation, segmentation.GetSegmentation().AddEmptySegment("", "liver"))
    references = node.GetReferenceCount()
    for _ in range(5):
        assert sc.prompt_point_nodes(segmentation) == [node]
    assert node.GetReferenceCount() == references


def _selection_node(app):
    selection = app.app_logic.GetSelectionNode()
    assert selection is not None, "the application logic makes the selection node"
    return selection


def _liver(app):
    """A segmentation of a new volume with one empty segment, "liver"; returns (segmentation node, segment ID)."""
    segmentation = make_segmentation(app.scene, make_volume(app.scene))
    return segmentation, segmentation.GetSegmentation().AddEmptySegment("", "liver")


def test_creating_a_prompt_list_keeps_the_users_active_place_list(app):
    segmentation, segment_id = _liver(app)
    selection = _selection_node(app)
    landmarks = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks")
    assert selection.GetActivePlaceNodeID() == landmarks.GetID()  # the markups logic makes a new list active
    other = app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "other")  # the harness reproduces the trap
    assert selection.GetActivePlaceNodeID() == other.GetID()
    selection.SetActivePlaceNodeID(landmarks.GetID())

    prompts = sc.prompt_points_node(segmentation, segment_id)
    sc.add_prompt_point(prompts, (1.0, 2.0, 3.0), include=True)
    assert selection.GetActivePlaceNodeID() == landmarks.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsFiducialNode"
    assert prompts.GetHideFromEditors() and prompts.GetLocked()
    assert prompts.GetNthControlPointLabel(0) == ""  # no "F-1" names in the Markups module's list
    assert prompts.GetNthControlPointLocked(0)  # unlocking the list in the Markups module keeps clicks in place
    # the user's next landmark goes where it always went, and never becomes a click
    landmarks.AddControlPointWorld(vtk.vtkVector3d(9.0, 9.0, 9.0), "L-1")
    assert landmarks.GetNumberOfControlPoints() == 1 and prompts.GetNumberOfControlPoints() == 1


def test_prompt_lists_of_a_removed_segmentation_are_removed_with_their_display_nodes(app):
    volume = make_volume(app.scene)
    kept, gone = make_segmentation(app.scene, volume, "kept"), make_segmentation(app.scene, volume, "gone")
    lists = [sc.prompt_points_node(node, node.GetSegmentation().AddEmptySegment("", name))
             for node, name in ((kept, "a"), (gone, "b"), (gone, "c"))]
    displays = [node.GetDisplayNodeID() for node in lists]
    removed_segment = kept.GetSegmentation().AddEmptySegment("", "d")
    sc.prompt_points_node(kept, removed_segment)
    kept.GetSegmentation().RemoveSegment(removed_segment)  # its list stays: Ctrl+Z brings the segment back
    assert sc.remove_orphan_prompt_lists(app.scene) == 0
    app.scene.RemoveNode(gone)
    assert sc.remove_orphan_prompt_lists(app.scene) == 2
    assert [app.scene.GetNodeByID(i) is not None for i in displays] == [True, False, False]
    assert len(sc.prompt_point_nodes(kept)) == 2 and sc.remove_orphan_prompt_lists(app.scene) == 0


def test_creating_a_prompt_list_keeps_an_active_place_list_of_another_kind(app):
    """The user was placing a line (or a curve, an ROI): the active place node's class must come back too."""
    segmentation, segment_id = _liver(app)
    selection = _selection_node(app)
    line = app.scene.AddNewNodeByClass("vtkMRMLMarkupsLineNode", "ruler")
    selection.SetActivePlaceNodeID(line.GetID())
    selection.SetActivePlaceNodeClassName("vtkMRMLMarkupsLineNode")
    sc.add_prompt_point(sc.prompt_points_node(segmentation, segment_id), (1.0, 2.0, 3.0), include=True)
    assert selection.GetActivePlaceNodeID() == line.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsLineNode"


def test_points_without_a_written_polarity_keep_their_selected_flag(app):
    """A point list from before the polarity was written into descriptions (or a point added by hand): its
    *selected* flag is the polarity, and show_polarity must leave it alone."""
    segmentation, segment_id = _liver(app)
    prompts = sc.prompt_points_node(segmentation, segment_id)
    for index, (position, selected) in enumerate((((1.0, 2.0, 3.0), True), ((4.0, 5.0, 6.0), False))):
        prompts.AddControlPointWorld(vtk.vtkVector3d(*position), "")
        prompts.SetNthControlPointSelected(index, selected)
    sc.add_prompt_point(prompts, (7.0, 8.0, 9.0), include=False)
    prompts.SetNthControlPointSelected(2, True)  # "select all" in the Markups module
    sc.show_polarity(prompts)
    assert [prompts.GetNthControlPointSelected(i) for i in range(3)] == [True, False, False]
    assert sc.ras_points_from_markups(prompts)[1].tolist() == [1, 0, 0]


def test_select_all_does_not_change_a_clicks_polarity(app):
    segmentation, segment_id = _liver(app)
    prompts = sc.prompt_points_node(segmentation, segment_id)
    assert sc.add_prompt_point(prompts, (1.0, 2.0, 3.0), include=True) == 0
    assert sc.add_prompt_point(prompts, (4.0, 5.0, 6.0), include=False) == 1  # the new point's index
    for index in range(2):  # what "select all" in the Markups module does
        prompts.SetNthControlPointSelected(index, True)
    assert sc.ras_points_from_markups(prompts)[1].tolist() == [1, 0]
    sc.show_polarity(prompts)
    assert [prompts.GetNthControlPointSelected(i) for i in range(2)] == [True, False]


def test_prompt_lists_are_found_again_after_a_scene_import_renames_node_ids(app):
    segmentation, segment_id = _liver(app)
    prompts = sc.prompt_points_node(segmentation, segment_id)
    app.scene.SetSaveToXMLString(1)  # the node references and attributes (the points go to the .mrk.json)
    app.scene.Commit()
    saved = app.scene.GetSceneXMLString()

    target = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(target)
    markups = slicer.vtkSlicerMarkupsLogic()
    markups.SetMRMLScene(target)
    markups.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Markups", markups)
    squatters = [target.AddNewNodeByClass(cls) for cls in ("vtkMRMLSegmentationNode", "vtkMRMLMarkupsFiducialNode")]
    assert {n.GetID() for n in squatters} >= {segmentation.GetID(), prompts.GetID()}  # the IDs are taken
    target.SetLoadFromXMLString(1)
    target.SetSceneXMLString(saved)
    target.Import()
    imported = [n for n in sc.nodes.nodes_by_class(target, "vtkMRMLSegmentationNode") if n not in squatters]
    assert len(imported) == 1 and imported[0].GetID() != segmentation.GetID()
    found = sc.prompt_points_node(imported[0], segment_id, create=False)
    assert found is not None and found.GetID() != prompts.GetID()
    assert sc.prompt_points_node(squatters[0], segment_id, create=False) is None
    target.Clear(True)


# ------------------------------------------------------------------------------------------------------
# writing


def test_write_is_voxel_exact_on_an_oblique_transformed_volume(app):
    volume = make_volume(app.scene, oblique_ijk_to_ras())
    transform = linear_transform(app.scene, translated(rotation(1, 13), (-5.0, 2.0, 8.0)))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation = make_segmentation(app.scene, volume)  # geometry includes the volume's transform
    old = ball(SHAPE, (6, 9, 10), 4) | ball(SHAPE, (1, 20, 2), 1.5)
    sid = segmentation.GetSegmentation().AddEmptySegment("", "B")
    with sc.LogicEditor(app.scene) as editor:
        sc.write_region(segmentation, sid, volume, (slice(None),) * 3, old, editor=editor)
        assert np.array_equal(segment_array(segmentation, sid, volume), old)
        rng = np.random.default_rng(0)
        mask = rng.random((9, 14, 16)) > 0.5
        sc.write_region(segmentation, sid, volume, REGION, mask, editor=editor)
    expected = old.copy()
    expected[REGION] = mask
    assert np.array_equal(segment_array(segmentation, sid, volume), expected)


def test_segmentation_on_another_transform_and_grid_shift(app):
    """The segmentation under its own transform, with a grid shifted by whole voxels: still a copy."""
    volume, segmentation = oblique_volume_and_transformed_segmentation(app)
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    geometry = slicer.vtkOrientedImageData()
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(
        segmentation.GetSegmentation().GetConversionParameter(name), geometry, False)
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    shifted = sc.nodes.array_from_vtk_matrix(matrix)
    shifted[:3, 3] = shifted[:3, :3] @ [-3.0, 2.0, -1.0] + shifted[:3, 3]
    geometry.SetGeometryFromImageToWorldMatrix(sc.nodes.vtk_matrix_from_array(shifted))
    geometry.SetExtent(0, 40, 0, 30, 0, 20)
    segmentation.GetSegmentation().SetConversionParameter(
        name, slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry))
    sid = segmentation.GetSegmentation().AddEmptySegment("", "B")
    mask = ball((9, 14, 16), (4, 7, 8), 5)
    sc.write_region(segmentation, sid, volume, REGION, mask)
    assert np.array_equal(segment_array(segmentation, sid, volume), placed(REGION, mask))


def test_oversampled_segmentation_is_resampled_nearest_neighbour(app):
    volume = make_volume(app.scene, oblique_ijk_to_ras())
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    ijk = sc.volume_from_node_matrix(volume)
    fine = ijk @ np.diag([0.5, 0.5, 0.5, 1.0])
    fine[:3, 3] = ijk[:3, :3] @ [-0.25, -0.25, -0.25] + ijk[:3, 3]  # same bounds, twice the voxels per axis
    geometry = sc.oriented_images.oriented_image(None, fine,
                                                 [0, 2 * SHAPE[2] - 1, 0, 2 * SHAPE[1] - 1, 0, 2 * SHAPE[0] - 1])
    segmentation.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry))
    sid = segmentation.GetSegmentation().AddEmptySegment("", "B")
    old = ball(SHAPE, (7, 11, 13), 6)
    sc.write_region(segmentation, sid, volume, (slice(None),) * 3, old)
    rng = np.random.default_rng(5)
    mask = rng.random((9, 14, 16)) > 0.4
    sc.write_region(segmentation, sid, volume, REGION, mask)
    expected = old.copy()
    expected[REGION] = mask
    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation, sid, image, False)
    fine_voxels = raw_values(image, [0, 2 * SHAPE[2] - 1, 0, 2 * SHAPE[1] - 1, 0, 2 * SHAPE[0] - 1])
    label = segmentation.GetSegmentation().GetSegment(sid).GetLabelValue()
    # every fine voxel carries the value of the coarse voxel it lies in
    assert np.array_equal(fine_voxels == label, expected.repeat(2, 0).repeat(2, 1).repeat(2, 2))


MASK_MODES = ["everywhere", "inside_all_segments", "inside_visible_segments", "outside_all_segments",
              "outside_visible_segments", "inside_segment"]


@pytest.mark.parametrize("target", ["B", "empty"])
@pytest.mark.parametrize("mask_mode,overwrite", list(itertools.product(MASK_MODES, ["all", "visible", "none"])))
def test_masking_and_overwrite_match_the_segment_editor(app, mask_mode, overwrite, target):
    """write_region == Paint(mask) + Erase(rest of region) applied by vtkSlicerSegmentEditorLogic itself, into a
    segment with voxels in the region and into an empty one (where write_region skips the Erase step)."""
    volume, segmentation, ids, masks, new = three_segments(app)
    if target == "empty":  # B stays, compared like the others
        ids["old B"], ids["B"] = ids["B"], segmentation.GetSegmentation().AddEmptySegment("", "empty")
    intensity = (60.0, 175.0) if mask_mode in ("everywhere", "inside_segment") else None  # i in 6..17
    settings = sc.EditorSettings(mask_mode, ids["A"] if mask_mode == "inside_segment" else None, overwrite, intensity)
    before = fingerprint(segmentation)
    before_arrays = all_segments(segmentation, volume)

    with sc.LogicEditor(app.scene, settings) as editor:
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
        ours = all_segments(segmentation, volume)
        editor.undo()  # one undo step restores every segment exactly
        assert fingerprint(segmentation) == before

        # the reference: the same logic and settings, whole-volume Paint-like (Add) and Erase-like (Remove)
        logic = editor.logic
        logic.SaveStateForUndo()
        for mode, values in ((Logic.ModificationModeRemove, placed(REGION, ~new) & placed(REGION, np.ones_like(new))),
                             (Logic.ModificationModeAdd, placed(REGION, new))):
            assert logic.ResetModifierLabelmapToDefault()
            modifier = logic.GetModifierLabelmap()
            assert tuple(modifier.GetDimensions()) == SHAPE[::-1]
            numpy_support.vtk_to_numpy(modifier.GetPointData().GetScalars())[:] = values.astype(np.uint8).ravel()
            modifier.Modified()
            logic.ModifySegmentByLabelmap(segmentation, ids["B"], modifier, mode, True, False)
        reference = all_segments(segmentation, volume)
    for sid in ids.values():
        assert np.array_equal(ours[sid], reference[sid]), sid
    outside = ~placed(REGION, np.ones_like(new))
    assert np.array_equal(ours[ids["B"]] & outside, before_arrays[ids["B"]] & outside)  # nothing changes outside
    if mask_mode == "everywhere" and intensity is None:
        assert np.array_equal(ours[ids["B"]][REGION], new)


def test_everywhere_semantics_against_numpy(app):
    volume, segmentation, ids, masks, new = three_segments(app)
    placed_new = placed(REGION, new)
    for overwrite, lose_a, lose_c in [("all", True, True), ("visible", True, False), ("none", False, False)]:
        with sc.LogicEditor(app.scene, sc.EditorSettings(overwrite=overwrite)) as editor:
            sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
            got = all_segments(segmentation, volume)
            expected_b = masks["B"].copy()
            expected_b[REGION] = new
            assert np.array_equal(got[ids["B"]], expected_b)
            assert np.array_equal(got[ids["A"]], masks["A"] & ~placed_new if lose_a else masks["A"]), overwrite
            assert np.array_equal(got[ids["C"]], masks["C"] & ~placed_new if lose_c else masks["C"]), overwrite
            editor.undo()


def test_intensity_range_and_inside_segment_semantics(app):
    volume, segmentation, ids, masks, new = three_segments(app)
    intensity = slicer.util.arrayFromVolume(volume)
    in_range = (intensity >= 60) & (intensity <= 175)
    region = placed(REGION, np.ones_like(new))
    with sc.LogicEditor(app.scene, sc.EditorSettings(overwrite="none", intensity_range=(60, 175))) as editor:
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
        got = segment_array(segmentation, ids["B"], volume)
        # set where in range; out of range voxels keep their old state
        assert np.array_equal(got, np.where(region & in_range, placed(REGION, new), masks["B"]))
    with sc.LogicEditor(app.scene, sc.EditorSettings("inside_segment", ids["A"], "none")) as editor:
        b_before = segment_array(segmentation, ids["B"], volume)
        a_before = segment_array(segmentation, ids["A"], volume)
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
        got = segment_array(segmentation, ids["B"], volume)
        added = placed(REGION, new) & masks["A"]
        assert np.array_equal(got & ~b_before, added & ~b_before)  # only painted inside A
        cleared = b_before & ~got
        assert not (cleared & ~region).any()
        # as with Erase inside a segment, the cleared voxels go back to the masking segment
        assert np.array_equal(segment_array(segmentation, ids["A"], volume), a_before | cleared)


@pytest.mark.parametrize("given_as", ["parameter node", "editor"])
def test_inside_a_segment_that_is_not_chosen_is_refused_clearly(app, given_as):
    """Slicer's editable area "inside a segment" with no segment chosen allows no edit: the write says so and
    changes nothing (reading such a parameter node once raised a bare ValueError)."""
    volume, segmentation, ids, masks, new = three_segments(app)
    node = app.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    before = fingerprint(segmentation)
    with sc.LogicEditor(app.scene) as editor:
        if given_as == "editor":
            editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
            options = dict(editor=editor)
        else:
            options = dict(editor=editor, editor_settings=node)
        with pytest.raises(FastSAM3DError, match="no segment is chosen"):
            sc.write_region(segmentation, ids["B"], volume, REGION, new, **options)
        assert not editor.can_undo()
    assert fingerprint(segmentation) == before


def test_undo_and_redo_cover_other_segments(app):
    volume, segmentation, ids, masks, new = three_segments(app)
    before = fingerprint(segmentation)
    with sc.LogicEditor(app.scene) as editor:
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
        after = fingerprint(segmentation)
        got_a = segment_array(segmentation, ids["A"], volume)
        assert not np.array_equal(got_a, masks["A"])  # overwrite took voxels from A
        assert editor.can_undo()
        editor.undo()
        assert fingerprint(segmentation) == before
        assert np.array_equal(segment_array(segmentation, ids["A"], volume), masks["A"])
        editor.redo()
        assert np.array_equal(segment_array(segmentation, ids["A"], volume), got_a)
        assert fingerprint(segmentation)["segments"] == after["segments"]


def test_a_write_with_nothing_to_erase_or_paint_saves_no_undo_state(app, monkeypatch):
    """A result that changes nothing in its region saved an undo state and snapshotted the segmentation (a
    deep copy of every layer where the overwrite mode is not "all")."""
    volume, segmentation, ids, masks, new = three_segments(app)
    empty_corner = (slice(0, 3), slice(0, 3), slice(14, 20))  # no voxel of B there, and nothing to paint
    assert not segment_array(segmentation, ids["B"], volume)[empty_corner].any()
    snapshots = []
    monkeypatch.setattr(sc.writing, "Rollback", lambda *args: snapshots.append(args) or _NoRollback())
    with sc.LogicEditor(app.scene, sc.EditorSettings(overwrite="none")) as editor:
        before = fingerprint(segmentation)
        sc.write_region(segmentation, ids["B"], volume, empty_corner, np.zeros((3, 3, 6), bool), editor=editor)
        assert fingerprint(segmentation) == before and snapshots == [] and not editor.can_undo()
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
        assert len(snapshots) == 1 and editor.can_undo()


class _NoRollback:
    def restore(self):
        raise AssertionError("nothing failed")

    def close(self):
        pass


class _FailingEditor(sc.LogicEditor):
    """A real Segment Editor logic whose Paint step raises before it is applied, after the Erase step (when
    there is one: an empty segment has nothing to erase), as an interrupted write would."""

    calls = 0

    def modify(self, segmentation_node, segment_id, labelmap, mode):
        self.calls += 1
        if mode == Logic.ModificationModeAdd or self.calls == 2:
            raise KeyboardInterrupt("interrupted between the Erase and the Paint step")
        super().modify(segmentation_node, segment_id, labelmap, mode)


class _FailingAfterEditor(sc.LogicEditor):
    """A real Segment Editor logic that raises right after applying the Paint step (the segment changed)."""

    def modify(self, segmentation_node, segment_id, labelmap, mode):
        super().modify(segmentation_node, segment_id, labelmap, mode)
        if mode == Logic.ModificationModeAdd:
            raise KeyboardInterrupt("interrupted after the Paint step")


class _CountingEditor(sc.LogicEditor):
    """A real Segment Editor logic that records the steps it applies."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def modify(self, segmentation_node, segment_id, labelmap, mode):
        self.steps.append("erase" if mode == Logic.ModificationModeRemove else "paint")
        super().modify(segmentation_node, segment_id, labelmap, mode)


@pytest.mark.parametrize("overwrite", ["all", "none"])
def test_the_erase_step_runs_only_when_the_segment_has_voxels_to_clear(app, overwrite):
    """Erasing voxels a segment does not hold changes nothing, and Slicer's logic spends 65-80 ms on it
    whatever its size: a write into an empty segment paints only, with the result of both steps."""
    volume, segmentation, ids, masks, new = three_segments(app)
    ids["new"] = segmentation.GetSegmentation().AddEmptySegment("", "new")
    before = all_segments(segmentation, volume)
    with _CountingEditor(app.scene, sc.EditorSettings(overwrite=overwrite)) as editor:
        sc.write_region(segmentation, ids["new"], volume, REGION, new, editor=editor)
        assert editor.steps == ["paint"]
        got = all_segments(segmentation, volume)
        assert np.array_equal(got[ids["new"]], placed(REGION, new))
        for name in "ABC":  # the others lose the painted voxels (overwrite all) or keep everything (none)
            lost = placed(REGION, new) if overwrite == "all" else np.zeros_like(before[ids[name]])
            assert np.array_equal(got[ids[name]], before[ids[name]] & ~lost), name
        editor.steps.clear()
        sc.write_region(segmentation, ids["new"], volume, REGION, ~new, editor=editor)  # now it has voxels to clear
        assert editor.steps == ["erase", "paint"]
        assert np.array_equal(all_segments(segmentation, volume)[ids["new"]], placed(REGION, ~new))


def test_failures_leave_the_segmentation_bit_identical(app):
    volume, segmentation, ids, masks, new = three_segments(app)
    before = fingerprint(segmentation)
    with pytest.raises(ValueError, match="shape"):
        sc.write_region(segmentation, ids["B"], volume, REGION, new[:-1])
    with pytest.raises(ValueError, match="outside the volume"):
        sc.write_region(segmentation, ids["B"], volume, (slice(0, 99), REGION[1], REGION[2]), new)
    with pytest.raises(ValueError, match="boolean"):
        sc.write_region(segmentation, ids["B"], volume, REGION, new.astype(np.float32) * 0.7)
    with pytest.raises(FastSAM3DError, match="does not exist"):
        sc.write_region(segmentation, "no such segment", volume, REGION, new)
    with pytest.raises(FastSAM3DError, match="inside segment"):
        sc.write_region(segmentation, ids["B"], volume, REGION, new, sc.EditorSettings("inside_segment", "gone"))
    assert fingerprint(segmentation) == before
    # an exception in the middle of the edit (after the Erase step modified the segment)
    editor = _FailingEditor(app.scene)
    with pytest.raises(KeyboardInterrupt):
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
    editor.close()
    assert fingerprint(segmentation) == before
    for sid, mask in masks.items():
        assert np.array_equal(segment_array(segmentation, ids[sid], volume), mask)


def test_a_missing_target_or_source_and_malformed_regions_are_refused_with_what_to_do(app):
    """What a console script may pass by mistake: no segmentation, no source volume (or one without voxels),
    a region that is not three unit-step slices, a 0/1 mask of another integer type. Each gets its message and
    leaves the segmentation as it was."""
    from FastSAM3DLib.errors import InputImageError

    volume, segmentation, ids, masks, new = three_segments(app)
    before = fingerprint(segmentation)
    with pytest.raises(FastSAM3DError, match="Select a segmentation"):
        sc.write_region(None, ids["B"], volume, REGION, new)
    with pytest.raises(FastSAM3DError, match="Select a segmentation"):
        sc.write_region(volume, ids["B"], volume, REGION, new)
    empty = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    for source in (None, empty, segmentation):
        with pytest.raises(InputImageError, match="Select the source volume"):
            sc.write_region(segmentation, ids["B"], source, REGION, new)
    k, j, i = REGION
    for region in ((k, j), (k, j, i, i), (k, j, slice(i.start, i.stop, 2)), (k, j, (i.start, i.stop)), "kji"):
        with pytest.raises(ValueError, match="three unit-step slices"):
            sc.write_region(segmentation, ids["B"], volume, region, new)
    with pytest.raises(ValueError, match="outside the volume"):
        sc.write_region(segmentation, ids["B"], volume, (slice(-1, k.stop - 1), j, i), new)
    with pytest.raises(ValueError, match="boolean"):
        sc.write_region(segmentation, ids["B"], volume, REGION, new.astype(np.int16) * 2)
    sc.write_region(segmentation, ids["B"], volume, (slice(3, 3), j, i), new[:0])  # an empty region: no change
    assert fingerprint(segmentation) == before
    stepped = (slice(k.start, k.stop, 1), j, i)  # an explicit step of 1 is a unit step
    sc.write_region(segmentation, ids["B"], volume, stepped, new.astype(np.uint8))  # 0/1 integers are a mask
    assert np.array_equal(segment_array(segmentation, ids["B"], volume)[REGION], new)


def test_a_result_reaching_outside_the_segmentations_geometry_is_refused_not_cut(app):
    """A segmentation made for a smaller volume, or moved by a transform, cut the result off silently (to nothing
    when moved away), and the call reported success."""
    volume = make_volume(app.scene)
    small = make_volume(app.scene, array=slicer.util.arrayFromVolume(volume)[:, :, :13].copy(), name="left half")
    cropped = make_segmentation(app.scene, small, "for the left half")
    kept = set_segment(cropped, small, "kept", np.ones((14, 22, 13), bool))
    before = fingerprint(cropped)
    mask = np.zeros(SHAPE, bool)
    mask[4:10, 5:15, 8:20] = True  # columns 13-19 lie outside the left half
    region = tuple(slice(0, n) for n in SHAPE)
    with pytest.raises(FastSAM3DError, match="420 of the result's 720 voxels lie outside the segmentation's geometry"):
        sc.write_region(cropped, kept, volume, region, mask)
    assert fingerprint(cropped) == before
    sc.write_region(cropped, kept, volume, region, mask & (np.indices(SHAPE)[2] < 13))  # inside: written
    moved = make_segmentation(app.scene, volume, "moved")
    moved.SetAndObserveTransformNodeID(linear_transform(app.scene, translated(np.eye(4), (60.0, 0, 0))).GetID())
    with pytest.raises(FastSAM3DError, match="outside the segmentation's geometry"):
        sc.segment_volume_node(volume, [(12.0, 10.0, 7.0)], segmentation_node=moved, segment_name="ball",
                               predictor=lambda vol, points, labels: (region, mask))
    assert moved.GetSegmentation().GetNumberOfSegments() == 0


@pytest.mark.parametrize("failing", [_FailingEditor, _FailingAfterEditor], ids=["between", "after"])
@pytest.mark.parametrize("overwrite", ["all", "visible", "none"])
@pytest.mark.parametrize("target", ["B", "new"])
def test_an_interrupted_write_is_undone_in_every_overwrite_mode(app, overwrite, target, failing):
    volume, segmentation, ids, masks, new = three_segments(app)
    if target == "new":  # an empty segment: the edit grows its layer's extent
        ids["new"] = segmentation.GetSegmentation().AddEmptySegment("", "new")
    before = fingerprint(segmentation)
    editor = failing(app.scene, sc.EditorSettings(overwrite=overwrite))
    with pytest.raises(KeyboardInterrupt):
        sc.write_region(segmentation, ids[target], volume, REGION, new, editor=editor)
    editor.close()
    assert fingerprint(segmentation) == before


def _status(segmentation_node, segment_id):
    """The segment's status tag ("notstarted", "inprogress", ...), or None when it has none."""
    value = vtk.reference("")
    tag = slicer.vtkSlicerSegmentationsModuleLogic.GetStatusTagName()
    return str(value) if segmentation_node.GetSegmentation().GetSegment(segment_id).GetTag(tag, value) else None


@pytest.mark.parametrize("failing", [_FailingEditor, _FailingAfterEditor], ids=["between", "after"])
@pytest.mark.parametrize("overwrite", ["all", "none"])
def test_an_interrupted_write_gives_the_segments_their_status_back(app, overwrite, failing):
    """Segments saved by Slicer carry a status ("not started", "completed", ...; the Segment Editor's status
    column). The logic marks a "not started" segment "in progress" as it edits it; a failed write must leave
    every status as it was, whichever rollback it takes (the edited box, or the whole segmentation)."""
    volume, segmentation, ids, masks, new = three_segments(app)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for name, status in {"A": logic.Completed, "C": logic.Flagged}.items():
        logic.SetSegmentStatus(segmentation.GetSegmentation().GetSegment(ids[name]), status)
    # SetSegmentStatus(NotStarted) removes the tag; a script or a file may also set the word, read as not started
    segmentation.GetSegmentation().GetSegment(ids["B"]).SetTag(logic.GetStatusTagName(), "notstarted")
    before = fingerprint(segmentation)
    assert _status(segmentation, ids["B"]) == "notstarted"
    _interrupted_write(failing(app.scene, sc.EditorSettings(overwrite=overwrite)), segmentation, ids["B"], volume, new)
    assert fingerprint(segmentation) == before
    assert _status(segmentation, ids["B"]) == "notstarted"
    with sc.LogicEditor(app.scene, sc.EditorSettings(overwrite=overwrite)) as editor:  # what a write does to it
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
    assert _status(segmentation, ids["B"]) == "inprogress" and _status(segmentation, ids["A"]) == "completed"


def _surfaces(segmentation_node, ids):
    """Each segment's closed surface as (points, polygons, rounded bounds): what Slicer's 3D view shows."""
    name = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    out = {}
    for key, segment_id in ids.items():
        poly = segmentation_node.GetSegmentation().GetSegment(segment_id).GetRepresentation(name)
        out[key] = None if poly is None else (poly.GetNumberOfPoints(), poly.GetNumberOfPolys(),
                                              tuple(np.round(poly.GetBounds(), 4)))
    return out


@pytest.mark.parametrize("overwrite", ["all", "none"])
def test_an_interrupted_write_leaves_the_3d_surfaces_as_they_were(app, overwrite):
    """The failed write's Paint step changed B and the segments it took voxels from, and Slicer rebuilt their
    closed surfaces; once the voxels are put back, the surfaces must follow them, or the 3D view shows a write
    that did not happen."""
    volume, segmentation, ids, masks, new = three_segments(app)
    assert segmentation.CreateClosedSurfaceRepresentation()
    before = _surfaces(segmentation, ids)
    assert all(surface is not None and surface[0] > 0 for surface in before.values())
    _interrupted_write(_FailingAfterShownEditor(app.scene, sc.EditorSettings(overwrite=overwrite)), segmentation,
                       ids["B"], volume, new)
    assert segmentation.CreateClosedSurfaceRepresentation()  # as the 3D view does for surfaces it lost
    assert _surfaces(segmentation, ids) == before


class _FailingAfterShownEditor(sc.LogicEditor):
    """A real Segment Editor logic that raises right after the Paint step, once Slicer's 3D view has rebuilt the
    closed surfaces the step dropped (the view does so on the segmentation's modified event, on the main thread)."""

    def modify(self, segmentation_node, segment_id, labelmap, mode):
        super().modify(segmentation_node, segment_id, labelmap, mode)
        if mode == Logic.ModificationModeAdd:
            assert segmentation_node.CreateClosedSurfaceRepresentation()
            raise KeyboardInterrupt("interrupted after the Paint step was shown")


def test_an_interrupted_write_is_undone_when_the_erase_step_cropped_a_layer(app):
    """Once A had taken B's voxels, the Erase step emptied B inside the region and Slicer's logic cropped B's
    layer to what was left: the rollback refused ("rearranged ... press Ctrl+Z") and left a half-done write."""
    volume, segmentation, ids, masks, new = three_segments(app)
    sc.write_region(segmentation, ids["A"], volume, REGION, new)
    written = fingerprint(segmentation)
    # interrupted between the Erase and the Paint step: B's layer is cropped
    _interrupted_write(_FailingEditor(app.scene), segmentation, ids["B"], volume, new)
    assert fingerprint(segmentation) == written


def _interrupted_write(editor, segmentation, segment_id, volume, mask):
    """``write_region`` of ``mask`` in REGION through ``editor``, which must interrupt it; the editor is closed."""
    try:
        with pytest.raises(KeyboardInterrupt):
            sc.write_region(segmentation, segment_id, volume, REGION, mask, editor=editor)
    finally:
        editor.close()


class _SilentEditor(sc.LogicEditor):
    """Changes the target's layer without any event, then is interrupted. Slicer's logic does so while it keeps
    the segmentation's events off (it resamples a layer on another grid in place before it edits it), and a
    randomized test of failing writes on the real logic found such writes that the segmentation history
    believed unchanged."""

    def modify(self, segmentation_node, segment_id, labelmap, mode):
        segmentation = segmentation_node.GetSegmentation()
        layer = segmentation.GetLayerDataObject(segmentation.GetLayerIndex(segment_id))
        sc.oriented_images.image_array(layer)[:] = segmentation.GetSegment(segment_id).GetLabelValue()  # no Modified()
        raise KeyboardInterrupt("interrupted after a change the segmentation did not announce")


def test_an_interrupted_write_is_undone_when_the_history_was_told_nothing(app):
    """The whole-segmentation rollback (overwrite "none" here) restored only if its history had seen a change:
    the layer stayed as the failed write left it."""
    volume, segmentation, ids, masks, new = three_segments(app)
    before = fingerprint(segmentation)
    _interrupted_write(_SilentEditor(app.scene, sc.EditorSettings(overwrite="none")), segmentation, ids["B"], volume,
                       new)
    assert fingerprint(segmentation) == before


@pytest.mark.parametrize("layer", ["empty", "smaller than the region"])
def test_an_interrupted_write_that_grew_a_layer_gives_it_its_extent_back(app, layer):
    volume = make_volume(app.scene)
    segmentation = make_segmentation(app.scene, volume)
    if layer == "empty":
        segment_id = segmentation.GetSegmentation().AddEmptySegment("", "new")
    else:
        segment_id = segmentation.GetSegmentation().AddEmptySegment("", "small")
        ijk = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijk)
        small = sc.oriented_images.oriented_image(np.ones((2, 3, 4), np.uint8), sc.nodes.array_from_vtk_matrix(ijk),
                                           [6, 9, 7, 9, 4, 5])
        L = slicer.vtkSlicerSegmentationsModuleLogic
        assert L.SetBinaryLabelmapToSegment(small, segmentation, segment_id, L.MODE_REPLACE, small.GetExtent())
    before = fingerprint(segmentation)
    editor = _FailingAfterEditor(app.scene)
    mask = np.ones((9, 14, 16), bool)
    mask[0] = False
    with pytest.raises(KeyboardInterrupt):
        sc.write_region(segmentation, segment_id, volume, REGION, mask, editor=editor)
    editor.close()
    assert fingerprint(segmentation) == before


@pytest.mark.parametrize("failing", [_FailingEditor, _FailingAfterEditor], ids=["between", "after"])
@pytest.mark.parametrize("shift", [(-3, -2, -1), (0.5, 0, 0)], ids=["whole-voxel-shift", "half-voxel-shift"])
def test_an_interrupted_write_is_undone_when_a_layer_lies_on_another_grid(app, failing, shift):
    """A segment imported from a labelmap keeps that labelmap's grid; Slicer's logic resamples such a layer
    in place when it edits it, so a rollback by voxel index would corrupt it: the whole segmentation is kept."""
    volume = make_volume(app.scene)
    segmentation = make_segmentation(app.scene, volume)
    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "imported")
    k, j, i = np.indices((20, 30, 34))
    slicer.util.updateVolumeFromArray(labelmap, ((i // 3 + j // 3 + k // 3) % 2).astype(np.uint8))
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    labelmap.SetIJKToRASMatrix(sc.nodes.vtk_matrix_from_array(matrix))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    target = segmentation.GetSegmentation().AddEmptySegment("", "B")
    before = fingerprint(segmentation)
    mask = np.zeros((9, 14, 16), bool)
    mask[2:6, 3:10, 4:12] = True
    editor = failing(app.scene)
    with pytest.raises(KeyboardInterrupt):
        sc.write_region(segmentation, target, volume, REGION, mask, editor=editor)
    editor.close()
    assert fingerprint(segmentation) == before


def test_a_write_keeps_only_the_edited_box_for_its_rollback(app, monkeypatch):
    """Memory per click: the rollback copies the region's box of each layer, not the segmentation."""
    volume, segmentation, ids, masks, new = three_segments(app)
    kept = []
    original = sc.rollback.values_in_extent
    monkeypatch.setattr(sc.rollback, "values_in_extent",
                        lambda image, extent: kept.append(extent) or original(image, extent))
    sc.write_region(segmentation, ids["B"], volume, REGION, new)
    box = tuple(v for s in reversed(REGION) for v in (s.start, s.stop - 1))  # (i0, i1, j0, j1, k0, k1)
    assert kept, "the rollback kept nothing"
    assert all(all(e[2 * a] >= box[2 * a] and e[2 * a + 1] <= box[2 * a + 1] for a in range(3)) for e in kept)


def test_failure_on_a_segmentation_without_geometry_leaves_it_without(app):
    volume = make_volume(app.scene, oblique_ijk_to_ras())
    segmentation = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    sid = segmentation.GetSegmentation().AddEmptySegment("", "B")
    before = fingerprint(segmentation)
    editor = _FailingEditor(app.scene)
    editor.calls = 1  # fail at the first modification
    with pytest.raises(KeyboardInterrupt):
        sc.write_region(segmentation, sid, volume, REGION, np.ones((9, 14, 16), bool), editor=editor)
    editor.close()
    assert fingerprint(segmentation) == before
    sc.write_region(segmentation, sid, volume, REGION, np.ones((9, 14, 16), bool))  # takes the volume's geometry
    assert np.array_equal(segment_array(segmentation, sid, volume), placed(REGION, np.ones((9, 14, 16), bool)))


class _ScriptedEffectStandIn:
    """The few ``qSlicerSegmentEditorScriptedEffect`` calls EffectEditor makes, served by a real logic."""

    def __init__(self, scene):
        self.logic = Logic()
        self.logic.SetMRMLScene(scene)
        self.node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.logic.SetSegmentEditorNode(self.node)

    def parameterSetNode(self):
        return self.node

    def referenceGeometryImage(self):
        return self.logic.GetReferenceGeometryImage() if self.logic.UpdateReferenceGeometryImage() else None

    def saveStateForUndo(self):
        self.logic.SaveStateForUndo()

    def modifySegmentByLabelmap(self, segmentation_node, segment_id, labelmap, mode):
        self.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap, mode, True, False)


def test_effect_editor_writes_through_the_effects_logic(app):
    volume, segmentation, ids, masks, new = three_segments(app)
    effect = _ScriptedEffectStandIn(app.scene)
    effect.logic.SetSegmentationNode(segmentation)
    effect.logic.SetSourceVolumeNode(volume)
    effect.logic.SetCurrentSegmentID(ids["A"])
    with pytest.raises(FastSAM3DError, match="selected segment changed"):
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=sc.EffectEditor(effect))
    effect.logic.SetCurrentSegmentID(ids["B"])
    sc.EditorSettings(overwrite="visible").apply_to(effect.node)
    sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=sc.EffectEditor(effect))
    got = all_segments(segmentation, volume)
    assert np.array_equal(got[ids["B"]][REGION], new)
    assert np.array_equal(got[ids["C"]], masks["C"])  # hidden: kept
    assert np.array_equal(got[ids["A"]], masks["A"] & ~placed(REGION, new))
    effect.logic.Undo()  # the edit is on the effect's (the Segment Editor's) undo stack
    assert np.array_equal(segment_array(segmentation, ids["A"], volume), masks["A"])


def test_editor_settings_round_trip_through_the_parameter_node(app):
    node = app.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    assert sc.EditorSettings.from_node(node) == sc.EditorSettings()  # Slicer's defaults are ours
    settings = sc.EditorSettings("inside_segment", "S1", "visible", (-100, 300))
    settings.apply_to(node)
    assert sc.EditorSettings.from_node(node) == settings
    with pytest.raises(ValueError):
        sc.EditorSettings(mask_mode="inside")


def test_seg_nrrd_save_and_reload(app, tmp_path):
    volume, segmentation, ids, masks, new = three_segments(app, oblique_ijk_to_ras())
    sc.write_region(segmentation, ids["B"], volume, REGION, new)
    expected = all_segments(segmentation, volume)
    path = str(tmp_path / "result.seg.nrrd")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    app.scene.AddNode(storage)
    storage.SetFileName(path)
    assert storage.WriteData(segmentation)
    reloaded = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = slicer.vtkMRMLSegmentationStorageNode()
    app.scene.AddNode(reader)
    reader.SetFileName(path)
    assert reader.ReadData(reloaded)
    got = all_segments(reloaded, volume)
    assert set(got) == set(expected)
    for sid in expected:
        assert np.array_equal(got[sid], expected[sid]), sid
        name = segmentation.GetSegmentation().GetSegment(sid).GetName()
        assert reloaded.GetSegmentation().GetSegment(sid).GetName() == name


def test_write_timing_on_a_large_volume(app, capsys):
    """Write a 128^3 region into a 512x512x300 volume's segment; prints the times (never asserted)."""
    shape = (300, 512, 512)
    volume = make_volume(app.scene, np.diag([0.7, 0.7, 1.25, 1.0]), np.zeros(shape, np.int16))
    segmentation = make_segmentation(app.scene, volume)
    sid = segmentation.GetSegmentation().AddEmptySegment("", "B")
    region = (slice(100, 228), slice(200, 328), slice(180, 308))
    mask = ball((128, 128, 128), (64, 64, 64), 50)
    timings = {}
    with sc.LogicEditor(app.scene) as editor:
        for label in ("first write (empty segment)", "second write (same region)"):
            start = time.perf_counter()
            sc.write_region(segmentation, sid, volume, region, mask if "first" in label else ~mask, editor=editor)
            timings[label] = time.perf_counter() - start
        # a full-size layer (as after loading a .seg.nrrd): the failure snapshot copies it
        other = np.zeros(shape, bool)
        other[:, :, :10] = True
        set_segment(segmentation, volume, "full-extent neighbour", other)
        start = time.perf_counter()
        sc.write_region(segmentation, sid, volume, region, mask, editor=editor)
        timings["with a full-size 512x512x300 layer present"] = time.perf_counter() - start
    got = segment_array(segmentation, sid, volume)
    assert np.array_equal(got[region], mask) and got.sum() == mask.sum()
    with capsys.disabled():
        print("\nwrite_region, 128^3 region of a 512x512x300 volume (2-core CPU):")
        for label, seconds in timings.items():
            print(f"  {label}: {seconds * 1000:.0f} ms")


# ------------------------------------------------------------------------------------------------------
# batch call


def sphere_predictor(radius_mm=6.0):
    """A deterministic stand-in for the model: a ball of ``radius_mm`` around the first include point."""

    def predict(volume, points_ras, labels):
        centre = np.asarray(points_ras, float)[np.flatnonzero(labels)[0]]
        shape = volume.array.shape
        kk, jj, ii = np.indices(shape)
        world = np.stack([ii, jj, kk, np.ones(shape)], -1) @ volume.ijk_to_ras.T
        inside = np.linalg.norm(world[..., :3] - centre, axis=-1) <= radius_mm
        present = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        region = tuple(slice(p[0], p[-1] + 1) for p in present)
        return region, inside[region]

    return predict


def test_segment_volume_node_offline_runs_the_bundled_demo_model(app, tmp_path, monkeypatch):
    """The README's console loop on a fresh install: it asked for 'fastsam3d', whose weights are not there."""
    asked = []
    monkeypatch.setattr(sc.batch, "session_predictor", lambda model, **kwargs: asked.append(model)
                        or sphere_predictor())
    volume_node = make_volume(app.scene)
    centre = (sc.volume_from_node(volume_node).ijk_to_ras @ [13, 11, 7, 1])[:3]
    segmentation, segment_id = sc.segment_volume_node(volume_node, [centre], cache_dir=tmp_path / "empty-cache")
    assert asked == ["fastsam3d-demo"]
    tag = vtk.reference("")
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetTag(sc.MODEL_TAG, tag)
    assert str(tag) == "fastsam3d-demo"


def test_segment_volume_node_in_a_loop_over_volumes(app):
    volumes = [make_volume(app.scene, oblique_ijk_to_ras(), name="oblique"),
               make_volume(app.scene, np.diag([1.2, 1.1, 2.0, 1.0]), name="axial")]
    transform = linear_transform(app.scene, rotation(2, 30))
    volumes[0].SetAndObserveTransformNodeID(transform.GetID())
    results = []
    for volume_node in volumes:
        volume = sc.volume_from_node(volume_node)
        centre = (volume.ijk_to_ras @ [13, 11, 7, 1])[:3]
        segmentation, segment_id = sc.segment_volume_node(volume_node, [centre], [1], predictor=sphere_predictor())
        results.append((segmentation, segment_id))
        region, expected = sphere_predictor()(volume, [centre], [1])
        got = segment_array(segmentation, segment_id, volume_node)
        assert np.array_equal(got, placed(region, expected))
        assert expected.sum() > 20
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        assert segment.GetName() == "FastSAM3D" and volume_node.GetName() in segmentation.GetName()
    assert results[0][0] is not results[1][0]

    # again into the same segmentation and segment: the segment is reused, the new region set
    segmentation, segment_id = results[1]
    volume = sc.volume_from_node(volumes[1])
    far = (volume.ijk_to_ras @ [4, 5, 3, 1])[:3]
    old = segment_array(segmentation, segment_id, volumes[1])
    again = sc.segment_volume_node(volumes[1], far, segmentation_node=segmentation, predictor=sphere_predictor(3.0))
    assert again == (segmentation, segment_id)
    region, ball3 = sphere_predictor(3.0)(volume, [far], [1])
    expected = old.copy()
    expected[region] = ball3
    assert np.array_equal(segment_array(segmentation, segment_id, volumes[1]), expected)


def test_segment_volume_node_failures_add_nothing_to_the_scene(app):
    volume_node = make_volume(app.scene)
    count = app.scene.GetNumberOfNodes()

    def broken(volume, points, labels):
        return (slice(0, 2), slice(0, 2), slice(0, 2)), np.ones((3, 3, 3), bool)  # wrong shape

    with pytest.raises(ValueError, match="shape"):
        sc.segment_volume_node(volume_node, [[1.0, 2.0, 3.0]], predictor=broken)
    with pytest.raises(PromptError, match="include"):
        sc.segment_volume_node(volume_node, [[1.0, 2.0, 3.0]], [0], predictor=sphere_predictor())
    with pytest.raises(PromptError):
        sc.segment_volume_node(volume_node, [[1.0, 2.0]], predictor=sphere_predictor())
    with pytest.raises(PromptError, match="No points were given"):  # it said "got shape (0,)"
        sc.segment_volume_node(volume_node, [], predictor=sphere_predictor())
    centre = (sc.volume_from_node(volume_node).ijk_to_ras @ [13, 11, 7, 1])[:3]
    with pytest.raises(FastSAM3DError, match="inside segment"):  # fails in the write, after the node was made
        sc.segment_volume_node(volume_node, [centre], predictor=sphere_predictor(),
                               editor_settings=sc.EditorSettings("inside_segment", "missing"))
    assert app.scene.GetNumberOfNodes() == count
    segmentation = make_segmentation(app.scene, volume_node)
    before = fingerprint(segmentation)
    with pytest.raises(FastSAM3DError, match="inside segment"):  # an existing segmentation gets no new segment
        sc.segment_volume_node(volume_node, [centre], segmentation_node=segmentation, predictor=sphere_predictor(),
                               editor_settings=sc.EditorSettings("inside_segment", "missing"))
    assert fingerprint(segmentation) == before


# ------------------------------------------------------------------------------------------------------
# the session behind the clicks (the random-weight "tiny-test" model: real code path, seconds on a CPU)


@pytest.fixture(scope="module")
def tiny_model():
    pytest.importorskip("torch")
    from FastSAM3DLib.registry import build_model

    return build_model("tiny-test", seed=0)


def _phantom_volume():
    from FastSAM3DLib.geometry import Volume

    array = np.zeros((24, 32, 32), np.float32)
    array[8:16, 8:24, 8:24] = 100.0
    return Volume(array, np.diag([1.5, 1.5, 2.0, 1.0]))


def _same_result(a, b):
    return a.region == b.region and np.array_equal(a.mask, b.mask)


def test_replay_clicks_follows_the_point_list(tiny_model):
    from FastSAM3DLib.session import InteractiveSession

    volume = _phantom_volume()
    points = [[24.0, 24.0, 22.0], [12.0, 30.0, 20.0], [30.0, 14.0, 26.0]]
    labels = [1, 0, 1]
    ours, direct = InteractiveSession(tiny_model, volume), InteractiveSession(tiny_model, volume)
    for n in range(1, 4):  # each new point is one click
        assert _same_result(sc.replay_clicks(ours, points[:n], labels[:n]),
                            direct.add_click(points[n - 1], include=bool(labels[n - 1])))
    assert sc.replay_clicks(ours, points, labels) is None  # nothing changed
    assert _same_result(sc.replay_clicks(ours, points[:2], labels[:2]), direct.undo())  # "Undo point"
    edited = [[25.0, 23.0, 22.0], points[1]]  # a point moved elsewhere: start again from the list
    fresh = InteractiveSession(tiny_model, volume)
    expected = [fresh.add_click(p, include=bool(lab)) for p, lab in zip(edited, labels)][-1]
    assert _same_result(sc.replay_clicks(ours, edited, labels[:2]), expected)
    assert sc.replay_clicks(ours, [], []) is None and ours.clicks == []


def test_a_replay_that_fails_leaves_the_session_at_its_clicks(tiny_model):
    """A point list edited so that one point lies outside the volume: the replay is refused and the session keeps
    the clicks (and result) it had, so removing the bad point afterwards replays rather than doing nothing."""
    from FastSAM3DLib.session import InteractiveSession

    volume = _phantom_volume()
    good, bad = [[24.0, 24.0, 22.0], [12.0, 30.0, 20.0]], [[24.0, 24.0, 22.0], [12.0, 30.0, 999.0]]
    session = InteractiveSession(tiny_model, volume)
    sc.replay_clicks(session, good[:1], [1])
    shown = sc.replay_clicks(session, good, [1, 0])
    clicks, logits, region = list(session.clicks), session.low_res_logits, session._shown_region
    with pytest.raises(PromptError, match="outside"):
        sc.replay_clicks(session, bad, [1, 0])
    assert session.clicks == clicks and session.low_res_logits is logits and session._shown_region == region
    again = sc.replay_clicks(session, good[:1], [1])  # the bad point deleted: an undo, not "nothing changed"
    fresh = InteractiveSession(tiny_model, volume)
    assert shown is not None and again is not None and len(session.clicks) == 1
    assert np.array_equal(session.full_mask(again), fresh.full_mask(fresh.add_click(good[0])))


def test_segment_volume_node_default_predictor_runs_the_session(app, monkeypatch, tiny_model):
    monkeypatch.setattr(sc.batch, "load_model", lambda model, device, checkpoint, cache_dir: tiny_model)
    volume_node = make_volume(app.scene, np.diag([1.5, 1.5, 2.0, 1.0]), _phantom_volume().array)
    segmentation, segment_id = sc.segment_volume_node(volume_node, [[24.0, 24.0, 22.0]], model="tiny-test",
                                                      device="cpu")
    from FastSAM3DLib.session import InteractiveSession

    result = InteractiveSession(tiny_model, sc.volume_from_node(volume_node)).add_click([24.0, 24.0, 22.0])
    assert np.array_equal(segment_array(segmentation, segment_id, volume_node), placed(result.region, result.mask,
                                                                                      (24, 32, 32)))
    tag = vtk.reference("")
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetTag(sc.MODEL_TAG, tag) and str(tag) == "tiny-test"


def test_segment_mask_matches_the_segment_through_transforms(app):
    volume, segmentation = oblique_volume_and_transformed_segmentation(app)
    sid = segmentation.GetSegmentation().AddEmptySegment("", "B")
    assert not sc.segment_mask(segmentation, sid, volume).any()  # an empty segment
    mask = ball((9, 14, 16), (4, 7, 8), 5)
    sc.write_region(segmentation, sid, volume, REGION, mask)
    assert np.array_equal(sc.segment_mask(segmentation, sid, volume), placed(REGION, mask))


def test_reading_a_segment_from_its_layer_equals_slicers_resampling(app, monkeypatch):
    """segment_mask reads a layer on the volume's lattice directly (Slicer's resampling took 7-11 s for a CT);
    shared layers, a segmentation moved by whole voxels, and a layer grown past the volume give what the
    resampling gives."""
    volume, segmentation, ids, masks, _ = three_segments(app)  # A and C share a layer
    mover = linear_transform(app.scene, translated(np.eye(4), (2.0, -3.0, 1.0)))
    fast = {name: sc.segment_mask(segmentation, sid, volume) for name, sid in ids.items()}
    assert all(np.array_equal(fast[name], masks[name]) for name in ids)
    segmentation.SetAndObserveTransformNodeID(mover.GetID())  # whole voxels (1 mm): still the same lattice
    assert sc.reading.segment_voxels_on_lattice(segmentation, ids["A"], volume) is not None
    fast = {name: sc.segment_mask(segmentation, sid, volume) for name, sid in ids.items()}
    monkeypatch.setattr(sc.reading, "segment_voxels_on_lattice", lambda *args: None)  # Slicer's resampling
    slow = {name: sc.segment_mask(segmentation, sid, volume) for name, sid in ids.items()}
    assert all(np.array_equal(fast[name], slow[name]) and slow[name].any() for name in ids)
    assert not all(np.array_equal(slow[name], masks[name]) for name in ids)  # the move did change them
    monkeypatch.undo()
    segmentation.SetAndObserveTransformNodeID(linear_transform(app.scene, rotation(2, 10)).GetID())
    assert sc.reading.segment_voxels_on_lattice(segmentation, ids["A"], volume) is None  # another lattice


def test_removing_every_point_gives_the_segment_back(app, tiny_model):
    """Click, click, undo point, undo point: the segment's own earlier voxels come back (no Ctrl+Z needed)."""
    from FastSAM3DLib.session import InteractiveSession

    phantom = _phantom_volume()
    volume = make_volume(app.scene, phantom.ijk_to_ras, phantom.array)
    segmentation = make_segmentation(app.scene, volume)
    kk, jj, ii = np.indices(phantom.shape)
    before = ((ii >= 10) & (ii < 20) & (jj >= 12) & (jj < 18) & (kk >= 9) & (kk < 14)) | \
        ((ii < 3) & (jj < 3) & (kk < 3))  # a drawing under the clicks and a part far away
    sid = set_segment(segmentation, volume, "B", before)
    assert np.array_equal(sc.segment_mask(segmentation, sid, volume), before)
    session = InteractiveSession(tiny_model, phantom)
    points, labels = [[24.0, 24.0, 22.0], [12.0, 30.0, 20.0]], [1, 0]
    baseline = None
    with sc.LogicEditor(app.scene) as editor:
        for n in (1, 2):
            if n == 1:
                baseline = sc.SegmentBaseline(segmentation, sid, volume)
            result = sc.replay_clicks(session, points[:n], labels[:n])
            sc.write_region(segmentation, sid, volume, result.region, result.mask, editor=editor)
        changed = sc.segment_mask(segmentation, sid, volume)
        assert not np.array_equal(changed, before)  # the prediction replaced the drawing in its region
        result = sc.replay_clicks(session, points[:1], labels[:1])  # undo point: one left
        sc.write_region(segmentation, sid, volume, result.region, result.mask, editor=editor)
        result = sc.replay_clicks(session, [], [])  # undo point: none left
        assert not result.mask.any()  # the session alone would clear its region...
        sc.write_region(segmentation, sid, volume, result.region, baseline.mask_in(result.region), editor=editor)
    assert np.array_equal(sc.segment_mask(segmentation, sid, volume), before)  # ...the baseline restores it
    empty = sc.SegmentBaseline(segmentation, segmentation.GetSegmentation().AddEmptySegment("", "E"), volume)
    assert empty.region is None and not empty.mask_in(result.region).any()
