"""The model's input and labels: a volume resampled onto a region of interest (SimpleITK's rules, or the same
linear resampling in PyTorch), normalised as the official code normalises it."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputImageError
from .matrices import sitk_image, sitk_resample, translation
from .volume import Volume, ras_to_ijk

if TYPE_CHECKING:  # annotations only: the region of interest's module uses this one
    from .roi import RegionOfInterest


def resample_onto(volume: Volume, roi: RegionOfInterest, interpolator) -> np.ndarray:
    """Resample the volume onto the ROI grid (zero outside the volume), in the volume's pixel type, (x, y, z)."""
    return _resample_onto_kji(volume, roi, interpolator).transpose(2, 1, 0)


def _resample_onto_kji(volume: Volume, roi: RegionOfInterest, interpolator) -> np.ndarray:
    """:func:`resample_onto` in SimpleITK's own (k, j, i) order, before the transposing view to (x, y, z)."""
    ijk = ras_to_ijk(volume, roi.extent_corners_ras())
    low, high = ijk.min(axis=0), ijk.max(axis=0)
    last = np.array(volume.shape[::-1]) - 1
    # the source block the interpolator can touch (plus one voxel against float noise), clipped to the volume
    first = np.maximum(np.floor(low).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(high).astype(int) + 1, last) + 1
    if np.any(stop <= first):
        dtype = np.uint8 if volume.array.dtype == np.bool_ else volume.array.dtype
        return np.zeros(roi.size[::-1], dtype=dtype)
    block = volume.array[first[2]:stop[2], first[1]:stop[1], first[0]:stop[0]]
    image = sitk_image(block, volume.ijk_to_ras @ translation(first))
    # like torchio, interpolated values keep the source pixel type (ITK clamps and truncates towards zero)
    return sitk_resample(image, roi.model_to_ras, roi.size, interpolator, 0.0)


def _resample_onto_torch(volume: Volume, roi: RegionOfInterest) -> np.ndarray:
    """:func:`resample_onto` with linear interpolation in PyTorch: float32 (x, y, z), C-contiguous."""
    import torch

    from .. import resample

    values = resample.resample_linear(volume.array, volume.ijk_to_ras, roi.model_to_ras, roi.size, 0.0,
                                      ijk_order=True)
    return values.to(torch.float32).numpy()


def _masked_z_normalise(values: np.ndarray) -> np.ndarray:
    """torchio ``ZNormalization(masking_method=lambda x: x > 0)``, in place on the float32 ``values`` (returned):
    statistics over x > 0 (float64, unbiased std), applied to all voxels.

    The foreground is gathered by a boolean index: on real CT and MR regions (long runs of foreground) it took
    2.2-4.3 ms against 4.5-5.4 ms for ``np.compress``, which wins only on speckled masks (4.8 against 16 ms).
    """
    foreground = values[values > 0]
    if foreground.size < 2:
        raise InputImageError(
            "The region around the points has fewer than two voxels brighter than 0, so it cannot be "
            "normalised the way the models were trained (statistics over voxels > 0). Click on the object "
            "itself; if the image has no positive intensities, rescale it (e.g. shift it so tissue is > 0)."
        )
    mean = foreground.mean(dtype=np.float64)
    std = foreground.std(dtype=np.float64, ddof=1)
    if std == 0:
        raise InputImageError(
            "All voxels brighter than 0 in the region around the points have the same value, so it cannot be "
            "normalised (standard deviation 0). Click on a part of the image with contrast, or check the volume."
        )
    np.subtract(values, np.float32(mean), out=values)
    return np.divide(values, np.float32(std), out=values)


def _float32_xyz(values_kji: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 (x, y, z) copy of a (k, j, i) array: one multi-threaded pass in PyTorch when the
    process has already imported it (2x faster than NumPy's transposing copy), else NumPy; the same values."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            source = torch.from_numpy(values_kji)
        except (TypeError, ValueError):  # a type PyTorch does not hold: NumPy below
            pass
        else:
            out = torch.empty(values_kji.shape[::-1], dtype=torch.float32)
            return out.copy_(source.permute(2, 1, 0)).numpy()
    return np.ascontiguousarray(values_kji.transpose(2, 1, 0), dtype=np.float32)


def sitk_model_input(volume: Volume, roi: RegionOfInterest, normalize: bool = True) -> np.ndarray:
    """:func:`extract_model_input` through SimpleITK (bit-identical to torchio's resampling, ties included);
    needs no PyTorch (the remote client uses it directly)."""
    import SimpleITK as sitk

    values = _float32_xyz(_resample_onto_kji(volume, roi, sitk.sitkLinear))
    return _finite_and_normalised(values, normalize)


#: Normalised model input further than this many standard deviations from the mean is refused: it comes from a
#: fill value such as -3.4e38 ("no data"), overflows the network to NaN (its layer norms square the features),
#: and was reported as damaged weights.
MAX_NORMALISED_MAGNITUDE = 1e12


def _finite_and_normalised(values: np.ndarray, normalize: bool) -> np.ndarray:
    """``values`` (float32 model input) after the finiteness check, masked-z-normalised in place if asked."""
    if not np.all(np.isfinite(values)):
        raise InputImageError(
            "The region around the points holds NaN or infinite voxels, or values beyond the range of 32-bit "
            "floats (+-3.4e38). Replace non-finite voxels with a finite value (e.g. the image minimum), or rescale "
            "the image (e.g. to Hounsfield units), before segmenting."
        )
    if not normalize:
        return values
    values = _masked_z_normalise(values)
    low, high = float(values.min()), float(values.max())
    if max(-low, high) > MAX_NORMALISED_MAGNITUDE:
        raise InputImageError(
            f"The region around the points holds extreme values ({low:.3g} to {high:.3g} standard deviations "
            "from the tissue's mean), e.g. a 'no data' fill of -3.4e38, which would overflow the model. Replace "
            "them with an ordinary value (e.g. the lowest value of real tissue, or 0) and segment again."
        )
    return values


def extract_model_input(volume: Volume, roi: RegionOfInterest, normalize: bool = True) -> np.ndarray:
    """The model input: float32 (x, y, z) array of the volume resampled linearly onto ``roi`` (0 outside).

    As in torchio the interpolated values keep the volume's pixel type; with ``normalize`` the masked
    z-normalisation of the official pipeline follows (mean and unbiased std over voxels > 0, applied to all).
    Resampled with SimpleITK when it is installed, else (or with ``FASTSAM3D_RESAMPLE=torch``) in PyTorch
    (:mod:`FastSAM3DLib.resample`: ITK's arithmetic, equal but at exact ties).
    """
    from .. import resample

    if resample.backend("input") == "sitk":
        return sitk_model_input(volume, roi, normalize)
    return _finite_and_normalised(_resample_onto_torch(volume, roi), normalize)


def extract_label(volume_like: Volume, roi: RegionOfInterest) -> np.ndarray:
    """A label volume resampled nearest-neighbour onto ``roi``, (x, y, z) integer array (0 outside), for evaluation."""
    import SimpleITK as sitk
    array = volume_like.array
    if np.issubdtype(array.dtype, np.floating):
        volume_like = Volume(np.rint(array).astype(np.int32), volume_like.ijk_to_ras)
    values = resample_onto(volume_like, roi, sitk.sitkNearestNeighbor)
    return np.ascontiguousarray(values)
