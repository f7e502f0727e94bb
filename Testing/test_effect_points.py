"""The effect keeps its point list and the segment in step whatever fails: a refused click, a failed or stale
undo, an undo to no point after an option change; points of a segmentation the user left are hidden."""
import threading

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed")

import vtk  # noqa: E402

from FastSAM3DLib.session_common import Click, ClickResult  # noqa: E402
from test_effect import points, ready  # noqa: E402
from test_scene_adapter import make_segmentation, segment_array  # noqa: E402

A, B = (13.0, 11.0, 7.0), (6.0, 6.0, 7.0)


def newest_ball(radius=3.0):
    """A predictor answering a ball around the newest include point, so that every point shows in the segment."""

    def predict(volume, ras, labels):
        centre = np.asarray(ras, float)[np.flatnonzero(labels)[-1]]
        k, j, i = np.indices(volume.array.shape)
        world = np.stack([i, j, k, np.ones(volume.array.shape)], -1) @ volume.ijk_to_ras.T
        return tuple(slice(0, n) for n in volume.array.shape), \
            np.linalg.norm(world[..., :3] - centre, axis=-1) <= radius

    return predict


def test_a_failed_undo_puts_the_point_back(harness):
    effect, volume, segmentation, segment_id = ready(harness, newest_ball())
    harness.click(A)
    harness.click(B)
    shown = segment_array(segmentation, segment_id, volume)

    def broken(*args):
        raise RuntimeError("the model failed")

    effect.predictorForTesting = broken
    effect.onUndoPoint()
    harness.run_event_loop()
    assert points(effect) == [1, 1] and np.array_equal(segment_array(segmentation, segment_id, volume), shown)
    effect.predictorForTesting = newest_ball()
    effect.onUndoPoint()  # and it can be undone once the model works
    harness.run_event_loop()
    assert points(effect) == [1]
    assert np.array_equal(segment_array(segmentation, segment_id, volume), newest_ball()(
        effect._sourceVolume(volume), [A], [1])[1])


def test_an_undo_finished_after_the_effect_was_left_puts_the_point_back(harness):
    release = threading.Event()
    effect, volume, segmentation, segment_id = ready(harness, newest_ball())
    harness.click(A)
    harness.click(B)
    shown = segment_array(segmentation, segment_id, volume)
    effect.predictorForTesting = lambda *args: release.wait(30) and newest_ball()(*args)
    effect.onUndoPoint()
    effect.deactivate()
    release.set()
    harness.run_event_loop()
    assert points(effect) == [1, 1] and np.array_equal(segment_array(segmentation, segment_id, volume), shown)
    assert "point is back" in effect.statusLabel.text


def test_a_click_refused_while_reading_the_volume_leaves_no_point(harness):
    seen = []
    inner = newest_ball()
    effect, volume, segmentation, segment_id = ready(harness, lambda v, ras, labels: seen.append(len(ras))
                                                     or inner(v, ras, labels))
    warp = harness.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    spline, source, target = vtk.vtkThinPlateSplineTransform(), vtk.vtkPoints(), vtk.vtkPoints()
    for p in ((0, 0, 0), (30, 0, 0), (0, 30, 0), (0, 0, 30)):
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 1, p[1], p[2])
    spline.SetSourceLandmarks(source)
    spline.SetTargetLandmarks(target)
    warp.SetAndObserveTransformToParent(spline)
    volume.SetAndObserveTransformNodeID(warp.GetID())
    harness.click(B)  # refused: a non-linear transform
    assert points(effect) == [] and "transform" in effect.statusLabel.text.lower()
    volume.SetAndObserveTransformNodeID(None)  # the user hardens it and clicks again
    harness.click(A)
    assert points(effect) == [1] and seen == [1]  # the refused point is not fed to the model


class _BallSession:
    """A session with InteractiveSession's interface: a ball around the newest include click."""

    def __init__(self, volume):
        self.volume, self.clicks, self.growth = volume, [], None

    def _result(self):
        include = [c.ras for c in self.clicks if c.include]
        region = tuple(slice(0, n) for n in self.volume.array.shape)
        mask = newest_ball()(self.volume, include, [1] * len(include))[1] if include else \
            np.zeros(self.volume.array.shape, bool)
        return ClickResult(region, mask, 0.9, False)

    def add_click(self, ras, include=True, progress=None):
        self.clicks.append(Click(np.asarray(ras, float), include))
        return self._result()

    def undo(self):
        self.clicks.pop()
        return self._result()

    def forget_last_paste(self):
        pass  # nothing kept

    def reset(self):
        self.clicks = []

    def checkpoint(self):
        return list(self.clicks)

    def restore(self, saved):
        self.clicks = list(saved)


