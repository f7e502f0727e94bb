"""Geometry reproduces the official torchio 1.2.1 preprocessing and keeps every coordinate convention straight.

torchio is the reference (test dependency only). Synthetic volumes are small; real data comes from ../shared/data.
"""
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
import torchio as tio

from FastSAM3DLib import geometry
from FastSAM3DLib.errors import InputImageError, PromptError
from FastSAM3DLib.geometry import (
    RegionOfInterest,
    Volume,
    canonical_grid,
    extract_label,
    extract_model_input,
    paste_back,
    ras_to_ijk,
    roi_around,
    roi_centred_on_mask,
)


# ------------------------------------------------------------------------------------------------------
# helpers


def rotation(axis, degrees):
    """3x3 rotation about ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


# name -> (shape (K, J, I), spacing (i, j, k), SimpleITK (LPS) direction)
GEOMETRIES = {
    "ras_aligned": ((14, 17, 20), (1.0, 1.2, 2.0), np.diag([-1.0, -1.0, 1.0])),  # like example_ct_sm
    "lps_aligned": ((14, 17, 20), (1.0, 1.2, 2.0), np.eye(3)),  # canonical flips x and y
    "flipped_permuted": ((16, 12, 18), (1.3, 0.9, 1.1), np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0.0]])),
    "anisotropic_5to1": ((8, 30, 30), (0.6, 0.6, 3.0), np.diag([1.0, -1.0, -1.0])),
    "oblique": ((12, 22, 26), (0.8, 1.1, 2.5), rotation((1, 2, 3), 35) @ np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0.0]])),
}


def sitk_image(name, array=None, dtype=np.float32, seed=0):
    """A synthetic image of GEOMETRIES[name] (random positive voxels unless ``array`` is given)."""
    shape, spacing, direction = GEOMETRIES[name]
    if array is None:
        array = np.random.default_rng(seed).uniform(1, 1000, shape).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    image.SetOrigin((12.5, -40.25, 7.0))
    return image


def voxel_centres_ras(volume):
    """RAS of every voxel centre, shape (K, J, I, 3)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    return ijk @ volume.ijk_to_ras[:3, :3].T + volume.ijk_to_ras[:3, 3]


def torchio_canonical(image):
    """The official online preprocessing up to the crop: ``ToCanonical()(Resample(1.5)(image))``."""
    out = tio.ToCanonical()(tio.Resample(1.5)(tio.ScalarImage.from_sitk(image)))
    return out.data[0].numpy(), out.affine


def crop_with_zero_pad(array, start, size):
    """array[start:start+size] per axis, zero where the window leaves the array."""
    out = np.zeros(size, dtype=array.dtype)
    src = tuple(slice(max(s, 0), min(s + n, dim)) for s, n, dim in zip(start, size, array.shape))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, start))
    out[dst] = array[src]
    return out


def assert_values_match(mine, ref, float_values):
    """Float images: equal to 1e-4 relative. Integer images: torchio keeps the pixel type and ITK truncates,
    so 0.9999999999 becomes 0 or 1 depending on float noise; such voxels (and only those) may differ by 1."""
    assert mine.shape == ref.shape
    if np.issubdtype(ref.dtype, np.floating):
        np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        return
    diff = np.abs(mine.astype(np.float64) - ref)
    ambiguous = np.abs(float_values - np.rint(float_values)) < 1e-6
    assert diff.max() <= 1
    assert not np.any((diff > 0) & ~ambiguous)
    assert np.count_nonzero(diff) < 0.01 * diff.size


# ------------------------------------------------------------------------------------------------------
# Volume


def test_from_sitk_converts_lps_to_ras_and_round_trips():
    image = sitk_image("oblique")
    volume = Volume.from_sitk(image)
    assert volume.shape == (12, 22, 26)
    np.testing.assert_allclose(volume.spacing, (0.8, 1.1, 2.5))
    for index in [(0, 0, 0), (3, 7, 11), (25, 21, 11)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = volume.ijk_to_ras @ np.append(index, 1.0)
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
        np.testing.assert_allclose(ras_to_ijk(volume, ras[:3]), index, atol=1e-9)
    back = volume.to_sitk()
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), volume.array)
    labels = volume.to_sitk(volume.array > 500)
    assert sitk.GetArrayFromImage(labels).sum() == np.count_nonzero(volume.array > 500)
    with pytest.raises(ValueError):
        volume.to_sitk(np.zeros((2, 2, 2)))


