"""What the cache holds for each model, and the file the model registry should load.

:func:`resolve_checkpoint` is the registry's entry point: it returns the verified weights for a model,
preferring the fast ``.safetensors`` copy and creating it from the verified checkpoint the first time. A cache
that cannot be written (read-only folder, full disk) costs speed, never the result: the verified checkpoint is
loaded directly and one warning says why.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..errors import CheckpointError
from ..files import sha256_file
from .cache import CacheWarning, ModelFiles, PathLike, model_files
from .manifest import ManifestLike, ModelEntry, load_manifest
from .safetensors_cache import (FORMAT_TAG, check_fast_copy, identity_matches, read_metadata, safetensors_available,
                                write_safetensors)
from .verify import VerifiedRecord, expected_sha256, is_verified, read_record, record_fast_copy, write_record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsStatus:
    """The cache state of one model: present, verified, how its checksum is known, fast copy present."""

    entry: ModelEntry
    files: ModelFiles
    cached: bool
    verified: bool
    checksum: str  # "manifest" (published), "pinned" (first verified download or import) or "none"
    sha256: Optional[str]
    fast_copy: bool
    recheck: bool = False  # same size and time as verified, but another inode or change time: hashed at next load


def weights_status(name: str, cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None) -> WeightsStatus:
    """The cache state of model ``name``; cheap (``stat`` calls and small JSON reads, no hashing)."""
    entry = load_manifest(manifest).get(name)
    files = model_files(entry, cache_dir)
    expected, checksum = expected_sha256(entry, files)
    record = read_record(files)
    fast = _fast_copy_state(files, expected, record)
    same = expected is not None and record is not None and record.sha256 == expected
    verified = (same and record.describes(files.path)) or fast == "trusted"
    recheck = not verified and ((same and record.same_size_and_time(files.path)) or fast == "recheck")
    return WeightsStatus(entry, files, cached=files.path.is_file() or fast is not None, verified=verified,
                         checksum=checksum, sha256=expected, fast_copy=fast is not None, recheck=recheck)


def resolve_checkpoint(name: str, cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None,
                       convert: bool = True) -> Optional[Path]:
    """The verified cached weights of model ``name`` (preferring ``.safetensors``), or None if there are none.

    When only the verified checkpoint is there and ``convert`` is true, its weights are written to the
    safetensors copy first (once; about a second). A cached file whose ``stat`` identity changed since it was
    verified is re-hashed, and ignored if it no longer matches; a fast copy that is damaged or not the one this
    cache made is refused and rebuilt. When the cache cannot be written, the checkpoint is returned with one
    warning. Raises CheckpointError if the verified file turns out not to hold this model's architecture, or
    if a refused fast copy cannot be rebuilt because the checkpoint is gone.
    """
    entry = load_manifest(manifest).get(name)
    files = model_files(entry, cache_dir)
    expected, _ = expected_sha256(entry, files)
    if expected is None:
        return None
    problems: List[str] = []
    path: Optional[Path] = None
    try:
        path = _resolve(entry, files, expected, convert, problems)
        return path
    finally:
        if problems:
            effect = (f"loading {files.path} directly instead, which is slower" if path == files.path
                      else "its files are checked again at every load, which is slower")
            warnings.warn(f"The model cache {files.directory} cannot be updated ({'; '.join(problems)}); {effect}. "
                          "Free some disk space or make the folder writable, or choose another cache folder "
                          "(FASTSAM3D_CACHE or --cache-dir; in Slicer, the cache folder setting).", CacheWarning,
                          stacklevel=2)


def architecture_check(entry: ModelEntry):
    """A function refusing a state dict that is not a complete ``entry.architecture`` model."""
    def check(state_dict) -> None:
        from .identify import identify_state_dict
        from .layouts import ARCHITECTURE_TITLES

        found = identify_state_dict(state_dict)
        if found.kind != "full" or found.architecture != entry.architecture:
            title = ARCHITECTURE_TITLES.get(entry.architecture, entry.architecture)
            raise CheckpointError(f"The file for '{entry.name}' does not hold a complete {title} model. "
                                  f"{found.sentence()}")
    return check


def _resolve(entry: ModelEntry, files: ModelFiles, expected: str, convert: bool, problems: List[str]) -> Optional[Path]:
    record = read_record(files)
    fast = files.safetensors
    state = _fast_copy_state(files, expected, record)
    if state == "trusted":
        return fast
    refused: Optional[str] = None
    if state == "recheck":  # another inode or change time than when it was checked: hash its tensors once
        try:
            check_fast_copy(fast)
        except CheckpointError:
            refused = f"{fast} is damaged or was altered (its weights do not match the checksum recorded for it)"
        else:
            try:
                record_fast_copy(files, read_metadata(fast)["tensors_sha256"])
            except OSError as exc:
                problems.append(f"cannot update {files.record.name}: {_reason(exc)}")
            return fast
    elif fast.is_file():
        meta = read_metadata(fast)
        if meta.get("format") == FORMAT_TAG and meta.get("source_sha256") == expected and meta.get("tensors_sha256"):
            refused = (f"{fast} is not the fast copy this cache made (the verification record does not name its "
                       "tensors)")
    if refused is not None:
        warnings.warn(f"{refused}: refused; it is rebuilt from the verified checkpoint {files.path}.", CacheWarning,
                      stacklevel=3)
    if refused is not None or fast.is_file():  # refused, made from another file, or by an older version
        try:
            fast.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot remove {fast.name}: {_reason(exc)}")
    verified = is_verified(entry, files) or _reverify(entry, files, expected, problems)
    if not verified:
        if refused is not None:
            from .catalog import weights_hint

            raise CheckpointError(f"{refused}, and the verified checkpoint {files.path} is not in the cache to "
                                  f"rebuild it from: {weights_hint(entry.name, files.directory)}.")
        return None
    if convert and safetensors_available():
        try:
            return _write_fast_copy(entry, files, expected)
        except OSError as exc:  # FastCopyWriteError included: read-only folder, full disk
            problems.append(_reason(exc))
    return files.path


def _fast_copy_state(files: ModelFiles, expected: Optional[str], record: Optional[VerifiedRecord]) -> Optional[str]:
    """"trusted" (the recorded copy, unchanged), "recheck" (recorded, but its identity changed) or None."""
    if expected is None or not files.safetensors.is_file():
        return None
    meta = read_metadata(files.safetensors)
    digest = meta.get("tensors_sha256")
    if meta.get("format") != FORMAT_TAG or meta.get("source_sha256") != expected or not digest:
        return None
    entry = record.fast_copy if record is not None and record.sha256 == expected else None
    if not entry or entry.get("tensors_sha256") != digest:
        return None
    return "trusted" if identity_matches(files.safetensors, entry) else "recheck"


def _write_fast_copy(entry: ModelEntry, files: ModelFiles, expected: str) -> Path:
    """Write the weights-only copy of the verified checkpoint and record its tensors hash; OSError if impossible."""
    from .loading import load_state_dict

    state_dict = load_state_dict(files.path)
    architecture_check(entry)(state_dict)
    digest = write_safetensors(state_dict, files.safetensors, expected, entry.name, source_file=entry.filename)
    del state_dict
    try:
        record_fast_copy(files, digest)
    except OSError:
        try:  # a copy the record does not name would be refused at the next load anyway
            files.safetensors.unlink()
        except OSError:
            pass
        raise
    return files.safetensors


def _reverify(entry: ModelEntry, files: ModelFiles, expected: str, problems: List[str]) -> bool:
    """Hash a cached file whose record is missing or stale; refresh the record if it still matches."""
    if not files.path.is_file():
        return False
    if sha256_file(files.path) != expected:
        log.warning("%s changed since it was verified and no longer matches; it will be downloaded again",
                    files.path)
        return False
    record = read_record(files)
    try:
        write_record(files, entry, expected, record.origin if record else "found in the cache")
    except OSError as exc:
        problems.append(f"cannot update {files.record.name}: {_reason(exc)}, so the file is hashed again at "
                        "every load")
    return True


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
