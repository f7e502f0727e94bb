"""Download and import against a real HTTP server on 127.0.0.1: resume, verification, failures, concurrency."""
import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from FastSAM3DLib.errors import CheckpointError, DownloadError
from FastSAM3DLib.weights.cache import ModelFiles
from FastSAM3DLib.weights.download import download_model, import_file
from FastSAM3DLib.weights.verify import read_record
from windows_files import windows_text_mode
from test_weights_support import no_proxy_env, server, sha256, write_manifest  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
DATA = random.Random(0).randbytes(300_000)
PATH = "/files/model.pth"


def setup(tmp_path, server, data=DATA, plan=(), sha=True, size=None, urls=None, exact=True):
    """Serve ``data`` and write a manifest for it; return (manifest path, cache dir)."""
    url = server.serve(PATH, data, plan)
    manifest = write_manifest(tmp_path / "models.json", {
        "urls": urls or [url], "size": size or len(data), "size_exact": exact, "filename": "model.pth",
        "sha256": sha256(data) if sha else None})
    return manifest, tmp_path / "cache"


def leftovers(cache: Path):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def files(cache: Path) -> ModelFiles:
    return ModelFiles(cache, "model.pth")


def test_full_download_follows_redirect_reports_progress_and_records(tmp_path, server):
    server.serve("/cdn/model.pth", DATA)
    url = server.redirect("/resolve/model.pth", server.url("/cdn/model.pth"))
    manifest, cache = setup(tmp_path, server, urls=[url])
    calls = []
    path = download_model("test-model", cache, lambda done, total: calls.append((done, total)), manifest=manifest)
    assert path == cache / "model.pth" and path.read_bytes() == DATA
    assert calls[-1] == (len(DATA), len(DATA)) and [c[0] for c in calls] == sorted(c[0] for c in calls)
    record = read_record(files(cache))
    assert record.sha256 == sha256(DATA) and record.checksum_source == "manifest" and record.origin == url
    assert leftovers(cache) == ["model.pth", "model.pth.verified.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~umask  # an ordinary data file, like a copied one


def test_dropped_connection_keeps_part_and_next_call_resumes_with_range(tmp_path, server):
    manifest, cache = setup(tmp_path, server, plan=["drop:100000"])
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest, retries=0)
    message = str(err.value)
    assert "dropped" in message and "model.pth.part" in message and "resume" in message
    assert "import test-model FILE" in message
    assert files(cache).part.stat().st_size == 100_000 and not files(cache).path.exists()

    path = download_model("test-model", cache, manifest=manifest)
    second = server.gets(PATH)[-1]["headers"]
    assert second["range"] == "bytes=100000-" and "if-range" in second
    assert path.read_bytes() == DATA and read_record(files(cache)).sha256 == sha256(DATA)
    assert leftovers(cache) == ["model.pth", "model.pth.verified.json"]


def test_repeated_drops_are_resumed_automatically(tmp_path, server):
    manifest, cache = setup(tmp_path, server, plan=["drop:50000", "drop:70000"])
    path = download_model("test-model", cache, manifest=manifest, retries=3, retry_delay=0)
    ranges = [r["headers"].get("range") for r in server.gets(PATH)]
    assert ranges == [None, "bytes=50000-", "bytes=120000-"]
    assert path.read_bytes() == DATA


def test_server_without_range_support_restarts_from_zero(tmp_path, server):
    manifest, cache = setup(tmp_path, server, plan=["drop:100000"])
    server.range_support = False
    path = download_model("test-model", cache, manifest=manifest, retries=1, retry_delay=0)
    assert path.read_bytes() == DATA and len(server.gets(PATH)) == 2


def test_corrupted_bytes_are_rejected_and_nothing_is_left(tmp_path, server):
    manifest, cache = setup(tmp_path, server)
    server.files[PATH] = bytes(b ^ 1 if i == 1234 else b for i, b in enumerate(DATA))
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest)
    message = str(err.value)
    assert "sha256" in message and sha256(DATA) in message and "Nothing was saved" in message
    assert leftovers(cache) == []


