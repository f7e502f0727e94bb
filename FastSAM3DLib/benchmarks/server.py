"""``make bench``: what a click costs through the FastSAM3D server, and how many clicks per second it serves.

A uvicorn server on 127.0.0.1 runs in this process with the plan's first model (random weights: speed does not
depend on them) on the plan's device; clients are :class:`FastSAM3DLib.remote.RemoteSession` threads in this
process too, on the CT-sized synthetic volume. Measured:

* ``server_click_overhead_ms``: median next click through the server minus the same click in a local
  :class:`InteractiveSession` (compression, HTTP on loopback, the client's paste-back in numpy or torch);
  ``server_first_click_overhead_ms`` the same for a first click (the region's upload);
* ``server_bytes_per_click_kib``: request + reply of a next click; ``server_upload_mib``: a first click's request;
* ``server_clicks_per_s``: next clicks per second served to 1, 4 and 16 simulated users clicking at once
  (each its own session; the users' own paste-back shares this machine's CPU and GIL with the server, so a
  real deployment with users on their own workstations does better).

Skipped (with the reason) when the plan skips "server" or "host", or without the server extra.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import List

import numpy as np

from . import report
from .suite import has_module

USERS = (1, 4, 16)
NAMES = [("server_click_overhead_ms", "ms", "next click, server round trip - local"),
         ("server_first_click_overhead_ms", "ms", "first click, server round trip - local"),
         ("server_bytes_per_click_kib", "KiB", "next click, request + reply"),
         ("server_upload_mib", "MiB", "first click, request (the region)")]


def measure(plan, device_name: str) -> List[dict]:
    """Per-click overhead of the server round trip vs local, bytes on the wire, clicks/s for 1, 4, 16 users."""
    model_name = plan.models[0] if plan.models else "fastsam3d"
    common = dict(model=model_name, device=device_name, precision="fp32")
    skipped = plan.skip.get("server") or plan.skip.get("host") or (
        None if has_module("starlette") and has_module("uvicorn") else "the server extra (starlette, uvicorn) "
        "is not installed") or (None if has_module("SimpleITK") else "SimpleITK is not installed")
    if skipped:
        return [report.measurement(n, None, unit=u, label=l, skipped=skipped, **common) for n, u, l in NAMES] + [
            report.measurement("server_clicks_per_s", None, variant=f"{n} user{'s' if n > 1 else ''}", unit="1/s",
                               label="clicks per second", skipped=skipped, **common) for n in USERS]
    return _measure(plan, model_name, common)


def _measure(plan, model_name: str, common: dict) -> List[dict]:
    import uvicorn

    from .. import remote
    from ..registry import build_model
    from ..server import engine
    from ..server.app import LocalBackend, create_app
    from ..server.settings import ServerSettings
    from ..session import InteractiveSession
    from .pipeline import click_centre, ct_sized_volume

    model = build_model(model_name, seed=0, device=plan.device)
    volume = ct_sized_volume(tuple(plan.volume_shape))
    centre = click_centre(volume)
    repeats = max(5, 4 * int(plan.repeats))
    offsets = np.random.default_rng(0).uniform(-10, 10, (64 * repeats, 3))

    settings = ServerSettings(models=(model_name,), device=plan.device, max_sessions=64, rate_per_s=1e6,
                              rate_burst=10 ** 6)
    backend = LocalBackend(settings, engine.ModelPool(settings, loader=lambda spec, device: model))
    server = uvicorn.Server(uvicorn.Config(create_app(settings, backend), host="127.0.0.1", port=0,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the benchmark's uvicorn server did not start")
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        rows = _single_user(remote, InteractiveSession(model, volume), url, model_name, volume, centre, offsets,
                            repeats, common)
        for users in USERS:
            if plan.time_left() < 30:
                rows.append(report.measurement("server_clicks_per_s", None, variant=_variant(users), unit="1/s",
                                               label="clicks per second", skipped="time budget spent", **common))
                continue
            rate, note = _throughput(remote, url, model_name, volume, centre, offsets, users, repeats)
            rows.append(report.measurement("server_clicks_per_s", rate, variant=_variant(users), unit="1/s",
                                           label="clicks per second", note=note, **common))
        return rows
    finally:
        server.should_exit = True
        thread.join(30)


def _variant(users: int) -> str:
    return f"{users} user{'s' if users > 1 else ''}"


def _counting(client):
    """Wrap a ServerClient so that it counts the bytes it sends and receives."""
    counts = {"sent": 0, "received": 0}
    send = client._send

    def counted(method, path, body, headers, timeout):
        status, reply_headers, data = send(method, path, body, headers, timeout)
        counts["sent"] += len(body or b"")
        counts["received"] += len(data)
        return status, reply_headers, data

    client._send = counted
    return counts


def _single_user(remote, local, url, model_name, volume, centre, offsets, repeats, common):
    """Local and remote sessions fed the same clicks, alternately (so both see the same machine load)."""
    session = remote.RemoteSession(url, model_name, volume)
    counts = _counting(session.client)
    times = {"local": [], "remote": []}

    def click(which, target, point):
        start = time.perf_counter()
        target.add_click(point)
        times[which].append(time.perf_counter() - start)

    local.__class__(local.model, volume).add_click(centre)  # warm-up: the first encoder run of a process is slower
    click("local", local, centre)
    click("remote", session, centre)
    upload = counts["sent"]
    counts.update(sent=0, received=0)
    for i in range(repeats + 1):  # the first next click is a warm-up
        click("local", local, centre + offsets[i])
        click("remote", session, centre + offsets[i])
    per_click = (counts["sent"] + counts["received"]) / (repeats + 1)
    session.close()
    local_first, remote_first = times["local"][0], times["remote"][0]
    local_ms = 1e3 * statistics.median(times["local"][2:])
    remote_ms = 1e3 * statistics.median(times["remote"][2:])
    note = f"next click {remote_ms:.1f} ms via the server vs {local_ms:.1f} ms local (medians of {repeats})"
    first_note = f"first click {remote_first * 1e3:.0f} ms via the server vs {local_first * 1e3:.0f} ms local"
    values = [remote_ms - local_ms, 1e3 * (remote_first - local_first), per_click / 2 ** 10, upload / 2 ** 20]
    notes = [note, first_note, None, None]
    return [report.measurement(name, value, unit=unit, label=label, note=n, **common)
            for (name, unit, label), value, n in zip(NAMES, values, notes)]


def _throughput(remote, url, model_name, volume, centre, offsets, users: int, repeats: int):
    """Next clicks per second with ``users`` sessions clicking at once (their first clicks not counted)."""
    sessions = [remote.RemoteSession(url, model_name, volume) for _ in range(users)]
    for session in sessions:
        session.add_click(centre)
    clicks = max(3, repeats // 2)
    barrier, errors = threading.Barrier(users + 1), []

    def user(index: int, session) -> None:
        try:
            barrier.wait(60)
            for c in range(clicks):
                session.add_click(centre + offsets[(index * clicks + c) % len(offsets)])
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i, s)) for i, s in enumerate(sessions)]
    for t in threads:
        t.start()
    barrier.wait(60)
    start = time.perf_counter()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - start
    for session in sessions:
        session.close()
    if errors:
        raise errors[0]
    return users * clicks / elapsed, f"{users} x {clicks} next clicks in {elapsed:.1f} s"
