"""Surface elements of a mask and the distances between two surfaces, as DeepMind's ``surface-distance`` gives them.

``surface_distance.compute_surface_distances`` (the CVPR 2025 challenge's implementation of the NSD) finds each
mask's surface elements at the corners between voxels (a 2×2×2 neighbourhood code other than all-in or
all-out), weighs each by the area its code spans at the voxel spacing, and measures each element's distance to
the nearest element of the other surface with a Euclidean distance transform over the masks' whole bounding
box: two transforms per call, which on a whole-body CT cost tens of seconds and gigabytes.

Here the same elements and areas (the package's own neighbour kernel and area table) are measured with a k-d
tree over the other surface's elements, so the cost follows the number of surface elements, not the box, and
a reference's surface is built once for all the clicks scored against it (:class:`Surface`). A distance is
the package's formula, ``sqrt((a·s0)² + (b·s1)² + (c·s2)²)`` in ``scipy``'s order of operations, applied to
the integer offset to the nearest element, and the lists are sorted by (distance, area) as the package sorts
them, so the dictionary is the package's, value for value. The one possible difference: where two elements
of the other surface are at exactly the same true distance, the two searches may pick different ones, whose
computed distances can differ in the last bit (never with spacings that are sums of powers of two, such as
0.5, 1 or 1.5 mm).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

#: the neighbourhood code of a corner whose eight voxels are all inside the mask
_ALL_INSIDE = 0b11111111


@dataclass(frozen=True, eq=False)
class Surface:
    """A mask's surface elements: corner ``points`` (n, 3) in array index units and their ``areas`` (mm²)."""

    points: np.ndarray
    areas: np.ndarray
    spacing: tuple

    @classmethod
    def of(cls, mask: np.ndarray, spacing: Sequence[float], offset: Sequence[int] = (0, 0, 0)) -> "Surface":
        """The surface of a 3D boolean ``mask`` (nonzero = inside) whose voxel 0 is voxel ``offset`` of the
        volume; ``spacing``: mm per voxel along the array's three axes."""
        from scipy import ndimage

        lookup_tables = surface_distance_package().lookup_tables

        mask = np.asarray(mask)
        if mask.ndim != 3 or len(spacing) != 3:
            raise ValueError(f"a surface needs a 3D mask and 3 spacings, got shape {mask.shape} and {tuple(spacing)}")
        spacing = tuple(float(s) for s in spacing)
        first, stop = _bounding_box(mask)
        if first is None:
            return cls(np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.float64), spacing)
        # one zero layer beyond the box's far faces, as the package pads it: the codes are those of the corners
        # between voxels, corner c sitting between voxels c - 1 and c along each axis (outside counts as out)
        box = np.zeros(tuple(int(n) + 1 for n in stop - first), dtype=np.uint8)
        box[:-1, :-1, :-1] = mask[tuple(slice(int(a), int(b)) for a, b in zip(first, stop))] != 0
        codes = ndimage.correlate(box, lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL, mode="constant", cval=0)
        del box
        border = (codes != 0) & (codes != _ALL_INSIDE)
        points = np.argwhere(border).astype(np.int64)
        areas = lookup_tables.create_table_neighbour_code_to_surface_area(spacing)[codes[border]]
        points += first + np.asarray(offset, dtype=np.int64)
        return cls(points, np.asarray(areas, dtype=np.float64), spacing)

    def __len__(self) -> int:
        return len(self.points)


def surface_distance_package():
    """DeepMind's ``surface-distance`` module, or an ImportError saying how to install it."""
    try:
        import surface_distance
    except ImportError as exc:
        raise ImportError("the normalised surface Dice needs DeepMind's 'surface-distance' package (the CVPR 2025 "
                          "challenge's implementation): pip install surface-distance") from exc
    return surface_distance


def _bounding_box(mask: np.ndarray):
    """(first, stop) voxel of the nonzero part along each axis, or (None, None) when there is none."""
    first, stop = [], []
    for axis in range(3):
        present = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return None, None
        first.append(int(present[0]))
        stop.append(int(present[-1]) + 1)
    return np.asarray(first, dtype=np.int64), np.asarray(stop, dtype=np.int64)


def _distances_to(points: np.ndarray, other: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from each of ``points`` to the nearest of ``other``; inf for all when ``other`` is empty."""
    if len(other) == 0:
        return np.full(len(points), np.inf)
    if len(points) == 0:
        return np.zeros(0, dtype=np.float64)
    from scipy.spatial import cKDTree

    scale = np.asarray(spacing, dtype=np.float64)
    tree = cKDTree(other * scale)
    _, nearest = tree.query(points * scale, k=1)
    offsets = (other[nearest] - points).astype(np.float64)
    # scipy's distance_transform_edt: each offset times its spacing, squared, summed over the axes in order
    d0, d1, d2 = (offsets[:, axis] * scale[axis] for axis in range(3))
    return np.sqrt((d0 * d0 + d1 * d1) + d2 * d2)


def _sorted(distances: np.ndarray, areas: np.ndarray):
    """Both lists sorted by (distance, area), the package's order."""
    order = np.lexsort((areas, distances))
    return distances[order], areas[order]


def surface_distances(reference: Surface, prediction: Surface) -> Dict[str, np.ndarray]:
    """``surface_distance.compute_surface_distances(reference mask, prediction mask, spacing)`` from the two
    surfaces: distances each way, sorted, with the surface areas in the same order."""
    if reference.spacing != prediction.spacing:
        raise ValueError(f"the surfaces have different spacings: {reference.spacing} and {prediction.spacing}")
    to_prediction, reference_areas = _sorted(
        _distances_to(reference.points, prediction.points, reference.spacing), reference.areas)
    to_reference, prediction_areas = _sorted(
        _distances_to(prediction.points, reference.points, reference.spacing), prediction.areas)
    return {"distances_gt_to_pred": to_prediction, "distances_pred_to_gt": to_reference,
            "surfel_areas_gt": reference_areas, "surfel_areas_pred": prediction_areas}
