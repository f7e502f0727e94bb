"""The Segment Editor effect's own code, driven through Testing/effect_harness.py (real MRML, real worker,
Slicer's GIL regime between timer ticks). Each test is a finding of the Slicer review that a harness can
reach; what only a real Slicer can check is listed in the README's self-test section."""
import os
import sys
import threading

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")

from effect_harness import QComboBox  # noqa: E402
from test_scene_adapter import make_segmentation, make_volume, segment_array, sphere_predictor  # noqa: E402

CENTRE = (13.0, 11.0, 7.0)  # RAS of voxel (i, j, k) = (13, 11, 7) of the identity-geometry test volume


def ready(harness, predictor=None):
    """An active effect on a test volume and a new segment, with a stand-in model unless one is given."""
    volume = make_volume(harness.scene)
    segmentation = make_segmentation(harness.scene, volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "organ")
    harness.select(volume, segmentation, segment_id)
    effect = harness.create_effect()
    effect.predictorForTesting = predictor or sphere_predictor(4.0)
    effect.activate()
    return effect, volume, segmentation, segment_id


def points(effect):
    from FastSAM3DLib import scene

    node = effect._pointsNode(create=False)
    return scene.ras_points_from_markups(node)[1].tolist() if node else []


def test_the_harness_combo_box_emits_on_its_first_item_as_qt_does():
    seen = []
    combo = QComboBox()
    combo.connect("currentIndexChanged(int)", seen.append)
    combo.addItem("a", "a")
    combo.addItem("b", "b")
    assert seen == [0]


def test_saved_settings_survive_the_first_activation_and_are_prefixed_once(harness):
    volume = make_volume(harness.scene)
    segmentation = make_segmentation(harness.scene, volume)
    harness.select(volume, segmentation, segmentation.GetSegmentation().AddEmptySegment("", "organ"))
    node = harness.editor_node  # as loaded from a saved scene
    node.SetAttribute("FastSAM3D.Model", "sam-med3d-turbo")
    node.SetAttribute("FastSAM3D.Device", "cpu")
    node.SetAttribute("FastSAM3D.PromptMode", "all")
    effect = harness.create_effect()
    effect.activate()
    assert effect._options() == ("sam-med3d-turbo", "cpu", "all")
    assert effect.modelCombo.currentData == "sam-med3d-turbo" and effect.deviceCombo.currentData == "cpu"
    assert not [name for name in node.GetAttributeNames() if name.startswith("FastSAM3D.FastSAM3D.")]
    effect.deviceCombo.setCurrentIndex(effect.deviceCombo.findData("auto"))  # a user's choice is saved
    assert node.GetAttribute("FastSAM3D.Device") == "auto"


def test_a_parameter_change_updates_the_panel_at_once_and_the_panel_is_stored_whole(harness):
    """As in Slicer, every changed parameter makes the Segment Editor call updateGUIFromMRML inside setParameter
    (the harness reproduces it with the node's EffectParameterModified event). A panel with two new choices is
    stored whole: the first stored choice must not put the second widget back before it is read."""
    effect, *_ = ready(harness)
    harness.scripted.setParameter("Device", "cpu")  # e.g. a script, or another effect's panel
    assert effect.deviceCombo.currentData == "cpu"
    for combo, value in ((effect.deviceCombo, "auto"), (effect.promptCombo, "all")):
        was = combo.blockSignals(True)
        combo.setCurrentIndex(combo.findData(value))
        combo.blockSignals(was)
    effect.updateMRMLFromGUI()
    assert effect._options() == (effect._parameter("Model"), "auto", "all")


def test_every_model_is_offered_and_offline_the_bundled_demo_is_the_default(harness):
    volume = make_volume(harness.scene)
    segmentation = make_segmentation(harness.scene, volume)
    harness.select(volume, segmentation, segmentation.GetSegmentation().AddEmptySegment("", "organ"))
    effect = harness.create_effect()
    effect.activate()
    offered = [effect.modelCombo._items[i][1] for i in range(effect.modelCombo.count)]
    assert "fastsam3d-demo" in offered and "fastsam3d" in offered
    assert effect._options()[0] == "fastsam3d-demo"  # nothing downloaded into this (empty) Slicer cache
    logic = effect._logic()
    assert logic.cacheDir().startswith(harness.app.cachePath)
    assert logic.weightsStatus("fastsam3d-demo")[0]
    assert "weights not here" in effect.modelCombo.itemText(offered.index("fastsam3d"))


