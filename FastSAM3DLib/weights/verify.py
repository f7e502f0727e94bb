"""Checksums and the verification record kept beside each cached model file.

The record (``NAME.pth.verified.json``) says which sha256 the file had when it was verified, so later checks
are a ``stat`` instead of re-hashing hundreds of megabytes. When the manifest publishes no checksum, the record
of the first verified download (or import) is also the *pin*: later downloads must match it. It stays when the
model file is deleted, so a re-download is still checked. It also names the tensors of the weights-only fast
copy made from the file (see :mod:`.safetensors_cache`).

Why a ``stat`` can stand for a hash. The record keeps the file's size, modification time, *change time*
(``st_ctime``) and inode number at verification time, and a file counts as verified only while all four are
unchanged. Anyone can put an old modification time back (``touch -d``, ``os.utime``, ``cp -p``), but not the
change time: every write, ``utime``, ``chmod``, rename or link sets it to the current clock, and a replaced or
copied file has a new inode. Faking them takes a changed system clock or raw disk access (root), and whoever
can do that can rewrite the record as well. When any of the four differs, the file is hashed again once (a few
seconds for 600 MB) and, if it still matches, the record is refreshed; clicks never hash anything. Limits: on
Windows ``st_ctime`` is the creation time, which programs can set, so there an in-place edit that restores
both times keeps passing the ``stat`` check until the file is replaced or copied.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ..files import open_fd, parse_json, replace_file, temporary_beside
from .cache import ModelFiles
from .manifest import ModelEntry

Progress = Callable[[int, Optional[int]], object]


def file_identity(path: Path) -> Optional[Dict[str, int]]:
    """Size, modification time, change time and inode of ``path`` (None if it cannot be read)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


@dataclass(frozen=True)
class VerifiedRecord:
    """What was verified about a cached model file, and where its checksum came from."""

    model: str
    sha256: str
    size: int
    mtime_ns: int
    checksum_source: str  # "manifest" (published) or "pinned" (first verified download or import)
    origin: str  # URL or the imported file's path
    verified_at: str  # UTC, ISO 8601
    ctime_ns: int = 0  # change time and inode at verification (0 in records of older versions)
    inode: int = 0
    fast_copy: Optional[Dict] = field(default=None)  # tensors_sha256 and identity of the fast copy

    def identity(self) -> Dict[str, int]:
        """The recorded identity of the model file (see :func:`file_identity`)."""
        return {"size": self.size, "mtime_ns": self.mtime_ns, "ctime_ns": self.ctime_ns, "inode": self.inode}

    def describes(self, path: Path) -> bool:
        """Whether ``path`` is still the very file this record was made for (size, mtime, ctime and inode)."""
        return bool(self.ctime_ns) and file_identity(path) == self.identity()

    def same_size_and_time(self, path: Path) -> bool:
        """Whether ``path`` has the recorded size and modification time (it may still be another file)."""
        now = file_identity(path)
        return now is not None and (now["size"], now["mtime_ns"]) == (self.size, self.mtime_ns)


def read_record(files: ModelFiles) -> Optional[VerifiedRecord]:
    """The record beside the model file, or None when there is none or it is unreadable."""
    try:
        data = parse_json(files.record.read_text(encoding="utf-8"))
        fields = VerifiedRecord.__dataclass_fields__
        values = {k: data[k] for k, f in fields.items()
                  if k in data or (f.default is MISSING and f.default_factory is MISSING)}  # KeyError if required
        record = VerifiedRecord(**values)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(record.fast_copy, (dict, type(None))):
        return None
    return record


def write_record(files: ModelFiles, entry: ModelEntry, sha256: str, origin: str) -> VerifiedRecord:
    """Record that the model file now in place has ``sha256`` (written atomically).

    The record of the fast copy is kept when the checksum is unchanged (a re-check of the same file)."""
    identity = file_identity(files.path)
    if identity is None:
        raise FileNotFoundError(f"{files.path} is missing")
    previous = read_record(files)
    record = VerifiedRecord(model=entry.name, sha256=sha256, size=identity["size"], mtime_ns=identity["mtime_ns"],
                            checksum_source="manifest" if entry.sha256 else "pinned", origin=origin,
                            verified_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            ctime_ns=identity["ctime_ns"], inode=identity["inode"],
                            fast_copy=previous.fast_copy if previous and previous.sha256 == sha256 else None)
    write_json_atomic(files.record, asdict(record))
    return record


def record_fast_copy(files: ModelFiles, tensors_sha256: str) -> None:
    """Note in the record that ``files.safetensors``, as it is now, holds tensors with ``tensors_sha256``."""
    record = read_record(files)
    identity = file_identity(files.safetensors)
    if record is None or identity is None:
        raise FileNotFoundError(f"{files.record if record is None else files.safetensors} is missing")
    data = asdict(record)
    data["fast_copy"] = {"tensors_sha256": tensors_sha256, **identity}
    write_json_atomic(files.record, data)


def expected_sha256(entry: ModelEntry, files: ModelFiles) -> Tuple[Optional[str], str]:
    """The checksum a file for ``entry`` must have and where it comes from: "manifest", "pinned" or "none"."""
    if entry.sha256:
        return entry.sha256, "manifest"
    record = read_record(files)
    if record is not None and record.checksum_source == "pinned":
        return record.sha256, "pinned"
    return None, "none"


def is_verified(entry: ModelEntry, files: ModelFiles) -> bool:
    """Whether the cached file is present, unchanged since it was verified, and has the expected checksum.

    Cheap: compares the record with ``stat`` (size, mtime, ctime, inode); nothing is hashed.
    """
    expected, _ = expected_sha256(entry, files)
    record = read_record(files)
    return (expected is not None and record is not None and record.sha256 == expected
            and record.describes(files.path))


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a new, uniquely named temporary file beside ``path`` and rename it into place.

    The temporary file is created with ``O_EXCL`` (and reopened with ``O_NOFOLLOW``): nothing planted there is
    written through. One left by a killed process is removed by a later write into the folder.
    """
    with temporary_beside(path) as tmp:
        with os.fdopen(open_fd(tmp, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as out:
            out.write(json.dumps(data, indent=2) + "\n")
        replace_file(tmp, path)
