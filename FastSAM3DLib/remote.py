"""Segment with a FastSAM3D server instead of a local model: :class:`RemoteSession` (numpy + standard library).

``RemoteSession(url, model, volume)`` behaves like :class:`FastSAM3DLib.session.InteractiveSession` (``add_click``,
``undo``, ``reset``, ``set_image``, ``full_mask``, ``clicks``, ``roi``, ``low_res_logits``) and gives bit for bit
the same results as a local session with the same model on this computer, because the geometry never leaves
the workstation: the client chooses the region, cuts and normalises the 128^3 model input with the library's
geometry code, sends only that (float32, losslessly compressed) and the clicks in model voxel coordinates, gets
back the 32^3 low-res logits and pastes them back itself. PyTorch is not needed (see :func:`library_geometry`).
No file name, DICOM header, patient position or voxel outside the region goes over the wire; nothing is pickled.

Failures never change the session: a refused or failed click raises (the same errors as a local session for
bad input, :class:`ServerError` subclasses for the server's refusals) and leaves clicks, result and undo history
exactly as they were. When the server restarted, expired the session, or Ray moved it to another replica, the
client opens a new session and sends the region and its last logits again: one slower click, same result.

Growth over several regions (``InteractiveSession(..., grow=...)``, :mod:`FastSAM3DLib.growth`) is not mirrored
here: a remote session segments one 128^3 region per click, as a local session without growth does.

The token comes from the ``token`` argument or the ``FASTSAM3D_TOKEN`` environment variable, is sent only in
the ``Authorization`` header and kept only in memory, never written anywhere (keep it out of the MRML scene).
"""
from __future__ import annotations

import http.client
import json
import os
import platform
import socket
import ssl
import sys
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import geometry
from .errors import FastSAM3DError, InputImageError, OutOfMemoryError, PromptError
from .geometry import RegionOfInterest, Volume
from .server import protocol

Region = Tuple[slice, slice, slice]
TOKEN_ENV = "FASTSAM3D_TOKEN"
PROMPT_MODES = ("newest", "all")
ROI_MARGIN_VOXELS = 8.0  # as session.ROI_MARGIN_VOXELS
MAX_CACHED_REGIONS = 8  # as session.MAX_CACHED_REGIONS
MAX_ATTEMPTS = 4  # one click: a lean request, then at most a new session and resends


# ---------------------------------------------------------------------------------------------- errors
class ServerError(FastSAM3DError):
    """The FastSAM3D server refused or failed a request; nothing was changed."""


class ServerUnavailableError(ServerError):
    """The server cannot be reached (down, restarting, wrong address, network) or did not answer in time."""


class ServerAuthError(ServerError):
    """The server refused the token (missing or wrong)."""


class ServerFullError(ServerError):
    """The server has no room for another session right now."""


class ServerBusyError(ServerError):
    """Too many requests from this computer: wait a moment."""


class ProtocolMismatchError(ServerError):
    """Client and server speak different protocol versions (or the URL is not a FastSAM3D server)."""


class ModelUnavailableError(ServerError):
    """The server does not serve the requested model."""


class ModelOutputError(FastSAM3DError):
    """The model produced NaN or infinite numbers for a click; nothing was changed."""


_ERRORS = {"protocol": ProtocolMismatchError, "not_found": ProtocolMismatchError, "unauthorized": ServerAuthError,
           "full": ServerFullError, "rate_limited": ServerBusyError, "prompt": PromptError,
           "input_image": InputImageError, "model_output": ModelOutputError, "out_of_memory": OutOfMemoryError,
           "model_unavailable": ModelUnavailableError}


class _SessionLost(Exception):
    """The server no longer knows the session (restart, expiry): open a new one."""


class _Missing(Exception):
    """The server lacks parts of the session's state (``missing``): send them again."""

    def __init__(self, missing) -> None:
        super().__init__(missing)
        self.missing = list(missing)


def is_server_url(device) -> bool:
    """True when ``device`` names a FastSAM3D server (``http://...`` or ``https://...``) rather than a torch device."""
    return isinstance(device, str) and device.strip().lower().startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------- HTTP client
