"""Segments over several 128³ regions (issue 17): refine, blend, grow, bounds, undo, geometry, errors.

The growth mechanics are tested with :mod:`FastSAM3DLib.benchmarks.threshold_model`, a stand-in with the models'
interface that segments the bright structure around its prompts inside one region (the bundled demo model
answers any click with a ~40 mm blob, so it cannot show whether growth recovers a long object); the bounds are
also tested with the random-weight ``tiny-test`` model and an over-segmenting stand-in.
"""
import numpy as np
import pytest
import torch
from scipy import ndimage

from FastSAM3DLib import build_model, geometry, growth, regions
from FastSAM3DLib.benchmarks.long_phantoms import curved_tube, long_bone, tube_centre
from FastSAM3DLib.benchmarks.threshold_model import threshold_model
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib.errors import PromptError
from FastSAM3DLib.growth import GrowthSettings
from FastSAM3DLib.session import InteractiveSession, ModelOutputError
from FastSAM3DLib.session_common import crop_to, empty_region, union

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tube():
    return curved_tube()


@pytest.fixture(scope="module")
def bone():
    return long_bone()


def tube_click(x=0.0):
    y, z = tube_centre(x)
    return [x, float(y), float(z)]


def dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def length_covered(mask, truth, volume, axis):
    """Fraction of the object's extent along RAS ``axis`` (1 mm bins) where the mask has a voxel of the object."""
    ras = lambda m: (np.argwhere(m)[:, ::-1] @ volume.ijk_to_ras[:3, :3].T + volume.ijk_to_ras[:3, 3])[:, axis]
    wanted = set(np.floor(ras(truth)).astype(int))
    found = set(np.floor(ras(mask & truth)).astype(int))
    return len(found & wanted) / len(wanted)


def test_growth_recovers_a_curved_tube_longer_than_400_mm(tube):
    volume, truth = tube
    single = InteractiveSession(threshold_model(), volume)
    one = single.full_mask(single.add_click(tube_click()))
    grown_session = InteractiveSession(threshold_model(), volume, grow=True)
    result = grown_session.add_click(tube_click())
    grown = grown_session.full_mask(result)
    assert length_covered(one, truth, volume, 0) < 0.5  # one region: less than half the tube
    assert result.regions >= 3 and result.growth.stopped == ""
    assert length_covered(grown, truth, volume, 0) > 0.97
    assert dice(grown, truth) > 0.75 and dice(grown, truth) > dice(one, truth) + 0.25
    assert np.count_nonzero(grown & one) > 0.98 * np.count_nonzero(one)  # kept what the first region had (blend)


def test_growth_recovers_a_long_bone(bone):
    volume, truth = bone
    session = InteractiveSession(threshold_model(), volume, grow=True)
    result = session.add_click([12.0, 0.0, 0.0])  # on the cortex, mid-shaft
    mask = session.full_mask(result)
    assert result.regions >= 3
    assert length_covered(mask, truth, volume, 2) > 0.97
    assert dice(mask, truth) > 0.8


def test_oblique_anisotropic_volume_grows_the_same_object():
    tilt = np.deg2rad(20)
    direction = np.array([[np.cos(tilt), -np.sin(tilt), 0], [np.sin(tilt), np.cos(tilt), 0], [0, 0, 1]]) @ \
        np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])  # rotated about S, j and k swapped (a flip), anisotropic
    volume, truth = curved_tube(spacing=(1.6, 2.5, 1.2), direction=direction)
    session = InteractiveSession(threshold_model(), volume, grow=True)
    result = session.add_click(tube_click())
    mask = session.full_mask(result)
    assert result.regions >= 3
    assert length_covered(mask, truth, volume, 0) > 0.97 and dice(mask, truth) > 0.7


def test_one_region_is_exactly_the_single_region_session():
    """Growth on, object inside one region: the same ROI and bit for bit the same mask as without growth."""
    short_tube = curved_tube(length=90.0)[0]
    small = Volume(np.random.default_rng(0).normal(100, 20, (60, 70, 80)).astype(np.float32),
                   np.diag([1.0, 1.5, 2.0, 1.0]))  # smaller than a region: nowhere to grow
    for model, volume in ((threshold_model(), short_tube), (build_model("tiny-test", seed=0), small)):
        plain, grown = InteractiveSession(model, volume), InteractiveSession(model, volume, grow=True)
        clicks = (tube_click(), tube_click(20.0), tube_click(-15.0)) if volume is short_tube else \
            ([40.0, 50.0, 60.0], [30.0, 60.0, 70.0], [50.0, 40.0, 50.0])
        for point, include in zip(clicks, (True, True, False)):
            a, b = plain.add_click(point, include), grown.add_click(point, include)
            assert b.regions == 1 and grown.roi == plain.roi
            np.testing.assert_array_equal(plain.full_mask(a), grown.full_mask(b))
            assert torch.equal(plain.low_res_logits, grown.low_res_logits)


