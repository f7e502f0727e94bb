"""A memory bank file's header, read without PyTorch: its format, provenance and the bank menu's listing.

Slicer's effect fills its bank menu from these headers on the main thread, where PyTorch must not be imported
(it may not be installed yet, and importing it stalls the panel); :mod:`.bank` loads the tensors.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import FastSAM3DError
from ..files import parse_json

FORMAT = "fastsam3d-memory-bank/1"
_JSON_KEYS = ("cases", "entries", "options")
_INT_KEYS = ("block", "num_heads", "head_dim", "embed_dim", "descriptor_dim", "image_size")
# ``memory build`` records a checkpoint file as "NAME (sha256 HEX)"
_CHECKPOINT_SHA256 = re.compile(r"^(.*) \(sha256 ([0-9a-f]{64})\)$")

#: Why the effect cannot use a listed bank (:func:`find_banks`' ``problem``).
OTHER_WEIGHTS = "made with other weights"
NEWER_FORMAT = "made by a newer FastSAM3D"


class MemoryBankError(FastSAM3DError):
    """A memory bank is unreadable, inconsistent, or does not fit the running model; the message says why."""


def _meta_from_strings(raw: Dict[str, str], where: str) -> Dict[str, object]:
    meta: Dict[str, object] = dict(raw)
    try:
        for key in _JSON_KEYS:
            if key in meta:
                meta[key] = parse_json(meta[key])
        for key in _INT_KEYS:
            if key in meta:
                meta[key] = int(meta[key])
        if "spacing_mm" in meta:
            meta["spacing_mm"] = float(meta["spacing_mm"])
    except (TypeError, ValueError) as exc:
        raise MemoryBankError(f"{where} has unreadable metadata ({exc}); build it again.") from None
    return meta


def _is_newer_format(tag: str) -> bool:
    return tag != FORMAT and tag.startswith(FORMAT.split("/")[0] + "/")


def read_bank_metadata(path) -> Dict[str, object]:
    """The parsed header of a bank file without loading its tensors (MemoryBankError when it is not one)."""
    from ..weights.safetensors_cache import read_metadata

    path = Path(path)
    if not path.is_file():
        raise MemoryBankError(f"memory bank {path} does not exist.")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise MemoryBankError(f"memory bank {path} cannot be opened ({exc.strerror or exc}): check that it is "
                              "readable (its permissions, or the drive it is on).") from None
    raw = read_metadata(path)
    if not raw:
        raise MemoryBankError(f"{path.name} is not a FastSAM3D memory bank, or its header is damaged or truncated "
                              "(no metadata could be read). Copy it again, or build one with: python -m "
                              "FastSAM3DLib memory build")
    tag = str(raw.get("format", ""))
    if _is_newer_format(tag):
        raise MemoryBankError(f"memory bank {path.name} has format {tag!r}, this version of FastSAM3D reads "
                              f"{FORMAT!r}: update FastSAM3D, or build the bank again with this version "
                              "(python -m FastSAM3DLib memory build).")
    if tag != FORMAT:
        raise MemoryBankError(f"{path.name} is not a FastSAM3D memory bank (no '{FORMAT}' format tag in its "
                              "safetensors header). Build one with: python -m FastSAM3DLib memory build")
    return _meta_from_strings(raw, f"memory bank {path.name}")


def checkpoint_sha256(meta: Dict[str, object]) -> Optional[str]:
    """The sha256 of the checkpoint file a bank was made from, as ``memory build`` records it, or None (random
    weights, a bank built through the Python API with another description, or one that recorded the fast
    ``.safetensors`` copy of a download, whose bytes are not the verified file's)."""
    found = _CHECKPOINT_SHA256.match(str(meta.get("checkpoint") or ""))
    if found is None or found.group(1).endswith(".safetensors"):
        return None
    return found.group(2)


def find_banks(folders=None, model: Optional[str] = None,
               weights_sha256: Optional[str] = None) -> List[Dict[str, object]]:
    """Bank files in ``folders`` (default: the bundled ``Resources/Models``), optionally only those made by model
    ``model``: ``[{"path", "model", "entries", "descriptor", "crop", "block", "problem"}]``, sorted by file name.
    For the effect's bank menu: only headers are read, and PyTorch is not imported.

    ``problem`` is "" for a bank the model can use, else why it cannot: :data:`OTHER_WEIGHTS` when the bank
    records the checkpoint it was made from and that is not ``weights_sha256`` (the sha256 of the file the model
    loads; None: not checked), or random weights, :data:`NEWER_FORMAT` for a bank this version cannot read. Files
    that are no banks are left out."""
    from ..resources import resources_dir
    from ..weights.safetensors_cache import read_metadata

    folders = [resources_dir() / "Models"] if folders is None else [Path(f) for f in folders]
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.safetensors")):
            try:
                meta, problem = read_bank_metadata(path), ""
            except MemoryBankError:
                meta = read_metadata(path) if path.is_file() else {}  # never open a FIFO (it would block)
                if not _is_newer_format(str(meta.get("format", ""))):
                    continue
                meta, problem = {"model": meta.get("model")}, NEWER_FORMAT
            if model is not None and meta.get("model") != model:
                continue
            made_with = checkpoint_sha256(meta)
            random = str(meta.get("checkpoint") or "").startswith("random")  # no file's weights: never these
            if not problem and weights_sha256 and (random or made_with and made_with != weights_sha256):
                problem = OTHER_WEIGHTS
            entries = meta.get("entries", [])
            out.append({"path": path, "model": meta.get("model"),
                        "entries": len(entries) if isinstance(entries, list) else 0,
                        "descriptor": meta.get("descriptor"), "crop": meta.get("crop"), "block": meta.get("block"),
                        "problem": problem})
    return out