def test_a_click_writes_the_segment_and_keeps_the_users_active_place_list(harness):
    effect, volume, segmentation, segment_id = ready(harness)
    selection = harness.app_logic.GetSelectionNode()
    landmarks = harness.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "landmarks")
    assert selection.GetActivePlaceNodeID() == landmarks.GetID()
    assert harness.click(CENTRE)
    written = segment_array(segmentation, segment_id, volume)
    expected = np.zeros(written.shape, bool)
    region, mask = sphere_predictor(4.0)(effect._sourceVolume(volume), [CENTRE], [1])
    expected[region] = mask
    assert np.array_equal(written, expected) and written.sum() > 50
    assert points(effect) == [1]
    assert selection.GetActivePlaceNodeID() == landmarks.GetID()


def test_polarity_is_a_toggle_and_shift_ctrl_alt_clicks_stay_slicers(harness):
    effect, volume, segmentation, segment_id = ready(harness)
    harness.view.xy_to_ras = lambda xy: CENTRE if xy == (1, 1) else (CENTRE[0] + 3.0, CENTRE[1], CENTRE[2])
    for modifier in ("shift", "control", "alt"):
        assert harness.mouse_press((1, 1), **{modifier: True}) is False  # pan, crosshair, blend: not ours
    assert points(effect) == []
    assert harness.mouse_press((1, 1)) is True
    harness.run_event_loop()
    assert harness.key("e") is True and effect.excludeButton.checked
    assert harness.mouse_press((2, 2)) is True
    harness.run_event_loop()
    assert points(effect) == [1, 0]
    effect.includeButton.click()
    assert effect._include and not effect.excludeButton.checked
    assert harness.key("x") is True
    harness.run_event_loop()
    assert points(effect) == [1]


def test_a_quick_second_click_adds_its_point_and_does_not_reach_the_view(harness):
    """Slicer's slice views maximise (or restore) on a double click, and the second press of a quick pair comes
    as a double click alone: taken as a click, it adds its point and is consumed; Ctrl + double click (reset
    window/level) stays Slicer's."""
    effect, volume, segmentation, segment_id = ready(harness)
    harness.view.xy_to_ras = lambda xy: CENTRE if xy == (1, 1) else (CENTRE[0] + 3.0, CENTRE[1], CENTRE[2])
    assert harness.mouse_press((1, 1)) is True
    harness.run_event_loop()
    assert harness.mouse_double_click((2, 2)) is True
    harness.run_event_loop()
    assert points(effect) == [1, 1]
    assert harness.mouse_double_click((2, 2), control=True) is False
    assert points(effect) == [1, 1]


def test_an_exclude_point_first_says_how_to_place_an_include_point_in_slicer(harness):
    """Shift is Slicer's crosshair and pan in the views, so the message must not send users to Shift+click."""
    volume, segmentation, segment_id = _demo_volume(harness)  # the bundled model through a real session
    effect = harness.create_effect()
    effect.activate()
    harness.view.xy_to_ras = lambda xy: (13 * 1.5, 11 * 1.5, 7 * 2.0)
    assert harness.key("e") is True
    assert harness.mouse_press((1, 1)) is True
    harness.run_event_loop()
    text = effect.statusLabel.text
    assert "include point" in text and "pressing e" in text and "Shift" not in text, text
    assert not segment_array(segmentation, segment_id, volume).any()


