"""A lock file made with ``O_CREAT | O_EXCL``, so two threads or processes never write the same cache file.

The holder refreshes the lock's modification time while it works (:meth:`FileLock.heartbeat`). A lock is
considered abandoned when its process is gone (same host, POSIX) or it has not been refreshed for
``stale_after`` seconds; it is then broken and taken over. Works on local and network file systems.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

_HEARTBEAT_EVERY = 2.0


class LockTimeout(TimeoutError):
    """The lock stayed held by a live process for longer than the caller wanted to wait."""


class FileLock:
    """Exclusive lock on ``path``; use as a context manager or with :meth:`acquire` / :meth:`release`."""

    def __init__(self, path: Path, stale_after: float = 120.0, poll: float = 0.1,
                 timeout: Optional[float] = None) -> None:
        self.path = Path(path)
        self.stale_after = stale_after
        self.poll = poll
        self.timeout = timeout
        self._token: Optional[str] = None
        self._last_beat = 0.0

    def acquire(self, on_wait: Optional[Callable[[], None]] = None) -> None:
        """Take the lock, waiting while a live holder has it; ``on_wait()`` is called at every poll."""
        start = time.monotonic()
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                           "created": time.time()}).encode()
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if self._is_stale(holder):
                    self._break(holder)
                    continue
                if self.timeout is not None and time.monotonic() - start > self.timeout:
                    raise LockTimeout(f"{self.path} is held by process {holder.get('pid', '?')} on "
                                      f"{holder.get('host', '?')}") from None
                if on_wait is not None:
                    on_wait()
                time.sleep(self.poll)
                continue
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            self._token = token
            self._last_beat = time.monotonic()
            return

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
        """Remove the lock file if this object still holds it."""
        if self._token is None:
            return
        if self._read().get("token") == self._token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._token = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_bytes() or b"{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _is_stale(self, holder: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False  # released meanwhile: just try again
        if age > self.stale_after:
            return True
        if not holder:
            # Being written right now, or garbage left by a crash: only age can tell.
            return False
        return holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))

    def _break(self, holder: dict) -> None:
        """Remove an abandoned lock without removing one that a third process has just taken."""
        moved = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, moved)
        except FileNotFoundError:
            return
        try:
            data = json.loads(moved.read_bytes() or b"{}")
        except (OSError, ValueError):
            data = {}
        if holder and data.get("token") != holder.get("token"):
            try:  # we moved a fresh lock: put it back unless yet another one appeared
                os.link(moved, self.path)
            except OSError:
                pass
        try:
            moved.unlink()
        except FileNotFoundError:
            pass


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
