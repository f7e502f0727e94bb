"""Atomic writing: a file appears under its name only when complete; temporaries beside it, removed on failure.

Writers never leave a partial file under the final name: they write a hidden temporary beside it
(``.NAME.fastsam3d-tmp-XXXXXXXX.EXT``) and rename it when it is complete. A killed process (``kill -9``) may leave
that temporary behind; the next write into the same folder removes ours once they are :data:`STALE_TEMP_SECONDS`
old. Every ``os.open`` and ``os.replace`` of the library goes through :func:`open_fd` and :func:`replace_file`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import time
from pathlib import Path
from typing import Iterator, List

from .. import interrupts
from .output_errors import output_error


#: Marker in the name of every temporary file :func:`atomic_output` creates.
TEMP_MARKER = ".fastsam3d-tmp-"
#: Our temporaries older than this (seconds since last written) are leftovers of a killed process.
STALE_TEMP_SECONDS = 15 * 60


_TEMP_NAME = re.compile(r"^\..*" + re.escape(TEMP_MARKER) + r"[a-z0-9_]{8}[^/]*$")
_RANDOM_PART = 8  # random characters in a temporary's name
_RANDOM_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"


@contextlib.contextmanager
def atomic_output(path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    ``suffix``: the temporary file's ending, for writers that choose the format by name (``.nii.gz``, ``.npy``).
    The file gets the usual permissions (``0666`` less the umask), not ``mkstemp``'s ``0600``. Stale
    temporaries of killed runs in that folder are removed first (:func:`remove_stale_temporaries`). Failures
    of the file system (missing permission, read-only or full disk, a file where a folder should be) raise
    :class:`OutputFileError` with a one-line message; errors of the body propagate unchanged.
    """
    path = Path(path)
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_empty_folders(created)
        raise output_error(exc, path, "create the folder for") from None
    remove_stale_temporaries(path.parent)
    tmp, done = None, False
    try:
        with interrupts.deferred():  # a Ctrl+C waits until the temporary's name is known (and it is removed)
            try:
                tmp = _create_temporary(path.parent, _temp_prefix(path, suffix), suffix)
            except OSError as exc:
                raise output_error(exc, path, "write") from None
        yield Path(tmp)
        try:
            replace_file(tmp, path)
        except OSError as exc:
            raise output_error(exc, path, "replace") from None
        done = True
    finally:
        if tmp is not None:
            with interrupts.deferred(), contextlib.suppress(OSError):
                os.remove(tmp)
        if not done:  # nothing was written: the folders made for it go too
            remove_empty_folders(created)


def write_text_atomically(path, text: str) -> None:
    """Write ``text`` (UTF-8, line ends as given) to ``path`` through :func:`atomic_output`: readers see the old
    file or the new one, never a part."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as stream:
            stream.write(text)


@contextlib.contextmanager
def temporary_beside(path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a new, empty hidden file beside ``path``, named as :func:`atomic_output` names its temporaries, and
    remove it on leaving the block unless it was renamed away (e.g. onto ``path``).

    For writers that handle their own errors: an ``OSError`` is raised as it is. Stale temporaries of killed runs
    in that folder are removed first (:func:`remove_stale_temporaries`), so a ``kill -9`` leaves nothing for long.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = None
    try:
        with interrupts.deferred():  # a Ctrl+C waits until the temporary's name is known (and it is removed)
            tmp = _create_temporary(path.parent, _temp_prefix(path, suffix), suffix)
        yield Path(tmp)
    finally:
        if tmp is not None:
            with interrupts.deferred(), contextlib.suppress(OSError):
                os.remove(tmp)


def remove_empty_folders(folders) -> None:
    """Remove these folders (deepest first) where they are empty; those holding anything stay."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _temp_prefix(path: Path, suffix: str) -> str:
    """``.NAME.fastsam3d-tmp-``, NAME shortened so the whole temporary name fits the folder's name limit."""
    room = name_max(path.parent) - 1 - len(TEMP_MARKER) - _RANDOM_PART - len(os.fsencode(suffix))
    name = os.fsencode(path.name)[:max(room, 0)]
    return f".{name.decode('utf-8', 'ignore')}{TEMP_MARKER}"


def is_our_temporary(name: str) -> bool:
    """True for names :func:`atomic_output` gives its temporary files."""
    return bool(_TEMP_NAME.match(name))


def remove_stale_temporaries(folder, older_than: float = STALE_TEMP_SECONDS) -> List[Path]:
    """Remove our temporary files in ``folder`` not written for ``older_than`` seconds; returns those removed.

    Only regular files named like :func:`atomic_output`'s temporaries are touched (never links, folders or
    other files); a temporary a running process is still writing is younger and stays.
    """
    removed = []
    limit = time.time() - older_than
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if is_our_temporary(entry.name) and entry.is_file(follow_symlinks=False) and \
                    entry.stat(follow_symlinks=False).st_mtime < limit:
                os.remove(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def open_fd(path, flags: int, mode: int = 0o644) -> int:
    """A descriptor from ``os.open`` for ``path``, ``flags`` and ``mode``: in binary mode, never through a symlink.

    Adds ``O_BINARY`` and ``O_NOFOLLOW`` where the system has them. Windows opens an ``os.open`` descriptor in
    text mode otherwise: every LF byte written becomes CR LF, and a read stops at the first Ctrl-Z byte, so a
    downloaded checkpoint would never match its checksum. ``open()`` and ``tempfile`` add ``O_BINARY``
    themselves; every ``os.open`` of this library goes through here.
    """
    return os.open(path, flags | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0), mode)


#: How long a replace waits for Windows to let go of a file: a virus scanner or the search indexer opens new and
#: replaced files for a moment (pip allows the same second for its own replaces).
REPLACE_RETRY_SECONDS = 1.0


def in_use_on_windows(exc: OSError) -> bool:
    """Whether ``exc`` is Windows refusing to move or delete a file that a process has open (WinError 32,
    ERROR_SHARING_VIOLATION, or 5, ERROR_ACCESS_DENIED, which it also gives for that)."""
    return getattr(exc, "winerror", None) in (5, 32)


def replace_file(source, target) -> None:
    """Replace ``target`` by ``source`` (``os.replace``), tried again for up to :data:`REPLACE_RETRY_SECONDS` while
    Windows reports one of the files in use (WinError 5 or 32); then the error is raised."""
    deadline = time.monotonic() + REPLACE_RETRY_SECONDS
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError as exc:
            if not in_use_on_windows(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


def _create_temporary(folder: Path, prefix: str, suffix: str) -> str:
    """A new empty file ``prefix + 8 random characters + suffix`` in ``folder``, with the permissions a new file
    usually gets (``0666`` less the umask, which the system applies; ``mkstemp`` gives ``0600``). The umask is
    never read: reading it means setting it, which would race with other threads creating files."""
    for _attempt in range(100):
        random_part = "".join(secrets.choice(_RANDOM_CHARACTERS) for _ in range(_RANDOM_PART))
        name = os.path.join(folder, prefix + random_part + suffix)
        try:
            os.close(open_fd(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


def name_max(folder) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing parent) allows."""
    folder = Path(os.path.abspath(folder))
    for candidate in (folder, *folder.parents):
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):
            continue
    return 255