def test_a_saved_model_this_installation_does_not_list_is_shown_as_the_one_used(harness):
    """A scene saved by another version may name a model this one lacks: the panel shows that name (the clicks
    use it and say it has no weights), and choosing a listed model replaces it."""
    volume = make_volume(harness.scene)
    segmentation = make_segmentation(harness.scene, volume)
    harness.select(volume, segmentation, segmentation.GetSegmentation().AddEmptySegment("", "organ"))
    harness.editor_node.SetAttribute("FastSAM3D.Model", "fastsam3d-v9")
    effect = harness.create_effect()
    effect.activate()
    assert effect.modelCombo.currentData == effect._options()[0] == "fastsam3d-v9"
    assert "fastsam3d-v9" in effect.modelCombo.currentText
    effect.modelCombo.setCurrentIndex(effect.modelCombo.findData("fastsam3d-demo"))
    harness.run_event_loop()
    assert effect._options()[0] == "fastsam3d-demo"


def test_a_model_list_that_cannot_be_read_is_read_again_and_no_model_is_marked_missing(harness, monkeypatch):
    volume = make_volume(harness.scene)
    segmentation = make_segmentation(harness.scene, volume)
    harness.select(volume, segmentation, segmentation.GetSegmentation().AddEmptySegment("", "organ"))
    effect = harness.create_effect()
    logic = effect._logic()
    real = logic.modelChoices
    monkeypatch.setattr(logic, "modelChoices", lambda: (_ for _ in ()).throw(ValueError("models.json: broken")))
    effect.activate()
    assert effect.modelCombo.count == 0 and "Cannot list the models" in effect.statusLabel.text
    monkeypatch.setattr(logic, "modelChoices", real)  # e.g. the file repaired
    effect.updateGUIFromMRML()
    names = [effect.modelCombo.itemText(i) for i in range(effect.modelCombo.count)]
    assert effect.modelCombo.count > 1 and not [n for n in names if "not installed" in n], names


def test_a_result_that_arrives_after_the_effect_was_left_is_not_written(harness):
    release = threading.Event()
    stand_in = sphere_predictor(4.0)

    def slow_predictor(volume, pts, labels):
        release.wait(30)
        return stand_in(volume, pts, labels)

    effect, volume, segmentation, segment_id = ready(harness, slow_predictor)
    assert effect.addClick(CENTRE)
    effect.deactivate()  # e.g. the user picked Paint while the model was running
    release.set()
    harness.run_event_loop()
    assert not segment_array(segmentation, segment_id, volume).any()
    assert points(effect) == []  # the point of a click that was not applied is gone too
    assert "not applied" in effect.statusLabel.text


def test_a_failed_write_leaves_the_segment_and_removes_its_point(harness):
    def bad_predictor(volume, pts, labels):
        return (slice(0, 2), slice(0, 2), slice(0, 2)), np.ones((3, 3, 3), bool)  # wrong shape

    effect, volume, segmentation, segment_id = ready(harness)
    assert harness.click(CENTRE)
    before = segment_array(segmentation, segment_id, volume)
    effect.predictorForTesting = bad_predictor
    assert harness.click((CENTRE[0] + 2.0, CENTRE[1], CENTRE[2]))
    assert np.array_equal(segment_array(segmentation, segment_id, volume), before)
    assert points(effect) == [1]
    assert effect.statusLabel.styleSheet  # shown as an error


def shrinking_predictor(volume, points_ras, labels):
    """The stand-in ball around the first include point, 1 mm smaller for each exclude point."""
    return sphere_predictor(4.0 - np.count_nonzero(np.asarray(labels) == 0))(volume, points_ras, labels)


def test_ctrl_z_reverts_the_segment_and_the_next_click_uses_every_point(harness):
    effect, volume, segmentation, segment_id = ready(harness, shrinking_predictor)
    assert harness.click(CENTRE)
    first = segment_array(segmentation, segment_id, volume)
    exclude = (CENTRE[0] + 4.0, CENTRE[1], CENTRE[2])
    assert harness.click(exclude, include=False)
    assert segment_array(segmentation, segment_id, volume).sum() < first.sum()
    harness.scripted.undo()  # Ctrl+Z: the segment goes back, the points stay
    assert np.array_equal(segment_array(segmentation, segment_id, volume), first)
    assert points(effect) == [1, 0]
    assert harness.click((CENTRE[0], CENTRE[1] + 1.0, CENTRE[2]))
    region, mask = sphere_predictor(3.0)(effect._sourceVolume(volume), [CENTRE], [1])
    assert points(effect) == [1, 0, 1]  # the next click is computed from every point: the exclude point counts
    expected = first.copy()
    expected[region] = mask  # the segment becomes the result inside the result's region
    assert np.array_equal(segment_array(segmentation, segment_id, volume), expected)


