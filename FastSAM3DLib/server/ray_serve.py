"""The server as a Ray Serve deployment: replicas (one per GPU, or several per CPU node) behind Ray's proxy.

Each replica runs the same ASGI app (:func:`.app.create_app`); a session is a Ray Serve *multiplexed model*
keyed by the session id: the client sends the id in the ``serve_multiplexed_model_id`` header, and Ray's router
sends every request of a session to the replica that already holds it (its image embedding and former logits).
Session ids are signed with a key made when the application is built and shared by its replicas
(:class:`.sessions.SignedSessionIds`): a replica refuses an id the deployment did not issue (``session_unknown``)
before making any state for it, so invented ids cannot crowd real sessions out of a replica.
A replica holds at most ``max_sessions`` sessions (least recently used dropped first). When a replica dies or
drops a session, the next click lands on a replica without it; the server answers ``missing`` and the client
sends the region and its last logits again: one slower click, the same result. Routing is best effort: Ray's
router learns which replica holds a session from the replica's periodic reports (every 0.1 s), so a click that
follows the previous one faster than that, on a busy cluster, may land elsewhere and be resent the same way.

``python -m FastSAM3DLib.server --ray --replicas 2`` starts (or joins, ``--ray-address``) a cluster and deploys;
``serve run FastSAM3DLib.server.ray_serve:build_app models=fastsam3d replicas=4 gpus_per_replica=1`` does the
same from Ray's own CLI or a Serve config file (the token is read from ``$FASTSAM3D_SERVER_TOKEN`` where the
application is built; replicas only ever see its hash).
"""
from __future__ import annotations

import secrets
import weakref
from typing import Dict, Optional

from .settings import ServerSettings, hash_token, read_token

DEPLOYMENT_NAME = "FastSAM3D"


#: Requests a replica takes at once. Ray's default (5) let ten slow uploads - Ray's proxy hands a request over
#: before its body is read - stop a two-replica deployment from answering anything; the app itself bounds the
#: work (clicks one at a time per session and model, at most 4 waiting per session, bodies read within a deadline).
MAX_ONGOING_REQUESTS = 100


def deployment(settings: ServerSettings, replicas: int = 2, gpus_per_replica: float = 0.0,
               cpus_per_replica: float = 1.0):
    """The bound Ray Serve application (``serve.run(deployment(settings))``) of ``replicas`` replicas."""
    from ray import serve

    settings.check()
    max_sessions = int(settings.max_sessions)

    class FastSAM3DReplica:
        """One replica: the models on its device and its sessions (multiplexed by session id)."""

        def __init__(self, settings_dict: dict, session_key: str) -> None:
            from . import engine
            from .sessions import SignedSessionIds

            self.settings = ServerSettings.from_dict(settings_dict)
            if self.settings.threads:
                import torch

                torch.set_num_threads(int(self.settings.threads))
            self.pool = engine.ModelPool(self.settings)
            self.pool.load_all()
            self.replica = f"ray-{serve.get_replica_context().replica_id.unique_id}"
            self.session_ids = SignedSessionIds(bytes.fromhex(session_key))
            self.live_sessions = weakref.WeakValueDictionary()  # those Ray Serve still caches here, for close

        @serve.multiplexed(max_num_models_per_replica=max_sessions)
        async def session_state(self, session_id: str):
            """A fresh state for a session this replica has not seen (Ray Serve caches it by id)."""
            from .sessions import SessionState

            state = self.live_sessions[session_id] = SessionState(None, self.settings)
            return state

        def __serve_build_asgi_app__(self):
            from .app import create_app

            return create_app(self.settings, _RayBackend(self))

    ingress = serve.ingress()(FastSAM3DReplica)
    options = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        options["num_gpus"] = gpus_per_replica
    return serve.deployment(ingress, name=DEPLOYMENT_NAME, num_replicas=int(replicas), ray_actor_options=options,
                            max_ongoing_requests=MAX_ONGOING_REQUESTS).bind(settings.to_dict(), secrets.token_hex(32))


class _RayBackend:
    """Sessions as Ray Serve multiplexed models: created lazily on the replica a session's requests reach."""

    def __init__(self, replica) -> None:
        self._replica = replica
        self.pool = replica.pool
        self.settings = replica.settings
        self.replica = replica.replica

    async def create(self, model: str) -> str:
        """A new signed session id; the session itself is made on the replica its first request reaches."""
        return self._replica.session_ids.new()

    async def state(self, session_id: str, request):
        """This replica's state of session ``session_id`` (loaded through Ray Serve's multiplexing); ServiceError
        ``session_unknown`` for an id this deployment did not issue, before any state is made for it."""
        from ray import serve

        from .sessions import ServiceError

        if not self._replica.session_ids.issued(session_id):
            raise ServiceError("session_unknown", "This session is not open on the server (the server was "
                               "restarted, or the id was not made by it); the client opens a new one.")
        if serve.get_multiplexed_model_id() != session_id:
            raise ServiceError("malformed", "Send the session id in the serve_multiplexed_model_id header too "
                               "(Ray Serve routes on it).")
        state = await self._replica.session_state(session_id)
        state.check_open()
        return state

    async def close(self, session_id: str) -> None:
        """Close the session if this replica holds it (the request is routed there by its header): its tensors
        are freed now, its place in Ray Serve's cache when that needs the room (least recently used)."""
        from starlette.concurrency import run_in_threadpool

        state = self._replica.live_sessions.get(session_id)
        if state is not None:
            await run_in_threadpool(state.close)  # may wait for a click the session runs


def build_app(args: Dict[str, str]):
    """Ray Serve application builder (``serve run FastSAM3DLib.server.ray_serve:build_app key=value ...``).

    Keys: ``models`` (comma-separated), ``device``, ``replicas``, ``gpus_per_replica``, ``cpus_per_replica``,
    ``max_sessions`` (per replica), ``max_upload_mb``, ``rate``, ``burst``, ``token_file``. The HTTP address
    is Ray Serve's own (``serve start --http-host``; it binds 127.0.0.1 unless told otherwise).
    """
    token = read_token(args.get("token_file"))
    settings = ServerSettings(
        models=tuple(m for m in args.get("models", "fastsam3d").split(",") if m),
        device=args.get("device", "cpu"), host=args.get("host", "127.0.0.1"),
        token_sha256=hash_token(token) if token else None,
        max_sessions=int(args.get("max_sessions", ServerSettings.max_sessions)),
        max_upload_bytes=int(float(args.get("max_upload_mb", ServerSettings.max_upload_bytes / 2 ** 20)) * 2 ** 20),
        rate_per_s=float(args.get("rate", ServerSettings.rate_per_s)),
        rate_burst=int(args.get("burst", ServerSettings.rate_burst)))
    return deployment(settings, replicas=int(args.get("replicas", 1)),
                      gpus_per_replica=float(args.get("gpus_per_replica", 0)),
                      cpus_per_replica=float(args.get("cpus_per_replica", 1)))


def replica_actor_names(app_name: Optional[str] = None):
    """Names of this deployment's live replica actors (namespace ``serve``), e.g. to kill one in a test."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == "serve" and f"#{DEPLOYMENT_NAME}#" in a["name"]
            and (app_name is None or a["name"].split("::", 1)[-1].startswith(f"{app_name}#"))]
