"""The FastSAM3D server on 127.0.0.1 (uvicorn, in this process) and its torch-free client.

Every result is compared bit for bit with a local InteractiveSession of the same model (``tiny-test`` and the
bundled ``fastsam3d-demo``); refusals (auth, size, rate, session count, protocol, malformed bodies) are sent
for real and must leave the client's session exactly as it was.
"""
import functools
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="the server extra is not installed (pip install -r requirements-dev.txt)")
uvicorn = pytest.importorskip("uvicorn", reason="the server extra is not installed")

import torch  # noqa: E402

from FastSAM3DLib import remote  # noqa: E402
from FastSAM3DLib.errors import FastSAM3DError, InputImageError, OutOfMemoryError, PromptError  # noqa: E402
from FastSAM3DLib.geometry import Volume  # noqa: E402
from FastSAM3DLib.server import engine, protocol  # noqa: E402
from FastSAM3DLib.server.app import LocalBackend, create_app  # noqa: E402
from FastSAM3DLib.server.sessions import SignedSessionIds  # noqa: E402
from FastSAM3DLib.server.settings import ServerSettings, hash_token, uvicorn_options  # noqa: E402
from FastSAM3DLib.session import InteractiveSession  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiny-test", "fastsam3d-demo")
TOKEN = "test-token-0123456789abcdef"


# ------------------------------------------------------------------------------------------------ helpers
def phantom(seed=0, shift=0):
    """Two bright blobs 200 mm apart in a noisy, anisotropic, offset volume (a click on each moves the ROI)."""
    rng = np.random.default_rng(seed)
    shape = (40, 60, 200)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    blob_a = ((k - 20) / 8) ** 2 + ((j - 30 - shift) / 12) ** 2 + ((i - 40) / 15) ** 2 < 1
    blob_b = ((k - 20) / 10) ** 2 + ((j - 28) / 10) ** 2 + ((i - 170 + shift) / 12) ** 2 < 1
    array = (100 + 10 * rng.standard_normal(shape) + 300 * blob_a + 200 * blob_b).astype(np.int16)
    ijk_to_ras = np.diag([1.5, 1.5, 2.0, 1.0])
    ijk_to_ras[:3, 3] = (-150.0, 20.0, -35.0)
    return Volume(array, ijk_to_ras)


def ras(volume, ijk):
    return (volume.ijk_to_ras @ np.append(np.asarray(ijk, float), 1.0))[:3]


# (i, j, k) voxel, include: near blob A, refine, exclude, far blob B (ROI moves), back to A (cached region)
CLICKS = [((40, 30, 20), True), ((45, 33, 21), True), ((60, 30, 20), False), ((170, 28, 20), True),
          ((42, 31, 19), True)]


@functools.lru_cache(maxsize=None)
def served_model(spec, device="cpu"):
    """One model per name for every server of this module (a restart keeps nothing else)."""
    return engine.load_model(spec, device)


@functools.lru_cache(maxsize=None)
def local_model(name):
    """The local twin: the same weights as the server's (tiny-test: the same seed)."""
    return engine.load_model(name, "cpu")


class Server:
    """A uvicorn server on 127.0.0.1 in a thread; ``with Server(settings) as s: s.url``."""

    def __init__(self, settings=None, port=0, ssl_files=None, loader=None, keep_alive_s=1, **overrides):
        settings = settings or ServerSettings(models=MODELS)
        for key, value in overrides.items():
            setattr(settings, key, value)
        self.settings = settings
        self.backend = LocalBackend(settings, engine.ModelPool(settings, loader=loader or served_model))
        self.app = create_app(settings, self.backend)
        tls = dict(ssl_certfile=ssl_files[0], ssl_keyfile=ssl_files[1]) if ssl_files else {}
        self.scheme = "https" if ssl_files else "http"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="off", timeout_keep_alive=keep_alive_s,
                                                    timeout_graceful_shutdown=5, **tls,
                                                    **uvicorn_options(settings)))

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def server():
    with Server() as s:
        yield s


def raw(url, method, path, body=b"", headers=None, protocol_header=True):
    """(status, headers, body) of one hand-made request."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    all_headers = {protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)} if protocol_header else {}
    all_headers.update(headers or {})
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), data


def post_bytes(path, body: bytes, content_type="application/json", length=None) -> bytes:
    """A FastSAM3D client's POST as bytes, for a raw socket; ``length``: another Content-Length to declare (a
    body that stops short)."""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{protocol.PROTOCOL_HEADER}: {protocol.PROTOCOL_VERSION}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n"
            ).encode() + body


def same(a, b):
    """Local and remote ClickResults are bit for bit equal."""
    return (a.region == b.region and a.mask.shape == b.mask.shape and np.array_equal(a.mask, b.mask)
            and (a.iou == b.iou or (np.isnan(a.iou) and np.isnan(b.iou))))


def assert_same_state(local, rem):
    assert local.roi == rem.roi
    if local.low_res_logits is None:
        assert rem.low_res_logits is None
    else:
        assert np.array_equal(local.low_res_logits.numpy(), rem.low_res_logits)
    assert [(c.ras.tolist(), c.include) for c in local.clicks] == [(c.ras.tolist(), c.include) for c in rem.clicks]


def snapshot(session):
    """What a refused click must not change."""
    logits = None if session.low_res_logits is None else np.array(session.low_res_logits)
    return ([(c.ras.tolist(), c.include) for c in session.clicks], session.roi, logits, len(session._history),
            session._shown_region)


def assert_unchanged(session, before):
    after = snapshot(session)
    assert after[0] == before[0] and after[1] == before[1] and after[3:] == before[3:]
    assert (after[2] is None and before[2] is None) or np.array_equal(after[2], before[2])


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("model_name,prompt_mode", [("tiny-test", None), ("tiny-test", "all"),
                                                    ("fastsam3d-demo", None)])
def test_remote_session_equals_a_local_session_bit_for_bit(server, model_name, prompt_mode):
    volume = phantom()
    local = InteractiveSession(local_model(model_name), volume, prompt_mode=prompt_mode)
    rem = remote.RemoteSession(server.url, model_name, volume, prompt_mode=prompt_mode)
    assert rem.prompt_mode == local.prompt_mode and rem.size == local.size
    for ijk, include in CLICKS:
        a, b = local.add_click(ras(volume, ijk), include), rem.add_click(ras(volume, ijk), include)
        assert same(a, b), f"click {ijk} differs"
        assert_same_state(local, rem)
    assert any(r.voxels for r in [a, b])
    for _ in range(2):  # undo needs no server
        assert same(local.undo(), rem.undo())
        assert_same_state(local, rem)
    ijk = (168, 27, 21)
    assert same(local.add_click(ras(volume, ijk)), rem.add_click(ras(volume, ijk)))
    local.reset(), rem.reset()
    assert same(local.add_click(ras(volume, CLICKS[0][0])), rem.add_click(ras(volume, CLICKS[0][0])))
    assert np.array_equal(local.full_mask(local.undo()), rem.full_mask(rem.undo()))
    rem.close()


def test_a_region_revisited_after_an_undo_continues_from_its_cached_state(server):
    """Undo keeps the region's state before the undone click: coming back to it later feeds the new click alone
    (one decoder run), not every earlier click of the region again."""
    volume = phantom()
    local = InteractiveSession(local_model("tiny-test"), volume)
    rem = remote.RemoteSession(server.url, "tiny-test", volume)
    steps, request = [], rem._request
    rem._request = lambda roi, run, *args, **kwargs: steps.append(len(run)) or request(roi, run, *args, **kwargs)
    a, b, far, back = (ras(volume, ijk) for ijk in ((40, 30, 20), (45, 33, 21), (170, 28, 20), (42, 31, 19)))
    for point in (a, b):
        assert same(local.add_click(point), rem.add_click(point))
    assert same(local.undo(), rem.undo())
    for point in (far, back):
        assert same(local.add_click(point), rem.add_click(point))
    assert_same_state(local, rem)
    assert steps == [1, 1, 1, 1], steps  # the undo asked nothing; the return fed one click on the cached state
    rem.close()


def test_a_replay_longer_than_the_servers_step_limit_is_split_and_equal():
    """A region move replays every click inside it in one request: past --max-steps (64) the server refused it,
    and past --max-points a prompt of every click was refused without a word on the client."""
    volume = phantom()
    rng = np.random.default_rng(0)
    near_a = [ras(volume, (40 + rng.integers(-4, 5), 30 + rng.integers(-4, 5), 20 + rng.integers(-3, 4)))
              for _ in range(7)]
    with Server(ServerSettings(models=("tiny-test",), max_steps=3, max_points=8)) as s:
        local = InteractiveSession(local_model("tiny-test"), volume)
        rem = remote.RemoteSession(s.url, "tiny-test", volume)
        for point in near_a:
            assert same(local.add_click(point), rem.add_click(point))
        far = ras(volume, (100, 30, 20))  # the region moves; all 8 clicks are replayed: 3 requests
        assert same(local.add_click(far), rem.add_click(far))
        assert_same_state(local, rem)
        rem.close()
        every = remote.RemoteSession(s.url, "tiny-test", volume, prompt_mode="all")
        for point in near_a + [near_a[0]]:
            every.add_click(point)
        with pytest.raises(PromptError, match="at most 8 per decoder run"):
            every.add_click(near_a[1])
        assert len(every.clicks) == 8
        every.close()


def test_a_server_restarted_with_a_larger_upload_limit_is_asked_again():
    """The client kept the limit it read when the session opened and refused every click itself."""
    volume = phantom()
    with Server(ServerSettings(models=("tiny-test",), max_upload_bytes=2 ** 18)) as small:
        port = small.port
        rem = remote.RemoteSession(small.url, "tiny-test", volume)
        with pytest.raises(remote.ServerError, match="upload limit"):
            rem.add_click(ras(volume, CLICKS[0][0]))
    with Server(ServerSettings(models=("tiny-test",)), port=port):
        local = InteractiveSession(local_model("tiny-test"), volume)
        assert same(local.add_click(ras(volume, CLICKS[0][0])), rem.add_click(ras(volume, CLICKS[0][0])))
    rem.client.close()


def test_a_model_output_error_is_one_class_locally_and_through_a_server():
    """Code catching the local session's ModelOutputError missed the remote session's, a class of its own."""
    from FastSAM3DLib import errors, session

    assert remote.ModelOutputError is session.ModelOutputError is errors.ModelOutputError


def test_without_torch_geometry_the_client_equals_the_sitk_reference(server, monkeypatch):
    """The torch-free path (SimpleITK resampling, numpy upsampling) equals a local session that resamples with
    SimpleITK (``FASTSAM3D_RESAMPLE=sitk``)."""
    monkeypatch.setenv("FASTSAM3D_RESAMPLE", "sitk")
    monkeypatch.setattr(remote.cut_and_paste, "_LIBRARY_GEOMETRY", False)
    volume = phantom(seed=1)
    local = InteractiveSession(local_model("fastsam3d-demo"), volume)
    rem = remote.RemoteSession(server.url, "fastsam3d-demo", volume)
    for ijk, include in CLICKS[:4]:
        assert same(local.add_click(ras(volume, ijk), include), rem.add_click(ras(volume, ijk), include))


def test_numpy_upsampling_equals_torch_bit_for_bit():
    rng = np.random.default_rng(0)
    for scale in (1.0, 1e-12, 1e-30):
        low = (10 * rng.standard_normal((32, 32, 32))).astype(np.float32)
        low[::3] *= np.float32(scale)  # tiny next to large: the fused multiply-add's rounding shows
        expected = torch.nn.functional.interpolate(torch.from_numpy(low)[None, None], size=(128,) * 3,
                                                   mode="trilinear", align_corners=False)[0, 0].numpy()
        assert np.array_equal(remote.upsample_logits(low, 128), expected)


def test_numpy_upsampling_without_fused_multiply_add_equals_torchs_default_build():
    """A torch built without AVX2 (ATEN_CPU_CAPABILITY=default) rounds each product: so does ``fused=False``."""
    code = ("import numpy as np, torch, sys; from FastSAM3DLib import remote; x = (10 * np.random.default_rng(1)"
            ".standard_normal((32, 32, 32))).astype(np.float32); e = torch.nn.functional.interpolate(torch.from_numpy"
            "(x)[None, None], size=(128,) * 3, mode='trilinear', align_corners=False)[0, 0].numpy(); "
            "assert not remote.torch_cpu_fuses(); assert np.array_equal(remote.upsample_logits(x, 128), e); "
            "assert not np.array_equal(remote.upsample_logits(x, 128, fused=True), e); print('ok')")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_the_client_runs_without_torch(server, tmp_path, monkeypatch):
    """In a Python where ``import torch`` fails, the client still segments, equal to the SimpleITK reference."""
    volume = phantom(seed=2)
    np.save(tmp_path / "array.npy", volume.array)
    np.save(tmp_path / "matrix.npy", volume.ijk_to_ras)
    code = f"""
