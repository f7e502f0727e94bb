"""What a local session (:mod:`.session`) and a remote one (:mod:`.remote`) share, without PyTorch: the click
and result types, the ROI rules, reading a click's point, and boxes of source voxels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np

from .errors import PromptError

if TYPE_CHECKING:  # growth imports PyTorch; the remote client must not
    from .growth import GrowthReport

Region = Tuple[slice, slice, slice]
PROMPT_MODES = ("newest", "all")
ROI_MARGIN_VOXELS = 8.0  # a click closer than this to the ROI border moves the ROI
#: Most ROIs whose last state (clicks fed, logits) a session keeps, to continue there without a replay.
MAX_CACHED_REGIONS = 8
EXCLUDE_FIRST = ("Start with an include point (a left click; label 1 in a script) inside the object; exclude "
                 "points (after pressing e or Exclude; a trailing '-' on the command line; label 0 in a script) "
                 "only refine an existing result.")


@dataclass
class Click:
    """One user click: a point in RAS millimetres and whether it marks the object (include) or not."""

    ras: np.ndarray
    include: bool = True


@dataclass
class ClickResult:
    """What a click changed: the segment inside ``region`` (k, j, i slices of the source array) becomes ``mask``.

    With growth ``mask`` is read-only (the session may paste the next click from it): copy it to change it.
    """

    region: Region
    mask: np.ndarray
    iou: float
    encoded: bool
    timings: Dict[str, float] = field(default_factory=dict)
    regions: int = 1  # regions of interest the segment spans (more than 1 only with growth)
    growth: Optional["GrowthReport"] = None  # what growth did for this click (None without growth)

    @property
    def voxels(self) -> int:
        """Number of voxels in the mask."""
        return int(self.mask.sum())


def click_point(ras) -> np.ndarray:
    """``ras`` as three finite float64 numbers; a PromptError saying what is wrong otherwise."""
    try:
        point = np.asarray(ras, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"A click must be three numbers (R, A, S in millimetres), got {ras!r}.") from exc
    if point.size != 3:
        raise PromptError(f"A click must be three numbers (R, A, S in millimetres), got {point.size} "
                          f"value(s): {ras!r}.")
    point = point.reshape(3)
    if not np.isfinite(point).all():
        raise PromptError(f"A click must be three finite numbers (R, A, S in millimetres), got {ras!r}.")
    return point


def empty_region() -> Region:
    """A box of no voxels."""
    return (slice(0, 0), slice(0, 0), slice(0, 0))


def union(a: Optional[Region], b: Optional[Region]) -> Optional[Region]:
    """Bounding box of two regions (an empty one, or None, is ignored; None when both are None)."""
    if a is None:
        return b
    if b is None or all(s.stop <= s.start for s in b):
        return a
    if all(s.stop <= s.start for s in a):
        return b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def crop_to(region: Region, mask: Optional[np.ndarray], target: Region) -> np.ndarray:
    """``mask`` (of ``region``, None = empty) on the box ``target`` (which contains it or not), False elsewhere."""
    out = np.zeros(tuple(max(s.stop - s.start, 0) for s in target), dtype=bool)
    if mask is None:
        return out
    lo = [max(r.start, t.start) for r, t in zip(region, target)]
    hi = [min(r.stop, t.stop) for r, t in zip(region, target)]
    if any(a >= b for a, b in zip(lo, hi)):
        return out
    out[tuple(slice(a - t.start, b - t.start) for a, b, t in zip(lo, hi, target))] = \
        mask[tuple(slice(a - r.start, b - r.start) for a, b, r in zip(lo, hi, region))]
    return out
