"""Model space: the 1.5 mm canonical grid of a volume (torchio's ``Resample`` and ``ToCanonical`` rules) and the
128³ :class:`RegionOfInterest` the model sees, placed around clicks or centred on a mask as the official code does."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PromptError
from .matrices import apply_affine, box_corners, translation
from .model_input import resample_onto
from .volume import Volume, ras_to_ijk



MODEL_SPACING = 1.5
MODEL_SIZE = 128


@dataclass(frozen=True, eq=False)
class RegionOfInterest:
    """A model-space box: voxel (x,y,z) of the model input -> RAS via model_to_ras."""

    model_to_ras: np.ndarray
    size: tuple = (MODEL_SIZE, MODEL_SIZE, MODEL_SIZE)

    def __post_init__(self):
        matrix = np.array(self.model_to_ras, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"model_to_ras must be a 4x4 matrix, got shape {matrix.shape}")
        matrix.flags.writeable = False
        size = tuple(int(n) for n in self.size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"size must be three positive integers, got {self.size}")
        object.__setattr__(self, "model_to_ras", matrix)
        object.__setattr__(self, "size", size)

    def __eq__(self, other):
        if not isinstance(other, RegionOfInterest):
            return NotImplemented
        return self.size == other.size and np.array_equal(self.model_to_ras, other.model_to_ras)

    def __hash__(self):
        return hash((self.size, (self.model_to_ras + 0.0).tobytes()))  # + 0.0 maps -0.0 to 0.0

    def ras_to_model(self, ras: np.ndarray) -> np.ndarray:
        """Convert RAS points (N, 3) to continuous model voxel coordinates (x, y, z) of this box."""
        return apply_affine(np.linalg.inv(self.model_to_ras), ras)

    def model_to_ras_points(self, xyz: np.ndarray) -> np.ndarray:
        """Convert model voxel coordinates (N, 3) in (x, y, z) order to RAS points."""
        return apply_affine(self.model_to_ras, xyz)

    def contains(self, ras: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """True for each RAS point inside the box shrunk by ``margin`` model voxels (the box spans -0.5..size-0.5)."""
        xyz = self.ras_to_model(ras).reshape(-1, 3)
        size = np.asarray(self.size, dtype=np.float64)
        inside = (xyz >= -0.5 + margin) & (xyz <= size - 0.5 - margin)
        return inside.all(axis=1).reshape(np.shape(ras)[:-1])

    def sub_grid(self, start, size=(MODEL_SIZE, MODEL_SIZE, MODEL_SIZE)) -> RegionOfInterest:
        """The box of the same grid whose voxel 0 is this box's voxel ``start`` (may lie outside), of ``size``."""
        return RegionOfInterest(self.model_to_ras @ translation(start), tuple(size))

    def extent_corners_ras(self) -> np.ndarray:
        """RAS positions (8, 3) of the corners of the box's extent (half a voxel beyond the outer centres)."""
        return self.model_to_ras_points(box_corners(-0.5, np.asarray(self.size) - 0.5))


def _closest_ras_axes(directions: np.ndarray):
    """For each RAS axis, the voxel axis closest to it and whether that voxel axis points the opposite way.

    The rule of torchio's ToCanonical (nibabel's orientation rule): orthogonalise the direction matrix, then
    walk the voxel axes in order, give each the still free world axis with the largest absolute component.
    """
    u, _, vt = np.linalg.svd(directions)
    rotation = u @ vt
    voxel_axis = [0, 0, 0]
    flipped = [False, False, False]
    for axis in range(3):
        column = rotation[:, axis]
        world = int(np.argmax(np.abs(column)))
        voxel_axis[world] = axis
        flipped[world] = bool(column[world] < 0)
        rotation[world, :] = 0.0
    return voxel_axis, flipped


def canonical_grid(volume: Volume, spacing: float = MODEL_SPACING) -> RegionOfInterest:
    """The whole grid of torchio's ``ToCanonical()(Resample(spacing)(image))`` for this volume, as a box."""
    size_ijk = np.array(volume.shape[::-1], dtype=np.float64)
    old_spacing = volume.spacing
    directions = volume.ijk_to_ras[:3, :3] / old_spacing
    centre = apply_affine(volume.ijk_to_ras, (size_ijk - 1) / 2)
    # torchio: floor(old_size * old_spacing / new_spacing); snap float noise of the spacing (a column norm
    # here) so that an exact multiple stays exact.
    ratio = size_ijk * old_spacing / spacing
    ratio = np.where(np.abs(ratio - np.round(ratio)) <= 1e-9 * np.maximum(ratio, 1.0), np.round(ratio), ratio)
    new_size = np.maximum(np.floor(ratio), 1.0)
    new_size[size_ijk == 1] = 1.0
    resampled_to_ras = np.eye(4)
    resampled_to_ras[:3, :3] = directions * spacing
    resampled_to_ras[:3, 3] = centre - directions @ ((new_size - 1) / 2 * spacing)

    voxel_axis, flipped = _closest_ras_axes(directions)
    model_to_resampled = np.zeros((4, 4))
    model_to_resampled[3, 3] = 1.0
    for world in range(3):
        axis = voxel_axis[world]
        if flipped[world]:
            model_to_resampled[axis, world] = -1.0
            model_to_resampled[axis, 3] = new_size[axis] - 1
        else:
            model_to_resampled[axis, world] = 1.0
    size = tuple(int(new_size[voxel_axis[world]]) for world in range(3))
    return RegionOfInterest(resampled_to_ras @ model_to_resampled, size)


