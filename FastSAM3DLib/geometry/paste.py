"""Paste-back: model logits on a region of interest back onto the source volume's grid as a thresholded mask, only
over the box of source voxels the region reaches; in PyTorch by default, with SimpleITK on request
(``FASTSAM3D_RESAMPLE=sitk``), the same mask either way."""
from __future__ import annotations

import numpy as np

from .matrices import box_corners, sitk_image, sitk_resample, translation
from .roi import RegionOfInterest
from .volume import Volume, ras_to_ijk


def _model_logits(logits, size) -> np.ndarray:
    """Model-space logits as a float32 (x, y, z) array of ``size``; a 4x smaller grid is upsampled like the official
    code."""
    shape = tuple(logits.shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    if shape == tuple(size) and isinstance(logits, np.ndarray):
        return np.asarray(logits, dtype=np.float32).reshape(shape)
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(logits).detach().reshape(shape)
    if shape == tuple(n // 4 for n in size):
        with torch.no_grad():
            tensor = F.interpolate(tensor.float()[None, None], size=tuple(size), mode="trilinear",
                                   align_corners=False)[0, 0]
    elif shape != tuple(size):
        raise ValueError(f"logits of shape {tuple(logits.shape)} fit neither the ROI {size} nor its quarter")
    return tensor.float().cpu().numpy()


def source_box(volume: Volume, roi: RegionOfInterest, low_xyz, high_xyz):
    """Source voxels (first, stop) in (i, j, k), clipped to the volume, whose centres may lie in the model box."""
    ijk = ras_to_ijk(volume, roi.model_to_ras_points(box_corners(low_xyz, high_xyz)))
    last = np.array(volume.shape[::-1]) - 1
    first = np.maximum(np.ceil(ijk.min(axis=0) - 1e-6).astype(int), 0)
    stop = np.minimum(np.floor(ijk.max(axis=0) + 1e-6).astype(int), last) + 1
    return first, np.maximum(stop, first)


def paste_back(volume: Volume, roi: RegionOfInterest, logits, threshold: float = 0.0):
    """Threshold model-space logits on the source grid, only inside the ROI's bounding box.

    ``logits``: (x, y, z) array or tensor, the ROI's size or the 4x smaller low-res grid (upsampled trilinearly,
    ``align_corners=False``). The logits are resampled linearly onto the source voxels and thresholded
    (``> threshold``). Returns ``(region, mask)``: ``region = (slice_k, slice_j, slice_i)`` on the source
    array, clipped to the volume, and ``mask`` a bool array of that region's shape (False outside the ROI).
    Computed in PyTorch on the logits' device (:func:`~FastSAM3DLib.resample.threshold_logits`: the same mask as
    SimpleITK) or, with ``FASTSAM3D_RESAMPLE=sitk``, with SimpleITK. Logits holding NaN or infinity are refused
    (ValueError): the paths would spread them differently (a matrix product makes one NaN blank whole planes).
    """
    from .. import resample

    finite = bool(logits.isfinite().all()) if hasattr(logits, "isfinite") else bool(np.isfinite(logits).all())
    if not finite:
        raise ValueError("the logits hold NaN or infinite values; a model output like that has no mask")
    if resample.backend("paste") != "sitk":
        return _paste_back_torch(volume, roi, logits, threshold)
    return paste_field_sitk(volume, roi, _model_logits(logits, roi.size), threshold)


def paste_field_sitk(volume: Volume, roi: RegionOfInterest, field: np.ndarray, threshold: float = 0.0):
    """:func:`paste_back` of the full-size (x, y, z) float32 ``field`` with SimpleITK's linear resampling.

    Which source voxels lie inside the ROI is decided by :func:`~FastSAM3DLib.grid_map.inside_field`, the rule of
    the PyTorch path, not by ITK: a voxel centre exactly on a face of the ROI (3 mm slices and a 1.5 mm model grid
    make that common) falls either way with ITK's float noise. Their values are ITK's: the field is padded with a
    copy of its edge voxels, which gives at the face exactly ITK's half-voxel clamp.
    """
    import SimpleITK as sitk

    from ..grid_map import index_map, inside_field

    size = np.asarray(roi.size, dtype=np.float64)
    first, stop = source_box(volume, roi, -0.5, size - 0.5)
    region = tuple(slice(int(first[axis]), int(stop[axis])) for axis in (2, 1, 0))
    mask = np.zeros(tuple(int(stop[axis] - first[axis]) for axis in (2, 1, 0)), dtype=bool)
    above = field > threshold
    positive = [np.flatnonzero(np.any(above, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if mask.size == 0 or any(len(p) == 0 for p in positive):
        return region, mask
    # a linear interpolant exceeds the threshold only within one model voxel of a voxel that does
    low = np.maximum([p[0] - 1.0 for p in positive], -0.5)
    high = np.minimum([p[-1] + 1.0 for p in positive], size - 0.5)
    box_first, box_stop = source_box(volume, roi, low, high)
    box_first, box_stop = np.maximum(box_first, first), np.maximum(np.minimum(box_stop, stop), box_first)
    if np.any(box_stop <= box_first):
        return region, mask
    crop_first = np.maximum([p[0] - 1 for p in positive], 0)  # the model voxels those source voxels interpolate
    crop_stop = np.minimum([p[-1] + 2 for p in positive], roi.size)
    crop = field[crop_first[0]:crop_stop[0], crop_first[1]:crop_stop[1], crop_first[2]:crop_stop[2]]
    pad = [(int(crop_first[a] == 0), int(crop_stop[a] == roi.size[a])) for a in range(3)]  # at the ROI's faces
    crop = np.pad(crop, pad, mode="edge")
    crop_to_ras = roi.model_to_ras @ translation(crop_first - np.array([before for before, _ in pad]))
    image = sitk_image(np.ascontiguousarray(crop.transpose(2, 1, 0)), crop_to_ras)
    box_to_ras = volume.ijk_to_ras @ translation(box_first)
    values = sitk_resample(image, box_to_ras, box_stop - box_first, sitk.sitkLinear, -np.inf, sitk.sitkFloat32)
    inside = inside_field(index_map(roi.model_to_ras, box_to_ras), box_stop - box_first, roi.size)
    offset = box_first - first
    box = tuple(slice(int(offset[axis]), int(offset[axis] + box_stop[axis] - box_first[axis])) for axis in (2, 1, 0))
    mask[box] = (values > threshold) & inside
    return region, mask


def positive_model_box(spans, shape, size):
    """The model-voxel box ``(low, high)`` (x, y, z) outside which a field cannot exceed a threshold.

    ``spans``: per axis the first and last index of the field's (``shape``) slabs holding a value above it;
    the field is upsampled linearly to ``size`` (when smaller) and then interpolated linearly: an upsampled
    voxel can exceed the threshold only where it reads such a slab, and an interpolated position only within one
    model voxel of such a voxel.
    """
    from .. import resample

    low, high = [], []
    for axis in range(3):
        weights = resample.upsample_matrix(shape[axis], size[axis])[:, spans[axis][0]:spans[axis][1] + 1]
        touched = np.flatnonzero(np.any(weights != 0, axis=1))
        low.append(max(touched[0] - 1.0, -0.5))
        high.append(min(touched[-1] + 1.0, size[axis] - 0.5))
    return np.array(low), np.array(high)


def _paste_back_torch(volume: Volume, roi: RegionOfInterest, logits, threshold: float):
    """:func:`paste_back` in PyTorch: the same region and mask, without forming the upsampled 128³ field."""
    import torch

    from .. import resample

    tensor = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    shape = tuple(tensor.shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    if shape != tuple(roi.size) and shape != tuple(n // 4 for n in roi.size):
        raise ValueError(f"logits of shape {tuple(logits.shape)} fit neither the ROI {roi.size} nor its quarter")
    tensor = tensor.detach().reshape(shape)
    size = np.asarray(roi.size, dtype=np.float64)
    first, stop = source_box(volume, roi, -0.5, size - 0.5)
    region = tuple(slice(int(first[axis]), int(stop[axis])) for axis in (2, 1, 0))
    region_shape = tuple(int(stop[axis] - first[axis]) for axis in (2, 1, 0))
    above = tensor > threshold
    positive = [torch.nonzero(above.any(dim=a).any(dim=b - 1)).flatten().cpu().numpy()
                for a, b in ((1, 2), (0, 2), (0, 1))]
    if int(np.prod(region_shape)) == 0 or any(len(p) == 0 for p in positive):
        return region, np.zeros(region_shape, dtype=bool)
    low, high = positive_model_box([(p[0], p[-1]) for p in positive], shape, roi.size)
    box_first, box_stop = source_box(volume, roi, low, high)
    box_first, box_stop = np.maximum(box_first, first), np.maximum(np.minimum(box_stop, stop), box_first)
    if np.any(box_stop <= box_first):
        return region, np.zeros(region_shape, dtype=bool)
    values = resample.threshold_logits(tensor, roi.model_to_ras, roi.size, volume.ijk_to_ras, box_first,
                                       box_stop - box_first, threshold).cpu().numpy()
    if np.array_equal(box_first, first) and np.array_equal(box_stop, stop):
        return region, values
    mask = np.zeros(region_shape, dtype=bool)
    offset = box_first - first
    box = tuple(slice(int(offset[axis]), int(offset[axis] + box_stop[axis] - box_first[axis])) for axis in (2, 1, 0))
    mask[box] = values
    return region, mask
