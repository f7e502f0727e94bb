"""Growth: one segment over as many 128³ regions as the object needs, grown automatically from a click.

Used by :class:`~FastSAM3DLib.session.InteractiveSession` when it is created with ``grow=`` (a
:class:`GrowthSettings` or True). The regions lie on one lattice of the model grid (:mod:`.regions`), each with
its own logits (and an embedding, cached up to a limit or encoded again when needed).

One click:

1. **Refine.** The click is fed to every region that contains it (with that region's previous logits as the
   dense prompt, as in a single region); an include click whose nearest region (the one holding it well inside)
   does not exist yet adds that region, prompted with the click and the blended logits of the regions it
   overlaps (zeros where nothing is known). The first click makes the region the single-region session uses.
2. **Grow.** When a region's mask (low-res logits > 0) touches one of its faces and the volume continues past
   it, the neighbour across that face is added: its dense prompt is the blended logits of the regions it
   overlaps (the known part of the object, zeros elsewhere) and its point prompt the ``points`` include points
   deepest inside the known mask in the overlap. Only the part of its mask connected to the known mask counts
   (other blobs are made negative: growth adds the object's continuation, nothing unrelated). It is kept only when
   the model agrees with what is known (Dice between its mask and the known mask in the overlap at least
   ``min_agreement``), its predicted IoU is at least ``min_iou``, and its mask is neither empty nor fuller than
   ``max_fill`` (an object filling most of a region is an over-segmentation, and regions that full are never
   grown from). Repeated breadth first from the click until no kept region touches a face, or ``max_regions``
   regions, or ``time_budget_s`` seconds, or the progress callback asks to stop.

A click and all its growth is one state change: undo gives back exactly the regions (and logits) before it.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import geometry, regions, resample
from .devices import supported_device
from .errors import InputImageError
from .geometry import RegionOfInterest, Volume
from .regions import Index, Lattice
from .session_common import crop_to, empty_region, union

#: Why a click's growth ended early ("" when it ran until nothing touched a face).
STOP_REASONS = ("", "max_regions", "time", "cancelled")
#: Low-res cells kept between a sampled growth point and the new region's faces (8 model voxels).
POINT_MARGIN_CELLS = 2


@dataclass(frozen=True)
class GrowthSettings:
    """Limits and rules of growth (see the module doc). The defaults suit CT and MR organs on a CPU or GPU."""

    max_regions: int = 32  # growth stops at this many regions; a click in a new region still adds that region
    time_budget_s: float = 60.0
    overlap: int = 32
    points: int = 1
    min_agreement: float = 0.5
    min_iou: float = 0.0
    max_fill: float = 0.4
    max_embeddings: int = 32

    def __post_init__(self):
        checks = [
            (isinstance(self.max_regions, int) and self.max_regions >= 1, "max_regions must be an integer >= 1"),
            (self.time_budget_s > 0, "time_budget_s must be positive"),
            (isinstance(self.overlap, int) and self.overlap % 8 == 0 and 8 <= self.overlap <= 64,
             "overlap must be 8, 16, ..., 64 model voxels"),
            (isinstance(self.points, int) and 1 <= self.points <= 8, "points must be an integer from 1 to 8"),
            (0.0 <= self.min_agreement <= 1.0, "min_agreement must be between 0 and 1"),
            (self.min_iou <= 1.0, "min_iou must be at most 1"),
            (0.0 < self.max_fill <= 1.0, "max_fill must be in (0, 1]"),
            (isinstance(self.max_embeddings, int) and self.max_embeddings >= 1, "max_embeddings must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (growth settings {self})")


def default_for(model_name: str) -> bool:
    """Whether segments of ``model_name`` grow when the user did not say (its ``ModelConfig.grows_by_default``)."""
    from .model_configs import get_model_config

    return get_model_config(model_name).grows_by_default


def settings_from(grow) -> Optional[GrowthSettings]:
    """``grow`` as settings: None/False -> None (one region), True -> defaults, a GrowthSettings as is."""
    if grow is None or grow is False:
        return None
    if grow is True:
        return GrowthSettings()
    if isinstance(grow, GrowthSettings):
        return grow
    raise ValueError(f"grow must be True, False, None or a GrowthSettings, got {grow!r}")


@dataclass(frozen=True)
class GrowthProgress:
    """Where a click's growth stands, passed to the progress callback before each region it adds."""

    regions: int  # regions of the segment so far
    added: int  # regions this click has added so far
    queued: int  # faces still to look at
    elapsed_s: float


Progress = Callable[[GrowthProgress], Optional[bool]]


@dataclass(frozen=True)
class RegionState:
    """One region of a segment (never modified in place)."""

    roi: RegionOfInterest
    logits: torch.Tensor  # compact (1, 1, s/4, s/4, s/4)
    iou: float
    fed: Tuple = ()  # the user clicks fed here, in order
    grown_from: Optional[Index] = None  # the region it was grown from (None: added or refined by a click)


@dataclass(frozen=True)
class RegionSet:
    """The regions of a segment: what one click changes and undo restores (never modified in place)."""

    lattice: Optional[Lattice] = None
    regions: Mapping[Index, RegionState] = field(default_factory=dict)

    def with_region(self, index: Index, state: RegionState) -> "RegionSet":
        """A copy with region ``index`` set to ``state``."""
        updated = dict(self.regions)
        updated[index] = state
        return RegionSet(self.lattice, updated)

    def logits(self) -> Dict[Index, torch.Tensor]:
        """Region index -> low-res logits."""
        return {index: state.logits for index, state in self.regions.items()}


@dataclass
class GrowthReport:
    """What one click did: regions decoded for the click, regions added and refused by growth, why it stopped."""

    refined: List[Index] = field(default_factory=list)
    added: List[Index] = field(default_factory=list)
    refused: Dict[Index, str] = field(default_factory=dict)
    stopped: str = ""
    newest: Optional[Index] = None  # the region holding the click best


class Runner:
    """What growth needs from the session: an embedding per region and one decoder run (documentation only)."""

    def region_embedding(self, roi: RegionOfInterest, timings: Dict[str, float]) -> torch.Tensor:
        """The image embedding of ``roi`` (cached or encoded now)."""
        raise NotImplementedError

    def run_decoder(self, embedding, points_xyz: np.ndarray, labels: List[int],
                    previous: Optional[torch.Tensor]) -> Tuple[torch.Tensor, float]:
        """Compact, checked low-res logits and predicted IoU for model-space points and the previous logits."""
        raise NotImplementedError


def apply_click(current: RegionSet, click, runner, volume: Volume, size: int, spacing: float, prompt_mode: str,
                settings: GrowthSettings, timings: Dict[str, float],
                progress: Optional[Progress] = None) -> Tuple[RegionSet, GrowthReport]:
    """The regions after ``click`` (refine, then grow; see the module doc) and a report; ``current`` is unchanged."""
    started = time.perf_counter()
    report = GrowthReport()
    point = np.asarray(click.ras, dtype=np.float64)[None]
    if current.lattice is None:
        roi = geometry.roi_around(volume, point, size, spacing)
        current = RegionSet(Lattice.around(volume, roi, size, spacing, settings.overlap), {})
    lattice = current.lattice
    central = lattice.central_index(point[0])
    targets = [index for index, state in current.regions.items() if state.roi.contains(point)[0]]
    if central in targets:
        targets.remove(central)
        targets.insert(0, central)
    elif click.include:
        targets.insert(0, central)
    report.newest = targets[0] if targets else None
    updated = current
    for index in targets:
        state = updated.regions.get(index)
        roi = state.roi if state is not None else lattice.roi(index)
        if state is None:
            previous = prior_for(lattice, updated.regions, index)[0] if updated.regions else None
            fed = (click,)
        else:
            previous, fed = state.logits, state.fed + (click,)
        prompt = [click] if prompt_mode == "newest" else list(fed)
        embedding = runner.region_embedding(roi, timings)
        logits, iou = runner.run_decoder(embedding, roi.ras_to_model(np.stack([c.ras for c in prompt])),
                                         [1 if c.include else 0 for c in prompt], previous)
        updated = updated.with_region(index, RegionState(roi, logits, iou, fed, None))
        report.refined.append(index)
    updated = _grow(updated, report.refined, runner, settings, started, timings, report, progress)
    timings["grow"] = time.perf_counter() - started
    return updated, report


def newest_region(current: RegionSet, clicks) -> Optional[RegionState]:
    """The state of the region that holds the newest of ``clicks`` best (its central region, else any region
    containing it), or None before a click or when no region holds it."""
    if not clicks or current.lattice is None:
        return None
    newest = clicks[-1].ras
    return current.regions.get(current.lattice.central_index(newest)) or next(
        (s for s in current.regions.values() if s.roi.contains(newest[None])[0]), None)


@dataclass(frozen=True, eq=False)
class Pasted:
    """What :func:`paste_result` last pasted: the region set, the source box of its regions (``region``) and
    the read-only mask over that box (None when there was no region)."""

    region_set: RegionSet
    region: regions.Region
    mask: Optional[np.ndarray]

    @property
    def shown(self) -> Optional[regions.Region]:
        """The box the segment may now hold voxels in, or None when nothing was pasted."""
        return self.region if self.mask is not None else None