import sys; sys.modules['torch'] = None
import numpy as np
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib import remote
assert not remote.library_geometry() and 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]
v = Volume(np.load({str(tmp_path / 'array.npy')!r}), np.load({str(tmp_path / 'matrix.npy')!r}))
s = remote.RemoteSession({server.url!r}, 'tiny-test', v)
for ijk in [(40, 30, 20), (45, 33, 21)]:
    r = s.add_click((v.ijk_to_ras @ np.append(np.asarray(ijk, float), 1.0))[:3])
np.save({str(tmp_path / 'mask.npy')!r}, s.full_mask(r))
print('ok')
"""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), FASTSAM3D_RESAMPLE="sitk")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    monkeypatch.setenv("FASTSAM3D_RESAMPLE", "sitk")
    local = InteractiveSession(local_model("tiny-test"), volume)
    local.add_click(ras(volume, (40, 30, 20)))
    expected = local.full_mask(local.add_click(ras(volume, (45, 33, 21))))
    assert np.array_equal(np.load(tmp_path / "mask.npy"), expected)


def test_concurrent_clients_each_get_their_own_results(server):
    volumes = [phantom(seed=s, shift=s) for s in range(4)]
    expected = []
    for volume in volumes:
        local = InteractiveSession(local_model("tiny-test"), volume)
        expected.append([local.full_mask(local.add_click(ras(volume, ijk), inc)) for ijk, inc in CLICKS[:3]])
    results, errors = [None] * 4, []

    def user(index):
        try:
            volume = volumes[index]
            rem = remote.RemoteSession(server.url, "tiny-test", volume)
            results[index] = [rem.full_mask(rem.add_click(ras(volume, ijk), inc)) for ijk, inc in CLICKS[:3]]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for got, want in zip(results, expected):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert not all(np.array_equal(expected[0][-1], e[-1]) for e in expected[1:])  # the users really differ


# ------------------------------------------------------------------------------------------------ restarts
def test_a_server_restart_mid_session_costs_one_slower_click_and_never_a_wrong_one():
    volume = phantom()
    local = InteractiveSession(local_model("tiny-test"), volume)
    with Server() as first:
        port = first.port
        rem = remote.RemoteSession(first.url, "tiny-test", volume)
        rem.client.retries = 0
        for ijk, inc in CLICKS[:2]:
            assert same(local.add_click(ras(volume, ijk), inc), rem.add_click(ras(volume, ijk), inc))
    before = snapshot(rem)
    with pytest.raises(remote.ServerUnavailableError, match="cannot be reached"):
        rem.add_click(ras(volume, CLICKS[2][0]), CLICKS[2][1])
    assert_unchanged(rem, before)
    with Server(port=port):  # a new process state: no sessions, no embeddings
        old_session = rem._session_id
        a, b = local.add_click(ras(volume, CLICKS[2][0]), False), rem.add_click(ras(volume, CLICKS[2][0]), False)
        assert same(a, b) and b.encoded and rem._session_id != old_session  # re-created, region sent again
        a, b = local.add_click(ras(volume, (44, 29, 20))), rem.add_click(ras(volume, (44, 29, 20)))
        assert same(a, b) and not b.encoded
        assert same(local.undo(), rem.undo()) and same(local.undo(), rem.undo())
        a, b = local.add_click(ras(volume, (41, 31, 20))), rem.add_click(ras(volume, (41, 31, 20)))
        assert same(a, b)  # the undone state's logits were sent inline: the new server never had them


def test_a_closed_idle_connection_is_reopened_at_once_and_a_timeout_is_reported(server, monkeypatch):
    volume = phantom()
    rem = remote.RemoteSession(server.url, "tiny-test", volume)
    rem.add_click(ras(volume, CLICKS[0][0]))
    time.sleep(1.5)  # the server (timeout_keep_alive=1) closes the kept-alive connection
    naps = []
    monkeypatch.setattr(remote.client.time, "sleep", naps.append)
    rem.add_click(ras(volume, CLICKS[1][0]))
    assert naps == []  # reconnected without a retry pause
    rem.client.timeout = 1e-4
    before = snapshot(rem)
    with pytest.raises(remote.ServerUnavailableError, match="did not answer within"):
        rem.add_click(ras(volume, CLICKS[2][0]), False)
    assert_unchanged(rem, before)
    assert naps == []


def test_a_connect_timeout_is_reported_with_its_own_limit():
    """A host that drops the connection attempt is reported after connect_timeout, not as a slow answer."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepts: once the backlog holds one connection, Linux drops further attempts
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            client = remote.ServerClient(f"http://127.0.0.1:{port}", connect_timeout=0.3, timeout=100, retries=0)
            started = time.monotonic()
            with pytest.raises(remote.ServerUnavailableError, match=r"No connection .* within 0.3 s") as caught:
                client.request("GET", "/v1/info")
    assert time.monotonic() - started < 5 and "100" not in str(caught.value)


def test_an_expired_session_is_reopened_transparently():
    volume = phantom()
    local = InteractiveSession(local_model("tiny-test"), volume)
    with Server(idle_timeout_s=0.3) as s:
        rem = remote.RemoteSession(s.url, "tiny-test", volume)
        assert same(local.add_click(ras(volume, CLICKS[0][0])), rem.add_click(ras(volume, CLICKS[0][0])))
        time.sleep(0.5)
        a, b = local.add_click(ras(volume, CLICKS[1][0])), rem.add_click(ras(volume, CLICKS[1][0]))
        assert same(a, b) and b.encoded
        assert len(s.backend.store) == 1  # the expired one is gone


