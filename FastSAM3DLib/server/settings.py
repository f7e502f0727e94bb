"""Server settings with safe defaults, the token rule, and the client-independent limits (stdlib only)."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Tuple

from ..errors import FastSAM3DError
from . import protocol

TOKEN_ENV = "FASTSAM3D_SERVER_TOKEN"
MiB = 1024 * 1024


@dataclass
class ServerSettings:
    """Everything the server needs to know; every limit has a default that suits a small team on one GPU."""

    models: Tuple[str, ...] = ("fastsam3d",)  # "name" or "name=checkpoint-file"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    token_sha256: Optional[str] = None  # hex SHA-256 of the token (the token itself is never kept)
    max_sessions: int = 64  # open sessions on one server (or per replica on Ray); one per segment being edited
    idle_timeout_s: float = 30 * 60  # a session unused this long is closed (its user re-creates it transparently)
    max_upload_bytes: int = 24 * MiB  # one request body (a 128^3 float32 model input is 8 MiB before compression)
    rate_per_s: float = 20.0  # sustained requests per second per client address
    rate_burst: int = 40  # requests a client may send at once before the rate applies
    embeddings_per_session: int = 2  # image embeddings a session keeps (one per region)
    logits_per_session: int = 8  # former results a session keeps, so undo costs no upload
    max_steps: int = 64  # decoder runs in one click request (a region move replays its clicks)
    max_points: int = 256  # points in one decoder run
    threads: Optional[int] = None  # torch CPU threads (default: torch's own)
    trusted_proxies: Tuple[str, ...] = ()  # addresses whose X-Forwarded-For names the real client (none: ignored)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain data (for a Ray deployment's arguments): holds the token's hash, never the token."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ServerSettings":
        """Settings from :meth:`to_dict`'s output (e.g. after crossing to a Ray replica)."""
        data = dict(data)
        data["models"] = tuple(data.get("models") or ())
        data["trusted_proxies"] = tuple(data.get("trusted_proxies") or ())
        return cls(**data)

    def max_header_bytes(self) -> int:
        """The longest click header accepted: room for ``max_steps`` x ``max_points`` points written as floats
        (about 80 characters each with their label), plus the rest of the header."""
        from .protocol import MAX_HEADER_BYTES

        return max(MAX_HEADER_BYTES, 64 * 1024 + 80 * int(self.max_steps) * int(self.max_points))

    def limits(self) -> dict:
        """The limits a client may read (``/v1/info`` and a new session's reply)."""
        return {"max_sessions": self.max_sessions, "idle_timeout_s": self.idle_timeout_s,
                "max_upload_bytes": self.max_upload_bytes, "rate_per_s": self.rate_per_s,
                "rate_burst": self.rate_burst, "embeddings_per_session": self.embeddings_per_session,
                "logits_per_session": self.logits_per_session, "max_steps": self.max_steps,
                "max_points": self.max_points}

    def check(self) -> None:
        """FastSAM3DError saying what to change when the settings are unsafe or impossible."""
        if not self.models:
            raise FastSAM3DError("Serve at least one model (--model fastsam3d).")
        for name in ("max_sessions", "max_upload_bytes", "rate_burst", "embeddings_per_session",
                     "logits_per_session", "max_steps", "max_points"):
            if int(getattr(self, name)) < 1:
                raise FastSAM3DError(f"The server setting {name} must be at least 1, got {getattr(self, name)}.")
        if not 0 < self.idle_timeout_s < math.inf or not 0 < self.rate_per_s < math.inf:
            raise FastSAM3DError("The idle timeout and the request rate must be positive, finite numbers.")
        if not 0 <= int(self.port) <= 65535:
            raise FastSAM3DError(f"The port must be between 0 and 65535 (0: any free port), got {self.port}.")
        if self.threads is not None and int(self.threads) < 1:
            raise FastSAM3DError(f"--threads must be at least 1 (or left out: PyTorch's default), got "
                                 f"{self.threads}.")
        self.trusted_proxies = tuple(proxy_address(address) for address in self.trusted_proxies)
        if self.token_sha256 is None and not is_loopback(self.host):
            raise FastSAM3DError(
                f"Refusing to listen on {self.host} without a token: anyone who reaches this machine could use "
                f"it. Put a long random token in the environment variable {TOKEN_ENV} or in a file given with "
                "--token-file (e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\"), and give "
                "the same token to the users; or listen on 127.0.0.1 only behind a reverse proxy.")


