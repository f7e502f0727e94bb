"""The interactive session: set an image once, then click; each click returns the updated mask region.

Like ``segment_anything``'s ``SamPredictor`` (set the image once, predict many times), but 3D and in world
coordinates: clicks are RAS millimetres, results are masks on the source volume's own voxel grid.

* The model sees a 128^3 region of interest (ROI) at 1.5 mm around the clicks (see :mod:`.geometry`). The image
  encoder runs once per ROI; clicks inside it only rerun the prompt encoder and mask decoder.
* A click outside the ROI (or too close to its border) moves the ROI around all clicks (or around the new
  click alone if they no longer fit), re-encodes, and replays the clicks that lie inside the new ROI.
* The previous step's low-res logits are fed back with each click (zeros at the first one), as the official
  evaluation and inference do.
* Prompting modes: ``"newest"`` feeds only the newest click (FastSAM3D's official evaluation and the
  training recipe of both models); ``"all"`` feeds every click so far (SAM-Med3D's official inference).
  Each model has a documented default (:attr:`ModelConfig.default_prompt_mode`).

Memory stays bounded when clicks move the ROI back and forth: per click the session keeps, for undo, one
compact copy of the 32^3 low-res logits (131 kB; never a view that pins the decoder's larger output buffer),
the image embedding of the current ROI only, and the last state of at most :data:`MAX_CACHED_REGIONS` recently
visited ROIs. Coming back to one of them re-encodes it once and continues from its cached logits, feeding
only the clicks added since, instead of replaying every click there: click time stays flat, and the result is
the one a replay (or a fresh session fed those clicks) gives.

Growth (``InteractiveSession(..., grow=True)`` or a :class:`~FastSAM3DLib.growth.GrowthSettings`): the segment
is assembled from as many 128^3 regions as the object needs, each with its own logits (and a cached embedding,
up to ``max_embeddings``), blended where they overlap; a click refines the regions containing it and the
segment grows into neighbouring regions while it touches their faces (:mod:`.growth`, :mod:`.regions`). A
click with all its growth is one undo step. Without ``grow`` (the default) the session is the single-region
session described above, unchanged.
"""
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import geometry, growth
from .devices import is_out_of_memory
from .errors import ModelOutputError, OutOfMemoryError, PromptError
from .geometry import RegionOfInterest, Volume
from .session_common import (EXCLUDE_FIRST, MAX_CACHED_REGIONS, PROMPT_MODES, ROI_MARGIN_VOXELS, Click,  # noqa: F401
                             ClickResult, Region, click_point, crop_to, empty_region, union)


