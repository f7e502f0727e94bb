"""The weights-only ``.safetensors`` copy of a verified checkpoint, for fast memory-mapped loading.

The official FastSAM3D file is a pickled training checkpoint three times the size of its weights (it carries
the AdamW optimiser state). After the first verified load the weights alone are written next to it as
``NAME.safetensors``, tagged in the safetensors metadata with the sha256 of the file they came from; a later
load uses the copy only when that tag matches the verified source, so a changed source is never shadowed.
"""
from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path
from typing import Callable, Dict, Optional

#: Value of the "format" metadata field of the files written here.
FORMAT_TAG = "FastSAM3DLib-weights-v1"
_MAX_HEADER = 100 * 1024 * 1024


def read_metadata(path) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file (read from its JSON header; {} if absent or unreadable)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER:
                return {}
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def source_sha256(path) -> Optional[str]:
    """The sha256 of the checkpoint a safetensors copy was made from, or None if it is not one of ours."""
    meta = read_metadata(path)
    return meta.get("source_sha256") if meta.get("format") == FORMAT_TAG else None


def write_safetensors(state_dict, dest, source_sha: str, model: str) -> None:
    """Save the weights to ``dest`` atomically, tagged with the source checksum and the model name."""
    from safetensors.torch import save_file

    tensors = {}
    seen = set()
    for key, value in state_dict.items():
        tensor = value.detach().contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else None
        if ptr is not None and ptr in seen:  # safetensors refuses tensors sharing memory
            tensor = tensor.clone()
        seen.add(ptr)
        tensors[key] = tensor
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": FORMAT_TAG, "source_sha256": source_sha, "model": model})
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def ensure_safetensors(source, dest, source_sha: str, model: str,
                       check: Optional[Callable[[dict], None]] = None) -> Path:
    """Return ``dest`` after making sure it holds the weights of ``source`` (sha256 ``source_sha``).

    A ``dest`` tagged with another checksum (made from an older file) is replaced. ``check(state_dict)`` may
    refuse the weights (for example, a file of the wrong architecture) before anything is written.
    """
    from .loading import load_state_dict

    dest = Path(dest)
    if dest.is_file() and source_sha256(dest) == source_sha:
        return dest
    state_dict = load_state_dict(source)
    if check is not None:
        check(state_dict)
    write_safetensors(state_dict, dest, source_sha, model)
    return dest


def safetensors_available() -> bool:
    """Whether the safetensors package can be imported (it may be missing inside Slicer)."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True