def test_undo_restores_exactly_the_state_before_a_growing_click(tube):
    volume, _ = tube
    session = InteractiveSession(threshold_model(), volume, grow=True)
    first = session.add_click(tube_click(-150.0), progress=lambda p: False)  # no growth yet
    before_set, before_mask = session.region_set, session.full_mask(first)
    second = session.add_click(tube_click(150.0))  # another part of the tube: new region, growth
    assert second.regions > first.regions
    undone = session.undo()
    assert session.region_set is before_set and len(session.clicks) == 1
    np.testing.assert_array_equal(session.full_mask(undone), before_mask)
    assert undone.region == union(undone.region, second.region)  # covers every region the click touched
    empty = session.undo()
    assert not session.full_mask(empty).any() and session.region_set.regions == {}


def test_a_click_refines_only_the_regions_that_contain_it(tube):
    volume, _ = tube
    session = InteractiveSession(threshold_model(), volume, grow=True)
    session.add_click(tube_click())
    before = dict(session.region_set.regions)
    result = session.add_click(tube_click(-190.0), include=False)  # exclude near the end of the tube
    changed = {i for i, s in session.region_set.regions.items() if before.get(i) is not s}
    lattice = session.region_set.lattice
    holding = {i for i in before if lattice.roi(i).contains(np.array([tube_click(-190.0)]))[0]}
    assert changed == holding == set(result.growth.refined) and len(holding) < len(before)


def test_growth_is_bounded_by_regions_time_and_the_progress_callback(tube):
    volume, _ = tube
    limited = InteractiveSession(threshold_model(), volume, grow=GrowthSettings(max_regions=2))
    result = limited.add_click(tube_click())
    assert result.regions == 2 and result.growth.stopped == "max_regions"
    timed = InteractiveSession(threshold_model(), volume, grow=GrowthSettings(time_budget_s=1e-9))
    assert timed.add_click(tube_click()).growth.stopped == "time"
    calls = []
    cancelled = InteractiveSession(threshold_model(), volume, grow=True)
    result = cancelled.add_click(tube_click(), progress=lambda p: calls.append(p) or False)
    assert result.growth.stopped == "cancelled" and result.regions == 1 and len(calls) == 1
    assert calls[0].regions == 1 and calls[0].added == 0 and calls[0].queued >= 1
    cancelled.undo()  # the click and whatever it grew: one undo step
    assert cancelled.region_set.regions == {} and cancelled.clicks == []


def test_an_over_segmenting_model_does_not_run_away():
    volume, _ = curved_tube(length=700.0)
    session = InteractiveSession(threshold_model(fill=5.0), volume, grow=True)
    result = session.add_click(tube_click())
    assert result.regions == 1 and result.growth.added == []  # a full region is never grown from
    forced = InteractiveSession(threshold_model(fill=5.0), volume, grow=GrowthSettings(max_fill=1.0, max_regions=4))
    result = forced.add_click(tube_click())  # without the fill rule only the limits stop it
    assert result.regions == 4 and result.growth.stopped == "max_regions"
    random = InteractiveSession(build_model("tiny-test", seed=0), volume, grow=True)
    assert random.add_click(tube_click()).regions <= GrowthSettings().max_regions


def test_grown_regions_that_disagree_with_the_known_mask_are_refused(tube):
    volume, _ = tube
    session = InteractiveSession(threshold_model(), volume, grow=True)
    session.add_click(tube_click())
    picky = InteractiveSession(threshold_model(), volume, grow=GrowthSettings(min_iou=0.95))
    result = picky.add_click(tube_click())
    assert result.regions == 1 and result.growth.refused
    assert all(reason.startswith("unsure") for reason in result.growth.refused.values())


