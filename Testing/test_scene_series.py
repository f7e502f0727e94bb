"""A series of points ends as if only its final result had been painted: voxels an earlier result took from other
segments go back to them when a later result (an exclude point, a removed point) leaves them empty."""
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's MRML without the application) is not installed")

from FastSAM3DLib import scene as sc  # noqa: E402
from test_scene_adapter import (REGION, SHAPE, app, ball, placed, segment_array, set_segment,  # noqa: E402,F401
                                three_segments)

WHOLE = np.ones(tuple(s.stop - s.start for s in REGION), bool)
SMALL = ball(WHOLE.shape, (4, 7, 8), 3)


def series_scene(app):
    """The three-segment scene with an empty segment T that a series of points writes into."""
    volume, segmentation, ids, masks, _ = three_segments(app)
    ids["T"] = segmentation.GetSegmentation().AddEmptySegment("", "T")
    return volume, segmentation, ids, masks


def arrays(segmentation, ids, volume):
    return {name: segment_array(segmentation, sid, volume) for name, sid in ids.items()}


def test_a_shrinking_result_gives_other_segments_back_what_the_series_took(app):
    volume, segmentation, ids, masks = series_scene(app)
    baseline = sc.SegmentBaseline(segmentation, ids["T"], volume)
    with sc.LogicEditor(app.scene) as editor:
        sc.write_region(segmentation, ids["T"], volume, REGION, WHOLE, editor=editor, taken=baseline.taken)
        after_first = arrays(segmentation, ids, volume)
        assert not any(after_first[name][REGION].any() for name in "ABC")  # overwrite "all": taken from all
        sc.write_region(segmentation, ids["T"], volume, REGION, SMALL, editor=editor, taken=baseline.taken)
        now = arrays(segmentation, ids, volume)
        assert np.array_equal(now["T"], placed(REGION, SMALL))
        for name in "ABC":  # C is hidden: overwrite "all" took from it too, so it gets its voxels back too
            assert np.array_equal(now[name], masks[name] & ~placed(REGION, SMALL)), name
        editor.undo()  # the give-back was part of the write: one undo goes back to the first result
        assert all(np.array_equal(arrays(segmentation, ids, volume)[n], after_first[n]) for n in ids)
        editor.redo()
        sc.write_region(segmentation, ids["T"], volume, REGION, baseline.mask_in(REGION), editor=editor,
                        taken=baseline.taken)  # every point removed
    final = arrays(segmentation, ids, volume)
    assert not final["T"].any()
    assert all(np.array_equal(final[name], masks[name]) for name in "ABC")
    assert baseline.taken.voxel_count() == 0


def test_giving_back_keeps_the_3d_surfaces_of_the_segments_it_does_not_change(app):
    """Slicer shows segments in 3D as closed surfaces, rebuilt on the main thread for every segment whose surface
    is dropped; a write into a labelmap layer followed by ``Modified()`` drops them all (``vtkSegmentation::
    OnSourceRepresentationModified``). The give-back goes through Slicer's segmentation modifier instead: only the
    segments that get voxels back have their surfaces updated, the others keep theirs."""
    volume, segmentation, ids, masks = series_scene(app)
    far = np.zeros(SHAPE, bool)
    far[0:2, 18:21, 20:24] = True  # away from the region: no write of the series touches it
    ids["D"] = set_segment(segmentation, volume, "D", far)
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    assert segmentation.CreateClosedSurfaceRepresentation()
    seg = segmentation.GetSegmentation()
    kept = {name: seg.GetSegment(ids[name]).GetRepresentation(surface) for name in ("D",)}
    baseline = sc.SegmentBaseline(segmentation, ids["T"], volume)
    with sc.LogicEditor(app.scene) as editor:
        sc.write_region(segmentation, ids["T"], volume, REGION, WHOLE, editor=editor, taken=baseline.taken)
        sc.write_region(segmentation, ids["T"], volume, REGION, SMALL, editor=editor, taken=baseline.taken)
    assert np.array_equal(segment_array(segmentation, ids["A"], volume), masks["A"] & ~placed(REGION, SMALL))
    for name in ("D",):
        assert seg.GetSegment(ids[name]).GetRepresentation(surface) is kept[name], name
    for name in "ABC":  # given back: their surfaces follow their new voxels
        poly = seg.GetSegment(ids[name]).GetRepresentation(surface)
        assert poly is not None and poly.GetNumberOfPoints() > 0, name


def test_without_a_series_the_voxels_stay_with_nobody(app):
    """The behaviour the series corrects, and what a single write (the console call) still does."""
    volume, segmentation, ids, masks = series_scene(app)
    sc.write_region(segmentation, ids["T"], volume, REGION, WHOLE)
    sc.write_region(segmentation, ids["T"], volume, REGION, SMALL)
    assert not segment_array(segmentation, ids["A"], volume)[REGION].any()


