"""``python -m FastSAM3DLib.server`` (and ``python -m FastSAM3DLib serve``): run the FastSAM3D server.

One process with uvicorn by default; ``--ray`` deploys the same app on a Ray cluster with Ray Serve.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import List, Optional

from ..errors import FastSAM3DError
from .settings import TOKEN_ENV, ServerSettings, hash_token, read_token, uvicorn_options

MiB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's options (shared by both entry points)."""
    d = ServerSettings()
    parser.add_argument("--host", default=d.host, help="address to listen on (default 127.0.0.1: this computer only; "
                        "any other address needs a token)")
    parser.add_argument("--port", type=int, default=d.port, help="TCP port (default %(default)s)")
    parser.add_argument("--model", action="append", default=None, metavar="NAME[=CHECKPOINT]",
                        help="a model to serve, repeatable (default: fastsam3d); weights are the bundled or cached "
                             "ones unless a checkpoint file is given")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help=f"file whose first line is the token clients must send (default: ${TOKEN_ENV}); "
                             "required unless the server listens on loopback only")
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions,
                        help="open sessions at most (per replica with --ray; default %(default)s)")
    parser.add_argument("--idle-minutes", type=float, default=d.idle_timeout_s / 60,
                        help="close a session unused this long (default %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / MiB,
                        help="largest request body in MiB (default %(default)s)")
    parser.add_argument("--rate", type=float, default=d.rate_per_s,
                        help="requests per second per client address (default %(default)s)")
    parser.add_argument("--burst", type=int, default=d.rate_burst, help="requests a client may send at once "
                        "(default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cache-dir", default=None, help="model cache folder (default: $FASTSAM3D_CACHE or the "
                        "user cache folder)")
    parser.add_argument("--trusted-proxy", action="append", default=None, metavar="ADDRESS",
                        help="IP address of a reverse proxy whose X-Forwarded-For header names the real client, "
                             "for per-user rate limits (repeatable; e.g. 127.0.0.1 for a proxy on this computer; "
                             "default: none, the header is ignored)")
    parser.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM); a reverse "
                        "proxy is the usual way")
    parser.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    ray = parser.add_argument_group("Ray Serve")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of one uvicorn process")
    ray.add_argument("--ray-address", default=None, help="cluster to join (default: start a local one)")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (default %(default)s)")
    ray.add_argument("--gpus-per-replica", type=float, default=None,
                     help="GPUs per replica (default: 1 when --device is cuda, else 0)")


def settings_from(args: argparse.Namespace) -> ServerSettings:
    """Checked settings from parsed options (the token is read now and only its hash is kept)."""
    from ..registry import check_device

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    token = read_token(args.token_file)
    if not 0 < args.max_upload_mb < math.inf:
        raise FastSAM3DError(f"--max-upload-mb must be a positive number of MiB, got {args.max_upload_mb}.")
    if getattr(args, "ray", False) and (args.replicas < 1 or (args.gpus_per_replica or 0) < 0):
        raise FastSAM3DError("--replicas must be at least 1 and --gpus-per-replica at least 0.")
    if getattr(args, "ray", False) and getattr(args, "trusted_proxy", None):
        raise FastSAM3DError("--ray reads X-Forwarded-For as Ray's own HTTP proxy does (from 127.0.0.1, uvicorn's "
                             "default); leave out --trusted-proxy.")
    if getattr(args, "ray", False) and (args.ssl_certfile or args.ssl_keyfile):
        raise FastSAM3DError("--ray serves plain HTTP: put a reverse proxy with the certificate in front of it "
                             "(see the README, HTTPS), instead of --ssl-certfile/--ssl-keyfile.")
    check_certificate(args.ssl_certfile, args.ssl_keyfile)
    from ..registry import get_model_config

    for spec in args.model or ("fastsam3d",):
        try:
            get_model_config(spec.partition("=")[0].strip())
        except ValueError as exc:
            raise FastSAM3DError(f"--model: {exc}") from None
    settings = ServerSettings(
        models=tuple(args.model or ("fastsam3d",)), device=check_device(device), host=args.host, port=args.port,
        token_sha256=hash_token(token) if token else None, max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_minutes * 60, max_upload_bytes=int(args.max_upload_mb * MiB),
        rate_per_s=args.rate, rate_burst=args.burst, threads=args.threads,
        trusted_proxies=tuple(getattr(args, "trusted_proxy", None) or ()))
    if args.cache_dir:
        settings.extra["cache_dir"] = args.cache_dir
    settings.check()
    return settings