def test_model_failure_during_growth_changes_nothing(tube):
    volume, _ = tube
    model = threshold_model()
    session = InteractiveSession(model, volume, grow=True)
    session.add_click(tube_click(-150.0), progress=lambda p: False)
    state, clicks = session.region_set, list(session.clicks)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:  # the first region decodes, the second (grown) gives NaN
            return output[0] * float("nan"), output[1]
        return output

    embeddings = list(session._embeddings)
    handle = model.mask_decoder.register_forward_hook(poison)
    try:
        with pytest.raises(ModelOutputError):
            session.add_click(tube_click(150.0))
    finally:
        handle.remove()
    assert session.region_set is state and session.clicks == clicks
    assert list(session._embeddings) == embeddings  # the failed click's grown region left no embedding


def test_a_failed_growing_click_gives_back_the_embeddings_it_evicted(tube):
    volume, _ = tube
    model = threshold_model()
    session = InteractiveSession(model, volume, grow=GrowthSettings(max_embeddings=2))
    stop = lambda p: False  # noqa: E731 - no growth: one region
    session.add_click(tube_click(-150.0), progress=stop)
    embeddings = list(session._embeddings)
    calls = {"n": 0}

    def poison(module, args, output):  # refine region 0, grow region 1, then NaN in region 2 (which evicted 0)
        calls["n"] += 1
        return (output[0] * float("nan"), output[1]) if calls["n"] == 3 else output

    handle = model.mask_decoder.register_forward_hook(poison)
    try:
        with pytest.raises(ModelOutputError):
            session.add_click(tube_click(-140.0))
    finally:
        handle.remove()
    assert calls["n"] == 3 and list(session._embeddings) == embeddings
    assert session.add_click(tube_click(-145.0), progress=stop).encoded is False  # region 0 needs no encoding


def test_a_neighbour_whose_image_cannot_be_normalised_is_refused_not_the_click():
    """A region holding only one constant bright value (a saturated rod, air) has no z-normalisation: growth
    refuses that neighbour and the click keeps what it segmented."""
    rng = np.random.default_rng(0)
    array = np.zeros((40, 40, 300), np.float32)
    array[:, :, :90] = rng.normal(50, 10, (40, 40, 90)).clip(1)  # tissue around the click only
    k, j = np.indices((40, 40))
    array[(k - 20) ** 2 + (j - 20) ** 2 <= 16] = 300.0  # a constant rod along i through the whole volume
    volume = Volume(array, np.diag([1.5, 1.5, 1.5, 1.0]))
    session = InteractiveSession(threshold_model(), volume, grow=True)
    result = session.add_click([90.0, 30.0, 30.0])
    assert result.voxels > 0 and len(session.clicks) == 1
    assert any("cannot be used" in why for why in result.growth.refused.values()), result.growth.refused


def test_blend_keeps_single_cover_exact_and_fades_across_the_overlap():
    volume = Volume(np.zeros((10, 10, 10), np.float32), np.eye(4))
    grid = geometry.canonical_grid(volume)
    lattice = regions.Lattice(grid, (0, 0, 0), 128, 96)
    a = torch.randn(1, 1, 32, 32, 32)
    b = torch.randn(1, 1, 32, 32, 32)
    first, field, covered = regions.blend(lattice, {(0, 0, 0): a, (1, 0, 0): b})
    assert tuple(field.shape) == (56, 32, 32) and bool(covered.all())
    assert torch.equal(field[:24], a[0, 0, :24].double()) and torch.equal(field[32:], b[0, 0, 8:].double())
    overlap = field[24:32]
    low, high = torch.minimum(a[0, 0, 24:], b[0, 0, :8]).double(), torch.maximum(a[0, 0, 24:], b[0, 0, :8]).double()
    assert bool(((overlap >= low - 1e-12) & (overlap <= high + 1e-12)).all())
    # the weight of region a falls from 15/16 to 1/16 across the 8 shared cells
    ones, zeros = torch.ones_like(a), torch.zeros_like(b)
    ramp = regions.blend(lattice, {(0, 0, 0): ones, (1, 0, 0): zeros})[1][24:32, 16, 16]
    np.testing.assert_allclose(ramp.numpy(), (np.arange(8)[::-1] + 0.5) / 8)


def test_no_voxel_outside_every_region_is_set():
    """An L of regions: the empty corner stays empty even where its neighbours' logits are positive."""
    volume = Volume(np.zeros((120, 120, 120), np.float32), np.eye(4) * [1.5, 1.5, 1.5, 1])
    lattice = regions.Lattice(geometry.canonical_grid(volume), (0, 0, 0), 128, 96)
    positive = torch.full((1, 1, 32, 32, 32), 3.0)
    region, mask = regions.paste(volume, lattice, {(0, 0, 0): positive, (1, 0, 0): positive, (0, 1, 0): positive})
    full = np.zeros(volume.shape, bool)
    full[region] = mask
    assert full[:, :128, :128].all()  # (k, j, i): region (0, 0, 0) covers i, j < 128
    assert not full[:, 128:, 128:].any()  # the corner no region covers
    assert full[:, :128, 128:].all() and full[:, 128:, :128].all()


