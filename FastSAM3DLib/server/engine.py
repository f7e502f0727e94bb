"""The server's computation: models (loaded once, one lock each) and one click request of a session.

The arithmetic is :class:`FastSAM3DLib.session.InteractiveSession`'s, step for step (same tensor types, shapes
and calls), so that a client pasting the returned logits back gets bit for bit what a local session gives.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..devices import is_out_of_memory
from ..session import ModelOutputError, decode_prompts, encode_image
from . import protocol
from .sessions import ServiceError, SessionState
from .settings import ServerSettings

TINY_TEST_SEED = 0  # random-weight test models are built with this seed, as the tests build their local twin


def model_spec(spec: str) -> Tuple[str, Optional[str]]:
    """``"name"`` or ``"name=checkpoint"`` -> (name, checkpoint or None)."""
    name, _, checkpoint = spec.partition("=")
    return name.strip(), (checkpoint.strip() or None)


def load_model(spec: str, device: str, cache_dir=None):
    """Build a served model: its checkpoint file, else its bundled or cached weights; models without weights
    of their own (``tiny-test``) get seeded random weights."""
    from ..registry import build_model, get_model_config

    name, checkpoint = model_spec(spec)
    config = get_model_config(name)
    if checkpoint is None and config.weights is None and name.startswith("tiny-test"):
        return build_model(name, seed=TINY_TEST_SEED, device=device)
    return build_model(name, checkpoint=checkpoint or "cached", device=device, cache_dir=cache_dir)


class ModelPool:
    """The served models by name, each with the lock that serialises its use."""

    def __init__(self, settings: ServerSettings, loader=None) -> None:
        self.settings = settings
        cache_dir = settings.extra.get("cache_dir")
        self._loader = loader or (lambda spec, device: load_model(spec, device, cache_dir=cache_dir))
        self._models: Dict[str, Tuple[object, threading.Lock]] = {}
        self._specs = {model_spec(s)[0]: s for s in settings.models}
        self._lock = threading.Lock()

    @property
    def names(self):
        """The model names this pool serves."""
        return list(self._specs)

    def load_all(self) -> None:
        """Load every served model now (start-up: a missing weights file is reported before anyone connects)."""
        for name in self._specs:
            self.get(name)

    def get(self, name: str):
        """(model, lock) of a served model; ServiceError ``model_unavailable`` for another name."""
        if name not in self._specs:
            raise ServiceError("model_unavailable", f"The server does not serve the model '{name}'; it serves "
                               f"{', '.join(self._specs)}. Choose one of those.", models=list(self._specs))
        with self._lock:
            if name not in self._models:
                self._models[name] = (self._loader(self._specs[name], self.settings.device), threading.Lock())
            return self._models[name]

    def describe(self, name: str) -> dict:
        """What a client needs to cut the model input: size, spacing, default prompt mode."""
        from ..registry import get_model_config

        config = get_model_config(name)
        return {"name": name, "image_size": config.image_size, "spacing_mm": config.spacing_mm,
                "default_prompt_mode": config.default_prompt_mode, "description": config.description}


def click(pool: ModelPool, state: SessionState, body: bytes, abandoned=None) -> bytes:
    """Run one click request (see :mod:`.protocol`) on ``state``; the reply frame, or a ServiceError.

    ``abandoned``: a ``threading.Event`` set when the client has gone; a click still waiting for its session then
    changes nothing and computes nothing (the model's time goes to the clicks someone waits for)."""
    settings = pool.settings
    header, arrays = _parse(pool, body)
    name = header["model"]
    _check_model(state, name)
    model, model_lock = pool.get(name)
    size = model.config.image_size
    steps = _steps(header.get("steps"), size, settings)
    key, previous_id = header.get("embedding"), header.get("previous")
    if not isinstance(key, str) or not 0 < len(key) <= 128:
        raise ServiceError("malformed", "'embedding' must be a key of 1 to 128 characters.")
    if previous_id is not None and not isinstance(previous_id, str):
        raise ServiceError("malformed", "'previous' must be a logits id or null.")
    with state.in_use():
        if abandoned is not None and abandoned.is_set():
            raise ServiceError("malformed", "The client disconnected before its click was computed.")
        state.check_open()  # it may have been closed while this click waited for the previous one
        _check_model(state, name)  # again: another request may have bound the session meanwhile
        embedding = state.embeddings.get(key)  # marked used only when the click succeeds: a refusal changes nothing
        previous = arrays.get("previous_logits")
        missing = []
        if embedding is None and "image" not in arrays:
            missing.append("image")
        if previous is None and previous_id is not None:
            previous = state.logits.get(previous_id)
            if previous is None:
                missing.append("previous_logits")
        if missing:
            raise ServiceError("missing", f"The server no longer holds {' and '.join(missing)} of this session; "
                               "the client sends them again.", missing=missing)
        if previous is not None and not np.isfinite(previous).all():
            raise ServiceError("malformed", "'previous_logits' holds NaN or infinite numbers.")
        timings: Dict[str, float] = {}
        device = next(model.parameters()).device
        with model_lock:
            try:
                if embedding is None:
                    image = arrays["image"]
                    if not np.isfinite(image).all():
                        raise ServiceError("input_image", "The region around the points contains NaN or infinite "
                                           "voxels. Replace them with a finite value (e.g. the image minimum) before "
                                           "segmenting.")
                    start = time.perf_counter()
                    embedding = encode_image(model, image, device)
                    timings["encode"] = time.perf_counter() - start
                start = time.perf_counter()
                logits = None if previous is None else torch.from_numpy(previous).reshape((1, 1) + previous.shape[-3:])
                iou = float("nan")
                for points, labels in steps:
                    logits, iou = decode(model, embedding, points, labels, logits, device)
                result = logits.cpu().numpy().reshape(logits.shape[-3:])
                timings["decode"] = time.perf_counter() - start
            except ServiceError:
                raise
            except BaseException as exc:
                if is_out_of_memory(exc):
                    raise ServiceError("out_of_memory", f"The server's {device} ran out of memory while segmenting. "
                                       "Nothing was changed; try again in a moment, or ask the administrator to "
                                       "lower --max-sessions.", retry_after=5.0) from exc
                raise
        encoded = "encode" in timings
        state.model = name  # a session met for the first time on this replica (Ray) runs this model from now on
        state.keep_embedding(key, embedding)  # new, or marked recently used
        if previous_id is not None and previous_id in state.logits:
            state.logits.move_to_end(previous_id)
        logits_id = state.keep_logits(result)
    return protocol.pack({"logits_id": logits_id, "iou": iou, "encoded": encoded, "timings": timings},
                         {"logits": result})


def _check_model(state: SessionState, name: str) -> None:
    """ServiceError ``malformed`` when the session already runs another model."""
    if state.model is not None and state.model != name:
        raise ServiceError("malformed", f"This session runs the model '{state.model}', not '{name}'.")


def _parse(pool: ModelPool, body: bytes):
    """(header, arrays) of a click request; arrays are checked against the named model's input shapes."""
    from ..registry import get_model_config

    try:
        limit = pool.settings.max_header_bytes()
        name = protocol.loads_json(protocol.frame_header(body, limit)).get("model")
        if not isinstance(name, str) or name not in pool.names:
            pool.get(str(name))  # raises model_unavailable, naming the served models
        size = get_model_config(name).image_size
        low = size // 4
        return protocol.unpack(body, {"image": ("float32", (size, size, size)),
                                      "previous_logits": ("float32", (low, low, low))}, limit)
    except protocol.FrameError as exc:
        raise ServiceError("malformed", f"The request is malformed: {exc}.") from None


def _steps(steps, size: int, settings: ServerSettings):
    """Validated decoder steps: [(points float64 (n, 3), labels list)], points inside the model input."""
    if not isinstance(steps, list) or not 1 <= len(steps) <= settings.max_steps:
        raise ServiceError("malformed", f"'steps' must be a list of 1 to {settings.max_steps} decoder steps.")
    out = []
    for step in steps:
        points, labels = (step.get("points"), step.get("labels")) if isinstance(step, dict) else (None, None)
        if not (isinstance(points, list) and isinstance(labels, list) and
                1 <= len(points) == len(labels) <= settings.max_points):
            raise ServiceError("malformed", f"Each step needs 'points' and 'labels' of the same length (1 to "
                               f"{settings.max_points}).")
        if not all(isinstance(p, list) and len(p) == 3 and all(_is_number(v) for v in p) for p in points):
            raise ServiceError("prompt", "A click must be three finite numbers; the request held something else.")
        if not all(type(v) is int and v in (0, 1) for v in labels):
            raise ServiceError("malformed", "Labels must be 1 (include) or 0 (exclude).")
        array = np.asarray(points, dtype=np.float64)
        if np.any(array < -1.0) or np.any(array > size):
            raise ServiceError("prompt", f"A point lies outside the {size}^3 model input the client sent; the client "
                               "cuts the region around the clicks, so this is a client bug or a wrong model.")
        out.append((array, labels))
    return out


def _is_number(value) -> bool:
    """A finite JSON number (an integer too large for a float is not)."""
    if type(value) is int:
        return abs(value) < 2 ** 53
    return type(value) is float and math.isfinite(value)


def decode(model, embedding: torch.Tensor, points: np.ndarray, labels, previous: Optional[torch.Tensor], device):
    """:func:`FastSAM3DLib.session.decode_prompts`, its NaN/inf error told as the server's."""
    try:
        return decode_prompts(model, embedding, points, labels, previous, device)
    except ModelOutputError:
        raise ServiceError("model_output", "The model gave invalid numbers (NaN or infinity) for this click, so "
                           "there is no result; nothing was changed. The request's image or previous logits may "
                           "hold extreme values (a client that does not normalise the image as FastSAM3D's does), "
                           "or the server's weights are damaged or its reduced precision overflowed: tell its "
                           "administrator.") from None