def test_state_the_server_dropped_is_sent_again():
    """The server keeps 1 embedding and 1 former result per session here: moving between regions and undoing
    makes it ask for them again (409 missing), and results stay exact."""
    volume = phantom()
    local = InteractiveSession(local_model("tiny-test"), volume)
    with Server(embeddings_per_session=1, logits_per_session=1) as s:
        rem = remote.RemoteSession(s.url, "tiny-test", volume)
        rem._embedding_slots = rem._logits_slots = 8  # a client that believes the server holds more
        for ijk, inc in CLICKS:
            assert same(local.add_click(ras(volume, ijk), inc), rem.add_click(ras(volume, ijk), inc))
        for _ in range(3):
            assert same(local.undo(), rem.undo())
        assert same(local.add_click(ras(volume, (43, 30, 20))), rem.add_click(ras(volume, (43, 30, 20))))


# ------------------------------------------------------------------------------------------------ refusals
def test_bad_clicks_raise_the_local_errors_and_change_nothing(server):
    volume = phantom()
    local = InteractiveSession(local_model("tiny-test"), volume)
    rem = remote.RemoteSession(server.url, "tiny-test")
    with pytest.raises(PromptError) as a:
        local.__class__(local_model("tiny-test")).add_click((0, 0, 0))
    with pytest.raises(PromptError) as b:
        rem.add_click((0, 0, 0))
    assert str(a.value) == str(b.value)
    with pytest.raises(InputImageError) as a:
        InteractiveSession(local_model("tiny-test"), Volume(np.zeros((4, 4, 4)), np.eye(4)))
    with pytest.raises(InputImageError) as b:
        rem.set_image(Volume(np.zeros((4, 4, 4)), np.eye(4)))
    assert str(a.value) == str(b.value)
    rem.set_image(volume)
    for bad, include in [((1, 2), True), ((np.nan, 0, 0), True), ("x", True), ((1e4, 0, 0), True),
                         (ras(volume, CLICKS[0][0]), False)]:
        before = snapshot(rem)
        with pytest.raises(PromptError) as a:
            local.add_click(bad, include)
        with pytest.raises(PromptError) as b:
            rem.add_click(bad, include)
        assert str(a.value) == str(b.value)
        assert_unchanged(rem, before)
    with pytest.raises(PromptError, match="no click to undo"):
        rem.undo()


