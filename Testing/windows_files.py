"""Windows' file-sharing rule, emulated on Linux for tests: an open file cannot be deleted, renamed or replaced.

Python opens files on Windows without ``FILE_SHARE_DELETE`` (``open()`` and ``os.open`` both go through the C
runtime's ``_wopen``), so while any descriptor holds a file or any view maps it (``mmap``,
``torch.load(mmap=True)``), ``os.unlink``, ``os.remove``, ``os.rename`` and ``os.replace`` of it (as source or as
the target replaced) fail with ``PermissionError`` (WinError 32, "being used by another process"). Linux allows
all of them, so code that deletes or replaces a file it still has open passes every test here and fails for every
Windows user. :func:`windows_sharing` installs the rule for this process's own descriptors and mappings
(``/proc/self``); :func:`windows_text_mode` records ``os.open`` calls without ``O_BINARY``;
:func:`windows_lock_probes` gives the lock file the answers its probes get on Windows (no ``flock``, no ``/proc``);
:func:`windows_byte_locks` replaces ``fcntl`` by ``msvcrt``'s byte locks.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import List, Tuple

FAKE_O_BINARY = 1 << 29  # a bit that no Linux open flag uses

_SHARING_VIOLATION = 32  # winerror ERROR_SHARING_VIOLATION


def open_in_this_process(path) -> bool:
    """Whether this process has ``path`` open (a descriptor) or mapped into memory (``mmap``, ``torch.load(mmap=
    True)``): Windows refuses to delete either (DeleteFile's documentation). The file itself, not a symlink."""
    try:
        target = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.path.samestat(os.stat(f"/proc/self/fd/{name}"), target):
                return True
        except OSError:
            continue
    mapped = f" {os.major(target.st_dev):02x}:{os.minor(target.st_dev):02x} {target.st_ino} "
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        return any(mapped in line for line in maps)


def windows_sharing(monkeypatch) -> List[Tuple[str, str]]:
    """Make deleting, renaming or replacing a file that is open here fail as on Windows; returns the refusals
    as (operation, path)."""
    refused: List[Tuple[str, str]] = []

    def guarded(name, function, arguments):
        def call(*args, **kwargs):
            for path in args[:arguments]:
                if open_in_this_process(path):
                    refused.append((name, str(path)))
                    error = PermissionError(errno.EACCES, "The process cannot access the file because it is being "
                                            "used by another process", str(path))
                    error.winerror = _SHARING_VIOLATION  # as Windows' OSError carries it
                    raise error
            return function(*args, **kwargs)
        return call

    for name, arguments in (("unlink", 1), ("remove", 1), ("rename", 2), ("replace", 2)):
        monkeypatch.setattr(os, name, guarded(name, getattr(os, name), arguments))
    return refused


def windows_text_mode(monkeypatch) -> List[Tuple[str, bool]]:
    """Give ``os`` an ``O_BINARY`` flag, as on Windows, where a descriptor opened without it is in text mode (every
    LF written becomes CR LF, a read ends at the first Ctrl-Z byte). Records the library's ``os.open`` calls as
    (file, whether O_BINARY was given); the bit is taken off before the real call."""
    real_open = os.open
    calls: List[Tuple[str, bool]] = []

    def windows_like_open(path, flags, mode=0o777, *, dir_fd=None):
        caller = sys._getframe(1).f_code.co_filename
        if f"{os.sep}FastSAM3DLib{os.sep}" in caller:
            calls.append((Path(caller).name, bool(flags & FAKE_O_BINARY)))
        return real_open(path, flags & ~FAKE_O_BINARY, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "O_BINARY", FAKE_O_BINARY, raising=False)
    monkeypatch.setattr(os, "open", windows_like_open)
    return calls


def windows_lock_probes(monkeypatch) -> None:
    """What :mod:`FastSAM3DLib.weights.filelock` can learn on Windows: no ``fcntl`` (so no ``flock``), no
    ``/proc`` (when a process started: unknown), and every process id is taken as alive (``os.kill(pid, 0)``
    would terminate it there)."""
    from FastSAM3DLib.weights import filelock

    monkeypatch.setattr(filelock, "fcntl", None)
    monkeypatch.setattr(filelock, "_process_start_time", lambda pid: None)
    monkeypatch.setattr(filelock, "_pid_alive", lambda pid: True)


def windows_byte_locks() -> None:
    """This process from now on has no ``fcntl`` (as on Windows) and an ``msvcrt`` whose ``locking`` behaves as
    the C runtime's ``_locking``: it locks (``LK_NBLCK``) or unlocks (``LK_UNLCK``) ``nbytes`` from the file's
    current position against other processes, and a byte another process holds raises ``PermissionError``
    (EACCES) at once. Emulated with POSIX record locks, which are also per process. For a subprocess of a test:
    importing ``fcntl`` fails everywhere in the process afterwards."""
    import fcntl
    import types

    def locking(fd: int, mode: int, nbytes: int) -> None:
        start = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN if mode == msvcrt.LK_UNLCK else fcntl.LOCK_EX | fcntl.LOCK_NB, nbytes, start)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None

    msvcrt = types.ModuleType("msvcrt")
    msvcrt.LK_UNLCK, msvcrt.LK_LOCK, msvcrt.LK_NBLCK = 0, 1, 2
    msvcrt.locking = locking
    sys.modules["msvcrt"] = msvcrt
    sys.modules["fcntl"] = None  # ``import fcntl`` raises ImportError
