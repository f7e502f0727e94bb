"""Records: JSON documents, line logs that several processes append to (each append durable, locked, never
leaving a torn line), checksums of whole files."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterator, Tuple

from ..errors import OutputFileError
from .atomic import open_fd
from .output_errors import output_error


def parse_json(text):
    """``json.loads(text)``, with JSON nested too deeply for Python's parser reported as a ``ValueError``, like any
    other malformed JSON, instead of as a ``RecursionError``: a damaged or hostile file gets the caller's usual
    message."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def complete_lines(path) -> Tuple[str, bool]:
    """(the text of ``path`` up to its last newline, whether a cut-off last line was left out). The bytes are
    cut before they are decoded: a write cut inside a UTF-8 character (a torn append) is not an error."""
    data = Path(path).read_bytes()
    cut = bool(data) and not data.endswith(b"\n")
    if cut:
        data = data[:data.rfind(b"\n") + 1]
    return data.decode("utf-8"), cut


def sha256_file(path, progress=None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks; ``progress(bytes_done, bytes_total)`` if given."""
    digest = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


#: Longest wait for another process's append to the same file (a hung writer must not hang this one for ever).
APPEND_WAIT_SECONDS = 60.0


#: Where Windows' lock of a file being appended to lies: one byte far past any real end of file. Windows' byte
#: locks are mandatory (a locked byte cannot be read by others), so readers of the file must never meet it.
WINDOWS_LOCK_OFFSET = 1 << 40


@contextlib.contextmanager
def _locked_exclusively(fd: int, path) -> Iterator[None]:
    """Hold an exclusive lock on the open file ``fd``: ``flock`` on POSIX, ``msvcrt.locking`` of one byte at
    :data:`WINDOWS_LOCK_OFFSET` on Windows. The wait polls, so it stays bounded (:data:`APPEND_WAIT_SECONDS`, then
    :class:`OutputFileError`); a file system that cannot lock (some network shares) is written unlocked."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        _wait_for_lock(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), path)
        yield  # flock is released when fd is closed
        return
    import msvcrt

    def lock(mode: int) -> None:
        os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, mode, 1)

    locked = _wait_for_lock(lambda: lock(msvcrt.LK_NBLCK), path)
    try:
        yield
    finally:
        if locked:
            with contextlib.suppress(OSError):
                lock(msvcrt.LK_UNLCK)


def _wait_for_lock(take, path) -> bool:
    """Call ``take`` (a non-blocking lock) until it succeeds (True), or False when locks are not supported here;
    :class:`OutputFileError` after :data:`APPEND_WAIT_SECONDS` of another process holding it."""
    deadline = time.monotonic() + APPEND_WAIT_SECONDS
    while True:
        try:
            take()
            return True
        except OSError as exc:
            held = isinstance(exc, (BlockingIOError, InterruptedError)) or \
                exc.errno in (errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK))  # Windows: held
            if not held:  # a file system without locks: as before, unlocked
                return False
            if time.monotonic() > deadline:
                raise OutputFileError(f"cannot append to {path}: another process has held it for "
                                      f"{APPEND_WAIT_SECONDS:.0f} s (another evaluation into the same folder?). "
                                      "Stop it, or choose another output folder.") from None
            time.sleep(0.02)


def _last_line_end(fd: int, size: int) -> int:
    """The offset just after the last newline of the open file ``fd`` of ``size`` bytes (0 without one)."""
    position, block = size, 4096
    while position > 0:
        start = max(0, position - block)
        os.lseek(fd, start, os.SEEK_SET)
        chunk = b""
        while len(chunk) < position - start:
            more = os.read(fd, position - start - len(chunk))
            if not more:
                break
            chunk += more
        found = chunk.rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return 0


def append_lines(path: Path, text: str, header_lines: int = 0) -> None:
    """Append ``text`` (whole lines) to ``path``, durably, starting on a fresh line: a cut-off last line (a torn
    earlier write) is cut away first; the first ``header_lines`` lines of ``text`` are written only when the file
    is empty. On a failure (full disk, ...) the file is cut back to where it ended and
    :class:`~FastSAM3DLib.errors.OutputFileError` names it.

    Processes appending to one file at once (two evaluations into one folder) take turns: each append holds an
    exclusive lock on it (``flock``; on Windows a byte lock past its end), so no one cuts away a line another is
    still writing."""
    try:
        fd = open_fd(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise output_error(exc, path, "append to") from None
    try:
        with _locked_exclusively(fd, path):
            _append_at_line_end(fd, path, text, header_lines)
    finally:
        os.close(fd)


def _append_at_line_end(fd: int, path, text: str, header_lines: int) -> None:
    """:func:`append_lines`' work on the open, locked file ``fd``."""
    end = _last_line_end(fd, os.fstat(fd).st_size)
    if end and header_lines:
        text = text.split("\n", header_lines)[-1]
    data = memoryview(text.encode("utf-8"))
    try:
        os.ftruncate(fd, end)
        os.lseek(fd, end, os.SEEK_SET)
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)  # no half-written line left behind
        raise output_error(exc, path, "append to") from None
