"""The model manifest (``Resources/models.json``): which weights exist, where to get them, how to check them.

``Resources/`` is a sibling of the ``FastSAM3DLib/`` package both in the source tree and in the installed
Slicer extension; :mod:`FastSAM3DLib.resources` finds it (``$FASTSAM3D_RESOURCES`` overrides). Every function
that reads the manifest also takes an explicit path (or an already loaded :class:`Manifest`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import urlsplit

from ..errors import CheckpointError
from ..files import parse_json

#: Relative difference allowed between a download's size and a manifest size that is not exact.
SIZE_TOLERANCE = 0.02

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_REQUIRED = {"name": str, "architecture": str, "title": str, "filename": str, "urls": list, "size": int,
             "size_exact": bool, "sha256": (str, type(None)), "weights_key": (str, type(None)),
             "licence": str, "citation": str}
_OPTIONAL = {"contents": str, "licence_note": str, "homepage": str}


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable model file as the manifest describes it."""

    name: str
    architecture: str
    title: str
    filename: str
    urls: Tuple[str, ...]
    size: int
    size_exact: bool
    sha256: Optional[str]
    weights_key: Optional[str]
    licence: str
    citation: str
    contents: str = ""
    licence_note: str = ""
    homepage: str = ""

    def size_matches(self, nbytes: int) -> bool:
        """Whether a file of ``nbytes`` bytes can be this model's file (exactly, or within the tolerance)."""
        if self.size_exact:
            return nbytes == self.size
        return abs(nbytes - self.size) <= SIZE_TOLERANCE * self.size


@dataclass(frozen=True)
class Manifest:
    """All entries of one manifest file, by name."""

    path: Path
    models: Dict[str, ModelEntry]

    def names(self) -> List[str]:
        """Model names in manifest order."""
        return list(self.models)

    def get(self, name: str) -> ModelEntry:
        """The entry called ``name``; a CheckpointError listing the known names otherwise."""
        try:
            return self.models[name]
        except KeyError:
            raise CheckpointError(f"There are no published weights for a model called '{name}'. Known models: "
                                  f"{', '.join(self.models)} (see 'python -m FastSAM3DLib models').") from None


ManifestLike = Union[Manifest, str, Path, None]


def default_manifest_path() -> Path:
    """``models.json`` in the extension's ``Resources`` folder (see :func:`FastSAM3DLib.resources.resources_dir`)."""
    from ..resources import resources_dir

    return resources_dir() / "models.json"


def load_manifest(path: ManifestLike = None) -> Manifest:
    """Read and validate a manifest (the shipped one when ``path`` is None); a Manifest passes through."""
    if isinstance(path, Manifest):
        return path
    path = Path(path) if path is not None else default_manifest_path()
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"The model manifest {path} is missing. Reinstall the FastSAM3D extension (or, in a "
                              "source checkout, restore Resources/models.json).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"The model manifest {path} cannot be read ({exc}). Reinstall the FastSAM3D "
                              "extension or restore the file.") from exc
    return Manifest(path, parse_manifest(data, str(path)))


def parse_manifest(data, source: str = "manifest") -> Dict[str, ModelEntry]:
    """Validate manifest JSON data; return its entries by name or raise a CheckpointError naming the fault."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"The model manifest {source} is invalid: {what}. Restore the file shipped with "
                               "the extension, or fix the entry.")

    if not isinstance(data, dict) or data.get("format_version") != 1 or not isinstance(data.get("models"), list):
        raise bad('expected {"format_version": 1, "models": [...]}')
    entries: Dict[str, ModelEntry] = {}
    cache_names: Dict[str, str] = {}  # every file name the cache uses (case-folded) -> the model it belongs to
    for i, item in enumerate(data["models"]):
        where = f"model #{i + 1}" + (f" ('{item.get('name')}')" if isinstance(item, dict) else "")
        if not isinstance(item, dict):
            raise bad(f"{where} is not an object")
        unknown = sorted(set(item) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise bad(f"{where} has unknown field(s) {', '.join(unknown)}")
        for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
            if key not in item:
                if key in _REQUIRED:
                    raise bad(f"{where} lacks the field '{key}'")
                continue
            value = item[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise bad(f"{where}: field '{key}' has the wrong type ({type(value).__name__})")
        if not _NAME.match(item["name"]):
            raise bad(f"{where}: name must be lower-case letters, digits, '.', '_' or '-'")
        if item["name"] in entries:
            raise bad(f"{where}: the name '{item['name']}' appears twice")
        if not _FILENAME.match(item["filename"]):
            raise bad(f"{where}: filename must be a plain file name")
        for used in _cache_names(item["filename"]):
            other = cache_names.get(used.casefold())
            if other is not None:
                raise bad(f"{where}: its file name '{item['filename']}' clashes with model '{other}' in the cache "
                          f"(both would use '{used}'); each model needs its own file name")
        cache_names.update((used.casefold(), item["name"]) for used in _cache_names(item["filename"]))
        if item["size"] <= 0:
            raise bad(f"{where}: size must be a positive number of bytes")
        if item["sha256"] is not None and not _SHA256.match(item["sha256"]):
            raise bad(f"{where}: sha256 must be 64 lower-case hex digits or null")
        if not item["urls"]:
            raise bad(f"{where}: urls is empty")
        for url in item["urls"]:
            if not isinstance(url, str) or not url_allowed(url):
                raise bad(f"{where}: {url!r} is not an https URL")
        entries[item["name"]] = ModelEntry(
            name=item["name"], architecture=item["architecture"], title=item["title"], filename=item["filename"],
            urls=tuple(item["urls"]), size=item["size"], size_exact=item["size_exact"], sha256=item["sha256"],
            weights_key=item["weights_key"], licence=item["licence"], citation=item["citation"],
            contents=item.get("contents", ""), licence_note=item.get("licence_note", ""),
            homepage=item.get("homepage", ""))
    return entries


def _cache_names(filename: str) -> Tuple[str, ...]:
    """The names of the files the cache keeps for a model file called ``filename`` (see :mod:`.cache`)."""
    from .cache import ModelFiles

    return ModelFiles(Path("."), filename).names()


def url_allowed(url: str) -> bool:
    """https everywhere; plain http only for this machine (test servers)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS
