"""The weights-only ``.safetensors`` copy of a verified checkpoint, for fast memory-mapped loading.

The official FastSAM3D file is a pickled training checkpoint three times the size of its weights (it carries
the AdamW optimiser state). After the first verified load the weights alone are written next to it as
``NAME.safetensors``. Its metadata says where it came from (``source_sha256``, the checksum of the verified
file, and ``source_file``, that file's name) and what it holds: ``tensors_sha256``, a sha256 over every tensor's
name, dtype, shape and bytes (:func:`tensors_sha256`). The same hash is written into the source file's
verification record (:mod:`.verify`), with the copy's size, times and inode.

A copy is used only when its source checksum is the verified one and the record names its tensors hash. Loading
it checks the hash unless the copy's ``stat`` identity is still the recorded one (see :mod:`.verify` for why a
restored modification time cannot pass that): damage (a flipped byte gives NaN or a silent wrong result) and a
substituted file are refused (:func:`check_fast_copy`), and :func:`FastSAM3DLib.weights.resolve_checkpoint`
rebuilds the copy from the verified checkpoint, or loads that directly.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Dict, Mapping, Optional

from ..errors import CheckpointError
from ..files import parse_json, replace_file, temporary_beside

#: Value of the "format" metadata field of the files written here.
FORMAT_TAG = "FastSAM3DLib-weights-v1"
_MAX_HEADER = 100 * 1024 * 1024


class FastCopyWriteError(OSError):
    """The fast copy could not be written (read-only folder, full disk...); the checkpoint is loaded instead."""


def read_metadata(path) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file (read from its JSON header; {} if absent or unreadable)."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER:
                return {}
            header = parse_json(f.read(length))
    except (OSError, struct.error, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def source_sha256(path) -> Optional[str]:
    """The sha256 of the checkpoint a safetensors copy was made from, or None if it is not one of ours."""
    meta = read_metadata(path)
    return meta.get("source_sha256") if meta.get("format") == FORMAT_TAG else None


def tensors_sha256(state_dict: Mapping) -> str:
    """sha256 over every tensor in name order: its name, dtype and shape (as JSON), then its bytes."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(json.dumps([key, str(tensor.dtype), list(value.shape)]).encode() + b"\n")
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def file_tensors_sha256(path) -> str:
    """:func:`tensors_sha256` of a safetensors file, reading one tensor at a time (little extra memory)."""
    from safetensors import safe_open

    class _Lazy(dict):
        def __init__(self, handle):
            super().__init__((k, None) for k in handle.keys())
            self._handle = handle

        def __getitem__(self, key):
            return self._handle.get_tensor(key)

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return tensors_sha256(_Lazy(handle))


def write_safetensors(state_dict, dest, source_sha: str, model: str, source_file: str = "") -> str:
    """Save the weights to ``dest`` atomically, with their provenance and tensors hash; return that hash.

    Raises :class:`FastCopyWriteError` (an OSError) when the folder is read-only or the disk full; nothing is
    left behind then. The temporary file gets a random name and is created with ``O_EXCL``, so nothing planted
    in the folder is written through; one left by a killed process is removed by a later write into the folder.
    """
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
    digest = tensors_sha256(tensors)
    metadata = {"format": FORMAT_TAG, "source_sha256": source_sha, "model": model, "tensors_sha256": digest}
    if source_file:
        metadata["source_file"] = source_file
    dest = Path(dest)
    try:
        with temporary_beside(dest) as tmp:  # removed on any failure; a killed run's is swept by a later write
            save_file(tensors, str(tmp), metadata=metadata)
            replace_file(tmp, dest)
    except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError, not OSError, for a full disk
        raise FastCopyWriteError(f"cannot write {dest}: {_first_line(exc)}") from exc
    return digest


def recorded_fast_copy(path, source_sha: Optional[str] = None) -> Optional[dict]:
    """The record's entry for the fast copy ``path`` (found through its ``source_file`` metadata), or None."""
    meta = read_metadata(path)
    name = meta.get("source_file")
    if meta.get("format") != FORMAT_TAG or not isinstance(name, str) or not name or Path(name).name != name:
        return None
    try:
        record = parse_json((Path(path).parent / (name + ".verified.json")).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("sha256") != (source_sha or meta.get("source_sha256")):
        return None
    entry = record.get("fast_copy")
    return entry if isinstance(entry, dict) else None


def identity_matches(path, entry: Optional[dict]) -> bool:
    """Whether ``path`` still has the size, times and inode recorded in ``entry``."""
    from .verify import file_identity

    if not entry:
        return False
    now = file_identity(Path(path))
    return now is not None and all(entry.get(k) == v for k, v in now.items())


def check_fast_copy(path, state_dict: Optional[Mapping] = None) -> None:
    """Refuse a fast copy whose tensors are not the ones it was written with (CheckpointError).

    Files without a tensors hash (not made by this library, or by an older version) pass unchecked. Nothing is
    hashed when the record beside the copy says it is unchanged since it was checked; ``state_dict`` is the
    loaded content, to hash without reading the file again.
    """
    meta = read_metadata(path)
    expected = meta.get("tensors_sha256") if meta.get("format") == FORMAT_TAG else None
    if not expected:
        return
    recorded = recorded_fast_copy(path)
    if recorded is not None and recorded.get("tensors_sha256") != expected:
        raise CheckpointError(f"{path} is not the fast copy this cache made (its tensors hash differs from the one "
                              f"recorded beside it): refused. Delete it; it is rebuilt from the verified "
                              "checkpoint on the next load.")
    if identity_matches(path, recorded):
        return
    try:
        actual = tensors_sha256(state_dict) if state_dict is not None else file_tensors_sha256(path)
    except Exception as exc:  # noqa: BLE001 - unreadable: reported as damage
        actual = f"unreadable ({_first_line(exc)})"
    if actual != expected:
        raise CheckpointError(f"{path} is damaged or was altered: its weights do not match the checksum written "
                              "into it. Delete it; it is rebuilt from the verified checkpoint on the next load "
                              "(or download the model again).")


def safetensors_available() -> bool:
    """Whether the safetensors package can be imported (it may be missing inside Slicer)."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
