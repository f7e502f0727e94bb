"""Checksums and the verification record kept beside each cached model file.

The record (``NAME.pth.verified.json``) says which sha256 the file had when it was verified, and its size and
modification time then, so later checks are a ``stat`` instead of re-hashing hundreds of megabytes. When the
manifest publishes no checksum, the record of the first verified download (or import) is also the *pin*:
later downloads must match it. It stays when the model file is deleted, so a re-download is still checked.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from .cache import ModelFiles
from .manifest import ModelEntry

Progress = Callable[[int, Optional[int]], object]

_CHUNK = 1 << 20


def sha256_file(path: Path, progress: Optional[Progress] = None) -> str:
    """Hex sha256 of a file, reading it in 1 MiB chunks; ``progress(bytes_done, bytes_total)`` if given."""
    digest = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


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

    def describes(self, path: Path) -> bool:
        """Whether ``path`` is still the very file this record was made for (same size and mtime)."""
        try:
            st = path.stat()
        except OSError:
            return False
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


def read_record(files: ModelFiles) -> Optional[VerifiedRecord]:
    """The record beside the model file, or None when there is none or it is unreadable."""
    try:
        data = json.loads(files.record.read_text(encoding="utf-8"))
        return VerifiedRecord(**{k: data[k] for k in VerifiedRecord.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(files: ModelFiles, entry: ModelEntry, sha256: str, origin: str) -> VerifiedRecord:
    """Record that the model file now in place has ``sha256`` (written atomically)."""
    st = files.path.stat()
    record = VerifiedRecord(model=entry.name, sha256=sha256, size=st.st_size, mtime_ns=st.st_mtime_ns,
                            checksum_source="manifest" if entry.sha256 else "pinned", origin=origin,
                            verified_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json_atomic(files.record, asdict(record))
    return record


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

    Cheap: compares the record with ``stat``; nothing is hashed.
    """
    expected, _ = expected_sha256(entry, files)
    record = read_record(files)
    return (expected is not None and record is not None and record.sha256 == expected
            and record.describes(files.path))


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a uniquely named temporary file beside ``path`` and rename it into place."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