def _rotated(degrees: float) -> np.ndarray:
    """A rotation about S by ``degrees`` (3x3)."""
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


SWAP_JK = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])  # j and k swapped, one axis flipped
#: Volumes for the paste-back comparisons: isotropic, thick slices, permuted and flipped (axis-aligned), oblique.
GRIDS = {"tube 2 mm": dict(spacing=(2.0, 2.0, 2.0)), "tube 3 mm": dict(spacing=(3.0, 3.0, 3.0)),
         "tube swapped anisotropic": dict(spacing=(1.6, 2.5, 1.2), direction=SWAP_JK),
         "tube oblique anisotropic": dict(spacing=(1.6, 2.5, 1.2), direction=_rotated(20) @ SWAP_JK)}


def _ties(volume, lattice, logits, box, tolerance=1e-9):
    """Voxels of ``box`` whose blended, interpolated logit lies within ``tolerance`` of the threshold 0: where
    summing the same products in another order (another box, another matrix-product blocking) may flip a voxel."""
    above, below = (crop_to(*regions.paste(volume, lattice, logits, threshold), box)
                    for threshold in (-tolerance, tolerance))
    return above & ~below


def _repaste_everything(volume, before, current, shown):
    """The reference for :func:`growth.paste_result`: every region of ``current`` blended and pasted over their
    whole box (:func:`regions.paste`), the uncovered cells cleared voxel by voxel (the general path), cropped to
    the box of both region sets and what was shown."""
    lattice = current.lattice or before.lattice
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(regions, "_axis_cells", lambda *args: None)
        region, mask = regions.paste(volume, lattice, current.logits()) if current.regions else \
            (empty_region(), None)
    extent = regions.source_extent(volume, lattice, list(before.regions)) if before.regions else None
    box = union(union(region, extent), shown)
    return box, crop_to(region, mask, box), (region if mask is not None else None)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_grown_results_equal_a_full_repaste_over_clicks_and_undos(grid, monkeypatch):
    """Random clicks (growing or stopped, include or exclude, on and off the tube) and undos: every result of
    the session is bit for bit the reference full re-paste, including the clearing of voxels in cells no region
    covers (a region off the tube leaves such cells next to the tube's end: some voxels must be cleared). Where
    the session pasted only the regions a click changed (:func:`regions.repaste`), a voxel may differ only where
    its logit is a tie (within 1e-9 of the threshold: the stand-in's +-4 logits make many exact ties)."""
    volume, _ = curved_tube(**GRIDS[grid])
    compared, cleared = [], []
    clear = regions._clear_uncovered

    def counting_clear(volume, roi, covered, field, region, mask):
        count = int(mask.sum())
        clear(volume, roi, covered, field, region, mask)
        cleared.append(count - int(mask.sum()))

    def checked(volume, before, current, shown, pasted):
        calls = len(repasted)
        box, mask, now_pasted = paste_result(volume, before, current, shown, pasted)
        region = now_pasted.shown
        want_box, want_mask, want_region = _repaste_everything(volume, before, current, shown)
        assert box == want_box and region == want_region and mask.shape == want_mask.shape
        if len(repasted) == calls or not repasted[-1]:  # pasted whole, or the last paste reused
            assert np.array_equal(mask, want_mask), f"{np.count_nonzero(mask != want_mask)} voxels differ"
        else:  # only the changed regions pasted again: the same products summed in another blocking
            differ = mask != want_mask
            assert not np.any(differ & ~_ties(volume, current.lattice, current.logits(), box)), "not ties"
        compared.append(len(current.regions))
        return box, mask, now_pasted

    def counting_repaste(*args, **kwargs):
        whole = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(regions, "_paste_blended", lambda *a: whole.append(1) or paste_blended(*a))
            result = repaste(*args, **kwargs)
        repasted.append(not whole)  # True: only the changed regions' reach was pasted again
        return result

    paste_result, repaste, paste_blended, repasted = growth.paste_result, regions.repaste, regions._paste_blended, []
    monkeypatch.setattr(growth, "paste_result", checked)
    monkeypatch.setattr(regions, "repaste", counting_repaste)
    monkeypatch.setattr(regions, "_clear_uncovered", counting_clear)
    session = InteractiveSession(threshold_model(), volume, grow=True)
    stop = lambda progress: False  # noqa: E731 - a click without growth: gaps between regions stay
    session.add_click(tube_click(0.0), progress=stop)  # the tube reaches the region's faces
    y, z = tube_centre(150.0)
    session.add_click([150.0, y - 80.0, z], progress=stop)  # a diagonal region: the cells beside the end are empty
    rng = np.random.default_rng(sorted(GRIDS).index(grid))
    for _ in range(12):
        if session.clicks and rng.random() < 0.3:
            session.undo()
            continue
        point = np.asarray(tube_click(rng.uniform(-220.0, 220.0))) + \
            (rng.choice([-1.0, 1.0], 3) * [0.0, 80.0, 25.0] * (rng.random(3) < 0.5) if rng.random() < 0.3 else 0.0)
        try:
            session.add_click(point, include=rng.random() < 0.75, progress=stop if rng.random() < 0.4 else None)
        except PromptError:  # off the tube and outside the volume, or an exclude point first: nothing changed
            continue
    while session.clicks:
        session.undo()
    assert len(compared) >= 10 and max(compared) >= 3 and sum(cleared) > 0
    assert sum(repasted) >= 3  # refining clicks and their undos pasted only the regions they changed


