"""A lock file made with ``O_CREAT | O_EXCL``, so two threads or processes never write the same cache file.

Who holds a lock is decided by the operating system where it can: the holder keeps the lock file open with an
exclusive ``flock`` (POSIX), which the kernel drops when the holder exits or is killed. A waiter that can take a
shared ``flock`` on the file knows that no process holds it, whatever the file says: a lock left by a dead
process, one naming an unrelated live process (a reused process id), an empty or garbled file, all are broken
within :data:`GRACE` seconds and reported (a warning naming the file and why). Where ``flock`` is unavailable
(Windows, some network file systems) the file's contents decide: a process that is gone (same host), a process
started after the lock was made (its id was reused; Linux), an empty file older than :data:`GRACE`, or a lock not
refreshed (:meth:`FileLock.heartbeat`) for ``stale_after`` seconds. While a live holder works, the waiter says
once whom it waits for. A folder where the lock cannot be created (read-only, full), or a folder or named pipe
sitting at the lock's name, raises :class:`LockUnavailable` at once.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Set, Tuple

from ..files import in_use_on_windows, open_fd, parse_json

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)

_HEARTBEAT_EVERY = 2.0
#: Seconds a lock file may exist without a holder (between its creation and the holder's ``flock``).
GRACE = 1.0
_REPORT_WAIT_AFTER = 1.0
#: Opening a named pipe planted at the lock's name must not wait for a writer (no such flag on Windows).
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class LockTimeout(TimeoutError):
    """The lock stayed held by a live process for longer than the caller wanted to wait."""


class LockUnavailable(OSError):
    """The lock file cannot be created at all (read-only or full folder, permissions, a folder at its name)."""


class FileLock:
    """Exclusive lock on ``path``; use as a context manager or with :meth:`acquire` / :meth:`release`."""

    def __init__(self, path: Path, stale_after: float = 120.0, poll: float = 0.1,
                 timeout: Optional[float] = None, doing: str = "writing the same model file") -> None:
        self.path = Path(path)
        self.doing = doing  # what the holder does, for the message of a waiter
        self.stale_after = stale_after
        self.poll = poll
        self.timeout = timeout
        self._token: Optional[str] = None
        self._fd: Optional[int] = None
        self._last_beat = 0.0

    def acquire(self, on_wait: Optional[Callable[[], None]] = None) -> None:
        """Take the lock, waiting while a live holder has it; ``on_wait()`` is called at every poll."""
        start = time.monotonic()
        reported = False
        while True:
            if self._try_create():
                return
            holder, stale = self._inspect()
            if stale:
                broken = self._break(holder, stale)
                if broken:
                    log.warning("Removed the stale lock %s: %s.", self.path, stale)
                    continue
                if broken is False and not self._out_of_time(start):
                    continue  # another lock took its place: look at that one now
                # None: Windows says the file is open, so a live holder has it (a long step without heartbeat)
            waited = time.monotonic() - start
            if self._out_of_time(start):
                raise LockTimeout(f"{self.path} is held by {_describe(holder[0])}") from None
            if not reported and waited >= _REPORT_WAIT_AFTER:
                reported = True
                log.warning("Waiting for %s, which is %s (lock %s; if no such program is running, delete that "
                            "file).", _describe(holder[0]), self.doing, self.path)
            if on_wait is not None:
                on_wait()
            time.sleep(self.poll)

    def _out_of_time(self, start: float) -> bool:
        """Whether the caller's ``timeout`` has passed since ``start``."""
        return self.timeout is not None and time.monotonic() - start > self.timeout

    def heartbeat(self) -> None:
        """Show other processes that the holder is alive (cheap; at most one ``utime`` per 2 s)."""
        now = time.monotonic()
        if self._token is not None and now - self._last_beat >= _HEARTBEAT_EVERY:
            self._last_beat = now
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Remove the lock file if this object still holds it (then drop the ``flock``)."""
        if self._token is None:
            return
        try:
            if self._read()[0].get("token") == self._token:
                if fcntl is None:  # Windows cannot delete an open file; waiters there judge by the process id,
                    self._close()  # which is alive, not by the lock file's flock (that it keeps to the end here)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        finally:
            _let_go(self._token)
            self._token = None
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------------ internals

    def _try_create(self) -> bool:
        """Create the lock file and take its ``flock``; False if it exists (LockUnavailable if impossible)."""
        try:
            fd = open_fd(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise LockUnavailable(exc.errno, f"cannot create the lock file {self.path}: "
                                             f"{exc.strerror or exc}") from exc
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        try:
            if fcntl is not None:
                _flock_exclusive(fd)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:  # broken as stale before we held it (we were paused): start again
                os.close(fd)
                return False
            _hold(token)  # before the file names it: a thread of this process inspecting it then sees it held
            body = {"pid": os.getpid(), "host": socket.gethostname(), "token": token, "created": time.time()}
            os.write(fd, json.dumps(body).encode())
        except OSError as exc:
            _let_go(token)
            os.close(fd)
            try:
                self.path.unlink()
            except OSError:
                pass
            raise LockUnavailable(exc.errno, f"cannot write the lock file {self.path}: {exc.strerror or exc}") from exc
        self._fd, self._token, self._last_beat = fd, token, time.monotonic()
        return True

    def _read(self, path: Optional[Path] = None) -> Tuple[dict, Optional[os.stat_result]]:
        """(the JSON body or {}, the stat) of the lock file, or of ``path``, without following a symlink."""
        try:
            fd = open_fd(self.path if path is None else path, os.O_RDONLY | _NONBLOCK)
        except OSError:
            return {}, None
        try:
            st = os.fstat(fd)
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            body = parse_json(data or b"{}")
        except ValueError:
            body = {}
        return (body if isinstance(body, dict) else {}), st

    def _inspect(self) -> Tuple[Tuple[dict, Optional[os.stat_result]], Optional[str]]:
        """((body, stat) of the current lock file, why it is stale or None while a live holder may have it)."""
        try:
            fd = open_fd(self.path, os.O_RDONLY | _NONBLOCK)
        except FileNotFoundError:
            return ({}, None), None  # released meanwhile: just try again
        except OSError as exc:  # a symlink or another thing planted at the lock's name
            try:
                st = os.stat(self.path, follow_symlinks=False)
            except OSError:
                return ({}, None), None
            self._refuse_if_not_a_file(st)
            return ({}, st), f"it is not a lock file ({exc.strerror or exc})"
        try:
            st = os.fstat(fd)
            self._refuse_if_not_a_file(st)
            try:
                body = parse_json(os.read(fd, 4096) or b"{}")
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            held = _held_by_another(fd)
        finally:
            os.close(fd)
        holder = (body, st)
        # A holder's heartbeat refreshes both times; nobody can set the change time back (or forward).
        age = time.time() - min(st.st_mtime, st.st_ctime)
        here = body.get("host") == socket.gethostname()
        if held is True:
            return holder, None
        if here and body.get("pid") == os.getpid():
            if _held_here(body.get("token")):
                return holder, None  # another thread of this process holds it (flock may not tell, e.g. on NFS)
            return holder, f"it was left by an earlier program that had this process's id {os.getpid()}"
        if age > self.stale_after:
            return holder, f"not refreshed for {age:.0f} s"
        if body and not here:
            return holder, None  # another computer: a network file system's flock may not tell; wait for its age
        if held is False:  # this computer's kernel says that no process holds it
            if age < GRACE:
                return holder, None  # just created: its holder is about to lock it
            if body.get("pid"):
                return holder, f"{_describe(body)}, named in it, does not hold it (no process does)"
            return holder, "it is empty or garbled and no process holds it"
        # No flock here: judge by the contents.
        if not body:
            return holder, ("it is empty or garbled" if age >= GRACE else None)
        pid = body.get("pid")
        if not _pid_alive(pid):
            return holder, f"its process {pid} is no longer running"
        started = _process_start_time(pid)
        created = body.get("created")
        if started is not None and isinstance(created, (int, float)) and started > created + 1.0:
            return holder, f"process {pid} started after the lock was made (it is another program)"
        return holder, None

    def _refuse_if_not_a_file(self, st: os.stat_result) -> None:
        """Raise LockUnavailable when a folder, a named pipe or a device sits at the lock's name: it is somebody's,
        so it is neither removed nor waited for (a symlink is not refused: it is removed as stale, its target kept).
        """
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            return
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a named pipe" if stat.S_ISFIFO(st.st_mode) else \
            "not a file"
        raise LockUnavailable(errno.EEXIST, f"{self.path} is {kind}, where FastSAM3D keeps the lock file of "
                                            "its writes: move it away or delete it, then try again")

    def _break(self, holder: Tuple[dict, Optional[os.stat_result]], why: str) -> Optional[bool]:
        """Remove the abandoned lock judged by ``holder`` without removing one that was taken since: True when
        removed, False when another lock took its place (look again), None when Windows says that a process has
        it open (so it is held after all: wait)."""
        moved = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, moved)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if in_use_on_windows(exc):  # a process has it open, so it is held
                return None
            raise LockUnavailable(exc.errno, f"cannot remove the stale lock file {self.path} ({why}): "
                                             f"{exc.strerror or exc}") from exc
        try:
            now = (self._read(moved)[0], os.stat(moved, follow_symlinks=False))  # a planted link has no body
            if not _unchanged(holder, now):
                try:  # we moved a fresh or refreshed lock: put it back unless yet another one appeared
                    os.link(moved, self.path)
                except (OSError, NotImplementedError):
                    pass
                return False
            return True
        finally:
            try:
                moved.unlink()
            except FileNotFoundError:
                pass


def _unchanged(judged: Tuple[dict, Optional[os.stat_result]], now: Tuple[dict, Optional[os.stat_result]]) -> bool:
    """Whether the lock file read now is the one that was judged stale: the same file (the file system may give a
    new lock the number of one just deleted), not refreshed since, naming the same holder."""
    (judged_body, judged_stat), (body, stat) = judged, now
    return (judged_stat is not None and stat is not None and os.path.samestat(stat, judged_stat)
            and stat.st_mtime_ns == judged_stat.st_mtime_ns and body.get("token") == judged_body.get("token"))


def _flock_exclusive(fd: int) -> None:
    """Take an exclusive ``flock`` on a new lock file; waiters inspecting it hold theirs for microseconds."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                return  # a waiter is stuck: the contents of the file still say who holds it
            time.sleep(0.001)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                return  # this file system has no flock: the contents decide
            raise


def _held_by_another(fd: int) -> Optional[bool]:
    """Whether some process holds an exclusive ``flock`` on the open file; None where ``flock`` cannot tell."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


#: Tokens of the lock files this process's FileLock objects hold: a lock file naming this process is held by one
#: of its threads exactly when its token is here (on every system; ``flock`` and ``/proc`` cannot always tell).
_HELD_TOKENS: Set[str] = set()
_HELD_TOKENS_LOCK = threading.Lock()


def _hold(token: str) -> None:
    with _HELD_TOKENS_LOCK:
        _HELD_TOKENS.add(token)


def _let_go(token: Optional[str]) -> None:
    with _HELD_TOKENS_LOCK:
        _HELD_TOKENS.discard(token)


def _held_here(token) -> bool:
    with _HELD_TOKENS_LOCK:
        return token in _HELD_TOKENS


def _describe(body: dict) -> str:
    pid, host = body.get("pid"), body.get("host")
    if not pid:
        return "another program"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _pid_alive(pid) -> bool:
    """Whether process ``pid`` exists; True when that cannot be told (Windows, bad value)."""
    if os.name != "posix" or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _process_start_time(pid) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch; Linux), or None if that cannot be told."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith(b"btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
