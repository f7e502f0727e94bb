"""Weights: resumes that must not splice two versions or lose a good ``.part``, imports that must not delete the
user's file, checkpoints whose content is not plain weights, and odd option values (all on 127.0.0.1)."""
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from FastSAM3DLib.cli import main
from FastSAM3DLib.errors import CheckpointError, DownloadError
from FastSAM3DLib.weights import import_weights
from FastSAM3DLib.weights.download import download_model
from FastSAM3DLib.weights.loading import extract_weights
from FastSAM3DLib.weights.verify import read_record
from test_weights_download import files, leftovers
from test_weights_support import no_proxy_env, sha256, write_manifest  # noqa: F401 - fixtures
from windows_files import windows_lock_probes, windows_sharing

V1, V2 = b"A" * 100_000, b"B" * 100_000


class _Scripted(BaseHTTPRequestHandler):
    """Serves ``server.data``; ``server.script`` pops one action per request: "drop" (send 60 000 bytes of the
    whole file, then close), "portal" (answer 200 with a small HTML page) or "ok" (honour Range)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server naming
        srv = self.server
        srv.requests.append({k: self.headers.get(k) for k in ("Range", "If-Range")})
        action = srv.script.pop(0) if srv.script else "ok"
        data, stamp = srv.data, srv.last_modified
        if action == "portal":
            page = b"<html>sign in</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        asked = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if_range = self.headers.get("If-Range")
        start = int(asked.group(1)) if asked and (if_range is None or if_range == stamp) else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        if stamp:
            self.send_header("Last-Modified", stamp)
        self.end_headers()
        if action == "drop":
            self.wfile.write(data[start:60_000])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
        else:
            self.wfile.write(data[start:])


@pytest.fixture
def scripted(no_proxy_env):  # noqa: F811 - the fixture
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    httpd.daemon_threads = True
    httpd.script, httpd.requests, httpd.data, httpd.last_modified = [], [], V1, None
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/model.pth"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def manifest_for(tmp_path, url, published=None):
    return write_manifest(tmp_path / "models.json", {"urls": [url], "size": len(V1), "size_exact": True,
                                                     "filename": "model.pth", "sha256": published})


@pytest.mark.parametrize("last_modified", [None, "Mon, 01 Jan 2024 00:00:00 GMT"], ids=["no-validator", "dated"])
def test_a_file_replaced_between_attempts_is_never_spliced(tmp_path, scripted, last_modified):
    """No checksum is published, so the first download pins what it gets: a resume must not glue the start of
    the old file to the end of the new one. With Last-Modified the resume asks If-Range; without any validator
    it starts again."""
    manifest, cache = manifest_for(tmp_path, scripted.url), tmp_path / "cache"
    scripted.script, scripted.last_modified = ["drop"], last_modified
    with pytest.raises(DownloadError):
        download_model("test-model", cache, manifest=manifest, retries=0)
    assert (cache / "model.pth.part").stat().st_size == 60_000
    scripted.data, scripted.last_modified = V2, "Tue, 02 Jan 2024 00:00:00 GMT"  # the publisher replaced it
    path = download_model("test-model", cache, manifest=manifest, retries=0)
    assert path.read_bytes() == V2 and read_record(files(cache)).sha256 == sha256(V2)
    second = scripted.requests[-1]
    if last_modified:
        assert second == {"Range": "bytes=60000-", "If-Range": last_modified}
    else:
        assert second == {"Range": None, "If-Range": None}


def test_a_page_answering_a_resume_keeps_the_part(tmp_path, scripted):
    manifest, cache = manifest_for(tmp_path, scripted.url, published=sha256(V1)), tmp_path / "cache"
    scripted.script = ["drop", "portal"]
    for _ in range(2):  # the drop, then a proxy's sign-in page instead of the rest
        with pytest.raises(DownloadError):
            download_model("test-model", cache, manifest=manifest, retries=0)
        assert (cache / "model.pth.part").stat().st_size == 60_000
    assert download_model("test-model", cache, manifest=manifest, retries=0).read_bytes() == V1
    assert scripted.requests[-1]["Range"] == "bytes=60000-"  # resumed, not started again


def test_a_symlink_to_the_right_file_is_adopted(tmp_path, scripted):
    shared = tmp_path / "shared.pth"
    shared.write_bytes(V1)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "model.pth").symlink_to(shared)
    manifest = manifest_for(tmp_path, scripted.url, published=sha256(V1))
    assert download_model("test-model", cache, manifest=manifest).read_bytes() == V1
    assert scripted.requests == [] and shared.read_bytes() == V1  # nothing downloaded, the shared copy kept


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0.0, -1.0])
def test_an_unusable_timeout_is_refused_in_one_line(tmp_path, scripted, timeout):
    manifest = manifest_for(tmp_path, scripted.url)
    with pytest.raises(DownloadError, match="timeout must be a positive number"):
        download_model("test-model", tmp_path / "cache", manifest=manifest, timeout=timeout)
    assert scripted.requests == [] and leftovers(tmp_path / "cache") == []


def unpinned_manifest(tmp_path, checkpoint):
    """A manifest for ``checkpoint``'s size that publishes no checksum: its first verified file gets pinned."""
    return write_manifest(tmp_path / "models.json", {"urls": ["https://example.org/model.pth"],
                                                     "size": checkpoint.stat().st_size, "size_exact": True,
                                                     "filename": "model.pth", "sha256": None})