def paste_result(volume: Volume, before: RegionSet, current: RegionSet, shown, pasted: Optional[Pasted] = None):
    """The blended regions of ``current`` pasted back: ``(box, mask over the box, Pasted)``, the last to give
    the next call (its ``shown`` is the next call's ``shown``).

    The box covers the pasted regions, every region of ``before`` and ``shown`` (what was shown before), so
    that what the click removed is cleared too. ``pasted``, this function's last paste, spares work: when
    ``current`` has the same regions and only some of their logits changed (a refining click, its undo), only
    the voxels those regions reach are pasted again where that is cheaper (:func:`regions.repaste`); unchanged,
    the mask is reused. The mask is read-only (the next call may start from it): copy it to change it.
    """
    lattice = current.lattice or before.lattice
    region, mask = _paste(volume, current, pasted)
    if mask is not None:
        mask.flags.writeable = False
    extent = regions.source_extent(volume, lattice, list(before.regions)) if lattice is not None and \
        before.regions else empty_region()
    box = union(union(region, extent), shown)
    full = mask if mask is not None and box == region else crop_to(region, mask, box)  # no copy when it fits
    full.flags.writeable = False
    return box, full, Pasted(current, region, mask)


def _paste(volume: Volume, current: RegionSet, pasted: Optional[Pasted]):
    """``regions.paste`` of ``current``, or :func:`regions.repaste` from ``pasted`` where it applies."""
    if not current.regions:
        return empty_region(), None
    lattice = current.lattice
    if pasted is not None and pasted.mask is not None and pasted.region_set.lattice is lattice and \
            pasted.region_set.regions.keys() == current.regions.keys():
        old = pasted.region_set.regions
        changed = [index for index, state in current.regions.items() if state.logits is not old[index].logits]
        if not changed:
            return pasted.region, pasted.mask
        if resample.backend("paste") != "sitk":  # SimpleITK's sums would tie otherwise than the repaste's
            return regions.repaste(volume, lattice, current.logits(), changed, (pasted.region, pasted.mask))
    return regions.paste(volume, lattice, current.logits())


def _grow(current: RegionSet, sources: List[Index], runner, settings: GrowthSettings, started: float,
          timings: Dict[str, float], report: GrowthReport, progress: Optional[Progress]) -> RegionSet:
    """Add neighbours breadth first from ``sources`` while their masks touch faces (see the module doc)."""
    lattice = current.lattice
    frontier = deque((index, axis, direction) for index in sources
                     for axis, direction in touched_faces(current.regions[index].logits, settings.max_fill))
    while frontier:
        index, axis, direction = frontier.popleft()
        neighbour = tuple(v + (direction if a == axis else 0) for a, v in enumerate(index))
        if neighbour in current.regions or neighbour in report.refused or \
                not lattice.continues(index, axis, direction):
            continue
        if len(current.regions) >= settings.max_regions:
            report.stopped = "max_regions"
            break
        elapsed = time.perf_counter() - started
        if elapsed > settings.time_budget_s:
            report.stopped = "time"
            break
        if progress is not None and progress(GrowthProgress(len(current.regions), len(report.added), len(frontier) + 1,
                                                            elapsed)) is False:
            report.stopped = "cancelled"
            break
        prior, known = prior_for(lattice, current.regions, neighbour)
        points = growth_points(prior, known, settings.points)
        if len(points) == 0:
            report.refused[neighbour] = "no known object inside the region"
            continue
        roi = lattice.roi(neighbour)
        try:
            embedding = runner.region_embedding(roi, timings)
        except InputImageError as exc:  # e.g. a region of one constant value cannot be normalised
            report.refused[neighbour] = f"its image cannot be used ({exc})"
            continue
        logits, iou = runner.run_decoder(embedding, points, [1] * len(points), prior)
        logits = connected_part(logits, prior, known)
        reason = refusal(logits, iou, prior, known, settings)
        if reason:
            report.refused[neighbour] = reason
            continue
        current = current.with_region(neighbour, RegionState(roi, logits, iou, (), index))
        report.added.append(neighbour)
        frontier.extend((neighbour, a, d) for a, d in touched_faces(logits, settings.max_fill))
    return current