def _repaste_in_part(*args):
    """:func:`regions.repaste`, failing if it made the whole paste instead: the tests below check its own path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(regions, "_paste_blended", lambda *_: pytest.fail("the whole paste was made instead"))
        return regions.repaste(*args)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_repasting_the_changed_regions_gives_the_whole_paste(grid):
    """:func:`regions.repaste` from the paste of other logits (random, so no ties) gives the whole paste's mask,
    for a change in one region or two, at the lattice's edge or inside, next to cells no region covers."""
    volume = curved_tube(length=200.0, **GRIDS[grid])[0]
    lattice = regions.Lattice(geometry.canonical_grid(volume), (-40, 8, -20), 128, 96)
    rng = np.random.default_rng(sorted(GRIDS).index(grid))
    random = lambda: torch.from_numpy(rng.normal(0.0, 1.0, (1, 1, 32, 32, 32)).astype(np.float32))  # noqa: E731
    logits = {index: random() for index in [(0, 0, 0), (1, 0, 0), (2, 0, 0), (1, 1, 0), (0, 0, 1), (2, 1, 1)]}
    pasted = regions.paste(volume, lattice, logits)
    for changed in ([(1, 0, 0)], [(2, 1, 1)], [(2, 0, 0), (2, 1, 1)]):
        logits.update({index: random() for index in changed})
        region, mask = _repaste_in_part(volume, lattice, logits, changed, pasted)
        want_region, want = regions.paste(volume, lattice, logits)
        assert region == want_region and mask is not pasted[1]
        differ = mask != want
        assert np.count_nonzero(want != pasted[1]) > 100 and np.count_nonzero(differ) <= 2, np.count_nonzero(differ)
        assert not np.any(differ & ~_ties(volume, lattice, logits, region))
        pasted = (region, mask)
    fewer = {index: logits[index] for index in [(0, 0, 0), (1, 0, 0)]}
    with pytest.raises(ValueError, match="not a paste of these regions"):  # the last paste of other regions
        regions.repaste(volume, lattice, fewer, [(1, 0, 0)], pasted)
    logits[(1, 0, 0)] = torch.full((1, 1, 32, 32, 32), float("nan"))
    with pytest.raises(ValueError, match="NaN"):  # refused as the whole paste refuses it
        regions.repaste(volume, lattice, logits, [(1, 0, 0)], pasted)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_repasting_a_sparse_segment_gives_the_whole_paste(grid, monkeypatch):
    """Logits mostly below the threshold with a few positive blobs (a small or thin segment): the repaste
    thresholds only near positive cells and clears the rest of what it recomputes, so a region that loses its
    blobs, one that gains some and one that moves them all give the whole paste's mask. (The copy's cost is
    taken as nothing, so that the repaste does not hand such small volumes to the whole paste.)"""
    monkeypatch.setattr(regions, "_COPY_COST", 0.0)
    volume = curved_tube(length=200.0, **GRIDS[grid])[0]
    lattice = regions.Lattice(geometry.canonical_grid(volume), (-40, 8, -20), 128, 96)
    rng = np.random.default_rng(10 + sorted(GRIDS).index(grid))

    def sparse(blobs=4):
        cells = rng.normal(-3.0, 0.5, (32, 32, 32))
        for _ in range(blobs):
            x, y, z = rng.integers(0, 28, 3)
            cells[x:x + 4, y:y + 4, z:z + 4] = rng.normal(2.0, 0.5, (4, 4, 4))
        return torch.from_numpy(cells.astype(np.float32)[None, None])

    logits = {index: sparse() for index in [(0, 0, 0), (1, 0, 0), (2, 0, 0), (1, 1, 0), (0, 0, 1), (2, 1, 1)]}
    pasted, changes = regions.paste(volume, lattice, logits), []
    for changed, blobs in (([(1, 0, 0)], 0), ([(1, 0, 0)], 6), ([(1, 0, 0), (1, 1, 0)], 3)):
        logits.update({index: sparse(blobs) for index in changed})
        region, mask = _repaste_in_part(volume, lattice, logits, changed, pasted)
        want_region, want = regions.paste(volume, lattice, logits)
        assert region == want_region and np.array_equal(mask, want), f"{np.count_nonzero(mask != want)} differ"
        changes.append(int(np.count_nonzero(want != pasted[1])))
        pasted = (region, mask)
    assert min(changes) > 0 and sum(changes) > 1000, changes