def test_ras_to_ijk_and_ras_to_model_round_trip():
    volume = Volume.from_sitk(sitk_image("oblique"))
    roi = roi_around(volume, voxel_centres_ras(volume)[5, 10, 12][None])
    ras = np.random.default_rng(1).uniform(-50, 50, (20, 3))
    ijk = ras_to_ijk(volume, ras)
    np.testing.assert_allclose(ijk @ volume.ijk_to_ras[:3, :3].T + volume.ijk_to_ras[:3, 3], ras, atol=1e-9)
    np.testing.assert_allclose(roi.model_to_ras_points(roi.ras_to_model(ras)), ras, atol=1e-9)
    assert ras_to_ijk(volume, ras[0]).shape == (3,)


def test_from_file_reads_a_dicom_folder(shared_data):
    ct = Volume.from_file(shared_data / "totalseg" / "example_ct_dicom")
    label = Volume.from_file(shared_data / "totalseg" / "example_seg_dicom_on_ct_grid.nii.gz")
    assert ct.shape == (20, 512, 512) == label.shape
    np.testing.assert_allclose(ct.ijk_to_ras, label.ijk_to_ras, atol=1e-3)
    ct.validate()


def test_a_dicom_series_with_a_missing_or_duplicate_slice_is_refused_not_read_on_a_distorted_grid(tmp_path):
    """ITK spreads the slices it finds evenly: with a slice file missing (or unreadable, which GDCM skips) the
    volume was read 2.11 mm apart instead of 2 mm plus a gap, slices sat up to 3 mm from their place, and the
    segmentation was written on that grid without a word."""
    import shutil

    from test_memory import _write_dicom_series

    array = np.random.default_rng(0).integers(0, 500, (12, 16, 16)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.0))
    image.SetOrigin((-10.0, 20.0, 30.0))
    c, s = np.cos(0.4), np.sin(0.4)  # an oblique series: positions are measured along its own slice normal
    image.SetDirection((1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c))
    _write_dicom_series(image, tmp_path / "whole")
    whole = Volume.from_file(tmp_path / "whole")
    assert whole.shape == (12, 16, 16) and np.array_equal(whole.array, array)
    np.testing.assert_allclose(np.linalg.norm(whole.ijk_to_ras[:3, 2]), 2.0, atol=1e-4)
    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "whole", missing)
    (missing / "005.dcm").unlink()
    with pytest.raises(InputImageError, match=r"unevenly spaced slices: 2 mm apart, but 4 mm between slices 5 "
                                              r"and 6 of 11 .* missing, unreadable or duplicate slice file"):
        Volume.from_file(missing)
    ends = tmp_path / "ends"
    shutil.copytree(tmp_path / "whole", ends)
    (ends / "000.dcm").unlink()  # end slices missing leave an even series: nothing is misplaced
    (ends / "011.dcm").unlink()
    assert Volume.from_file(ends).shape == (10, 16, 16)
    geometry.volume._check_even_slices(np.array([0.0, 2.0, 4.0, 6.000001, 8.0]), "x")  # rounding in the tags is fine
    with pytest.raises(InputImageError, match="0 mm between slices 2 and 3 of 5"):
        geometry.volume._check_even_slices(np.array([0.0, 2.0, 2.0, 4.0, 6.0]), "x")


# ------------------------------------------------------------------------------------------------------
# canonical grid and model input == torchio Resample(1.5) + ToCanonical


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_canonical_grid_and_input_match_torchio(name):
    image = sitk_image(name)
    ref, affine = torchio_canonical(image)
    volume = Volume.from_sitk(image)
    grid = canonical_grid(volume)
    assert grid.size == ref.shape
    np.testing.assert_allclose(grid.model_to_ras, affine, atol=1e-6)
    assert_values_match(extract_model_input(volume, grid, normalize=False), ref, None)
    # a box of that grid reaching beyond it on every side: torchio's zero padding
    start, size = (-3, 2, -5), (ref.shape[0] + 5, ref.shape[1] - 4, ref.shape[2] + 9)
    box = extract_model_input(volume, grid.sub_grid(start, size), normalize=False)
    assert_values_match(box, crop_with_zero_pad(ref, start, size), None)


