"""Per-session state, the session store of a single server (count limit, idle expiry), the signed session ids of
a Ray deployment, the rate limiter and the budget of uploads held at once.

Standard library only: the tensors a session holds are opaque here (see :mod:`.engine`).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

from .settings import ServerSettings


class ServiceError(Exception):
    """A refused request: ``code`` (see :data:`.protocol.ERROR_STATUS`), a message for the user, extra fields."""

    def __init__(self, code: str, message: str, retry_after: Optional[float] = None, **extra) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after, self.extra = code, message, retry_after, extra


class SessionState:
    """What the server keeps for one client session: a few image embeddings and former logits (LRU each)."""

    def __init__(self, model: Optional[str], settings: ServerSettings,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.settings = settings
        self.clock = clock
        self.lock = threading.Lock()  # one click of a session at a time
        self.last_used = clock()
        self.embeddings: "OrderedDict[str, object]" = OrderedDict()
        self.logits: "OrderedDict[str, object]" = OrderedDict()
        self.closed = False
        self.queued = 0  # clicks of this session admitted and not answered yet (counted on the event loop)

    @contextlib.contextmanager
    def in_use(self):
        """Hold the session for one click; it was last used when the click ends (a click longer than the idle
        timeout must not leave its session to be closed at once)."""
        with self.lock:
            try:
                yield self
            finally:
                self.last_used = self.clock()

    def busy(self) -> bool:
        """A click of this session runs, or waits for its turn: it is in use, whatever its idle time says."""
        return self.lock.locked() or bool(self.queued)

    def close(self) -> None:
        """End the session: it is refused from now on, and its tensors are freed (after the click that holds the
        session, if one does: call it from a worker thread, not an event loop)."""
        self.closed = True
        with self.lock:
            self.embeddings.clear()
            self.logits.clear()

    def check_open(self) -> None:
        """ServiceError ``session_unknown`` once the session is closed (the client then opens a new one)."""
        if self.closed:
            raise ServiceError("session_unknown", "This session was closed; the client opens a new one.")

    def keep_embedding(self, key: str, value) -> None:
        """Keep an image embedding under ``key``, or mark it recently used (the oldest dropped beyond the
        per-session limit)."""
        self.embeddings[key] = value
        self.embeddings.move_to_end(key)
        while len(self.embeddings) > self.settings.embeddings_per_session:
            self.embeddings.popitem(last=False)

    def keep_logits(self, value) -> str:
        """Store logits under a new random id (ids never repeat, even across replicas) and return it."""
        logits_id = secrets.token_hex(8)
        self.logits[logits_id] = value
        while len(self.logits) > self.settings.logits_per_session:
            self.logits.popitem(last=False)
        return logits_id


#: When the server is full, a new session takes the place of the least recently used one that has been idle at
#: least this long (its user's next click reopens it transparently, as after an expiry); only when every session
#: was used more recently is a new one refused.
MIN_IDLE_TO_REPLACE_S = 60.0


class SessionStore:
    """The sessions of one server: at most ``max_sessions``, each closed after ``idle_timeout_s`` unused; when
    full, a new session replaces the least recently used one idle for :data:`MIN_IDLE_TO_REPLACE_S`."""

    def __init__(self, settings: ServerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._sessions: Dict[str, SessionState] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, model: str) -> Tuple[str, SessionState]:
        """A new session id and its state; when the limit is reached it replaces the least recently used session
        idle for :data:`MIN_IDLE_TO_REPLACE_S`, and without one a ServiceError ``full`` says how long to wait."""
        replaced = None
        with self._lock:
            self._sweep()
            if len(self._sessions) >= self.settings.max_sessions:
                now = self.clock()
                idle = [(s.last_used, k) for k, s in self._sessions.items() if not s.busy()]
                oldest = min(idle, default=None)
                if oldest is None or now - oldest[0] < MIN_IDLE_TO_REPLACE_S:
                    wait = MIN_IDLE_TO_REPLACE_S - (now - oldest[0]) if oldest else MIN_IDLE_TO_REPLACE_S
                    raise ServiceError(
                        "full", f"The FastSAM3D server is full: {len(self._sessions)} sessions are open (its limit) "
                        f"and all were used within the last {MIN_IDLE_TO_REPLACE_S:.0f} s. Try again in a minute, "
                        "or ask its administrator to raise --max-sessions.", retry_after=max(1.0, wait))
                replaced = self._sessions.pop(oldest[1])
            session_id = secrets.token_urlsafe(16)
            state = SessionState(model, self.settings, clock=self.clock)
            self._sessions[session_id] = state
        if replaced is not None:
            replaced.close()  # frees its tensors; its client reopens a session at its next click
        return session_id, state

    def get(self, session_id: str) -> SessionState:
        """The live session (marked used now); ServiceError ``session_unknown`` if closed, expired or never made."""
        with self._lock:
            self._sweep()
            state = self._sessions.get(session_id)
            if state is None:
                raise ServiceError("session_unknown", "This session is not open on the server (it expired, or the "
                                   "server restarted); the client opens a new one.")
            state.last_used = self.clock()
            return state

    def close(self, session_id: str) -> bool:
        """Drop and close session ``session_id`` (waits for a click it runs); whether it existed."""
        with self._lock:
            state = self._sessions.pop(session_id, None)
        if state is not None:
            state.close()
        return state is not None

    def _sweep(self) -> None:
        now = self.clock()
        for session_id in [k for k, s in self._sessions.items()
                           if now - s.last_used > self.settings.idle_timeout_s and not s.busy()]:
            del self._sessions[session_id]


class SignedSessionIds:
    """Session ids that prove the deployment issued them: a random part, a dot, and its HMAC-SHA256 under ``key``.

    A Ray Serve replica makes a session's state for whatever id a request names (sessions are multiplexed models,
    see :mod:`.ray_serve`), so an invented id would take a place in its bounded session cache and evict a real
    session. Replicas share ``key`` and check an id before anything is made for it.
    """

    def __init__(self, key: bytes) -> None:
        self._key = bytes(key)

    def new(self) -> str:
        """A fresh session id signed with this deployment's key."""
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{self._mac(nonce)}"

    def issued(self, session_id: str) -> bool:
        """Whether ``session_id`` was made by :meth:`new` under this key (compared in constant time)."""
        nonce, _, mac = session_id.partition(".")
        return bool(nonce) and hmac.compare_digest(mac.encode("utf-8", "replace"), self._mac(nonce).encode())

    def _mac(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:32]