def test_wrong_size_is_rejected_before_downloading(tmp_path, server):
    manifest, cache = setup(tmp_path, server, size=len(DATA) + 5000)
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest)
    assert "offers 300000 bytes" in str(err.value) and "not the right file" in str(err.value)
    assert leftovers(cache) == []


def test_server_error_says_what_to_do_and_leaves_nothing(tmp_path, server):
    manifest, cache = setup(tmp_path, server, plan=["status:500"])
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest)
    message = str(err.value)
    assert "HTTP 500" in message and "HTTPS_PROXY" in message and "import test-model FILE" in message
    assert "Nothing was saved" in message and leftovers(cache) == []


@pytest.mark.parametrize("status, says", [
    (407, "the proxy wants a user name and password"), (403, "access was refused"),
    (404, "no longer at this address"), (500, "a problem on the server"), (502, "a problem on the server")])
def test_each_http_refusal_says_what_it_means(tmp_path, server, status, says):
    manifest, cache = setup(tmp_path, server, plan=[f"status:{status}"])
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest)
    assert f"HTTP {status}" in str(err.value) and says in str(err.value) and leftovers(cache) == []
    assert ("HTTPS_PROXY=http://USER:PASSWORD@" in str(err.value)) == (status == 407)  # the advice for a 407


@pytest.mark.parametrize("size", [len(DATA) - 5000, len(DATA) + 5000])  # 1.7 % off: within SIZE_TOLERANCE
def test_a_manifest_size_marked_approximate_accepts_a_file_within_its_tolerance(tmp_path, server, size):
    manifest, cache = setup(tmp_path, server, size=size, exact=False)
    assert download_model("test-model", cache, manifest=manifest).read_bytes() == DATA


def test_a_file_beyond_an_approximate_size_is_refused(tmp_path, server):
    manifest, cache = setup(tmp_path, server, size=len(DATA) + 10_000, exact=False)  # 3.2 % off
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest)
    assert "about 310000 bytes" in str(err.value) and "not the right file" in str(err.value)
    assert leftovers(cache) == []


@pytest.mark.parametrize("exact", [True, False])
def test_a_file_sent_without_content_length_is_received_whole(tmp_path, server, exact):
    manifest, cache = setup(tmp_path, server, plan=["nolength"], exact=exact,
                            size=len(DATA) if exact else len(DATA) - 5000)
    assert download_model("test-model", cache, manifest=manifest).read_bytes() == DATA
    assert leftovers(cache) == ["model.pth", "model.pth.verified.json"]


def test_a_body_without_content_length_is_cut_off_beyond_the_expected_size(tmp_path, server):
    manifest, cache = setup(tmp_path, server, plan=["nolength"], sha=False, size=len(DATA) - 10_000, exact=False)
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest)
    assert "the server sent more than" in str(err.value) and leftovers(cache) == []


def test_a_part_begun_at_another_address_is_not_continued_from_this_one(tmp_path, server):
    """Without a published checksum, a mirror may serve other bytes: its partial download starts again, from
    byte 0, even when an earlier download pinned a checksum that would catch a splice."""
    mirror = server.serve("/mirror/model.pth", DATA)
    manifest, cache = setup(tmp_path, server, sha=False, urls=[server.url(PATH), mirror])
    download_model("test-model", cache, manifest=manifest)  # pins the checksum
    files(cache).path.write_bytes(b"x" * len(DATA))  # changed since: downloaded again
    server.plans[PATH] = ["drop:100000"]
    assert download_model("test-model", cache, manifest=manifest, retries=0).read_bytes() == DATA
    assert [r["headers"].get("range") for r in server.gets("/mirror/model.pth")] == [None]
    assert read_record(files(cache)).origin == mirror
    assert leftovers(cache) == ["model.pth", "model.pth.verified.json"]