class ServerClient:
    """Requests to one FastSAM3D server over one kept-alive HTTP(S) connection.

    ``url``: ``http://host:port`` or ``https://host[/prefix]`` (behind a reverse proxy). ``token``: the server's
    token (default: ``$FASTSAM3D_TOKEN``). ``ssl_context``: for a private certificate authority. Transient
    failures (connection refused or reset, a proxy's or Ray's 5xx without a FastSAM3D error) are retried
    ``retries`` times after ``backoff_s``, 2x, 3x... seconds (about 3 s in all: long enough for Ray Serve to
    route around a dead replica); an idle connection the server closed is reopened at once; a request that
    gets no answer within ``timeout`` seconds is not retried.
    """

    def __init__(self, url: str, token: Optional[str] = None, timeout: float = 120.0, connect_timeout: float = 10.0,
                 ssl_context: Optional[ssl.SSLContext] = None, retries: int = 3, backoff_s: float = 0.5) -> None:
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ServerError(f"'{url}' is not a server address: write it as http://host:port or https://host.")
        if parsed.username or parsed.password or parsed.query:
            raise ServerError("Give the server address without user, password or query (the token goes in the "
                              "token setting, never in the address).")
        self.url = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname, parsed.port
        self._prefix = parsed.path.rstrip("/")
        self._token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self.ssl_context = ssl_context
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        self._conn: Optional[http.client.HTTPConnection] = None
        self.protocol = protocol.PROTOCOL_VERSION  # the version this client speaks
        self.last_replica: Optional[str] = None

    def __repr__(self) -> str:  # never shows the token
        return f"ServerClient({self.url!r})"

    # -- endpoints
    def info(self) -> dict:
        """``/v1/info``: protocol, server version, models, limits."""
        return self._json(self.request("GET", "/v1/info"))

    def create_session(self, model: str) -> dict:
        """A new session for ``model``: ``{"session", "model": {...}, "limits": {...}}``."""
        reply = self._json(self.request("POST", "/v1/sessions", json.dumps({"model": model}).encode(),
                                        content_type="application/json", timeout=max(self.timeout, 600.0)))
        if reply.get("protocol") != self.protocol:
            raise ProtocolMismatchError(f"The server at {self.url} speaks protocol {reply.get('protocol')}; this "
                                        f"client speaks {self.protocol}. Install the same FastSAM3D "
                                        "version on the workstation and on the server.")
        return reply

    def click(self, session_id: str, frame: bytes, model_size: int) -> Tuple[dict, Dict[str, np.ndarray]]:
        """One click request; (reply header, {"logits": float32 array})."""
        data = self.request("POST", f"/v1/sessions/{session_id}/click", frame, content_type=protocol.FRAME_TYPE,
                            session=session_id)
        low = model_size // 4
        try:
            header, arrays = protocol.unpack(data, {"logits": ("float32", (low, low, low))})
        except protocol.FrameError as exc:
            raise ServerError(f"The server at {self.url} sent a malformed reply ({exc}); nothing was changed.") \
                from None
        if "logits" not in arrays or not np.isfinite(arrays["logits"]).all() or not isinstance(
                header.get("logits_id"), str):
            raise ServerError(f"The server at {self.url} sent an incomplete reply; nothing was changed.")
        return header, arrays

    def close_session(self, session_id: str) -> None:
        """Close a session on the server (errors ignored: it expires anyway)."""
        try:
            self.request("DELETE", f"/v1/sessions/{session_id}", session=session_id, retries=0)
        except (ServerError, _SessionLost):
            pass

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- transport
    def request(self, method: str, path: str, body: Optional[bytes] = None, content_type: Optional[str] = None,
                session: Optional[str] = None, timeout: Optional[float] = None, retries: Optional[int] = None) -> bytes:
        """The reply body of a 2xx answer; the matching error otherwise (see the module's error classes)."""
        headers = {protocol.PROTOCOL_HEADER: str(self.protocol), "Accept": "*/*"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if content_type:
            headers["Content-Type"] = content_type
        if session:
            headers[protocol.SESSION_HEADER] = session
        retries = self.retries if retries is None else retries
        last: Optional[str] = None
        attempt = 0
        while attempt <= retries:
            reused = self._conn is not None
            try:
                status, reply_headers, data = self._send(method, self._prefix + path, body, headers, timeout)
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, closed keep-alive
                self.close()
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if isinstance(exc, ssl.SSLError):
                    raise ServerUnavailableError(
                        f"The secure connection to the FastSAM3D server at {self.url} failed ({exc}). If the server "
                        "uses a certificate of your institution, add that authority to this computer's certificates "
                        "(or give the client an ssl_context). Nothing was changed.") from None
                if isinstance(exc, (TimeoutError, socket.timeout)):
                    raise ServerUnavailableError(
                        f"The FastSAM3D server at {self.url} did not answer within {timeout or self.timeout:.0f} s. "
                        "Nothing was changed; it may be overloaded: click again, or ask its administrator.") from None
                if reused:
                    continue  # the server closed an idle kept-alive connection: reconnect at once
                attempt += 1
                if attempt <= retries:
                    time.sleep(self.backoff_s * attempt)
                continue
            self.last_replica = reply_headers.get(protocol.REPLICA_HEADER.lower(), self.last_replica)
            if 200 <= status < 300:
                return data
            error = _error_json(data)
            if error is None and status in (500, 502, 503, 504):  # a proxy or Ray's router, not our app
                last = f"HTTP {status}"
                attempt += 1
                if attempt <= retries:
                    time.sleep(self.backoff_s * attempt)
                continue
            self._raise(status, error, path)
        raise ServerUnavailableError(f"The FastSAM3D server at {self.url} cannot be reached ({last}). Nothing was "
                                     "changed; check the address and that the server runs, then click again.")

    def _send(self, method, path, body, headers, timeout):
        if self._conn is None:
            if self._https:
                context = self.ssl_context or ssl.create_default_context()
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.connect_timeout,
                                                   context=context)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
            conn.connect()
            self._conn = conn
        self._conn.sock.settimeout(timeout or self.timeout)
        self._conn.request(method, path, body=body, headers=headers)
        response = self._conn.getresponse()
        data = response.read()
        reply_headers = {k.lower(): v for k, v in response.getheaders()}
        if response.will_close:
            self.close()
        return response.status, reply_headers, data

    def _raise(self, status: int, error: Optional[dict], path: str):
        if error is None and status == 413:
            raise ServerError(f"The server at {self.url} (or a reverse proxy in front of it) refused the request as "
                              "too large (HTTP 413); nothing was changed. Its administrator should raise the proxy's "
                              "body size limit (nginx: client_max_body_size 32m).")
        if error is None:
            raise ServerError(f"The server at {self.url} answered HTTP {status} to {path} without a FastSAM3D "
                              "error: is this the address of a FastSAM3D server? Nothing was changed.")
        code, message = error.get("error"), str(error.get("message") or "")
        if code == "session_unknown":
            raise _SessionLost(message)
        if code == "missing":
            raise _Missing(error.get("missing") or [])
        raise _ERRORS.get(code, ServerError)(message or f"The server refused the request ({code}).")

    @staticmethod
    def _json(data: bytes) -> dict:
        try:
            return protocol.loads_json(data)
        except protocol.FrameError as exc:
            raise ServerError(f"The server's reply is not FastSAM3D JSON ({exc}).") from None