def with_ball_sessions(harness, monkeypatch):
    """An active effect whose logic makes :class:`_BallSession` sessions (the effect's own session path)."""
    effect, volume, segmentation, segment_id = ready(harness)
    effect.predictorForTesting = None
    monkeypatch.setattr(effect._logic(), "createSession", lambda *args, **kwargs: _BallSession(args[3]))
    monkeypatch.setattr(effect, "_ready", lambda: True)
    return effect, volume, segmentation, segment_id


def test_undoing_the_last_point_after_an_option_change_gives_the_segment_back(harness, monkeypatch):
    """A new option forgets the sessions; the new one knows no click, so it has nothing to undo: the effect
    still restores the segment as it was before the points, where they wrote."""
    effect, volume, segmentation, segment_id = with_ball_sessions(harness, monkeypatch)
    harness.click(A)
    assert segment_array(segmentation, segment_id, volume).any()
    effect.promptCombo.setCurrentIndex(effect.promptCombo.findData("all"))  # any option: new sessions
    harness.run_event_loop()
    effect.onUndoPoint()
    harness.run_event_loop()
    assert points(effect) == [] and not segment_array(segmentation, segment_id, volume).any()
    assert "Working" not in effect.statusLabel.text


def test_leaving_the_effect_by_choosing_another_segmentation_hides_the_points_shown(harness):
    """Slicer 5.10 (qMRMLSegmentEditorWidget::setSegmentationNode) selects the new segmentation first, then
    deactivates the effect: the points to hide are those activate() showed, not the new segmentation's."""
    from FastSAM3DLib import scene

    effect, volume, segmentation, segment_id = ready(harness, newest_ball())
    harness.click(A)
    shown = scene.prompt_points_node(segmentation, segment_id, create=False)
    assert shown.GetDisplayNode().GetVisibility()
    other = make_segmentation(harness.scene, volume, "other")
    harness.editor_node.SetAndObserveSegmentationNode(other)
    harness.editor_node.SetSelectedSegmentID(other.GetSegmentation().AddEmptySegment("", "other"))
    effect.deactivate()
    assert not shown.GetDisplayNode().GetVisibility()


def test_closing_the_scene_forgets_sessions_baselines_and_results_in_flight(harness, monkeypatch):
    """Node IDs are reused by the next scene: nothing of the old one may be written into it."""
    effect, volume, segmentation, segment_id = with_ball_sessions(harness, monkeypatch)
    harness.click(A)
    assert effect._sessions and effect._baselines
    generation = effect._generation
    harness.scene.Clear(0)  # File > Close scene
    harness.run_event_loop()
    assert not effect._sessions and not effect._baselines and not effect._written
    assert effect._generation == generation + 1 and effect._volume == (None, None)


def test_an_unchanged_token_keeps_the_sessions(harness, monkeypatch):
    effect, volume, segmentation, segment_id = with_ball_sessions(harness, monkeypatch)
    harness.click(A)
    assert effect._sessions
    effect.tokenEdit.text = effect._logic().serverToken() or ""
    effect.tokenEdit.emit("editingFinished()")  # focus left the field without a change
    harness.run_event_loop()
    assert effect._sessions
    effect.tokenEdit.text = "another-token-0123456789"
    effect.tokenEdit.emit("editingFinished()")
    harness.run_event_loop()
    assert not effect._sessions


def test_ticking_grow_drops_the_sessions_made_without_it(harness, monkeypatch):
    """So that a server's session made with the other choice is closed now rather than left to expire."""
    effect, volume, segmentation, segment_id = with_ball_sessions(harness, monkeypatch)
    harness.click(A)
    assert effect._sessions
    effect.growCheckBox.checked = not effect.growCheckBox.checked
    effect.growCheckBox.emit("clicked()")
    harness.run_event_loop()
    assert not effect._sessions


def test_points_give_another_segment_back_what_an_earlier_point_took(harness, monkeypatch):
    """Overwrite 'all' (Slicer's default): the first point's ball takes voxels from 'other'; once the newest point
    moves the result away, and when every point is removed, 'other' has them again."""
    from test_scene_adapter import set_segment

    effect, volume, segmentation, segment_id = with_ball_sessions(harness, monkeypatch)
    source = effect._sourceVolume(volume)
    around_a = newest_ball(radius=5.0)(source, [A], [1])[1]
    other_id = set_segment(segmentation, volume, "other", around_a)
    harness.select(volume, segmentation, segment_id)
    harness.click(A)
    ball_a = newest_ball()(source, [A], [1])[1]
    assert np.array_equal(segment_array(segmentation, other_id, volume), around_a & ~ball_a)
    harness.click(B)
    assert np.array_equal(segment_array(segmentation, segment_id, volume), newest_ball()(source, [B], [1])[1])
    assert np.array_equal(segment_array(segmentation, other_id, volume), around_a)
    effect.onUndoPoint()
    harness.run_event_loop()
    assert np.array_equal(segment_array(segmentation, other_id, volume), around_a & ~ball_a)
    effect.onUndoPoint()  # no point left
    harness.run_event_loop()
    assert not segment_array(segmentation, segment_id, volume).any()
    assert np.array_equal(segment_array(segmentation, other_id, volume), around_a)


