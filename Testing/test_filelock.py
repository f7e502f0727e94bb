"""The cache's lock file (FastSAM3DLib.weights.filelock) on its own: what it decides from the file's contents where
the kernel's ``flock`` cannot tell (network file systems answer ENOLCK; emulated by a ``fcntl`` whose ``flock``
fails so), and its races with other waiters (a lock broken, released or taken again between two of its steps).

Processes named in lock files are real (``sleep`` subprocesses, one that has exited); the races are played by
wrapping one step of the lock so that "the other program" acts exactly between two of its system calls.
"""
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from FastSAM3DLib.weights import filelock
from FastSAM3DLib.weights.filelock import FileLock, LockTimeout

LOGGER = "FastSAM3DLib.weights.filelock"
REPO = Path(__file__).resolve().parents[1]


def lock_body(pid, created=None, token="not-yours"):
    return json.dumps({"pid": pid, "host": socket.gethostname(), "token": token,
                       "created": time.time() if created is None else created})


def make_old(path, seconds):
    """Date the lock file ``seconds`` back (as a holder that stopped refreshing it would leave it)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without ``flock`` (NFS without lockd, some SMB mounts): every ``flock`` fails with ENOLCK."""
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    fake = types.SimpleNamespace(flock=flock, LOCK_EX=2, LOCK_SH=1, LOCK_NB=4, LOCK_UN=8)
    monkeypatch.setattr(filelock, "fcntl", fake)


@pytest.fixture
def live_process():
    process = subprocess.Popen(["sleep", "60"])
    yield process
    process.kill()
    process.wait()


