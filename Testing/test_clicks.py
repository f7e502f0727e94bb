"""Simulated clicks follow the official protocols."""
import numpy as np
import pytest

from FastSAM3DLib.evaluation.clicks import (interior_click, protocol_click, random_error_click,
                                           random_object_click)


def ball(shape, centre, radius):
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) < radius


def test_first_interior_click_is_near_the_centre_of_the_object():
    truth = ball((40, 40, 40), (20, 18, 22), 10)
    rng = np.random.default_rng(0)
    for _ in range(20):
        point, label = interior_click(truth, np.zeros_like(truth), rng)
        assert label == 1 and truth[tuple(point.astype(int))]
        assert np.linalg.norm(point - [20, 18, 22]) < 5.5  # deeper than half the maximal depth of 10


def test_interior_click_picks_the_larger_error_region():
    truth = ball((40, 40, 40), (20, 20, 20), 12)
    prediction = truth & ~ball((40, 40, 40), (20, 20, 26), 3)  # small false negative
    prediction |= ball((40, 40, 40), (8, 30, 8), 6) & ~truth  # larger false positive
    point, label = interior_click(truth, prediction, np.random.default_rng(1))
    assert label == 0 and prediction[tuple(point.astype(int))] and not truth[tuple(point.astype(int))]


def test_equally_deep_errors_click_the_false_positive_as_the_official_code():
    """Official ``get_next_click3D_torch_ritm``: ``is_positive = fn_max_dist > fp_max_dist``, strictly."""
    truth = np.zeros((12, 12, 12), bool)
    truth[3:9, 3:9, 3:9] = True
    prediction = np.roll(truth, 1, axis=0)  # one-voxel shells of false negatives and positives, equally deep
    labels = {interior_click(truth, prediction, np.random.default_rng(seed))[1] for seed in range(10)}
    assert labels == {0}


def test_random_clicks_are_uniform_over_the_right_sets_and_labelled():
    truth = ball((20, 20, 20), (10, 10, 10), 6)
    prediction = ball((20, 20, 20), (12, 10, 10), 6)
    rng = np.random.default_rng(2)
    labels = []
    for _ in range(200):
        point, label = random_error_click(truth, prediction, rng)
        voxel = tuple(point.astype(int))
        assert truth[voxel] != prediction[voxel]
        assert label == int(truth[voxel])
        labels.append(label)
    assert 0 < np.mean(labels) < 1
    assert random_error_click(truth, truth, rng) is None and interior_click(truth, truth, rng) is None
    point, label = random_object_click(truth, rng)
    assert label == 1 and truth[tuple(point.astype(int))]


