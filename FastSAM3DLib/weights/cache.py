"""Where model files live on this machine: the per-user cache folder and the names of the files in it.

Inside Slicer the caller passes a folder under Slicer's cache directory. Outside Slicer the folder is
``$FASTSAM3D_CACHE`` when set, else the platform's user cache folder (``~/.cache/fastsam3d`` or
``$XDG_CACHE_HOME/fastsam3d`` on Linux, ``~/Library/Caches/fastsam3d`` on macOS,
``%LOCALAPPDATA%\\fastsam3d\\Cache`` on Windows). Nothing is computed at import time.

For a manifest file ``NAME.pth`` the folder holds:

``NAME.pth``                  the verified download (only ever put in place by an atomic rename)
``NAME.pth.verified.json``    its sha256, size and modification time; the pinned checksum when none is published
``NAME.safetensors``          the weights alone, for fast memory-mapped loading, tagged with the source sha256
                              (``NAME.weights.safetensors`` when the model file is itself a .safetensors file)
``NAME.pth.part``             an interrupted download, resumed by the next attempt (plus ``.part.json``)
``NAME.pth.lock``             present while one process downloads or imports the file
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from .manifest import ModelEntry

#: Environment variable that moves the cache outside Slicer.
CACHE_ENV = "FASTSAM3D_CACHE"


class CacheWarning(UserWarning):
    """The model cache could not be used as intended (read-only, full, a damaged copy); a slower path was taken."""

PathLike = Union[str, "os.PathLike[str]"]


def default_cache_dir() -> Path:
    """``$FASTSAM3D_CACHE`` if set, else the platform's per-user cache folder for FastSAM3D."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else home / "AppData" / "Local") / "fastsam3d" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "fastsam3d"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else home / ".cache") / "fastsam3d"


def resolve_cache_dir(cache_dir: Optional[PathLike] = None) -> Path:
    """The folder to use: ``cache_dir`` when given (Slicer passes its own), else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


@dataclass(frozen=True)
class ModelFiles:
    """Paths of everything the cache keeps for one manifest entry."""

    directory: Path
    filename: str

    @property
    def path(self) -> Path:
        """The verified model file."""
        return self.directory / self.filename

    @property
    def record(self) -> Path:
        """JSON record of the verified file (and the pinned checksum)."""
        return self.directory / (self.filename + ".verified.json")

    @property
    def part(self) -> Path:
        """An interrupted, resumable download."""
        return self.directory / (self.filename + ".part")

    @property
    def part_info(self) -> Path:
        """Where the ``.part`` file came from (URL, ETag, total size), so a resume asks for the same bytes."""
        return self.directory / (self.filename + ".part.json")

    @property
    def lock(self) -> Path:
        """Lock file held while one process writes the model file."""
        return self.directory / (self.filename + ".lock")

    @property
    def safetensors(self) -> Path:
        """The weights-only safetensors copy (never the model file itself, even when that is a safetensors file)."""
        stem = Path(self.filename).stem
        if self.filename.lower().endswith(".safetensors"):
            stem += ".weights"
        return self.directory / (stem + ".safetensors")

    def names(self) -> tuple:
        """The name of every file kept for this model, for checking that two models never share one."""
        return tuple(p.name for p in (self.path, self.record, self.part, self.part_info, self.lock,
                                      self.safetensors))

    def ensure_directory(self) -> None:
        """Create the cache folder (and parents) if needed."""
        self.directory.mkdir(parents=True, exist_ok=True)


def model_files(entry: ModelEntry, cache_dir: Optional[PathLike] = None) -> ModelFiles:
    """The cache paths of ``entry`` in ``cache_dir`` (see :func:`resolve_cache_dir`)."""
    return ModelFiles(resolve_cache_dir(cache_dir), entry.filename)