def _error_json(data: bytes) -> Optional[dict]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) and "error" in value else None


# ---------------------------------------------------------------------------------------------- geometry
def library_geometry() -> bool:
    """Whether the library's own geometry functions run here (they resample with PyTorch when it is installed).

    With them the client cuts and pastes exactly as a local session on this computer does. Without PyTorch
    the client uses the SimpleITK reference path below (the local session's ``FASTSAM3D_RESAMPLE=sitk``);
    the two give the same masks except for a voxel whose value ties the threshold within float rounding.
    """
    global _LIBRARY_GEOMETRY
    if _LIBRARY_GEOMETRY is None:
        try:
            import importlib

            importlib.import_module(f"{__package__}.resample")
            _LIBRARY_GEOMETRY = True
        except Exception:  # no torch (or a broken one): the SimpleITK path needs none
            _LIBRARY_GEOMETRY = False
    return _LIBRARY_GEOMETRY


_LIBRARY_GEOMETRY: Optional[bool] = None


def model_input(volume: Volume, roi: RegionOfInterest) -> np.ndarray:
    """The float32 (x, y, z) model input of ``roi``: :func:`geometry.extract_model_input`, or its SimpleITK path."""
    if library_geometry():
        return geometry.extract_model_input(volume, roi)
    import SimpleITK as sitk

    values = np.ascontiguousarray(geometry._resample_onto(volume, roi, sitk.sitkLinear), dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise InputImageError(
            "The region around the points contains NaN or infinite voxels. Replace them with a finite value "
            "(e.g. the image minimum) before segmenting."
        )
    return geometry._masked_z_normalise(values)


def paste_back(volume: Volume, roi: RegionOfInterest, low: np.ndarray):
    """``(region, mask)`` of the low-res logits ``low``: :func:`geometry.paste_back`, or its SimpleITK path fed
    with :func:`upsample_logits` (the official upsampling, bit for bit as torch computes it on a CPU)."""
    if library_geometry():
        return geometry.paste_back(volume, roi, low)
    import SimpleITK as sitk

    field_ = upsample_logits(low, roi.size[0])
    size = np.asarray(roi.size, dtype=np.float64)
    first, stop = geometry._source_box(volume, roi, -0.5, size - 0.5)
    region = tuple(slice(int(first[axis]), int(stop[axis])) for axis in (2, 1, 0))
    mask = np.zeros(tuple(int(stop[axis] - first[axis]) for axis in (2, 1, 0)), dtype=bool)
    above = field_ > 0.0
    positive = [np.flatnonzero(np.any(above, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if mask.size == 0 or any(len(p) == 0 for p in positive):
        return region, mask
    low_xyz = np.maximum([p[0] - 1.0 for p in positive], -0.5)
    high_xyz = np.minimum([p[-1] + 1.0 for p in positive], size - 0.5)
    box_first, box_stop = geometry._source_box(volume, roi, low_xyz, high_xyz)
    box_first, box_stop = np.maximum(box_first, first), np.maximum(np.minimum(box_stop, stop), box_first)
    if np.any(box_stop <= box_first):
        return region, mask
    crop_first = np.maximum([p[0] - 1 for p in positive], 0)
    crop_stop = np.minimum([p[-1] + 2 for p in positive], roi.size)
    crop = field_[crop_first[0]:crop_stop[0], crop_first[1]:crop_stop[1], crop_first[2]:crop_stop[2]]
    image = geometry._sitk_image(np.ascontiguousarray(crop.transpose(2, 1, 0)),
                                 roi.model_to_ras @ geometry._translation(crop_first))
    values = geometry._resample(image, volume.ijk_to_ras @ geometry._translation(box_first), box_stop - box_first,
                                sitk.sitkLinear, -np.inf, sitk.sitkFloat32)
    offset = box_first - first
    box = tuple(slice(int(offset[axis]), int(offset[axis] + box_stop[axis] - box_first[axis])) for axis in (2, 1, 0))
    mask[box] = values > 0.0
    return region, mask


def upsample_logits(low: np.ndarray, size: int, fused: Optional[bool] = None) -> np.ndarray:
    """``F.interpolate(low, size, mode="trilinear", align_corners=False)`` of a (n, n, n) float32 array, bit for
    bit as torch's CPU kernel computes it: W, then H, then D, each ``t0 * w0 + t1 * w1`` in float32, with the
    fused multiply-add of the AVX2/AVX-512 builds (``fused``; default :func:`torch_cpu_fuses`) emulated exactly."""
    fused = torch_cpu_fuses() if fused is None else fused
    out = np.asarray(low, dtype=np.float32)
    for axis in (2, 1, 0):
        out = _linear_axis(out, axis, size, fused)
    return out


def _linear_weights(n_in: int, n_out: int):
    """torch's linear resize indices and weights (align_corners=False), in float32 as its kernel computes them."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (np.float32(1) - l1).astype(np.float32), l1


def _linear_axis(a: np.ndarray, axis: int, n_out: int, fused: bool) -> np.ndarray:
    i0, i1, w0, w1 = _linear_weights(a.shape[axis], n_out)
    shape = [1] * a.ndim
    shape[axis] = n_out
    t0, t1 = np.take(a, i0, axis=axis), np.take(a, i1, axis=axis)
    w0, w1 = w0.reshape(shape), w1.reshape(shape)
    if fused:
        return _fma32(t0, w0, t1 * w1)
    return t0 * w0 + t1 * w1


_MIDPOINT = np.uint64(1 << 28)
_LOW_29_BITS = np.uint64((1 << 29) - 1)


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``fma(a, b, c)``, correctly rounded, for float32 ``a, c`` and weights ``b`` of a few bits.

    ``a * b`` is exact in float64, so the float64 sum ``s`` is off the exact sum by at most half a float64 ulp;
    rounding ``s`` to float32 is then correct unless ``s`` lies exactly halfway between two float32 numbers
    (or is tiny): only there the exact error (TwoSum) decides the direction.
    """
    p = a.astype(np.float64)
    p *= b
    s = p + c
    r = s.astype(np.float32)
    suspect = (s.view(np.uint64) & _LOW_29_BITS) == _MIDPOINT
    suspect |= (np.abs(s) < 2.0 ** -125) & (s != 0)
    idx = np.flatnonzero(suspect)
    if idx.size:
        ps, cs, ss = p.ravel()[idx], c.ravel()[idx].astype(np.float64), s.ravel()[idx]
        bb = ss - ps
        error = (ps - (ss - bb)) + (cs - bb)  # s + error == p + c exactly
        rv = r.ravel()[idx]
        lo = np.where(rv.astype(np.float64) <= ss, rv, np.nextafter(rv, np.float32(-np.inf)))
        hi = np.nextafter(lo, np.float32(np.inf))
        half = (lo.astype(np.float64) + hi.astype(np.float64)) / 2 == ss
        nudged = np.nextafter(ss, np.where(error > 0, np.inf, -np.inf))
        r.ravel()[idx] = np.where(half & (error != 0), nudged, ss).astype(np.float32)
    return r


def torch_cpu_fuses() -> bool:
    """Whether torch's CPU upsampling kernel on this computer uses fused multiply-adds (AVX2/AVX-512 builds).

    ``$FASTSAM3D_UPSAMPLE`` (``fma`` or ``plain``) overrides; then ``$ATEN_CPU_CAPABILITY``, an imported torch's
    own answer, the CPU's AVX2 flag on x86; other CPUs (ARM) are assumed to fuse, as their compilers do.
    """
    override = os.environ.get("FASTSAM3D_UPSAMPLE", "").strip().lower()
    if override in ("fma", "plain"):
        return override == "fma"
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if capability:
        return capability != "default"
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return torch.backends.cpu.get_cpu_capability().lower() != "default"
        except Exception:
            pass
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
        return _x86_has_avx2()
    return True


def _x86_has_avx2() -> bool:
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
                for line in info:
                    if line.startswith("flags"):
                        flags = line.split()
                        return "avx2" in flags and "fma" in flags
        elif sys.platform == "darwin":
            import subprocess
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.leaf7_features"], capture_output=True, text=True,
                                 timeout=5).stdout
            return "AVX2" in out.upper()
        elif sys.platform == "win32":
            import ctypes
            return bool(ctypes.windll.kernel32.IsProcessorFeaturePresent(40))  # PF_AVX2_INSTRUCTIONS_AVAILABLE
    except Exception:
        pass
    return True


# ---------------------------------------------------------------------------------------------- the session
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
    """

    def __init__(self, url: Optional[str] = None, model: str = "fastsam3d", volume: Optional[Volume] = None,
                 prompt_mode: Optional[str] = None, token: Optional[str] = None,
                 client: Optional[ServerClient] = None) -> None:
        if client is None and url is None:
            raise ServerError("Give the server address (url) or a ServerClient.")
        if prompt_mode is not None and prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
        self.client = client or ServerClient(url, token)
        self.model_name = model
        self._session_id: Optional[str] = None
        self._open()
        self.prompt_mode = prompt_mode or self.config["default_prompt_mode"]
        self._next_key = 0
        self.volume: Optional[Volume] = None
        self.reset()
        if volume is not None:
            self.set_image(volume)

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

    @property
    def roi(self) -> Optional[RegionOfInterest]:
        """The region of interest the model currently sees (None before the first click)."""
        return self._state.roi

    @property
    def low_res_logits(self) -> Optional[np.ndarray]:
        """The current low-res logits ``(1, 1, 32, 32, 32)`` as a float32 numpy array (None before a click)."""
        return self._state.logits

    # ----------------------------------------------------------------- clicks
    def add_click(self, ras, include: bool = True) -> ClickResult:
        """Add an include (or exclude) point in RAS mm and return the updated mask of the changed region.

        Raises what a local session raises for bad input (PromptError, InputImageError), ModelOutputError,
        OutOfMemoryError, or a :class:`ServerError` for the server's refusals; any of them changes nothing.
        """
        if self.volume is None:
            raise PromptError("Load an image first (set_image) before clicking.")
        click = Click(_point(ras), bool(include))
        geometry.roi_around(self.volume, click.ras[None], self.size, self.spacing)  # validates: raises if outside
        if not include and not any(c.include for c in self.clicks):
            raise PromptError("Start with an include point (left click) inside the object; exclude points "
                              "(Shift+click) only refine an existing result.")
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
        """Remove the last click; the result is the mask exactly as it was before that click (no server call)."""
        if not self.clicks:
            raise PromptError("There is no click to undo.")
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
            while len(self._keys) > 4 * MAX_CACHED_REGIONS:
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
            points = roi.ras_to_model(np.stack([c.ras for c in prompt]))
            steps.append({"points": points.tolist(), "labels": [1 if c.include else 0 for c in prompt]})
            fed.append(click)
        if not steps:
            return base, False
        key = self._key(roi)
        image: Optional[np.ndarray] = None
        force_image = force_logits = False
        for _ in range(MAX_ATTEMPTS):
            send_image = force_image or key not in self._server_embeddings
            send_logits = base.logits is not None and (force_logits or base.logits_id not in self._server_logits)
            arrays = {}
            start = time.perf_counter()
            if send_image:
                if image is None:
                    image = model_input(self.volume, roi)
                arrays["image"] = image
            if send_logits:
                arrays["previous_logits"] = base.logits.reshape(base.logits.shape[-3:])
            header = {"model": self.model_name, "embedding": key, "steps": steps,
                      "previous": None if base.logits is None or send_logits else base.logits_id}
            frame = protocol.pack(header, arrays, codecs={"image": "zlib"})
            timings["prepare"] = timings.get("prepare", 0.0) + time.perf_counter() - start
            if self._max_upload is not None and len(frame) > self._max_upload:
                raise ServerError(_too_large(self._max_upload))
            start = time.perf_counter()
            try:
                reply, reply_arrays = self.client.click(self._session_id, frame, self.size)
            except _SessionLost:
                self._open()  # a new, empty session: everything is sent again
                continue
            except _Missing as missing:
                force_image = force_image or "image" in missing.missing
                force_logits = force_logits or "previous_logits" in missing.missing
                if "image" in missing.missing:
                    self._server_embeddings.pop(key, None)
                if "previous_logits" in missing.missing and base.logits_id is not None:
                    self._server_logits.pop(base.logits_id, None)
                continue
            finally:
                timings["network"] = timings.get("network", 0.0) + time.perf_counter() - start
            server = reply.get("timings") or {}
            for name in ("encode", "decode"):
                if isinstance(server.get(name), (int, float)):
                    timings[name] = float(server[name])
                    timings["network"] -= float(server[name])
            self._mirror(self._server_embeddings, key, self._embedding_slots)
            if base.logits_id is not None and not send_logits and base.logits_id in self._server_logits:
                self._server_logits.move_to_end(base.logits_id)
            self._mirror(self._server_logits, reply["logits_id"], self._logits_slots)
            logits = reply_arrays["logits"].reshape((1, 1) + reply_arrays["logits"].shape)
            iou = float(reply.get("iou", float("nan")))
            return _State(roi, tuple(fed), logits, iou, reply["logits_id"]), bool(reply.get("encoded"))
        raise ServerUnavailableError(f"The FastSAM3D server at {self.client.url} kept losing this session's state "
                                     "(is it restarting?). Nothing was changed; click again in a moment.")

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
            region, mask = _empty_region(), None
        union = _union(region, self._shown_region)
        full = np.zeros(tuple(s.stop - s.start for s in union), dtype=bool)
        if mask is not None:
            full[tuple(slice(r.start - u.start, r.stop - u.start) for r, u in zip(region, union))] = mask
        timings["paste"] = time.perf_counter() - start
        return ClickResult(union, full, state.iou, encoded, timings), (region if mask is not None else None)


def _point(ras) -> np.ndarray:
    """``ras`` as three finite float64 numbers; a PromptError saying what is wrong otherwise (as the session's)."""
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


def _too_large(limit: int) -> str:
    """As the server's message (``server.app.too_large_message``), which this module cannot import."""
    return (f"The request is larger than the server's upload limit of {limit / 2 ** 20:.3g} MiB; nothing was "
            "changed. Ask the administrator to raise --max-upload-mb.")


def _empty_region() -> Region:
    return (slice(0, 0), slice(0, 0), slice(0, 0))


def _union(a: Region, b: Optional[Region]) -> Region:
    if b is None or all(s.stop <= s.start for s in b):
        return a
    if all(s.stop <= s.start for s in a):
        return b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))