class InteractiveSession:
    """Click-by-click segmentation of one volume with one model (no Qt, no threads, no MRML)."""

    def __init__(self, model, volume: Optional[Volume] = None, prompt_mode: Optional[str] = None,
                 grow=None) -> None:
        """``grow``: None/False (one region, the default), True (grow with default settings) or GrowthSettings."""
        self.model = model
        config = model.config
        self.size = config.image_size
        self.spacing = config.spacing_mm
        self.prompt_mode = prompt_mode or config.default_prompt_mode
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        self.growth: Optional[growth.GrowthSettings] = growth.settings_from(grow)
        self.volume: Optional[Volume] = None
        self.reset()
        if volume is not None:
            self.set_image(volume)

    # ----------------------------------------------------------------- state
    def set_image(self, volume: Volume) -> None:
        """Use ``volume`` for the next clicks (validated first); forgets clicks and cached embeddings."""
        volume.validate()
        self.volume = volume
        self.reset()

    def reset(self) -> None:
        """Forget all clicks, the ROI and its embedding; keep the image."""
        self.clicks: List[Click] = []
        self._state = _State()
        self._history: List[_State] = []  # the state before each click, for undo
        self._shown_region: Optional[Region] = None  # region of the last returned non-empty mask
        self._embedding: Optional[Tuple[RegionOfInterest, torch.Tensor]] = None  # of the current ROI only
        self._regions: "OrderedDict[RegionOfInterest, _State]" = OrderedDict()  # last state per ROI, LRU
        # growth only: the regions of the segment, their state before each click, embeddings (LRU)
        self._multi = growth.RegionSet()
        self._multi_history: List[growth.RegionSet] = []
        self._embeddings: "OrderedDict[RegionOfInterest, torch.Tensor]" = OrderedDict()
        self._pasted: Optional[growth.Pasted] = None  # the last paste, which the next one may start from

    def forget_last_paste(self) -> None:
        """Free the mask kept from a grown segment's last paste (a byte per voxel of its regions' box, 79 MB
        for a whole 512x512x300 CT); the next click then pastes the segment whole. For a caller holding many
        sessions: the Segment Editor effect keeps it for the segment clicked last only."""
        self._pasted = None

    @property
    def roi(self) -> Optional[RegionOfInterest]:
        """The region of interest the model currently sees (None before the first click).

        With growth: the region that holds the newest click best (None when no region holds it).
        """
        if self.growth is not None:
            state = self._newest_region()
            return state.roi if state is not None else None
        return self._state.roi

    @property
    def low_res_logits(self) -> Optional[torch.Tensor]:
        """The model's current low-res logits ``(1, 1, 32, 32, 32)`` on the ROI grid (None before a click).

        With growth: those of :attr:`roi`.
        """
        if self.growth is not None:
            state = self._newest_region()
            return state.logits if state is not None else None
        return self._state.logits

    @property
    def region_set(self) -> "growth.RegionSet":
        """With growth: the segment's regions (lattice and per-region state); empty without growth."""
        return self._multi

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------- clicks
    def add_click(self, ras, include: bool = True, progress: Optional["growth.Progress"] = None) -> ClickResult:
        """Add an include (or exclude) point in RAS mm and return the updated mask of the changed region.

        With growth, ``progress(GrowthProgress)`` is called before each region growth adds; returning False
        stops the growth there (the click and the regions added so far stay: one undo step).

        Raises :class:`PromptError` (and changes nothing) for a malformed point (not three finite numbers), a
        point outside the volume or an exclude point before any include point; :class:`ModelOutputError` when
        the model gives NaN or infinite numbers; :class:`OutOfMemoryError` when the device runs out of memory.
        """
        if self.volume is None:
            raise PromptError("Load an image first (set_image) before clicking.")
        click = Click(click_point(ras), bool(include))
        geometry.roi_around(self.volume, click.ras[None], self.size, self.spacing)  # validates: raises if outside
        if not include and not any(c.include for c in self.clicks):
            raise PromptError(EXCLUDE_FIRST)
        saved = self.checkpoint()
        try:
            self.clicks.append(click)
            if self.growth is not None:
                return self._update_grown(click, progress)
            return self._update(click)
        except BaseException as exc:  # out of memory, NaN, interrupted...: leave the session exactly as it was
            self._fail(saved, exc)

    def checkpoint(self) -> tuple:
        """The session's clicks and state (containers copied; the states in them are never modified in place):
        :meth:`restore` brings the session back to exactly this point."""
        return (list(self.clicks), self._state, list(self._history), self._shown_region, self._embedding,
                OrderedDict(self._regions), self._multi, list(self._multi_history), OrderedDict(self._embeddings))

    def restore(self, checkpoint: tuple) -> None:
        """Bring the session back to a :meth:`checkpoint` taken on the same image."""
        (clicks, self._state, history, self._shown_region, self._embedding, regions, self._multi, multi_history,
         embeddings) = checkpoint
        self.clicks, self._history, self._multi_history = list(clicks), list(history), list(multi_history)
        self._regions, self._embeddings = OrderedDict(regions), OrderedDict(embeddings)

    def _fail(self, saved: tuple, exc: BaseException):
        """Restore ``saved`` and raise ``exc`` (out of memory as :class:`OutOfMemoryError`)."""
        self.restore(saved)
        if is_out_of_memory(exc):
            raise OutOfMemoryError(f"{self.device} ran out of memory while segmenting. Close other programs or "
                                   "segmentations, or choose another device (CPU has more memory, a GPU is "
                                   "faster). Nothing was changed.") from exc
        raise exc

    def undo(self) -> ClickResult:
        """Remove the last click; the result is the mask exactly as it was before that click (with growth: up to
        voxels whose logit ties with the threshold, see :func:`.regions.repaste`). A failure (out of memory while
        pasting) changes nothing."""
        if not self.clicks:
            raise PromptError("There is no click to undo.")
        saved = self.checkpoint()
        try:
            return self._undo()
        except BaseException as exc:
            self._fail(saved, exc)

    def _undo(self) -> ClickResult:
        if self.growth is not None:
            self.clicks.pop()
            before = self._multi
            self._multi = self._multi_history.pop()
            kept = set(state.roi for state in self._multi.regions.values())
            for roi in [r for r in self._embeddings if r not in kept]:  # regions of the undone click: not needed
                del self._embeddings[roi]
            return self._grown_result(before, encoded=False, timings={}, report=None)
        undone = self.clicks.pop()
        self._state = self._history.pop()
        for roi, state in list(self._regions.items()):  # cached states that include the undone click are void
            if any(c is undone for c in state.fed):
                del self._regions[roi]
        self._remember(self._state)
        return self._result(encoded=False, timings={})

    # ----------------------------------------------------------------- growth
    def _update_grown(self, click: Click, progress) -> ClickResult:
        """A click with growth: refine and grow (:func:`growth.apply_click`), then paste the blended regions."""
        timings: Dict[str, float] = {}
        before = self._multi
        updated, report = growth.apply_click(before, click, self, self.volume, self.size, self.spacing,
                                             self.prompt_mode, self.growth, timings, progress)
        self._multi_history.append(before)
        self._multi = updated
        return self._grown_result(before, "encode" in timings, timings, report)

    def _newest_region(self) -> Optional["growth.RegionState"]:
        """With growth: the state of the region that holds the newest click best, if there is one."""
        return growth.newest_region(self._multi, self.clicks)

    def _grown_result(self, before: "growth.RegionSet", encoded: bool, timings: Dict[str, float],
                      report: Optional["growth.GrowthReport"]) -> ClickResult:
        """The blended regions pasted back over every region before and after, and what was shown before."""
        start = time.perf_counter()
        box, full, self._pasted = growth.paste_result(self.volume, before, self._multi, self._shown_region,
                                                      self._pasted)
        self._shown_region = self._pasted.shown
        timings["paste"] = time.perf_counter() - start
        newest = self._newest_region()
        iou = newest.iou if newest is not None else float("nan")
        return ClickResult(box, full, iou, encoded, timings, regions=len(self._multi.regions), growth=report)

    def region_embedding(self, roi: RegionOfInterest, timings: Dict[str, float]) -> torch.Tensor:
        """With growth: the embedding of ``roi``, cached (at most ``max_embeddings``, least recent dropped)."""
        if roi in self._embeddings:
            self._embeddings.move_to_end(roi)
            return self._embeddings[roi]
        while len(self._embeddings) >= self.growth.max_embeddings:
            self._embeddings.popitem(last=False)
        start = time.perf_counter()
        embedding = self._encode(roi)
        timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - start
        self._embeddings[roi] = embedding
        return embedding

    # ----------------------------------------------------------------- internals
    def _update(self, click: Click) -> ClickResult:
        previous = self._state
        timings: Dict[str, float] = {}
        if previous.roi is not None and previous.roi.contains(click.ras[None], margin=ROI_MARGIN_VOXELS)[0]:
            state, to_feed = previous, [click]
        else:
            roi = self._choose_roi()
            inside = [c for c in self.clicks if roi.contains(c.ras[None])[0]]
            cached = self._regions.get(roi)
            if cached is not None and len(cached.fed) <= len(inside) and all(
                    a is b for a, b in zip(cached.fed, inside)):
                state, to_feed = cached, inside[len(cached.fed):]  # continue there: same as replaying all
            else:
                state, to_feed = _State(roi), inside
        embedding = self._embedding_for(state.roi, timings)
        start = time.perf_counter()
        for fed in to_feed:
            logits, iou = self._decode(state, embedding, fed)
            state = _State(state.roi, state.fed + (fed,), logits, iou)
        timings["decode"] = time.perf_counter() - start
        self._history.append(previous)
        self._state = state
        self._remember(state)
        return self._result("encode" in timings, timings)

    def _choose_roi(self) -> RegionOfInterest:
        """A ROI around all clicks; if they do not fit in one, a recently used ROI that holds the newest click
        well inside, else a ROI around the newest click."""
        points = np.stack([c.ras for c in self.clicks])
        roi = geometry.roi_around(self.volume, points, self.size, self.spacing)
        if roi.contains(points, margin=ROI_MARGIN_VOXELS).all():
            return roi
        for cached in reversed(self._regions):
            if cached.contains(points[-1:], margin=ROI_MARGIN_VOXELS)[0]:
                return cached
        return geometry.roi_around(self.volume, points[-1:], self.size, self.spacing)

    def _remember(self, state: "_State") -> None:
        """Keep ``state`` as the last state of its ROI (at most MAX_CACHED_REGIONS ROIs, least recent dropped)."""
        if state.roi is None:
            return
        self._regions[state.roi] = state
        self._regions.move_to_end(state.roi)
        while len(self._regions) > MAX_CACHED_REGIONS:
            self._regions.popitem(last=False)

    def _embedding_for(self, roi: RegionOfInterest, timings: Dict[str, float]) -> torch.Tensor:
        """The image embedding of ``roi``: the one in memory, or encoded now (``timings["encode"]`` is set)."""
        if self._embedding is not None and self._embedding[0] == roi:
            return self._embedding[1]
        self._embedding = None  # let the old one go before the new one is made
        start = time.perf_counter()
        embedding = self._encode(roi)
        timings["encode"] = time.perf_counter() - start
        self._embedding = (roi, embedding)
        return embedding

    def _encode(self, roi: RegionOfInterest) -> torch.Tensor:
        return encode_image(self.model, geometry.extract_model_input(self.volume, roi), self.device)

    @torch.no_grad()
    def _decode(self, state: "_State", embedding: torch.Tensor, click: Click) -> Tuple[torch.Tensor, float]:
        """Run prompt encoder + decoder for ``click`` on top of ``state``'s last logits; compact, checked logits."""
        fed = [click] if self.prompt_mode == "newest" else list(state.fed) + [click]
        points = state.roi.ras_to_model(np.stack([c.ras for c in fed]))
        labels = [1 if c.include else 0 for c in fed]
        return self.run_decoder(embedding, points, labels, state.logits)

    @torch.no_grad()
    def run_decoder(self, embedding: torch.Tensor, points: np.ndarray, labels: List[int],
                    previous: Optional[torch.Tensor]) -> Tuple[torch.Tensor, float]:
        """Prompt encoder + decoder for model-space ``points`` (n, 3) and the previous logits (None: zeros)."""
        return decode_prompts(self.model, embedding, points, labels, previous, self.device)

    def _result(self, encoded: bool, timings: Dict[str, float]) -> ClickResult:
        """Paste the current logits back; the region also covers (and clears) what was shown before."""
        start = time.perf_counter()
        state, shown = self._state, self._shown_region
        if state.logits is not None:
            region, mask = geometry.paste_back(self.volume, state.roi, state.logits[0, 0].float().cpu())
        else:
            region, mask = empty_region(), None
        box = union(region, shown)
        full = crop_to(region, mask, box)
        self._shown_region = region if mask is not None else None
        timings["paste"] = time.perf_counter() - start
        return ClickResult(box, full, state.iou, encoded, timings)

    def full_mask(self, result: ClickResult) -> np.ndarray:
        """The whole-volume boolean mask (K, J, I) of a click result."""
        out = np.zeros(self.volume.shape, dtype=bool)
        out[result.region] = result.mask
        return out


