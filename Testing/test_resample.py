"""The PyTorch resampling (FastSAM3DLib.resample) equals the SimpleITK path it replaces.

Model input: every voxel equal to SimpleITK's, except at exact ties, where ITK's own float noise decides: an
integer-typed value that is mathematically a whole number (ITK truncates 3.9999999999 to 3) or a float32 value
exactly between two float32 numbers. There the two may differ by one unit / one float32 step, and only there
(each mismatch is checked to be such a tie). Paste-back: the same region and exactly the same mask.
Oblique, flipped, permuted and anisotropic volumes (test_geometry's GEOMETRIES), every pixel type.
"""
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from FastSAM3DLib import geometry, resample
from FastSAM3DLib.geometry import RegionOfInterest, Volume, extract_model_input, paste_back, roi_around
from test_geometry import GEOMETRIES, rotation, sitk_image

DTYPES = (np.float32, np.float64, np.int16, np.uint8, np.uint16, np.int32, np.float16, np.bool_)


def volume_of(name, dtype=np.float32, seed=0):
    """A GEOMETRIES volume with random voxels of ``dtype`` (values that fit the type)."""
    volume = Volume.from_sitk(sitk_image(name, seed=seed))
    array = volume.array
    if dtype == np.bool_:
        array = array > 500
    elif np.dtype(dtype).kind in "iu":
        array = np.rint(array / (4 if dtype == np.uint8 else 1)).astype(dtype)
    else:
        array = array.astype(dtype)
    return Volume(array, volume.ijk_to_ras)


def point_in(volume, fraction=0.4):
    """RAS of the continuous voxel ``fraction * shape`` of the volume."""
    ijk = np.array(volume.shape[::-1], dtype=float) * fraction
    return (volume.ijk_to_ras @ np.append(ijk, 1.0))[:3]


def sitk_resampled(image_array, image_to_ras, grid_to_ras, size, default=0.0, pixel=None):
    """SimpleITK's linear resampling, the reference (geometry's own helpers)."""
    image = geometry.matrices.sitk_image(image_array, image_to_ras)
    return geometry.matrices.sitk_resample(image, grid_to_ras, size, sitk.sitkLinear, default, pixel)


def assert_equal_but_ties(mine, reference, exact64, kind):
    """``mine`` equals SimpleITK's ``reference`` wherever the exact (float64) value is not a tie."""
    mine, reference, exact64 = (np.asarray(a) for a in (mine, reference, exact64))
    assert mine.shape == reference.shape == exact64.shape
    differ = mine.astype(np.float64) != reference.astype(np.float64)
    if not differ.any():
        return
    delta = 1e-9 * np.maximum(np.abs(exact64), 1.0)
    if kind == "f":  # a float32 rounding midpoint: a tiny nudge changes the rounded value
        tie = np.float32(exact64 - delta) != np.float32(exact64 + delta)
        step = np.abs(np.spacing(reference.astype(np.float32)).astype(np.float64))
        assert np.all(np.abs(mine.astype(np.float64) - reference)[differ] <= step[differ])
    else:  # a whole number: ITK's truncation of a value a hair below it gives one less
        tie = np.trunc(exact64 - delta) != np.trunc(exact64 + delta)
        assert np.abs(mine.astype(np.float64) - reference)[differ].max() <= 1
    assert np.all(tie[differ]), f"{np.count_nonzero(differ & ~tie)} voxels differ that are not ties"


# ------------------------------------------------------------------------------------------------------
# the model input


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_model_input_equals_simpleitk_but_at_ties(name, dtype, monkeypatch):
    volume = volume_of(name, dtype)
    roi = roi_around(volume, point_in(volume)[None], size=24)
    monkeypatch.setenv(resample.ENV_VAR, "sitk")
    reference = extract_model_input(volume, roi, normalize=False)
    monkeypatch.setenv(resample.ENV_VAR, "torch")
    mine = extract_model_input(volume, roi, normalize=False)
    assert mine.dtype == np.float32 and mine.flags.c_contiguous and mine.shape == (24, 24, 24)
    exact = resample.resample_linear(volume.array, volume.ijk_to_ras, roi.model_to_ras, roi.size,
                                     output_dtype=np.float64, ijk_order=True).numpy()
    out_kind = "f" if np.dtype(dtype).kind == "f" else "i"
    assert_equal_but_ties(mine, reference, exact, out_kind)
    assert np.count_nonzero(mine != reference) <= 0.02 * mine.size  # ties are rare even on these exact grids