def check_certificate(certfile: Optional[str], keyfile: Optional[str]) -> None:
    """FastSAM3DError unless both or neither are given and they are a PEM certificate and its private key."""
    if not certfile and not keyfile:
        return
    if not certfile or not keyfile:
        raise FastSAM3DError("HTTPS needs both --ssl-certfile (the certificate, PEM) and --ssl-keyfile (its private "
                             "key, PEM).")
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise FastSAM3DError(f"Cannot use the certificate {certfile} with the key {keyfile} ({why}): give a PEM "
                             "certificate and the private key it was made with, both readable.") from None


def raise_open_file_limit(cap: int = 65536) -> int:
    """Raise this process's soft limit on open files to its hard limit (at most ``cap``) and return it.

    Each client connection holds a file descriptor; Linux's usual soft limit of 1024 would make the server refuse
    connections long before a GPU is busy. Unchanged where the platform has no such limit (Windows).
    """
    try:
        import resource
    except ImportError:
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # macOS refuses some values under its hard limit: keep the soft one
            pass
    return soft


def listening_socket(host: str, port: int):
    """A socket bound to ``host``:``port`` (bound before the models load, so a port in use is said at once)."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise FastSAM3DError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port, or a "
                             "--host that is an address of this computer.") from None
    return sock


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise FastSAM3DError("The server needs its optional dependencies: pip install 'FastSAM3DLib[server]' "
                             "(Slicer never needs them).") from None
    settings = settings_from(args)
    scheme = "https" if args.ssl_certfile else "http"
    where = f"{scheme}://{settings.host}:{settings.port}"
    auth = "token required" if settings.token_sha256 else "no token (loopback only)"
    raise_open_file_limit()
    if args.ray:
        return _run_ray(args, settings, where, auth)
    import torch

    from . import engine
    from .app import LocalBackend, create_app

    if settings.threads:
        torch.set_num_threads(settings.threads)
    sock = listening_socket(settings.host, settings.port)
    try:
        pool = engine.ModelPool(settings)
        print(f"loading {', '.join(pool.names)} on {settings.device} ...", flush=True)
        pool.load_all()
        app = create_app(settings, LocalBackend(settings, pool))
        print(f"FastSAM3D server on {where} ({auth}); Ctrl+C stops it", flush=True)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                timeout_keep_alive=75, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                                **uvicorn_options(settings))
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _run_ray(args, settings: ServerSettings, where: str, auth: str) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise FastSAM3DError("--ray needs Ray Serve: pip install 'FastSAM3DLib[server-ray]'.") from None
    import signal
    import time

    from .ray_serve import deployment

    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (
        1.0 if settings.device.startswith("cuda") else 0.0)
    ray.init(address=args.ray_address, include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(deployment(settings, replicas=args.replicas, gpus_per_replica=gpus), name="fastsam3d",
              route_prefix="/")
    replicas = f"{args.replicas} replica{'' if args.replicas == 1 else 's'}"
    print(f"FastSAM3D server on Ray Serve at {where} ({replicas}, {auth}); Ctrl+C stops it", flush=True)
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # shut the deployment down cleanly on SIGTERM too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the deployment ...", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def add_subcommand(sub) -> None:
    """Register ``serve`` on the library CLI's sub-parsers (``python -m FastSAM3DLib serve``)."""
    parser = sub.add_parser("serve", help="run the FastSAM3D server: one GPU for many Slicer users")
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m FastSAM3DLib.server``: one error line and status 2 for what the user can fix."""
    parser = argparse.ArgumentParser(prog="python -m FastSAM3DLib.server",
                                     description="Run the FastSAM3D server: one GPU for many Slicer users.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except FastSAM3DError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
