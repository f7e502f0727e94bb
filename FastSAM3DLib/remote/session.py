"""RemoteSession: the interface of InteractiveSession, with the model on a FastSAM3D server (see the package)."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .. import geometry
from ..errors import OutOfMemoryError, PromptError
from ..geometry import RegionOfInterest, Volume
from ..server import protocol
from ..session_common import (EXCLUDE_FIRST, MAX_CACHED_REGIONS, PROMPT_MODES, ROI_MARGIN_VOXELS, Click,  # noqa: F401
                              ClickResult, Region, click_point, crop_to, empty_region, union)
from .client import ServerClient, ServerError, ServerUnavailableError, StateMissing, SessionLost
from .cut_and_paste import library_geometry, model_input, paste_back

MAX_ATTEMPTS = 4  # one click: a lean request, then at most a new session and resends


# ---------------------------------------------------------------------------------------------- the session
@dataclass(frozen=True)
class _State:
    """A region's state after the clicks ``fed``: its logits (numpy, (1, 1, n, n, n)) and their server id."""

    roi: Optional[RegionOfInterest] = None
    fed: Tuple[Click, ...] = ()
    logits: Optional[np.ndarray] = None
    iou: float = float("nan")
    logits_id: Optional[str] = None


class RemoteSession:
    """Click-by-click segmentation of one volume on a FastSAM3D server; the interface of InteractiveSession.

    ``url``: the server (``http://127.0.0.1:8000``); ``model``: a model it serves; ``token``: its token (default
    ``$FASTSAM3D_TOKEN``); ``client``: a :class:`ServerClient` to share or configure (TLS, timeouts). Opens a
    session on the server at once, so an unreachable server, a wrong token or another protocol version is
    reported here (as a :class:`ServerError`) rather than at the first click.

    ``grow``: as InteractiveSession's (None/False: one region; True or a GrowthSettings: the segment grows over
    several regions, :mod:`FastSAM3DLib.growth`); each region a click decodes is one request. Growth keeps its
    region bookkeeping on this computer with PyTorch; without PyTorch the session segments one region and
    ``growth_note`` says why (it is "" otherwise).
    """

    def __init__(self, url: Optional[str] = None, model: str = "fastsam3d", volume: Optional[Volume] = None,
                 prompt_mode: Optional[str] = None, token: Optional[str] = None,
                 client: Optional[ServerClient] = None, grow=None) -> None:
        if client is None and url is None:
            raise ServerError("Give the server address (url) or a ServerClient.")
        if prompt_mode is not None and prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        self.growth, self.growth_note = _growth_settings(grow)
        if volume is not None:
            volume.validate()  # before the server opens a session that a refused image would leave behind
        self.client = client or ServerClient(url, token)
        self.model_name = model
        self._session_id: Optional[str] = None
        self._open()
        self.prompt_mode = prompt_mode or self.config["default_prompt_mode"]
        self._next_key = 0
        self.volume: Optional[Volume] = None
        self.reset()
        if volume is not None:
            self._use_image(volume)

    # ----------------------------------------------------------------- server session
    def _open(self) -> None:
        reply = self.client.create_session(self.model_name)
        self._session_id = reply["session"]
        self.config = reply["model"]
        self.size, self.spacing = int(self.config["image_size"]), float(self.config["spacing_mm"])
        limits = reply.get("limits") or {}
        self._embedding_slots = max(1, int(limits.get("embeddings_per_session", 1)))
        self._logits_slots = max(1, int(limits.get("logits_per_session", 1)))
        self._max_upload = limits.get("max_upload_bytes")
        self._max_steps = max(1, int(limits.get("max_steps", 64)))  # decoder runs per request: longer runs are split
        self._max_points = max(1, int(limits.get("max_points", 256)))  # points per decoder run
        self._server_embeddings: "OrderedDict[str, None]" = OrderedDict()  # mirror of the server's LRU
        self._server_logits: "OrderedDict[str, None]" = OrderedDict()

    def close(self) -> None:
        """Close the session on the server (it would expire anyway) and the connection."""
        if self._session_id is not None:
            self.client.close_session(self._session_id)
            self._session_id = None
        self.client.close()

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def device(self) -> str:
        """The server's address (where a local session names its torch device)."""
        return self.client.url

    # ----------------------------------------------------------------- state
    def set_image(self, volume: Volume) -> None:
        """Use ``volume`` for the next clicks (validated first, on this computer); forgets clicks and regions."""
        volume.validate()
        self._use_image(volume)

    def _use_image(self, volume: Volume) -> None:
        """``volume`` (validated) for the next clicks, with new embedding keys; forgets clicks and regions."""
        self.volume = volume
        self._keys: "OrderedDict[RegionOfInterest, str]" = OrderedDict()
        self.reset()

    def reset(self) -> None:
        """Forget all clicks and the ROI; keep the image (and the server's embeddings of its regions)."""
        self.clicks: List[Click] = []
        self._state = _State()
        self._history: List[_State] = []
        self._shown_region: Optional[Region] = None
        self._regions: "OrderedDict[RegionOfInterest, _State]" = OrderedDict()
        if not hasattr(self, "_keys"):
            self._keys = OrderedDict()
        if self.growth is not None:  # the segment's regions and their state before each click
            from ..growth import RegionSet

            self._multi = RegionSet()
            self._multi_history: list = []
            self._pasted = None  # the last paste, which the next one may start from

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
    def low_res_logits(self) -> Optional[np.ndarray]:
        """The current low-res logits ``(1, 1, 32, 32, 32)`` as a float32 numpy array (None before a click).

        With growth: those of :attr:`roi`.
        """
        if self.growth is not None:
            state = self._newest_region()
            return state.logits.numpy() if state is not None else None
        return self._state.logits

    @property
    def region_set(self):
        """With growth: the segment's regions (:class:`~FastSAM3DLib.growth.RegionSet`); None without growth."""
        return self._multi if self.growth is not None else None

    # ----------------------------------------------------------------- clicks
    def add_click(self, ras, include: bool = True, progress=None) -> ClickResult:
        """Add an include (or exclude) point in RAS mm and return the updated mask of the changed region.

        With growth, ``progress(GrowthProgress)`` is called before each region growth adds; returning False
        stops the growth there (the click and the regions added so far stay: one undo step).

        Raises what a local session raises for bad input (PromptError, InputImageError), ModelOutputError,
        OutOfMemoryError, or a :class:`ServerError` for the server's refusals; any of them changes nothing.
        """
        if self.volume is None:
            raise PromptError("Load an image first (set_image) before clicking.")
        click = Click(click_point(ras), bool(include))
        geometry.roi_around(self.volume, click.ras[None], self.size, self.spacing)  # validates: raises if outside
        if not include and not any(c.include for c in self.clicks):
            raise PromptError(EXCLUDE_FIRST)
        return self._unchanged_on_failure(lambda: self._add(click, progress), "the result")

    def _add(self, click: Click, progress) -> ClickResult:
        if self.growth is not None:
            return self._add_grown(click, progress)
        clicks = self.clicks + [click]
        previous = self._state
        if previous.roi is not None and previous.roi.contains(click.ras[None], margin=ROI_MARGIN_VOXELS)[0]:
            base, to_feed = previous, [click]
        else:
            roi = self._choose_roi(clicks)
            inside = [c for c in clicks if roi.contains(c.ras[None])[0]]
            cached = self._regions.get(roi)
            if cached is not None and len(cached.fed) <= len(inside) and all(
                    a is b for a, b in zip(cached.fed, inside)):
                base, to_feed = cached, inside[len(cached.fed):]
            else:
                base, to_feed = _State(roi), inside
        timings: Dict[str, float] = {}
        state, encoded = self._run(base, to_feed, timings)
        result, shown = self._result(state, timings, encoded)
        # success: commit (nothing above changed the session)
        self.clicks = clicks
        self._history.append(previous)
        self._state = state
        self._shown_region = shown
        self._remember(state)
        return result

    def undo(self) -> ClickResult:
        """Remove the last click; the result is the mask exactly as it was before that click (no server call;
        with growth: up to voxels whose logit ties with the threshold, see :func:`..regions.repaste`). A failure
        (out of memory while pasting) changes nothing."""
        if not self.clicks:
            raise PromptError("There is no click to undo.")
        return self._unchanged_on_failure(self._undo, "the result before the last click")

    def _unchanged_on_failure(self, action, showing: str) -> ClickResult:
        """``action()``'s result; if it fails, the session is as it was (out of memory as OutOfMemoryError)."""
        saved = self.checkpoint()
        try:
            return action()
        except BaseException as exc:
            self.restore(saved)
            if isinstance(exc, MemoryError):
                raise OutOfMemoryError(f"This computer ran out of memory while showing {showing}; nothing was "
                                       "changed. Close other volumes or segmentations.") from exc
            raise

    def checkpoint(self) -> tuple:
        """The session's clicks and state (containers copied): :meth:`restore` brings the session back to it. What
        the server holds is not part of it (the client's mirror of it stays as it is)."""
        return (list(self.clicks), self._state, list(self._history), self._shown_region, OrderedDict(self._regions),
                getattr(self, "_multi", None), list(getattr(self, "_multi_history", ())))

    def restore(self, checkpoint: tuple) -> None:
        """Bring the session back to a :meth:`checkpoint` taken on the same image."""
        clicks, self._state, history, self._shown_region, regions, multi, multi_history = checkpoint
        self.clicks, self._history, self._regions = list(clicks), list(history), OrderedDict(regions)
        if self.growth is not None:
            self._multi, self._multi_history = multi, list(multi_history)

    def _undo(self) -> ClickResult:
        if self.growth is not None:
            self.clicks.pop()
            before, self._multi = self._multi, self._multi_history.pop()
            return self._grown_result(before, {}, False, None)
        undone = self.clicks.pop()
        self._state = self._history.pop()
        for roi, state in list(self._regions.items()):
            if any(c is undone for c in state.fed):
                del self._regions[roi]
        self._remember(self._state)
        result, self._shown_region = self._result(self._state, {}, False)
        return result

    def full_mask(self, result: ClickResult) -> np.ndarray:
        """The whole-volume boolean mask (K, J, I) of a click result."""
        out = np.zeros(self.volume.shape, dtype=bool)
        out[result.region] = result.mask
        return out

    # ----------------------------------------------------------------- internals
    def _choose_roi(self, clicks: List[Click]) -> RegionOfInterest:
        """As InteractiveSession._choose_roi."""
        points = np.stack([c.ras for c in clicks])
        roi = geometry.roi_around(self.volume, points, self.size, self.spacing)
        if roi.contains(points, margin=ROI_MARGIN_VOXELS).all():
            return roi
        for cached in reversed(self._regions):
            if cached.contains(points[-1:], margin=ROI_MARGIN_VOXELS)[0]:
                return cached
        return geometry.roi_around(self.volume, points[-1:], self.size, self.spacing)

    def _remember(self, state: _State) -> None:
        if state.roi is None:
            return
        self._regions[state.roi] = state
        self._regions.move_to_end(state.roi)
        while len(self._regions) > MAX_CACHED_REGIONS:
            self._regions.popitem(last=False)

    def _key(self, roi: RegionOfInterest) -> str:
        """The embedding key of a region of this image (new keys for a new image; never reused)."""
        key = self._keys.get(roi)
        if key is None:
            key = self._keys[roi] = f"r{self._next_key}"
            self._next_key += 1
            while len(self._keys) > 4 * MAX_CACHED_REGIONS + (2 * self.growth.max_regions if self.growth else 0):
                self._keys.popitem(last=False)
        self._keys.move_to_end(roi)
        return key

    def _run(self, base: _State, to_feed: List[Click], timings: Dict[str, float]) -> Tuple[_State, bool]:
        """Feed ``to_feed`` on top of ``base`` on the server; (new state, encoded). Changes no session state
        except the mirrors of what the server holds (and the server session itself when it had to be reopened)."""
        roi = base.roi
        fed = list(base.fed)
        steps = []
        for click in to_feed:
            prompt = [click] if self.prompt_mode == "newest" else fed + [click]
            if len(prompt) > self._max_points:
                raise PromptError(f"This region holds {len(prompt)} clicks; the server takes at most "
                                  f"{self._max_points} per decoder run (prompt mode '{self.prompt_mode}'). Use "
                                  "prompt mode 'newest', or start a new segment.")
            steps.append(self._step(roi, prompt))
            fed.append(click)
        if not steps:
            return base, False
        logits, iou, logits_id, encoded = base.logits, base.iou, base.logits_id, False
        for start in range(0, len(steps), self._max_steps):  # a long replay in requests the server accepts, each
            logits, iou, logits_id, more = self._request(  # fed the logits the previous one left on the server
                roi, steps[start:start + self._max_steps], logits, logits_id, timings)
            encoded = encoded or more
        return _State(roi, tuple(fed), logits, iou, logits_id), encoded

    @staticmethod
    def _step(roi: RegionOfInterest, prompt: List[Click]) -> dict:
        """One decoder run of a request: the clicks as model-space points and their labels."""
        points = roi.ras_to_model(np.stack([c.ras for c in prompt]))
        return {"points": points.tolist(), "labels": [1 if c.include else 0 for c in prompt]}

    def _request(self, roi: RegionOfInterest, steps: List[dict], previous: Optional[np.ndarray],
                 previous_id: Optional[str], timings: Dict[str, float],
                 image: Optional[np.ndarray] = None) -> Tuple[np.ndarray, float, str, bool]:
        """Run ``steps`` on the server's embedding of ``roi``, the first fed ``previous`` (the logits of the server's
        ``previous_id`` when it still holds them; None: zeros): (logits (1, 1, n, n, n), iou, logits id, encoded).
        Sends the region's model input (``image`` when already made) and the previous logits only when the server
        lacks them."""
        key = self._key(roi)
        force_image = force_logits = False
        for _ in range(MAX_ATTEMPTS):
            send_image = force_image or key not in self._server_embeddings
            send_logits = previous is not None and (force_logits or previous_id not in self._server_logits)
            arrays = {}
            start = time.perf_counter()
            if send_image:
                if image is None:
                    image = model_input(self.volume, roi)
                arrays["image"] = image
            if send_logits:
                arrays["previous_logits"] = previous.reshape(previous.shape[-3:])
            header = {"model": self.model_name, "embedding": key, "steps": steps,
                      "previous": None if previous is None or send_logits else previous_id}
            frame = protocol.pack(header, arrays, codecs={"image": "zlib"})
            timings["prepare"] = timings.get("prepare", 0.0) + time.perf_counter() - start
            if self._max_upload is not None and len(frame) > self._max_upload:
                self._max_upload = self._current_upload_limit()  # the server may have restarted with another
                if self._max_upload is not None and len(frame) > self._max_upload:
                    raise ServerError(_too_large(self._max_upload))
            start = time.perf_counter()
            try:
                reply, reply_arrays = self.client.click(self._session_id, frame, self.size)
            except SessionLost:
                self._open()  # a new, empty session: everything is sent again
                continue
            except StateMissing as missing:
                force_image = force_image or "image" in missing.missing
                force_logits = force_logits or "previous_logits" in missing.missing
                if "image" in missing.missing:
                    self._server_embeddings.pop(key, None)
                if "previous_logits" in missing.missing and previous_id is not None:
                    self._server_logits.pop(previous_id, None)
                continue
            finally:
                timings["network"] = timings.get("network", 0.0) + time.perf_counter() - start
            server = reply.get("timings") or {}
            for name in ("encode", "decode"):
                if isinstance(server.get(name), (int, float)):
                    timings[name] = timings.get(name, 0.0) + float(server[name])
                    timings["network"] -= float(server[name])
            self._mirror(self._server_embeddings, key, self._embedding_slots)
            if previous_id is not None and not send_logits and previous_id in self._server_logits:
                self._server_logits.move_to_end(previous_id)
            self._mirror(self._server_logits, reply["logits_id"], self._logits_slots)
            logits = reply_arrays["logits"].reshape((1, 1) + reply_arrays["logits"].shape)
            iou = float(reply.get("iou", float("nan")))
            return logits, iou, reply["logits_id"], bool(reply.get("encoded"))
        raise ServerUnavailableError(f"The FastSAM3D server at {self.client.url} kept losing this session's state "
                                     "(is it restarting?). Nothing was changed; click again in a moment.")

    def _current_upload_limit(self) -> Optional[int]:
        """The server's upload limit now (``/v1/info``): the one read when the session opened may be stale."""
        limit = (self.client.info().get("limits") or {}).get("max_upload_bytes")
        return int(limit) if isinstance(limit, (int, float)) else None

    # ----------------------------------------------------------------- growth
    def _add_grown(self, click: Click, progress) -> ClickResult:
        """A click with growth (:func:`FastSAM3DLib.growth.apply_click`, each decoder run a request), then the
        blended regions pasted back. Nothing changes unless it succeeds."""
        from .. import growth

        timings: Dict[str, float] = {}
        before = self._multi
        runner = _GrowthRunner(self, timings)
        updated, report = growth.apply_click(before, click, runner, self.volume, self.size, self.spacing,
                                             self.prompt_mode, self.growth, timings, progress)
        self.clicks.append(click)
        self._multi_history.append(before)
        self._multi = updated
        return self._grown_result(before, timings, runner.encoded, report)

    def _newest_region(self):
        from .. import growth

        return growth.newest_region(self._multi, self.clicks)

    def _grown_result(self, before, timings: Dict[str, float], encoded: bool, report) -> ClickResult:
        """As InteractiveSession._grown_result: the blended regions pasted over every region before and after."""
        from .. import growth

        start = time.perf_counter()
        box, full, self._pasted = growth.paste_result(self.volume, before, self._multi, self._shown_region,
                                                      self._pasted)
        self._shown_region = self._pasted.shown
        timings["paste"] = time.perf_counter() - start
        newest = self._newest_region()
        return ClickResult(box, full, newest.iou if newest is not None else float("nan"), encoded, timings,
                           regions=len(self._multi.regions), growth=report)

    @staticmethod
    def _mirror(lru: "OrderedDict[str, None]", key: str, slots: int) -> None:
        lru[key] = None
        lru.move_to_end(key)
        while len(lru) > slots:
            lru.popitem(last=False)

    def _result(self, state: _State, timings: Dict[str, float], encoded: bool) -> Tuple[ClickResult, Optional[Region]]:
        """Paste ``state``'s logits back (as InteractiveSession._result); (result, region now shown)."""
        start = time.perf_counter()
        if state.logits is not None:
            region, mask = paste_back(self.volume, state.roi, state.logits[0, 0])
        else:
            region, mask = empty_region(), None
        box = union(region, self._shown_region)
        full = crop_to(region, mask, box)
        timings["paste"] = time.perf_counter() - start
        return ClickResult(box, full, state.iou, encoded, timings), (region if mask is not None else None)