def test_importing_the_cached_file_itself_never_deletes_it(tmp_path):
    """The user's only copy already sits at the cache name and is not a FastSAM3D checkpoint."""
    cache = tmp_path / "cache"
    cache.mkdir()
    mine = cache / "model.pth"
    torch.save({"model_state_dict": {"w": torch.ones(4)}}, mine)
    manifest = unpinned_manifest(tmp_path, mine)
    data = mine.read_bytes()
    with pytest.raises(CheckpointError, match="checksum was not kept"):
        import_weights("test-model", mine, cache, manifest=manifest)
    assert mine.read_bytes() == data and read_record(files(cache)) is None


@pytest.mark.parametrize("weights", [{1: torch.ones(4)}, {"w": torch.empty(4, device="meta")},
                                     {"w": torch.ones(4).to_sparse()}], ids=["int-names", "meta", "sparse"])
def test_a_checkpoint_of_something_else_than_plain_weights_is_refused_and_not_pinned(tmp_path, weights):
    source = tmp_path / "weights.pth"
    torch.save({"model_state_dict": weights}, source)
    with pytest.raises(CheckpointError, match="no model weights"):
        extract_weights(torch.load(source, weights_only=True))
    manifest = unpinned_manifest(tmp_path, source)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="Nothing was pinned"):
        import_weights("test-model", source, cache, manifest=manifest)
    assert not (cache / "model.pth").exists() and read_record(files(cache)) is None and source.exists()


def test_odd_option_values_give_one_line_and_exit_code_2(tmp_path, capsys, scripted):
    manifest = manifest_for(tmp_path, scripted.url)
    assert main(["download", "test-model", "--manifest", str(manifest), "--cache-dir", str(tmp_path / "c"),
                 "--timeout", "inf"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    scripted.script = ["portal"] * 8  # a failing download: one error line, no logged warning above it
    assert main(["download", "test-model", "--manifest", str(manifest), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert main(["segment", str(tmp_path / "missing.nii.gz"), "--point=0,0,0", "--max-image-gb", "1e300",
                 "-o", str(tmp_path / "out.nii.gz")]) == 2  # 1e300 GB: no limit, not an overflow
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_on_windows_a_refused_file_is_removed_although_loading_it_had_mapped_it(tmp_path, monkeypatch):
    """Windows cannot delete a memory-mapped file (emulated). The refused checkpoint was still mapped by
    torch.load(mmap=True) through the failed load's frames, so it stayed in the cache, pinned, and every later
    load failed; the message spoke of another process."""
    refused = windows_sharing(monkeypatch)
    windows_lock_probes(monkeypatch)
    source = tmp_path / "wrong.pth"
    torch.save({"model_state_dict": {"w": torch.ones(1000)}}, source)  # weights, but of no registry model
    manifest = unpinned_manifest(tmp_path, source)
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match="Nothing was pinned: the file was removed"):
        import_weights("test-model", source, cache, manifest=manifest)
    assert refused == [] and not (cache / "model.pth").exists() and read_record(files(cache)) is None