def test_next_url_is_tried_when_the_first_fails(tmp_path, server):
    good = server.serve("/mirror/model.pth", DATA)
    manifest, cache = setup(tmp_path, server, plan=["status:503"], urls=[server.url(PATH), good])
    assert download_model("test-model", cache, manifest=manifest).read_bytes() == DATA


def test_unreachable_host_is_reported(tmp_path, server):
    manifest, cache = setup(tmp_path, server)
    server.stop()
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest, timeout=2)
    assert "cannot connect" in str(err.value) and "online" in str(err.value)
    assert leftovers(cache) == []


def test_stalled_server_times_out_quickly(tmp_path, server):
    manifest, cache = setup(tmp_path, server, plan=["stall:10"])
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest, timeout=0.3, retries=0)
    assert time.monotonic() - start < 5
    assert "no data for 0.3 s" in str(err.value) and "HTTPS_PROXY" in str(err.value)
    assert leftovers(cache) == []


def test_cancel_from_progress_keeps_part_and_next_call_completes(tmp_path, server):
    manifest, cache = setup(tmp_path, server)
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, lambda done, total: False, manifest=manifest)
    assert "cancelled" in str(err.value) and files(cache).part.exists()
    # The .part is complete: the server answers the resume with 416 and the file is verified as it is.
    path = download_model("test-model", cache, manifest=manifest)
    assert path.read_bytes() == DATA and server.gets(PATH)[-1]["headers"]["range"] == f"bytes={len(DATA)}-"


def test_cached_file_is_reused_without_network(tmp_path, server):
    manifest, cache = setup(tmp_path, server)
    download_model("test-model", cache, manifest=manifest)
    server.stop()
    assert download_model("test-model", cache, manifest=manifest).read_bytes() == DATA
    assert len(server.gets(PATH)) == 1


def test_file_changed_after_verification_is_downloaded_again(tmp_path, server):
    manifest, cache = setup(tmp_path, server)
    path = download_model("test-model", cache, manifest=manifest)
    path.write_bytes(b"x" * len(DATA))
    assert download_model("test-model", cache, manifest=manifest).read_bytes() == DATA
    assert len(server.gets(PATH)) == 2


def test_first_download_pins_checksum_and_later_downloads_must_match(tmp_path, server):
    manifest, cache = setup(tmp_path, server, sha=False)
    download_model("test-model", cache, manifest=manifest)
    record = read_record(files(cache))
    assert record.checksum_source == "pinned" and record.sha256 == sha256(DATA)

    files(cache).path.unlink()
    server.files[PATH] = DATA[::-1]
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest)
    message = str(err.value)
    assert "pinned" in message and "model.pth.verified.json" in message and "report" in message
    assert leftovers(cache) == ["model.pth.verified.json"]


def test_a_pinned_file_sets_the_exact_size_where_the_manifest_gives_an_approximate_one(tmp_path, server):
    manifest, cache = setup(tmp_path, server, sha=False, size=len(DATA) + 5000, exact=False)
    download_model("test-model", cache, manifest=manifest)
    files(cache).path.unlink()
    server.files[PATH] = DATA + b"x"  # within the manifest's 2 %, but not the pinned file
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest)
    message = str(err.value)  # refused on the size announced, before any byte was received
    assert "the server offers 300001 bytes, but the test-model file has 300000 bytes" in message, message
    assert leftovers(cache) == ["model.pth.verified.json"]


def test_import_of_the_right_file_is_verified_and_cached(tmp_path, server):
    manifest, cache = setup(tmp_path, server)
    server.stop()  # offline
    copy = tmp_path / "Downloads" / "model.pth"
    copy.parent.mkdir()
    copy.write_bytes(DATA)
    calls = []
    path = import_file("test-model", copy, cache, lambda d, t: calls.append(d), manifest=manifest)
    assert path.read_bytes() == DATA and copy.exists() and calls[-1] == len(DATA)
    assert read_record(files(cache)).origin == str(copy.resolve())
    assert download_model("test-model", cache, manifest=manifest) == path


