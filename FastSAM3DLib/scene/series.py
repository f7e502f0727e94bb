"""What a series of points changed: the segment before its first point, and the voxels taken from other segments.

Each click of a series makes the selected segment equal the new prediction inside the click's region. With the
overwrite mode "all segments" (Slicer's default) a prediction removes the voxels it covers from every other
segment; when a later point shrinks the prediction (an exclude point, a removed point), those voxels would
stay missing from the other segment, a hole where the prediction had leaked. The series therefore remembers
what it took from other segments and gives back every such voxel that the newest result leaves empty, in the
same edit (one undo step), so a series ends as if only its final result had been painted.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import slicer

from ..errors import FastSAM3DError
from .oriented_images import intersect_extent, oriented_image, values_in_extent
from .reading import segment_mask, segment_voxels_on_lattice
from .writing import Region

Extent = Tuple[int, int, int, int, int, int]  # i0, i1, j0, j1, k0, k1 on the edit's voxel grid (inclusive)


class TakenVoxels:
    """The voxels the writes of one series took from other segments (on the edit's voxel grid), to give back.

    :func:`~FastSAM3DLib.scene.write_region` calls :meth:`before_write` with the box its edit may change and
    :meth:`after_write` once the edit succeeded. Only voxels that are in no segment after the edit are given
    back: a voxel the newest result still holds stays in it, and a voxel someone else filled since is left
    alone. Each segment's taken voxels are a boolean array over their bounding box (one byte per voxel of it),
    never changed in place, so :meth:`snapshot` is cheap and a failed write puts the record back (:meth:`restore`).

    Before each write the record is brought up to date with the labels (Ctrl+Z, other effects and other series
    change them between writes): a voxel the segment no longer holds is no longer owed to anyone (e.g. Ctrl+Z
    undid the click that took it, and its segment may have lost it by its own edit since), and a voxel given
    back that the segment holds again while its owner does not (Ctrl+Z undid the give-back) is owed again.
    """

    def __init__(self, segment_id: str) -> None:
        self.segment_id = segment_id
        self._grid: Optional[np.ndarray] = None
        self._taken: Dict[str, Tuple[Extent, np.ndarray]] = {}  # other segment ID -> (extent, (K, J, I) bool)
        self._returned: Dict[str, Tuple[Extent, np.ndarray]] = {}  # given back by this series, same form

    def snapshot(self) -> tuple:
        """The record as it is before a write (for :meth:`restore` if the write fails)."""
        return self._grid, dict(self._taken), dict(self._returned)

    def restore(self, snapshot: tuple) -> None:
        """Put back a :meth:`snapshot` (a failed write's edits were rolled back: so is what it recorded)."""
        grid, taken, returned = snapshot
        self._grid, self._taken, self._returned = grid, dict(taken), dict(returned)

    def voxel_count(self) -> int:
        """How many voxels are waiting to be given back (all segments together)."""
        return int(sum(np.count_nonzero(voxels) for _, voxels in self._taken.values()))

    def catch_up(self, segmentation, grid: np.ndarray) -> None:
        """Bring the record up to date with the labels as they are now, for a write on the grid whose
        image-to-world matrix is ``grid`` (see the class docstring); every write of the series calls it, also
        one that finds nothing to change."""
        if self._grid is not None and not np.allclose(self._grid, grid, atol=1e-6):
            self._taken = {}  # another voxel grid (the reference geometry changed): indices no longer apply
        self._grid = np.array(grid, dtype=float)
        self._reconcile(segmentation)

    def before_write(self, segmentation, box, grid: np.ndarray):
        """What every segment holds in ``box`` (extent i0, i1, j0, j1, k0, k1 on the grid whose image-to-world
        matrix is ``grid``) before the edit, the record brought up to date first (:meth:`catch_up`); pass it to
        :meth:`after_write`."""
        self.catch_up(segmentation, grid)
        layers, segments = {}, []
        for index in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(index)
            image = _layer_image(segmentation, segment_id)
            if image is None:
                continue
            key = image.GetAddressAsString("vtkObject")
            if key not in layers:
                layers[key] = values_in_extent(image, box)
            segments.append((segment_id, key, segmentation.GetSegment(segment_id).GetLabelValue()))
        return tuple(box), layers, segments

    def after_write(self, segmentation_node, before) -> None:
        """Record what the edit took from other segments and give back what the series took and the edit
        cleared from the segment into no other one."""
        segmentation = segmentation_node.GetSegmentation()
        box, layers_before, segments = before
        now, changes = {}, {}

        def values_now(image):
            key = image.GetAddressAsString("vtkObject")
            if key not in now:
                now[key] = values_in_extent(image, box)
            return now[key]

        def labels_changed(key, image):
            """The labels whose voxels changed in a layer the edit kept (one comparison per layer, not per
            segment: a segmentation may hold a hundred segments)."""
            if key not in changes:
                changed = layers_before[key] != values_now(image)
                changes[key] = set(np.unique(layers_before[key][changed]).tolist()) if changed.any() else set()
            return changes[key]

        cleared = None
        for segment_id, key, label in segments:
            segment, image = segmentation.GetSegment(segment_id), _layer_image(segmentation, segment_id)
            if segment is None or image is None:
                continue
            if image.GetAddressAsString("vtkObject") == key and segment.GetLabelValue() == label:
                if label not in labels_changed(key, image):
                    continue  # none of its voxels changed
            held = layers_before[key] == label
            lost = held & (values_now(image) != segment.GetLabelValue())
            if segment_id == self.segment_id:
                cleared = lost
            elif lost.any():
                _merge(self._taken, segment_id, box, lost)
        if cleared is None or not self._taken or not cleared.any():
            return  # a voxel taken earlier can come free only where this edit cleared the segment
        for index in range(segmentation.GetNumberOfLayers()):  # in no segment: segments that overlapped
            image = segmentation.GetLayerDataObject(index)     # before the series may overlap again
            if image is not None:
                cleared &= values_now(image) == 0
        self._give_back(segmentation_node, box, cleared)

    def _reconcile(self, segmentation) -> None:
        """Bring the record up to date with the labels as they are before a write (see the class docstring)."""
        if not self._taken and not self._returned:
            return
        taken: Dict[str, Tuple[Extent, np.ndarray]] = {}
        for segment_id, (extent, voxels) in self._taken.items():
            still = voxels & _held(segmentation, self.segment_id, extent)
            if still.any():
                taken[segment_id] = (extent, still)
        returned: Dict[str, Tuple[Extent, np.ndarray]] = {}
        for segment_id, (extent, voxels) in self._returned.items():
            owed = voxels & _held(segmentation, self.segment_id, extent) & ~_held(segmentation, segment_id, extent)
            if owed.any():
                _merge(taken, segment_id, extent, owed)
            rest = voxels & ~owed
            if rest.any():
                returned[segment_id] = (extent, rest)
        self._taken, self._returned = taken, returned

    def _give_back(self, segmentation_node, box: Extent, free: np.ndarray) -> None:
        """Give each segment the voxels of ``free`` ((K, J, I) bool over ``box``: in no segment now) that the
        series took from it."""
        segmentation = segmentation_node.GetSegmentation()
        for segment_id in list(self._taken):
            segment, image = segmentation.GetSegment(segment_id), _layer_image(segmentation, segment_id)
            if segment is None or image is None:
                del self._taken[segment_id]  # the segment was removed (or lost its layer)
                continue
            extent, voxels = self._taken[segment_id]
            common = intersect_extent(extent, box)
            if common is None:
                continue
            back = voxels[_slices(extent, common)] & free[_slices(box, common)]
            if not back.any():
                continue
            _set_voxels(segmentation_node, segment_id, self._grid, common, back)
            _merge(self._returned, segment_id, common, back)
            voxels = voxels.copy()  # a new array: snapshots keep the old one
            voxels[_slices(extent, common)] &= ~back
            if voxels.any():
                self._taken[segment_id] = (extent, voxels)
            else:
                del self._taken[segment_id]


def _merge(record: Dict[str, Tuple[Extent, np.ndarray]], segment_id: str, box: Extent, voxels: np.ndarray) -> None:
    """Add ``voxels`` ((K, J, I) bool over ``box``, some True) to ``record[segment_id]``, in a new array."""
    extent = _bounding_extent(box, voxels)
    voxels = voxels[_slices(box, extent)]
    known = record.get(segment_id)
    if known is None:
        record[segment_id] = (extent, voxels.copy())
        return
    old_extent, old = known
    union = _union(old_extent, extent)
    grown = np.zeros(_shape(union), dtype=bool)  # a new array: snapshots keep the old one
    grown[_slices(union, old_extent)] = old
    grown[_slices(union, extent)] |= voxels
    record[segment_id] = (union, grown)


def _held(segmentation, segment_id: str, extent: Extent) -> np.ndarray:
    """The segment's voxels over ``extent`` ((K, J, I) bool; none when the segment or its layer is gone)."""
    segment, image = segmentation.GetSegment(segment_id), _layer_image(segmentation, segment_id)
    if segment is None or image is None:
        return np.zeros(_shape(extent), dtype=bool)
    return values_in_extent(image, extent) == segment.GetLabelValue()


def _union(a: Extent, b: Extent) -> Extent:
    """The smallest extent holding both."""
    return tuple(min(x, y) if i % 2 == 0 else max(x, y) for i, (x, y) in enumerate(zip(a, b)))


def _shape(extent: Extent) -> Tuple[int, int, int]:
    return extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1


def _slices(outer: Extent, inner: Extent) -> Tuple[slice, slice, slice]:
    """(k, j, i) slices of an array over ``outer`` that cover ``inner`` (which lies inside it)."""
    return tuple(slice(inner[2 * a] - outer[2 * a], inner[2 * a + 1] - outer[2 * a] + 1) for a in (2, 1, 0))


def _bounding_extent(box: Extent, voxels: np.ndarray) -> Extent:
    """The extent of the nonzero voxels of ``voxels`` ((K, J, I) over ``box``; some must be nonzero)."""
    bounds = []
    for axis in (2, 1, 0):  # i, j, k
        along = np.flatnonzero(voxels.any(axis=tuple(a for a in range(3) if a != axis)))
        start = box[2 * (2 - axis)]
        bounds += [start + int(along[0]), start + int(along[-1])]
    return tuple(bounds)


def _layer_image(segmentation, segment_id: str):
    """The labelmap layer holding ``segment_id`` (None when it has none)."""
    layer = segmentation.GetLayerIndex(segment_id)
    return segmentation.GetLayerDataObject(layer) if layer >= 0 else None


def _set_voxels(segmentation_node, segment_id: str, grid: np.ndarray, extent: Extent, voxels: np.ndarray) -> None:
    """Add to segment ``segment_id`` the voxels where ``voxels`` ((K, J, I) bool over ``extent`` of the grid whose
    image-to-world matrix is ``grid``) is True.

    Through Slicer's segmentation modifier, as the Segment Editor's own edits: it announces the change for this
    segment alone, so Slicer updates this segment's 3D surface only. (Writing into the labelmap layer and calling
    ``Modified()`` makes Slicer drop every segment's surface and rebuild them all when 3D is shown.)
    """
    needed = _bounding_extent(extent, voxels)
    image = oriented_image(voxels[_slices(extent, needed)], grid, needed)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_MERGE_MASK, needed):
        raise FastSAM3DError(f"Slicer could not give segment '{segment_id}' back its voxels.")


class SegmentBaseline:
    """The segment as it was before the first point of a series, so that removing every point restores it.

    Each click makes the segment equal the prediction inside the click's region; when the user then removes
    the last remaining point, the effect writes :meth:`mask_in` of the final region instead of an empty mask,
    so the segment's own earlier voxels come back, and :attr:`taken` gives the other segments back the voxels
    the series took from them (pass it to :func:`~FastSAM3DLib.scene.write_region` on every write of the
    series). Only the bounding box of the segment's voxels is kept.
    """

    def __init__(self, segmentation_node, segment_id: str, source_volume_node) -> None:
        self.region: Optional[Region] = None
        self.mask: Optional[np.ndarray] = None
        self.volume_id = source_volume_node.GetID()  # the grid of region and mask (see region_on for others)
        self.taken = TakenVoxels(segment_id)
        found = segment_voxels_on_lattice(segmentation_node, segment_id, source_volume_node)
        box, voxels = found if found is not None else \
            ((slice(None),) * 3, segment_mask(segmentation_node, segment_id, source_volume_node))
        if voxels is None or not voxels.any():
            return
        nonzero = [np.flatnonzero(voxels.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        tight = tuple(slice(int(n[0]), int(n[-1]) + 1) for n in nonzero)
        self.mask = voxels[tight].copy()
        self.region = tuple(slice((b.start or 0) + t.start, (b.start or 0) + t.stop) for b, t in zip(box, tight))

    def mask_on(self, region: Region, volume_node, baseline_volume_node) -> np.ndarray:
        """The baseline segment inside ``region`` of ``volume_node``'s grid, bool: :meth:`mask_in` on the
        baseline's own volume (``baseline_volume_node``), else nearest neighbour through both volumes' geometry
        (the source volume was changed during the series)."""
        if volume_node.GetID() == self.volume_id:
            return self.mask_in(region)
        from .nodes import volume_from_node_matrix

        out = np.zeros(tuple(s.stop - s.start for s in region), dtype=bool)
        if self.region is None:
            return out
        to_baseline = np.linalg.inv(volume_from_node_matrix(baseline_volume_node)) @ \
            volume_from_node_matrix(volume_node)
        j, i = np.meshgrid(np.arange(region[1].start, region[1].stop), np.arange(region[2].start, region[2].stop),
                           indexing="ij")
        starts = np.array([b.start for b in self.region])
        for n, k in enumerate(range(region[0].start, region[0].stop)):  # slice by slice: bounded memory
            ijk = np.stack([i, j, np.full_like(i, k), np.ones_like(i)], axis=-1) @ to_baseline.T
            kji = np.rint(ijk[..., 2::-1]).astype(np.int64) - starts
            inside = np.all((kji >= 0) & (kji < self.mask.shape), axis=-1)
            out[n][inside] = self.mask[tuple(kji[inside].T)]
        return out

    def mask_in(self, region: Region) -> np.ndarray:
        """The baseline segment inside ``region`` (bounded (k, j, i) slices of the source grid), bool."""
        out = np.zeros(tuple(s.stop - s.start for s in region), dtype=bool)
        if self.region is None:
            return out
        lo = [max(r.start, b.start) for r, b in zip(region, self.region)]
        hi = [min(r.stop, b.stop) for r, b in zip(region, self.region)]
        if any(l >= h for l, h in zip(lo, hi)):
            return out
        out[tuple(slice(l - r.start, h - r.start) for l, h, r in zip(lo, hi, region))] = \
            self.mask[tuple(slice(l - b.start, h - b.start) for l, h, b in zip(lo, hi, self.region))]
        return out


def region_on(region: Region, from_volume_node, to_volume_node) -> Optional[Region]:
    """The smallest box of ``to_volume_node``'s voxel grid that holds ``region`` ((k, j, i) slices) of
    ``from_volume_node``'s grid, through both nodes' transforms, clipped to the volume; None when it misses it.
    For a series of points whose source volume changed: what to give back on the grid its baseline is on."""
    from ..geometry import apply_affine, box_corners
    from .nodes import volume_from_node_matrix

    faces = box_corners([r.start - 0.5 for r in region[::-1]], [r.stop - 0.5 for r in region[::-1]])  # (i, j, k)
    from_to = np.linalg.inv(volume_from_node_matrix(to_volume_node)) @ volume_from_node_matrix(from_volume_node)
    to_ijk = apply_affine(from_to, faces)
    dims = to_volume_node.GetImageData().GetDimensions()
    lo = np.maximum(np.floor(to_ijk.min(axis=0) + 0.5 + 1e-6).astype(int), 0)  # voxels the box overlaps
    hi = np.minimum(np.ceil(to_ijk.max(axis=0) + 0.5 - 1e-6).astype(int), dims)
    if np.any(lo >= hi):
        return None
    return tuple(slice(int(lo[a]), int(hi[a])) for a in (2, 1, 0))