def test_a_result_of_a_closed_scene_leaves_the_next_scenes_points_alone(harness):
    """vtkMRMLScene::Clear resets its unique IDs: the next scene's nodes get the old IDs, so putting the old
    click's point list back would remove a point the user placed in the new scene."""
    from FastSAM3DLib import scene

    from test_effect import make_volume

    release = threading.Event()
    effect, volume, segmentation, segment_id = ready(harness, lambda *args: release.wait(30) and newest_ball()(*args))
    old_ids = (volume.GetID(), segmentation.GetID())
    assert effect.addClick(A)
    harness.scene.Clear(0)  # File > Close scene while the click computes
    volume = make_volume(harness.scene)
    segmentation = make_segmentation(harness.scene, volume)
    segmentation.GetSegmentation().AddEmptySegment(segment_id, "organ")
    assert (volume.GetID(), segmentation.GetID()) == old_ids  # the IDs are reused
    node = scene.prompt_points_node(segmentation, segment_id)
    scene.add_prompt_point(node, B, include=True)  # the user's point in the new scene
    release.set()
    harness.run_event_loop()
    assert scene.ras_points_from_markups(node)[1].tolist() == [1]
    assert not segment_array(segmentation, segment_id, volume).any()


def test_a_dropped_point_removal_leaves_the_session_in_step_with_the_points(harness, monkeypatch):
    """The session had removed the point while the list got it back: the next removal found nothing to change
    and the segment kept the two-point result (found by a randomized test of the effect)."""
    effect, volume, segmentation, segment_id = with_ball_sessions(harness, monkeypatch)
    source = effect._sourceVolume(volume)
    harness.click(A)
    harness.click(B)
    effect.onUndoPoint()  # x, and the user leaves before its result is written
    effect.deactivate()
    harness.run_event_loop()
    assert points(effect) == [1, 1]
    effect.activate()
    effect.onUndoPoint()
    harness.run_event_loop()
    assert points(effect) == [1]
    assert np.array_equal(segment_array(segmentation, segment_id, volume), newest_ball()(source, [A], [1])[1])


def test_removing_every_point_after_the_source_volume_changed_gives_the_segments_back(harness, monkeypatch):
    """The series was kept per source volume: after choosing another one, removing the last point said "as it
    was" and wrote nothing, or wrote an empty mask over the segment's own earlier voxels."""
    from FastSAM3DLib import scene
    from test_effect import make_volume
    from test_scene_adapter import set_segment

    effect, volume, segmentation, segment_id = with_ball_sessions(harness, monkeypatch)
    source = effect._sourceVolume(volume)
    own = newest_ball(radius=2.0)(source, [B], [1])[1]  # the segment's voxels before the points
    scene.write_region(segmentation, segment_id, volume, (slice(None),) * 3, own)
    around_a = newest_ball(radius=5.0)(source, [A], [1])[1]
    other_id = set_segment(segmentation, volume, "other", around_a)
    harness.select(volume, segmentation, segment_id)
    harness.click(A)
    assert not np.array_equal(segment_array(segmentation, other_id, volume), around_a)
    finer = np.diag([0.5, 0.5, 0.5, 1.0])  # another source volume whose grid holds the first one's exactly
    kk, jj, ii = np.indices(tuple(2 * n for n in volume.GetImageData().GetDimensions()[::-1]))
    second = make_volume(harness.scene, finer, (ii + jj).astype(np.int16), name="second")
    harness.editor_node.SetAndObserveSourceVolumeNode(second)
    effect.sourceVolumeNodeChanged()
    effect.onUndoPoint()  # no point left
    harness.run_event_loop()
    assert points(effect) == []
    assert np.array_equal(segment_array(segmentation, other_id, volume), around_a)
    assert np.array_equal(segment_array(segmentation, segment_id, volume), own)
    assert "given back through this source volume" in effect.statusLabel.text


def test_a_click_the_session_already_has_is_written_again(harness, monkeypatch):
    """Point deleted in the Markups module, Ctrl+Z, the same click again: the session already had that point, so
    the effect said "nothing to change" while the segment (undone) was empty."""
    from FastSAM3DLib import scene

    effect, volume, segmentation, segment_id = with_ball_sessions(harness, monkeypatch)
    harness.click(A)
    shown = segment_array(segmentation, segment_id, volume)
    scene.prompt_points_node(segmentation, segment_id, create=False).RemoveNthControlPoint(0)  # in Markups
    harness.scripted.undo()  # Ctrl+Z
    assert not segment_array(segmentation, segment_id, volume).any()
    harness.click(A)
    assert np.array_equal(segment_array(segmentation, segment_id, volume), shown)
