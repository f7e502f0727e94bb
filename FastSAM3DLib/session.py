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
"""
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import geometry
from .errors import OutOfMemoryError, PromptError
from .geometry import RegionOfInterest, Volume

Region = Tuple[slice, slice, slice]
PROMPT_MODES = ("newest", "all")
ROI_MARGIN_VOXELS = 8.0  # a click closer than this to the ROI border moves the ROI


@dataclass
class Click:
    """One user click: a point in RAS millimetres and whether it marks the object (include) or not."""

    ras: np.ndarray
    include: bool = True


@dataclass
class ClickResult:
    """What a click changed: the segment inside ``region`` (k, j, i slices of the source array) becomes ``mask``."""

    region: Region
    mask: np.ndarray
    iou: float
    encoded: bool
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        """Number of voxels in the mask."""
        return int(self.mask.sum())


class InteractiveSession:
    """Click-by-click segmentation of one volume with one model (no Qt, no threads, no MRML)."""

    def __init__(self, model, volume: Optional[Volume] = None, prompt_mode: Optional[str] = None) -> None:
        self.model = model
        config = model.config
        self.size = config.image_size
        self.spacing = config.spacing_mm
        self.prompt_mode = prompt_mode or config.default_prompt_mode
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
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

    @property
    def roi(self) -> Optional[RegionOfInterest]:
        """The region of interest the model currently sees (None before the first click)."""
        return self._state.roi

    @property
    def low_res_logits(self) -> Optional[torch.Tensor]:
        """The model's current low-res logits ``(1, 1, 32, 32, 32)`` on the ROI grid (None before a click)."""
        return self._state.logits[-1] if self._state.logits else None

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------- clicks
    def add_click(self, ras, include: bool = True) -> ClickResult:
        """Add an include (or exclude) point in RAS mm and return the updated mask of the changed region.

        Raises :class:`PromptError` (and changes nothing) for a point outside the volume or an exclude point
        before any include point.
        """
        if self.volume is None:
            raise PromptError("Load an image first (set_image) before clicking.")
        click = Click(np.asarray(ras, dtype=np.float64).reshape(3), bool(include))
        geometry.roi_around(self.volume, click.ras[None], self.size, self.spacing)  # validates: raises if outside
        if not include and not any(c.include for c in self.clicks):
            raise PromptError("Start with an include point (left click) inside the object; exclude points "
                              "(Shift+click) only refine an existing result.")
        saved = (self._state, len(self._history), self._shown_region)
        self.clicks.append(click)
        try:
            return self._update(new_click=len(self.clicks) - 1)
        except BaseException as exc:  # out of memory, interrupted...: leave the session exactly as it was
            self.clicks.pop()
            self._state, self._shown_region = saved[0], saved[2]
            del self._history[saved[1]:]
            if _is_out_of_memory(exc):
                raise OutOfMemoryError(f"{self.device} ran out of memory while segmenting. Close other programs or "
                                       "segmentations, or choose another device (CPU has more memory, a GPU is "
                                       "faster). Nothing was changed.") from exc
            raise

    def undo(self) -> ClickResult:
        """Remove the last click; the result is the mask exactly as it was before that click."""
        if not self.clicks:
            raise PromptError("There is no click to undo.")
        self.clicks.pop()
        self._state = self._history.pop()
        return self._result(encoded=False, timings={})

    # ----------------------------------------------------------------- internals
    def _update(self, new_click: int) -> ClickResult:
        previous = self._state
        state = _State(previous.roi, previous.embedding, list(previous.fed), list(previous.logits),
                       list(previous.ious))
        timings: Dict[str, float] = {}
        click = self.clicks[new_click]
        encoded = state.roi is None or not state.roi.contains(click.ras[None], margin=ROI_MARGIN_VOXELS)[0]
        if encoded:
            state.roi = self._place_roi()
            start = time.perf_counter()
            state.embedding = self._encode(state.roi)
            timings["encode"] = time.perf_counter() - start
            state.fed, state.logits, state.ious = [], [], []
            to_feed = [i for i, c in enumerate(self.clicks) if state.roi.contains(c.ras[None])[0]]
        else:
            to_feed = [new_click]
        start = time.perf_counter()
        for index in to_feed:
            logits, iou = self._decode(state, index)
            state.fed.append(index)
            state.logits.append(logits)
            state.ious.append(iou)
        timings["decode"] = time.perf_counter() - start
        self._history.append(previous)
        self._state = state
        return self._result(encoded, timings)

    def _place_roi(self) -> RegionOfInterest:
        """A ROI around all clicks, or around the newest one if they do not fit in one ROI."""
        points = np.stack([c.ras for c in self.clicks])
        roi = geometry.roi_around(self.volume, points, self.size, self.spacing)
        if not roi.contains(points, margin=ROI_MARGIN_VOXELS).all():
            roi = geometry.roi_around(self.volume, points[-1:], self.size, self.spacing)
        return roi

    @torch.no_grad()
    def _encode(self, roi: RegionOfInterest) -> torch.Tensor:
        image = geometry.extract_model_input(self.volume, roi)
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(self.device)
        return self.model.image_encoder(tensor)

    @torch.no_grad()
    def _decode(self, state: "_State", index: int) -> Tuple[torch.Tensor, float]:
        """Run prompt encoder + decoder for click ``index`` on top of ``state``'s last logits."""
        fed = [index] if self.prompt_mode == "newest" else state.fed + [index]
        points = state.roi.ras_to_model(np.stack([self.clicks[i].ras for i in fed]))
        labels = [1 if self.clicks[i].include else 0 for i in fed]
        coords = torch.as_tensor(points, dtype=torch.float32, device=self.device)[None]
        label_t = torch.as_tensor(labels, dtype=torch.int64, device=self.device)[None]
        low_res = self.size // 4
        previous = state.logits[-1] if state.logits else torch.zeros(1, 1, low_res, low_res, low_res,
                                                                     device=self.device)
        prompt_encoder, decoder = self.model.prompt_encoder, self.model.mask_decoder
        sparse, dense = prompt_encoder(points=(coords, label_t), boxes=None, masks=previous)
        logits, iou = decoder(image_embeddings=state.embedding, image_pe=prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=False)
        return logits, float(iou[0, 0])

    def _result(self, encoded: bool, timings: Dict[str, float]) -> ClickResult:
        """Paste the current logits back; the region also covers (and clears) what was shown before."""
        start = time.perf_counter()
        state, shown = self._state, self._shown_region
        if state.logits:
            region, mask = geometry.paste_back(self.volume, state.roi, state.logits[-1][0, 0].float().cpu())
        else:
            region, mask = _empty_region(), None
        union = _union(region, shown)
        full = np.zeros(tuple(s.stop - s.start for s in union), dtype=bool)
        if mask is not None:
            full[tuple(slice(r.start - u.start, r.stop - u.start) for r, u in zip(region, union))] = mask
        self._shown_region = region if mask is not None else None
        timings["paste"] = time.perf_counter() - start
        iou = state.ious[-1] if state.ious else float("nan")
        return ClickResult(union, full, iou, encoded, timings)

    def full_mask(self, result: ClickResult) -> np.ndarray:
        """The whole-volume boolean mask (K, J, I) of a click result."""
        out = np.zeros(self.volume.shape, dtype=bool)
        out[result.region] = result.mask
        return out


@dataclass
class _State:
    """Everything a click changes, so that undo can restore it exactly."""

    roi: Optional[RegionOfInterest] = None
    embedding: Optional[torch.Tensor] = None
    fed: List[int] = field(default_factory=list)  # click indices fed in this ROI, in order
    logits: List[torch.Tensor] = field(default_factory=list)  # low-res logits after each fed click
    ious: List[float] = field(default_factory=list)


def _is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's and the allocator's out-of-memory errors on any device."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _empty_region() -> Region:
    return (slice(0, 0), slice(0, 0), slice(0, 0))


def _union(a: Region, b: Optional[Region]) -> Region:
    """Bounding box of two regions (an empty region is ignored)."""
    if b is None or all(s.stop <= s.start for s in b):
        return a
    if all(s.stop <= s.start for s in a):
        return b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))