class RateLimiter:
    """Token bucket per client key: ``burst`` requests at once, then ``rate`` per second."""

    MAX_KEYS = 10000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self._buckets: "OrderedDict[str, Tuple[float, float]]" = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> Tuple[bool, float]:
        """(allowed, seconds to wait before the next request would be)."""
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.MAX_KEYS:
                self._buckets.popitem(last=False)
            return allowed, 0.0 if allowed else (1.0 - tokens) / self.rate


class UploadBudget:
    """Bytes of request bodies being received at once, in all (at most ``total``) and per client (a quarter).

    Each upload is held in memory until it is complete, so stalled uploads must not fill the server's memory,
    nor one client's stalled uploads shut out the others. A client holds an entry only while it uploads.
    """

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.receiving = 0
        self.per_client: Dict[str, int] = {}

    def take(self, client: str, size: int) -> None:
        """Count ``size`` bytes for ``client``; ServiceError ``rate_limited`` (nothing counted) when over budget."""
        if self.receiving + size > self.total or self.per_client.get(client, 0) + size > self.total // 4:
            raise ServiceError("rate_limited", "The server is receiving too many uploads at once; nothing was "
                               "changed. Click again in a moment.", retry_after=1.0)
        self.receiving += size
        self.per_client[client] = self.per_client.get(client, 0) + size

    def give_back(self, client: str, size: int) -> None:
        """The upload :meth:`take` counted has been read or dropped."""
        self.receiving -= size
        self.per_client[client] -= size
        if not self.per_client[client]:
            del self.per_client[client]
