"""Reliability of the model cache (issue 15): the fast copy's tensors hash, the checkpoint re-check that a restored
mtime cannot fool, NaN weights, read-only and full caches, stale locks, unsafe pickles, download hardening.

Faults are real: tmpfs mounts made read-only or filled up (tests run as root; without the right to mount they
skip, saying so), real processes named in lock files, a TLS server on 127.0.0.1, links planted in the cache.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from FastSAM3DLib.cli import _Terminated
from FastSAM3DLib.errors import CheckpointError, DownloadError, WeightsUnavailableError
from FastSAM3DLib.weights.cache import CacheWarning, ModelFiles
from FastSAM3DLib.weights.catalog import find_checkpoint, model_choice
from FastSAM3DLib.weights.commands import import_weights
from FastSAM3DLib.weights.download import download_model, import_file
from FastSAM3DLib.weights.filelock import FileLock
from FastSAM3DLib.weights.loading import load_state_dict
from FastSAM3DLib.weights.manifest import load_manifest
from FastSAM3DLib.weights.safetensors_cache import read_metadata, tensors_sha256, write_safetensors
from FastSAM3DLib.weights.store import resolve_checkpoint, weights_status
from FastSAM3DLib.weights.verify import read_record
from test_filelock import exited_pid, holder_process, lock_body
from windows_files import windows_lock_probes, windows_sharing
from test_weights_support import (FileServer, no_proxy_env, self_signed_tls, server, sha256,  # noqa: F401
                                  tiny_state_dict, training_checkpoint_bytes, write_manifest)

REPO = Path(__file__).resolve().parents[1]


def setup(tmp_path, data, sha=None, cache=None):
    """A manifest for one model 'tiny' whose file is ``data``; return (manifest, cache, file to import)."""
    manifest = write_manifest(tmp_path / "models.json", {
        "name": "tiny", "architecture": "fastsam3d", "filename": "tiny.pth", "size": len(data), "sha256": sha,
        "urls": ["https://weights.invalid/tiny.pth"]})
    source = tmp_path / "downloads" / "tiny.pth"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(data)
    return manifest, cache or tmp_path / "cache", source


def imported(tmp_path, seed=1, cache=None):
    """Weights imported into a cache (with their fast copy); return (weights, manifest, cache, files)."""
    weights = tiny_state_dict("fastsam3d", seed=seed)
    manifest, cache, source = setup(tmp_path, training_checkpoint_bytes(weights), cache=cache)
    import_weights("tiny", source, cache, manifest=manifest)
    return weights, manifest, cache, ModelFiles(cache, "tiny.pth")


def same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def edit_in_place(path, offset, data, keep_mtime=True):
    """Overwrite bytes inside ``path``, then put its modification time back as a careful forger would."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns or not keep_mtime