def is_loopback(host: str) -> bool:
    """True when ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def proxy_address(address: str) -> str:
    """``address`` in its canonical spelling, or FastSAM3DError when it is not one IP address.

    A trusted proxy's ``X-Forwarded-For`` header decides which client a request is counted against by the rate
    limit, so only exact addresses are accepted (no names, no networks, no ``*``).
    """
    try:
        return str(ipaddress.ip_address(str(address).strip().strip("[]")))
    except ValueError:
        raise FastSAM3DError(f"--trusted-proxy takes the IP address of the reverse proxy that forwards requests "
                             f"(e.g. 127.0.0.1 when it runs on this computer), got {address!r}.") from None


def uvicorn_proxy_options(settings: ServerSettings) -> dict:
    """uvicorn's options for ``X-Forwarded-For``: read only from the trusted proxies, ignored without any.

    Without them every request is counted against the address it came from, so a user who can reach the port
    directly (on this computer, or through an SSH tunnel) cannot pose as other clients to escape the rate limit.
    """
    proxies = list(settings.trusted_proxies)
    return {"proxy_headers": bool(proxies), "forwarded_allow_ips": proxies or None}


def uvicorn_options(settings: ServerSettings) -> dict:
    """uvicorn's options for this server: :func:`uvicorn_proxy_options`, and the h11 HTTP parser, which refuses
    a request line or header block over 16 KiB (uvicorn's default parser read a 64 MiB URL, blocking every
    other request for seconds, and 200 MiB of headers, before any token was checked), with a deadline for
    each request head (:mod:`.http_protocol`)."""
    from .http_protocol import HeadDeadlineProtocol  # imports uvicorn: only where the server runs

    return {"http": HeadDeadlineProtocol, **uvicorn_proxy_options(settings)}


def hash_token(token: str) -> str:
    """Hex SHA-256 of a token (what the server keeps and compares)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token_sha256: Optional[str], authorization: Optional[str]) -> bool:
    """True when no token is set, or ``authorization`` is ``Bearer <the token>`` (constant-time compare)."""
    if token_sha256 is None:
        return True
    if not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(hash_token(authorization[len("Bearer "):].strip()), token_sha256)


def read_token(token_file: Optional[str] = None, environ=None) -> Optional[str]:
    """The token from ``token_file`` (first line) or the environment variable; None when neither is set.

    FastSAM3DError for an unreadable file, a token shorter than 16 characters (easy to guess) or one that is not
    printable ASCII without spaces (:func:`.protocol.token_is_sendable`).
    """
    environ = os.environ if environ is None else environ
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            raise FastSAM3DError(f"Cannot read a token from {token_file} ({exc}). Write the token on the file's "
                                 "first line.") from None
    else:
        token = (environ.get(TOKEN_ENV) or "").strip()
        if not token:
            return None
    if len(token) < 16:
        raise FastSAM3DError("The server token is shorter than 16 characters, which is easy to guess: use a long "
                             "random one (python -c \"import secrets; print(secrets.token_urlsafe(32))\").")
    if not protocol.token_is_sendable(token):
        raise FastSAM3DError("The server token holds spaces or characters other than ASCII letters, digits and "
                             "punctuation, which an HTTP header cannot carry unchanged: use a random one (python -c "
                             "\"import secrets; print(secrets.token_urlsafe(32))\").")
    return token
