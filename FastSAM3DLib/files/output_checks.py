"""Cheap checks of an output path, done before any work: a label file type, a writable folder, never an input."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .atomic import name_max
from .output_errors import output_error, refusal


#: Label file types the writers produce, as the output name must end (lowercase; single-file formats only).
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")
#: NIfTI stores directions as a rotation: it cannot keep sheared (non-perpendicular) voxel axes.
NIFTI_EXTENSIONS = (".nii.gz", ".nii")


#: Largest departure from perpendicular voxel axes (cosine of the angle) still treated as perpendicular.
SHEAR_TOLERANCE = 1e-4


def label_extension(path) -> str:
    """The label file type ``path`` names (one of :data:`LABEL_EXTENSIONS`), or OutputFileError listing them."""
    name = Path(path).name
    extension = _matching_extension(name, LABEL_EXTENSIONS)
    if extension:
        return extension
    shown = "".join(Path(name).suffixes[-2:]) or "no extension"
    raise refusal(f"{path}: unknown label file type ({shown}). End the output name with one of "
                  f"{', '.join(LABEL_EXTENSIONS)} (lowercase), e.g. {Path(path).with_name('label.nii.gz')}.")


def _matching_extension(name: str, extensions: Sequence[str]) -> Optional[str]:
    """The longest of ``extensions`` that ``name`` ends in after at least one other character, else None."""
    for extension in sorted(extensions, key=len, reverse=True):
        if name.endswith(extension) and len(name) > len(extension):
            return extension
    return None


def utf8_path(path) -> bool:
    """Whether ``path`` is valid UTF-8 text: a name with undecodable bytes (Python's surrogate escapes, e.g. a
    Latin-1 folder on Linux) makes SimpleITK abort the whole process instead of raising."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_output_path(path, inputs: Iterable = (), extensions: Optional[Sequence[str]] = None,
                      input_name: str = "input image") -> Path:
    """Refuse an output the label writer cannot use, before any work is done; returns it as a Path.

    Refused with :class:`OutputFileError`: an empty name or one ending in a slash, an existing folder, a
    device or other special file (``/dev/null``, a pipe: never written to nor replaced), any of ``inputs``
    (the same file, also through another path, a link or a hard link), an unknown extension, a name longer
    than the file system allows, a path through a file, a name that is not valid UTF-8 (:func:`utf8_path`), and a
    folder this process cannot write in (read-only disk, no permission). An existing symbolic link is replaced by
    the new file; its target is not touched. ``extensions``: the file types allowed (default: a label's,
    :data:`LABEL_EXTENSIONS`); ``input_name``: what the inputs are, for the message.
    """
    text = os.fspath(path)
    if not text or text.endswith(("/", os.sep)):
        raise refusal(f"output {text!r} is not a file name: give one, e.g. {_example_name(extensions)}.",
                      errno.EISDIR)
    if not utf8_path(text):
        raise refusal(f"output {text!r} has a folder or file name that is not valid text (UTF-8), which the image "
                      "writer cannot open: choose or rename a folder whose name is plain text.")
    path = Path(text)
    try:
        status = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        status = None
    except OSError as exc:
        raise output_error(exc, path) from None
    if status is not None:
        if stat.S_ISDIR(status.st_mode):
            raise refusal(f"output {path} is an existing folder: give a file name inside it, e.g. "
                          f"{path / _example_name(extensions)}.", errno.EISDIR)
        if not stat.S_ISREG(status.st_mode):
            raise refusal(f"output {path} is a device or other special file, not a regular file; FastSAM3D "
                          f"neither writes to nor replaces such files: give a file name, e.g. "
                          f"{_example_name(extensions)}.")
        for source in inputs:
            if _same_file(status, source):
                also = "" if os.fspath(source) == text else f" ({source})"
                raise refusal(f"output {path} is the {input_name}{also}: writing it would destroy that file. "
                              f"Choose another output name, e.g. {_example_name(extensions)}.", errno.EEXIST)
    if extensions is None:
        label_extension(path)
    elif not _matching_extension(path.name, extensions):
        raise refusal(f"{path}: this file must end in {' or '.join(extensions)}, e.g. "
                      f"{path.with_name(_example_name(extensions))}.")
    folder = _nearest_existing(path.parent)
    limit = name_max(folder)
    if len(os.fsencode(path.name)) > limit:
        raise refusal(f"output name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes long; this disk "
                      f"allows at most {limit}: choose a shorter file name.", errno.ENAMETOOLONG)
    if not folder.is_dir():
        raise refusal(f"cannot write {path}: {folder} is a file, not a folder; choose another folder.",
                      errno.ENOTDIR)
    if not os.access(folder, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only(folder) else errno.EACCES
        raise output_error(OSError(code, os.strerror(code)), path) from None
    return path


def _example_name(extensions: Optional[Sequence[str]]) -> str:
    return "label.nii.gz" if extensions is None else f"output{extensions[0]}"


def _same_file(status: os.stat_result, other) -> bool:
    try:
        other_status = os.stat(other)
    except (OSError, TypeError, ValueError):
        return False
    return (status.st_dev, status.st_ino) == (other_status.st_dev, other_status.st_ino)


def _nearest_existing(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))
    for candidate in (folder, *folder.parents):
        if os.path.lexists(candidate):
            return candidate
    return folder


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1))
    except (OSError, AttributeError):
        return False


def is_sheared(ijk_to_ras) -> bool:
    """True when the voxel axes of the 4x4 IJK->RAS matrix are not perpendicular (beyond :data:`SHEAR_TOLERANCE`)."""
    import numpy as np

    axes = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    cosines = axes.T @ axes - np.eye(3)
    return bool(np.max(np.abs(cosines)) > SHEAR_TOLERANCE)


def check_format_keeps_geometry(ijk_to_ras, output) -> None:
    """Refuse NIfTI output for sheared voxel axes: its writer would silently make them perpendicular."""
    if label_extension(output) in NIFTI_EXTENSIONS and is_sheared(ijk_to_ras):
        raise refusal(f"the image's voxel axes are not perpendicular (a sheared grid, e.g. a gantry-tilted CT); "
                      f"NIfTI cannot store that, so {Path(output).name} would not overlay the image. Write "
                      ".nrrd, .seg.nrrd or .mha instead: they keep the exact geometry.")