def test_a_failed_replay_or_undo_leaves_a_remote_session_as_it_was(server, monkeypatch):
    from FastSAM3DLib import scene
    from FastSAM3DLib.remote import session as remote_session

    volume = phantom()
    rem = remote.RemoteSession(server.url, "tiny-test", volume)
    points = [ras(volume, ijk) for ijk, _ in CLICKS[:2]]
    scene.replay_clicks(rem, points, [1, 1])
    before = snapshot(rem)
    with pytest.raises(PromptError):  # an edited list whose second point lies outside: replayed from scratch
        scene.replay_clicks(rem, [points[0], points[1] + 1e4], [1, 1])
    assert_unchanged(rem, before)

    def exhausted(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(remote_session, "paste_back", exhausted)
    with pytest.raises(OutOfMemoryError):
        rem.undo()
    monkeypatch.undo()
    assert_unchanged(rem, before)
    local = InteractiveSession(local_model("tiny-test"), volume)
    local.add_click(points[0]), local.add_click(points[1])
    assert same(local.undo(), rem.undo())
    rem.close()


@pytest.mark.parametrize("failure,status,code", [(MemoryError("simulated"), 503, "out_of_memory"),
                                                 (RuntimeError("secret detail"), 500, "internal")])
def test_a_click_failing_on_the_server_gets_its_status_and_the_server_goes_on(server, monkeypatch, failure, status,
                                                                               code):
    """Out of memory is worth retrying (503, Retry-After); anything else is the server's fault (500), whose details
    stay in its log."""
    rem = remote.RemoteSession(server.url, "tiny-test", phantom())
    path = f"/v1/sessions/{rem._session_id}/click"
    body = protocol.pack({"model": "tiny-test", "embedding": "e", "previous": None,
                          "steps": [{"points": [[60.0, 60.0, 60.0]], "labels": [1]}]},
                         {"image": np.zeros((128,) * 3, np.float32)})

    def fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(engine, "encode_image", fails)
    got, headers, reply = raw(server.url, "POST", path, body, {"Content-Type": protocol.FRAME_TYPE,
                                                               protocol.SESSION_HEADER: rem._session_id})
    message = json.loads(reply)
    assert got == status and message["error"] == code and "secret detail" not in reply.decode()
    assert ("retry-after" in headers) == (code == "out_of_memory")
    monkeypatch.undo()
    volume = rem.volume
    local = InteractiveSession(local_model("tiny-test"), volume)
    assert same(local.add_click(ras(volume, CLICKS[0][0])), rem.add_click(ras(volume, CLICKS[0][0])))


def test_a_token_is_required_when_set_and_never_shown():
    with Server(token_sha256=hash_token(TOKEN)) as s:
        for token in (None, "wrong-token-0123456789"):
            with pytest.raises(remote.ServerAuthError, match="refused the token"):
                remote.RemoteSession(s.url, "tiny-test", token=token)
        status, headers, _ = raw(s.url, "GET", "/v1/info", headers={"Authorization": "Basic abc"})
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert raw(s.url, "GET", "/healthz", protocol_header=False)[0] == 200  # health checks need no token
        rem = remote.RemoteSession(s.url, "tiny-test", phantom(), token=TOKEN)
        assert rem.add_click(ras(rem.volume, CLICKS[0][0])).voxels >= 0
        assert TOKEN not in repr(rem.client) and TOKEN not in repr(rem)


def test_a_token_no_header_can_carry_is_refused_on_both_sides(tmp_path):
    from FastSAM3DLib.errors import FastSAM3DError
    from FastSAM3DLib.server.settings import read_token

    token = "geheim-schlüssel-€-0123456789"
    (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
    for kwargs in ({"token_file": str(tmp_path / "token")}, {"environ": {"FASTSAM3D_SERVER_TOKEN": "a b" * 8}}):
        with pytest.raises(FastSAM3DError, match="ASCII"):
            read_token(**kwargs)
    assert read_token(environ={"FASTSAM3D_SERVER_TOKEN": TOKEN}) == TOKEN
    with pytest.raises(remote.ServerAuthError, match="ASCII"):
        remote.ServerClient("http://127.0.0.1:1", token)


def test_a_refused_image_leaves_no_session_open_on_the_server():
    broken = Volume(np.zeros((20, 20, 20), np.int16), np.diag([1.0, 1.0, 0.0, 1.0]))  # not invertible
    with Server(ServerSettings(models=MODELS, max_sessions=1)) as s:
        for _ in range(3):
            with pytest.raises(InputImageError, match="geometry is invalid"):
                remote.RemoteSession(s.url, "tiny-test", broken)
        remote.RemoteSession(s.url, "tiny-test", phantom()).close()  # the only slot is still free


def test_a_session_lost_again_and_again_is_reported_as_unavailable():
    volume = phantom()
    with Server(ServerSettings(models=MODELS, idle_timeout_s=1e-6)) as s:  # every session expires at once
        rem = remote.RemoteSession(s.url, "tiny-test", volume)
        with pytest.raises(remote.ServerUnavailableError, match="kept losing"):
            rem.add_click(ras(volume, CLICKS[0][0]))
        assert rem.clicks == [] and rem.low_res_logits is None


def test_a_refused_click_does_not_bind_a_new_replica_session_to_its_model():
    """On Ray a replica meets a session with no model yet; a refused request must not choose it."""
    from FastSAM3DLib.server.sessions import ServiceError, SessionState

    settings = ServerSettings(models=("tiny-test",))
    pool = engine.ModelPool(settings, loader=served_model)
    state = SessionState(None, settings)
    bad = protocol.pack({"model": "tiny-test", "embedding": "e", "steps": [], "previous": None}, {})
    with pytest.raises(ServiceError):
        engine.click(pool, state, bad)
    assert state.model is None
    good = protocol.pack({"model": "tiny-test", "embedding": "e", "steps": [{"points": [[60.0] * 3], "labels": [1]}],
                          "previous": None}, {"image": np.zeros((128,) * 3, np.float32)})
    engine.click(pool, state, good)
    assert state.model == "tiny-test"


def test_a_closed_session_keeps_nothing_and_is_refused(monkeypatch):
    """Closing a session (on Ray: its replica's state) freed nothing, and a click that already had the session
    ran on anyway; a click running while the session closed kept its embedding."""
    from FastSAM3DLib.server.sessions import ServiceError, SessionState, SessionStore

    settings = ServerSettings(models=("tiny-test",))
    pool = engine.ModelPool(settings, loader=served_model)
    click = protocol.pack({"model": "tiny-test", "embedding": "e", "steps": [{"points": [[60.0] * 3], "labels": [1]}],
                           "previous": None}, {"image": np.zeros((128,) * 3, np.float32)})
    state = SessionState(None, settings)
    engine.click(pool, state, click)
    assert state.embeddings and state.logits
    state.close()
    assert not state.embeddings and not state.logits
    with pytest.raises(ServiceError) as refused:
        engine.click(pool, state, click)
    assert refused.value.code == "session_unknown" and not state.embeddings

    store = SessionStore(settings)
    session_id, running = store.create("tiny-test")
    real_decode, closing = engine.decode, []

    def decode_then_close(*args):  # the close request arrives while the click holds the session's lock
        closing.append(threading.Thread(target=store.close, args=(session_id,)))
        closing[0].start()
        deadline = time.monotonic() + 5
        while not running.closed and time.monotonic() < deadline:
            time.sleep(0.001)
        return real_decode(*args)

    monkeypatch.setattr(engine, "decode", decode_then_close)
    engine.click(pool, running, click)
    closing[0].join(timeout=10)
    assert not closing[0].is_alive() and not running.embeddings and not running.logits
    with pytest.raises(ServiceError) as refused:  # a click that had the state before the close
        engine.click(pool, running, click)
    assert refused.value.code == "session_unknown"


def test_a_refused_click_leaves_the_order_of_the_sessions_caches_as_it_was():
    """The lookups marked the embedding and logits used before the click could still be refused (409 missing,
    422): the next region then evicted another embedding than the client's mirror expected."""
    from FastSAM3DLib.server.sessions import ServiceError, SessionState

    settings = ServerSettings(models=("tiny-test",))
    pool = engine.ModelPool(settings, loader=served_model)
    state = SessionState(None, settings)
    image = {"image": np.zeros((128,) * 3, np.float32)}
    step = [{"points": [[60.0] * 3], "labels": [1]}]
    for key in ("A", "B"):
        engine.click(pool, state, protocol.pack({"model": "tiny-test", "embedding": key, "steps": step,
                                                 "previous": None}, image))
    embeddings, logits = list(state.embeddings), list(state.logits)
    refused = protocol.pack({"model": "tiny-test", "embedding": "A", "steps": step, "previous": "dropped"}, {})
    with pytest.raises(ServiceError) as missing:
        engine.click(pool, state, refused)
    assert missing.value.code == "missing"
    assert list(state.embeddings) == embeddings and list(state.logits) == logits
    engine.click(pool, state, protocol.pack({"model": "tiny-test", "embedding": "A", "steps": step,
                                             "previous": logits[0]}, {}))
    assert list(state.embeddings) == ["B", "A"] and list(state.logits)[-2] == logits[0]  # used: now the newest


def test_logits_sent_again_are_used_whatever_id_the_click_names():
    """A client that sends the previous logits (the server had dropped them) may still name their old id: the
    logits it sent are used, as if the server had kept them, whether or not it still holds that id."""
    from FastSAM3DLib.server.sessions import SessionState

    settings = ServerSettings(models=("tiny-test",))
    pool = engine.ModelPool(settings, loader=served_model)
    state = SessionState(None, settings)
    image = {"image": np.zeros((128,) * 3, np.float32)}
    first = [{"points": [[60.0] * 3], "labels": [1]}]
    second = [{"points": [[70.0, 60.0, 60.0]], "labels": [0]}]
    engine.click(pool, state, protocol.pack({"model": "tiny-test", "embedding": "e", "steps": first,
                                             "previous": None}, image))
    kept_id = list(state.logits)[-1]
    kept = state.logits[kept_id].copy()
    reply = {"logits": ("float32", kept.shape)}
    by_id = protocol.unpack(engine.click(pool, state, protocol.pack(
        {"model": "tiny-test", "embedding": "e", "steps": second, "previous": kept_id}, {})), reply)
    for named in ("dropped-long-ago", kept_id):
        sent = protocol.unpack(engine.click(pool, state, protocol.pack(
            {"model": "tiny-test", "embedding": "e", "steps": second, "previous": named},
            {"previous_logits": kept})), reply)
        assert np.array_equal(sent[1]["logits"], by_id[1]["logits"]), named


def test_a_click_with_as_many_steps_and_points_as_the_server_allows_is_read():
    """The frame header was capped at 256 KiB, less than max_steps x max_points floats need: such a click got
    "the frame header length ... is invalid"."""
    settings = ServerSettings(models=("tiny-test",))
    steps = [{"points": [[60.123456789012345, 61.98765432109876, 62.55555555555555]] * 100, "labels": [1] * 100}
             for _ in range(settings.max_steps)]
    frame = protocol.pack({"model": "tiny-test", "embedding": "e", "steps": steps, "previous": None}, {})
    assert len(frame) > protocol.MAX_HEADER_BYTES
    header, _ = protocol.unpack(frame, {}, settings.max_header_bytes())
    assert len(header["steps"]) == settings.max_steps
    with pytest.raises(protocol.FrameError, match="fewer decoder steps or points"):
        protocol.unpack(frame, {})


def test_clicks_waiting_for_their_session_neither_pile_up_nor_hold_up_other_requests(monkeypatch):
    """Clicks queued on one session held the threads that opening and closing sessions need (a close waited
    12 s), and a client could queue them without end."""
    from FastSAM3DLib.server import app as server_app

    release = threading.Event()
    real_click = engine.click
    monkeypatch.setattr(engine, "click", lambda *args: release.wait(30) and real_click(*args))
    with Server(ServerSettings(models=("tiny-test",), rate_per_s=1000, rate_burst=1000)) as srv:
        sessions = [raw(srv.url, "POST", "/v1/sessions", json.dumps({"model": "tiny-test"}).encode())
                    for _ in range(2)]
        busy, other = (json.loads(body)["session"] for status, _, body in sessions)
        frame = protocol.pack({"model": "tiny-test", "embedding": "e", "steps": [{"points": [[60.0] * 3],
                               "labels": [1]}], "previous": None}, {"image": np.zeros((128,) * 3, np.float32)})
        answers = []
        waiting = [threading.Thread(target=lambda: answers.append(raw(srv.url, "POST", f"/v1/sessions/{busy}/click",
                                                                      frame)))
                   for _ in range(server_app.MAX_QUEUED_CLICKS + 2)]
        try:
            for thread in waiting:
                thread.start()
            deadline = time.monotonic() + 20
            while len(answers) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = [json.loads(body)["error"] for status, _, body in answers]
            assert refused == ["rate_limited"] * 2, refused  # the two beyond the limit, at once
            start = time.monotonic()
            status, _, _ = raw(srv.url, "DELETE", f"/v1/sessions/{other}")
            assert status == 204 and time.monotonic() - start < 5
        finally:
            release.set()
            for thread in waiting:
                thread.join(30)
        assert sorted(status for status, _, _ in answers) == [200] * server_app.MAX_QUEUED_CLICKS + [429] * 2


def test_clicks_whose_client_left_are_not_computed():
    """A client that gave up (closed Slicer, lost the network) left its queued clicks to be computed anyway: the
    user's next click waited 10 s behind them."""
    with Server(ServerSettings(models=("tiny-test",), rate_per_s=1000, rate_burst=1000)) as srv:
        status, _, body = raw(srv.url, "POST", "/v1/sessions", json.dumps({"model": "tiny-test"}).encode())
        session = json.loads(body)["session"]
        state = srv.backend.store.get(session)
        checked = []
        real_check = state.check_open
        state.check_open = lambda: checked.append(1) or real_check()  # the first step after the abandoned test
        frame = protocol.pack({"model": "tiny-test", "embedding": "e", "steps": [{"points": [[60.0] * 3],
                               "labels": [1]}], "previous": None}, {"image": np.zeros((128,) * 3, np.float32)})
        request = post_bytes(f"/v1/sessions/{session}/click", frame, protocol.FRAME_TYPE)
        host, port = srv.url.split("//")[1].split(":")
        answers = []
        with state.lock:  # a click in progress: the next ones wait for the session
            for sent in range(1, 4):
                with socket.create_connection((host, int(port))) as gone:
                    gone.sendall(request)
                    deadline = time.monotonic() + 10
                    while state.queued < sent and time.monotonic() < deadline:  # read, waiting for the session
                        time.sleep(0.01)
            live = threading.Thread(target=lambda: answers.append(raw(srv.url, "POST",
                                                                      f"/v1/sessions/{session}/click", frame)))
            live.start()
            deadline = time.monotonic() + 10
            while state.queued < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # the server notices the closed connections
        live.join(60)
        assert [status for status, _, _ in answers] == [200]
        assert len(checked) == 1  # only the click someone waits for was computed


def test_a_client_that_leaves_while_the_model_loads_leaves_no_session(monkeypatch):
    """Its session counted toward --max-sessions for 30 minutes, though no one would ever use it."""
    loading = threading.Event()
    with Server(ServerSettings(models=("tiny-test",))) as srv:
        real_get = srv.backend.pool.get
        monkeypatch.setattr(srv.backend.pool, "get", lambda name: loading.wait(30) and real_get(name))
        body = json.dumps({"model": "tiny-test"}).encode()
        request = post_bytes("/v1/sessions", body)
        host, port = srv.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port))) as gone:
            gone.sendall(request)
            time.sleep(0.3)  # the server is loading the model
        time.sleep(0.3)  # and notices the closed connection
        loading.set()
        time.sleep(1.0)
        assert len(srv.backend.store) == 0
        assert raw(srv.url, "POST", "/v1/sessions", body)[0] == 201  # a client that waits gets one


def test_a_new_session_request_is_a_short_json_object():
    """It parsed any JSON up to the upload limit on the event loop (24 MiB: 9 s with the server stalled)."""
    with Server(ServerSettings(models=("tiny-test",))) as srv:
        status, _, body = raw(srv.url, "POST", "/v1/sessions", b"[" + b"[]," * 30000 + b"[]]")
        assert status == 413 and b"short JSON object" in body
        status, _, _ = raw(srv.url, "POST", "/v1/sessions", json.dumps({"model": "tiny-test"}).encode())
        assert status == 201