def test_a_click_that_changes_nothing_adds_no_undo_step(harness):
    """As in Slicer's segmentation history, which merges a saved state nothing changed since: Ctrl+Z after a
    click whose result the segment already shows undoes the last click that changed it."""
    effect, volume, segmentation, segment_id = ready(harness)
    assert harness.click(CENTRE)
    first = segment_array(segmentation, segment_id, volume)
    assert "already showed" not in effect.statusLabel.text
    assert harness.click((CENTRE[0], CENTRE[1] + 1.0, CENTRE[2]))  # the stand-in follows the first point
    assert np.array_equal(segment_array(segmentation, segment_id, volume), first)
    assert "2 point(s)" in effect.statusLabel.text and "already showed this result" in effect.statusLabel.text
    harness.scripted.undo()
    assert not segment_array(segmentation, segment_id, volume).any()


def test_installing_is_not_started_twice_and_a_failure_shows_one_message(harness, monkeypatch):
    effect, volume, segmentation, segment_id = ready(harness)
    logic, calls = effect._logic(), []

    def install(askConfirmation=True):
        calls.append(askConfirmation)
        assert effect.onInstall() is False  # a second request while installing (processEvents re-enters)
        raise RuntimeError("pip failed")

    monkeypatch.setattr(logic, "installDependencies", install)
    assert effect.onInstall() is False
    assert calls == [True]
    assert effect.statusLabel.text.count("pip failed") == 1 and not effect._logic().installing()


def test_cleanup_disconnects_the_timer_and_ends_the_worker(harness):
    effect, volume, segmentation, segment_id = ready(harness)
    assert harness.click(CENTRE)
    worker = effect._worker
    assert harness.app.receivers("aboutToQuit()") == 1
    effect.cleanup()
    assert effect._timer.receivers("timeout()") == 0 and not effect._timer.isActive()
    assert effect._worker is None and worker.cancelled()
    assert harness.app.receivers("aboutToQuit()") == 0 and effect._sessions == {}


def test_quitting_during_a_computation_waits_for_it(harness):
    release, started, finished = threading.Event(), threading.Event(), threading.Event()
    stand_in = sphere_predictor(4.0)

    def slow_predictor(volume, pts, labels):
        started.set()
        release.wait(30)
        result = stand_in(volume, pts, labels)
        finished.set()
        return result

    effect, volume, segmentation, segment_id = ready(harness, slow_predictor)
    assert effect.addClick(CENTRE)
    assert started.wait(30)  # (a job still queued when Slicer quits is dropped, not started)
    threading.Timer(0.2, release.set).start()
    harness.app.quit()  # aboutToQuit: the job ends before the interpreter would
    assert finished.is_set() and effect._worker is None


def test_the_bundled_demo_model_segments_through_the_effect_in_the_slicer_loop(harness, one_torch_thread):
    pytest.importorskip("torch")
    volume = make_volume(harness.scene, np.diag([1.5, 1.5, 2.0, 1.0]),
                         np.pad(np.full((8, 12, 12), 300, np.int16), ((3, 3), (5, 5), (7, 7))))
    segmentation = make_segmentation(harness.scene, volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "box")
    harness.select(volume, segmentation, segment_id)
    effect = harness.create_effect()
    effect.activate()
    assert effect._options()[0] == "fastsam3d-demo"
    centre = (13 * 1.5, 11 * 1.5, 7 * 2.0)
    assert harness.click(centre)
    assert "point(s): model" in effect.statusLabel.text, effect.statusLabel.text
    assert segment_array(segmentation, segment_id, volume).any()
    assert points(effect) == [1]


