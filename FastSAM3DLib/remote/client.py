"""The HTTP client of a FastSAM3D server and the errors its refusals become (standard library + numpy).

The token comes from the ``token`` argument or the ``FASTSAM3D_TOKEN`` environment variable, is sent only in
the ``Authorization`` header and kept only in memory, never written anywhere (keep it out of the MRML scene).
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.parse
from typing import Dict, Optional, Tuple

import numpy as np

from ..errors import FastSAM3DError, InputImageError, ModelOutputError, OutOfMemoryError, PromptError  # noqa: F401
from ..files import parse_json
from ..server import protocol

TOKEN_ENV = "FASTSAM3D_TOKEN"


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


_ERRORS = {"protocol": ProtocolMismatchError, "not_found": ProtocolMismatchError, "unauthorized": ServerAuthError,
           "full": ServerFullError, "rate_limited": ServerBusyError, "prompt": PromptError,
           "input_image": InputImageError, "model_output": ModelOutputError, "out_of_memory": OutOfMemoryError,
           "model_unavailable": ModelUnavailableError}


def _tls_advice(exc: ssl.SSLError) -> str:
    """What to do about a failed TLS connection, from OpenSSL's reason."""
    code = getattr(exc, "verify_code", None)
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return "The server's certificate has expired: ask its administrator to renew it."
    if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH (also an IP address the certificate does not name)
        return ("The certificate is not made for this address: use the host name it names (ask the "
                "administrator), not an IP address or another name.")
    if getattr(exc, "reason", None) in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                                          "HTTP_REQUEST"):
        return "This address answers plain HTTP, not HTTPS: write it with http:// (or ask for the HTTPS address)."
    return ("If the server uses a certificate of your institution, add that authority to this computer's "
            "certificates (or give the client an ssl_context).")


class SessionLost(Exception):
    """The server no longer knows the session (restart, expiry): open a new one."""


class StateMissing(Exception):
    """The server lacks parts of the session's state (``missing``): send them again."""

    def __init__(self, missing) -> None:
        super().__init__(missing)
        self.missing = list(missing)


#: Longest reply body read from a server: a click's reply is about 130 KiB (the 32^3 low-resolution logits),
#: the JSON replies a few KiB.
MAX_REPLY_BYTES = 16 * 2 ** 20


class _ConnectTimeout(TimeoutError):
    """No connection within ``connect_timeout`` (the server's host drops the attempt, or is unreachable)."""


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
        if self._token is not None and not protocol.token_is_sendable(self._token):
            raise ServerAuthError("The server token holds spaces or characters other than ASCII letters, digits and "
                                  "punctuation, so it cannot be the server's: copy the token its administrator gave "
                                  "you again.")
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
        problem = _session_reply_problem(reply)
        if problem:
            raise ServerError(f"The server at {self.url} sent a malformed reply to a new session ({problem}); "
                              "nothing was changed. Is this the address of a FastSAM3D server of the same version?")
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
        except (ServerError, SessionLost):
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
                        f"The secure connection to the FastSAM3D server at {self.url} failed ({exc}). "
                        f"{_tls_advice(exc)} Nothing was changed.") from None
                if isinstance(exc, _ConnectTimeout):
                    raise ServerUnavailableError(
                        f"No connection to the FastSAM3D server at {self.url} within {self.connect_timeout:g} s. "
                        "Nothing was changed; check the address, this computer's network (VPN, firewall) and that "
                        "the server runs, then click again.") from None
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
        hint = " If the server serves HTTPS, the address starts with https://." if self.url.startswith("http:") and \
            last and last.startswith(("RemoteDisconnected", "BadStatusLine", "ConnectionResetError")) else ""
        raise ServerUnavailableError(f"The FastSAM3D server at {self.url} cannot be reached ({last}). Nothing was "
                                     f"changed; check the address and that the server runs, then click again.{hint}")

    def _send(self, method, path, body, headers, timeout):
        if self._conn is None:
            if self._https:
                context = self.ssl_context or ssl.create_default_context()
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.connect_timeout,
                                                   context=context)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
            try:
                conn.connect()
            except (TimeoutError, socket.timeout) as exc:
                raise _ConnectTimeout(str(exc)) from None
            self._conn = conn
        self._conn.sock.settimeout(timeout or self.timeout)
        self._conn.request(method, path, body=body, headers=headers)
        response = self._conn.getresponse()
        try:
            data = _read_reply(response, timeout or self.timeout)
        except ServerError:
            self.close()
            raise
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
            raise SessionLost(message)
        if code == "missing":
            raise StateMissing(error.get("missing") or [])
        raise _ERRORS.get(code, ServerError)(message or f"The server refused the request ({code}).")

    @staticmethod
    def _json(data: bytes) -> dict:
        try:
            return protocol.loads_json(data)
        except protocol.FrameError as exc:
            raise ServerError(f"The server's reply is not FastSAM3D JSON ({exc}).") from None


def _read_reply(response: http.client.HTTPResponse, seconds: float) -> bytes:
    """The body of ``response``, read within ``seconds`` (``socket.timeout`` after that: the socket's own timeout
    bounds each read, not a reply that trickles in for ever) and at most :data:`MAX_REPLY_BYTES` long (ServerError
    beyond: a reply that large is no FastSAM3D reply, and reading it could fill this computer's memory)."""
    declared = response.getheader("content-length") or ""
    if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
        raise ServerError(_too_long_reply(int(declared)))
    deadline = time.monotonic() + seconds
    chunks, size = [], 0
    while True:
        chunk = response.read1(1 << 16)
        if not chunk:
            response.close()  # as read() does at the end: the kept-alive connection can carry the next request
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise ServerError(_too_long_reply(size))
        if time.monotonic() > deadline:
            raise socket.timeout("the reply did not arrive in time")
        chunks.append(chunk)


def _too_long_reply(size: int) -> str:
    return (f"The server sent a reply of {size / 2 ** 20:.0f} MiB or more, over the {MAX_REPLY_BYTES // 2 ** 20} "
            "MiB a FastSAM3D reply can need; nothing was changed. Is this the address of a FastSAM3D server?")


def _session_reply_problem(reply: dict) -> Optional[str]:
    """What is wrong with a new session's reply (None: nothing), so that a broken or foreign server gives a
    ServerError rather than a KeyError or ValueError deep in the session."""
    model, limits = reply.get("model"), reply.get("limits", {})
    if not isinstance(reply.get("session"), str) or not reply["session"]:
        return "no session id"
    if not isinstance(model, dict):
        return "no model description"
    size, spacing = model.get("image_size"), model.get("spacing_mm")
    if not _is_int(size) or not 16 <= size <= 1024 or size % 4:
        return f"image_size {size!r}"
    if not isinstance(spacing, (int, float)) or isinstance(spacing, bool) or not 0 < spacing < 100:
        return f"spacing_mm {spacing!r}"
    if not isinstance(model.get("default_prompt_mode"), str):
        return "no default prompt mode"
    if not isinstance(limits, dict) or not all(_is_int(v) or isinstance(v, float) for v in limits.values()):
        return "limits that are not numbers"
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _error_json(data: bytes) -> Optional[dict]:
    try:
        value = parse_json(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) and "error" in value else None
