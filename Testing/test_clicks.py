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
