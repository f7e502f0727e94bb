"""What the effect keeps per segment (a session with its embeddings, or a server session, a series record, a hidden
point list) goes with the segment: removed segments and segmentations, segments clicked long ago beyond
MAX_SESSIONS, and sessions replaced by a new copy of the source volume are closed, not left to idle out on a
server. The model is the threshold stand-in; its sessions record when they are closed, as a server's must be."""
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")
pytest.importorskip("torch")

from test_effect import points  # noqa: E402
from test_scene_adapter import make_segmentation, make_volume  # noqa: E402

from FastSAM3DLib.benchmarks.threshold_model import threshold_model  # noqa: E402
from FastSAM3DLib.scene import prompt_point_nodes  # noqa: E402
from FastSAM3DLib.session import InteractiveSession  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _ClosableSession(InteractiveSession):
    """A local session that records its close(), the call a server session needs to free its slot."""

    closed = False

    def close(self):
        self.closed = True


def _bright_volume(harness):
    array = np.zeros((12, 20, 20), np.int16)
    array[3:9, 4:16, 4:16] = 300
    return make_volume(harness.scene, array=array)


def _effect(harness, monkeypatch, segment_names):
    volume = _bright_volume(harness)
    segmentation = make_segmentation(harness.scene, volume)
    ids = [segmentation.GetSegmentation().AddEmptySegment("", name) for name in segment_names]
    harness.select(volume, segmentation, ids[0])
    effect = harness.create_effect()
    effect.activate()
    made = []

    def create(model, device, prompt_mode, volume, memory_bank=None, grow=False, precision=None, cacheDir=None,
               token=None):
        made.append(_ClosableSession(threshold_model(), volume, grow=grow))
        return made[-1]

    monkeypatch.setattr(effect._logic(), "createSession", create)
    monkeypatch.setattr(effect, "_ready", lambda: True)
    return effect, volume, segmentation, ids, made


def _click(harness, effect, segmentation, segment_id, volume):
    harness.select(volume, segmentation, segment_id)
    assert harness.click((10.0, 10.0, 6.0)), effect.statusLabel.text
    assert "point(s): model" in effect.statusLabel.text, effect.statusLabel.text


def test_a_removed_segment_leaves_no_session_and_a_removed_segmentation_nothing(harness, monkeypatch):
    effect, volume, segmentation, (a, b), made = _effect(harness, monkeypatch, ["a", "b"])
    _click(harness, effect, segmentation, a, volume)
    _click(harness, effect, segmentation, b, volume)
    assert len(made) == 2 and len(prompt_point_nodes(segmentation)) == 2
    segmentation.GetSegmentation().RemoveSegment(a)
    _click(harness, effect, segmentation, b, volume)  # the next click tidies up first
    harness.run_event_loop()
    assert made[0].closed and not made[1].closed
    assert list(effect._sessions) == [(segmentation.GetID(), b)]
    # its points stay with the segmentation: the Segment Editor's Ctrl+Z brings the segment back under its ID
    assert sorted(n.GetAttribute("FastSAM3D.PromptsForSegment") for n in prompt_point_nodes(segmentation)) == \
        sorted([a, b])
    restored = segmentation.GetSegmentation().AddEmptySegment(a, "a")
    assert restored == a
    _click(harness, effect, segmentation, a, volume)  # the series goes on with its first point and this one
    assert points(effect) == [1, 1] and len(made) == 3
    # a whole segmentation removed: its sessions and point lists go too
    other = make_segmentation(harness.scene, volume, name="Other")
    c = other.GetSegmentation().AddEmptySegment("", "c")
    _click(harness, effect, other, c, volume)
    lists_before = harness.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")
    harness.scene.RemoveNode(other)
    _click(harness, effect, segmentation, b, volume)
    harness.run_event_loop()
    assert made[3].closed and sorted(effect._sessions) == sorted([(segmentation.GetID(), a),
                                                                  (segmentation.GetID(), b)])
    assert harness.scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == lists_before - 1


def test_only_the_most_recently_clicked_segments_keep_a_session(harness, monkeypatch):
    from SegmentEditorFastSAM3DLib.SegmentEditorEffect import MAX_SESSIONS

    names = [f"s{i}" for i in range(MAX_SESSIONS + 2)]
    effect, volume, segmentation, ids, made = _effect(harness, monkeypatch, names)
    for segment_id in ids:
        _click(harness, effect, segmentation, segment_id, volume)
    harness.run_event_loop()
    assert [s.closed for s in made] == [True, True] + [False] * MAX_SESSIONS
    assert sorted(effect._sessions) == sorted((segmentation.GetID(), i) for i in ids[2:])
    _click(harness, effect, segmentation, ids[0], volume)  # back to the first: a new session replays its point
    harness.run_event_loop()
    assert len(made) == MAX_SESSIONS + 3 and made[2].closed
    assert len(effect._sessions) == MAX_SESSIONS


def test_only_the_segment_clicked_last_keeps_its_last_paste(harness, monkeypatch):
    """A grown segment's session keeps its last mask (the next click repastes from it: up to a byte per voxel of
    a whole CT); with up to MAX_SESSIONS sessions, only the segment clicked last keeps it."""
    effect, volume, segmentation, (a, b), made = _effect(harness, monkeypatch, ["a", "b"])
    effect.growCheckBox.checked = True
    effect.growCheckBox.emit("clicked()")
    _click(harness, effect, segmentation, a, volume)
    assert made[0].growth is not None and made[0]._pasted is not None and made[0]._pasted.mask is not None
    _click(harness, effect, segmentation, b, volume)
    harness.run_event_loop()
    assert made[0]._pasted is None and made[1]._pasted is not None and not made[0].closed
    _click(harness, effect, segmentation, a, volume)  # the first segment again: its session pastes whole, the same
    harness.run_event_loop()
    assert len(made) == 2 and made[0]._pasted is not None and made[1]._pasted is None


def test_a_renamed_volume_keeps_the_session_and_a_new_geometry_closes_the_old_one(harness, monkeypatch):
    effect, volume, segmentation, (a,), made = _effect(harness, monkeypatch, ["a"])
    _click(harness, effect, segmentation, a, volume)
    volume.SetName("renamed")  # a new node MTime: the same voxels and geometry, the same session
    _click(harness, effect, segmentation, a, volume)
    assert len(made) == 1
    volume.SetSpacing(1.0, 1.0, 1.5)  # another geometry: a new copy and session; the old one is closed
    _click(harness, effect, segmentation, a, volume)
    harness.run_event_loop()
    assert len(made) == 2 and made[0].closed and not made[1].closed