def test_a_voxel_filled_since_is_left_to_its_new_segment(app):
    volume, segmentation, ids, masks = series_scene(app)
    baseline = sc.SegmentBaseline(segmentation, ids["T"], volume)
    with sc.LogicEditor(app.scene) as editor:
        sc.write_region(segmentation, ids["T"], volume, REGION, WHOLE, editor=editor, taken=baseline.taken)
    painted = np.zeros(SHAPE, bool)
    painted[3:5, 4:7, 5:8] = True  # inside A's old part of the region, outside SMALL: the user paints D there
    assert (masks["A"] & painted).sum() == painted.sum() and not (placed(REGION, SMALL) & painted).any()
    ids["D"] = set_segment(segmentation, volume, "D", painted)
    with sc.LogicEditor(app.scene) as editor:
        sc.write_region(segmentation, ids["T"], volume, REGION, SMALL, editor=editor, taken=baseline.taken)
    now = arrays(segmentation, ids, volume)
    assert np.array_equal(now["D"], painted)
    assert np.array_equal(now["A"], masks["A"] & ~placed(REGION, SMALL) & ~painted)


def test_overwrite_visible_gives_back_to_the_visible_segments_it_took_from(app):
    volume, segmentation, ids, masks = series_scene(app)
    baseline = sc.SegmentBaseline(segmentation, ids["T"], volume)
    settings = sc.EditorSettings(overwrite="visible")
    for mask in (WHOLE, SMALL):
        sc.write_region(segmentation, ids["T"], volume, REGION, mask, settings, taken=baseline.taken)
    now = arrays(segmentation, ids, volume)
    assert np.array_equal(now["C"], masks["C"])  # hidden: never taken (it overlaps T now)
    assert np.array_equal(now["A"], masks["A"] & ~placed(REGION, SMALL))
    assert np.array_equal(now["T"], placed(REGION, SMALL))


def test_a_removed_segment_is_forgotten(app):
    volume, segmentation, ids, masks = series_scene(app)
    baseline = sc.SegmentBaseline(segmentation, ids["T"], volume)
    sc.write_region(segmentation, ids["T"], volume, REGION, WHOLE, taken=baseline.taken)
    segmentation.GetSegmentation().RemoveSegment(ids.pop("A"))
    sc.write_region(segmentation, ids["T"], volume, REGION, SMALL, taken=baseline.taken)
    now = arrays(segmentation, ids, volume)
    assert np.array_equal(now["B"], masks["B"] & ~placed(REGION, SMALL))
    assert not (now["T"] & ~placed(REGION, SMALL)).any()


def test_ctrl_z_inside_a_series_keeps_the_record_true_to_the_labels(app):
    """The record was changed in place by every write and kept across Ctrl+Z: undoing a give-back left the taken
    voxels unowed (a hole after the next point), and undoing a taking let a later point hand a segment voxels it
    had lost by its own edit since."""
    volume, segmentation, ids, masks = series_scene(app)
    baseline = sc.SegmentBaseline(segmentation, ids["T"], volume)
    with sc.LogicEditor(app.scene) as editor:
        for mask in (WHOLE, SMALL):
            sc.write_region(segmentation, ids["T"], volume, REGION, mask, editor=editor, taken=baseline.taken)
        editor.undo()  # the give-back is undone: T holds the whole region again
        sc.write_region(segmentation, ids["T"], volume, REGION, SMALL, editor=editor, taken=baseline.taken)
    now = arrays(segmentation, ids, volume)
    for name in "ABC":
        assert np.array_equal(now[name], masks[name] & ~placed(REGION, SMALL)), name

    volume, segmentation, ids, masks = series_scene(app)
    baseline = sc.SegmentBaseline(segmentation, ids["T"], volume)
    with sc.LogicEditor(app.scene) as editor:
        sc.write_region(segmentation, ids["T"], volume, REGION, WHOLE, editor=editor, taken=baseline.taken)
        editor.undo()  # nothing was taken after all
    sc.write_region(segmentation, ids["A"], volume, REGION, np.zeros_like(WHOLE))  # A's own edit clears it there
    a_alone = segment_array(segmentation, ids["A"], volume)
    with sc.LogicEditor(app.scene) as editor:
        for mask in (WHOLE, SMALL):
            sc.write_region(segmentation, ids["T"], volume, REGION, mask, editor=editor, taken=baseline.taken)
    assert np.array_equal(segment_array(segmentation, ids["A"], volume), a_alone)  # it gained nothing


def test_a_write_that_fails_while_giving_back_leaves_the_record_as_it_was(app, monkeypatch):
    """The record was changed before the write succeeded: after the rollback and a retry, voxels stayed unowed."""
    from FastSAM3DLib.scene import series

    volume, segmentation, ids, masks = series_scene(app)
    baseline = sc.SegmentBaseline(segmentation, ids["T"], volume)
    sc.write_region(segmentation, ids["T"], volume, REGION, WHOLE, taken=baseline.taken)
    real, calls = series._set_voxels, []

    def fails_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated: growing the second segment's layer")
        return real(*args)

    monkeypatch.setattr(series, "_set_voxels", fails_second)
    before = arrays(segmentation, ids, volume)
    with pytest.raises(MemoryError):
        sc.write_region(segmentation, ids["T"], volume, REGION, SMALL, taken=baseline.taken)
    assert all(np.array_equal(arrays(segmentation, ids, volume)[n], before[n]) for n in ids)
    sc.write_region(segmentation, ids["T"], volume, REGION, SMALL, taken=baseline.taken)  # the retry
    now = arrays(segmentation, ids, volume)
    for name in "ABC":
        assert np.array_equal(now[name], masks[name] & ~placed(REGION, SMALL)), name