def test_import_of_a_wrong_file_is_refused_and_nothing_is_kept(tmp_path, server):
    manifest, cache = setup(tmp_path, server)
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(DATA[::-1])
    with pytest.raises(CheckpointError) as err:
        import_file("test-model", wrong, cache, manifest=manifest)
    assert "not the test-model weights file" in str(err.value) and "Nothing was imported" in str(err.value)
    assert leftovers(cache) == []
    short = tmp_path / "short.pth"
    short.write_bytes(DATA[:1000])
    with pytest.raises(CheckpointError, match="not the right file"):
        import_file("test-model", short, cache, manifest=manifest)
    with pytest.raises(CheckpointError, match="no such file"):
        import_file("test-model", tmp_path / "missing.pth", cache, manifest=manifest)
    assert leftovers(cache) == []


def test_import_pins_when_no_checksum_is_published(tmp_path, server):
    manifest, cache = setup(tmp_path, server, sha=False)
    copy = tmp_path / "model.pth"
    copy.write_bytes(DATA)
    import_file("test-model", copy, cache, manifest=manifest)
    assert read_record(files(cache)).checksum_source == "pinned"
    other = tmp_path / "other.pth"
    other.write_bytes(DATA[::-1])
    with pytest.raises(CheckpointError, match="pinned by the first verified download"):
        import_file("test-model", other, cache, manifest=manifest)
    assert files(cache).path.read_bytes() == DATA


def test_concurrent_threads_share_one_transfer(tmp_path, server):
    manifest, cache = setup(tmp_path, server, plan=["slow"])
    results, errors = [], []
    barrier = threading.Barrier(3)

    def worker():
        barrier.wait()
        try:
            results.append(download_model("test-model", cache, manifest=manifest))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert results[0].read_bytes() == DATA and len(server.gets(PATH)) == 1
    assert leftovers(cache) == ["model.pth", "model.pth.verified.json"]


def test_concurrent_processes_do_not_corrupt_the_file(tmp_path, server):
    manifest, cache = setup(tmp_path, server, plan=["slow", "slow"])
    code = ("import sys; from FastSAM3DLib.weights.download import download_model; "
            "print(download_model('test-model', sys.argv[1], manifest=sys.argv[2]))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache), str(manifest)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert (cache / "model.pth").read_bytes() == DATA and len(server.gets(PATH)) == 1
    assert leftovers(cache) == ["model.pth", "model.pth.verified.json"]


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path, server):
    manifest, cache = setup(tmp_path, server)
    cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    files(cache).lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "x"}))
    assert download_model("test-model", cache, manifest=manifest).read_bytes() == DATA
    assert not files(cache).lock.exists()


def test_abandoned_lock_is_taken_over_after_its_age_limit(tmp_path, server):
    manifest, cache = setup(tmp_path, server)
    cache.mkdir()
    files(cache).lock.write_text(json.dumps({"pid": os.getpid(), "host": "another-computer", "token": "y"}))
    old = time.time() - 3600
    os.utime(files(cache).lock, (old, old))
    assert download_model("test-model", cache, manifest=manifest).read_bytes() == DATA


