"""Surface elements and surface distances (``FastSAM3DLib.evaluation.surfaces``) against DeepMind's
``surface-distance`` package, which the CVPR 2025 challenge uses: the same dictionary and the same NSD, from
surfaces cut out of any box and built once per reference."""
import gc
import weakref

import numpy as np
import pytest

surface_distance = pytest.importorskip("surface_distance")
from scipy import ndimage  # noqa: E402

from FastSAM3DLib.evaluation import placements  # noqa: E402
from FastSAM3DLib.evaluation import surfaces  # noqa: E402
from FastSAM3DLib.evaluation.metrics import nsd_in_region  # noqa: E402
from FastSAM3DLib.evaluation.surfaces import Surface, surface_distances  # noqa: E402
from FastSAM3DLib.geometry import Volume  # noqa: E402

#: spacings whose products with integers are exact: the distances must be the package's to the bit
DYADIC_SPACINGS = [(1.0, 1.0, 1.0), (0.5, 1.5, 2.0), (0.3125, 0.3125, 1.25), (3.0, 0.75, 0.75)]
#: spacings of real scanners, not exact in binary: ties between equally near elements may differ in the last bit
SCANNER_SPACINGS = [(0.7, 0.7, 0.7), (0.8, 0.6, 3.3), (2.5, 0.9765625, 0.9765625)]
TOLERANCES = (0.5, 1.0, 2.0, 3.0)


def _blob(rng, shape, smoothing=2.0, level=0.5):
    return ndimage.gaussian_filter(rng.random(shape), smoothing) > level


def _package(reference, prediction, spacing):
    return surface_distance.compute_surface_distances(reference, prediction, spacing)


def _pairs(distances, areas):
    """(distances, areas) ordered by distance rounded to 1e-12 mm, then area."""
    order = np.lexsort((areas, np.round(distances, 12)))
    return distances[order], areas[order]


def _random_pairs(count, seed):
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < count:
        shape = tuple(int(n) for n in rng.integers(6, 36, 3))
        reference = _blob(rng, shape)
        prediction = _blob(rng, shape, rng.uniform(1.0, 3.0), rng.uniform(0.45, 0.55))
        if reference.any() and prediction.any():
            pairs.append((reference, prediction))
    return pairs


@pytest.mark.parametrize("spacing", DYADIC_SPACINGS)
def test_the_distances_are_the_packages_to_the_bit_on_exact_spacings(spacing):
    for reference, prediction in _random_pairs(8, seed=int(spacing[0] * 100)):
        expected = _package(reference, prediction, spacing)
        mine = surface_distances(Surface.of(reference, spacing), Surface.of(prediction, spacing))
        assert sorted(mine) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(mine[key], expected[key], err_msg=key)


@pytest.mark.parametrize("spacing", SCANNER_SPACINGS)
def test_the_nsd_is_the_packages_on_scanner_spacings(spacing):
    """Distances may differ by one unit in the last place where two elements are equally near (the module
    docstring): the same (distance, area) pairs to 1e-12 mm, and the package's own
    ``compute_surface_dice_at_tolerance`` on both dictionaries agrees to 1e-12 at tolerances no tie meets."""
    for reference, prediction in _random_pairs(8, seed=int(spacing[1] * 1000)):
        expected = _package(reference, prediction, spacing)
        mine = surface_distances(Surface.of(reference, spacing), Surface.of(prediction, spacing))
        for way in ("gt_to_pred", "pred_to_gt"):  # the same (distance, area) pairs, distances to 1e-12 mm
            pairs = [_pairs(d[f"distances_{way}"], d[f"surfel_areas_{way.split('_')[0]}"]) for d in (mine, expected)]
            np.testing.assert_array_equal(pairs[0][1], pairs[1][1], err_msg=way)
            np.testing.assert_allclose(pairs[0][0], pairs[1][0], rtol=0, atol=1e-12, err_msg=way)
        for tolerance in TOLERANCES:
            assert surface_distance.compute_surface_dice_at_tolerance(mine, tolerance) == pytest.approx(
                surface_distance.compute_surface_dice_at_tolerance(expected, tolerance), abs=1e-12), tolerance


def test_the_nsd_is_the_packages_on_real_labels(shared_data):
    """Organs of a real segmentation against a neighbour merged in and shifted by a voxel, at the file's spacing
    and at a scanner's."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(shared_data / "itksnap" / "MRIcrop-seg.gipl.gz"))
    labels = sitk.GetArrayFromImage(image)
    values = [int(v) for v in np.unique(labels) if v]
    assert len(values) >= 3
    for spacing in (tuple(image.GetSpacing())[::-1], (0.8, 0.6, 3.3)):
        for value, other in zip(values[:3], values[1:4]):
            reference = labels == value
            prediction = np.roll((labels == value) | (labels == other), 1, axis=1)
            expected = _package(reference, prediction, spacing)
            mine = surface_distances(Surface.of(reference, spacing), Surface.of(prediction, spacing))
            for tolerance in TOLERANCES:
                assert surface_distance.compute_surface_dice_at_tolerance(mine, tolerance) == \
                    surface_distance.compute_surface_dice_at_tolerance(expected, tolerance), (spacing, value)


def test_a_surface_cut_from_a_box_is_the_surface_of_the_whole_mask():
    """Elements touching the box's faces included: the mask fills the box up to its edges."""
    rng = np.random.default_rng(3)
    whole = np.zeros((30, 28, 26), bool)
    region = (slice(4, 20), slice(6, 25), slice(2, 26))
    whole[region] = _blob(rng, (16, 19, 24), 1.5)
    whole[4, 6:25, 2:26] = True
    spacing = (0.8, 0.6, 3.3)
    cut = Surface.of(whole[region], spacing, offset=(4, 6, 2))
    full = Surface.of(whole, spacing)
    order_cut, order_full = np.lexsort(cut.points.T[::-1]), np.lexsort(full.points.T[::-1])
    np.testing.assert_array_equal(cut.points[order_cut], full.points[order_full])
    np.testing.assert_array_equal(cut.areas[order_cut], full.areas[order_full])
    assert len(Surface.of(np.zeros((3, 3, 3), bool), spacing)) == 0