def test_repasting_a_thin_segment_makes_the_whole_paste(monkeypatch):
    """Where the segment's positive cells span less than a copy of the last mask would cost (a vessel, a small
    lesion in a grown segment), the repaste makes the whole paste instead: the same mask, exactly."""
    volume = curved_tube(length=200.0, **GRIDS["tube 2 mm"])[0]
    lattice = regions.Lattice(geometry.canonical_grid(volume), (-40, 8, -20), 128, 96)
    logits = {index: torch.full((1, 1, 32, 32, 32), -3.0) for index in [(0, 0, 0), (1, 0, 0), (1, 1, 0)]}
    logits[(0, 0, 0)][..., 16:18, 10:12, 10:12] = 2.0  # two small lesions, 18 cells apart
    logits[(1, 0, 0)][..., 10:12, 10:12, 10:12] = 2.0
    pasted = regions.paste(volume, lattice, logits)
    assert ndimage.label(pasted[1])[1] == 2
    logits[(1, 0, 0)] = logits[(1, 0, 0)].roll(1, dims=2)
    whole, paste_blended = [], regions._paste_blended
    monkeypatch.setattr(regions, "_paste_blended", lambda *args: whole.append(1) or paste_blended(*args))
    region, mask = regions.repaste(volume, lattice, logits, [(1, 0, 0)], pasted)
    assert whole == [1] and np.array_equal(mask, regions.paste(volume, lattice, logits)[1])
    assert 0 < np.count_nonzero(mask != pasted[1])


def test_repaste_reaches_two_cells_beyond_the_changed_regions():
    """A refined region's logits reach source voxels two low-res cells beyond it (the fill of the uncovered
    cells next to it, then the interpolation): a repaste that thresholded only one cell around it misses
    some of them (about 300 voxels here)."""
    volume = curved_tube(length=200.0, **GRIDS["tube 2 mm"])[0]
    lattice = regions.Lattice(geometry.canonical_grid(volume), (-40, 8, -20), 128, 96)
    rng = np.random.default_rng(3)
    logits = {index: torch.from_numpy(rng.normal(0.0, 0.05, (1, 1, 32, 32, 32)).astype(np.float32))
              for index in [(0, 0, 0), (1, 1, 0)]}
    logits[(1, 1, 0)] = torch.full((1, 1, 32, 32, 32), -3.0)
    pasted = regions.paste(volume, lattice, logits)
    logits[(1, 1, 0)] = torch.full((1, 1, 32, 32, 32), 3.0)
    region, mask = _repaste_in_part(volume, lattice, logits, [(1, 1, 0)], pasted)
    want = regions.paste(volume, lattice, logits)[1]
    assert np.array_equal(mask, want), f"{np.count_nonzero(mask != want)} voxels differ"