def test_model_axes_point_to_right_anterior_superior():
    for name in GEOMETRIES:
        axes = canonical_grid(Volume.from_sitk(sitk_image(name))).model_to_ras[:3, :3]
        assert np.all(np.argmax(np.abs(axes), axis=0) == [0, 1, 2]), name
        assert np.all(np.diag(axes) > 0), name


def real_cases(shared_data):
    """Real images: the flipped CT (RAS-aligned on disk) and a cropped part of the oblique, 1:7 anisotropic T2."""
    ct = sitk.ReadImage(str(shared_data / "totalseg" / "example_ct_sm.nii.gz"))
    t2 = sitk.ReadImage(str(shared_data / "torchio_fpg" / "t2.nii.gz"))[100:220, 90:200, 5:17]
    return {"example_ct_sm": ct, "t2_oblique_crop": t2}


@pytest.mark.parametrize("case", ["example_ct_sm", "t2_oblique_crop"])
def test_real_images_match_torchio(case, shared_data):
    image = real_cases(shared_data)[case]
    ref, affine = torchio_canonical(image)
    volume = Volume.from_sitk(image)
    grid = canonical_grid(volume)
    assert grid.size == ref.shape
    np.testing.assert_allclose(grid.model_to_ras, affine, atol=1e-6)
    mine = extract_model_input(volume, grid, normalize=False)
    exact = extract_model_input(Volume(volume.array.astype(np.float64), volume.ijk_to_ras), grid, normalize=False)
    assert_values_match(mine, ref, exact)


def test_affine_intensity_is_reproduced_on_every_model_voxel():
    """Trilinear interpolation is exact for a linear function of RAS: any axis mix-up shows at once."""
    for name in ["oblique", "flipped_permuted", "anisotropic_5to1"]:
        volume = Volume.from_sitk(sitk_image(name))
        weights = np.array([3.0, -2.0, 5.0])
        volume.array = (voxel_centres_ras(volume) @ weights + 1000.0).astype(np.float64)
        roi = canonical_grid(volume).sub_grid((-2, -2, -2), (40, 40, 40))
        model = extract_model_input(volume, roi, normalize=False)
        xyz = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
        ras = roi.model_to_ras_points(xyz)
        ijk = ras_to_ijk(volume, ras)
        size = np.array(volume.shape[::-1])
        interior = np.all((ijk >= 0) & (ijk <= size - 1), axis=1)
        outside = np.any((ijk < -0.5 - 1e-6) | (ijk > size - 0.5 + 1e-6), axis=1)
        assert interior.sum() > 1000, name
        np.testing.assert_allclose(model.reshape(-1)[interior], ras[interior] @ weights + 1000.0, rtol=1e-5)
        assert np.all(model.reshape(-1)[outside] == 0), name


# ------------------------------------------------------------------------------------------------------
# region placement


