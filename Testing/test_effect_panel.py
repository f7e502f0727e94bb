"""The effect's panel and keys, driven through Testing/effect_harness.py: Download with its progress, Cancel and
resume (the real download code against a file server on 127.0.0.1), a click refused without weights, what the
panel shows, and which view events the effect takes from Slicer (only its own: every other event must reach the
views, or panning, scrolling and the crosshair stop working while the effect is active)."""
import io
import os

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")
torch = pytest.importorskip("torch")
import vtk  # noqa: E402

from test_effect import CENTRE, points, ready  # noqa: E402
from test_scene_adapter import make_segmentation, make_volume  # noqa: E402
from test_weights_support import FileServer, no_proxy_env, sha256, tiny_state_dict, write_manifest  # noqa: E402,F401


def padded_checkpoint():
    """A checkpoint of the tiny FastSAM3D layout with 3 MB of optimiser state, so that a download takes several
    of the downloader's 1 MB reads (progress is reported per read)."""
    checkpoint = {"model_state_dict": tiny_state_dict("fastsam3d"),
                  "optimizer_state_dict": {"state": {0: {"exp_avg": torch.randn(3 << 18)}}, "param_groups": []}}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


@pytest.fixture
def publisher(tmp_path, monkeypatch, no_proxy_env):  # noqa: F811 - a fixture used by name
    """A manifest whose model "tiny" is published on a local file server, used as the installation's manifest."""
    from FastSAM3DLib.weights import manifest

    server = FileServer()
    data = padded_checkpoint()
    url = server.serve("/tiny.pth", data)
    path = write_manifest(tmp_path / "models.json", {"name": "tiny", "filename": "tiny.pth", "size": len(data),
                                                     "sha256": sha256(data), "urls": [url]})
    monkeypatch.setattr(manifest, "default_manifest_path", lambda: path)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: True, raising=False)
    yield server, data
    server.stop()


def effect_for(harness, model):
    """The active effect with ``model`` chosen (as a saved scene or the Model menu leaves it)."""
    volume = make_volume(harness.scene)
    segmentation = make_segmentation(harness.scene, volume)
    harness.select(volume, segmentation, segmentation.GetSegmentation().AddEmptySegment("", "organ"))
    harness.editor_node.SetAttribute("FastSAM3D.Model", model)
    effect = harness.create_effect()
    effect.activate()
    return effect


def test_download_from_the_panel_shows_its_progress_and_leaves_the_model_ready(harness, publisher):
    server, data = publisher
    effect = effect_for(harness, "tiny")
    assert effect.downloadButton.enabled and "not on this computer" in effect.weightsLabel.text
    effect.downloadButton.click()
    assert effect.downloadButton.text == "Cancel download" and effect.busy()
    shown = []
    harness.run_event_loop(each_tick=lambda: shown.append(effect.weightsLabel.text))
    percents = [text for text in shown if text.startswith("downloading: ")]
    assert percents and all(text.endswith(" %") for text in percents), shown
    assert effect.statusLabel.text == "Weights ready." and effect.downloadButton.text == "Download"
    assert effect.weightsLabel.text.startswith("ready (") and not effect.downloadButton.enabled
    cached = [name for name in os.listdir(effect._logic().cacheDir()) if name.endswith(".pth")]
    assert cached == ["tiny.pth"] and len(server.gets("/tiny.pth")) == 1


