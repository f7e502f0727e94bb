"""The ASGI app (Starlette): protocol check, token, rate limit, upload limit, then the backend does the work.

``create_app(settings)`` serves the models of one process (``uvicorn``); :mod:`.ray_serve` builds the same app
around Ray Serve's multiplexed sessions. Every refusal is a JSON error whose message tells the user what to do.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Optional

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import engine, protocol
from .sessions import RateLimiter, ServiceError, SessionStore, UploadBudget
from .settings import ServerSettings, token_matches

log = logging.getLogger("FastSAM3DLib.server")


class LocalBackend:
    """Sessions of one server process: a :class:`SessionStore` (count limit, idle expiry)."""

    def __init__(self, settings: ServerSettings, pool: Optional[engine.ModelPool] = None) -> None:
        self.settings = settings
        self.pool = pool or engine.ModelPool(settings)
        self.store = SessionStore(settings)
        self.replica = f"pid-{os.getpid()}"

    async def create(self, model: str) -> str:
        """A new session for ``model``; returns its id."""
        return (await run_in_threadpool(self.store.create, model))[0]  # may wait for a click of a replaced one

    async def state(self, session_id: str, request: Request):
        """The state of session ``session_id`` (a ServiceError when it is unknown or expired)."""
        return self.store.get(session_id)

    async def close(self, session_id: str) -> None:
        """Forget session ``session_id`` (nothing happens when it is unknown)."""
        await run_in_threadpool(self.store.close, session_id)  # may wait for a click the session runs


#: Clicks of one session that may wait for it at once (a client sends one at a time; more only pile up threads).
MAX_QUEUED_CLICKS = 4
#: Largest body of a request that carries no arrays (a new session's ``{"model": ...}``).
MAX_JSON_BODY = 64 * 1024
#: A request body must arrive within this many seconds plus its length at this rate (bytes per second), so that
#: uploads that stall (a laptop that sleeps, a deliberately slow client) do not hold memory for ever.
BODY_GRACE_S = 30.0
MIN_UPLOAD_RATE = 64 * 1024
#: Request bodies the server holds in memory at once, counted in uploads of the largest size allowed (smaller
#: ones count by their length): stalled uploads must not fill the server's memory. One client address may hold
#: a quarter of that (uploads that stall one byte short are held for minutes; they must not shut out the others).
UPLOADS_AT_ONCE = 8


def create_app(settings: ServerSettings, backend=None) -> Starlette:
    """The ASGI app; ``backend`` defaults to a :class:`LocalBackend` (models loaded on first use)."""
    settings.check()
    backend = backend or LocalBackend(settings)
    limiter = RateLimiter(settings.rate_per_s, settings.rate_burst)
    # clicks wait for their session and model in threads of their own, so that they never take the threads
    # that opening and closing sessions need (Starlette's default pool has 40)
    click_threads = anyio.CapacityLimiter(40)
    uploads = UploadBudget(UPLOADS_AT_ONCE * settings.max_upload_bytes)  # touched on the event loop only

    def reply(response: Response) -> Response:
        response.headers[protocol.REPLICA_HEADER] = backend.replica
        return response

    def error(exc: ServiceError) -> Response:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else {}
        if exc.code == "unauthorized":
            headers["WWW-Authenticate"] = "Bearer"
        status = protocol.ERROR_STATUS.get(exc.code, 500)
        return reply(Response(protocol.error_body(exc.code, exc.message, **exc.extra), status, headers,
                              media_type="application/json"))

    def client_of(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def guard(request: Request) -> None:
        """Request rate, protocol version, token: a ServiceError for the first that fails (the rate first, so that
        wrong tokens count too: guessing is throttled like any other request)."""
        client = client_of(request)
        allowed, wait = limiter.allow(client)
        if not allowed:
            raise ServiceError("rate_limited", f"Too many requests from this computer (the server allows "
                               f"{settings.rate_per_s:g} per second); nothing was changed. Wait a moment and click "
                               "again.", retry_after=wait)
        version = request.headers.get(protocol.PROTOCOL_HEADER)
        if version != str(protocol.PROTOCOL_VERSION):
            raise ServiceError("protocol", f"This FastSAM3D server speaks protocol {protocol.PROTOCOL_VERSION}; the "
                               f"client speaks {version or 'none (is it a FastSAM3D client?)'}. Install the same "
                               "FastSAM3D version on the workstation and on the server.",
                               server_protocol=protocol.PROTOCOL_VERSION)
        if not token_matches(settings.token_sha256, request.headers.get("authorization")):
            raise ServiceError("unauthorized", "The FastSAM3D server refused the token: enter the token its "
                               "administrator gave you in the FastSAM3D settings (or set FASTSAM3D_TOKEN).")

    async def body(request: Request, limit: Optional[int] = None) -> bytes:
        """The request body, refused (413) as soon as it is longer than ``limit`` (the upload limit)."""
        limit = settings.max_upload_bytes if limit is None else min(limit, settings.max_upload_bytes)
        declared = request.headers.get("content-length")
        too_large = ServiceError("too_large", too_large_message(limit))
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise too_large
        chunks, size = [], 0
        expected = int(declared) if declared is not None else limit
        client = client_of(request)
        uploads.take(client, expected)
        try:
            with anyio.fail_after(BODY_GRACE_S + expected / MIN_UPLOAD_RATE):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except ClientDisconnect:
            raise ServiceError("malformed", "The client disconnected while sending.") from None
        except TimeoutError:
            raise ServiceError("too_slow", f"The request arrived too slowly (the server waits "
                               f"{BODY_GRACE_S:g} s plus {MIN_UPLOAD_RATE // 1024} KiB/s); nothing was changed. Check "
                               "the network connection, then click again.") from None
        finally:
            uploads.give_back(client, expected)
        return b"".join(chunks)

    def endpoint(handler, checked: bool = True):
        async def run(request: Request) -> Response:
            try:
                if checked:
                    guard(request)
                return reply(await handler(request))
            except ServiceError as exc:
                return error(exc)
            except Exception:  # the traceback goes to the server log, never to the client
                log.exception("request %s %s failed", request.method, request.url.path)
                return error(ServiceError("internal", "The FastSAM3D server failed on this request (see its log); "
                                          "nothing was changed."))
        return run

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def info(request: Request) -> Response:
        models = [backend.pool.describe(name) for name in backend.pool.names]
        return JSONResponse({"protocol": protocol.PROTOCOL_VERSION, "server": _version(), "models": models,
                             "limits": settings.limits(), "auth": settings.token_sha256 is not None})

    async def create(request: Request) -> Response:
        try:
            data = protocol.loads_json(await body(request, MAX_JSON_BODY))
        except ServiceError as exc:
            if exc.code != "too_large":
                raise
            raise ServiceError("too_large", f"A new session's request is a short JSON object such as "
                               f"{{\"model\": \"fastsam3d\"}}, at most {MAX_JSON_BODY // 1024} KiB; nothing was "
                               "changed.") from None
        except protocol.FrameError as exc:
            raise ServiceError("malformed", f"The request is malformed: {exc}.") from None
        name = data.get("model")
        if not isinstance(name, str):
            raise ServiceError("malformed", "Give the model's name: {\"model\": \"fastsam3d\"}.")
        await run_in_threadpool(backend.pool.get, name)  # loads it now, not at the first click
        if await request.is_disconnected():  # the client gave up while the model loaded: no session it never sees
            raise ServiceError("malformed", "The client disconnected before its session was opened.")
        session_id = await backend.create(name)
        return JSONResponse({"session": session_id, "model": backend.pool.describe(name),
                             "limits": settings.limits(), "protocol": protocol.PROTOCOL_VERSION}, 201)

    async def click(request: Request) -> Response:
        state = await backend.state(request.path_params["session"], request)  # before the upload: an unknown id
        data = await body(request)  # is refused without holding memory
        if state.queued >= MAX_QUEUED_CLICKS:
            raise ServiceError("rate_limited", f"{state.queued} clicks of this session are still waiting for the "
                               "server; nothing was changed. Click again when they are answered.", retry_after=1.0)
        state.queued += 1
        abandoned, done = threading.Event(), threading.Event()

        async def watch_client() -> None:
            """Tell the click when its client has gone: it disconnected, or Ray cancelled its request."""
            try:
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                abandoned.set()
            except anyio.get_cancelled_exc_class():
                if not done.is_set():
                    abandoned.set()
                raise

        failure: Optional[Exception] = None
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch_client)
                try:
                    reply_frame = await anyio.to_thread.run_sync(engine.click, backend.pool, state, data, abandoned,
                                                                 limiter=click_threads)
                except Exception as exc:  # raised below, outside the task group (which would wrap it in a group)
                    failure = exc
                finally:
                    done.set()
                    tasks.cancel_scope.cancel()
        finally:
            state.queued -= 1
        if failure is not None:
            raise failure
        return Response(reply_frame, media_type=protocol.FRAME_TYPE)

    async def close(request: Request) -> Response:
        await backend.close(request.path_params["session"])
        return Response(status_code=204)

    async def not_found(request: Request, exc) -> Response:
        return error(ServiceError("not_found", f"{request.method} {request.url.path} is not part of the FastSAM3D "
                                  f"protocol {protocol.PROTOCOL_VERSION}: is this URL a FastSAM3D server of the same "
                                  "version?"))

    routes = [
        Route("/healthz", endpoint(healthz, checked=False), methods=["GET"]),
        Route("/v1/info", endpoint(info), methods=["GET"]),
        Route("/v1/sessions", endpoint(create), methods=["POST"]),
        Route("/v1/sessions/{session}/click", endpoint(click), methods=["POST"]),
        Route("/v1/sessions/{session}", endpoint(close), methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.backend = backend
    return app


def too_large_message(limit: int) -> str:
    """The message of a request over the upload limit (the client says the same before sending one)."""
    return (f"The request is larger than the server's upload limit of {limit / 2 ** 20:.3g} MiB; nothing was "
            "changed. Ask the administrator to raise --max-upload-mb.")


def _version() -> str:
    from .. import __version__

    return __version__


def new_token() -> str:
    """A random token for a new server (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)