def test_surfaces_of_different_spacings_are_refused():
    mask = np.ones((2, 2, 2), bool)
    with pytest.raises(ValueError, match="different spacings"):
        surface_distances(Surface.of(mask, (1, 1, 1)), Surface.of(mask, (1, 1, 2)))
    with pytest.raises(ValueError, match="3D mask"):
        Surface.of(np.ones((2, 2), bool), (1, 1))


def test_an_evaluation_builds_each_references_surface_once_and_does_not_keep_its_mask(monkeypatch):
    rng = np.random.default_rng(5)
    data = placements.CaseData.__new__(placements.CaseData)  # only what nsd() reads
    data.volume = Volume(np.zeros((20, 22, 24), np.float32), np.diag([0.8, 0.6, 3.3, 1.0]))
    data.nsd_tolerance_mm = 2.0
    data._reference_surface = None
    built = []
    original = Surface.of.__func__

    def counting(cls, mask, spacing, offset=(0, 0, 0)):
        built.append(np.asarray(mask).shape)
        return original(cls, mask, spacing, offset)

    monkeypatch.setattr(surfaces.Surface, "of", classmethod(counting))
    reference = np.zeros((20, 22, 24), bool)
    reference[4:12, 5:15, 6:18] = True
    region = (slice(2, 14), slice(3, 17), slice(4, 20))
    spacing_kji = (3.3, 0.6, 0.8)
    for _ in range(3):  # three clicks on one structure
        mask = rng.random((12, 14, 16)) > 0.3
        assert data.nsd(region, mask, reference) == nsd_in_region(region, mask, reference, spacing_kji, 2.0)
    assert built.count(reference.shape) == 1 + 3  # the cached one, then one per direct nsd_in_region above
    tree = data._reference_surface[1].tree
    data.nsd(region, mask, reference)
    assert data._reference_surface[1].tree is tree  # its k-d tree, too, is built once
    second = reference.copy()  # the next structure, equal but another array
    data.nsd(region, mask, second)
    assert built.count(reference.shape) == 5
    alive = weakref.ref(second)
    del second
    gc.collect()
    assert alive() is None


def test_distances_to_an_empty_surface_are_infinite_as_in_the_package():
    """The package's rule (it fails on NumPy 2 there, on its ``np.Inf``): every element of the non-empty
    surface at infinity, its areas sorted, the empty surface's lists empty."""
    mask = np.zeros((6, 6, 6), bool)
    mask[1:4, 2:5, 1:3] = True
    spacing = (0.8, 0.6, 3.3)
    full, empty = Surface.of(mask, spacing), Surface.of(np.zeros_like(mask), spacing)
    out = surface_distances(full, empty)
    assert np.all(np.isinf(out["distances_gt_to_pred"])) and len(out["distances_gt_to_pred"]) == len(full)
    np.testing.assert_array_equal(out["surfel_areas_gt"], np.sort(full.areas))
    assert out["distances_pred_to_gt"].size == out["surfel_areas_pred"].size == 0
    back = surface_distances(empty, full)
    assert np.all(np.isinf(back["distances_pred_to_gt"])) and back["distances_gt_to_pred"].size == 0


@pytest.mark.parametrize("spacing", SCANNER_SPACINGS + [(0.8, 0.6, 0.6)])
def test_a_distance_is_the_smallest_computed_distance_to_the_nearest_elements(spacing):
    """Of equally near elements whose computed distances differ in the last bit, the smallest is kept: each
    distance equals the package's formula minimised over every element (by brute force here)."""
    rng = np.random.default_rng(11)
    scale = np.asarray(spacing)
    for _ in range(20):
        points = rng.integers(0, 12, (40, 3))
        other = rng.integers(0, 12, (30, 3))
        offsets = (other[None, :, :] - points[:, None, :]).astype(np.float64) * scale
        d0, d1, d2 = offsets[..., 0], offsets[..., 1], offsets[..., 2]
        expected = np.sqrt((d0 * d0 + d1 * d1) + d2 * d2).min(axis=1)
        surface = Surface(other, np.zeros(len(other)), tuple(spacing))
        np.testing.assert_array_equal(surfaces._distances_to(points, surface), expected)