@pytest.mark.parametrize("grid", sorted(name for name in GRIDS if "oblique" not in name))
def test_uncovered_cells_are_cleared_slab_by_slab_as_voxel_by_voxel(grid):
    """The axis-aligned clearing and the voxel-by-voxel one give the same mask, on any mask (random voxels) over
    lattices of diagonal and L-shaped regions reaching past the volume's faces."""
    volume = curved_tube(length=200.0, **GRIDS[grid])[0]
    grid_box = geometry.canonical_grid(volume)
    rng = np.random.default_rng(0)
    changed = 0
    for origin in ((0, 0, 0), (-40, 8, -20), (grid_box.size[0] - 100, -64, 12)):
        lattice = regions.Lattice(grid_box, origin, 128, 96)
        for indices in ([(0, 0, 0), (1, 0, 0), (0, 1, 0)], [(0, 0, 0), (1, 1, 1)], [(0, 0, 0), (1, 1, 0), (-1, 0, 1)]):
            first, field, covered = regions.blend(lattice, {i: torch.ones(1, 1, 32, 32, 32) for i in indices})
            roi = lattice.grid.sub_grid(np.asarray(origin) + 4 * np.asarray(first), tuple(4 * n for n in field.shape))
            region = regions.source_extent(volume, lattice, indices)
            mask = rng.random(tuple(s.stop - s.start for s in region)) < 0.7
            slabs, voxels = mask.copy(), mask.copy()
            regions._clear_uncovered(volume, roi, covered.numpy(), field.numpy(), region, slabs)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(regions, "_axis_cells", lambda *args: None)
                regions._clear_uncovered(volume, roi, covered.numpy(), field.numpy(), region, voxels)
            np.testing.assert_array_equal(slabs, voxels)
            changed += np.count_nonzero(mask != voxels)
            to_model = np.linalg.inv(roi.model_to_ras) @ volume.ijk_to_ras
            assert regions._axis_cells(to_model, (0, 0, 0), (1, 1, 1), covered.shape) is not None  # slab path
    assert changed > 10000  # the comparison saw many cleared voxels


def test_oblique_grids_are_cleared_voxel_by_voxel():
    """A volume rotated against the model grid mixes axes: no slab path (its cells would be wrong)."""
    volume = curved_tube(length=200.0, **GRIDS["tube oblique anisotropic"])[0]
    grid = geometry.canonical_grid(volume)
    to_model = np.linalg.inv(grid.model_to_ras) @ volume.ijk_to_ras
    assert regions._axis_cells(to_model, (0, 0, 0), (1, 1, 1), (32, 32, 32)) is None
    aligned = curved_tube(length=200.0, **GRIDS["tube swapped anisotropic"])[0]
    to_model = np.linalg.inv(geometry.canonical_grid(aligned).model_to_ras) @ aligned.ijk_to_ras
    assert regions._axis_cells(to_model, (0, 0, 0), (1, 1, 1), (32, 32, 32)) is not None


def test_settings_are_checked_with_one_line_errors():
    for bad in (dict(max_regions=0), dict(overlap=12), dict(points=0), dict(max_fill=0.0), dict(time_budget_s=0)):
        with pytest.raises(ValueError) as info:
            GrowthSettings(**bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError):
        InteractiveSession(threshold_model(), grow="yes")


def test_embeddings_are_bounded_and_dropped_with_their_regions(tube):
    volume, _ = tube
    bounded = InteractiveSession(threshold_model(), volume, grow=GrowthSettings(max_embeddings=2))
    free = InteractiveSession(threshold_model(), volume, grow=True)
    a, b = bounded.add_click(tube_click(-150.0)), free.add_click(tube_click(-150.0))
    assert a.regions == b.regions >= 3 and len(bounded._embeddings) == 2 and len(free._embeddings) == a.regions
    np.testing.assert_array_equal(bounded.full_mask(a), free.full_mask(b))  # re-encoding gives the same
    bounded.add_click(tube_click(-140.0), include=False)  # a region dropped from the cache is encoded again
    assert len(bounded._embeddings) <= 2
    free.undo()
    assert free._embeddings == {} or all(roi in {s.roi for s in free.region_set.regions.values()}
                                         for roi in free._embeddings)


def test_the_embedding_cache_drops_the_least_recently_used_region(tube):
    volume, _ = tube
    session = InteractiveSession(threshold_model(), volume, grow=GrowthSettings(max_embeddings=2))
    first, second, third = (geometry.roi_around(volume, np.array([tube_click(x)]), session.size, session.spacing)
                            for x in (-150.0, -50.0, 50.0))
    assert len({first, second, third}) == 3
    encoded, encode = [], session._encode
    session._encode = lambda roi: encoded.append(roi) or encode(roi)
    for roi in (first, second, first, third, first, second):
        session.region_embedding(roi, {})
    # third evicts second (first was used after it); second then evicts third, the least recent after first
    assert encoded == [first, second, third, second] and list(session._embeddings) == [first, second]