def test_download_cancelled_from_the_panel_stops_and_the_next_download_resumes(harness, publisher):
    server, data = publisher
    server.plans["/tiny.pth"] = ["slow"]  # about 2 s: time to press Cancel after the first megabyte
    effect = effect_for(harness, "tiny")
    effect.downloadButton.click()

    def cancel_once_under_way():
        if effect.weightsLabel.text.startswith("downloading: ") and effect.downloadButton.text == "Cancel download":
            effect.downloadButton.click()

    harness.run_event_loop(each_tick=cancel_once_under_way)
    assert "cancelled after" in effect.statusLabel.text, effect.statusLabel.text
    assert effect.downloadButton.text == "Download" and effect.downloadButton.enabled
    assert "not on this computer" in effect.weightsLabel.text
    effect.downloadButton.click()  # again: continues from what arrived before the cancel
    harness.run_event_loop()
    assert effect.statusLabel.text == "Weights ready."
    second = server.gets("/tiny.pth")[1]["headers"]
    assert second.get("range", "").startswith("bytes=") and int(second["range"][6:-1]) >= 1 << 20


def test_a_click_with_a_model_whose_weights_cannot_be_told_is_refused_and_adds_no_point(harness):
    """A model the manifest does not list (a scene saved by another version): the click says what to do."""
    effect = effect_for(harness, "fastsam3d-v9")
    assert effect.addClick(CENTRE) is False
    assert effect.statusLabel.text.startswith("No weights for this model yet (") and "fastsam3d-v9" in \
        effect.statusLabel.text
    assert points(effect) == [] and effect._worker is None


def test_the_panel_counts_points_hides_the_token_and_warns_on_a_cpu(harness):
    effect, *_ = ready(harness)
    assert effect.pointsLabel.text == "0 point(s)"  # no point list yet
    assert effect.tokenEdit.echoMode == harness.module.qt.QLineEdit.Password
    assert effect.includeButton.checked and not effect.excludeButton.checked
    icon = effect.icon()
    assert icon[0] == "icon" and os.path.isfile(icon[1])
    harness.scripted.setParameter("Device", "cpu")
    assert effect.deviceWarning.text.startswith("Running on the CPU")  # torch is imported: the device is known
    assert harness.click(CENTRE) and effect.pointsLabel.text == "1 point(s)"


def test_clearing_the_points_ends_the_series_and_the_next_click_starts_a_new_one(harness):
    effect, volume, segmentation, segment_id = ready(harness)
    assert harness.click(CENTRE) and harness.click((CENTRE[0] + 2, CENTRE[1], CENTRE[2]))
    key = (segmentation.GetID(), segment_id)
    assert key in effect._baselines
    assert harness.key("X", shift=True) is True
    harness.run_event_loop()
    assert points(effect) == [] and key not in effect._baselines and key not in effect._sessionOrder
    assert harness.click(CENTRE) and points(effect) == [1] and key in effect._baselines


@pytest.mark.parametrize("key", ["a", "z", "Delete", "Escape", "space"])
def test_other_keys_reach_slicer_and_change_no_point(harness, key):
    effect, *_ = ready(harness)
    assert harness.click(CENTRE)
    assert harness.key(key) is False
    harness.run_event_loop()
    assert points(effect) == [1]


@pytest.mark.parametrize("event", ["MouseMoveEvent", "LeftButtonReleaseEvent", "RightButtonPressEvent",
                                   "MiddleButtonPressEvent", "MouseWheelForwardEvent", "MouseWheelBackwardEvent"])
def test_other_view_events_reach_slicer(harness, event):
    """Only a left press (or the double click a quick second press arrives as) is the effect's: Slicer pans,
    zooms, scrolls slices and moves the crosshair with the others."""
    effect, *_ = ready(harness)
    assert effect.processInteractionEvents(harness.view, getattr(vtk.vtkCommand, event), harness.view) is False
    assert points(effect) == [] and not effect.busy()


def test_a_click_while_the_previous_one_is_computed_is_refused_and_says_why(harness):
    effect, *_ = ready(harness)
    assert effect.addClick(CENTRE) is True  # its result is not collected yet: the effect is busy
    assert effect.addClick((CENTRE[0] + 2, CENTRE[1], CENTRE[2])) is False
    assert effect.statusLabel.text.startswith("Still working on the previous request")
    harness.run_event_loop()
    assert points(effect) == [1]