def test_the_effect_segments_through_a_server_and_keeps_the_token_out_of_the_scene(harness, monkeypatch):
    pytest.importorskip("uvicorn", reason="the server's test dependencies are not installed")
    from test_server import TOKEN, Server, hash_token

    monkeypatch.delenv("FASTSAM3D_TOKEN", raising=False)
    volume = make_volume(harness.scene, np.diag([1.5, 1.5, 2.0, 1.0]),
                         np.pad(np.full((8, 12, 12), 300, np.int16), ((3, 3), (5, 5), (7, 7))))
    segmentation = make_segmentation(harness.scene, volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "box")
    harness.select(volume, segmentation, segment_id)
    effect = harness.create_effect()
    effect.activate()
    with Server(token_sha256=hash_token(TOKEN)) as server:
        effect.deviceCombo.setCurrentIndex(effect.deviceCombo.findData("server"))
        effect.serverEdit.text = server.url
        effect.serverEdit.emit("editingFinished()")
        assert effect._options()[1] == server.url
        effect.tokenEdit.text = "wrong-token-0123456789"
        effect.tokenEdit.emit("editingFinished()")
        harness.run_event_loop()
        centre = (13 * 1.5, 11 * 1.5, 7 * 2.0)
        assert harness.click(centre)
        assert "token" in effect.statusLabel.text and points(effect) == []  # refused: no point, no segment
        assert not segment_array(segmentation, segment_id, volume).any()
        effect.tokenEdit.text = TOKEN
        effect.tokenEdit.emit("editingFinished()")
        effect.growCheckBox.checked = True  # growth: its bookkeeping here, each region's decoder on the server
        effect.growCheckBox.emit("clicked()")
        harness.run_event_loop()  # the sessions opened with the old token are dropped first
        assert harness.click(centre)
        assert "point(s): model" in effect.statusLabel.text, effect.statusLabel.text
        assert segment_array(segmentation, segment_id, volume).any() and points(effect) == [1]
        session, = effect._sessions.values()  # the effect's growth choice reaches the server session
        assert session.device == server.url and session.growth is not None and effect._grows()
    names = harness.editor_node.GetAttributeNames()
    assert all(TOKEN not in (harness.editor_node.GetAttribute(n) or "") for n in names)
    assert harness.editor_node.GetAttribute("FastSAM3D.ServerURL") == server.url


def test_a_server_without_a_token_is_reached_without_reading_settings_on_the_worker(harness, monkeypatch):
    """With no token saved, the session factory read Slicer's settings (Qt) on the worker thread."""
    pytest.importorskip("uvicorn", reason="the server's test dependencies are not installed")
    from test_server import Server

    monkeypatch.delenv("FASTSAM3D_TOKEN", raising=False)
    volume = box_volume(harness)
    segmentation = make_segmentation(harness.scene, volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "box")
    harness.select(volume, segmentation, segment_id)
    effect = harness.create_effect()
    effect.activate()
    with Server() as server:
        effect.deviceCombo.setCurrentIndex(effect.deviceCombo.findData("server"))
        effect.serverEdit.text = server.url
        effect.serverEdit.emit("editingFinished()")
        assert harness.click((13 * 1.5, 11 * 1.5, 7 * 2.0))
        assert "point(s): model" in effect.statusLabel.text, effect.statusLabel.text


def box_volume(harness):
    """A bright box in a dark volume (1.5 x 1.5 x 2 mm voxels); (13 * 1.5, 11 * 1.5, 7 * 2.0) is inside it."""
    return make_volume(harness.scene, np.diag([1.5, 1.5, 2.0, 1.0]),
                       np.pad(np.full((8, 12, 12), 300, np.int16), ((3, 3), (5, 5), (7, 7))))


def _demo_volume(harness):
    """:func:`box_volume` with a segmentation and its empty segment "box" selected in the Segment Editor."""
    volume = box_volume(harness)
    segmentation = make_segmentation(harness.scene, volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "box")
    harness.select(volume, segmentation, segment_id)
    return volume, segmentation, segment_id


def _write_bank(model, path, entries=3):
    from FastSAM3DLib.benchmarks.memory import synthetic_bank
    from FastSAM3DLib.memory import save_bank

    path.parent.mkdir(parents=True, exist_ok=True)
    save_bank(synthetic_bank(model, entries), path)
    return str(path)