def test_segment_command_keeps_every_clicked_region_unless_no_grow(tmp_path, capsys):
    """``--grow``: two clicks 300 mm apart both stay; --no-grow keeps only the last region, and so does the demo
    model's default (it was measured not to gain from growth)."""
    import SimpleITK as sitk

    from FastSAM3DLib.cli import main

    volume, _ = curved_tube(length=420.0, spacing=(3.0, 3.0, 3.0))
    image = tmp_path / "tube.nii.gz"
    sitk.WriteImage(volume.to_sitk(), str(image))
    points = [f"--point={p[0]},{p[1]},{p[2]}" for p in (tube_click(-150.0), tube_click(150.0))]
    masks = {}
    for option in ("--grow", "--no-grow", ""):
        out = tmp_path / f"{option.strip('-') or 'default'}.nii.gz"
        args = ["segment", str(image), *points, "--model", "fastsam3d-demo", *([option] if option else []), "-o"]
        assert main([*args, str(out)]) == 0
        masks[option] = Volume.from_file(out).array > 0
    assert np.array_equal(masks[""], masks["--no-grow"])
    ras = lambda m: (np.argwhere(m)[:, ::-1] @ volume.ijk_to_ras[:3, :3].T + volume.ijk_to_ras[:3, 3])[:, 0]  # noqa
    assert ras(masks["--grow"]).min() < -100 and ras(masks["--grow"]).max() > 100  # both ends of the tube
    assert ras(masks["--no-grow"]).min() > 0  # the region moved to the second click: the first result is gone
    capsys.readouterr()
    assert main(["segment", str(image), points[0], "--model", "fastsam3d-demo", "--max-regions", "0",
                 "-o", str(tmp_path / "x.nii.gz")]) == 2
    error = capsys.readouterr().err.strip()
    assert "--max-regions" in error and "\n" not in error and not (tmp_path / "x.nii.gz").exists()


def test_make_bench_reports_the_memory_of_a_20_region_segment(one_torch_thread, monkeypatch):
    """The make bench rows: 20 regions grown and 10 more clicks keep the logits and at most 32 embeddings; a
    refining click's paste on a segment grown through a volume (here a small one: 256x256x150), for an
    ellipsoid and a thin tube, whole and where the click changed it; every row says why in a dry run."""
    from FastSAM3DLib.benchmarks import growth as growth_bench
    from FastSAM3DLib.benchmarks.suite import Plan, extra_benchmarks

    monkeypatch.setattr(growth_bench, "PASTE_VOLUME", ((150, 256, 256), (1.2, 1.2, 2.0)))
    assert growth_bench.bench_rows in extra_benchmarks()
    measured = growth_bench.bench_rows(Plan(), "test CPU")
    rows = {r["name"]: r for r in measured}
    retained = rows["growth_retained_mb"]["value"]
    logits_floor = 20 * 32 ** 3 * 4 / 1e6  # at least each region's current logits
    last_mask = 112 * 112 * 256 / 1e6  # at most one byte per voxel of the benchmark's volume
    assert logits_floor < retained < logits_floor * 3 + 32 * 0.1 + last_mask + 1  # undo copies, <= 32 embeddings
    assert rows["growth_click_ms"]["value"] > 0 and "20 regions" in rows["growth_click_ms"]["note"]
    paste = {(r["model"], r["variant"]): r for r in measured if r["name"] == "growth_paste_ms"}
    assert set(paste) == {(f"grown {segment}, 256x256x150 CT", variant) for segment in growth_bench.PASTE_SEGMENTS
                          for variant in growth_bench.PASTE_VARIANTS}
    assert all(r["value"] > 0 and "27 regions" in r["note"] for r in paste.values())  # 3 x 3 x 3 regions
    assert all("differ in 0 voxels" in r["note"] for r in paste.values())
    handed_over = {model for (model, variant), r in paste.items() if "made the whole paste" in r["note"]}
    assert handed_over == {"grown thin tube, 256x256x150 CT"}  # a thin segment is cheaper pasted whole
    skipped = growth_bench.bench_rows(Plan(skip={"host": "dry run"}), "test CPU")
    assert {r["name"] for r in skipped} == {r["name"] for r in measured} and len(skipped) == len(measured)
    assert all(r["value"] is None and r["skipped"] == "dry run" for r in skipped)