def test_roi_centred_on_mask_matches_torchio_pipeline(shared_data):
    image = sitk.ReadImage(str(shared_data / "totalseg" / "example_ct_sm.nii.gz"))
    seg = sitk.ReadImage(str(shared_data / "totalseg" / "example_seg.nii.gz"))
    volume = Volume.from_sitk(image)
    for label_value in (3, 7):  # kidney_left, pancreas
        binary = seg == label_value
        subject = tio.Subject(image=tio.ScalarImage.from_sitk(image), label=tio.LabelMap.from_sitk(binary))
        pipeline = tio.Compose([tio.Resample(1.5), tio.ToCanonical(), tio.CropOrPad(128, mask_name="label"),
                                tio.ZNormalization(masking_method=lambda x: x > 0)])
        out = pipeline(subject)
        raw = tio.Compose([tio.Resample(1.5), tio.ToCanonical(), tio.CropOrPad(128, mask_name="label")])(subject)

        roi = roi_centred_on_mask(volume, sitk.GetArrayFromImage(binary))
        assert roi.size == (128, 128, 128)
        np.testing.assert_allclose(roi.model_to_ras, out["image"].affine, atol=1e-6)
        raw_mine = extract_model_input(volume, roi, normalize=False)
        exact = extract_model_input(Volume(volume.array.astype(np.float64), volume.ijk_to_ras), roi, False)
        assert_values_match(raw_mine, raw["image"].data[0].numpy(), exact)
        differs = raw_mine != raw["image"].data[0].numpy()
        mine = extract_model_input(volume, roi)
        ref = out["image"].data[0].numpy()
        assert mine.dtype == np.float32 and mine.shape == (128, 128, 128)
        np.testing.assert_allclose(mine[~differs], ref[~differs], atol=2e-4)
        labels = extract_label(Volume(sitk.GetArrayFromImage(binary), volume.ijk_to_ras), roi)
        np.testing.assert_array_equal(labels, out["label"].data[0].numpy())
        assert labels.sum() > 0


@pytest.mark.parametrize("target", [8, 7])
def test_mask_crop_rule_matches_torchio_crop_or_pad(target):
    """Random small masks (integer and half-integer bounding-box centres) and the all-zero fallback."""
    image = sitk_image("flipped_permuted")
    volume = Volume.from_sitk(image)
    rng = np.random.default_rng(target)
    masks = []
    for _ in range(6):
        mask = np.zeros(volume.shape, dtype=np.uint8)
        low = rng.integers(0, np.array(volume.shape) - 3)
        high = low + rng.integers(1, 4, size=3)
        mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = 1
        masks.append(mask)
    masks.append(np.zeros(volume.shape, dtype=np.uint8))
    for mask in masks:
        label = sitk.GetImageFromArray(mask)
        label.CopyInformation(image)
        subject = tio.Subject(image=tio.ScalarImage.from_sitk(image), label=tio.LabelMap.from_sitk(label))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # torchio warns on the all-zero mask
            out = tio.Compose([tio.Resample(1.5), tio.ToCanonical(),
                               tio.CropOrPad(target, mask_name="label")])(subject)
        roi = roi_centred_on_mask(volume, mask, size=target)
        np.testing.assert_allclose(roi.model_to_ras, out["image"].affine, atol=1e-6)
        np.testing.assert_array_equal(extract_label(Volume(mask, volume.ijk_to_ras), roi),
                                      out["label"].data[0].numpy())


def test_click_at_a_voxel_centre_lands_on_that_voxel():
    # a 1.5 mm LPS-aligned volume: the canonical grid is the voxel grid with i and j reversed
    array = np.random.default_rng(2).uniform(1, 100, (30, 40, 50)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.5, 1.5, 1.5))
    volume = Volume.from_sitk(image)
    i, j, k = 7, 31, 20
    click = (volume.ijk_to_ras @ [i, j, k, 1.0])[:3]
    roi = roi_around(volume, np.array([click, voxel_centres_ras(volume)[25, 5, 45]]))
    xyz = roi.ras_to_model(click[None])[0]
    np.testing.assert_allclose(xyz, np.round(xyz), atol=1e-9)
    x, y, z = np.round(xyz).astype(int)
    model = extract_model_input(volume, roi, normalize=False)
    assert model[x, y, z] == array[k, j, i]
    grid = canonical_grid(volume)
    start = np.round(grid.ras_to_model(roi.model_to_ras[:3, 3][None])[0]).astype(int)
    np.testing.assert_array_equal([x, y, z] + start, [50 - 1 - i, 40 - 1 - j, k])