class _MisstartingHandler(BaseHTTPRequestHandler):
    """Serves DATA; the server's ``script`` says what each GET does: "drop:N" (N bytes, then cut the connection),
    "shift:D" (a 206 that starts D bytes away from the byte asked for, truthfully labelled in its Content-Range),
    and after the script, correct answers (full 200, or 206 from the byte asked for)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        srv = self.server
        srv.ranges.append(self.headers.get("Range"))
        action = srv.script.pop(0) if srv.script else "ok"
        asked = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        start = int(asked.group(1)) if asked else 0
        if start and action.startswith("shift:"):
            start += int(action.split(":")[1])
        if start >= len(DATA):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(DATA)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = DATA[start:]
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        if action.startswith("drop:"):
            self.wfile.write(body[:int(action.split(":")[1])])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.wfile.write(body)


@pytest.mark.parametrize("shift", [1000, -1000], ids=["1000-bytes-late", "1000-bytes-early"])
@pytest.mark.parametrize("published", [False, True], ids=["no-checksum", "published-checksum"])
def test_a_resume_answered_from_the_wrong_byte_never_gives_a_corrupt_file(tmp_path, no_proxy_env, shift, published):
    """A connection drops; the server answers the Range request with a 206 that starts 1000 bytes away from
    the byte asked for (once), then behaves. The download must end with exactly the published bytes, and
    without a published checksum it must not pin a corrupt file as verified (issue 19, bug 3)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _MisstartingHandler)
    httpd.daemon_threads = True
    httpd.script, httpd.ranges = ["drop:100000", f"shift:{shift}"], []
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}{PATH}"
        manifest = write_manifest(tmp_path / "models.json", {
            "urls": [url], "size": len(DATA), "size_exact": True, "filename": "model.pth",
            "sha256": sha256(DATA) if published else None})
        cache = tmp_path / "cache"
        path = download_model("test-model", cache, manifest=manifest, retries=3, retry_delay=0)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert httpd.ranges[:2] == [None, "bytes=100000-"]  # the scenario happened: a drop, then a resume
    assert path.read_bytes() == DATA, "a corrupt file was put in place"
    record = read_record(files(cache))
    assert record.sha256 == sha256(DATA) and record.checksum_source == ("manifest" if published else "pinned")


def test_downloads_resumes_and_imports_open_every_file_in_binary_mode(tmp_path, server, monkeypatch):
    windows_open_flags = windows_text_mode(monkeypatch)
    manifest, cache = setup(tmp_path, server, plan=["drop:100000"])
    path = download_model("test-model", cache, manifest=manifest, retries=1, retry_delay=0)
    assert path.read_bytes() == DATA
    copy = tmp_path / "model-copy.pth"
    copy.write_bytes(DATA)
    other = tmp_path / "other-cache"
    assert import_file("test-model", copy, other, manifest=manifest).read_bytes() == DATA
    assert len(windows_open_flags) >= 6  # the lock, the .part (new, then appended), hashing, the record, the copy
    assert [call for call in windows_open_flags if not call[1]] == []


def test_the_library_calls_os_open_only_through_open_fd():
    """Every descriptor the library opens gets O_BINARY and O_NOFOLLOW from files.open_fd (see its docstring)."""
    offenders = []
    for source in sorted((REPO / "FastSAM3DLib").rglob("*.py")):
        atomic = source.relative_to(REPO).as_posix() == "FastSAM3DLib/files/atomic.py"
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bos\.open\(", line) and not (atomic and "return os.open(" in line):
                offenders.append(f"{source.relative_to(REPO)}:{number}")
    assert offenders == []


def test_a_file_to_be_pinned_is_checked_before_it_is_put_in_place(tmp_path, server):
    """``check`` sees the complete file before the pin exists; its refusal leaves nothing, not even a .part."""
    manifest, cache = setup(tmp_path, server, sha=False)
    seen = []

    def refuse(path, origin):
        seen.append((path.read_bytes() == DATA, origin, read_record(files(cache)), files(cache).path.exists()))
        raise CheckpointError("not this model")

    with pytest.raises(CheckpointError, match="not this model"):
        download_model("test-model", cache, manifest=manifest, check=refuse)
    assert seen == [(True, server.url(PATH), None, False)] and leftovers(cache) == []
    copy = tmp_path / "copy.pth"
    copy.write_bytes(DATA)
    with pytest.raises(CheckpointError, match="not this model"):
        import_file("test-model", copy, cache, manifest=manifest, check=refuse)
    assert seen[1] == (True, str(copy), None, False) and leftovers(cache) == []
    published, cache = setup(tmp_path, server)  # a published checksum: nothing is pinned, nothing to check
    download_model("test-model", cache, manifest=published, check=refuse)
    assert len(seen) == 2