def connected_part(logits: torch.Tensor, prior: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """``logits`` with the mask's parts not connected (26-neighbourhood) to the known mask made negative (-logit):
    a grown region adds only the continuation of the object, never an unrelated blob."""
    low = known.shape[-1]
    mask = logits.reshape(low, low, low) > 0
    seeds = mask & known & (prior.reshape(low, low, low) > 0)
    device = supported_device(mask.device)  # max_pool3d: none on MPS before torch 2.9
    grown = seeds.float().to(device)[None, None]
    allowed = mask.float().to(device)[None, None]
    while True:
        step = F.max_pool3d(grown, 3, stride=1, padding=1) * allowed
        if torch.equal(step, grown):
            break
        grown = step
    stray = (mask & ~(grown[0, 0] > 0).to(mask.device)).reshape(logits.shape)
    if not bool(stray.any()):
        return logits
    return torch.where(stray, -logits, logits)


def touched_faces(logits: torch.Tensor, max_fill: float) -> List[Tuple[int, int]]:
    """(axis, direction) of each face of a region its mask (logits > 0) reaches; none for a mask fuller than
    max_fill."""
    low = logits.shape[-1]
    mask = logits.reshape(low, low, low) > 0
    if float(mask.float().mean()) > max_fill:
        return []
    faces = []
    for axis in range(3):
        if bool(mask.select(axis, 0).any()):
            faces.append((axis, -1))
        if bool(mask.select(axis, low - 1).any()):
            faces.append((axis, 1))
    return faces


def prior_for(lattice: Lattice, states: Mapping[Index, RegionState], index: Index):
    """(dense prompt (1, 1, low, low, low) float32, known cells bool (low, low, low)) for region ``index``.

    The blended logits of the other regions overlapping it where they cover it, zeros elsewhere.
    """
    low = lattice.low
    near = {i: states[i].logits for i in lattice.overlapping(index) if i in states and i != index}
    device = next(iter(states.values())).logits.device if states else torch.device("cpu")
    prior = torch.zeros((low, low, low), dtype=torch.float32, device=device)
    known = torch.zeros((low, low, low), dtype=torch.bool, device=device)
    blended = regions.blend(lattice, near)
    if blended is not None:
        first, values, covered = blended
        cells = regions.region_cells(lattice, first, index)
        src = tuple(slice(max(c.start, 0), min(c.stop, n)) for c, n in zip(cells, values.shape))
        if all(s.stop > s.start for s in src):
            dst = tuple(slice(s.start - c.start, s.stop - c.start) for s, c in zip(src, cells))
            inside = covered[src]
            prior[dst] = torch.where(inside, values[src], torch.zeros_like(values[src])).to(device, torch.float32)
            known[dst] = inside.to(device)
    return prior[None, None].contiguous(), known


def growth_points(prior: torch.Tensor, known: torch.Tensor, count: int) -> np.ndarray:
    """Up to ``count`` model-space points (n, 3) deepest inside the known mask (prior > 0), highest logit first
    among equally deep cells, at least :data:`POINT_MARGIN_CELLS` cells from the region's faces and 4 apart."""
    low = known.shape[-1]
    device = supported_device(prior.device)  # max_pool3d: none on MPS before torch 2.9
    prior, known = prior.to(device), known.to(device)
    positive = (prior.reshape(low, low, low) > 0) & known
    inner = torch.zeros_like(positive)
    m = POINT_MARGIN_CELLS
    inner[m:low - m, m:low - m, m:low - m] = True
    candidates = positive & inner
    if not bool(candidates.any()):
        return np.zeros((0, 3))
    depth = torch.zeros(positive.shape, dtype=torch.float32, device=positive.device)
    eroded = positive.float()[None, None]
    for _ in range(4):  # cells surviving more erosions (3x3x3) lie deeper inside the known mask
        depth += eroded[0, 0]
        eroded = -F.max_pool3d(-eroded, 3, stride=1, padding=1)
    score = depth * 1e3 + prior.reshape(low, low, low).float().clamp(-100, 100)
    score = torch.where(candidates, score, torch.full_like(score, -math.inf))
    points = []
    for _ in range(count):
        best = int(torch.argmax(score))
        if not math.isfinite(float(score.reshape(-1)[best])):
            break
        cell = np.unravel_index(best, (low, low, low))
        points.append(4.0 * np.asarray(cell, dtype=np.float64) + 1.5)  # centre of the cell's 4^3 model voxels
        box = tuple(slice(max(c - 3, 0), c + 4) for c in cell)
        score[box] = -math.inf
    return np.stack(points)


def refusal(logits: torch.Tensor, iou: float, prior: torch.Tensor, known: torch.Tensor,
            settings: GrowthSettings) -> str:
    """Why a grown region is not kept ("" when it is): empty, over-full, disagreeing with the known mask, unsure."""
    low = known.shape[-1]
    mask = logits.reshape(low, low, low) > 0
    if not bool(mask.any()):
        return "empty"
    fill = float(mask.float().mean())
    if fill > settings.max_fill:
        return f"over-full ({fill:.0%} of the region)"
    mine, theirs = mask[known], (prior.reshape(low, low, low) > 0)[known]
    total = int(mine.sum()) + int(theirs.sum())
    agreement = 2.0 * int((mine & theirs).sum()) / total if total else 0.0
    if agreement < settings.min_agreement:
        return f"disagrees with the known mask in the overlap (Dice {agreement:.2f})"
    if not iou >= settings.min_iou:
        return f"unsure (predicted IoU {iou:.2f})"
    return ""