def test_the_memory_bank_of_the_model_is_offered_used_by_the_session_and_dropped_with_none(harness,
                                                                                            one_torch_thread):
    pytest.importorskip("torch")
    from FastSAM3DLib.memory import attached_memory
    from FastSAM3DLib.registry import build_model

    volume, segmentation, segment_id = _demo_volume(harness)
    effect = harness.create_effect()
    logic = effect._logic()
    from pathlib import Path
    folder = Path(logic.memoryBankDir())
    bank = _write_bank(build_model("fastsam3d-demo", checkpoint="cached"), folder / "demo-bank.safetensors")
    _write_bank(build_model("tiny-test", seed=0), folder / "tiny-bank.safetensors")  # another model's: not offered
    effect.activate()
    offered = [effect.memoryCombo.itemData(i) for i in range(effect.memoryCombo.count)]
    assert offered == ["", bank]
    assert effect.memoryCombo.currentData == ""  # none until the user picks one
    effect.memoryCombo.setCurrentIndex(1)
    assert harness.editor_node.GetAttribute("FastSAM3D.MemoryBank") == bank
    centre = (13 * 1.5, 11 * 1.5, 7 * 2.0)
    assert harness.click(centre)
    assert "point(s): model" in effect.statusLabel.text, effect.statusLabel.text
    assert segment_array(segmentation, segment_id, volume).any()
    model = effect._sessions[effect._sessionKey()].model
    handle = attached_memory(model)
    assert handle is not None and handle.retrievals == 1 and str(handle.bank.path) == bank
    effect.memoryCombo.setCurrentIndex(0)  # None: the sessions go; the next one's model has no bank
    harness.run_event_loop()
    assert harness.editor_node.GetAttribute("FastSAM3D.MemoryBank") == ""
    assert harness.click((centre[0] + 1.5, centre[1], centre[2]))
    assert "point(s): model" in effect.statusLabel.text, effect.statusLabel.text
    plain = effect._sessions[effect._sessionKey()].model
    assert attached_memory(plain) is None and attached_memory(model) is handle  # no model's bank was changed


def test_the_bank_menu_marks_a_bank_made_with_other_weights(harness):
    """A bank recording another checkpoint than the demo weights the effect loads is listed saying so; one
    recording the bundled file is offered as usable (both read from headers alone)."""
    pytest.importorskip("torch")
    from pathlib import Path

    from FastSAM3DLib.benchmarks.memory import synthetic_bank
    from FastSAM3DLib.memory import save_bank
    from FastSAM3DLib.files import sha256_file
    from FastSAM3DLib.registry import build_model
    from FastSAM3DLib.weights import find_checkpoint

    _demo_volume(harness)
    effect = harness.create_effect()
    folder = Path(effect._logic().memoryBankDir())
    folder.mkdir(parents=True)
    model = build_model("fastsam3d-demo", checkpoint="cached")
    for name, sha in (("same", sha256_file(find_checkpoint("fastsam3d-demo"))), ("tuned", "c" * 64)):
        bank = synthetic_bank(model, 2)
        bank.meta["checkpoint"] = f"{name}.pth (sha256 {sha})"
        save_bank(bank, folder / f"{name}.safetensors")
    effect.activate()
    texts = [effect.memoryCombo.itemText(i) for i in range(effect.memoryCombo.count)]
    assert texts[1:] == ["same.safetensors (2 entries, gt crops)",
                         "tuned.safetensors (made with other weights: not usable with these)"], texts