def test_model_input_with_normalisation(monkeypatch):
    volume = volume_of("oblique")
    roi = roi_around(volume, point_in(volume)[None], size=32)
    monkeypatch.setenv(resample.ENV_VAR, "sitk")
    reference = extract_model_input(volume, roi)
    monkeypatch.setenv(resample.ENV_VAR, "torch")
    np.testing.assert_allclose(extract_model_input(volume, roi), reference, rtol=1e-5, atol=1e-5)


def test_ties_are_common_on_simple_spacing_ratios_so_the_input_default_is_simpleitk(shared_data, monkeypatch):
    """The oblique int16 T2 at 0.75 mm: many model voxels are exact whole numbers, where ITK's noise decides."""
    image = sitk.ReadImage(str(shared_data / "torchio_fpg" / "t2.nii.gz"))[100:220, 90:200, 5:17]
    volume = Volume.from_sitk(image)
    grid = geometry.canonical_grid(volume)
    monkeypatch.setenv(resample.ENV_VAR, "sitk")
    reference = extract_model_input(volume, grid, normalize=False)
    monkeypatch.setenv(resample.ENV_VAR, "torch")
    mine = extract_model_input(volume, grid, normalize=False)
    exact = resample.resample_linear(volume.array, volume.ijk_to_ras, grid.model_to_ras, grid.size,
                                     output_dtype=np.float64, ijk_order=True).numpy()
    assert_equal_but_ties(mine, reference, exact, "i")
    assert 0.005 < np.mean(mine != reference) < 0.05  # one unit at ~3 % of the voxels: measured, stated
    monkeypatch.delenv(resample.ENV_VAR)
    assert np.array_equal(extract_model_input(volume, grid, normalize=False), reference)  # default: SimpleITK


def test_output_dtypes_clamp_and_truncate_like_itk():
    volume = volume_of("flipped_permuted", np.float64)
    array = (volume.array - 500.0) * 100.0  # about -50000..50000: beyond int16 and uint8 on both sides
    grid = roi_around(Volume(array, volume.ijk_to_ras), point_in(volume)[None], size=20)
    exact = resample.resample_linear(array, volume.ijk_to_ras, grid.model_to_ras, grid.size,
                                     output_dtype=np.float64).numpy()
    for pixel, dtype in ((sitk.sitkInt16, np.int16), (sitk.sitkUInt8, np.uint8), (sitk.sitkFloat32, np.float32)):
        reference = sitk_resampled(array, volume.ijk_to_ras, grid.model_to_ras, grid.size, 0.0, pixel)
        mine = resample.resample_linear(array, volume.ijk_to_ras, grid.model_to_ras, grid.size,
                                        output_dtype=dtype).numpy()
        assert mine.dtype == dtype
        assert_equal_but_ties(mine, reference, exact, "f" if dtype == np.float32 else "i")
        if dtype != np.float32:  # clamped at both ends, as ITK does
            assert mine.min() == np.iinfo(dtype).min and mine.max() == np.iinfo(dtype).max


@pytest.mark.parametrize("name", ["oblique", "anisotropic_5to1"])
def test_a_grid_of_another_orientation_takes_the_general_path(name):
    volume = volume_of(name, np.float32, seed=3)
    centre = point_in(volume, 0.5)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation((2, -1, 1), 25) * 1.3
    matrix[:3, 3] = centre - matrix[:3, :3] @ np.full(3, 9.5)
    assert resample.aligned_axes(resample.index_map(volume.ijk_to_ras, matrix), (20, 20, 20)) is None
    reference = sitk_resampled(volume.array, volume.ijk_to_ras, matrix, (20, 20, 20))
    mine = resample.resample_linear(volume.array, volume.ijk_to_ras, matrix, (20, 20, 20)).numpy()
    exact = resample.resample_linear(volume.array, volume.ijk_to_ras, matrix, (20, 20, 20),
                                     output_dtype=np.float64).numpy()
    assert np.count_nonzero(reference) > 1000  # the grid overlaps the volume, and leaves it too
    assert np.count_nonzero(reference == 0) > 100
    assert_equal_but_ties(mine, reference, exact, "f")


