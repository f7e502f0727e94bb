"""Every model a user can choose, whether its weights are ready here, and the file to load for it.

Two kinds: the manifest's downloadable models (verified into the cache folder ``cache_dir``, see
:mod:`.cache`) and the models bundled in the extension's ``Resources/`` (no download). Every function takes
the cache folder explicitly (Slicer passes one under ``slicer.app.cachePath``); ``None`` means the default
(``$FASTSAM3D_CACHE`` or the platform cache folder). No torch needed; nothing is hashed but a bundled file
in :func:`weights_sha256` (once per version of the file).
"""
from __future__ import annotations

import functools
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..errors import WeightsUnavailableError
from .cache import PathLike, resolve_cache_dir
from .manifest import ManifestLike, load_manifest
from .store import resolve_checkpoint, weights_status


@dataclass(frozen=True)
class BundledModel:
    """Weights shipped inside the extension: ``path`` is relative to the ``Resources`` folder."""

    name: str
    path: str
    title: str
    licence: str


#: Models whose weights ship with the extension (see Resources/Models/MODEL_CARD.md).
BUNDLED_MODELS = (
    BundledModel("fastsam3d-demo", "Models/fastsam3d-demo.pth",
                 "Small FastSAM3D-style demo model trained by this project (weak; for offline use and tests)",
                 "Apache-2.0"),
)


@dataclass(frozen=True)
class ModelChoice:
    """One selectable model and the state of its weights on this machine."""

    name: str
    title: str
    source: str  # "download" (manifest, into the cache folder) or "bundled" (in Resources, nothing to do)
    ready: bool  # weights present and verified (bundled: the file is present)
    state: str  # short phrase: "verified", "verified, fast copy", "verified, checked again at the next load"
    #             (copied or touched since: hashed once more), "not downloaded", "changed: download again",
    #             "bundled", "missing from this installation"
    path: Path  # the file that is loaded (for a download that is not there yet: where it will be)
    licence: str
    size: int  # bytes (for a download not yet made: the manifest's figure, possibly approximate)
    checksum: str  # "published", "pinned", "not yet known" (downloads) or "" (bundled)


def bundled_model(name: str) -> Optional[BundledModel]:
    """The bundled model called ``name``, or None."""
    return next((b for b in BUNDLED_MODELS if b.name == name), None)


def bundled_path(model: BundledModel) -> Path:
    """Where the bundled weights of ``model`` are in this installation."""
    from ..resources import resources_dir

    return resources_dir() / model.path


def available_models(cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None) -> List[ModelChoice]:
    """Every model a user can choose: the manifest's downloadable models in manifest order, then the bundled ones."""
    loaded = load_manifest(manifest)
    return [model_choice(name, cache_dir, manifest=loaded) for name in loaded.names()] + \
        [model_choice(b.name, cache_dir, manifest=loaded) for b in BUNDLED_MODELS]


def model_choice(name: str, cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None) -> ModelChoice:
    """The :class:`ModelChoice` of one model; a CheckpointError listing the known models for other names."""
    bundled = bundled_model(name)
    if bundled is not None:
        path = bundled_path(bundled)
        present = path.is_file()
        return ModelChoice(name, bundled.title, "bundled", present,
                           "bundled" if present else "missing from this installation", path, bundled.licence,
                           path.stat().st_size if present else 0, "")
    status = weights_status(name, cache_dir, manifest=manifest)
    files, entry = status.files, status.entry
    on_disk = files.path.is_file()
    path = files.safetensors if status.fast_copy else files.path
    if status.verified:
        state = "verified, fast copy" if status.fast_copy else "verified"
    elif status.recheck:
        state = "verified, checked again at the next load"
    else:
        state = "changed: download again" if status.cached else "not downloaded"
    checksum = {"manifest": "published", "pinned": "pinned", "none": "not yet known"}[status.checksum]
    size = files.path.stat().st_size if on_disk else entry.size
    return ModelChoice(name, entry.title, "download", status.verified or status.recheck, state, path, entry.licence,
                       size, checksum)


def preferred_model(cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None) -> str:
    """The model to offer first: the first one whose weights are ready, else the first downloadable one."""
    choices = available_models(cache_dir, manifest=manifest)
    return next((c.name for c in choices if c.ready), choices[0].name)


def find_checkpoint(name: str, cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None) -> Path:
    """The weights file to load for model ``name``: its bundled file, or its verified file in ``cache_dir``.

    Raises WeightsUnavailableError with a one-line message saying what to run (shell syntax) when there is none.
    """
    bundled = bundled_model(name)
    if bundled is not None:
        path = bundled_path(bundled)
        if not path.is_file():
            raise WeightsUnavailableError(
                f"The bundled weights of '{name}' are missing from this installation ({path}): reinstall the "
                "FastSAM3D extension (in a source checkout: git checkout -- Resources/Models).")
        return path
    loaded = load_manifest(manifest)
    if name not in loaded.models:
        raise WeightsUnavailableError(
            f"Model '{name}' has no published weights: give its checkpoint file (on the command line: "
            f"--checkpoint FILE). Models with weights: {', '.join(loaded.names() + [b.name for b in BUNDLED_MODELS])}.")
    path = resolve_checkpoint(name, cache_dir, manifest=loaded)
    if path is None:
        raise WeightsUnavailableError(
            f"No weights for model '{name}' on this machine (cache folder {resolve_cache_dir(cache_dir)}): "
            f"{weights_hint(name, cache_dir)}.")
    return path


def weights_sha256(name: str, cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None) -> Optional[str]:
    """The sha256 of the file model ``name`` loads its weights from: the bundled file's, or the checksum its
    download is verified against; None when that is not known yet (no published checksum, nothing downloaded) or
    ``name`` is no model with weights. A memory bank records the same checksum of the weights it was made with."""
    bundled = bundled_model(name)
    if bundled is not None:
        path = bundled_path(bundled)
        try:
            stat = path.stat()
        except OSError:
            return None
        return _bundled_sha256(str(path), stat.st_size, stat.st_mtime_ns)
    loaded = load_manifest(manifest)
    if name not in loaded.models:
        return None
    return weights_status(name, cache_dir, manifest=loaded).sha256


@functools.lru_cache(maxsize=8)
def _bundled_sha256(path: str, size: int, mtime_ns: int) -> Optional[str]:
    """sha256 of a bundled file, hashed once per (path, size, modification time)."""
    from ..files import sha256_file

    try:
        return sha256_file(Path(path))
    except OSError:
        return None


def weights_hint(name: str, cache_dir: Optional[PathLike] = None) -> str:
    """What to run to get the weights of downloadable model ``name`` into ``cache_dir`` (shell syntax)."""
    where = f" --cache-dir {shlex.quote(str(cache_dir))}" if cache_dir is not None else ""
    return (f"download them with: python -m FastSAM3DLib download {name}{where} (in Slicer: the Download button "
            f"of the FastSAM3D effect), or import a copied file with: python -m FastSAM3DLib import {name} "
            f"FILE{where}")