def test_roi_around_is_the_torchio_window_of_the_centre_voxel():
    volume = Volume.from_sitk(sitk_image("oblique"))
    grid = canonical_grid(volume)
    points = voxel_centres_ras(volume)[[5, 7], [8, 12], [10, 14]]
    roi = roi_around(volume, points, size=16)
    centre = np.floor(grid.ras_to_model(points).min(0) / 2 + grid.ras_to_model(points).max(0) / 2 + 0.5)
    assert roi == grid.sub_grid(centre - 8, (16, 16, 16))
    assert hash(roi) == hash(grid.sub_grid(centre - 8, (16, 16, 16)))
    assert roi != grid.sub_grid(centre - 7, (16, 16, 16))
    assert roi.contains(points).all()
    mid = roi.model_to_ras_points(np.array([[7.5, 7.5, 7.5]]))
    assert roi.contains(mid, margin=7.9).all() and not roi.contains(mid, margin=8.1).any()


def test_points_outside_the_volume_raise_prompt_error():
    volume = Volume.from_sitk(sitk_image("anisotropic_5to1"))
    half_voxel_out = (volume.ijk_to_ras @ [-0.5 + 1e-9, 29.5 - 1e-9, 7.5 - 1e-9, 1])[:3]
    roi_around(volume, half_voxel_out[None])  # still inside
    outside = (volume.ijk_to_ras @ [3, 3, 8.2, 1])[:3]
    with pytest.raises(PromptError, match="outside the volume.*Click inside"):
        roi_around(volume, np.array([half_voxel_out, outside]))
    with pytest.raises(PromptError, match="at least one point"):
        roi_around(volume, np.zeros((0, 3)))
    with pytest.raises(PromptError, match="finite"):
        roi_around(volume, np.array([[np.nan, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------------------------
# paste-back


def model_grid_coordinates(size, low_res):
    """Model voxel coordinates (x, y, z) of the 128^3 grid or of the 32^3 low-res voxel centres."""
    if low_res:
        axis = (np.arange(size // 4) + 0.5) * 4 - 0.5  # align_corners=False: low-res voxel u covers 4u..4u+3
    else:
        axis = np.arange(size, dtype=float)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1)


@pytest.mark.parametrize("low_res", [False, True])
@pytest.mark.parametrize("name", ["oblique", "flipped_permuted", "anisotropic_5to1"])
def test_paste_back_of_a_sphere_matches_the_analytic_sphere(name, low_res):
    volume = Volume.from_sitk(sitk_image(name))
    centres = voxel_centres_ras(volume)
    # a large sphere whose surface crosses the small volume
    middle = centres[volume.shape[0] // 2, volume.shape[1] // 2, volume.shape[2] // 2]
    centre, radius = middle + [14.3, -17.7, 6.4], 25.0
    roi = roi_around(volume, np.array([middle, centres[0, 0, 0]]))
    xyz = model_grid_coordinates(128, low_res)
    logits = radius - np.linalg.norm(roi.model_to_ras_points(xyz) - centre, axis=-1)
    region, mask = paste_back(volume, roi, logits.astype(np.float32))
    assert mask.dtype == bool and mask.shape == centres[region].shape[:3]
    distance = np.linalg.norm(centres[region] - centre, axis=-1)
    shell = 0.1 if not low_res else 0.8  # linear interpolation error of a distance function (6 mm low-res voxels)
    assert mask[distance < radius - shell].all()
    assert not mask[distance > radius + shell].any()
    assert 0.1 < mask.mean() < 0.9 and np.mean(np.abs(distance - radius) < shell) < 0.2


def test_paste_back_upsamples_like_the_official_code_in_model_axis_order():
    """On a source grid identical to the ROI grid the pasted mask is exactly F.interpolate(...) > 0."""
    roi = RegionOfInterest(np.array([[1.5, 0, 0, -90], [0, 1.5, 0, -80], [0, 0, 1.5, -70], [0, 0, 0, 1.0]]))
    volume = Volume(np.zeros((128, 128, 128), dtype=np.int16), roi.model_to_ras)
    low_res = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    low_res[0, 0, :20, :10, :5] += 4.0  # an asymmetric blob: any axis swap breaks equality
    region, mask = paste_back(volume, roi, low_res)
    assert region == (slice(0, 128),) * 3
    upsampled = F.interpolate(low_res, size=(128, 128, 128), mode="trilinear", align_corners=False)[0, 0].numpy()
    expected = (upsampled > 0).transpose(2, 1, 0)
    undecided = np.abs(upsampled.transpose(2, 1, 0)) < 1e-5
    assert np.array_equal(mask[~undecided], expected[~undecided])
    _, high = paste_back(volume, roi, upsampled, threshold=1.0)
    assert not paste_back(volume, roi, np.zeros((128, 128, 128), dtype=np.float32))[1].any()  # strictly > 0
    assert np.array_equal(high, (upsampled > 1.0).transpose(2, 1, 0))


def test_paste_back_interpolates_linearly_between_model_voxels():
    """A source grid shifted by half a model voxel: each source voxel is the mean of 8 model voxels."""
    roi = RegionOfInterest(np.array([[0, 0, -1.5, 40], [1.5, 0, 0, -80], [0, 1.5, 0, -70], [0, 0, 0, 1.0]]))
    volume = Volume(np.zeros((127, 127, 127), dtype=np.float32), roi.model_to_ras @ np.array(
        [[1, 0, 0, 0.5], [0, 1, 0, 0.5], [0, 0, 1, 0.5], [0, 0, 0, 1.0]]))
    logits = np.full((128, 128, 128), -3.0, dtype=np.float32)
    logits[40:50, 60:66, 70:73] = np.random.default_rng(3).normal(1.0, 2.0, (10, 6, 3))  # a small object
    region, mask = paste_back(volume, roi, logits)
    mean = sum(logits[dx:127 + dx, dy:127 + dy, dz:127 + dz] for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)) / 8
    decided = (np.abs(mean) > 1e-4).transpose(2, 1, 0)
    assert region == (slice(0, 127),) * 3
    assert np.array_equal(mask[decided], (mean > 0).transpose(2, 1, 0)[decided])
    assert mask.sum() > 0


@pytest.mark.parametrize("backend", ["torch", "sitk"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_paste_back_refuses_logits_that_are_not_finite(backend, bad, monkeypatch):
    """One such logit blanked about half the ROI in the PyTorch path (0 x NaN in its matrix products) and
    only its neighbourhood in SimpleITK's: neither is a mask, so both refuse."""
    monkeypatch.setenv("FASTSAM3D_RESAMPLE", backend)
    volume = Volume(np.ones((60, 70, 80), np.float32), np.eye(4))
    roi = roi_around(volume, np.array([[40.0, 35.0, 30.0]]))
    logits = np.full((32, 32, 32), 2.0, np.float32)
    logits[16, 16, 16] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        paste_back(volume, roi, logits)
    import torch

    with pytest.raises(ValueError, match="NaN or infinite"):
        paste_back(volume, roi, torch.from_numpy(logits))


def test_paste_back_touches_only_the_roi_bounding_box():
    # a 300 x 240 x 100 mm oblique volume: the 192 mm ROI covers part of it
    shape, spacing, direction = (20, 80, 100), (3.0, 3.0, 5.0), rotation((0, 1, 1), 25)
    image = sitk.Image([shape[2], shape[1], shape[0]], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(tuple(direction.ravel()))
    volume = Volume.from_sitk(image)
    centres = voxel_centres_ras(volume)
    roi = roi_around(volume, centres[10, 20, 15][None])
    region, mask = paste_back(volume, roi, np.full((32, 32, 32), 5.0, dtype=np.float32))
    xyz = roi.ras_to_model(centres)
    inside = np.all((xyz >= -0.5) & (xyz <= 127.5), axis=-1)
    kji = np.argwhere(inside)
    for axis, sl in enumerate(region):
        assert sl.start <= kji[:, axis].min() and sl.stop > kji[:, axis].max()
        assert sl.start >= kji[:, axis].min() - 1 and sl.stop <= kji[:, axis].max() + 2
    assert region[0] == slice(0, 20)  # clipped to the volume along k
    assert region[2] != slice(0, 100)  # but not the whole volume along i
    assert np.array_equal(mask, inside[region])


# ------------------------------------------------------------------------------------------------------
# bad input


def test_bad_images_raise_input_image_error_saying_what_to_do(shared_data):
    with pytest.raises(InputImageError, match="2D.*Load the whole series"):
        Volume.from_sitk(sitk.Image(10, 10, sitk.sitkFloat32))
    with pytest.raises(InputImageError, match="4D.*Extract a single 3D volume"):
        Volume.from_file(shared_data / "bad_inputs" / "img4d_11f.nii.gz")
    with pytest.raises(InputImageError, match="3 components.*Convert it to a scalar"):
        Volume.from_sitk(sitk.Image([6, 6, 6], sitk.sitkVectorFloat32, 3))
    one_slice = Volume(np.random.default_rng(0).normal(size=(1, 30, 40)).astype(np.float32), np.eye(4))
    with pytest.raises(InputImageError, match="single slice \\(40x30 pixels\\).*Load the whole series"):
        one_slice.validate()  # a 2D image loaded in Slicer is a 3D volume of one slice: its result was garbage
    single = Volume.from_sitk(sitk.JoinSeries(sitk_image("oblique")))  # 4D with one time point is 3D
    assert single.shape == (12, 22, 26)
    np.testing.assert_allclose(single.ijk_to_ras, Volume.from_sitk(sitk_image("oblique")).ijk_to_ras)
    # tensor_t1.nii.gz is, despite its name, a plain 3D scalar image (NIfTI dim = 3, 36x36x20 int16)
    Volume.from_file(shared_data / "bad_inputs" / "tensor_t1.nii.gz").validate()
    nan = Volume.from_file(shared_data / "bad_inputs" / "nan.mha")
    with pytest.raises(InputImageError, match="NaN.*Replace them"):
        nan.validate()
    with pytest.raises(InputImageError, match="same value.*Check that the right volume"):
        Volume(np.full((4, 5, 6), 7, dtype=np.int16), np.eye(4)).validate()
    with pytest.raises(InputImageError, match="empty"):
        Volume(np.zeros((0, 5, 6), dtype=np.float32), np.eye(4)).validate()
    with pytest.raises(InputImageError, match="does not exist"):
        Volume.from_file(shared_data / "no_such_file.nii.gz")


@pytest.mark.parametrize("with_torch", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int16, np.uint16, np.bool_])
def test_non_finite_and_constant_voxels_are_found_by_either_path(dtype, with_torch, monkeypatch):
    """The one-pass value range (PyTorch when imported, NumPy otherwise, flipped views and unsigned types
    always NumPy) finds every NaN or infinity and every constant image."""
    import sys

    if not with_torch:
        monkeypatch.setitem(sys.modules, "torch", None)
    array = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 2).astype(dtype)
    for view in (array, array[::-1]):
        Volume(view, np.eye(4)).validate()
    if np.issubdtype(dtype, np.floating):
        for bad in (np.nan, np.inf, -np.inf):
            damaged = array.copy()
            damaged[1, 2, 3] = damaged[3, 0, 5] = bad
            for view in (damaged, damaged[::-1]):
                with pytest.raises(InputImageError, match="has 2 NaN or infinite voxels"):
                    Volume(view, np.eye(4)).validate()
    with pytest.raises(InputImageError, match="same value"):
        Volume(np.ones((4, 5, 6), dtype=dtype), np.eye(4)).validate()


def test_a_read_only_volume_is_checked_without_a_warning():
    import warnings

    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    array.flags.writeable = False  # like a view of a file's or a request's buffer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Volume(array, np.eye(4)).validate()
        array_nan = array.copy()
        array_nan[0, 0, 0] = np.nan
        array_nan.flags.writeable = False
        with pytest.raises(InputImageError, match="has 1 NaN"):
            Volume(array_nan, np.eye(4)).validate()


def test_normalisation_is_torchio_masked_z_normalisation():
    """Few foreground voxels, so the unbiased (N-1) std matters."""
    array = np.zeros((10, 10, 10), dtype=np.float32)
    array[4:6, 4:6, 5] = [[1.0, 2.0], [4.0, 9.0]]
    volume = Volume(array, np.diag([1.5, 1.5, 1.5, 1.0]))
    roi = roi_around(volume, np.array([[7.5, 7.5, 7.5]]), size=8)
    raw = extract_model_input(volume, roi, normalize=False)
    assert np.count_nonzero(raw > 0) == 4
    reference = tio.ZNormalization(masking_method=lambda x: x > 0)(tio.ScalarImage(tensor=raw[None]))
    np.testing.assert_allclose(extract_model_input(volume, roi), reference.data[0].numpy(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int16, np.uint8, np.uint16, np.int32,
                                   np.uint32, np.int64])
def test_model_input_layout_and_normalisation_equal_numpys(dtype):
    """The (k, j, i) -> float32 (x, y, z) copy (PyTorch in this process) and the in-place normalisation give
    NumPy's transposing copy and the out-of-place formula bit for bit."""
    rng = np.random.default_rng(3)
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
    low = max(float(info.min), -3e4)
    high = min(float(info.max), 6e4)
    kji = rng.uniform(low, high, (7, 9, 11)).astype(dtype)
    if np.dtype(dtype).kind in "iu":
        kji[0, 0, :3] = [info.min, info.max, 0]
    xyz = geometry.model_input._float32_xyz(kji)
    assert xyz.dtype == np.float32 and xyz.flags.c_contiguous and xyz.shape == (11, 9, 7)
    expected = np.ascontiguousarray(kji.transpose(2, 1, 0), dtype=np.float32)
    np.testing.assert_array_equal(xyz, expected)
    foreground = expected[expected > 0]
    mean, std = foreground.mean(dtype=np.float64), foreground.std(dtype=np.float64, ddof=1)
    reference = (expected - np.float32(mean)) / np.float32(std)
    normalised = geometry.model_input._masked_z_normalise(xyz)
    assert normalised is xyz  # in place
    np.testing.assert_array_equal(normalised, reference)


def test_regions_that_cannot_be_normalised_raise_input_image_error():
    volume = Volume(np.full((10, 10, 10), -5.0, dtype=np.float32), np.eye(4))
    volume.array[0, 0, 0] = -6.0
    roi = roi_around(volume, np.array([[5.0, 5.0, 5.0]]), size=8)
    extract_model_input(volume, roi, normalize=False)  # raw values are fine
    with pytest.raises(InputImageError, match="brighter than 0"):
        extract_model_input(volume, roi)
    volume.array[:] = 3.0
    with pytest.raises(InputImageError, match="standard deviation 0"):
        extract_model_input(volume, roi)


def test_a_big_endian_voxel_array_is_taken_in_native_byte_order():
    """nibabel hands a big-endian NIfTI's voxels over as a ``>i2`` array: the first click raised SimpleITK's
    ``TypeError: dtype: >i2 is not supported`` (the command line, where ITK swaps the bytes, was fine)."""
    values = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    volume = Volume(values.astype(">i2"), np.eye(4))
    assert volume.array.dtype == np.int16 and volume.array.dtype.isnative
    assert np.array_equal(sitk.GetArrayFromImage(volume.to_sitk()), values)


@pytest.mark.parametrize("backend", ["sitk", "torch"])
def test_a_fill_value_of_minus_float32_max_is_refused_as_extreme_values_not_blamed_on_the_weights(
        backend, monkeypatch):
    """A float32 image padded with -3.4e38 ("no data") normalised to -1e36 and overflowed the network: the
    message said the weights might be damaged and to download them again."""
    monkeypatch.setenv("FASTSAM3D_RESAMPLE", backend)
    values = np.random.default_rng(1).uniform(10, 200, (40, 40, 40)).astype(np.float32)
    volume = Volume(values, np.eye(4))
    roi = canonical_grid(volume).sub_grid((0, 0, 0), (32, 32, 32))
    assert np.abs(extract_model_input(volume, roi)).max() < 10  # ordinary tissue: normalised as before
    values[:, :, :5] = -np.finfo(np.float32).max
    with pytest.raises(InputImageError, match=r"extreme values \(-.*e\+3\d to .* standard deviations.*no data"):
        extract_model_input(Volume(values, np.eye(4)), roi)
    huge = Volume(values.astype(np.float64) * 1e3, np.eye(4))  # finite, beyond float32 once resampled
    with pytest.raises(InputImageError, match="beyond the range of 32-bit floats"):
        extract_model_input(huge, roi)