def data_offset(safetensors_path):
    """Where the tensor bytes of a safetensors file start."""
    with open(safetensors_path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def cache_warnings(record):
    return [w for w in record if issubclass(w.category, CacheWarning)]


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m"):
    """A real tmpfs mounted at ``path`` (skips when this process may not mount)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
    with pytest.raises(OSError):  # root too: the file system itself refuses
        (path / "probe").write_bytes(b"")


def fill_up(path: Path) -> None:
    """Write a filler file until the file system is full."""
    with open(path / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with pytest.raises(OSError):
        with open(path / "probe", "wb") as f:
            f.write(b"x" * 65536)
            f.flush()
    (path / "probe").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ fast copy: tensors hash


def test_fast_copy_carries_its_tensors_hash_and_the_record_names_it(tmp_path):
    weights, manifest, cache, files = imported(tmp_path)
    meta = read_metadata(files.safetensors)
    assert meta["tensors_sha256"] == tensors_sha256(weights) and meta["source_file"] == "tiny.pth"
    assert read_record(files).fast_copy["tensors_sha256"] == meta["tensors_sha256"]


def test_damaged_fast_copy_is_refused_and_rebuilt_from_the_verified_checkpoint(tmp_path):
    """Bytes of the weights change in place and the modification time is put back: the copy is refused when
    loaded directly, and the cache rebuilds it from the verified checkpoint (issue 15: '0 voxels, IoU nan')."""
    weights, manifest, cache, files = imported(tmp_path)
    fast = files.safetensors
    edit_in_place(fast, data_offset(fast) + 64, b"\xff" * 256)  # NaNs in the first tensors
    with pytest.raises(CheckpointError, match="damaged or was altered"):
        load_state_dict(fast)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_checkpoint("tiny", cache, manifest=manifest) == fast
    assert [str(w.message) for w in cache_warnings(caught)] == [
        f"{fast} is damaged or was altered (its weights do not match the checksum recorded for it): refused; it is "
        f"rebuilt from the verified checkpoint {files.path}."]
    assert same_weights(load_state_dict(fast), weights)


def test_forged_fast_copy_with_a_consistent_hash_is_refused(tmp_path):
    """Other weights written with correct-looking metadata (right source checksum, a matching tensors hash):
    the record beside the checkpoint names other tensors, so the forgery is neither loaded nor kept."""
    weights, manifest, cache, files = imported(tmp_path)
    expected = read_record(files).sha256
    write_safetensors(tiny_state_dict("fastsam3d", seed=9), files.safetensors, expected, "tiny", "tiny.pth")
    with pytest.raises(CheckpointError, match="not the fast copy this cache made"):
        load_state_dict(files.safetensors)
    with pytest.warns(CacheWarning, match="not the fast copy this cache made"):
        assert resolve_checkpoint("tiny", cache, manifest=manifest) == files.safetensors
    assert same_weights(load_state_dict(files.safetensors), weights)


def test_refused_fast_copy_without_its_checkpoint_says_what_to_do(tmp_path):
    weights, manifest, cache, files = imported(tmp_path)
    files.path.unlink()  # the user kept only the fast copy to save space
    edit_in_place(files.safetensors, data_offset(files.safetensors) + 8, b"\x00" * 64)
    with pytest.warns(CacheWarning):
        with pytest.raises(CheckpointError) as err:
            find_checkpoint("tiny", cache, manifest=manifest)
    message = str(err.value)
    assert "damaged or was altered" in message and "is not in the cache to rebuild it from" in message
    assert "python -m FastSAM3DLib download tiny" in message and "\n" not in message


def test_a_copied_cache_is_hashed_once_then_trusted_by_stat(tmp_path, monkeypatch):
    """cp -a (same bytes and times, new inodes): the next load hashes once and records the new identity."""
    from FastSAM3DLib.weights import safetensors_cache, store

    weights, manifest, cache, files = imported(tmp_path)
    copy = tmp_path / "copied"
    shutil.copytree(cache, copy)  # copy2: modification times kept
    hashed = []
    real = safetensors_cache.file_tensors_sha256
    monkeypatch.setattr(safetensors_cache, "file_tensors_sha256", lambda p: hashed.append(p) or real(p))
    monkeypatch.setattr(store, "sha256_file", lambda *a: pytest.fail("the checkpoint was hashed"))
    status = weights_status("tiny", copy, manifest=manifest)
    assert (status.verified, status.recheck) == (False, True)
    assert model_choice("tiny", copy, manifest=manifest).state == "verified, checked again at the next load"
    assert resolve_checkpoint("tiny", copy, manifest=manifest) == copy / "tiny.safetensors"
    assert len(hashed) == 1
    assert same_weights(load_state_dict(copy / "tiny.safetensors"), weights) and len(hashed) == 1
    assert weights_status("tiny", copy, manifest=manifest).verified
    assert resolve_checkpoint("tiny", copy, manifest=manifest) == copy / "tiny.safetensors" and len(hashed) == 1


# -------------------------------------------------------------------------------- checkpoint: restored mtime


def test_checkpoint_changed_in_place_with_its_mtime_restored_is_not_used(tmp_path):
    """The .pth changes (same size) and its modification time is set back: the change time and a re-hash
    catch it (issue 15: 're-checked by size and mtime only')."""
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d", seed=1))
    manifest, cache, source = setup(tmp_path, data, sha=sha256(data))
    import_file("tiny", source, cache, manifest=manifest)
    files = ModelFiles(cache, "tiny.pth")
    assert resolve_checkpoint("tiny", cache, manifest=manifest, convert=False) == files.path
    edit_in_place(files.path, len(data) // 2, b"\x01\x02\x03\x04")
    assert resolve_checkpoint("tiny", cache, manifest=manifest, convert=False) is None
    with pytest.raises(WeightsUnavailableError):
        find_checkpoint("tiny", cache, manifest=manifest)


def test_unchanged_checkpoint_is_checked_by_stat_only(tmp_path, monkeypatch):
    from FastSAM3DLib.weights import store

    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d", seed=1))
    manifest, cache, source = setup(tmp_path, data, sha=sha256(data))
    import_file("tiny", source, cache, manifest=manifest)
    record = read_record(ModelFiles(cache, "tiny.pth"))
    assert record.ctime_ns and record.inode == os.stat(cache / "tiny.pth").st_ino
    monkeypatch.setattr(store, "sha256_file", lambda *a: pytest.fail("hashed although unchanged"))
    for _ in range(3):
        assert resolve_checkpoint("tiny", cache, manifest=manifest, convert=False) == cache / "tiny.pth"


def test_record_of_an_older_version_is_upgraded_by_one_hash(tmp_path):
    """Records written before change times were kept still work: the file is hashed once, then recorded."""
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d", seed=1))
    manifest, cache, source = setup(tmp_path, data)
    import_file("tiny", source, cache, manifest=manifest)
    files = ModelFiles(cache, "tiny.pth")
    old = json.loads(files.record.read_text())
    for key in ("ctime_ns", "inode", "fast_copy"):
        old.pop(key)
    files.record.write_text(json.dumps(old))
    assert weights_status("tiny", cache, manifest=manifest).recheck
    assert resolve_checkpoint("tiny", cache, manifest=manifest, convert=False) == files.path
    assert read_record(files).describes(files.path) and read_record(files).checksum_source == "pinned"


# --------------------------------------------------------------------------------------------- NaN weights


def test_weights_with_nan_or_infinity_are_refused(tmp_path):
    weights = tiny_state_dict("fastsam3d", seed=1)
    key = sorted(weights)[3]
    weights[key].view(-1)[:5] = float("nan")
    weights[key].view(-1)[5] = float("inf")
    path = tmp_path / "nan.pth"
    path.write_bytes(training_checkpoint_bytes(weights))
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert "not finite numbers" in message and f"6 of {weights[key].numel()} in '{key}'" in message

    half = {k: v.half() for k, v in tiny_state_dict("fastsam3d", seed=2).items()}
    half[key].view(-1)[0] = float("-inf")
    from safetensors.torch import save_file

    save_file(half, str(tmp_path / "inf.safetensors"))
    with pytest.raises(CheckpointError, match="not finite numbers"):
        load_state_dict(tmp_path / "inf.safetensors")


def test_import_of_a_checkpoint_with_nan_weights_is_undone(tmp_path):
    weights = tiny_state_dict("fastsam3d", seed=1)
    next(iter(weights.values())).view(-1)[0] = float("nan")
    manifest, cache, source = setup(tmp_path, training_checkpoint_bytes(weights))
    with pytest.raises(CheckpointError, match="not finite numbers"):
        import_weights("tiny", source, cache, manifest=manifest)
    assert sorted(p.name for p in cache.iterdir()) == []


def test_model_refuses_a_checkpoint_with_nan_weights(tmp_path):
    from FastSAM3DLib import build_model

    state = build_model("tiny-test", seed=0).state_dict()
    state["mask_decoder.iou_prediction_head.layers.0.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "tiny-nan.pth")
    with pytest.raises(CheckpointError, match="not finite numbers"):
        build_model("tiny-test", checkpoint=tmp_path / "tiny-nan.pth")


# ------------------------------------------------------------------------------------ read-only and full cache


def test_read_only_cache_without_fast_copy_loads_the_checkpoint_with_one_warning(tmp_path):
    """The folder is read-only (a real read-only mount; root cannot write either) and the fast copy is missing,
    its record stale: the checkpoint is hashed and loaded, with one warning (issue 15: a traceback)."""
    with tmpfs(tmp_path / "cache") as cache:
        weights, manifest, _, files = imported(tmp_path, cache=cache)
        files.safetensors.unlink()
        os.utime(files.path)  # e.g. touched by a backup tool: the record is stale, the file is hashed again
        remount_read_only(cache)
        before = sorted(p.name for p in cache.iterdir())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = resolve_checkpoint("tiny", cache, manifest=manifest)
        assert path == files.path
        messages = [str(w.message) for w in cache_warnings(caught)]
        assert len(messages) == 1 and "Read-only file system" in messages[0] and "slower" in messages[0]
        assert same_weights(load_state_dict(path), weights)
        assert sorted(p.name for p in cache.iterdir()) == before


def test_read_only_cache_with_its_fast_copy_needs_no_write(tmp_path):
    with tmpfs(tmp_path / "cache") as cache:
        weights, manifest, _, files = imported(tmp_path, cache=cache)
        remount_read_only(cache)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert resolve_checkpoint("tiny", cache, manifest=manifest) == files.safetensors
        assert cache_warnings(caught) == []
        assert same_weights(load_state_dict(files.safetensors), weights)


def test_full_disk_while_writing_the_fast_copy_loads_the_checkpoint_with_one_warning(tmp_path):
    """The disk fills up while the fast copy is written (safetensors raises its own error, not OSError)."""
    with tmpfs(tmp_path / "cache", size="2m") as cache:
        weights, manifest, _, files = imported(tmp_path, cache=cache)
        files.safetensors.unlink()
        fill_up(cache)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = resolve_checkpoint("tiny", cache, manifest=manifest)
        assert path == files.path
        messages = [str(w.message) for w in cache_warnings(caught)]
        assert len(messages) == 1 and "cannot write" in messages[0] and "slower" in messages[0]
        assert sorted(p.name for p in cache.iterdir()) == ["filler", "tiny.pth", "tiny.pth.verified.json"]
        assert same_weights(load_state_dict(path), weights)


def test_import_into_a_read_only_cache_is_a_one_line_error(tmp_path):
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    with tmpfs(tmp_path / "cache") as cache:
        manifest, _, source = setup(tmp_path, data)
        remount_read_only(cache)
        with pytest.raises(CheckpointError) as err:
            import_weights("tiny", source, cache, manifest=manifest)
        message = str(err.value)
        assert "\n" not in message and "Read-only file system" in message and "FASTSAM3D_CACHE" in message
        done = subprocess.run([sys.executable, "-m", "FastSAM3DLib", "import", "tiny", str(source), "--quiet",
                               "--cache-dir", str(cache), "--manifest", str(manifest)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.startswith("error: Cannot import") and done.stderr.count("\n") == 1
        assert list(cache.iterdir()) == []


def test_download_into_a_read_only_cache_is_a_one_line_error(tmp_path, server):
    url = server.serve("/m.pth", b"x" * 1000)
    manifest = write_manifest(tmp_path / "models.json", {"urls": [url], "size": 1000, "filename": "m.pth"})
    with tmpfs(tmp_path / "cache") as cache:
        remount_read_only(cache)
        with pytest.raises(DownloadError) as err:
            download_model("test-model", cache, manifest=manifest)
        assert "\n" not in str(err.value) and "Read-only file system" in str(err.value)
        assert server.gets("/m.pth") == []


def test_a_folder_at_the_lock_name_stops_a_download_with_what_to_do_and_keeps_it(tmp_path, server):
    url = server.serve("/m.pth", b"x" * 1000)
    manifest = write_manifest(tmp_path / "models.json", {"urls": [url], "size": 1000, "filename": "m.pth"})
    cache = tmp_path / "cache"
    folder = cache / "m.pth.lock"
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_bytes(b"precious")
    with pytest.raises(DownloadError) as err:
        download_model("test-model", cache, manifest=manifest)
    message = str(err.value)
    assert "\n" not in message and f"{folder} is a folder" in message and "move it away or delete it" in message
    assert server.gets("/m.pth") == [] and sorted(os.listdir(cache)) == ["m.pth.lock"]
    assert (folder / "mine.txt").read_bytes() == b"precious"


# ---------------------------------------------------------------------------------------------- stale locks


def _import_in_subprocess(tmp_path, cache, timeout=30):
    """Run an import in a fresh process; return (seconds, completed process)."""
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    manifest, _, source = setup(tmp_path, data)
    code = ("import sys; from FastSAM3DLib.weights.download import import_file; "
            "print(import_file('tiny', sys.argv[1], sys.argv[2], manifest=sys.argv[3]))")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, str(source), str(cache), str(manifest)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return time.monotonic() - start, done


@pytest.mark.parametrize("case", ["unrelated-live-process", "process-1", "dead-process", "killed-holder",
                                  "empty-file", "garbage"])
def test_stale_lock_is_detected_and_reported_promptly(tmp_path, case):
    """A lock no process holds is broken within seconds and reported (issue 15: a silent wait of up to 120 s)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = ModelFiles(cache, "tiny.pth").lock
    helper = None
    try:
        if case == "unrelated-live-process":  # a live process that has nothing to do with the cache
            helper = subprocess.Popen(["sleep", "60"])
            lock.write_text(lock_body(helper.pid))
        elif case == "process-1":
            lock.write_text(lock_body(1, created=time.time() - 10))
        elif case == "dead-process":
            lock.write_text(lock_body(exited_pid()))
        elif case == "killed-holder":  # a real holder, killed with SIGKILL while it held the lock
            helper = holder_process(lock)
            helper.send_signal(signal.SIGKILL)
            helper.wait()
            helper = None
        elif case == "empty-file":
            lock.write_bytes(b"")
        else:
            lock.write_bytes(b"\x00{not json")
        seconds, done = _import_in_subprocess(tmp_path, cache)
    finally:
        if helper is not None:
            helper.kill()
            helper.wait()
    assert done.returncode == 0, done.stderr
    assert seconds < 15, f"waited {seconds:.0f} s for a stale lock"
    assert f"Removed the stale lock {lock}" in done.stderr
    assert not lock.exists() and (cache / "tiny.pth").is_file()


def test_lock_held_by_a_live_holder_is_waited_for_and_reported(tmp_path):
    """A real holder (another process working on the file) is never broken: the importer says once whom it waits
    for, and goes on when the holder releases the lock."""
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = ModelFiles(cache, "tiny.pth").lock
    released = tmp_path / "released"
    code = ("import sys, time, pathlib; from FastSAM3DLib.weights.filelock import FileLock; "
            "l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(3); "
            "pathlib.Path(sys.argv[2]).write_text(repr(time.time())); l.release()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock), str(released)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        seconds, done = _import_in_subprocess(tmp_path, cache)
    finally:
        holder.wait(30)
    assert done.returncode == 0, done.stderr
    assert seconds >= 1.5 and released.exists()
    assert done.stderr.count(f"Waiting for process {holder.pid}") == 1 and "Removed the stale lock" not in done.stderr


def test_on_windows_a_released_lock_is_gone_and_can_be_taken_again_in_the_same_process(tmp_path, monkeypatch):
    """Windows cannot delete an open file (emulated, with its lock probes): release closes the lock file before
    deleting it. Before, the delete failed after every download and the next one waited for this process."""
    refused = windows_sharing(monkeypatch)
    windows_lock_probes(monkeypatch)
    path = ModelFiles(tmp_path, "tiny.pth").lock
    for _ in range(2):
        lock = FileLock(path, timeout=5)
        lock.acquire()
        assert path.exists()
        lock.release()
        assert not path.exists()
    assert refused == []


def test_on_windows_a_lock_left_under_this_process_id_is_broken(tmp_path, monkeypatch):
    """Process ids are reused on Windows, and there neither flock nor /proc tells whether this process holds the
    file: a lock naming this process whose token no FileLock here holds was left by an earlier program."""
    windows_sharing(monkeypatch)
    windows_lock_probes(monkeypatch)
    path = ModelFiles(tmp_path, "tiny.pth").lock
    path.write_text(lock_body(os.getpid()))
    lock = FileLock(path, timeout=5)
    lock.acquire()
    assert json.loads(path.read_text())["token"] != "not-yours"
    lock.release()


@pytest.mark.parametrize("emulate_windows", [False, True], ids=["linux", "windows"])
def test_another_thread_of_this_process_waits_for_the_live_holder(tmp_path, monkeypatch, emulate_windows):
    """A holder busy for longer than stale_after without a heartbeat (an import hashing a large file) is not
    broken by another thread of the same process: it holds the lock's token (on Windows the break raised)."""
    if emulate_windows:
        windows_sharing(monkeypatch)
        windows_lock_probes(monkeypatch)
    path = ModelFiles(tmp_path, "tiny.pth").lock
    holder = FileLock(path, stale_after=0.3)
    holder.acquire()
    token = json.loads(path.read_text())["token"]
    releasing = threading.Event()  # set as the holder starts to release (set after the release, a waiter that
    # waited could still see it unset; and the Timer thread may still be alive after its release returned)

    def release() -> None:
        releasing.set()
        holder.release()

    releaser = threading.Timer(1.0, release)
    releaser.start()
    time.sleep(0.5)  # older than stale_after
    waiter = FileLock(path, stale_after=0.3, timeout=10)
    waiter.acquire()
    assert releasing.is_set() and json.loads(path.read_text())["token"] != token  # it waited for the release
    waiter.release()
    releaser.join()


def test_on_windows_a_lock_another_process_still_has_open_is_waited_for_not_an_error(tmp_path, monkeypatch):
    """A lock judged stale by its age whose file another process still has open (Windows refuses to move it) is
    held after all: the waiter waits for it instead of failing with "cannot remove the stale lock"."""
    windows_sharing(monkeypatch)
    windows_lock_probes(monkeypatch)
    path = ModelFiles(tmp_path, "tiny.pth").lock
    path.write_text(lock_body(os.getpid() + 1, created=time.time() - 10))  # another, live, slow process
    handle = open(path, "rb")  # that process's descriptor (emulated here: this process's)

    def holder_finishes():
        handle.close()
        path.unlink()

    finisher = threading.Timer(0.8, holder_finishes)
    finisher.start()
    lock = FileLock(path, stale_after=0.3, timeout=10)
    lock.acquire()
    assert handle.closed and json.loads(path.read_text())["token"] != "not-yours"
    lock.release()


# ---------------------------------------------------------------------------------------------- unsafe pickle


class RunsShell:
    """Unpickling this would run a shell command (os.system), which torch 2.13 words 'unsupported GLOBAL'."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_calling_os_system_is_refused_as_unsafe(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": tiny_state_dict("fastsam3d"), "x": RunsShell(marker)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    message = str(err.value)
    assert not marker.exists()
    assert message.startswith(f"Refused to load {path} as unsafe") and ".system'" in message
    assert "may be damaged" not in message and "Nothing from the file was executed" in message


# ---------------------------------------------------------------------------------------- download hardening


def test_https_redirect_to_plain_http_is_refused(tmp_path, no_proxy_env, monkeypatch):
    data = b"w" * 5000
    context, cert = self_signed_tls(tmp_path, "localhost")
    secure, plain = FileServer(tls=context), FileServer()
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        plain.serve("/m.pth", data)
        secure.redirect("/resolve/m.pth", plain.url("/m.pth"))
        secure.serve("/cdn/m.pth", data)
        secure.redirect("/ok/m.pth", f"https://localhost:{secure.port}/cdn/m.pth")
        bad = f"https://localhost:{secure.port}/resolve/m.pth"
        manifest = write_manifest(tmp_path / "models.json", {"urls": [bad], "size": len(data),
                                                             "sha256": sha256(data), "filename": "m.pth"})
        with pytest.raises(DownloadError) as err:
            download_model("test-model", tmp_path / "cache", manifest=manifest)
        assert "not a secure (https) address; refused" in str(err.value)
        assert plain.gets("/m.pth") == [] and list((tmp_path / "cache").iterdir()) == []
        good = write_manifest(tmp_path / "good.json", {"urls": [f"https://localhost:{secure.port}/ok/m.pth"],
                                                       "size": len(data), "sha256": sha256(data),
                                                       "filename": "m.pth"})
        assert download_model("test-model", tmp_path / "cache", manifest=good).read_bytes() == data
    finally:
        secure.stop()
        plain.stop()


@pytest.mark.parametrize("planted", ["symlink-part", "hardlink-part", "symlink-part-info"])
def test_links_planted_in_the_cache_are_never_written_through(tmp_path, server, planted):
    data = os.urandom(50_000)
    url = server.serve("/m.pth", data)
    manifest = write_manifest(tmp_path / "models.json", {"urls": [url], "size": len(data),
                                                         "sha256": sha256(data), "filename": "m.pth"})
    cache = tmp_path / "cache"
    cache.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    files = ModelFiles(cache, "m.pth")
    if planted == "symlink-part":
        files.part.symlink_to(victim)
    elif planted == "hardlink-part":
        os.link(victim, files.part)
    else:
        files.part_info.symlink_to(victim)
    assert download_model("test-model", cache, manifest=manifest).read_bytes() == data
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in cache.iterdir()) == ["m.pth", "m.pth.verified.json"]


@pytest.mark.parametrize("second", ["tiny.pth", "TINY.pth", "tiny.bin", "tiny.pth.lock"])
def test_manifest_entries_must_not_share_cache_files(tmp_path, second):
    urls = ["https://weights.invalid/w"]
    path = write_manifest(tmp_path / "models.json", {"name": "a", "filename": "tiny.pth", "urls": urls},
                          {"name": "b", "filename": second, "urls": urls})
    with pytest.raises(CheckpointError, match="clashes with model 'a'"):
        load_manifest(path)
    with pytest.raises(CheckpointError, match="appears twice"):
        load_manifest(write_manifest(tmp_path / "dup.json", {"name": "a", "filename": "x.pth", "urls": urls},
                                     {"name": "a", "filename": "y.pth", "urls": urls}))
    assert load_manifest(write_manifest(tmp_path / "ok.json", {"name": "a", "filename": "x.pth", "urls": urls},
                                        {"name": "b", "filename": "y.pth", "urls": urls})).names() == ["a", "b"]


def test_model_file_that_is_safetensors_keeps_a_separate_fast_copy():
    files = ModelFiles(Path("/cache"), "w.safetensors")
    assert files.safetensors != files.path and len(set(files.names())) == 6


# --------------------------------------------------------------------------- a pin never outlives an interruption


def wrong_model_download(tmp_path, server):
    """A server offering a complete checkpoint of another architecture for 'tiny', whose manifest publishes no
    checksum (the first verified file would be pinned); returns (manifest, cache, files)."""
    data = training_checkpoint_bytes(tiny_state_dict("sam-med3d"))
    url = server.serve("/tiny.pth", data)
    manifest = write_manifest(tmp_path / "models.json", {"name": "tiny", "filename": "tiny.pth", "urls": [url],
                                                         "size": len(data), "sha256": None})
    cache = tmp_path / "cache"
    return manifest, cache, ModelFiles(cache, "tiny.pth")


@pytest.mark.parametrize("stop", [KeyboardInterrupt, _Terminated], ids=["ctrl-c", "sigterm"])
def test_a_download_stopped_during_the_architecture_check_pins_nothing(tmp_path, server, monkeypatch, stop):
    """Ctrl+C (or the command line's SIGTERM exception, a BaseException too) while the new file's architecture is
    checked left the wrong file pinned: every later download refused it at once, without a request."""
    from FastSAM3DLib.weights import store
    from FastSAM3DLib.weights.commands import download_weights

    manifest, cache, files = wrong_model_download(tmp_path, server)

    def interrupted(entry):
        def check(state_dict):
            raise stop()
        return check

    with monkeypatch.context() as patch:
        patch.setattr(store, "architecture_check", interrupted)
        with pytest.raises(stop):
            download_weights("tiny", cache, manifest=manifest)
    assert read_record(files) is None and not files.path.exists()
    with pytest.raises(CheckpointError) as err:  # the next run downloads again and says what is wrong
        download_weights("tiny", cache, manifest=manifest)
    assert "does not hold a complete FastSAM3D model" in str(err.value) and "Nothing was pinned" in str(err.value)
    assert len(server.gets("/tiny.pth")) == 2
    assert read_record(files) is None and sorted(p.name for p in cache.iterdir()) == []


def test_an_import_killed_during_the_architecture_check_pins_nothing_and_its_copy_is_swept(tmp_path):
    """SIGKILL while an imported file's architecture is checked: nothing is pinned (the check comes before the pin),
    and the hidden copy it leaves is removed by a later import once it is stale."""
    manifest, cache, source = setup(tmp_path, training_checkpoint_bytes(tiny_state_dict("sam-med3d")))
    code = ("import os, signal, sys\n"
            "from FastSAM3DLib.weights import store\n"
            "from FastSAM3DLib.weights.commands import import_weights\n"
            "store.architecture_check = lambda entry: lambda sd: os.kill(os.getpid(), signal.SIGKILL)\n"
            "import_weights('tiny', sys.argv[1], sys.argv[2], manifest=sys.argv[3])\n")
    done = subprocess.run([sys.executable, "-c", code, str(source), str(cache), str(manifest)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    files = ModelFiles(cache, "tiny.pth")
    assert read_record(files) is None and not files.path.exists()
    left = [p for p in cache.iterdir() if p.name.startswith(".")]
    assert len(left) == 1 and left[0].stat().st_size == source.stat().st_size  # the complete copy
    old = time.time() - 3600
    os.utime(left[0], (old, old))  # an hour later
    with pytest.raises(CheckpointError, match="does not hold a complete FastSAM3D model"):
        import_weights("tiny", source, cache, manifest=manifest)
    assert sorted(p.name for p in cache.iterdir()) == []


def test_a_wrong_file_pinned_by_an_older_version_says_how_to_start_again(tmp_path):
    """A cache wedged before this fix (a wrong file pinned): the refusal names the two files to delete."""
    from FastSAM3DLib.weights.commands import download_weights
    from FastSAM3DLib.weights.verify import write_record

    manifest, cache, source = setup(tmp_path, training_checkpoint_bytes(tiny_state_dict("sam-med3d")))
    files = ModelFiles(cache, "tiny.pth")
    cache.mkdir()
    shutil.copyfile(source, files.path)
    write_record(files, load_manifest(manifest).get("tiny"), sha256(source.read_bytes()), "an older version")
    with pytest.raises(CheckpointError) as err:
        download_weights("tiny", cache, manifest=manifest)
    message = str(err.value)
    assert "does not hold a complete FastSAM3D model" in message
    assert f"delete {files.path} and {files.record}" in message and "download or import the model again" in message
    assert files.path.exists() and read_record(files) is not None  # the message tells; nothing is deleted unasked


@pytest.mark.parametrize("killed", ["record", "fast-copy"])
def test_temporaries_of_a_killed_import_are_swept_by_a_later_write(tmp_path, killed):
    """A process killed while writing the verification record or the fast copy leaves its hidden temporary; the
    next write into the cache removes it once it is stale (never a fresh one: that may be another process's)."""
    manifest, cache, source = setup(tmp_path, training_checkpoint_bytes(tiny_state_dict("fastsam3d")))
    kill = "lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)"
    patch = ("from FastSAM3DLib.weights import verify\nverify.replace_file = " + kill if killed == "record" else
             "import safetensors.torch as st\nsave = st.save_file\n"
             "st.save_file = lambda *a, **k: (save(*a, **k), os.kill(os.getpid(), signal.SIGKILL))")
    code = (f"import os, signal, sys\n{patch}\n"
            "from FastSAM3DLib.weights.commands import import_weights\n"
            "import_weights('tiny', sys.argv[1], sys.argv[2], manifest=sys.argv[3])\n")
    done = subprocess.run([sys.executable, "-c", code, str(source), str(cache), str(manifest)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = [p for p in cache.iterdir() if p.name.startswith(".")]
    assert len(left) == 1 and left[0].stat().st_size > 0, left
    fresh = cache / ".tiny.pth.verified.json.fastsam3d-tmp-abcd1234.tmp"  # another process's, still writing
    fresh.write_text("{}")
    import_weights("tiny", source, cache, manifest=manifest)
    assert left[0].exists() and fresh.exists()  # both too young to be called stale
    old = time.time() - 3600
    os.utime(left[0], (old, old))  # an hour later
    import_weights("tiny", source, cache, manifest=manifest)
    assert not left[0].exists() and fresh.exists()
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        "tiny.pth", "tiny.pth.verified.json", "tiny.safetensors"]
