"""Shared helpers for the weights tests (no tests here): real HTTP servers, a forward proxy, model-shaped
state dicts with the official key layouts, checkpoint files in the official training format, manifests.

Everything runs on 127.0.0.1; nothing reaches the internet.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import re
import select
import shutil
import socket
import ssl
import subprocess
import threading
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

import pytest

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
              "NO_PROXY")


# ----------------------------------------------------------------------------------------------- HTTP file server


class FileServer:
    """Serves byte strings on 127.0.0.1 with HTTP Range support and scripted misbehaviour.

    ``serve(path, data, plan)``: ``plan`` lists what the next GETs of ``path`` do, one entry per request,
    then "ok" forever: "ok"; "status:500"; "drop:N" (send N body bytes, then cut the connection);
    "stall:S" (send the headers, then nothing for S seconds); "length:N" (announce N bytes, send them all);
    "slow" (send in small pieces, for overlapping concurrent clients); "nolength" (no Content-Length: the body
    ends when the connection closes, as some proxies send it).
    """

    def __init__(self, tls: Optional[ssl.SSLContext] = None) -> None:
        self.files: Dict[str, bytes] = {}
        self.plans: Dict[str, List[str]] = {}
        self.redirects: Dict[str, str] = {}
        self.requests: List[dict] = []
        self.range_support = True
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FileHandler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self.running = True

    def serve(self, path: str, data: bytes, plan=()) -> str:
        """Publish ``data`` at ``path``; return its URL."""
        self.files[path] = data
        self.plans[path] = list(plan)
        return self.url(path)

    def redirect(self, path: str, target: str) -> str:
        """Answer ``path`` with a 302 to ``target`` (like Hugging Face's resolve URLs); return its URL."""
        self.redirects[path] = target
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def gets(self, path: str) -> List[dict]:
        """The GET requests received for ``path`` (dicts with ``path`` and ``headers``)."""
        with self._lock:
            return [r for r in self.requests if r["path"] == path]

    def stop(self) -> None:
        if self.running:
            self.stopping.set()
            self.httpd.shutdown()
            self.httpd.server_close()
            self.running = False

    def _next_action(self, path: str) -> str:
        with self._lock:
            plan = self.plans.get(path, [])
            return plan.pop(0) if plan else "ok"

    def _record(self, path: str, headers) -> None:
        with self._lock:
            self.requests.append({"path": path, "headers": {k.lower(): v for k, v in headers.items()}})


class _FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        owner: FileServer = self.server.owner
        path = urlsplit(self.path).path
        owner._record(path, self.headers)
        if path in owner.redirects:
            self.send_response(302)
            self.send_header("Location", owner.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = owner.files.get(path)
        if data is None:
            self._empty(404)
            return
        action = owner._next_action(path)
        if action.startswith("status:"):
            self._empty(int(action.split(":")[1]))
            return
        start = 0
        ranged = False
        match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
        if match and owner.range_support:
            start, ranged = int(match.group(1)), True
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if action == "nolength":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            length = int(action.split(":")[1]) if action.startswith("length:") else len(body)
            self.send_header("Content-Length", str(length))
        self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest()[:16] + '"')
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if action.startswith("stall:"):
            self.wfile.flush()
            owner.stopping.wait(float(action.split(":")[1]))
            self._cut()
        elif action.startswith("drop:"):
            self.wfile.write(body[:int(action.split(":")[1])])
            self.wfile.flush()
            self._cut()
        elif action == "slow":
            for i in range(0, len(body), 4096):
                self.wfile.write(body[i:i + 4096])
                self.wfile.flush()
                owner.stopping.wait(0.002)
        else:
            self.wfile.write(body)

    def _empty(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _cut(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------- forward proxy


class ForwardProxy:
    """A small real HTTP proxy on 127.0.0.1: forwards absolute-URI GETs, tunnels CONNECT to ``tunnels``."""

    def __init__(self, tunnels: Optional[Dict[str, Tuple[str, int]]] = None) -> None:
        self.requests: List[Tuple[str, str]] = []  # (method, target)
        self.tunnels = dict(tunnels or {})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        owner: ForwardProxy = self.server.owner
        owner.requests.append(("GET", self.path))
        target = urlsplit(self.path)
        headers = {k: v for k, v in self.headers.items() if not k.lower().startswith("proxy-")}
        conn = HTTPConnection(target.hostname, target.port or 80, timeout=10)
        conn.request("GET", target.path or "/", headers=headers)
        response = conn.getresponse()
        body = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        conn.close()

    def do_CONNECT(self) -> None:  # noqa: N802
        owner: ForwardProxy = self.server.owner
        owner.requests.append(("CONNECT", self.path))
        if self.path not in owner.tunnels:
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = socket.create_connection(owner.tunnels[self.path], timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        client = self.connection
        try:
            while True:
                ready, _, _ = select.select([client, upstream], [], [], 5)
                if not ready:
                    break
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        finally:
            upstream.close()
            self.close_connection = True


def self_signed_tls(tmp_path: Path, hostname: str) -> Tuple[ssl.SSLContext, Path]:
    """A server TLS context for ``hostname`` and the certificate file a client must trust (needs openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={hostname}",
                    "-addext", f"subjectAltName=DNS:{hostname}"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


# --------------------------------------------------------------------------------------------- model-shaped data


def tiny_layouts():
    """Miniatures of the two official layouts: same key names, blocks and heads; tiny widths."""
    from FastSAM3DLib.weights.layouts import OFFICIAL_LAYOUTS
    from dataclasses import replace

    small = dict(embed_dim=24, patch_size=2, out_chans=24, mask_in_chans=4, decoder_mlp_dim=16, iou_hidden=8,
                 mlp_ratio=2)
    return {arch: replace(layout, **small) for arch, layout in OFFICIAL_LAYOUTS.items()}


def tiny_state_dict(arch: str, seed: int = 0, part: str = "full"):
    """Random tensors in the tiny ``arch`` layout; ``part`` "full" or "encoder" (no prefix, as distilled)."""
    import torch
    from FastSAM3DLib.weights.layouts import encoder_layout, full_layout

    layout = tiny_layouts()[arch]
    shapes = full_layout(layout) if part == "full" else encoder_layout(layout)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def meta_state_dict(shapes: Dict[str, tuple]):
    """Shape-only tensors (no memory) for ``shapes``: official sizes at no cost."""
    import torch

    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def module_with_shapes(shapes: Dict[str, tuple], device: str = "cpu"):
    """A real nn.Module whose state dict has exactly ``shapes`` (parameters nested by the dotted names)."""
    import torch

    root = torch.nn.Module()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape, device=device)))
    return root


def training_checkpoint_bytes(state_dict, legacy: bool = False) -> bytes:
    """``state_dict`` saved like the official training script: weights, AdamW state, args, counters."""
    import torch

    optimizer = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(v),
                               "exp_avg_sq": torch.zeros_like(v)} for i, v in enumerate(state_dict.values())},
                 "param_groups": [{"lr": 8e-5, "betas": (0.9, 0.999), "weight_decay": 0.1,
                                   "params": list(range(len(state_dict)))}]}
    checkpoint = {"epoch": 7, "model_state_dict": state_dict, "optimizer_state_dict": optimizer,
                  "lr_scheduler_state_dict": {"milestones": collections.Counter({120: 1, 180: 1}), "last_epoch": 7},
                  "losses": [0.5, 0.4], "dices": [0.7, 0.8], "best_loss": 0.4, "best_dice": 0.8,
                  "args": argparse.Namespace(model_type="vit_b_ori", checkpoint="./work_dir/SAM/sam_med3d.pth",
                                             device=torch.device("cpu")),
                  "used_datas": collections.Counter({"CT_liver": 3})}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(path: Path, *entries: dict) -> Path:
    """A manifest file with ``entries`` (each overriding a default test entry)."""
    models = []
    for overrides in entries:
        entry = {"name": "test-model", "architecture": "fastsam3d", "title": "Test model", "filename": "test.pth",
                 "urls": [], "size": 1, "size_exact": True, "sha256": None, "weights_key": "model_state_dict",
                 "licence": "Apache-2.0", "citation": "nobody"}
        entry.update(overrides)
        models.append(entry)
    path.write_text(json.dumps({"format_version": 1, "models": models}))
    return path


@pytest.fixture
def no_proxy_env(monkeypatch):
    """Remove every proxy variable, so tests talk to 127.0.0.1 directly unless they set one."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(no_proxy_env):
    srv = FileServer()
    yield srv
    srv.stop()
