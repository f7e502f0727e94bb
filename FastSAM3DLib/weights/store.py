"""What the cache holds for each model, and the file the model registry should load.

:func:`resolve_checkpoint` is the registry's entry point: it returns the verified weights for a model,
preferring the fast ``.safetensors`` copy and creating it from the verified checkpoint the first time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from .cache import ModelFiles, PathLike, model_files
from .manifest import ManifestLike, ModelEntry, load_manifest
from .safetensors_cache import ensure_safetensors, safetensors_available, source_sha256
from .verify import expected_sha256, is_verified, read_record, sha256_file, write_record

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


def weights_status(name: str, cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None) -> WeightsStatus:
    """The cache state of model ``name``; cheap (``stat`` calls and small JSON reads, no hashing)."""
    entry = load_manifest(manifest).get(name)
    files = model_files(entry, cache_dir)
    expected, checksum = expected_sha256(entry, files)
    fast = expected is not None and files.safetensors.is_file() and source_sha256(files.safetensors) == expected
    return WeightsStatus(entry, files, cached=files.path.is_file() or fast,
                         verified=is_verified(entry, files) or fast, checksum=checksum, sha256=expected,
                         fast_copy=fast)


def resolve_checkpoint(name: str, cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None,
                       convert: bool = True) -> Optional[Path]:
    """The verified cached weights of model ``name`` (preferring ``.safetensors``), or None if there are none.

    When only the verified checkpoint is there and ``convert`` is true, its weights are written to the
    safetensors copy first (once; about a second). A cached file that changed since it was verified is
    re-hashed, and ignored if it no longer matches. Raises CheckpointError if the verified file turns out not
    to hold this model's architecture.
    """
    entry = load_manifest(manifest).get(name)
    files = model_files(entry, cache_dir)
    expected, _ = expected_sha256(entry, files)
    if expected is None:
        return None
    verified = is_verified(entry, files) or _reverify(entry, files, expected)
    fast = files.safetensors
    if fast.is_file() and source_sha256(fast) == expected:
        return fast
    if not verified:
        return None
    if convert and safetensors_available():
        try:
            return ensure_safetensors(files.path, fast, expected, entry.name, check=architecture_check(entry))
        except OSError as exc:
            log.warning("could not write %s (%s); loading %s directly", fast, exc, files.path)
    return files.path


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


def _reverify(entry: ModelEntry, files: ModelFiles, expected: str) -> bool:
    """Hash a cached file whose record is missing or stale; refresh the record if it still matches."""
    if not files.path.is_file():
        return False
    if sha256_file(files.path) != expected:
        log.warning("%s changed since it was verified and no longer matches; it will be downloaded again",
                    files.path)
        return False
    record = read_record(files)
    write_record(files, entry, expected, record.origin if record else "found in the cache")
    return True