def exited_pid():
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def holder_process(path):
    """Another process that has taken the lock ``path`` (with its flock) and keeps it for a minute."""
    code = ("import sys, time; from FastSAM3DLib.weights.filelock import FileLock; "
            "FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def open_descriptors():
    """This process's open file descriptors (None where /proc does not list them)."""
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


# ------------------------------------------------------------------------------------ with flock: the kernel decides


def test_a_holder_with_its_flock_is_never_broken_however_old_its_file(tmp_path):
    """A holder busy for longer than ``stale_after`` without refreshing (hashing a large file) still holds the
    ``flock``: the kernel says it is alive, whatever the file's age."""
    path = tmp_path / "m.pth.lock"
    holder = holder_process(path)
    try:
        make_old(path, 200)
        with pytest.raises(LockTimeout, match=f"held by process {holder.pid}"):
            FileLock(path, stale_after=100, timeout=1).acquire()
        assert json.loads(path.read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_made_on_another_computer_waits_for_its_age_not_for_this_kernel(tmp_path):
    """On a network drive this kernel's flock knows nothing of another computer's: that holder is waited for until
    its lock goes unrefreshed for ``stale_after``."""
    path = tmp_path / "m.pth.lock"
    path.write_text(json.dumps({"pid": 4242, "host": "other-workstation", "token": "theirs", "created": time.time()}))
    make_old(path, 5)
    with pytest.raises(LockTimeout, match="held by process 4242 on other-workstation"):
        FileLock(path, stale_after=100, timeout=0.5).acquire()
    make_old(path, 200)
    with FileLock(path, stale_after=100, timeout=5):
        pass


def test_a_lock_just_created_is_given_its_grace_before_it_is_judged(tmp_path):
    """Between creating the file and taking its flock the creator holds nothing the kernel can see: a lock younger
    than GRACE is left alone."""
    path = tmp_path / "m.pth.lock"
    path.write_text(lock_body(exited_pid()))
    with pytest.raises(LockTimeout):
        FileLock(path, timeout=0.5 * filelock.GRACE).acquire()
    assert json.loads(path.read_text())["token"] == "not-yours"
    with FileLock(path, timeout=5):  # past its grace: broken
        pass


# ------------------------------------------------------------------------------------ no flock: the contents decide


def test_without_flock_a_lock_of_an_exited_process_is_broken_and_says_so(tmp_path, no_flock, caplog):
    path = tmp_path / "m.pth.lock"
    pid = exited_pid()
    path.write_text(lock_body(pid))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with FileLock(path, timeout=5) as lock:
            assert json.loads(path.read_text())["token"] == lock._token
    assert f"its process {pid} is no longer running" in caplog.text
    assert os.listdir(tmp_path) == []  # neither the lock nor the stale file it was moved to on breaking


def test_without_flock_a_live_holder_is_waited_for_and_named(tmp_path, no_flock, live_process, caplog):
    path = tmp_path / "m.pth.lock"
    path.write_text(lock_body(live_process.pid))
    make_old(path, 5)  # older than the grace of a lock being created, younger than stale_after
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(LockTimeout) as err:
        FileLock(path, timeout=1.5).acquire()
    assert str(err.value) == f"{path} is held by process {live_process.pid}"
    assert "Removed the stale lock" not in caplog.text and json.loads(path.read_text())["token"] == "not-yours"


def test_without_flock_a_process_id_reused_since_the_lock_was_made_is_not_its_holder(tmp_path, no_flock,
                                                                                      live_process, caplog):
    """Linux tells when a process started: one started after the lock was made cannot have made it."""
    path = tmp_path / "m.pth.lock"
    path.write_text(lock_body(live_process.pid, created=time.time() - 60))
    with caplog.at_level(logging.WARNING, logger=LOGGER), FileLock(path, timeout=5):
        pass
    assert f"process {live_process.pid} started after the lock was made" in caplog.text


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times are read from Linux's /proc")
def test_a_process_start_time_is_read_from_proc_to_the_second():
    before = time.time()
    process = subprocess.Popen(["sleep", "5"])
    try:
        started = filelock._process_start_time(process.pid)
    finally:
        process.kill()
        process.wait()
    # /proc gives the boot time in whole seconds and the start in clock ticks
    assert started is not None and before - 1.5 <= started <= time.time() + 1.5


@pytest.mark.parametrize("pid", ["1234", 3.5, None, [1]], ids=["text", "float", "null", "list"])
def test_without_flock_a_lock_whose_process_id_is_not_a_number_is_waited_for_not_a_crash(tmp_path, no_flock, pid):
    """Such a body was not written by this library; the process it names cannot be looked up: taken as alive, it
    goes when it is not refreshed for ``stale_after``."""
    path = tmp_path / "m.pth.lock"
    path.write_text(lock_body(pid))
    make_old(path, 5)
    with pytest.raises(LockTimeout):
        FileLock(path, timeout=0.5).acquire()
    make_old(path, 200)
    with FileLock(path, timeout=5):
        pass


@pytest.mark.parametrize("content", [b"", b"\x00{not json"], ids=["empty", "garbled"])
def test_without_flock_an_empty_or_garbled_lock_is_broken_once_past_its_grace(tmp_path, no_flock, content, caplog):
    path = tmp_path / "m.pth.lock"
    path.write_bytes(content)
    make_old(path, 3 * filelock.GRACE)
    with caplog.at_level(logging.WARNING, logger=LOGGER), FileLock(path, timeout=5):
        pass
    assert f"Removed the stale lock {path}: it is empty or garbled." in caplog.text


def test_an_empty_lock_with_no_holder_is_broken_and_the_reason_given(tmp_path, caplog):
    path = tmp_path / "m.pth.lock"
    path.write_bytes(b"")
    make_old(path, 3 * filelock.GRACE)
    with caplog.at_level(logging.WARNING, logger=LOGGER), FileLock(path, timeout=5):
        pass
    assert f"Removed the stale lock {path}: it is empty or garbled and no process holds it." in caplog.text


@pytest.mark.parametrize("target", ["a file", "nothing"])
def test_a_link_planted_at_the_lock_name_is_removed_not_followed(tmp_path, target, caplog):
    victim = tmp_path / "victim.txt"
    if target == "a file":
        victim.write_bytes(b"precious")
    path = tmp_path / "m.pth.lock"
    path.symlink_to(victim)
    with caplog.at_level(logging.WARNING, logger=LOGGER), FileLock(path, timeout=5) as lock:
        assert not path.is_symlink() and json.loads(path.read_text())["token"] == lock._token
    assert f"Removed the stale lock {path}: it is not a lock file" in caplog.text
    assert (victim.read_bytes() == b"precious") if target == "a file" else not victim.exists()
    assert sorted(os.listdir(tmp_path)) == (["victim.txt"] if target == "a file" else [])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["a folder", "a named pipe"])
def test_a_folder_or_pipe_at_the_lock_name_is_refused_at_once_and_left_as_it_is(tmp_path, kind, caplog):
    """Somebody's folder (or a pipe, whose opening would wait for a writer) is neither removed nor waited for."""
    path = tmp_path / "m.pth.lock"
    if kind == "a folder":
        path.mkdir()
        (path / "notes.txt").write_bytes(b"precious")
    else:
        os.mkfifo(path)
    before = open_descriptors()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(filelock.LockUnavailable) as err:
        FileLock(path, timeout=10).acquire()
    assert time.monotonic() - start < 5  # at once, not after the timeout
    assert str(path) in err.value.strerror and f"is {kind}" in err.value.strerror
    assert "move it away or delete it" in err.value.strerror
    assert caplog.text == "" and open_descriptors() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pth.lock"]
    assert (path / "notes.txt").read_bytes() == b"precious" if kind == "a folder" else path.is_fifo()


def test_without_flock_a_lock_held_in_this_process_is_waited_for_not_taken_as_left_behind(tmp_path, no_flock):
    """The file names this process; only the token of a lock held here tells a holding thread from an earlier
    program that had the same process id."""
    path = tmp_path / "m.pth.lock"
    holder = FileLock(path)
    holder.acquire()
    try:
        with pytest.raises(LockTimeout, match=f"held by process {os.getpid()}"):
            FileLock(path, timeout=0.5).acquire()
        assert json.loads(path.read_text())["token"] == holder._token
    finally:
        holder.release()


def test_a_lock_file_that_cannot_be_written_is_unavailable_and_nothing_is_left(tmp_path, monkeypatch):
    """A full disk lets the file be created but not written: the lock is refused at once (the caller says where to
    free space), the empty file is removed, its descriptor closed, and a later attempt is not taken for held."""
    path = tmp_path / "m.pth.lock"
    real_write = os.write

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    before = open_descriptors()
    monkeypatch.setattr(filelock.os, "write", disk_full)
    with pytest.raises(filelock.LockUnavailable, match="cannot write the lock file .*No space left"):
        FileLock(path, timeout=1).acquire()
    monkeypatch.setattr(filelock.os, "write", real_write)
    assert not path.exists() and open_descriptors() == before
    with FileLock(path, timeout=1) as lock:
        assert json.loads(path.read_text())["token"] == lock._token


# ------------------------------------------------------------------------------------ races with other programs


def test_the_lock_object_is_what_with_gives_and_its_file_is_closed_on_release(tmp_path):
    path = tmp_path / "m.pth.lock"
    before = open_descriptors()
    with FileLock(path, timeout=5) as lock:
        assert isinstance(lock, FileLock) and json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    assert open_descriptors() == before  # every descriptor the lock opened is closed (one per download otherwise)


@pytest.mark.parametrize("meanwhile", ["broken and retaken", "broken"])
def test_a_lock_file_broken_before_its_creator_held_it_is_not_held(tmp_path, monkeypatch, meanwhile):
    """The creator was paused between creating the file and taking its ``flock``, long enough for a waiter to judge
    it stale and break it (and perhaps take a new one): the creator must not go on holding a file that is gone or
    another's; it starts again."""
    path = tmp_path / "m.pth.lock"
    real_flock = filelock._flock_exclusive
    other = []

    def paused_then_flock(fd):
        if not other:
            path.unlink()  # the waiter's break (it moves the file, then deletes it)
            other.append(FileLock(path, timeout=1))
            if meanwhile == "broken and retaken":
                other[0].acquire()
        real_flock(fd)

    monkeypatch.setattr(filelock, "_flock_exclusive", paused_then_flock)
    before = open_descriptors()
    lock = FileLock(path, timeout=1)
    if meanwhile == "broken and retaken":
        with pytest.raises(LockTimeout):  # the new holder is alive: waited for, never two holders
            lock.acquire()
        assert json.loads(path.read_text())["token"] == other[0]._token
        other[0].release()
    else:
        lock.acquire()
        assert json.loads(path.read_text())["token"] == lock._token
        lock.release()
    assert open_descriptors() == before  # the descriptor of the file it lost is closed too


def test_a_lock_released_between_two_looks_is_simply_taken(tmp_path, monkeypatch):
    """Creating failed because a holder had the file; by the time the waiter reads it, the holder released it."""
    path = tmp_path / "m.pth.lock"
    real_try = FileLock._try_create
    tries = []

    def holder_there_once(self):
        tries.append(True)
        return False if len(tries) == 1 else real_try(self)

    monkeypatch.setattr(FileLock, "_try_create", holder_there_once)
    with FileLock(path, timeout=2) as lock:
        assert json.loads(path.read_text())["token"] == lock._token
    assert len(tries) == 2


def test_a_stale_lock_another_waiter_broke_first_is_not_an_error(tmp_path, monkeypatch, caplog):
    path = tmp_path / "m.pth.lock"
    path.write_text(lock_body(exited_pid()))
    make_old(path, 3 * filelock.GRACE)
    real_inspect = FileLock._inspect

    def other_waiter_breaks_it(self):
        holder, stale = real_inspect(self)
        if stale and path.exists():
            path.unlink()
        return holder, stale

    monkeypatch.setattr(FileLock, "_inspect", other_waiter_breaks_it)
    with caplog.at_level(logging.WARNING, logger=LOGGER), FileLock(path, timeout=2) as lock:
        assert json.loads(path.read_text())["token"] == lock._token
    assert "Removed the stale lock" not in caplog.text  # this waiter removed nothing


def test_a_stale_lock_replaced_by_a_live_one_before_the_break_is_put_back(tmp_path, monkeypatch, caplog):
    """Judged stale, then broken by another waiter who took the lock anew: the waiter's break moves the new lock,
    sees it is not the file it judged, puts it back and waits for its holder."""
    path = tmp_path / "m.pth.lock"
    path.write_text(lock_body(exited_pid()))
    make_old(path, 3 * filelock.GRACE)
    real_inspect = FileLock._inspect
    other = FileLock(path, timeout=1)

    def another_waiter_breaks_and_takes_it(self):
        holder, stale = real_inspect(self)
        if stale and other._token is None:
            path.unlink()
            other.acquire()
        return holder, stale

    monkeypatch.setattr(FileLock, "_inspect", another_waiter_breaks_and_takes_it)
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(LockTimeout):
            FileLock(path, timeout=1).acquire()
        assert json.loads(path.read_text())["token"] == other._token  # the live holder's lock is where it was
        assert "Removed the stale lock" not in caplog.text
    finally:
        other.release()
    assert not path.exists()


def test_without_flock_a_holder_refreshing_its_lock_just_before_the_break_keeps_it(tmp_path, monkeypatch, no_flock,
                                                                                  live_process, caplog):
    """A holder that went without refreshing its lock for ``stale_after`` (a long hash) refreshes it between the
    waiter's judgement and its break: the lock is the same file, but no longer stale; it is put back."""
    path = tmp_path / "m.pth.lock"
    path.write_text(lock_body(live_process.pid))
    make_old(path, 200)
    real_inspect = FileLock._inspect
    refreshed = []

    def holder_refreshes_meanwhile(self):
        holder, stale = real_inspect(self)
        if stale and not refreshed:
            refreshed.append(True)
            os.utime(path)  # FileLock.heartbeat
        return holder, stale

    monkeypatch.setattr(FileLock, "_inspect", holder_refreshes_meanwhile)
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(LockTimeout):
        FileLock(path, stale_after=100, timeout=1).acquire()
    assert refreshed == [True] and json.loads(path.read_text())["token"] == "not-yours"
    assert "Removed the stale lock" not in caplog.text


def test_a_waiter_looking_at_the_new_lock_does_not_make_its_creator_fail(tmp_path, monkeypatch):
    """A waiter holds a shared ``flock`` for the microseconds it inspects the file: the creator's exclusive
    ``flock`` is refused (EWOULDBLOCK) and tried again."""
    path = tmp_path / "m.pth.lock"
    real = filelock.fcntl
    refused = []

    def flock(fd, operation):
        if operation & real.LOCK_EX and not refused:
            refused.append(True)
            raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")
        return real.flock(fd, operation)

    monkeypatch.setattr(filelock, "fcntl", types.SimpleNamespace(
        flock=flock, LOCK_EX=real.LOCK_EX, LOCK_SH=real.LOCK_SH, LOCK_NB=real.LOCK_NB, LOCK_UN=real.LOCK_UN))
    with FileLock(path, timeout=2) as lock:
        assert json.loads(path.read_text())["token"] == lock._token
    assert refused == [True]


def test_a_waiter_whose_breaks_keep_finding_a_new_lock_still_gives_up_at_its_timeout(tmp_path, monkeypatch):
    """Every stale lock it judged had been replaced by the time it broke it (other waiters racing for it): it looked
    again at once, forever, whatever its timeout."""
    path = tmp_path / "m.pth.lock"
    path.write_text(lock_body(exited_pid()))
    make_old(path, 3 * filelock.GRACE)
    monkeypatch.setattr(FileLock, "_break", lambda self, holder, why: False)  # another lock took its place
    outcome = []

    def wait():
        try:
            FileLock(path, timeout=0.5).acquire()
        except LockTimeout as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive() and len(outcome) == 1