@pytest.mark.parametrize("spelling", ["dialog", "cache"])
def test_a_bank_chosen_in_the_file_dialog_is_the_listed_one_not_a_second_entry(harness, monkeypatch, spelling):
    """Qt's file dialog writes "/" separators on Windows too, where the listed banks have "\\", and the cache
    folder may be spelled with ".." (emulated: the dialog's "/./", or the cache's "x/.."): the bank chosen is the
    listed one, so the menu lists it once and selects it."""
    pytest.importorskip("torch")
    from pathlib import Path

    from FastSAM3DLib.registry import build_model

    _demo_volume(harness)
    effect = harness.create_effect()
    folder = Path(effect._logic().memoryBankDir())
    _write_bank(build_model("fastsam3d-demo", checkpoint="cached"), folder / "demo-bank.safetensors")
    chosen = f"{folder}/demo-bank.safetensors"
    if spelling == "dialog":
        chosen = f"{folder}/./demo-bank.safetensors"
    else:
        listed_folder = f"{folder.parent}/x/../{folder.name}"
        (folder.parent / "x").mkdir()
        monkeypatch.setattr(type(effect._logic()), "memoryBankDir", lambda self: listed_folder)
    effect.activate()
    monkeypatch.setattr(sys.modules["qt"].QFileDialog, "getOpenFileName", lambda *args: chosen)
    effect.onChooseMemoryBank()
    listed = [effect.memoryCombo.itemData(i) for i in range(effect.memoryCombo.count)]
    assert len(listed) == 2 and listed[0] == "" and effect.memoryCombo.currentData == listed[1]
    assert os.path.samefile(listed[1], folder / "demo-bank.safetensors")


def test_a_memory_bank_with_a_server_or_a_missing_file_is_refused_before_the_click(harness):
    volume, segmentation, segment_id = _demo_volume(harness)
    effect = harness.create_effect()
    effect.activate()
    harness.editor_node.SetAttribute("FastSAM3D.MemoryBank", "/nowhere/bank.safetensors")
    assert not harness.click((13 * 1.5, 11 * 1.5, 7 * 2.0))
    assert "missing" in effect.statusLabel.text and points(effect) == []
    harness.editor_node.SetAttribute("FastSAM3D.Device", "server")
    harness.editor_node.SetAttribute("FastSAM3D.ServerURL", "http://127.0.0.1:9")
    assert not harness.click((13 * 1.5, 11 * 1.5, 7 * 2.0))
    assert "local model" in effect.statusLabel.text and points(effect) == []
    assert not segment_array(segmentation, segment_id, volume).any()


def test_the_logic_segments_with_and_without_a_memory_bank(harness, one_torch_thread, tmp_path):
    pytest.importorskip("torch")
    from FastSAM3DLib import scene
    from FastSAM3DLib.memory import attached_memory
    from FastSAM3DLib.registry import build_model

    volume, segmentation, segment_id = _demo_volume(harness)
    effect = harness.create_effect()
    logic = effect._logic()
    bank = _write_bank(build_model("fastsam3d-demo", checkpoint="cached"), tmp_path / "bank.safetensors")
    centre = [13 * 1.5, 11 * 1.5, 7 * 2.0]
    node, sid = logic.segment(volume, [centre], segmentationNode=segmentation, segmentName="with",
                              model="fastsam3d-demo", device="cpu", memoryBank=bank)
    model = scene.load_model("fastsam3d-demo", "cpu", "cached", logic.cacheDir(), "exact", bank)
    handle = attached_memory(model)
    assert handle is not None and handle.retrievals == 1 and segment_array(node, sid, volume).any()
    node, sid = logic.segment(volume, [centre], segmentationNode=segmentation, segmentName="without",
                              model="fastsam3d-demo", device="cpu")
    plain = scene.load_model("fastsam3d-demo", "cpu", "cached", logic.cacheDir(), "exact")
    assert plain is not model and attached_memory(plain) is None and segment_array(node, sid, volume).any()
    assert attached_memory(model) is handle and handle.retrievals == 1  # the bank's model kept it, unused


def test_the_fast_precision_is_an_option_stored_and_used_by_the_session(harness, one_torch_thread, int8_kernel):
    pytest.importorskip("torch")
    from FastSAM3DLib.scene import batch

    batch._cached_model.cache_clear()  # a model built under another kernel choice must not be reused
    volume, segmentation, segment_id = _demo_volume(harness)
    effect = harness.create_effect()
    effect.activate()
    assert effect.precisionCombo.currentData == ""  # exact unless chosen
    centre = (13 * 1.5, 11 * 1.5, 7 * 2.0)
    assert harness.click(centre)
    assert effect._sessions[effect._sessionKey()].model.precision == "exact"
    effect.precisionCombo.setCurrentIndex(effect.precisionCombo.findData("fast"))
    harness.run_event_loop()
    assert harness.editor_node.GetAttribute("FastSAM3D.Precision") == "fast"
    assert harness.click((centre[0] + 1.5, centre[1], centre[2]))
    assert "point(s): model" in effect.statusLabel.text, effect.statusLabel.text
    assert effect._sessions[effect._sessionKey()].model.precision == "fast"
    assert segment_array(segmentation, segment_id, volume).any()


