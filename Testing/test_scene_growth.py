"""A segment grown over several regions, written into real MRML (slicer-core) through the Segment Editor logic.

The same write path as a single region (:func:`FastSAM3DLib.scene.write_region`): voxel exact through a parent
transform, the editable area and the overwrite mode applied as for Paint, one undo step for the whole result.
The growth uses the threshold stand-in model (see Testing/test_growth.py for why).
"""
import math

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")

from FastSAM3DLib import scene as sc  # noqa: E402
from FastSAM3DLib.benchmarks.long_phantoms import curved_tube, tube_centre  # noqa: E402
from FastSAM3DLib.benchmarks.threshold_model import threshold_model  # noqa: E402
from FastSAM3DLib.session import InteractiveSession  # noqa: E402

from test_scene_adapter import app, fingerprint, linear_transform, make_segmentation, set_segment  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _transform():
    """A rotation of 13 degrees about A and a shift: the volume's parent transform."""
    c, s = math.cos(math.radians(13)), math.sin(math.radians(13))
    matrix = np.array([[c, 0, s, -5.0], [0, 1, 0, 2.0], [-s, 0, c, 8.0], [0, 0, 0, 1.0]])
    return matrix


@pytest.fixture(scope="module")
def phantom():
    return curved_tube(length=420.0, spacing=(2.5, 2.5, 2.5))


def _volume_node(scene, volume):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Tube")
    slicer.util.updateVolumeFromArray(node, volume.array)
    node.SetIJKToRASMatrix(sc.nodes.vtk_matrix_from_array(volume.ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


def _grown(volume_node, length=420.0):
    """The grown result of one click on the tube's middle, in world coordinates (parent transform applied)."""
    session = InteractiveSession(threshold_model(), sc.volume_from_node(volume_node), grow=True)
    y, z = tube_centre(0.0, length)
    world = sc.node_to_world(volume_node) @ np.array([0.0, y, z, 1.0])
    result = session.add_click(world[:3])
    return session, result


def test_grown_segment_is_written_exactly_through_a_parent_transform(app, phantom):
    volume, truth = phantom
    node = _volume_node(app.scene, volume)
    node.SetAndObserveTransformNodeID(linear_transform(app.scene, _transform()).GetID())
    session, result = _grown(node)
    assert result.regions >= 3
    full = session.full_mask(result)
    assert np.count_nonzero(full & truth) > 0.95 * np.count_nonzero(truth)  # the world click found the tube
    segmentation = make_segmentation(app.scene, node)
    sid = segmentation.GetSegmentation().AddEmptySegment("", "Tube")
    with sc.LogicEditor(app.scene) as editor:
        sc.write_region(segmentation, sid, node, result.region, result.mask, editor=editor)
        np.testing.assert_array_equal(sc.segment_mask(segmentation, sid, node), full)
        undone = session.undo()  # the session's undo, written the same way, empties the segment again
        sc.write_region(segmentation, sid, node, undone.region, undone.mask, editor=editor)
        assert not sc.segment_mask(segmentation, sid, node).any()


def test_grown_segment_honours_the_editable_area_and_overwrite(app, phantom):
    volume, _ = phantom
    node = _volume_node(app.scene, volume)
    session, result = _grown(node)
    full = session.full_mask(result)
    segmentation = make_segmentation(app.scene, node)
    shape = volume.shape
    left = np.zeros(shape, bool)
    left[:, :, : shape[2] // 2] = True  # the editable area: segment A, half the volume along the tube
    slab = np.zeros(shape, bool)
    slab[:, :, shape[2] // 4: shape[2] // 3] = True  # segment C crosses the tube inside A
    ids = {"A": set_segment(segmentation, node, "A", left), "C": set_segment(segmentation, node, "C", slab)}
    ids["B"] = segmentation.GetSegmentation().AddEmptySegment("", "B")
    before = fingerprint(segmentation)
    settings = sc.EditorSettings("inside_segment", ids["A"], "all")
    with sc.LogicEditor(app.scene, settings) as editor:
        sc.write_region(segmentation, ids["B"], node, result.region, result.mask, editor=editor)
        b = sc.segment_mask(segmentation, ids["B"], node)
        c = sc.segment_mask(segmentation, ids["C"], node)
        np.testing.assert_array_equal(b, full & left)  # nothing outside the editable area
        np.testing.assert_array_equal(c, slab & ~(full & left))  # overwrite: C loses what B took
        assert (full & ~left).any()  # the grown result did reach beyond the editable area
        editor.undo()  # the whole grown result is one undo step
    assert fingerprint(segmentation) == before


def test_the_console_call_grows_by_the_models_default(app, phantom, monkeypatch):
    volume, truth = phantom
    node = _volume_node(app.scene, volume)
    monkeypatch.setattr(sc.batch, "load_model", lambda model, device, checkpoint, cache_dir: threshold_model())
    y, z = tube_centre(0.0, 420.0)
    counts = {}
    for model, grow in (("fastsam3d", True), ("fastsam3d", False), ("fastsam3d", None), ("fastsam3d-demo", None)):
        segmentation, sid = sc.segment_volume_node(node, [[0.0, y, z]], segment_name=f"tube {model} {grow}",
                                                   model=model, device="cpu", grow=grow)
        counts[model, grow] = np.count_nonzero(sc.segment_mask(segmentation, sid, node) & truth)
    grown, single = counts["fastsam3d", True], counts["fastsam3d", False]
    assert grown > 0.95 * np.count_nonzero(truth) and single < 0.6 * np.count_nonzero(truth)
    assert counts["fastsam3d", None] == grown and counts["fastsam3d-demo", None] == single
