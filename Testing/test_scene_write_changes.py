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
from FastSAM3DLib.scene.oriented_images import oriented_image  # noqa: E402
from test_scene_adapter import (REGION, SHAPE, Logic, app, all_segments, ball, make_segmentation,  # noqa: E402,F401
                                make_volume, placed, segment_array, set_segment, three_segments)

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
        image = oriented_image(mask.astype(np.uint8), np.eye(4),
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


def _series_around_a_repeated_result(app, monkeypatch, cut):
    """T takes voxel v from O; another edit takes v from T; T's result is written again (nothing changes); another
    edit gives v back to T; the next result clears v. Returns whether O holds v at the end."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    with monkeypatch.context() as patch:
        if not cut:
            patch.setattr(writing, "_changed_part", whole_region)
        volume, segmentation, ids, masks, new = three_segments(app)
        ids["O"] = set_segment(segmentation, volume, "O", ball(SHAPE, (7, 11, 13), 2.5))
        ids["T"] = segmentation.GetSegmentation().AddEmptySegment("", "T")
        v = (7, 11, 13)

        def by_hand(segment_id, voxels, mode):
            image = oriented_image(voxels.astype(np.uint8), np.eye(4),
                                            [0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1])
            assert logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, mode, image.GetExtent())

        baseline = sc.SegmentBaseline(segmentation, ids["T"], volume)
        with sc.LogicEditor(app.scene) as editor:
            first = placed(REGION, np.zeros_like(new))
            first[6:9, 10:13, 12:15] = True
            sc.write_region(segmentation, ids["T"], volume, REGION, first[REGION], editor=editor, taken=baseline.taken)
            lost = segment_array(segmentation, ids["T"], volume)
            lost[v] = False
            by_hand(ids["T"], lost, logic.MODE_REPLACE)
            sc.write_region(segmentation, ids["T"], volume, REGION, lost[REGION], editor=editor, taken=baseline.taken)
            regained = np.zeros(SHAPE, bool)
            regained[v] = True
            by_hand(ids["T"], regained, logic.MODE_MERGE_MASK)
            sc.write_region(segmentation, ids["T"], volume, REGION, lost[REGION], editor=editor, taken=baseline.taken)
        return bool(segment_array(segmentation, ids["O"], volume)[v])


def test_a_write_that_changes_nothing_still_brings_the_series_record_up_to_date(app, monkeypatch):
    """What a series owes other segments follows the labels at every write (a voxel the segment lost by
    another edit is owed to no one any more), also at a write the cut finds nothing to do for."""
    assert _series_around_a_repeated_result(app, monkeypatch, cut=False) is False
    assert _series_around_a_repeated_result(app, monkeypatch, cut=True) is False


def test_overwrite_visible_takes_the_painted_voxels_from_a_visible_segment(app):
    """A visible segment O shares its layer with a visible E and a hidden H that lies in the region but away from
    the change. Slicer's logic looks for segments it may not overwrite across the whole edit's extent: over the
    whole region it found H, moved E to a new layer and left O the voxels overwrite "visible" should take (the
    exception in write_region's docstring). Cut to the change, the edit takes them from O, as documented."""
    volume = make_volume(app.scene)
    segmentation = make_segmentation(app.scene, volume)
    masks = {"E": np.zeros(SHAPE, bool), "O": np.zeros(SHAPE, bool), "H": np.zeros(SHAPE, bool),
             "T": np.zeros(SHAPE, bool)}
    masks["O"][4:8, 4:8, 4:8] = True
    masks["H"][10:12, 15:18, 18:22] = True
    masks["T"][2:6, 2:6, 2:6] = True  # overlaps O: T gets a layer of its own
    ids = {name: segmentation.GetSegmentation().AddEmptySegment("", name) if not mask.any() else
           set_segment(segmentation, volume, name, mask) for name, mask in masks.items()}
    segmentation.GetDisplayNode().SetSegmentVisibility(ids["H"], False)
    result = masks["T"].copy()
    result[6:8, 6:8, 6:8] = True  # T grows into O
    whole = (slice(0, SHAPE[0]), slice(0, SHAPE[1]), slice(0, SHAPE[2]))
    with sc.LogicEditor(app.scene, sc.EditorSettings(overwrite="visible")) as editor:
        assert sc.write_region(segmentation, ids["T"], volume, whole, result, editor=editor)
    assert not segment_array(segmentation, ids["O"], volume)[6:8, 6:8, 6:8].any()
    assert np.array_equal(segment_array(segmentation, ids["T"], volume), result)
    assert np.array_equal(segment_array(segmentation, ids["H"], volume), masks["H"])