def _too_large(limit: int) -> str:
    """As the server's message (``server.app.too_large_message``), which this module cannot import."""
    return (f"The request is larger than the server's upload limit of {limit / 2 ** 20:.3g} MiB; nothing was "
            "changed. Ask the administrator to raise --max-upload-mb.")


class _GrowthRunner:
    """What :func:`FastSAM3DLib.growth.apply_click` needs (:class:`FastSAM3DLib.growth.Runner`), on the server: a
    region's "embedding" is the region itself (the server encodes it when it first meets it), a decoder run is
    one request fed the previous logits. Server timings add up in ``timings``."""

    def __init__(self, session: RemoteSession, timings: Dict[str, float]) -> None:
        self.session, self.timings, self.encoded = session, timings, False
        self._inputs: Dict[RegionOfInterest, np.ndarray] = {}  # model inputs made here, sent with the first run

    def region_embedding(self, roi: RegionOfInterest, timings: Dict[str, float]) -> RegionOfInterest:
        """The region (the server holds its embedding). A region the server has not encoded yet has its model
        input made here first, so an image that cannot be used (InputImageError) refuses that region alone, as a
        local session's encoder does, not the whole click."""
        if self.session._key(roi) not in self.session._server_embeddings:
            start = time.perf_counter()
            self._inputs[roi] = model_input(self.session.volume, roi)
            timings["prepare"] = timings.get("prepare", 0.0) + time.perf_counter() - start
        return roi

    def run_decoder(self, roi: RegionOfInterest, points_xyz: np.ndarray, labels: List[int], previous):
        """Compact low-res logits (a CPU tensor) and predicted IoU for model-space points on the previous logits."""
        import torch

        step = {"points": np.asarray(points_xyz, dtype=np.float64).tolist(), "labels": [int(v) for v in labels]}
        before = None if previous is None else previous.detach().cpu().numpy().astype(np.float32, copy=False)
        logits, iou, _, encoded = self.session._request(roi, [step], before, None, self.timings,
                                                        self._inputs.pop(roi, None))
        self.encoded = self.encoded or encoded
        return torch.from_numpy(np.ascontiguousarray(logits)), iou


def _growth_settings(grow):
    """(GrowthSettings or None, why growth is off although asked for) of a remote session's ``grow``."""
    if grow is None or grow is False:
        return None, ""
    if not library_geometry():
        return None, ("growth over several regions needs PyTorch on this computer (for the regions' bookkeeping; "
                      "the model still runs on the server), so each click segments one region")
    from ..growth import settings_from

    return settings_from(grow), ""


def grows_by_default(model: str) -> bool:
    """Whether a remote session of ``model`` grows unless told otherwise: the model's default
    (:func:`FastSAM3DLib.growth.default_for`) where this computer has PyTorch and knows the model, else no."""
    if not library_geometry():
        return False
    from ..growth import default_for

    try:
        return default_for(model)
    except ValueError:  # a model this computer's registry does not know
        return False