def test_the_gpu_style_unblocked_path_gives_the_same_values(monkeypatch):
    volume = volume_of("oblique", np.int16)
    roi = roi_around(volume, point_in(volume)[None], size=24)
    blocked = resample.resample_linear(volume.array, volume.ijk_to_ras, roi.model_to_ras, roi.size)
    monkeypatch.setattr(resample, "_cache_blocking", lambda device: False)
    torch.testing.assert_close(resample.resample_linear(volume.array, volume.ijk_to_ras, roi.model_to_ras,
                                                        roi.size), blocked, rtol=0, atol=0)


def test_read_only_and_big_endian_arrays():
    volume = volume_of("ras_aligned", np.int16)
    roi = roi_around(volume, point_in(volume)[None], size=16)
    expected = resample.resample_linear(volume.array, volume.ijk_to_ras, roi.model_to_ras, roi.size)
    frozen = volume.array.copy()
    frozen.flags.writeable = False
    swapped = volume.array.astype(">i2")
    for array in (frozen, swapped):
        out = resample.resample_linear(array, volume.ijk_to_ras, roi.model_to_ras, roi.size)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_grid_entirely_outside_gives_the_default():
    volume = volume_of("lps_aligned")
    far = RegionOfInterest(np.diag([1.5, 1.5, 1.5, 1.0]) + np.array([[0, 0, 0, 1e4]] * 3 + [[0, 0, 0, 0]]), (8, 8, 8))
    out = resample.resample_linear(volume.array, volume.ijk_to_ras, far.model_to_ras, far.size, default=-7.0)
    assert out.shape == (8, 8, 8) and bool((out == -7.0).all())


# ------------------------------------------------------------------------------------------------------
# paste-back


def smooth_logits(shape, seed, offset=0.0):
    """Spatially smooth random logits (as a model gives) with some exact zeros."""
    rng = np.random.default_rng(seed)
    field = torch.from_numpy(rng.normal(size=shape).astype(np.float32))[None, None]
    field = F.avg_pool3d(field, 3, 1, 1)[0, 0] * 3 + offset
    field[0] = 0.0  # a slab exactly at the threshold
    return field


@pytest.mark.parametrize("low_res", [True, False], ids=["32-to-128", "full-size"])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_paste_back_equals_simpleitk_exactly(name, low_res, monkeypatch):
    volume = volume_of(name)
    roi = roi_around(volume, point_in(volume)[None], size=24)
    filled = []
    for seed, (offset, threshold) in enumerate([(0.2, 0.0), (-0.5, 0.3), (0.0, -0.2)]):
        logits = smooth_logits((6, 6, 6) if low_res else (24, 24, 24), seed, offset)
        for noisy in (False, True):
            if noisy:  # no spatial structure at all (random weights)
                logits = torch.from_numpy(np.random.default_rng(seed).normal(size=logits.shape).astype(np.float32))
            monkeypatch.setenv(resample.ENV_VAR, "sitk")
            region_ref, mask_ref = paste_back(volume, roi, logits, threshold)
            monkeypatch.setenv(resample.ENV_VAR, "torch")
            region, mask = paste_back(volume, roi, logits, threshold)
            assert region == region_ref
            assert mask.dtype == np.bool_ and mask.shape == mask_ref.shape
            assert np.array_equal(mask, mask_ref), (seed, noisy, np.count_nonzero(mask != mask_ref))
            filled.append(mask.mean())
    assert 0 < max(filled) and min(filled) < 1


