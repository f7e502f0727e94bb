"""``python -m FastSAM3DLib.server --ray`` as an administrator runs it: its own local Ray cluster in a process of
its own, one click through it, then SIGTERM (what a service manager sends) stops the deployment and the cluster.

A module of its own so that the in-process cluster of ``test_server_ray`` has been shut down before this one starts.
"""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -r requirements-dev.txt)")
pytest.importorskip("starlette", reason="the server extra is not installed")

from FastSAM3DLib import remote  # noqa: E402
from FastSAM3DLib.session import InteractiveSession  # noqa: E402
from test_server import CLICKS, local_model, phantom, ras, same  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
START_S = 180.0  # Ray starts in about 10 s and the deployment in about 10 s more on 2 idle cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_ray_command_serves_clicks_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}  # never a running cluster
    env.update(PYTHONPATH=str(REPO), FASTSAM3D_SERVER_TOKEN="")
    server = subprocess.Popen([sys.executable, "-m", "FastSAM3DLib.server", "--ray", "--model", "tiny-test",
                               "--device", "cpu", "--port", str(port), "--threads", "1"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_S
        banner = f"FastSAM3D server on Ray Serve at http://127.0.0.1:{port} (1 replica, no token (loopback only))"
        while not any(banner in line for line in lines):
            assert server.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.5)
        volume = phantom()
        local = InteractiveSession(local_model("tiny-test"), volume)
        rem = remote.RemoteSession(f"http://127.0.0.1:{port}", "tiny-test", volume)
        assert same(local.add_click(ras(volume, CLICKS[0][0])), rem.add_click(ras(volume, CLICKS[0][0])))
        rem.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, "".join(lines)[-3000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    reader.join(timeout=10)
    assert any("stopping the deployment" in line for line in lines), "".join(lines)[-3000:]
    with socket.socket() as s:  # Ray's HTTP proxy went with the deployment: the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
