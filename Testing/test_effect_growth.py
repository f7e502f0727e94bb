"""The effect's growth option: a check box stored with the effect's parameters, progress while a click grows, and
"Stop growing" (the regions so far are written, one undo step). The model is the threshold stand-in
(FastSAM3DLib.benchmarks.threshold_model), put in place of the logic's session factory."""
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")
pytest.importorskip("torch")

from slicer_event_loop import hold_gil  # noqa: E402
from test_scene_adapter import make_segmentation, segment_array  # noqa: E402

from FastSAM3DLib import scene as sc  # noqa: E402
from FastSAM3DLib.benchmarks.long_phantoms import curved_tube, tube_centre  # noqa: E402
from FastSAM3DLib.benchmarks.threshold_model import threshold_model  # noqa: E402
from FastSAM3DLib.session import InteractiveSession  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tube_scene(harness):
    volume, truth = curved_tube(length=420.0, spacing=(2.5, 2.5, 2.5))
    node = harness.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Tube")
    slicer.util.updateVolumeFromArray(node, volume.array)
    node.SetIJKToRASMatrix(sc.nodes.vtk_matrix_from_array(volume.ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    segmentation = make_segmentation(harness.scene, node)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "tube")
    harness.select(node, segmentation, segment_id)
    return node, segmentation, segment_id, truth


def _stand_in(effect, monkeypatch, encode_seconds=0.0):
    """The logic makes sessions with the threshold stand-in (slowed down per region if asked); returns them."""
    made = []

    def create(model, device, prompt_mode, volume, memory_bank=None, grow=False, precision=None, cacheDir=None,
               token=None):
        stand_in = threshold_model()
        if encode_seconds:
            stand_in.image_encoder.register_forward_hook(lambda *args: time.sleep(encode_seconds))
        made.append(InteractiveSession(stand_in, volume, grow=grow))
        return made[-1]

    monkeypatch.setattr(effect._logic(), "createSession", create)
    monkeypatch.setattr(effect, "_ready", lambda: True)
    return made


def _choose_model(effect, harness, name):
    effect.modelCombo.setCurrentIndex(effect.modelCombo.findData(name))
    harness.run_event_loop()
    assert effect.scriptedEffect.parameter("Model") == name


def test_grow_follows_the_model_until_chosen_and_grows_the_whole_tube(harness, monkeypatch):
    node, segmentation, segment_id, truth = _tube_scene(harness)
    effect = harness.create_effect()
    effect.activate()
    sessions = _stand_in(effect, monkeypatch)
    _choose_model(effect, harness, "fastsam3d-demo")
    assert not effect.growCheckBox.checked  # the demo model does not grow by default (measured: no gain)
    _choose_model(effect, harness, "fastsam3d")
    assert effect.growCheckBox.checked  # the official models do
    assert harness.editor_node.GetAttribute("FastSAM3D.Grow") in (None, "")  # no choice stored yet
    y, z = tube_centre(0.0, 420.0)
    assert harness.click((0.0, y, z))
    assert "3 regions" in effect.statusLabel.text, effect.statusLabel.text
    written = segment_array(segmentation, segment_id, node)
    assert np.count_nonzero(written & truth) > 0.95 * np.count_nonzero(truth)
    assert not effect.stopGrowingButton.visible
    effect.growCheckBox.click()  # off: stored, and the next click gets a one-region session
    harness.run_event_loop()
    assert harness.editor_node.GetAttribute("FastSAM3D.Grow") == "0"
    assert harness.click((10.0, *tube_centre(10.0, 420.0)))
    assert sessions[-1].growth is None and sessions[0].growth is not None
    _choose_model(effect, harness, "fastsam3d-demo")
    _choose_model(effect, harness, "fastsam3d")
    assert not effect.growCheckBox.checked  # the user's choice holds for every model
    effect.growCheckBox.click()
    harness.run_event_loop()
    assert harness.editor_node.GetAttribute("FastSAM3D.Grow") == "1"
    _choose_model(effect, harness, "fastsam3d-demo")
    assert effect.growCheckBox.checked


def _growing(harness, monkeypatch):
    """A click on the tube with a slowed stand-in, run in Slicer's loop until it shows its growth and "Stop
    growing"; returns (effect, sessions, volume node, segmentation, segment ID, truth)."""
    node, segmentation, segment_id, truth = _tube_scene(harness)
    effect = harness.create_effect()
    effect.activate()
    sessions = _stand_in(effect, monkeypatch, encode_seconds=0.4)
    _choose_model(effect, harness, "fastsam3d")
    y, z = tube_centre(0.0, 420.0)
    assert effect.addClick((0.0, y, z))
    start = time.perf_counter()
    while not effect.stopGrowingButton.visible:  # the loop shows the growth's progress, then the button
        hold_gil(0.005)
        effect._timer.emit("timeout()")
        assert time.perf_counter() - start < 60
    return effect, sessions, node, segmentation, segment_id, truth


def test_stop_growing_writes_the_regions_so_far(harness, monkeypatch):
    effect, sessions, node, segmentation, segment_id, truth = _growing(harness, monkeypatch)
    assert effect.statusLabel.text.startswith("Growing")
    effect.stopGrowingButton.click()
    harness.run_event_loop()
    session = sessions[0]
    assert 1 <= len(session.region_set.regions) < 3
    written = segment_array(segmentation, segment_id, node)
    assert written.any() and np.count_nonzero(written & truth) < 0.9 * np.count_nonzero(truth)
    assert "point(s)" in effect.statusLabel.text and not effect.stopGrowingButton.visible


def test_leaving_the_effect_stops_a_growth_whose_result_would_be_dropped(harness, monkeypatch):
    """Leaving the Segment Editor module, Esc or another mouse mode deactivates the effect (SegmentEditor.py
    exit()): the result is not written then, so the growth must not run on for up to a minute meanwhile."""
    effect, sessions, node, segmentation, segment_id, truth = _growing(harness, monkeypatch)
    effect.deactivate()
    harness.run_event_loop()
    assert 1 <= len(sessions[0].region_set.regions) < 3
    assert not segment_array(segmentation, segment_id, node).any()
    assert "not applied" in effect.statusLabel.text


def test_quitting_from_python_stops_a_growth_at_once(harness, monkeypatch):
    """``slicer.util.exit()`` (a script, the self-test) and destroying the editor do not deactivate the effect
    first, as closing the main window does: quitting must stop the growth itself, or the quit waits the worker's
    full timeout and leaves it running in the model while Python shuts down."""
    effect, sessions, node, segmentation, segment_id, truth = _growing(harness, monkeypatch)
    worker = effect._worker
    harness.app.quit()
    assert not worker._thread.is_alive()
    assert 1 <= len(sessions[0].region_set.regions) < 3