@pytest.mark.parametrize("z0", [32.1, 15.6, -0.3, 101.7])
def test_slices_exactly_on_the_roi_faces_are_pasted_by_one_rule_on_every_path(z0, monkeypatch):
    """3 mm slices and a 1.5 mm model grid: slice 10 lies exactly on the ROI's -0.5 face and slice 22 on its
    n - 0.5 face. ITK's float noise once decided such slices either way (here for z0 32.1 and 15.6, a whole
    slice of 35 x 35 voxels); every path now counts the lower face in and the upper face out."""
    from FastSAM3DLib import remote

    ijk_to_ras = np.diag([0.8, 0.8, 3.0, 1.0])
    ijk_to_ras[:3, 3] = (-40.37, 12.25, z0)
    volume = Volume(np.zeros((40, 60, 60), np.int16), ijk_to_ras)
    model_to_ras = np.diag([1.5, 1.5, 1.5, 1.0])
    model_to_ras[:3, 3] = (-40.37 + 20.0, 12.25 + 20.0, z0 + 3.0 * 10 + 0.75)
    roi = RegionOfInterest(model_to_ras, (24, 24, 24))
    logits = torch.ones(6, 6, 6)  # positive everywhere: every voxel inside the ROI is in the mask
    masks = {}
    for path in ("torch", "sitk"):
        monkeypatch.setenv(resample.ENV_VAR, path)
        masks[path] = paste_back(volume, roi, logits)
    monkeypatch.setattr(remote.cut_and_paste, "_LIBRARY_GEOMETRY", False)  # the torch-free client
    masks["client"] = remote.cut_and_paste.paste_back(volume, roi, logits.numpy())
    region, mask = masks["torch"]
    for path in ("sitk", "client"):
        assert masks[path][0] == region and np.array_equal(masks[path][1], mask), path
    slices = np.flatnonzero(mask.any(axis=(1, 2))) + region[0].start
    assert slices[0] == 10 and slices[-1] == 21  # the lower face in, the upper face (slice 22) out


def test_paste_back_of_a_ct_like_volume_in_blocks_and_unblocked(monkeypatch):
    """Many more source voxels than model voxels (0.8 mm in plane), as in the benchmark's CT."""
    from FastSAM3DLib.benchmarks.pipeline import click_centre, ct_sized_volume

    volume = ct_sized_volume((40, 90, 100))
    roi = roi_around(volume, click_centre(volume)[None], size=32)
    logits = smooth_logits((8, 8, 8), 5, 0.1)
    monkeypatch.setenv(resample.ENV_VAR, "sitk")
    region_ref, mask_ref = paste_back(volume, roi, logits)
    monkeypatch.setenv(resample.ENV_VAR, "torch")
    monkeypatch.setattr(resample, "_CACHE_ELEMENTS", 4096)  # many small blocks
    region, mask = paste_back(volume, roi, logits)
    assert region == region_ref and np.array_equal(mask, mask_ref)
    monkeypatch.setattr(resample, "_cache_blocking", lambda device: False)
    assert np.array_equal(paste_back(volume, roi, logits)[1], mask_ref)


def test_paste_back_without_positive_logits_and_outside_rois(monkeypatch):
    volume = volume_of("oblique")
    roi = roi_around(volume, point_in(volume)[None], size=24)
    monkeypatch.setenv(resample.ENV_VAR, "torch")
    region, mask = paste_back(volume, roi, -torch.ones(6, 6, 6))
    assert mask.shape == tuple(s.stop - s.start for s in region) and not mask.any()
    with pytest.raises(ValueError):
        paste_back(volume, roi, torch.zeros(5, 5, 5))


@pytest.mark.parametrize("path", ["torch", "sitk"])
def test_paste_back_takes_the_models_batched_logits_and_refuses_a_batch_of_several(path, monkeypatch):
    """The mask decoder answers (1, 1, 32, 32, 32) logits: the batch and channel axes of one are dropped on both
    paths, as a NumPy array or a tensor; a batch of two masks is refused, not pasted as one."""
    volume = volume_of("oblique")
    roi = roi_around(volume, point_in(volume)[None], size=24)
    monkeypatch.setenv(resample.ENV_VAR, path)
    logits = smooth_logits((6, 6, 6), 3, 0.2)
    region, mask = paste_back(volume, roi, logits)
    assert mask.any() and not mask.all()
    for batched in (logits[None, None], logits[None], logits[None, None, None], logits[None, None].numpy(),
                    logits[None].numpy()):
        got_region, got = paste_back(volume, roi, batched)
        assert got_region == region and np.array_equal(got, mask), tuple(batched.shape)
    for several in (torch.stack([logits, logits]), torch.stack([logits, logits])[:, None]):
        with pytest.raises(ValueError, match="fit neither"):
            paste_back(volume, roi, several)