def test_https_with_the_servers_own_certificate(tmp_path):
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (it makes the test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    with Server(ssl_files=(str(cert), str(key))) as s:
        assert s.url.startswith("https://")
        with pytest.raises(remote.ServerUnavailableError, match="certificate of your institution"):
            remote.RemoteSession(s.url, "tiny-test")  # an authority this computer does not trust
        trusting = ssl.create_default_context(cafile=str(cert))
        with pytest.raises(remote.ServerUnavailableError, match="not made for this address"):
            remote.RemoteSession(model="tiny-test", client=remote.ServerClient(
                s.url.replace("127.0.0.1", "localhost"), ssl_context=trusting, retries=0))
        with pytest.raises(remote.ServerUnavailableError, match="starts with https://"):
            remote.RemoteSession(model="tiny-test", client=remote.ServerClient(s.url.replace("https:", "http:"),
                                                                                retries=0))
        client = remote.ServerClient(s.url, ssl_context=trusting)
        volume = phantom()
        local = InteractiveSession(local_model("tiny-test"), volume)
        rem = remote.RemoteSession(model="tiny-test", volume=volume, client=client)
        assert same(local.add_click(ras(volume, CLICKS[0][0])), rem.add_click(ras(volume, CLICKS[0][0])))
        rem.close()


def test_https_to_a_plain_http_server_says_to_write_http(server):
    """It advised adding a certificate authority."""
    with pytest.raises(remote.ServerUnavailableError, match="answers plain HTTP"):
        remote.RemoteSession(server.url.replace("http:", "https:"), "tiny-test")


def test_settings_refuse_an_open_address_without_a_token(monkeypatch, capsys):
    from FastSAM3DLib.errors import FastSAM3DError
    from FastSAM3DLib.server.command import main

    with pytest.raises(FastSAM3DError, match="without a token"):
        ServerSettings(host="0.0.0.0").check()
    ServerSettings(host="0.0.0.0", token_sha256=hash_token(TOKEN)).check()
    ServerSettings(host="::1").check()
    for unbounded in ({"idle_timeout_s": float("inf")}, {"rate_per_s": float("inf")}, {"rate_per_s": float("nan")}):
        with pytest.raises(FastSAM3DError, match="finite"):
            ServerSettings(**unbounded).check()
    monkeypatch.delenv("FASTSAM3D_SERVER_TOKEN", raising=False)
    assert main(["--host", "0.0.0.0", "--model", "tiny-test", "--device", "cpu"]) == 2
    assert "without a token" in capsys.readouterr().err


def test_another_protocol_version_gets_a_clear_error(server):
    status, _, body = raw(server.url, "GET", "/v1/info", headers={protocol.PROTOCOL_HEADER: "2"})
    assert status == 400 and json.loads(body)["error"] == "protocol" and "speaks protocol 1" in json.loads(body)[
        "message"]
    status, _, body = raw(server.url, "GET", "/v1/info", protocol_header=False)
    assert status == 400 and "is it a FastSAM3D client" in json.loads(body)["message"]
    client = remote.ServerClient(server.url)
    client.protocol = 2  # a newer client
    with pytest.raises(remote.ProtocolMismatchError, match="speaks protocol 1; the client speaks 2"):
        remote.RemoteSession(client=client, model="tiny-test")
    status, _, body = raw(server.url, "POST", "/v2/sessions", b"{}")
    assert status == 404 and "not part of the FastSAM3D protocol" in json.loads(body)["message"]


def test_a_full_server_refuses_new_sessions_clearly_while_all_are_in_use():
    with Server(max_sessions=2) as s:
        first = remote.RemoteSession(s.url, "tiny-test")
        remote.RemoteSession(s.url, "tiny-test")
        with pytest.raises(remote.ServerFullError, match="server is full: 2 sessions .* used within the last 60 s"):
            remote.RemoteSession(s.url, "tiny-test")
        status, headers, body = raw(s.url, "POST", "/v1/sessions", b'{"model": "tiny-test"}')
        assert status == 503 and json.loads(body)["error"] == "full"  # what any HTTP client or proxy sees
        assert 1 <= int(headers["retry-after"]) <= 60  # the seconds until the least recent session may be replaced
        first.close()
        remote.RemoteSession(s.url, "tiny-test")


def test_a_full_server_replaces_the_least_recently_used_idle_session_and_its_user_carries_on():
    """A full server refused every new session until an idle one expired (30 minutes): a team with more
    segments open than --max-sessions was locked out, and one client could shut out the others for that long."""
    from FastSAM3DLib.server import sessions

    volume = phantom()
    with Server(max_sessions=2) as s:
        now = [0.0]
        s.backend.store.clock = lambda: now[0]
        local = InteractiveSession(local_model("tiny-test"), volume)
        old = remote.RemoteSession(s.url, "tiny-test", volume)
        assert same(local.add_click(ras(volume, CLICKS[0][0])), old.add_click(ras(volume, CLICKS[0][0])))
        now[0] += 30.0
        recent = remote.RemoteSession(s.url, "tiny-test")
        now[0] += sessions.MIN_IDLE_TO_REPLACE_S - 29.0  # ``old`` idle for more than the minimum, ``recent`` not
        newcomer = remote.RemoteSession(s.url, "tiny-test")
        assert len(s.backend.store) == 2 and old._session_id not in s.backend.store._sessions
        replaced = old._session_id
        now[0] += sessions.MIN_IDLE_TO_REPLACE_S  # ``recent`` is now the least recently used idle session
        a, b = local.add_click(ras(volume, CLICKS[1][0])), old.add_click(ras(volume, CLICKS[1][0]))
        assert same(a, b) and old._session_id != replaced  # reopened transparently (replacing ``recent``)
        assert recent._session_id not in s.backend.store._sessions and newcomer._session_id in s.backend.store._sessions


def test_an_oversized_request_is_refused_and_the_session_unchanged():
    with Server(max_upload_bytes=2 ** 16) as s:
        rem = remote.RemoteSession(s.url, "tiny-test", phantom())
        sent, click = [], rem.client.click
        rem.client.click = lambda *args: sent.append(len(args[1])) or click(*args)
        for checked_here in (True, False):  # the client knows the limit; or it does not and the server refuses
            rem._max_upload = rem._max_upload if checked_here else None
            before = snapshot(rem)
            with pytest.raises(remote.ServerError, match="upload limit of 0.0625 MiB"):
                rem.add_click(ras(rem.volume, CLICKS[0][0]))
            assert_unchanged(rem, before)
            assert len(sent) == (0 if checked_here else 1), sent  # refused here: the upload is not even sent
        status, _, body = raw(s.url, "POST", f"/v1/sessions/{rem._session_id}/click", b"x" * (2 ** 16 + 1))
        assert status == 413 and json.loads(body)["error"] == "too_large"


def test_the_request_rate_is_limited_and_a_refusal_changes_nothing():
    with Server(rate_per_s=0.5, rate_burst=3) as s:
        rem = remote.RemoteSession(s.url, "tiny-test", phantom())  # request 1
        rem.add_click(ras(rem.volume, CLICKS[0][0]))  # request 2 (uploads the region)
        rem.add_click(ras(rem.volume, CLICKS[1][0]))  # request 3
        before = snapshot(rem)
        with pytest.raises(remote.ServerBusyError, match="Too many requests"):
            rem.add_click(ras(rem.volume, CLICKS[2][0]), False)
        assert_unchanged(rem, before)
        status, headers, _ = raw(s.url, "GET", "/v1/info")
        assert status == 429 and int(headers["retry-after"]) >= 1


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy():
    """Without --trusted-proxy a local user cannot pose as many clients to escape the limit; behind a trusted proxy
    each forwarded client has its own allowance."""
    def statuses(s, clients):
        return [raw(s.url, "GET", "/v1/info", headers={"X-Forwarded-For": client})[0] for client in clients]

    others = [f"198.51.100.{n}" for n in range(6)]
    with Server(rate_per_s=0.5, rate_burst=3) as s:
        assert statuses(s, others) == [200] * 3 + [429] * 3
    with Server(rate_per_s=0.5, rate_burst=3, trusted_proxies=("127.0.0.1",)) as s:
        assert statuses(s, others) == [200] * 6
        assert statuses(s, ["203.0.113.9"] * 4) == [200] * 3 + [429]


@pytest.mark.parametrize("address", ["localhost", "10.0.0.0/8", "*", "proxy.lab.example", ""])
def test_a_trusted_proxy_must_be_one_ip_address(address):
    with pytest.raises(FastSAM3DError, match="--trusted-proxy takes the IP address"):
        ServerSettings(models=MODELS, trusted_proxies=(address,)).check()
    settings = ServerSettings(models=MODELS, trusted_proxies=("[::1]", " 127.0.0.1 "))
    settings.check()
    assert settings.trusted_proxies == ("::1", "127.0.0.1")


def test_the_rate_limiter_remembers_a_bounded_number_of_clients_the_least_recent_forgotten_first():
    """Each client address costs a bucket: a flood of spoofed addresses behind a trusted proxy must not grow the
    server's memory without bound; a client forgotten so starts again with a full allowance."""
    from FastSAM3DLib.server.sessions import RateLimiter

    limiter = RateLimiter(rate=0.001, burst=1, clock=lambda: 0.0)
    limiter.MAX_KEYS = 2
    assert [limiter.allow(client)[0] for client in ("a", "b", "a", "c")] == [True, True, False, True]
    assert limiter.allow("a")[0] is False  # used just before "c": still remembered, still out of allowance
    assert limiter.allow("b")[0] is True  # the least recently seen: forgotten, so allowed again
    wait = limiter.allow("b")[1]
    assert wait == pytest.approx(1000.0)  # one request per 1000 s: the next in 1000 s


def test_the_upload_budget_bounds_each_client_and_all_and_forgets_a_client_whose_uploads_ended():
    """Uploads held at once: a quarter of the budget per client address, the whole budget in all; a refused upload
    counts nothing, and a client whose uploads all ended keeps no entry (one per address ever seen would grow the
    server's memory without bound)."""
    from FastSAM3DLib.server.sessions import ServiceError, UploadBudget

    uploads = UploadBudget(total=400)
    uploads.take("a", 60)
    uploads.take("a", 40)
    with pytest.raises(ServiceError) as err:
        uploads.take("a", 1)  # over a's quarter
    assert err.value.code == "rate_limited" and err.value.retry_after == 1.0 and "nothing was changed" in str(err.value)
    for client in ("b", "c", "d"):
        uploads.take(client, 100)
    with pytest.raises(ServiceError):
        uploads.take("e", 1)  # over the whole budget, though e holds nothing
    assert uploads.receiving == 400 and uploads.per_client == {"a": 100, "b": 100, "c": 100, "d": 100}
    uploads.give_back("a", 60)
    uploads.take("e", 60)  # room again
    for client, size in (("a", 40), ("b", 100), ("c", 100), ("d", 100), ("e", 60)):
        uploads.give_back(client, size)
    assert uploads.receiving == 0 and uploads.per_client == {}


def test_wrong_tokens_are_rate_limited_too():
    """Guessing the token is throttled like any other request (the limit is checked first)."""
    with Server(rate_per_s=0.5, rate_burst=3, token_sha256=hash_token(TOKEN)) as s:
        statuses = [raw(s.url, "GET", "/v1/info", headers={"Authorization": f"Bearer guess-{n:016d}"})[0]
                    for n in range(6)]
    assert statuses[:3] == [401] * 3 and statuses[3:] == [429] * 3


@pytest.mark.parametrize("options,message", [
    (["--port", "70000"], "port"), (["--port", "-5"], "port"), (["--max-upload-mb", "nan"], "max-upload-mb"),
    (["--max-upload-mb", "inf"], "max-upload-mb"), (["--threads", "-1"], "threads"), (["--threads", "0"], "threads"),
    (["--model", "nosuchmodel"], "unknown model"), (["--ray", "--replicas", "0"], "replicas"),
    (["--ray", "--ssl-certfile", "cert.pem", "--ssl-keyfile", "key.pem"], "plain HTTP"),
    (["--trusted-proxy", "localhost"], "trusted-proxy"), (["--ray", "--trusted-proxy", "127.0.0.1"], "trusted-proxy"),
    (["--ssl-keyfile", "key.pem"], "--ssl-certfile"),  # a bare AssertionError from uvicorn, after the models loaded
    (["--ssl-certfile", "no-such-cert.pem", "--ssl-keyfile", "no-such-key.pem"], "Cannot use the certificate")])
def test_the_serve_command_refuses_impossible_settings_in_one_line(options, message, capsys, monkeypatch):
    from FastSAM3DLib.server.command import main

    monkeypatch.delenv("FASTSAM3D_SERVER_TOKEN", raising=False)
    assert main(["--model", "tiny-test", "--device", "cpu", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err


def test_a_port_in_use_is_said_in_one_line_before_the_models_load(capsys, monkeypatch):
    """It was a 6-line uvicorn log with exit status 3, after the models had loaded and the banner said 'on'."""
    from FastSAM3DLib.server.command import main

    monkeypatch.delenv("FASTSAM3D_SERVER_TOKEN", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["--model", "tiny-test", "--device", "cpu", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert "Cannot listen on 127.0.0.1:" in err and "\n" not in err.strip() and "loading" not in out


def test_a_model_without_weights_stops_the_server_at_start_up_with_what_to_do(tmp_path, capsys, monkeypatch):
    """Every served model is loaded before the server says it is on: a missing weights file is one line at
    start-up, not a failure of each user's first click."""
    import uvicorn

    from FastSAM3DLib.server.command import main

    monkeypatch.delenv("FASTSAM3D_SERVER_TOKEN", raising=False)
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(True))
    assert main(["--model", "tiny-test", "--model", "fastsam3d", "--device", "cpu", "--port", "0",
                 "--cache-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert served == [] and "FastSAM3D server on" not in out and "\n" not in err.strip()
    assert "No weights for model 'fastsam3d'" in err
    assert f"python -m FastSAM3DLib download fastsam3d --cache-dir {tmp_path}" in err  # the cache it was given
    assert list(tmp_path.iterdir()) == []


def test_the_serve_command_raises_the_open_file_limit_before_it_serves(monkeypatch, capsys):
    resource = pytest.importorskip("resource", reason="no open-file limit on this platform")
    import uvicorn

    from FastSAM3DLib.server.command import main

    from test_filelock import open_descriptors

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = len(open_descriptors() or ()) + 200  # room for what the command opens before it raises the limit
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip(f"the hard limit here ({hard}) leaves nothing to raise")
    monkeypatch.delenv("FASTSAM3D_SERVER_TOKEN", raising=False)
    serving_with = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: serving_with.append(
        resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        assert main(["--model", "tiny-test", "--device", "cpu", "--port", "0"]) == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert serving_with == [65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)]
    assert "FastSAM3D server on http://127.0.0.1:0" in capsys.readouterr().out


def test_a_restarted_server_can_listen_again_on_its_port_at_once():
    """A server stopped after it served clients leaves their connections in TIME_WAIT for a minute; without
    SO_REUSEADDR the restart said "Cannot listen ... address already in use" until then."""
    from FastSAM3DLib.server.command import listening_socket

    first = listening_socket("127.0.0.1", 0)
    port = first.getsockname()[1]
    first.listen()
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    served, _ = first.accept()
    served.close()  # the server closes first: its side of the connection stays in TIME_WAIT
    client.close()
    first.close()
    again = listening_socket("127.0.0.1", port)
    assert again.getsockname()[1] == port
    again.close()


def test_a_port_that_cannot_be_bound_leaves_no_socket_open():
    from FastSAM3DLib.errors import FastSAM3DError
    from FastSAM3DLib.server.command import listening_socket
    from test_filelock import open_descriptors

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        before, refused = open_descriptors(), None
        try:
            listening_socket("127.0.0.1", taken.getsockname()[1])
        except FastSAM3DError as exc:
            refused = exc  # keeps its traceback, so a socket left open is not closed by the garbage collector
        assert "Cannot listen on 127.0.0.1" in str(refused) and open_descriptors() == before


def _send_raw(url, data: bytes, wait_s: float = 10.0) -> bytes:
    """What the server answers to ``data`` sent as is on a new connection, within ``wait_s``."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as conn:
        conn.sendall(data)
        try:
            return conn.recv(65536)
        except socket.timeout:
            return b""


def test_the_server_raises_its_open_file_limit_to_the_hard_limit():
    """Each connection is a file descriptor: Linux's usual soft limit of 1024 refused clients early."""
    resource = pytest.importorskip("resource", reason="no open-file limit on this platform")
    script = ("import resource; from FastSAM3DLib.server.command import raise_open_file_limit as r; "
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
              "wanted = 1000 if hard == resource.RLIM_INFINITY else min(hard, 1000); "
              "print(r(cap=1000), wanted, resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit here ({hard}) leaves nothing to raise")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] == out[2], out


def test_a_huge_request_line_or_header_is_refused_before_it_is_read(server):
    """uvicorn's default parser read a 64 MiB URL (blocking every other request for seconds) and 200 MiB of
    headers; the h11 parser stops at 16 KiB."""
    huge_url = b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    huge_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (1 << 20) + b"\r\n\r\n"
    for data in (huge_url, huge_header):
        try:
            answer = _send_raw(server.url, data)
        except (BrokenPipeError, ConnectionResetError):
            answer = b"HTTP/1.1 400 (closed while sending)"
        assert answer.startswith(b"HTTP/1.1 4") or answer == b"", answer[:80]
    assert raw(server.url, "GET", "/healthz")[0] == 200


def _closed_within(conn, seconds: float) -> bool:
    """True when the server closes ``conn`` (EOF or reset) within ``seconds``."""
    conn.settimeout(seconds)
    try:
        return conn.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_connections_that_send_no_request_head_in_time_are_closed(monkeypatch):
    """uvicorn timed out only the wait between keep-alive requests: a connection that sent nothing, or trickled
    its headers, held a file descriptor for as long as the client liked."""
    from FastSAM3DLib.server import http_protocol

    monkeypatch.setattr(http_protocol, "REQUEST_HEAD_TIMEOUT_S", 1.0)
    with Server(keep_alive_s=30) as s:
        host, port = "127.0.0.1", s.port
        with socket.create_connection((host, port)) as silent, socket.create_connection((host, port)) as trickle:
            trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
            start = time.monotonic()
            assert _closed_within(silent, 10) and _closed_within(trickle, 10)
            assert time.monotonic() - start < 8
        with socket.create_connection((host, port)) as kept:  # a complete request is not cut; keep-alive works
            for _ in range(2):
                kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                kept.settimeout(10)
                assert kept.recv(65536).startswith(b"HTTP/1.1 200")
                time.sleep(1.5)  # idle longer than the head deadline: keep-alive's own timeout applies
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # then a head that never ends is cut
            assert _closed_within(kept, 10)
        assert raw(s.url, "GET", "/healthz")[0] == 200


def test_a_stalled_upload_is_answered_408_and_frees_its_place(monkeypatch):
    """Uploads that stop half-way (a laptop going to sleep) held their memory for as long as they stayed open."""
    from FastSAM3DLib.server import app

    monkeypatch.setattr(app, "BODY_GRACE_S", 1.0)
    with Server() as s:
        head = post_bytes("/v1/sessions", b'{"model"', length=100)
        start = time.monotonic()
        answer = _send_raw(s.url, head, wait_s=20)
        assert answer.startswith(b"HTTP/1.1 408") and b"too slowly" in answer, answer[:300]
        assert time.monotonic() - start < 10
        assert raw(s.url, "GET", "/healthz")[0] == 200


def test_malformed_requests_get_clear_errors_and_the_server_keeps_working(server):
    rem = remote.RemoteSession(server.url, "tiny-test", phantom())
    session = rem._session_id
    path = f"/v1/sessions/{session}/click"
    step = {"points": [[60.0, 60.0, 60.0]], "labels": [1]}
    good_header = {"model": "tiny-test", "embedding": "e", "steps": [step], "previous": None}
    image = np.zeros((128,) * 3, np.float32)

    def frame(header=None, arrays=None):
        return protocol.pack(header or good_header, arrays if arrays is not None else {"image": image})

    zeros = zlib.compress(bytes(64 * 2 ** 20), 9)  # 64 MiB of zeros in ~64 kB: inflates past the 8 MiB expected
    spec = {"image": {"dtype": "float32", "shape": [128] * 3, "codec": "zlib", "offset": 0, "length": len(zeros)}}
    text = json.dumps(dict(good_header, arrays=spec)).encode()
    bomb = b"FS3D" + struct.pack(">I", len(text)) + text + zeros

    def hand_made(text):  # a frame whose header is exactly ``text``
        return b"FS3D" + struct.pack(">I", len(text)) + text

    def specified(image_spec):  # a frame with 64 kB of payload whose image is described by ``image_spec``
        return hand_made(json.dumps(dict(good_header, arrays={"image": image_spec})).encode()) + zeros

    huge = "1" * 5000  # past Python's 4300-digit limit for int(): json.loads raises ValueError
    shape_number = json.dumps(dict(good_header, arrays={"image": dict(spec["image"], shape=5)})).encode()
    cases = [
        (b"not a frame", 400, "malformed"),
        (b"FS3", 400, "not a FastSAM3D frame"),  # shorter than a frame's fixed part
        (b"FS3D" + struct.pack(">I", 1000) + json.dumps(good_header).encode(), 400, "longer than the body"),
        (frame(arrays={"image": np.zeros((64, 64, 64), np.float32)}), 400, "must be float32 of shape"),
        (frame(arrays={"image": image.astype(np.float64)}), 400, "must be float32"),
        (frame(arrays={"weights": image}), 400, "unexpected array"),
        (bomb, 400, "do not hold exactly"),
        (b"FS3D" + struct.pack(">I", 10) + b'{"model":NaN', 400, "malformed"),
        (frame(dict(good_header, steps=[])), 400, "decoder steps"),
        (frame(dict(good_header, steps=[{"points": [[1, 2]], "labels": [1]}])), 422, "three finite numbers"),
        (frame(dict(good_header, steps=[{"points": [[1e6, 2, 3]], "labels": [1]}])), 422, "outside"),
        (frame(dict(good_header, steps=[{"points": [[1, 2, 3]], "labels": [7]}])), 400, "Labels"),
        (frame(dict(good_header, model="sam-med3d")), 422, "does not serve the model"),
        (frame(arrays={"image": np.full((128,) * 3, np.nan, np.float32)}), 422, "NaN or infinite voxels"),
        (frame(dict(good_header, previous="nope"), arrays={}), 409, "no longer holds image and previous_logits"),
        (frame(dict(good_header, previous=5)), 400, "'previous' must be a logits id or null"),
        (hand_made(b'{"model":"tiny-test","x":' + huge.encode() + b"}"), 400, "malformed"),
        (frame(dict(good_header, steps=[{"points": [[int("1" * 400), 2, 3]], "labels": [1]}])), 422,
         "three finite numbers"),
        *[(frame(dict(good_header, steps=[{"points": [[odd, 2, 3]], "labels": [1]}])), 422, "three finite numbers")
          for odd in (2 ** 53, True, "1", None)],  # past a float's integers, and JSON values that are not numbers
        (hand_made(shape_number), 400, "must be float32 of shape"),
        (hand_made(json.dumps(dict(good_header, arrays=[])).encode()), 400, "'arrays' must be an object"),
        (specified(dict(spec["image"], codec="raw", length=10)), 400, "10 bytes instead of 8388608"),
        (specified(dict(spec["image"], offset=10 ** 9)), 400, "offset/length outside the frame"),
        (specified(dict(spec["image"], offset=-1, length=1)), 400, "offset/length outside the frame"),
    ]
    for body, status, text in cases:
        got, _, reply = raw(server.url, "POST", path, body, {"Content-Type": protocol.FRAME_TYPE,
                                                             protocol.SESSION_HEADER: session})
        message = json.loads(reply)
        assert got == status and text in message["message"], (text, got, message)
    assert raw(server.url, "POST", "/v1/sessions", b"[1, 2]")[0] == 400
    assert raw(server.url, "POST", "/v1/sessions", b'{"model": "nope"}')[0] == 422
    for nameless in (b"{}", b'{"model": 5}', b'{"model": null}'):
        status, _, reply = raw(server.url, "POST", "/v1/sessions", nameless)
        assert status == 400 and "Give the model's name" in json.loads(reply)["message"], (nameless, reply)
    assert raw(server.url, "POST", "/v1/sessions", b'{"model": ' + huge.encode() + b"}")[0] == 400
    assert raw(server.url, "POST", "/v1/sessions/unknown/click", frame())[0] == 404
    volume = phantom()
    local = InteractiveSession(local_model("tiny-test"), volume)
    assert same(local.add_click(ras(volume, CLICKS[0][0])), rem.add_click(ras(volume, CLICKS[0][0])))


def test_signed_session_ids_are_recognised_only_under_their_key():
    """A Ray deployment's replicas accept only ids it issued: invented, tampered or foreign ids are refused."""
    ids, other = SignedSessionIds(b"k" * 32), SignedSessionIds(b"o" * 32)
    issued = ids.new()
    nonce, mac = issued.split(".")
    assert ids.issued(issued) and issued != ids.new()
    tampered = mac[:-1] + ("1" if mac[-1] == "0" else "0")
    for refused in ("invented", "", ".", f"{nonce}.", f".{mac}", f"{nonce}.{tampered}", f"{nonce}x.{mac}",
                    other.new(), f"{nonce}.{mac}\u00e9", issued + ".x"):
        assert not ids.issued(refused), refused


def test_frames_round_trip_losslessly_and_never_unpickle():
    arrays = {"a": np.random.default_rng(0).standard_normal((5, 6, 7)).astype(np.float32)}
    for codec in protocol.CODECS:
        header, out = protocol.unpack(protocol.pack({"x": [1.5, None]}, arrays, codec=codec),
                                      {"a": ("float32", (5, 6, 7))})
        assert header == {"x": [1.5, None]} and np.array_equal(out["a"], arrays["a"]) and out["a"].flags.writeable
    for codec in protocol.CODECS:  # a big-endian volume (as some NIfTI and NRRD files give) is sent little-endian
        big = arrays["a"].astype(">f4")
        _, out = protocol.unpack(protocol.pack({}, {"a": big}, codec=codec), {"a": ("float32", (5, 6, 7))})
        assert np.array_equal(out["a"], arrays["a"])
    with pytest.raises(protocol.FrameError, match="must be float32"):
        protocol.unpack(protocol.pack({}, {"a": np.zeros((2,), object)}, codec="raw"), {"a": ("float32", (2,))})
    with pytest.raises(ValueError):
        protocol.pack({"x": float("nan")})
    damaged = bytearray(protocol.pack({}, arrays))
    damaged[-5:] = b"\x00" * 5
    with pytest.raises(protocol.FrameError):
        protocol.unpack(bytes(damaged), {"a": ("float32", (5, 6, 7))})
    assert zlib  # the codec is zlib: nothing here can execute code


def test_an_address_that_is_not_a_fastsam3d_server(tmp_path):
    assert remote.is_server_url("http://gpu:8000") and remote.is_server_url(" HTTPS://x") \
        and not remote.is_server_url("cuda:0") and not remote.is_server_url(None)
    with pytest.raises(remote.ServerError, match="without user, password"):
        remote.ServerClient("http://user:pw@127.0.0.1:1")
    client = remote.ServerClient("http://127.0.0.1:9", retries=1, backoff_s=0.01, connect_timeout=2)
    with pytest.raises(remote.ServerUnavailableError, match="cannot be reached"):
        remote.RemoteSession(client=client)


def test_the_serve_command_registers_on_the_library_cli():
    import argparse

    from FastSAM3DLib.server.command import add_subcommand, run

    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "tiny-test", "--port", "9999", "--max-sessions", "3"])
    assert args.func is run and args.model == ["tiny-test"] and args.host == "127.0.0.1" and args.max_sessions == 3


def test_the_benchmark_measures_overhead_and_throughput(monkeypatch):
    from FastSAM3DLib.benchmarks import server as bench
    from FastSAM3DLib.benchmarks.suite import Plan

    skipped = bench.measure(Plan(skip={"host": "dry run"}), "cpu")
    assert skipped and all(row["value"] is None and row["skipped"] == "dry run" for row in skipped)
    monkeypatch.setattr(bench, "USERS", (1, 2))
    rows = bench.measure(Plan(models=("tiny-test",), volume_shape=(40, 64, 64), repeats=1), "cpu")
    values = {(row["name"], row["variant"]): row["value"] for row in rows}
    assert values[("server_bytes_per_click_kib", "")] > 0 and values[("server_upload_mib", "")] > 0
    assert values[("server_clicks_per_s", "1 user")] > 0 and values[("server_clicks_per_s", "2 users")] > 0
    assert np.isfinite(values[("server_click_overhead_ms", "")])


def test_a_click_longer_than_the_idle_timeout_keeps_its_session():
    """Idle time counted from the start of a session's last click: a click (a first encode on a busy server)
    that outlasted the timeout left its session to be closed by the next request, right after it answered."""
    from FastSAM3DLib.server.sessions import SessionStore

    now = [0.0]
    settings = ServerSettings(models=("tiny-test",), idle_timeout_s=60.0)
    store = SessionStore(settings, clock=lambda: now[0])
    model = served_model("tiny-test")
    handle = model.image_encoder.register_forward_hook(lambda *args: now.__setitem__(0, now[0] + 100.0))
    try:
        pool = engine.ModelPool(settings, loader=lambda spec, device="cpu": model)
        session_id, state = store.create("tiny-test")
        click = protocol.pack({"model": "tiny-test", "embedding": "e", "previous": None,
                               "steps": [{"points": [[60.0] * 3], "labels": [1]}]},
                              {"image": np.zeros((128,) * 3, np.float32)})
        engine.click(pool, store.get(session_id), click)  # 100 s of encoding at t = 0
    finally:
        handle.remove()
    now[0] += 30.0  # the next request, 30 s after the click answered
    assert store.get(session_id) is state
    now[0] += 61.0
    with pytest.raises(Exception, match="not open"):
        store.get(session_id)


def test_a_session_whose_click_waits_for_its_turn_is_not_closed_as_idle():
    """The sweep skipped sessions running a click but not those whose click waited for a click thread: such a
    session was dropped, and its click then met 'session_unknown'."""
    from FastSAM3DLib.server.sessions import SessionStore

    now = [0.0]
    store = SessionStore(ServerSettings(models=("tiny-test",), idle_timeout_s=60.0), clock=lambda: now[0])
    session_id, state = store.create("tiny-test")
    state.queued = 1  # admitted on the event loop, waiting for a click thread
    now[0] += 120.0
    store.create("tiny-test")  # sweeps
    assert store.get(session_id) is state


def test_a_session_keeps_its_newest_results_and_a_replaced_session_frees_its_state_at_once():
    """Beyond ``logits_per_session`` the oldest former result goes, never the newest (the one the next click names);
    a session replaced on a full server is closed: its embeddings and results are freed now, not when a click
    still running in it ends."""
    from FastSAM3DLib.server.sessions import MIN_IDLE_TO_REPLACE_S, ServiceError, SessionStore

    now = [0.0]
    store = SessionStore(ServerSettings(models=("tiny-test",), max_sessions=1, logits_per_session=2),
                         clock=lambda: now[0])
    old_id, old = store.create("tiny-test")
    kept = [old.keep_logits(np.full(4, i, np.float32)) for i in range(3)]
    assert list(old.logits) == kept[1:]
    old.keep_embedding("region", np.zeros(4, np.float32))
    now[0] += MIN_IDLE_TO_REPLACE_S + 1.0
    new_id, new = store.create("tiny-test")
    assert old.closed and not old.logits and not old.embeddings and not new.closed
    with pytest.raises(ServiceError, match="not open"):
        store.get(old_id)
    assert store.get(new_id) is new


def test_uploads_held_at_once_are_bounded_per_client_and_in_all():
    """Each upload is held in memory until it is complete: one client that stalled many uploads one byte short
    made the server hold them all for minutes (20 x 24 MiB took it from 237 to 723 MiB)."""
    from FastSAM3DLib.server import app

    limit = 64 * 1024
    with Server(max_upload_bytes=limit, trusted_proxies=("127.0.0.1",)) as s:
        session = remote.RemoteSession(s.url, "tiny-test", phantom())._session_id
        opened = []

        def stall(client):
            """A click upload from ``client`` that stops one byte short; the server's answer if it gave one."""
            conn = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            opened.append(conn)
            head = post_bytes(f"/v1/sessions/{session}/click", b"", protocol.FRAME_TYPE, length=limit)
            conn.sendall(head.replace(b"\r\n\r\n", f"\r\nX-Forwarded-For: {client}\r\n\r\n".encode(), 1)
                         + b"x" * (limit - 1))
            conn.settimeout(1.0)
            try:
                return conn.recv(65536)
            except socket.timeout:
                return b""  # held

        try:
            assert [stall("10.0.0.1") for _ in range(app.UPLOADS_AT_ONCE // 4)] == [b""] * 2
            refused = stall("10.0.0.1")  # a quarter of the place is this client's
            assert refused.startswith(b"HTTP/1.1 429") and b"too many uploads at once" in refused, refused[:300]
            assert b"retry-after: 1" in refused.lower()
            for client in ("10.0.0.2", "10.0.0.3", "10.0.0.4"):  # the others still upload, up to the total
                assert [stall(client) for _ in range(2)] == [b""] * 2
            assert stall("10.0.0.5").startswith(b"HTTP/1.1 429")
            for conn in opened:
                conn.close()
            opened.clear()
            deadline = time.monotonic() + 10
            while stall("10.0.0.5").startswith(b"HTTP/1.1 429"):  # closed uploads give their place back
                assert time.monotonic() < deadline, "the places of closed uploads were not given back"
                opened.pop().close()
        finally:
            for conn in opened:
                conn.close()
        assert raw(s.url, "GET", "/healthz")[0] == 200


class _HostileServer:
    """A thread on 127.0.0.1 that answers every request with ``answer(conn)`` (a broken or foreign server)."""

    def __init__(self, answer):
        self.answer, self.listener = answer, socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        self.listener.settimeout(0.2)
        while not self.stopped:
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)  # the request (small, in one piece here)
                    self.answer(conn)
                except OSError:
                    pass

    def __enter__(self):
        self.stopped = False
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped = True
        self.thread.join(10)
        self.listener.close()


def test_a_reply_that_trickles_in_or_is_huge_is_refused_within_the_timeout():
    """The client's timeout bounded each socket read, not the reply: a server sending one byte every 0.3 s kept
    Slicer waiting for as long as it went on, and a reply's length had no limit."""
    def trickle(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(40):
            conn.sendall(b"x")
            time.sleep(0.3)

    def huge(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 65536)

    def chunked_huge(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 20) + b"x" * (1 << 20) + b"\r\n"
        for _ in range(20):
            conn.sendall(chunk)

    with _HostileServer(trickle) as s:
        start = time.monotonic()
        with pytest.raises(remote.ServerUnavailableError, match="did not answer within 2 s"):
            remote.ServerClient(s.url, timeout=2, retries=0).info()
        assert time.monotonic() - start < 6
    for answer in (huge, chunked_huge):
        with _HostileServer(answer) as s:
            with pytest.raises(remote.ServerError, match="over the 16 MiB a FastSAM3D reply can need"):
                remote.ServerClient(s.url, timeout=10, retries=0).info()


@pytest.mark.parametrize("reply, message", [
    (b'{"protocol": 1, "session": "s"}', "no model description"),
    (b'{"protocol": 1, "session": "s", "model": {"image_size": "128", "spacing_mm": 1.5}}', "image_size"),
    (b'{"protocol": 1, "session": "s", "model": {"image_size": 128, "spacing_mm": 1.5, '
     b'"default_prompt_mode": "points"}, "limits": {"max_steps": "many"}}', "limits"),
])
def test_a_malformed_new_session_reply_is_a_server_error(reply, message):
    """A reply without ``model`` raised KeyError deep in RemoteSession, a string size ValueError."""
    def answer(conn):
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(reply) + reply)

    with _HostileServer(answer) as s:
        with pytest.raises(remote.ServerError, match=f"malformed reply to a new session .*{message}"):
            remote.RemoteSession(s.url, "tiny-test", phantom())


def test_an_error_reply_nested_too_deeply_is_a_server_error_not_a_recursion_error():
    body = b"[" * 100_000

    def answer(conn):
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    with _HostileServer(answer) as s:
        with pytest.raises(remote.ServerError, match="without a FastSAM3D error"):
            remote.ServerClient(s.url, retries=0).info()