def test_protocols_are_seeded_and_switch_methods_at_the_documented_click():
    truth = ball((30, 30, 30), (15, 15, 15), 8)
    empty = np.zeros_like(truth)
    a = [protocol_click("fastsam3d", i, truth, empty, np.random.default_rng(5)) for i in range(3)]
    b = [protocol_click("fastsam3d", i, truth, empty, np.random.default_rng(5)) for i in range(3)]
    for (pa, la), (pb, lb) in zip(a, b):
        assert np.array_equal(pa, pb) and la == lb
    deep = [protocol_click("fastsam3d", 0, truth, empty, np.random.default_rng(s))[0] for s in range(30)]
    anywhere = [protocol_click("fastsam3d", 2, truth, empty, np.random.default_rng(s))[0] for s in range(30)]
    assert max(np.linalg.norm(p - 15) for p in deep) < max(np.linalg.norm(p - 15) for p in anywhere)
    with pytest.raises(ValueError):
        protocol_click("nnunet", 0, truth, empty, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------------ the error box
# interior_click and largest_error_click work on the box around truth ∪ prediction. These are the whole-volume
# versions they replaced, kept verbatim as the reference: the box must give the very same click.


def whole_grid_distance(region):
    """Euclidean distance inside ``region`` over the whole volume, its border counted as background (as before)."""
    import edt

    return edt.edt(np.ascontiguousarray(region, dtype=np.uint8), black_border=True)


def whole_grid_interior_click(truth, prediction, rng):
    """``interior_click`` before the error box: both distance transforms over the whole volume."""
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    false_neg, false_pos = truth & ~prediction, ~truth & prediction
    if not false_neg.any() and not false_pos.any():
        return None
    dist_fn, dist_fp = whole_grid_distance(false_neg), whole_grid_distance(false_pos)
    use_fn = bool(dist_fn.max() > dist_fp.max())
    dist = dist_fn if use_fn else dist_fp
    candidates = np.argwhere(dist > dist.max() / 2.0)
    point = candidates[rng.integers(len(candidates))]
    return point.astype(np.float64), int(use_fn)


def whole_grid_largest_error_click(truth, prediction, rng):
    """``largest_error_click`` before the error box: components and distances over the whole volume."""
    from scipy import ndimage

    truth, prediction = truth.astype(bool), prediction.astype(bool)
    errors = truth != prediction
    if not errors.any():
        return None
    labels, count = ndimage.label(errors, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        component = labels > 0
    else:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        component = labels == int(np.argmax(sizes))
    dist = whole_grid_distance(component)
    candidates = np.argwhere(dist == dist.max())
    point = candidates[rng.integers(len(candidates))]
    return point.astype(np.float64), int(truth[tuple(point)])


def whole_grid_random_error_click(truth, prediction, rng):
    """``random_error_click`` before the error box: the errors listed over the whole volume."""
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    false_neg, false_pos = truth & ~prediction, ~truth & prediction
    candidates = np.argwhere(false_neg | false_pos)
    if len(candidates) == 0:
        return None
    point = candidates[rng.integers(len(candidates))]
    return point.astype(np.float64), int(false_neg[tuple(point)])


def whole_grid_random_object_click(truth, rng):
    """``random_object_click`` before the error box: the object listed over the whole volume."""
    candidates = np.argwhere(truth.astype(bool))
    if len(candidates) == 0:
        return None
    return candidates[rng.integers(len(candidates))].astype(np.float64), 1


def tight_box_interior_click(truth, prediction, rng):
    """A wrong crop, to show the cases below can tell: the box without margin, its border not background."""
    import edt

    from FastSAM3DLib.evaluation.clicks import error_box

    box = error_box(truth, prediction, margin=0)
    if box is None:
        return None
    truth, prediction = truth[box].astype(bool), prediction[box].astype(bool)
    false_neg, false_pos = truth & ~prediction, ~truth & prediction
    if not false_neg.any() and not false_pos.any():
        return None
    dist_fn, dist_fp = (edt.edt(np.ascontiguousarray(r, dtype=np.uint8), black_border=False)
                        for r in (false_neg, false_pos))
    use_fn = bool(dist_fn.max() > dist_fp.max())
    dist = dist_fn if use_fn else dist_fp
    candidates = np.argwhere(dist > dist.max() / 2.0)
    if len(candidates) == 0:  # an error filling the box has no background in it: no distance at all
        return np.full(3, -1.0), -1
    point = candidates[rng.integers(len(candidates))] + [s.start for s in box]
    return point.astype(np.float64), int(use_fn)


def ellipsoids(shape, rng, count):
    """Up to ``count`` random ellipsoids, some reaching past the volume's border."""
    grid = np.indices(shape).transpose(1, 2, 3, 0).astype(np.float64)
    mask = np.zeros(shape, bool)
    for _ in range(count):
        centre = rng.uniform(-2, np.array(shape) + 1)
        radii = rng.uniform(0.6, max(shape) / 2.5, 3)
        mask |= (((grid - centre) / radii) ** 2).sum(-1) < 1
    return mask


def error_box_cases(seed, count=120):
    """(truth, prediction) pairs where the box's border matters: structures in the middle, touching the volume's
    border or filling it, empty and perfect predictions, far false positives, noise, cubes with many equally deep
    voxels, one-voxel-thick volumes, and model-like predictions (grown, shrunk, shifted, speckled)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    cube = np.zeros((14, 15, 16), bool)
    cube[3:9, 4:10, 5:11] = True
    yield cube, np.zeros_like(cube)  # ties everywhere in the middle
    yield cube, np.roll(cube, 1, axis=2)
    full = np.ones((9, 10, 11), bool)
    yield full, np.zeros_like(full)  # the whole volume: only its border bounds the distances
    hole = full.copy()
    hole[4, 5, 5] = False
    yield full, hole
    corner = np.zeros((12, 12, 12), bool)
    corner[:4, :4, :4] = True
    yield corner, np.zeros_like(corner)
    yield corner, corner.copy()  # perfect: no click
    yield np.zeros_like(corner), corner  # nothing to find, a false positive in the corner
    for number in range(count):
        shape = tuple(int(n) for n in rng.integers([1, 2, 2], [24, 26, 28]))
        truth = ellipsoids(shape, rng, int(rng.integers(1, 4)))
        if number % 10 == 9:
            truth = rng.random(shape) < rng.uniform(0.05, 0.6)
        kind = number % 7
        if kind == 0:
            prediction = np.zeros(shape, bool)
        elif kind == 1:
            prediction = ndimage.binary_dilation(truth, iterations=int(rng.integers(1, 3)))
        elif kind == 2:
            prediction = ndimage.binary_erosion(truth)
        elif kind == 3:
            prediction = np.roll(truth, tuple(int(s) for s in rng.integers(-3, 4, 3)), axis=(0, 1, 2))
        elif kind == 4:
            prediction = truth ^ (rng.random(shape) < 0.03)
        elif kind == 5:
            prediction = truth | ellipsoids(shape, rng, 1)  # a false positive elsewhere
        else:
            prediction = ellipsoids(shape, rng, 2)
        yield truth, prediction
    big = np.zeros((60, 50, 70), bool)  # a small structure far from the border of a larger volume
    big[20:31, 14:22, 33:47] = ellipsoids((11, 8, 14), rng, 2)
    yield big, np.zeros_like(big)
    yield big, np.roll(big, 2, axis=1)


def same_click(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a[0].dtype == b[0].dtype and np.array_equal(a[0], b[0]) and a[1] == b[1]


def compare_with_whole_grid(cases, boxed, whole_grid, tight_box):
    """Over ``cases`` and three seeds, assert that ``boxed`` gives ``whole_grid``'s click; returns (clicks made,
    how many clicks ``tight_box`` got wrong)."""
    clicks = wrong = 0
    for number, (truth, prediction) in enumerate(cases):
        for seed in range(3):
            reference = whole_grid(truth, prediction, np.random.default_rng(seed))
            got = boxed(truth, prediction, np.random.default_rng(seed))
            assert same_click(got, reference), (number, seed, got, reference)
            wrong += not same_click(tight_box(truth, prediction, np.random.default_rng(seed)), reference)
            clicks += reference is not None
    return clicks, wrong


def test_interior_click_on_the_error_box_is_the_whole_volume_click():
    """The box (truth ∪ prediction grown by one voxel) gives the click of the whole-volume distance transforms:
    same side, same candidates in the same order, same random pick; a tight box whose border is not background
    gives other clicks on these cases, so they test the border."""
    clicks, wrong = compare_with_whole_grid(error_box_cases(seed=11), interior_click, whole_grid_interior_click,
                                            tight_box_interior_click)
    assert clicks > 300 and wrong > 30


def test_random_clicks_on_the_box_are_the_whole_volume_clicks():
    """The error and object voxels listed on the box come in the whole volume's order: the same random pick."""
    clicks = 0
    for number, (truth, prediction) in enumerate(error_box_cases(seed=13, count=60)):
        for seed in range(3):
            reference = whole_grid_random_error_click(truth, prediction, np.random.default_rng(seed))
            got = random_error_click(truth, prediction, np.random.default_rng(seed))
            assert same_click(got, reference), (number, seed, got, reference)
            assert same_click(random_object_click(truth, np.random.default_rng(seed)),
                              whole_grid_random_object_click(truth, np.random.default_rng(seed))), (number, seed)
            clicks += reference is not None
    assert clicks > 150


def test_interior_click_is_also_the_same_on_other_dtypes_and_the_volume_border():
    """uint8 labels (values other than 1), and a structure cut by every face of the volume."""
    rng = np.random.default_rng(4)
    truth = ball((20, 22, 24), (10, 11, 12), 14).astype(np.uint8) * 7  # reaches past every face
    prediction = ball((20, 22, 24), (6, 11, 12), 9)
    for seed in range(5):
        assert same_click(interior_click(truth, prediction, np.random.default_rng(seed)),
                          whole_grid_interior_click(truth, prediction, np.random.default_rng(seed)))
    noise = rng.random((20, 22, 24)) < 0.5
    assert same_click(interior_click(noise, ~noise, np.random.default_rng(0)),
                      whole_grid_interior_click(noise, ~noise, np.random.default_rng(0)))


def test_interior_click_measures_distances_on_the_box_only(monkeypatch):
    """The distance transforms see the box around the structure (plus one voxel), not the whole volume; the
    click is still the whole-volume one."""
    from FastSAM3DLib.evaluation import clicks

    seen = []
    original = clicks._distance_inside
    monkeypatch.setattr(clicks, "_distance_inside", lambda region: seen.append(region.shape) or original(region))
    truth = np.zeros((80, 90, 100), bool)
    truth[30:41, 50:60, 0:12] = ball((11, 10, 12), (5, 5, 3), 6)  # touches the face i = 0
    prediction = np.zeros_like(truth)
    prediction[45, 52, 20] = True  # a far false positive widens the box
    assert clicks.error_box(truth, prediction) == (slice(29, 47), slice(49, 61), slice(0, 22))
    for seed in range(4):
        assert same_click(interior_click(truth, prediction, np.random.default_rng(seed)),
                          whole_grid_interior_click(truth, prediction, np.random.default_rng(seed)))
    assert set(seen) == {(18, 12, 22)}
    assert clicks.error_box(np.zeros((3, 4, 5), bool), np.zeros((3, 4, 5), bool)) is None
    for click in (interior_click, clicks.largest_error_click, random_error_click):  # no box across two grids
        with pytest.raises(ValueError, match="shape"):
            click(truth, prediction[1:], np.random.default_rng(0))


def test_clicks_on_real_labels_are_the_whole_volume_clicks(shared_data):
    """Organs of the shared TotalSegmentator label (3 mm) with model-like predictions, every protocol's click."""
    from scipy import ndimage

    from FastSAM3DLib.evaluation.clicks import largest_error_click
    from FastSAM3DLib.geometry import Volume

    labels = Volume.from_file(shared_data / "totalseg" / "example_seg.nii.gz").array
    values = [v for v in np.unique(labels) if v][:12]
    rng = np.random.default_rng(5)
    for value in values:
        truth = labels == value
        for prediction in (np.zeros_like(truth), ndimage.binary_dilation(truth), ndimage.binary_erosion(truth),
                           np.roll(truth, 2, axis=int(rng.integers(3))), truth ^ (rng.random(truth.shape) < 1e-3)):
            seed = int(rng.integers(1 << 30))
            for new, old in ((interior_click, whole_grid_interior_click),
                             (largest_error_click, whole_grid_largest_error_click),
                             (random_error_click, whole_grid_random_error_click)):
                assert same_click(new(truth, prediction, np.random.default_rng(seed)),
                                  old(truth, prediction, np.random.default_rng(seed))), (value, new.__name__)
        assert same_click(random_object_click(truth, np.random.default_rng(value)),
                          whole_grid_random_object_click(truth, np.random.default_rng(value)))