@pytest.mark.parametrize("path", ["torch", "sitk"])
def test_an_roi_outside_the_volume_pastes_an_empty_region(path, monkeypatch):
    volume = volume_of("oblique")
    inside = roi_around(volume, point_in(volume)[None], size=24)
    moved = inside.model_to_ras.copy()
    moved[:3, 3] += 1000.0  # e.g. the volume was moved by a transform after the click
    roi = RegionOfInterest(moved, inside.size)
    monkeypatch.setenv(resample.ENV_VAR, path)
    region, mask = paste_back(volume, roi, torch.ones(6, 6, 6))
    assert mask.dtype == np.bool_ and mask.shape == tuple(s.stop - s.start for s in region) and mask.size == 0


def test_threshold_logits_on_a_grid_of_another_orientation(monkeypatch):
    """A ROI that is not a grid of the volume (general path): upsample, then the general resampling."""
    volume = volume_of("oblique")
    matrix = np.eye(4)
    matrix[:3, :3] = rotation((1, 1, 0), 20) * 1.5
    matrix[:3, 3] = point_in(volume, 0.5) - matrix[:3, :3] @ np.full(3, 11.5)
    roi = RegionOfInterest(matrix, (24, 24, 24))
    logits = smooth_logits((6, 6, 6), 9, 0.3)
    monkeypatch.setenv(resample.ENV_VAR, "sitk")
    region_ref, mask_ref = paste_back(volume, roi, logits)
    monkeypatch.setenv(resample.ENV_VAR, "torch")
    region, mask = paste_back(volume, roi, logits)
    assert region == region_ref and np.array_equal(mask, mask_ref) and mask.any()


# ------------------------------------------------------------------------------------------------------
# choosing the implementation, and a session without SimpleITK


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(resample.ENV_VAR, raising=False)
    assert resample.backend("paste") == "torch" and resample.backend("input") == "sitk"
    assert resample.backend("paste", "sitk") == "sitk" and resample.backend("input", "torch") == "torch"
    monkeypatch.setenv(resample.ENV_VAR, "SITK")
    assert resample.backend("paste") == "sitk"
    monkeypatch.setenv(resample.ENV_VAR, "torch")
    assert resample.backend("input") == "torch"
    monkeypatch.setenv(resample.ENV_VAR, "nearest")
    with pytest.raises(ValueError, match=resample.ENV_VAR):
        resample.backend()
    with pytest.raises(ValueError, match="operation"):
        resample.backend("labels", "auto")
    monkeypatch.setattr(resample, "sitk_available", lambda: False)
    assert resample.backend("input", "auto") == "torch"  # no SimpleITK: PyTorch everywhere
    with pytest.raises(ValueError, match="SimpleITK is not installed"):
        resample.backend("paste", "sitk")


SESSION_WITHOUT_SITK = """
import sys
sys.modules["SimpleITK"] = None  # import SimpleITK raises ImportError, as on a bare GPU machine
import numpy as np, torch
from FastSAM3DLib import build_model
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib.session import InteractiveSession
k, j, i = np.ogrid[:40, :50, :60]
array = np.where((k - 20) ** 2 + (j - 25) ** 2 + (i - 30) ** 2 < 100, 200.0, 10.0).astype(np.float32)
volume = Volume(array, np.diag([-0.8, -0.8, 1.5, 1.0]))
session = InteractiveSession(build_model("tiny-test", seed=0), volume)
result = session.add_click(volume.ijk_to_ras[:3, :3] @ [30, 25, 20] + volume.ijk_to_ras[:3, 3])
assert "SimpleITK" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok", result.mask.shape, result.mask.dtype)
"""


def test_a_session_runs_without_simpleitk():
    out = subprocess.run([sys.executable, "-c", SESSION_WITHOUT_SITK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