@torch.no_grad()
def encode_image(model, image: np.ndarray, device) -> torch.Tensor:
    """The image embedding (compact) of a float32 (x, y, z) model input; used by sessions and the server."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    return _compact(model.image_encoder(tensor))


@torch.no_grad()
def decode_prompts(model, embedding: torch.Tensor, points: np.ndarray, labels: List[int],
                   previous: Optional[torch.Tensor], device) -> Tuple[torch.Tensor, float]:
    """Prompt encoder + mask decoder for model-space ``points`` (n, 3) on ``embedding``, fed the previous
    logits (None: zeros): (compact low-res logits, predicted IoU). :class:`ModelOutputError` for NaN/inf."""
    coords = torch.as_tensor(points, dtype=torch.float32, device=device)[None]
    label_t = torch.as_tensor(labels, dtype=torch.int64, device=device)[None]
    low_res = model.config.image_size // 4
    previous = previous.to(device) if previous is not None else torch.zeros(1, 1, low_res, low_res, low_res,
                                                                            device=device)
    prompt_encoder, decoder = model.prompt_encoder, model.mask_decoder
    sparse, dense = prompt_encoder(points=(coords, label_t), boxes=None, masks=previous)
    logits, iou = decoder(image_embeddings=embedding, image_pe=prompt_encoder.get_dense_pe(),
                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    score = float(iou[0, 0])
    if not math.isfinite(score) or not bool(torch.isfinite(logits).all()):
        raise ModelOutputError(
            "The model gave invalid numbers (NaN or infinity) for this click, so there is no result; nothing "
            "was changed. The weights may be damaged (download or import them again), or reduced precision "
            "overflowed on this device (use full precision or another device).")
    return _compact(logits), score


@dataclass(frozen=True)
class _State:
    """Everything a click changes in one ROI, so that undo can restore it exactly (never modified in place)."""

    roi: Optional[RegionOfInterest] = None
    fed: Tuple[Click, ...] = ()  # the clicks fed in this ROI, in order
    logits: Optional[torch.Tensor] = None  # compact low-res logits after the last fed click
    iou: float = float("nan")


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in its own storage of exactly its size (a view would keep a larger buffer alive)."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