def test_a_memory_bank_works_with_the_fast_precision(harness, one_torch_thread, int8_kernel):
    """Masks of the two precisions with the demo bank agree on >= 99.96 % of voxels (README, Speed options), so
    the panel no longer refuses the pair: the session's model is int8 and retrieves from the bank."""
    pytest.importorskip("torch")
    from pathlib import Path

    from FastSAM3DLib.memory import attached_memory
    from FastSAM3DLib.registry import build_model

    volume, segmentation, segment_id = _demo_volume(harness)
    effect = harness.create_effect()
    bank = _write_bank(build_model("fastsam3d-demo", checkpoint="cached"),
                       Path(effect._logic().memoryBankDir()) / "demo-bank.safetensors")
    effect.activate()
    effect.scriptedEffect.setParameter("MemoryBank", bank)
    effect.scriptedEffect.setParameter("Precision", "fast")
    assert harness.click((13 * 1.5, 11 * 1.5, 7 * 2.0))
    assert "point(s): model" in effect.statusLabel.text, effect.statusLabel.text
    model = effect._sessions[effect._sessionKey()].model
    handle = attached_memory(model)
    assert model.precision == "fast" and handle is not None and handle.retrievals == 1
    assert segment_array(segmentation, segment_id, volume).any()


def test_the_status_says_why_the_fast_precision_is_not_used(harness, one_torch_thread, monkeypatch):
    pytest.importorskip("torch")
    from FastSAM3DLib import quantize
    from FastSAM3DLib.scene import batch

    monkeypatch.setattr(quantize, "int8_support", lambda device_type="cpu": (False, "no int8 products here"))
    batch._cached_model.cache_clear()  # a fast model built by another test must not be reused
    volume, segmentation, segment_id = _demo_volume(harness)
    effect = harness.create_effect()
    effect.activate()
    effect.precisionCombo.setCurrentIndex(effect.precisionCombo.findData("fast"))
    harness.run_event_loop()
    assert harness.click((13 * 1.5, 11 * 1.5, 7 * 2.0))
    assert effect._sessions[effect._sessionKey()].model.precision == "exact"
    assert "exact precision: no int8 products here" in effect.statusLabel.text, effect.statusLabel.text
    batch._cached_model.cache_clear()


_WITHOUT_TORCH = """
import sys
from pathlib import Path
sys.modules["torch"] = None  # a Slicer without PyTorch: importing it fails and find_spec finds nothing
import pytest
from effect_harness import EffectHarness
from test_effect import points, ready

harness = EffectHarness(pytest.MonkeyPatch(), Path(sys.argv[1]))
effect, volume, segmentation, segment_id = ready(harness)  # activation fills the panel
effect.predictorForTesting = None
assert effect.modelCombo.count and effect.statusLabel.text is not None
effect.deviceCombo.setCurrentIndex(effect.deviceCombo.findData("server"))
assert harness.editor_node.GetAttribute("FastSAM3D.Device") == "server", "the server could not be chosen"
effect.deviceCombo.setCurrentIndex(effect.deviceCombo.findData("cpu"))
harness.click((13.0, 11.0, 7.0))
print(points(effect), "|", effect.statusLabel.text)
print("torch" in sys.modules and sys.modules["torch"] is not None)
harness.close()
"""


def test_without_pytorch_the_panel_works_and_a_click_says_to_install_it(tmp_path):
    """Before PyTorch is installed (a first-time user, a server-only user, an Intel Mac) the panel must fill in,
    the server must be selectable, and a click must say what to do, not raise from the panel's code."""
    import subprocess

    testing = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([testing, os.path.dirname(testing)]))
    out = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, str(tmp_path / "cache")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    shown, loaded = out.stdout.strip().splitlines()[-2:]
    assert shown.startswith("[] |") and "needs PyTorch" in shown, shown
    assert loaded == "False"
