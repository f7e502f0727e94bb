"""One-line errors for file-system failures: what went wrong, where, and what to do (a full disk, no permission,
a file another program holds open on Windows, a file size limit)."""
from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from typing import Optional

from ..errors import OutputFileError


_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EDQUOT: "your disk quota is used up: free some space or choose another folder",
    errno.EROFS: "the folder is on a read-only disk: choose a folder you can write to",
    errno.EACCES: "you have no permission to write there: choose a folder you can write to",
    errno.EPERM: "the operation is not permitted there: choose a folder you can write to",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter file name or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another folder",
    errno.EEXIST: "a file of that name is in the way of the folder: choose another folder",
    errno.EISDIR: "it is a folder: give a file name inside it, e.g. label.nii.gz",
    errno.EFBIG: "the file is larger than this process may write (a file size limit, see 'ulimit -f')",
    errno.ELOOP: "the path has a symbolic link loop: choose another path",
}


#: Windows refuses to delete, rename or replace a file that a program has open (Python, viewers, virus scanners
#: and sync clients open files without FILE_SHARE_DELETE): WinError 32/33 say so, WinError 5 may mean it too.
_WINDOWS_ADVICE = {
    32: "another program has the file open (a viewer, a virus scanner, a sync client): close it and try again",
    33: "another program has locked a part of the file: close it and try again",
    5: "you have no permission to write there, or another program has the file open: close it, or choose a "
       "folder you can write to",
}


def output_error(exc: OSError, path, action: str = "write") -> OutputFileError:
    """A one-line :class:`OutputFileError` for an ``OSError`` met while writing ``path``; keeps its ``errno``."""
    advice = _WINDOWS_ADVICE.get(getattr(exc, "winerror", None)) or \
        _ADVICE.get(exc.errno, "choose another file name or folder")
    reason = exc.strerror or str(exc) or type(exc).__name__
    error = OutputFileError(f"cannot {action} {path}: {reason}; {advice}.")
    error.errno = exc.errno
    return error


def refusal(message: str, code: Optional[int] = None) -> OutputFileError:
    """An :class:`OutputFileError` saying ``message``, with ``errno`` set to ``code``."""
    error = OutputFileError(message)
    error.errno = code
    return error


def write_failed(output: Path, tmp: Path, label_bytes: int, detail: str) -> OutputFileError:
    """The error for a file that could not be written completely (``label_bytes``: about its size): says whether
    the disk or a file size limit was full."""
    import shutil

    code, cause = None, "the file could not be written completely"
    try:
        written = tmp.stat().st_size
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        written, free = 0, None
    limit = _file_size_limit()
    if limit is not None and written >= limit - 4096:
        code, cause = errno.EFBIG, f"a file size limit ('ulimit -f', {limit} bytes) stopped it"
    elif free is not None and free < max(label_bytes, 1 << 20):
        code, cause = errno.ENOSPC, f"the disk holding {output.parent} is full ({free} bytes free)"
    error = OutputFileError(f"cannot write {output}: {cause} ({detail}). Nothing was written: free some space "
                            "or choose another folder.")
    error.errno = code
    return error


def library_write_error(exc: BaseException, output, tmp, nbytes: int) -> OutputFileError:
    """One-line :class:`OutputFileError` for a non-``OSError`` a library raised while writing ``output`` through
    ``tmp`` (safetensors' SafetensorError says "os error 28"); ``nbytes``: about the file's size."""
    lines = str(exc).strip().splitlines()
    detail = lines[0][:300] if lines else type(exc).__name__
    found = re.search(r"os error (\d+)", detail)
    if found:
        code = int(found.group(1))
        if sys.platform == "win32":  # Rust reports Windows' own error codes there
            code = _WINDOWS_ERRNO.get(code, 0)
        if code:
            return output_error(OSError(code, os.strerror(code)), output)
    return write_failed(Path(output), Path(tmp), nbytes, detail)


# Windows error codes a library may report ("os error N") -> errno: disk full, access denied, in use
_WINDOWS_ERRNO = {112: errno.ENOSPC, 39: errno.ENOSPC, 5: errno.EACCES, 32: errno.EBUSY, 3: errno.ENOENT}


def _file_size_limit() -> Optional[int]:
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)
