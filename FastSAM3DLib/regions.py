"""Several 128³ regions of one segment: their lattice on the model grid, the blend of their logits, the paste-back.

A segment that does not fit in one region of interest is assembled from regions that all lie on one
*lattice* of the volume's canonical model grid (1.5 mm, RAS order, see :mod:`.geometry`): region ``n = (a, b,
c)`` starts at grid voxel ``origin + stride * n``, with ``stride = size - overlap``. The first region is the
one the single-region session would use (:func:`geometry.roi_around` the first click), so the lattice is
anchored there. Neighbouring regions share ``overlap`` model voxels across their common face; the stride is a
multiple of 4, so the regions' 32³ low-res logit grids are aligned cell for cell.

Blending: every region weighs its low-res cells by a ramp that falls linearly over the overlap towards each of
its faces (the product of the three axes' ramps); where several regions cover a cell their logits are mixed
with these weights normalised to sum to 1, so across a shared face one region fades into the next and no seam
appears. A cell covered by one region keeps its logit exactly (``w / w == 1``), so a single region pastes back
to exactly the mask the single-region session gives.

Paste-back: the blended cells form one low-res field over the regions' bounding box, pasted with
:func:`geometry.paste_back` like a single region's logits (trilinear ×4 upsampling, then linear resampling onto
the source voxels). Cells no region covers get, next to covered cells, the value of that neighbour (what the
upsampling's edge clamping gives a lone region) and a large negative value further out; source voxels outside
every region's extent are False, exactly as outside a single region.

Re-paste: when only some regions' logits change (a refining click), :func:`repaste` thresholds again only the
source voxels those regions' cells can reach, and of those only the ones near a cell above the threshold, and
keeps the rest of the last paste; where that costs more than :func:`paste` (a thin segment) it pastes whole.
Its mask is :func:`paste`'s except at ties (a voxel whose value is the threshold to float64 rounding: the
products are summed in another blocking of the matrix products).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import geometry, resample
from .devices import supported_device
from .geometry import RegionOfInterest, Volume

Index = Tuple[int, int, int]
Region = Tuple[slice, slice, slice]
#: Logit given to low-res cells that no region covers and that touch none that is covered.
OUTSIDE_LOGIT = -1.0e4
#: Source voxels per chunk of the coverage test of the paste-back.
_CHUNK = 1 << 22
#: Low-res cells around changed regions whose source voxels :func:`repaste` computes again (fill + interpolation).
_REPASTE_MARGIN = 2
#: What copying a voxel of the last mask costs :func:`repaste`, against thresholding one voxel (measured on a
#: 2-core Xeon, two threads: 0.3-0.5 ns against about 8 ns).
_COPY_COST = 1 / 16


@dataclass(frozen=True, eq=False)
class Lattice:
    """The regions one segment may use: ``size``³ boxes of the canonical ``grid`` every ``stride`` voxels from
    ``origin``."""

    grid: RegionOfInterest
    origin: Tuple[int, int, int]
    size: int = geometry.MODEL_SIZE
    stride: int = geometry.MODEL_SIZE - 32

    def __post_init__(self):
        if self.size % 4 or self.stride % 4 or not 0 < self.stride <= self.size:
            raise ValueError(f"size ({self.size}) and stride ({self.stride}) must be multiples of 4 with "
                             "0 < stride <= size")
        object.__setattr__(self, "origin", tuple(int(v) for v in self.origin))

    @classmethod
    def around(cls, volume: Volume, roi: RegionOfInterest, size: int, spacing: float, overlap: int) -> "Lattice":
        """The lattice whose region (0, 0, 0) is ``roi`` (a box of ``volume``'s canonical grid at ``spacing``)."""
        grid = geometry.canonical_grid(volume, spacing)
        relative = np.linalg.inv(grid.model_to_ras) @ roi.model_to_ras
        start = np.rint(relative[:3, 3])
        if not (np.allclose(relative[:3, :3], np.eye(3), atol=1e-6) and np.allclose(relative[:3, 3], start, atol=1e-4)):
            raise ValueError("the region is not a box of the volume's canonical model grid")
        return cls(grid, tuple(int(v) for v in start), int(size), int(size) - int(overlap))

    @property
    def low(self) -> int:
        """Cells per axis of a region's low-res logits."""
        return self.size // 4

    @property
    def low_stride(self) -> int:
        """Low-res cells between neighbouring regions."""
        return self.stride // 4

    def start(self, index: Index) -> np.ndarray:
        """Grid voxel (x, y, z) of region ``index``'s voxel 0."""
        return np.asarray(self.origin, dtype=np.int64) + self.stride * np.asarray(index, dtype=np.int64)

    def roi(self, index: Index) -> RegionOfInterest:
        """Region ``index`` as a box of the model grid."""
        return self.grid.sub_grid(self.start(index), (self.size,) * 3)

    def central_index(self, ras: np.ndarray) -> Index:
        """The region whose centre is nearest the RAS point (it holds the point at least (size - stride) / 2 voxels
        inside)."""
        xyz = self.grid.ras_to_model(np.asarray(ras, dtype=np.float64).reshape(1, 3))[0]
        centre = np.asarray(self.origin) + (self.size - 1) / 2.0
        return tuple(int(v) for v in np.floor((xyz - centre) / self.stride + 0.5))

    def continues(self, index: Index, axis: int, direction: int, min_voxels: int = 4) -> bool:
        """Whether the volume's grid holds at least ``min_voxels`` voxels (along ``axis``) of what the neighbour
        of ``index`` across that face adds beyond it."""
        start = int(self.start(index)[axis])
        if direction > 0:
            low, high = start + self.size, start + self.stride + self.size
        else:
            low, high = start - self.stride, start
        inside = min(high, self.grid.size[axis]) - max(low, 0)
        return inside >= min_voxels

    def overlapping(self, index: Index) -> Iterable[Index]:
        """The indices of every region that shares voxels with region ``index`` (itself included)."""
        reach = -(-self.size // self.stride) - 1  # regions this many steps away still overlap
        steps = range(-reach, reach + 1)
        for da in steps:
            for db in steps:
                for dc in steps:
                    yield (index[0] + da, index[1] + db, index[2] + dc)


def _ramp(cells: int, fade: int) -> torch.Tensor:
    """(cells,) float64 weights rising linearly over ``fade`` cells from each end to 1 (all 1 when fade is 0)."""
    u = torch.arange(cells, dtype=torch.float64) + 0.5
    if fade <= 0:
        return torch.ones(cells, dtype=torch.float64)
    return torch.clamp(torch.minimum(u, cells - u) / fade, max=1.0)


def blend(lattice: Lattice, logits: Mapping[Index, torch.Tensor], indices: Optional[Iterable[Index]] = None):
    """The regions' low-res logits blended on their bounding box of lattice cells.

    ``logits``: region index -> ``(..., low, low, low)`` logits; ``indices``: the regions to use (default all).
    Returns ``(first_cell, field, covered)``: the box's first low-res cell (x, y, z) counted from the lattice
    origin, the float64 field ``(X, Y, Z)`` (uncovered cells filled as the module doc says) and the bool tensor
    of covered cells, on the logits' device (the CPU for MPS logits: MPS has no float64). None when there is no
    region.
    """
    chosen = list(logits) if indices is None else [i for i in indices if i in logits]
    if not chosen:
        return None
    low, step = lattice.low, lattice.low_stride
    firsts = np.array([[v * step for v in index] for index in chosen])
    first = firsts.min(axis=0)
    shape = tuple(int(v) for v in firsts.max(axis=0) - first + low)
    device = supported_device(logits[chosen[0]].device)
    ramp = _ramp(low, low - step).to(device)
    weight = ramp[:, None, None] * ramp[None, :, None] * ramp[None, None, :]
    boxes = [tuple(slice(int(a - f), int(a - f) + low) for a, f in zip(corner, first)) for corner in firsts]
    total = torch.zeros(shape, dtype=torch.float64, device=device)
    for box in boxes:
        total[box] += weight
    field = torch.zeros(shape, dtype=torch.float64, device=device)
    for index, box in zip(chosen, boxes):
        values = logits[index].reshape(low, low, low).to(device=device, dtype=torch.float64)
        field[box] += (weight / total[box]) * values
    covered = total > 0
    return first, _fill_outside(field, covered), covered


def _fill_outside(field: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Uncovered cells next to covered ones take that neighbour's value (axis by axis); the rest OUTSIDE_LOGIT."""
    if bool(covered.all()):
        return field
    filled = covered.clone()
    field = torch.where(covered, field, torch.full_like(field, OUTSIDE_LOGIT))
    for axis in range(3):
        for shift in (1, -1):
            source_filled = torch.roll(filled, shift, dims=axis)
            source_value = torch.roll(field, shift, dims=axis)
            edge = [slice(None)] * 3
            edge[axis] = slice(0, 1) if shift == 1 else slice(-1, None)  # roll wraps around: not a neighbour
            source_filled[tuple(edge)] = False
            take = source_filled & ~filled
            field = torch.where(take, source_value, field)
            filled = filled | take
    return field


def paste(volume: Volume, lattice: Lattice, logits: Mapping[Index, torch.Tensor], threshold: float = 0.0):
    """The blended regions thresholded on ``volume``'s grid: ``(region, mask)`` like :func:`geometry.paste_back`.

    ``region`` is the source-grid bounding box of the regions' extent (clipped to the volume), ``mask`` bool of
    its shape; voxels outside every region are False. ``(empty region, None)`` when there is no region.
    """
    blended = blend(lattice, logits)
    if blended is None:
        return (slice(0, 0), slice(0, 0), slice(0, 0)), None
    return _paste_blended(volume, lattice, *blended, threshold)


def _field_roi(lattice: Lattice, first: np.ndarray, field: torch.Tensor) -> RegionOfInterest:
    """The model-grid box of a blended field whose first low-res cell is ``first``."""
    return lattice.grid.sub_grid(np.asarray(lattice.origin) + 4 * np.asarray(first), tuple(4 * n for n in field.shape))


def _paste_blended(volume: Volume, lattice: Lattice, first: np.ndarray, field: torch.Tensor, covered: torch.Tensor,
                   threshold: float):
    """:func:`paste` of the field :func:`blend` gave."""
    roi = _field_roi(lattice, first, field)
    region, mask = geometry.paste_back(volume, roi, field, threshold)
    if not bool(covered.all()) and mask.any():
        _clear_uncovered(volume, roi, covered.cpu().numpy(), field.cpu().numpy(), region, mask)
    return region, mask


def repaste(volume: Volume, lattice: Lattice, logits: Mapping[Index, torch.Tensor], changed: Iterable[Index],
            pasted: Tuple[Region, np.ndarray], threshold: float = 0.0):
    """:func:`paste` of ``logits`` given ``pasted``, the ``(region, mask)`` :func:`paste` gave for logits of the
    same regions that differ only in the regions ``changed``: only the source voxels those regions' cells can
    reach are thresholded again, the rest is copied from ``pasted`` (a new mask; ``pasted`` is not modified).

    The blended field differs only in the changed regions' cells and, through the fill of uncovered cells, one
    cell around them; a source voxel's value reads the low-res cells within one cell of its model position
    (trilinear upsampling, then linear resampling). So the voxels within :data:`_REPASTE_MARGIN` cells of the
    changed regions are computed again, with the whole field and ROI as :func:`paste` uses them, and of those
    only the ones near a cell above the threshold (the others are False, as :func:`paste` leaves them). Where
    that and the copy cost more than the whole paste (a thin segment: :func:`paste` thresholds only around its
    positive cells), the whole paste is made instead (:data:`_COPY_COST`).
    """
    blended = blend(lattice, logits)
    changed = [index for index in changed if index in logits]
    if blended is None or not changed:
        raise ValueError("repaste needs the regions of a paste and at least one of them changed")
    first, field, covered = blended
    roi = _field_roi(lattice, first, field)
    region, mask = pasted
    first_voxel, stop_voxel = geometry.source_box(volume, roi, -0.5, np.asarray(roi.size) - 0.5)
    if region != tuple(slice(int(first_voxel[a]), int(stop_voxel[a])) for a in (2, 1, 0)) or \
            mask.shape != tuple(s.stop - s.start for s in region):
        raise ValueError(f"the pasted mask {mask.shape} of {region} is not a paste of these regions")
    above = (field > threshold).cpu().numpy()
    whole = _voxels(_positive_box(volume, roi, above, first_voxel, stop_voxel))
    cells = [region_cells(lattice, first, index) for index in changed]
    low = np.maximum([min(c[axis].start for c in cells) - _REPASTE_MARGIN for axis in range(3)], 0)
    high = np.minimum([max(c[axis].stop for c in cells) + _REPASTE_MARGIN for axis in range(3)], field.shape)
    box_first, box_stop = _within(geometry.source_box(volume, roi, 4 * low - 0.5, 4 * high - 0.5), first_voxel,
                                  stop_voxel)
    near = _positive_box(volume, roi, above, box_first, box_stop)
    if _voxels(near) + mask.size * _COPY_COST >= whole:  # a thin segment, or a change reaching most of it
        return _paste_blended(volume, lattice, first, field, covered, threshold)
    if not bool(torch.isfinite(field).all()):
        raise ValueError("the logits hold NaN or infinite values; a model output like that has no mask")
    out = mask.copy()
    if np.all(box_stop > box_first):
        out[_local(box_first, box_stop, first_voxel)] = False
    if near is None:
        return region, out
    values = resample.threshold_logits(field, roi.model_to_ras, roi.size, volume.ijk_to_ras, near[0],
                                       near[1] - near[0], threshold).cpu().numpy()
    inner = _local(near[0], near[1], first_voxel)
    out[inner] = values
    if not bool(covered.all()) and values.any():
        _clear_uncovered(volume, roi, covered.cpu().numpy(), field.cpu().numpy(), _local(near[0], near[1], 0),
                         out[inner])
    return region, out


def _voxels(box) -> int:
    """Voxels of the source box ``(first, stop)``; 0 for None."""
    return 0 if box is None else int(np.prod(box[1] - box[0]))


def _within(box, lower: np.ndarray, upper: np.ndarray):
    """The source box ``(first, stop)`` (i, j, k) clipped to ``lower``..``upper``."""
    return np.maximum(box[0], lower), np.minimum(box[1], upper)


def _local(first: np.ndarray, stop: np.ndarray, offset) -> Region:
    """The (k, j, i) slices of the source box ``first``..``stop`` (i, j, k) in an array starting at ``offset``."""
    return tuple(slice(int(a), int(b)) for a, b in zip((first - offset)[::-1], (stop - offset)[::-1]))


def _positive_box(volume: Volume, roi: RegionOfInterest, above: np.ndarray, box_first: np.ndarray,
                  box_stop: np.ndarray):
    """The part of the source box ``box_first``..``box_stop`` where a voxel may exceed the threshold, given
    ``above``, the low-res cells of the field pasted on ``roi`` that do: ``(first, stop)``, or None when none can.

    The voxels' model positions read cells within one cell of theirs; among those cells (and one more on each
    side, for rounding), the ones above the threshold bound the box (:func:`geometry.positive_model_box`).
    """
    if np.any(box_stop <= box_first):
        return None
    to_model = np.linalg.inv(roi.model_to_ras) @ volume.ijk_to_ras
    corners = geometry.box_corners(box_first, box_stop - 1)
    model = corners @ to_model[:3, :3].T + to_model[:3, 3]
    reach_first = np.maximum(np.floor(model.min(axis=0) / 4).astype(int) - 2, 0)
    reach_stop = np.minimum(np.floor(model.max(axis=0) / 4).astype(int) + 3, above.shape)
    if np.any(reach_stop <= reach_first):
        return None
    reached = above[tuple(slice(int(a), int(b)) for a, b in zip(reach_first, reach_stop))]
    spans = []
    for axis in range(3):
        hits = np.flatnonzero(reached.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(hits) == 0:
            return None
        spans.append((int(reach_first[axis] + hits[0]), int(reach_first[axis] + hits[-1])))
    low, high = geometry.positive_model_box(spans, above.shape, roi.size)
    near = _within(geometry.source_box(volume, roi, low, high), box_first, box_stop)
    return near if np.all(near[1] > near[0]) else None


def _clear_uncovered(volume: Volume, roi: RegionOfInterest, covered: np.ndarray, field: np.ndarray,
                     region: Region, mask: np.ndarray) -> None:
    """Set False, in place, the mask voxels whose centre lies in a low-res cell of ``roi`` no region covers.

    Only uncovered cells whose field is not OUTSIDE_LOGIT, and their neighbours, can hold a positive voxel; the
    voxels of the source box around them are tested: slab by slab where each model axis follows one source axis
    (:func:`_clear_aligned`), else one by one (:func:`_clear_voxels`). Both give the same mask.
    """
    risky = ~covered & _dilate(field > OUTSIDE_LOGIT / 2)
    if not risky.any():
        return
    cells = np.argwhere(risky)
    box_first, box_stop = geometry.source_box(volume, roi, 4 * cells.min(axis=0) - 0.5, 4 * cells.max(axis=0) + 3.5)
    first = np.maximum(box_first - [region[2].start, region[1].start, region[0].start], 0)
    stop = np.minimum(box_stop - [region[2].start, region[1].start, region[0].start], mask.shape[::-1])
    if np.any(stop <= first):
        return
    sub = mask[first[2]:stop[2], first[1]:stop[1], first[0]:stop[0]]
    to_model = np.linalg.inv(roi.model_to_ras) @ volume.ijk_to_ras
    offset = first + [region[2].start, region[1].start, region[0].start]
    axes = _axis_cells(to_model, offset, sub.shape[::-1], covered.shape)
    if axes is None:
        _clear_voxels(to_model, covered, offset, sub)
    else:
        _clear_aligned(axes, covered, sub)


def _axis_cells(to_model: np.ndarray, offset, counts, cells) -> Optional[list]:
    """Per source axis (i, j, k): ``(model axis, low-res cell of each voxel)`` for ``counts`` voxels from ``offset``,
    or None unless each model axis follows one source axis exactly (the other two matrix entries 0).

    The cell of a voxel is the one :func:`_clear_voxels` computes (``affine_rows`` adds the zero terms, which
    change nothing): ``floor((x + 0.5) / 4)`` of ``x = index * scale + shift``, clipped to the cells.
    """
    linear = np.asarray(to_model, dtype=np.float64)[:3, :3]
    nonzero = linear != 0
    if not (np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1)):
        return None
    axes = []
    for source in range(3):
        model = int(np.flatnonzero(nonzero[:, source])[0])
        index = np.arange(offset[source], offset[source] + counts[source], dtype=np.float64)
        x = index * linear[model, source] + to_model[model, 3]
        axes.append((model, np.clip(np.floor((x + 0.5) / 4.0).astype(np.int64), 0, cells[model] - 1)))
    return axes


def _clear_aligned(axes: list, covered: np.ndarray, sub: np.ndarray) -> None:
    """Set False, in place, the voxels of ``sub`` (k, j, i) in uncovered cells, given :func:`_axis_cells`'s ``axes``:
    each run of k-slices in one cell layer is ANDed with that layer's coverage, only over the (j, i) box of its
    uncovered cells."""
    (model_i, cell_i), (model_j, cell_j), (model_k, cell_k) = axes
    layers = np.transpose(covered, (model_k, model_j, model_i))  # covered[cell along k, cell along j, cell along i]
    used_j, used_i = np.unique(cell_j), np.unique(cell_i)
    starts = np.flatnonzero(np.diff(cell_k, prepend=cell_k[0] - 1))  # runs of k-slices in one cell
    for k0, k1 in zip(starts, list(starts[1:]) + [len(cell_k)]):
        layer = layers[cell_k[k0]]
        uncovered = ~layer[np.ix_(used_j, used_i)]
        if not uncovered.any():
            continue
        rows = np.flatnonzero(np.isin(cell_j, used_j[uncovered.any(axis=1)]))
        columns = np.flatnonzero(np.isin(cell_i, used_i[uncovered.any(axis=0)]))
        j0, j1, i0, i1 = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
        keep = layer[cell_j[j0:j1]][:, cell_i[i0:i1]]
        block = sub[k0:k1, j0:j1, i0:i1]
        np.logical_and(block, keep, out=block)


def _clear_voxels(to_model: np.ndarray, covered: np.ndarray, offset, sub: np.ndarray) -> None:
    """Set False, in place, the True voxels of ``sub`` (k, j, i; its voxel 0 is source voxel ``offset``) whose
    centre lies in an uncovered cell: any grid, voxel by voxel, in chunks of about :data:`_CHUNK` voxels."""
    last = np.array(covered.shape) - 1
    step = max(1, _CHUNK // max(sub[0].size, 1))
    for k0 in range(0, sub.shape[0], step):
        part = sub[k0:k0 + step]
        k, j, i = np.nonzero(part)
        if k.size == 0:
            continue
        ijk = np.stack([i + offset[0], j + offset[1], k + k0 + offset[2]], axis=1).astype(np.float64)
        xyz = geometry.affine_rows(ijk, to_model)
        cell = np.clip(np.floor((xyz + 0.5) / 4.0).astype(np.int64), 0, last)
        outside = ~covered[cell[:, 0], cell[:, 1], cell[:, 2]]
        part[k[outside], j[outside], i[outside]] = False


def _dilate(cells: np.ndarray) -> np.ndarray:
    """``cells`` grown by one cell in every direction (3x3x3), bool."""
    grown = cells.copy()
    for axis in range(3):
        before = grown.copy()
        index = [slice(None)] * 3
        index[axis] = slice(1, None)
        other = [slice(None)] * 3
        other[axis] = slice(None, -1)
        grown[tuple(index)] |= before[tuple(other)]
        grown[tuple(other)] |= before[tuple(index)]
    return grown


def source_extent(volume: Volume, lattice: Lattice, indices: Sequence[Index]) -> Region:
    """The source-grid bounding box (k, j, i slices, clipped) of the regions' extent; empty for no region."""
    if not indices:
        return (slice(0, 0), slice(0, 0), slice(0, 0))
    starts = np.array([lattice.start(i) for i in indices])
    low, high = starts.min(axis=0), starts.max(axis=0) + lattice.size
    first, stop = geometry.source_box(volume, lattice.grid, low - 0.5, high - 0.5)
    return tuple(slice(int(first[axis]), int(stop[axis])) for axis in (2, 1, 0))


def region_cells(lattice: Lattice, first: np.ndarray, index: Index) -> Tuple[slice, slice, slice]:
    """The low-res cells of region ``index`` inside a blended field whose first cell is ``first``."""
    corner = np.asarray(index) * lattice.low_stride - np.asarray(first)
    return tuple(slice(int(c), int(c) + lattice.low) for c in corner)


def coverage_fraction(volume: Volume, lattice: Lattice, indices: Sequence[Index], reference: np.ndarray) -> float:
    """Fraction of the nonzero voxels of ``reference`` (K, J, I on ``volume``'s grid) inside some region's extent."""
    reference = np.asarray(reference) != 0
    total = int(reference.sum())
    if total == 0 or not indices:
        return float("nan") if total == 0 else 0.0
    ones = {index: torch.ones(lattice.low, lattice.low, lattice.low) for index in indices}
    region, inside = paste(volume, lattice, ones)
    return float(np.count_nonzero(inside & reference[region])) / total