def _torchio_crop_start(centre: float, target: int) -> int:
    """First voxel of torchio CropOrPad's window of ``target`` voxels around ``centre`` (voxel units, mask rule).

    torchio moves a centre by -0.5 when ``target`` is even XOR the centre is on a voxel index; the window then
    starts at ``centre - target / 2``, which is always a whole number here.
    """
    on_index = float(centre) % 1 == 0
    even = target % 2 == 0
    if even != on_index:
        centre -= 0.5
    return int(centre - target / 2)


def _torchio_centre_start(length: int, target: int) -> int:
    """First voxel of torchio CropOrPad's window when it centres on the volume (all-zero mask fallback)."""
    if length >= target:
        return int(np.ceil((length - target) / 2))
    return -int(np.ceil((target - length) / 2))


def _check_points(volume: Volume, ras_points: np.ndarray) -> np.ndarray:
    """Return ras_points as (N, 3) float64; PromptError if empty, not finite or outside the volume."""
    points = np.asarray(ras_points, dtype=np.float64)
    if points.size == 0 or points.shape[-1] != 3 or not np.all(np.isfinite(points)):
        raise PromptError(
            f"Got points of shape {points.shape}; give at least one point as finite (R, A, S) coordinates in mm "
            "inside the volume."
        )
    points = points.reshape(-1, 3)
    ijk = ras_to_ijk(volume, points)
    limit = np.array(volume.shape[::-1], dtype=np.float64) - 0.5
    outside = np.any((ijk < -0.5 - 1e-6) | (ijk > limit + 1e-6), axis=1)
    if outside.any():
        first = points[np.argmax(outside)]
        raise PromptError(
            f"{int(outside.sum())} point(s) lie outside the volume (e.g. R={first[0]:.1f}, A={first[1]:.1f}, "
            f"S={first[2]:.1f} mm). Click inside the image; remove or move points placed outside it, or check "
            "that the point list belongs to this volume and is not moved by a transform."
        )
    return points


def roi_around(volume: Volume, ras_points: np.ndarray, size: int = MODEL_SIZE,
               spacing: float = MODEL_SPACING) -> RegionOfInterest:
    """The ``size``^3 box of the canonical grid centred on the voxel nearest the centre of the points' bounding box.

    For that centre voxel the box is the one torchio's CropOrPad cuts (a one-voxel mask there); it may reach
    beyond the volume (zero padding). PromptError if a point lies outside the volume.
    """
    points = _check_points(volume, ras_points)
    grid = canonical_grid(volume, spacing)
    xyz = grid.ras_to_model(points)
    centre = np.floor((xyz.min(axis=0) + xyz.max(axis=0)) / 2 + 0.5)
    start = [_torchio_crop_start(c, size) for c in centre]
    return grid.sub_grid(start, (size, size, size))


def roi_centred_on_mask(volume: Volume, mask_kji: np.ndarray, size: int = MODEL_SIZE,
                        spacing: float = MODEL_SPACING) -> RegionOfInterest:
    """The official evaluation box: torchio ``CropOrPad(size, mask_name=...)`` of the resampled canonical mask.

    ``mask_kji`` (nonzero = object) lies on ``volume``'s grid; it is resampled nearest-neighbour onto the
    canonical grid and the box is centred on its bounding box (on the volume centre when it is empty).
    """
    import SimpleITK as sitk
    mask = np.asarray(mask_kji)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's (K, J, I) shape {volume.shape}")
    grid = canonical_grid(volume, spacing)
    resampled = resample_onto(Volume((mask != 0).astype(np.uint8), volume.ijk_to_ras), grid,
                               sitk.sitkNearestNeighbor)
    present = [np.flatnonzero(resampled.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(len(p) == 0 for p in present):
        start = [_torchio_centre_start(length, size) for length in grid.size]
    else:
        start = [_torchio_crop_start((p[0] + p[-1] + 1) / 2, size) for p in present]
    return grid.sub_grid(start, (size, size, size))
