"""A harness that runs the effect's worker the way Slicer's event loop runs it: the GIL held in C between ticks.

Slicer initialises PythonQt without thread support, so its main thread keeps the GIL while Qt's event loop
runs C++ (waiting for events, rendering); other Python threads run only while the main thread executes
Python or releases the GIL. :func:`hold_gil` reproduces that with a foreign call through ``ctypes.PyDLL``
(which, unlike ``ctypes.CDLL``, does *not* release the GIL). :func:`run_event_loop` alternates it with the
effect's timer callback (:meth:`FastSAM3DLib.background.Worker.poll`) until the submitted jobs are done.

As a script it measures one job free-running and inside the emulated loop, for ``make bench``::

    python Testing/slicer_event_loop.py click|download|remote-grow [--mode free|slicer|slicer-no-yield] [--threads N]
        [--json]

``remote-grow`` serves the threshold stand-in from another process on 127.0.0.1 and clicks a 450 mm tube
through it, so the click grows over several regions (one request each).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

_LIBC = ctypes.PyDLL(None)


def hold_gil(seconds: float) -> None:
    """Block the calling thread in C for ``seconds`` *without* releasing the GIL (Qt's loop in Slicer)."""
    _LIBC.usleep(ctypes.c_uint(int(seconds * 1e6)))


def run_event_loop(worker, loop_seconds: float = 0.005, budget: float = None, timeout: float = 600.0):
    """Run Slicer-like ticks (``hold_gil(loop_seconds)``, then ``worker.poll(budget)``) until it is idle.

    ``loop_seconds``: the time Qt keeps the GIL per tick (the timer interval while idle; longer while it
    renders). ``budget``: passed to :meth:`Worker.poll` (None: its default; 0: the old callback that only
    collects results). Returns the list of finished jobs; raises TimeoutError after ``timeout`` seconds.
    """
    finished, start = [], time.perf_counter()
    while worker.busy():
        hold_gil(loop_seconds)
        finished += worker.poll() if budget is None else worker.poll(budget)
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"the worker was still busy after {timeout:.0f} s")
    return finished


def _click_job(threads: int = None):
    """Import, build the bundled demo model, first and next click on the bundled CT (as the effect does), with
    ``threads`` torch threads (None: PyTorch's default, as in Slicer)."""
    def job():
        t0 = time.perf_counter()
        import numpy as np
        import torch

        if threads:
            torch.set_num_threads(threads)
        from FastSAM3DLib import InteractiveSession, build_model
        from FastSAM3DLib.geometry import Volume
        from FastSAM3DLib.resources import resources_dir, sample_path

        volume = Volume.from_file(sample_path("totalseg_example_ct_sm.nii.gz"))
        model = build_model("fastsam3d-demo", checkpoint=resources_dir() / "Models" / "fastsam3d-demo.pth")
        session = InteractiveSession(model, volume)
        centre = (volume.ijk_to_ras @ np.array([*(np.array(volume.array.shape[::-1]) / 2), 1.0]))[:3]
        t1 = time.perf_counter()
        session.add_click(centre)
        t2 = time.perf_counter()
        session.add_click(centre + [3.0, 0.0, 0.0])
        t3 = time.perf_counter()
        return {"load_s": t1 - t0, "first_click_s": t2 - t1, "next_click_s": t3 - t2}
    return job


def _download_job(size_mb: int = 256):
    """Download ``size_mb`` MB from a local HTTP server with the library's verified download."""
    import hashlib
    import http.server
    import tempfile
    import threading

    payload = bytes(range(256)) * (size_mb * 4096)
    digest = hashlib.sha256(payload).hexdigest()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def job():
        import shutil

        from FastSAM3DLib.weights import download_model

        folder = Path(tempfile.mkdtemp())
        try:
            manifest = folder / "models.json"
            manifest.write_text(json.dumps({"format_version": 1, "models": [{
                "name": "bench-model", "architecture": "fastsam3d", "title": "Download benchmark",
                "filename": "bench.pth", "urls": [f"http://127.0.0.1:{server.server_address[1]}/bench.pth"],
                "size": len(payload), "size_exact": True, "sha256": digest, "weights_key": "model_state_dict",
                "licence": "none", "citation": "none"}]}))
            start = time.perf_counter()
            download_model("bench-model", folder / "cache", manifest=str(manifest))
            seconds = time.perf_counter() - start
            return {"download_s": seconds, "download_MBps": len(payload) / 1e6 / seconds}
        finally:
            server.shutdown()
            shutil.rmtree(folder, ignore_errors=True)
    return job


