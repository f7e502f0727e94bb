"""A write edits only the part of its region where the segmentation changes, with the whole region's result.

A refining click moves a boundary in one place; Slicer's logic, its undo state and our rollback then work on the
box of that change instead of the whole region (for a segment grown over many regions, a 164-million-voxel box).
Every test here compares against the same writes over the whole region (the cut turned off).
"""
import itertools

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")

from FastSAM3DLib import scene as sc  # noqa: E402
from FastSAM3DLib.scene import writing  # noqa: E402
from test_scene_adapter import (REGION, SHAPE, Logic, app, all_segments, ball, placed, segment_array,  # noqa: E402,F401
                                set_segment, three_segments)

MASK_MODES = ["everywhere", "inside_all_segments", "outside_visible_segments", "inside_segment"]


def whole_region(segmentation, segment_id, grid, *edit):
    """``_changed_part`` turned off: every write edits its whole region, as before the cut."""
    return edit


class _RecordingEditor(sc.LogicEditor):
    """A real Segment Editor logic that records the extent of every labelmap it applies, and each undo state."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extents, self.undo_states = [], 0

    def save_state_for_undo(self):
        self.undo_states += 1
        super().save_state_for_undo()

    def modify(self, segmentation_node, segment_id, labelmap, mode):
        self.extents.append(tuple(labelmap.GetExtent()))
        super().modify(segmentation_node, segment_id, labelmap, mode)


def _steps(new):
    """A series of results for REGION: the first, a refinement in one corner, the same again, a removal."""
    refined = new.copy()
    refined[0:3, 0:4, 0:5] = True
    shrunk = refined & ~ball(new.shape, (4, 7, 8), 2.5)
    return [new, refined, refined, shrunk, np.zeros_like(new)]


def _by_hand(segmentation, volume, ids, step):
    """Edits a user makes between two clicks (other effects, or Ctrl+Z's cousins): the segment loses a slab of
    its voxels and A gains voxels inside the region, some of them the segment's."""
    if step != 2:
        return
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    erased = segment_array(segmentation, ids["T"], volume)
    erased[:, :, 12:] = False
    grown_a = segment_array(segmentation, ids["A"], volume)
    grown_a[4:8, 8:14, 6:14] = True
    for name, mask in (("T", erased), ("A", grown_a)):
        image = writing._oriented_image(mask.astype(np.uint8), np.eye(4),
                                        [0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1])
        assert logic.SetBinaryLabelmapToSegment(image, segmentation, ids[name], logic.MODE_REPLACE, image.GetExtent())


def _run_series(app, monkeypatch, make_settings, series, cut):
    """Every step's segments (and after undoing them all) for the writes of ``_steps`` into T."""
    with monkeypatch.context() as patch:
        if not cut:
            patch.setattr(writing, "_changed_part", whole_region)
        volume, segmentation, ids, masks, new = three_segments(app)
        ids["T"] = segmentation.GetSegmentation().AddEmptySegment("", "T")
        baseline = sc.SegmentBaseline(segmentation, ids["T"], volume) if series else None
        states = []
        with _RecordingEditor(app.scene, make_settings(ids)) as editor:
            for step, mask in enumerate(_steps(new)):
                _by_hand(segmentation, volume, ids, step)
                sc.write_region(segmentation, ids["T"], volume, REGION, mask, editor=editor,
                                taken=baseline.taken if baseline is not None else None)
                states.append(all_segments(segmentation, volume))
            while editor.can_undo():
                editor.undo()
            states.append(all_segments(segmentation, volume))
        order = {sid: name for name, sid in ids.items()}
        return [{order[sid]: voxels for sid, voxels in state.items()} for state in states], editor


@pytest.mark.parametrize("series", [True, False])
@pytest.mark.parametrize("mask_mode,overwrite", list(itertools.product(MASK_MODES, ["all", "visible", "none"])))
def test_a_write_cut_to_its_changes_ends_as_the_whole_regions_write(app, monkeypatch, mask_mode, overwrite, series):
    """Clicks, edits by hand between them, a repeated result, a removal, then undo to the start: every segment
    is the same after each step whether the write is cut to its changes or covers the whole region, in every
    masking and overwrite mode, with and without a series' give-back."""
    intensity = (60.0, 175.0) if mask_mode == "everywhere" else None

    def make_settings(ids):
        return sc.EditorSettings(mask_mode, ids["A"] if mask_mode == "inside_segment" else None, overwrite, intensity)

    cut_states, cut_editor = _run_series(app, monkeypatch, make_settings, series, cut=True)
    whole_states, whole_editor = _run_series(app, monkeypatch, make_settings, series, cut=False)
    assert len(cut_states) == len(whole_states) == 6
    for step, (ours, reference) in enumerate(zip(cut_states, whole_states)):
        assert ours.keys() == reference.keys()
        for name in ours:
            assert np.array_equal(ours[name], reference[name]), (step, name)
    assert sum(np.prod([e[1] - e[0] + 1, e[3] - e[2] + 1, e[5] - e[4] + 1]) for e in cut_editor.extents) < \
        sum(np.prod([e[1] - e[0] + 1, e[3] - e[2] + 1, e[5] - e[4] + 1]) for e in whole_editor.extents)


def test_a_refining_write_edits_only_the_box_of_its_changes(app):
    volume, segmentation, ids, masks, new = three_segments(app)
    with _RecordingEditor(app.scene) as editor:
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
        editor.extents.clear()
        refined = new.copy()
        refined[1:3, 2:4, 10:13] = ~refined[1:3, 2:4, 10:13]  # flip a 2x2x3 block
        assert sc.write_region(segmentation, ids["B"], volume, REGION, refined, editor=editor) is True
        box = (REGION[2].start + 10, REGION[2].start + 12, REGION[1].start + 2, REGION[1].start + 3,
               REGION[0].start + 1, REGION[0].start + 2)
        assert editor.extents and set(editor.extents) == {box}  # erase and paint, each over the block alone
        assert np.array_equal(segment_array(segmentation, ids["B"], volume)[REGION], refined)

        editor.extents.clear()
        states = editor.undo_states
        edited = sc.write_region(segmentation, ids["B"], volume, REGION, refined, editor=editor)  # the same again
        assert edited is False
        assert editor.extents == [] and editor.undo_states == states  # nothing to change: no edit, no undo state


def test_a_voxel_the_segment_keeps_is_still_taken_from_an_overlapping_segment(app):
    """The segment already holds a voxel of the result, and a segment of another layer holds it too: with the
    overwrite mode "all" the whole region's write takes it from that segment, so the cut write must edit it."""
    volume, segmentation, ids, masks, new = three_segments(app)
    with sc.LogicEditor(app.scene, sc.EditorSettings(overwrite="all")) as editor:
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)
    segmentation_ = segmentation.GetSegmentation()
    shared = placed(REGION, new) & ball(SHAPE, (REGION[0].start + 4, REGION[1].start + 7, REGION[2].start + 8), 2)
    assert shared.any()
    ids["O"] = set_segment(segmentation, volume, "O", shared)  # overlaps B: Slicer gives it its own layer
    assert segmentation_.GetLayerIndex(ids["O"]) != segmentation_.GetLayerIndex(ids["B"])
    with sc.LogicEditor(app.scene, sc.EditorSettings(overwrite="all")) as editor:
        sc.write_region(segmentation, ids["B"], volume, REGION, new, editor=editor)  # the same result again
    assert not segment_array(segmentation, ids["O"], volume).any()
    assert np.array_equal(segment_array(segmentation, ids["B"], volume)[REGION], new)