_SERVE_STAND_IN = """
import sys, threading, time, uvicorn
from FastSAM3DLib.benchmarks.threshold_model import threshold_model
from FastSAM3DLib.server import engine
from FastSAM3DLib.server.app import LocalBackend, create_app
from FastSAM3DLib.server.settings import ServerSettings
settings = ServerSettings(models=("tiny-test",), rate_per_s=1000.0, rate_burst=1000)
model = threshold_model()
app = create_app(settings, LocalBackend(settings, engine.ModelPool(settings, loader=lambda spec, device: model)))
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
def announce():
    while not server.started:
        time.sleep(0.02)
    print(server.servers[0].sockets[0].getsockname()[1], flush=True)
    sys.stdin.read()
    server.should_exit = True
threading.Thread(target=announce, daemon=True).start()
server.run()
"""


def _start_stand_in_server():
    """A FastSAM3D server in another process (as a real one is) serving the threshold stand-in as ``tiny-test``
    on 127.0.0.1; returns (process, url). Closing the process's stdin stops it."""
    import subprocess

    process = subprocess.Popen([sys.executable, "-c", _SERVE_STAND_IN], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    port = int(process.stdout.readline())
    return process, f"http://127.0.0.1:{port}"


def _remote_grow_job(url: str, threads: int = None):
    """Through the server: a click on a 450 mm tube that grows over several regions, then a refining click (the
    workstation's side of growth: cutting, compressing and pasting each region, one request per region)."""
    def job():
        import torch

        if threads:
            torch.set_num_threads(threads)
        from FastSAM3DLib.benchmarks.long_phantoms import curved_tube, tube_centre
        from FastSAM3DLib.growth import GrowthSettings
        from FastSAM3DLib.remote import RemoteSession

        volume, _truth = curved_tube()
        t0 = time.perf_counter()
        session = RemoteSession(url, "tiny-test", volume, prompt_mode="newest", grow=GrowthSettings(max_regions=8))
        first = session.add_click([0.0, *map(float, tube_centre(0.0))])
        t1 = time.perf_counter()
        session.add_click([10.0, *map(float, tube_centre(10.0))])
        t2 = time.perf_counter()
        session.close()
        return {"regions": int(first.regions), "first_click_s": t1 - t0, "next_click_s": t2 - t1}
    return job


def measure(job_name: str, mode: str, threads: int = None) -> dict:
    """Run one job on the effect's worker with the main thread ``free``, ``slicer`` (the effect's poll) or
    ``slicer-no-yield`` (a poll that only collects results, as before); returns its timings. ``threads``:
    torch threads of the click job (None: PyTorch's default)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from FastSAM3DLib.background import Worker

    server = None
    if job_name == "remote-grow":
        server, url = _start_stand_in_server()
        job = _remote_grow_job(url, threads)
    else:
        job = _click_job(threads) if job_name == "click" else _download_job()
    worker = Worker()
    start = time.perf_counter()
    worker.submit(job_name, job)
    if mode == "free":
        finished = []
        while worker.busy():
            finished += worker.poll(1.0)  # nothing else holds the GIL
    else:
        finished = run_event_loop(worker, budget=0.0 if mode == "slicer-no-yield" else None)
    wall = time.perf_counter() - start
    worker.stop(5)
    if server is not None:
        server.stdin.close()
        server.wait(30)
    (result,) = finished
    if result.error is not None:
        raise result.error
    return {"job": job_name, "mode": mode, "wall_s": wall, **result.value}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=("click", "download", "remote-grow"))
    parser.add_argument("--mode", choices=("free", "slicer", "slicer-no-yield"), default="slicer")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the click (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    result = measure(args.job, args.mode, args.threads)
    print(json.dumps(result) if args.json else "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                         for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
