"""Files in and out: atomic, verified label writing; checks that refuse bad outputs and untrustworthy inputs early.

* Writers never leave a partial file under the final name: they write a hidden temporary beside it
  (``.NAME.fastsam3d-tmp-XXXXXXXX.EXT``) and rename it when it is complete. A killed process (``kill -9``) may
  leave that temporary behind; the next write into the same folder removes ours once they are
  :data:`STALE_TEMP_SECONDS` old.
* A label file counts as written only after it was read back: geometry, every voxel, and for compressed
  files the whole stream (NIfTI's writer does not report a full disk).
* Input headers are read before any voxel: truncated NIfTI and Analyze files, damaged compressed data (their
  checksums are verified) and images larger than the memory budget are refused before the voxels are allocated.
* C++ libraries (ITK, niftilib, MetaIO) print to file descriptor 2; their text is collected and put into the
  error message instead, so a failing command prints exactly one ``error:`` line.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, List, Optional, Sequence, Tuple

from . import interrupts
from .errors import InputImageError, OutputFileError

if TYPE_CHECKING:  # annotations only: SimpleITK is imported where it is used
    import SimpleITK as sitk

#: Label file types the writers produce, as the output name must end (lowercase; single-file formats only).
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha")
#: NIfTI stores directions as a rotation: it cannot keep sheared (non-perpendicular) voxel axes.
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
#: Marker in the name of every temporary file :func:`atomic_output` creates.
TEMP_MARKER = ".fastsam3d-tmp-"
#: Our temporaries older than this (seconds since last written) are leftovers of a killed process.
STALE_TEMP_SECONDS = 15 * 60
#: Largest departure from perpendicular voxel axes (cosine of the angle) still treated as perpendicular.
SHEAR_TOLERANCE = 1e-4

_TEMP_NAME = re.compile(r"^\..*" + re.escape(TEMP_MARKER) + r"[a-z0-9_]{8}[^/]*$")
_RANDOM_PART = 8  # random characters in a temporary's name
_RANDOM_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"


# ------------------------------------------------------------------------------------------------------
# atomic writing


@contextlib.contextmanager
def atomic_output(path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    ``suffix``: the temporary file's ending, for writers that choose the format by name (``.nii.gz``, ``.npy``).
    The file gets the usual permissions (``0666`` less the umask), not ``mkstemp``'s ``0600``. Stale
    temporaries of killed runs in that folder are removed first (:func:`remove_stale_temporaries`). Failures
    of the file system (missing permission, read-only or full disk, a file where a folder should be) raise
    :class:`OutputFileError` with a one-line message; errors of the body propagate unchanged.
    """
    path = Path(path)
    created = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_empty_folders(created)
        raise output_error(exc, path, "create the folder for") from None
    remove_stale_temporaries(path.parent)
    tmp, done = None, False
    try:
        with interrupts.deferred():  # a Ctrl+C waits until the temporary's name is known (and it is removed)
            try:
                tmp = _create_temporary(path.parent, _temp_prefix(path, suffix), suffix)
            except OSError as exc:
                raise output_error(exc, path, "write") from None
        yield Path(tmp)
        try:
            replace_file(tmp, path)
        except OSError as exc:
            raise output_error(exc, path, "replace") from None
        done = True
    finally:
        if tmp is not None:
            with interrupts.deferred(), contextlib.suppress(OSError):
                os.remove(tmp)
        if not done:  # nothing was written: the folders made for it go too
            remove_empty_folders(created)


@contextlib.contextmanager
def temporary_beside(path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a new, empty hidden file beside ``path``, named as :func:`atomic_output` names its temporaries, and
    remove it on leaving the block unless it was renamed away (e.g. onto ``path``).

    For writers that handle their own errors: an ``OSError`` is raised as it is. Stale temporaries of killed runs
    in that folder are removed first (:func:`remove_stale_temporaries`), so a ``kill -9`` leaves nothing for long.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent)
    tmp = None
    try:
        with interrupts.deferred():  # a Ctrl+C waits until the temporary's name is known (and it is removed)
            tmp = _create_temporary(path.parent, _temp_prefix(path, suffix), suffix)
        yield Path(tmp)
    finally:
        if tmp is not None:
            with interrupts.deferred(), contextlib.suppress(OSError):
                os.remove(tmp)


def remove_empty_folders(folders) -> None:
    """Remove these folders (deepest first) where they are empty; those holding anything stay."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _temp_prefix(path: Path, suffix: str) -> str:
    """``.NAME.fastsam3d-tmp-``, NAME shortened so the whole temporary name fits the folder's name limit."""
    room = _name_max(path.parent) - 1 - len(TEMP_MARKER) - _RANDOM_PART - len(os.fsencode(suffix))
    name = os.fsencode(path.name)[:max(room, 0)]
    return f".{name.decode('utf-8', 'ignore')}{TEMP_MARKER}"


def is_our_temporary(name: str) -> bool:
    """True for names :func:`atomic_output` gives its temporary files."""
    return bool(_TEMP_NAME.match(name))


def remove_stale_temporaries(folder, older_than: float = STALE_TEMP_SECONDS) -> List[Path]:
    """Remove our temporary files in ``folder`` not written for ``older_than`` seconds; returns those removed.

    Only regular files named like :func:`atomic_output`'s temporaries are touched (never links, folders or
    other files); a temporary a running process is still writing is younger and stays.
    """
    removed = []
    limit = time.time() - older_than
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if is_our_temporary(entry.name) and entry.is_file(follow_symlinks=False) and \
                    entry.stat(follow_symlinks=False).st_mtime < limit:
                os.remove(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def open_fd(path, flags: int, mode: int = 0o644) -> int:
    """A descriptor from ``os.open`` for ``path``, ``flags`` and ``mode``: in binary mode, never through a symlink.

    Adds ``O_BINARY`` and ``O_NOFOLLOW`` where the system has them. Windows opens an ``os.open`` descriptor in
    text mode otherwise: every LF byte written becomes CR LF, and a read stops at the first Ctrl-Z byte, so a
    downloaded checkpoint would never match its checksum. ``open()`` and ``tempfile`` add ``O_BINARY``
    themselves; every ``os.open`` of this library goes through here.
    """
    return os.open(path, flags | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0), mode)


#: How long a replace waits for Windows to let go of a file: a virus scanner or the search indexer opens new and
#: replaced files for a moment (pip allows the same second for its own replaces).
REPLACE_RETRY_SECONDS = 1.0


def in_use_on_windows(exc: OSError) -> bool:
    """Whether ``exc`` is Windows refusing to move or delete a file that a process has open (WinError 32,
    ERROR_SHARING_VIOLATION, or 5, ERROR_ACCESS_DENIED, which it also gives for that)."""
    return getattr(exc, "winerror", None) in (5, 32)


def replace_file(source, target) -> None:
    """Replace ``target`` by ``source`` (``os.replace``), tried again for up to :data:`REPLACE_RETRY_SECONDS` while
    Windows reports one of the files in use (WinError 5 or 32); then the error is raised."""
    deadline = time.monotonic() + REPLACE_RETRY_SECONDS
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError as exc:
            if not in_use_on_windows(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.1)


def _create_temporary(folder: Path, prefix: str, suffix: str) -> str:
    """A new empty file ``prefix + 8 random characters + suffix`` in ``folder``, with the permissions a new file
    usually gets (``0666`` less the umask, which the system applies; ``mkstemp`` gives ``0600``). The umask is
    never read: reading it means setting it, which would race with other threads creating files."""
    for _attempt in range(100):
        random_part = "".join(secrets.choice(_RANDOM_CHARACTERS) for _ in range(_RANDOM_PART))
        name = os.path.join(folder, prefix + random_part + suffix)
        try:
            os.close(open_fd(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


def _name_max(folder) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing parent) allows."""
    folder = Path(os.path.abspath(folder))
    for candidate in (folder, *folder.parents):
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):
            continue
    return 255


# ------------------------------------------------------------------------------------------------------
# messages for file-system failures

_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EDQUOT: "your disk quota is used up: free some space or choose another folder",
    errno.EROFS: "the folder is on a read-only disk: choose a folder you can write to",
    errno.EACCES: "you have no permission to write there: choose a folder you can write to",
    errno.EPERM: "the operation is not permitted there: choose a folder you can write to",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter file name or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another folder",
    errno.EEXIST: "a file of that name is in the way of the folder: choose another folder",
    errno.EISDIR: "it is a folder: give a file name inside it, e.g. label.nii.gz",
    errno.EFBIG: "the file is larger than this process may write (a file size limit, see 'ulimit -f')",
    errno.ELOOP: "the path has a symbolic link loop: choose another path",
}


#: Windows refuses to delete, rename or replace a file that a program has open (Python, viewers, virus scanners
#: and sync clients open files without FILE_SHARE_DELETE): WinError 32/33 say so, WinError 5 may mean it too.
_WINDOWS_ADVICE = {
    32: "another program has the file open (a viewer, a virus scanner, a sync client): close it and try again",
    33: "another program has locked a part of the file: close it and try again",
    5: "you have no permission to write there, or another program has the file open: close it, or choose a "
       "folder you can write to",
}


def output_error(exc: OSError, path, action: str = "write") -> OutputFileError:
    """A one-line :class:`OutputFileError` for an ``OSError`` met while writing ``path``; keeps its ``errno``."""
    advice = _WINDOWS_ADVICE.get(getattr(exc, "winerror", None)) or \
        _ADVICE.get(exc.errno, "choose another file name or folder")
    reason = exc.strerror or str(exc) or type(exc).__name__
    error = OutputFileError(f"cannot {action} {path}: {reason}; {advice}.")
    error.errno = exc.errno
    return error


def _refuse(message: str, code: Optional[int] = None) -> OutputFileError:
    error = OutputFileError(message)
    error.errno = code
    return error


# ------------------------------------------------------------------------------------------------------
# output checks (cheap; done before any work)


def label_extension(path) -> str:
    """The label file type ``path`` names (one of :data:`LABEL_EXTENSIONS`), or OutputFileError listing them."""
    name = Path(path).name
    extension = _matching_extension(name, LABEL_EXTENSIONS)
    if extension:
        return extension
    shown = "".join(Path(name).suffixes[-2:]) or "no extension"
    raise _refuse(f"{path}: unknown label file type ({shown}). End the output name with one of "
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
        raise _refuse(f"output {text!r} is not a file name: give one, e.g. {_example_name(extensions)}.",
                      errno.EISDIR)
    if not utf8_path(text):
        raise _refuse(f"output {text!r} has a folder or file name that is not valid text (UTF-8), which the image "
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
            raise _refuse(f"output {path} is an existing folder: give a file name inside it, e.g. "
                          f"{path / _example_name(extensions)}.", errno.EISDIR)
        if not stat.S_ISREG(status.st_mode):
            raise _refuse(f"output {path} is a device or other special file, not a regular file; FastSAM3D "
                          f"neither writes to nor replaces such files: give a file name, e.g. "
                          f"{_example_name(extensions)}.")
        for source in inputs:
            if _same_file(status, source):
                also = "" if os.fspath(source) == text else f" ({source})"
                raise _refuse(f"output {path} is the {input_name}{also}: writing it would destroy that file. "
                              f"Choose another output name, e.g. {_example_name(extensions)}.", errno.EEXIST)
    if extensions is None:
        label_extension(path)
    elif not _matching_extension(path.name, extensions):
        raise _refuse(f"{path}: this file must end in {' or '.join(extensions)}, e.g. "
                      f"{path.with_name(_example_name(extensions))}.")
    folder = _nearest_existing(path.parent)
    limit = _name_max(folder)
    if len(os.fsencode(path.name)) > limit:
        raise _refuse(f"output name {path.name[:40]}... is {len(os.fsencode(path.name))} bytes long; this disk "
                      f"allows at most {limit}: choose a shorter file name.", errno.ENAMETOOLONG)
    if not folder.is_dir():
        raise _refuse(f"cannot write {path}: {folder} is a file, not a folder; choose another folder.",
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
        raise _refuse(f"the image's voxel axes are not perpendicular (a sheared grid, e.g. a gantry-tilted CT); "
                      f"NIfTI cannot store that, so {Path(output).name} would not overlay the image. Write "
                      ".nrrd, .seg.nrrd or .mha instead: they keep the exact geometry.")


# ------------------------------------------------------------------------------------------------------
# native stderr


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[List[str]]:
    """Collect what C/C++ libraries print on file descriptor 2 while the block runs (a list, filled at the end).

    Where file descriptor 2 cannot be redirected, nothing is collected and the text goes where it went.
    """
    lines: List[str] = []
    saved = sink = None
    try:
        with interrupts.deferred():  # a Ctrl+C waits until descriptor 2 is redirected and will be restored
            try:
                if sys.stderr is not None:
                    sys.stderr.flush()
                saved = os.dup(2)
            except (OSError, ValueError, AttributeError):
                saved = None  # cannot redirect: the text goes where it went
            if saved is not None:
                try:
                    sink = tempfile.TemporaryFile()
                except OSError:
                    sink = open(os.devnull, "w+b")
                os.dup2(sink.fileno(), 2)
        yield lines
    finally:
        with interrupts.deferred():  # and the restoring runs to its end (else the last message is lost)
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            if sink is not None:
                sink.seek(0)
                text = sink.read(1 << 16).decode("utf-8", "replace")
                lines.extend(line.strip() for line in text.splitlines() if line.strip())
                sink.close()


def itk_reason(error: BaseException, native: Iterable[str] = ()) -> str:
    """One line saying why ITK failed: the last line of its exception, plus what it printed itself."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    extra = [line for line in native if line not in reason][:3]
    return "; ".join([reason, *extra])


# ------------------------------------------------------------------------------------------------------
# input headers: size, memory budget, truncation


class ImageHeader:
    """What an image file's header promises: size (i, j, k...), components per voxel, pixel type."""

    def __init__(self, size, components: int, pixel_id: int, pixel_type: str, bytes_per_component: int):
        self.size = tuple(int(n) for n in size)
        self.components = int(components)
        self.pixel_id = int(pixel_id)
        self.pixel_type = pixel_type
        self.bytes_per_component = int(bytes_per_component)

    @property
    def dimension(self) -> int:
        return len(self.size)

    @property
    def voxel_bytes(self) -> int:
        """Bytes the voxels take in memory."""
        total = self.components * self.bytes_per_component
        for n in self.size:
            total *= n
        return total

    @classmethod
    def from_reader(cls, reader: "sitk.ImageFileReader", slices: int = 1) -> "ImageHeader":
        """From an ``ImageFileReader`` after ``ReadImageInformation``; ``slices`` multiplies the last axis (DICOM)."""
        import SimpleITK as sitk

        size = list(reader.GetSize())
        if slices > 1:
            size = size[:2] + [max(size[2] if len(size) > 2 else 1, 1) * slices]
        components = reader.GetNumberOfComponents()
        pixel_id = reader.GetPixelID()
        try:
            bytes_per_component = sitk.Image([1] * 2, pixel_id, components).GetSizeOfPixelComponent()
        except (RuntimeError, TypeError):
            bytes_per_component = 8
        return cls(size, components, pixel_id, sitk.GetPixelIDValueAsString(pixel_id), bytes_per_component)


def memory_budget() -> int:
    """Memory one segmentation run may take by default: two thirds of this computer's (6 GB where unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 6 << 30
    return max(int(total) * 2 // 3, 1 << 28)


def run_bytes(header: ImageHeader) -> int:
    """About the memory a segmentation run needs for the image of ``header``, beyond the model: 1.5 times its
    voxels (read, SimpleITK's buffer and the array overlap briefly) plus 2.5 bytes a voxel (mask, label, the
    label read back). Measured (one click, demo model, peak above the loaded model): 5.1 bytes a voxel for a
    0.43 GB int16 CT, 4.0 for its uint8 copy, where this says 5.5 and 4."""
    return int(1.5 * header.voxel_bytes + 2.5 * math.prod(header.size))


def check_memory_budget(header: ImageHeader, path, max_bytes: Optional[int] = None) -> None:
    """Refuse (InputImageError) an image whose voxels need more than ``max_bytes``, or by default one whose run
    would need more than :func:`memory_budget` (:func:`run_bytes`)."""
    need = header.voxel_bytes
    size = f"{path} holds {' x '.join(map(str, header.size))} voxels of {header.pixel_type} ({_gb(need)} in memory)"
    advice = ("Crop or downsample it first (e.g. Slicer's Crop Volume module), or raise the limit (--max-image-gb "
              "on the command line, max_bytes= in Python) if this computer has the memory.")
    if max_bytes is not None:
        if need > int(max_bytes):
            raise InputImageError(f"{size}, more than the {_gb(int(max_bytes))} allowed for one image. {advice}")
        return
    budget, run = memory_budget(), run_bytes(header)
    if run > budget:
        raise InputImageError(f"{size}; segmenting it needs about {_gb(run)}, more than the {_gb(budget)} a run may "
                              f"take (two thirds of this computer's memory). {advice}")


def _gb(n: int) -> str:
    gb = n / 1e9
    return f"{gb:,.0f} GB" if gb >= 10 else f"{gb:.2g} GB"


#: Compressed bytes read at a time when a compressed input is checked; decompressed bytes held at most.
_READ_CHUNK = 1 << 22
_INFLATE_CHUNK = 1 << 24
_GZIP_MAGIC = b"\x1f\x8b"


def check_complete(path) -> None:
    """Refuse (InputImageError) an image file that is cut short or whose compressed data are damaged.

    ITK reads a NIfTI or Analyze file (``.nii``, ``.nii.gz``, ``.hdr``/``.img`` pairs) holding fewer voxel bytes
    than its header promises without complaint, filling the missing part with zeros; it reads a damaged
    compressed stream (gzip NIfTI, NRRD ``encoding: gzip``, MetaImage ``CompressedData = True``, attached or
    in a named data file) as garbage. So the header's promise is compared with the data, and each compressed
    stream is decompressed once, in chunks and keeping nothing, to verify its own checksum (gzip: CRC-32 and
    length; zlib: Adler-32). Compression is recognised by content, not name (ITK reads a plain NIfTI named
    ``.nii.gz`` too). Other formats are left to their readers.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    elif name.endswith((".hdr", ".hdr.gz", ".img", ".img.gz")):
        _check_nifti_pair(path)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)
    else:
        _check_nrrd(path)  # NRRD is recognised by its first bytes, whatever the name (.nrrd, .nhdr, .seg.nrrd)


def checked_complete(path):
    """A context: :func:`check_complete` runs in a thread while the body reads ``path``, and its refusal is raised
    when the body ends (see :func:`_beside`)."""
    return _beside(check_complete, path)


@contextlib.contextmanager
def _beside(check, *args) -> Iterator[List]:
    """Run ``check(*args)`` in a thread while the body reads the same file (ITK decompresses it as well: on a
    computer with more than one core the check then adds little time). Yields a list that holds its result once
    the body has ended; its exception is raised then, also in place of the body's own error, which a damaged
    file causes and explains less well (Ctrl+C is not held up)."""
    import threading

    outcome: List = []

    def run() -> None:
        try:
            outcome.append(check(*args))
        except BaseException as exc:  # handed over to the reading thread
            outcome.append(exc)

    thread = threading.Thread(target=run, name="FastSAM3D file check", daemon=True)
    thread.start()
    result: List = []
    try:
        yield result
    except Exception:
        thread.join()
        if outcome and isinstance(outcome[0], BaseException):
            raise outcome[0] from None
        raise
    thread.join()
    if outcome and isinstance(outcome[0], BaseException):
        raise outcome[0]
    result.extend(outcome)


def _truncated(path, problem: Optional[str] = None) -> InputImageError:
    """The refusal of a file that is cut short or damaged (``problem``: how, if known)."""
    detail = f": {problem}" if problem else ""
    return InputImageError(f"{path} is truncated or damaged{detail}. It was probably cut short or corrupted while "
                           "copying or downloading; copy it again, or export it again from where it came from.")


#: what ITK's readers say when a file's data end before the voxels its header promises (raw NRRD, MetaImage)
_SHORT_DATA = ("fread got only", "data not read completely")


def short_data_refusal(path, reason: str) -> Optional[InputImageError]:
    """The refusal of ``path`` when ITK's failure ``reason`` (:func:`itk_reason`) says its data end too early: the
    reader's own words on it, without the noise around them; None for other failures."""
    said = [part.strip() for part in reason.split(";") if any(words in part for words in _SHORT_DATA)]
    if not said:
        return None
    data = _named_data_file(Path(path))
    return _truncated(path if data is None else f"{data} (the data file of {path})", "; ".join(said))


def _named_data_file(path: Path) -> Optional[Path]:
    """The one data file a detached NRRD or MetaImage header names (:func:`_data_file`), or None."""
    try:
        header = _metaimage_header(path) if path.name.lower().endswith((".mha", ".mhd")) else _nrrd_header(path)
    except InputImageError:  # it names a device or a pipe: not a file cut short
        return None
    return header[3] if header is not None else None


def _is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with gzip's magic bytes (whatever its name)."""
    with open(path, "rb") as raw:
        return raw.read(2) == _GZIP_MAGIC


def _check_nifti(path: Path) -> None:
    """:func:`check_complete` for a single-file NIfTI-1/2 (plain or gzip-compressed)."""
    problem = _nifti_problem(path)
    if problem:
        raise _truncated(path, problem)


def _nifti_problem(path: Path) -> Optional[str]:
    """Why a single-file NIfTI-1/2 (plain or gzip-compressed) is cut short or damaged; None when it is whole (or
    no NIfTI). For inputs (:func:`check_complete`) and for written labels (:func:`_verify_label`) alike."""
    try:
        compressed = _is_gzip(path)
        with (gzip.open if compressed else open)(path, "rb") as stream:
            need = _nifti_bytes(stream.read(544))
        if need is None:
            return None
        have, problem = _inflated_size(path) if compressed else (path.stat().st_size, None)
    except (OSError, EOFError, zlib.error):  # not even a whole header
        return "not even its header is whole"
    return _short_problem(need, have, problem)


def _short_problem(need: int, have: Optional[int], problem: Optional[str],
                   header: Optional[Path] = None) -> Optional[str]:
    """Why data that must hold ``need`` bytes are damaged (``problem``) or hold fewer (``have``; None where
    unknown: corrupt data); None if neither. ``header``: the separate header that promised ``need``, if any."""
    owner = f"its header {header.name}" if header is not None else "the header"
    if have is not None and have < need:
        return (f"{problem}, after {have} of the {need} bytes {owner} promises" if problem
                else f"{owner} promises {need} bytes, the file holds {have}")
    return problem


def _check_nifti_pair(path: Path) -> None:
    """:func:`check_complete` for a two-file NIfTI-1/2 or Analyze 7.5 image (``.hdr`` + ``.img``, either gzipped).

    The image file is found as niftilib finds it: the same name with ``.img``, then ``.img.gz``.
    """
    stem, ext = _split_pair_name(path.name)
    upper = ext[:4].isupper()
    header = _first_existing(path.parent, stem, (".HDR", ".HDR.GZ", ".hdr", ".hdr.gz") if upper
                             else (".hdr", ".hdr.gz", ".HDR", ".HDR.GZ"))
    if ext.lower().startswith(".hdr") and path.is_file():
        header = path
    image = _first_existing(path.parent, stem, (".IMG", ".IMG.GZ", ".img", ".img.gz") if upper
                            else (".img", ".img.gz", ".IMG", ".IMG.GZ"))
    if header is None or image is None:
        return  # ITK says which file is missing
    try:
        header_gz = _is_gzip(header)
        problem = _inflated_size(header)[1] if header_gz else None
        if not problem:
            with (gzip.open if header_gz else open)(header, "rb") as stream:
                head = stream.read(540)
    except (OSError, EOFError, zlib.error):
        raise _truncated(header) from None
    if problem:
        raise _truncated(header, problem)
    need = _nifti_bytes(head, pair=True)
    if need is None:
        return
    try:
        have, problem = _inflated_size(image) if _is_gzip(image) else (image.stat().st_size, None)
    except OSError:
        raise _truncated(image) from None
    problem = _short_problem(need, have, problem, header)
    if problem:
        raise _truncated(image, problem)


def _split_pair_name(name: str) -> Tuple[str, str]:
    """(stem, extension) of a ``.hdr``/``.img`` name, the extension with any ``.gz``: ``a.b.HDR.gz`` -> ``a.b``."""
    cut = 7 if name.lower().endswith(".gz") else 4
    return name[:-cut], name[-cut:]


def _first_existing(folder: Path, stem: str, extensions: Sequence[str]) -> Optional[Path]:
    """The first existing file ``folder/stem+extension``, or None."""
    for extension in extensions:
        candidate = folder / (stem + extension)
        if candidate.is_file():
            return candidate
    return None


def _nifti_bytes(head: bytes, pair: bool = False) -> Optional[int]:
    """Bytes a single-file NIfTI-1/2 must hold (voxel offset + voxel data), from its header; None if not NIfTI.

    With ``pair``: bytes the image file of a two-file NIfTI-1/2 (magic ``ni1``/``ni2``) or Analyze 7.5 (no magic)
    must hold. The byte order is the one in which the header's size field reads 348 (or 540 for NIfTI-2).
    """
    if len(head) < 348:
        return None
    one, two = (b"ni1\0", b"ni2\0") if pair else (b"n+1\0", b"n+2\0")
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        magic = head[344:348]
        analyze = pair and not (magic[:1] == b"n" and magic[1:2] in b"+i" and magic[3:4] == b"\0")
        if size == 348 and (magic == one or analyze):
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if size == 540 and len(head) >= 540 and head[4:8] == two:
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return None
    count = 1
    for n in dims[1:1 + max(0, min(int(dims[0]), 7))]:
        count *= max(int(n), 0)
    return max(offset, 0) + count * max(int(bitpix), 0) // 8


def _inflated_size(path: Path, offset: int = 0, wbits: int = 31, limit: Optional[int] = None
                   ) -> Tuple[Optional[int], Optional[str]]:
    """Decompress the stream in ``path`` from byte ``offset`` (at most ``limit`` bytes of it) in chunks, keeping
    nothing; returns (decompressed bytes, None if unknown; why the stream is damaged or cut short, None if sound).

    ``wbits`` is zlib's: 31 gzip, 15 zlib, 47 either. zlib verifies each stream's own checksum (gzip: CRC-32
    and length, zlib: Adler-32). gzip members that follow are checked too (a multi-member file is legal);
    other bytes after the end are ignored, as zlib's and teem's gzip readers do.
    """
    have, pending = 0, b""
    left = float("inf") if limit is None else limit
    decompressor = zlib.decompressobj(wbits)
    with open(path, "rb") as raw:
        raw.seek(offset)

        def more(n: int = _READ_CHUNK) -> bytes:
            nonlocal left
            data = raw.read(int(min(n, left)))
            left -= len(data)
            return data

        while True:
            if not pending:
                pending = more()
                if not pending:
                    return have, "its compressed data end early"
            try:
                have += len(decompressor.decompress(pending, _INFLATE_CHUNK))
            except zlib.error as exc:
                return None, f"its compressed data are corrupt ({str(exc).split(': ', 1)[-1]})"
            if not decompressor.eof:
                pending = decompressor.unconsumed_tail
                continue
            pending = decompressor.unused_data
            if wbits != 31:
                return have, None
            if len(pending) < 2:
                pending += more(2 - len(pending))
            if not pending.startswith(_GZIP_MAGIC):
                return have, None
            decompressor = zlib.decompressobj(wbits)


def _check_nrrd(path: Path, streams: bool = True) -> None:
    """:func:`check_complete` for a NRRD with ``encoding: gzip``, data attached or in one named data file; with
    ``streams`` False only the named data file's kind (:func:`check_data_files`)."""
    header = _nrrd_header(path)
    if header is None:
        return
    fields, start, name, data = header
    if not streams or start is None or fields.get("encoding", "").lower() not in ("gzip", "gz") or \
            fields.get("lineskip", "0") != "0":  # line skip: the stream starts after lines we do not check
        return
    if name is None:
        _check_stream(path, start, 31)
    elif data is not None:
        _check_stream(data, 0, 31)


def _check_metaimage(path: Path, streams: bool = True) -> None:
    """:func:`check_complete` for a MetaImage with ``CompressedData = True``, data attached or in one named file;
    with ``streams`` False only the named data file's kind (:func:`check_data_files`)."""
    header = _metaimage_header(path)
    if header is None:
        return
    fields, start, name, data = header
    if not streams or fields.get("compresseddata", "").lower() != "true" or name is None or \
            fields.get("headersize", "0") != "0":
        return
    size = fields.get("compresseddatasize", "")
    limit = int(size) if size.isdigit() and int(size) > 0 else None
    if name.upper() == "LOCAL":
        _check_stream(path, start, 47, limit)
    elif data is not None:
        _check_stream(data, 0, 47, limit)


def _nrrd_header(path: Path):
    """``(fields, start, name, data)`` of a NRRD header: its fields (keys lower case, without spaces), the offset of
    attached data (None if unknown), the data file it names and that file (:func:`_data_file`; None for a list
    ``NAME MIN MAX STEP``); None for a file that is not a readable NRRD."""
    try:
        with open(path, "rb") as raw:
            if raw.read(7) != b"NRRD000":
                return None
            fields, start = _header_fields(raw, _NRRD_FIELD, blank_ends=True)
    except OSError:
        return None
    fields = {key.lower().replace(" ", ""): value for key, value in fields.items()}
    name = fields.get("datafile")
    return fields, start, name, _data_file(path, name) if name is None or len(name.split()) == 1 else None


def _metaimage_header(path: Path):
    """``(fields, start, name, data)`` of a MetaImage header, as :func:`_nrrd_header` (keys lower case); None for a
    file that cannot be read."""
    try:
        with open(path, "rb") as raw:
            fields, start = _header_fields(raw, _META_FIELD, blank_ends=False)
    except OSError:
        return None
    fields = {key.lower(): value for key, value in fields.items()}
    name = fields.get("elementdatafile")
    return fields, start, name, _data_file(path, name)


def check_data_files(path) -> None:
    """Refuse (InputImageError) a detached NRRD or MetaImage header (``.nhdr``, ``.mhd``) whose data file is a
    pipe or a device: ITK opens it already to read the header, and would wait for ever. Reads only the header."""
    path = Path(path)
    if path.name.lower().endswith((".mha", ".mhd")):
        _check_metaimage(path, streams=False)
    elif not path.name.lower().endswith((".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")):
        _check_nrrd(path, streams=False)


def _data_file(header: Path, name: Optional[str]) -> Optional[Path]:
    """The one data file ``name`` that a detached header names (relative names lie beside it), or None: attached
    data (none, ``LOCAL``), a ``LIST`` or a ``%d`` pattern of files. InputImageError for one that exists but is no
    regular file: reading a pipe or a terminal named there would wait for ever."""
    if name is None or name.upper() in ("LOCAL", "LIST") or "%" in name:
        return None
    data = header.parent / name
    if data.exists() and not data.is_file():
        raise InputImageError(f"{header} names the data file {data}, which is not a regular file (a device or a "
                              "pipe?). Point the header at the image's data file.")
    return data


_NRRD_FIELD = re.compile(r"([A-Za-z][A-Za-z ]*):\s(.*)")  # not key:=value pairs
_META_FIELD = re.compile(r"\s*([A-Za-z]\w*)\s*=\s*(.*)")


def _header_fields(raw, pattern, blank_ends: bool) -> Tuple[dict, Optional[int]]:
    """Fields of a text header (NRRD ends at a blank line or the end of a detached header, MetaImage after
    ``ElementDataFile``) and the offset where attached data follow it (None if the header does not end within
    16 MiB)."""
    fields, offset = {}, raw.tell()
    for line in iter(lambda: raw.readline(1 << 16), b""):
        offset += len(line)
        if offset > 1 << 24 or not line.endswith(b"\n"):
            return fields, None
        text = line.decode("latin-1").rstrip("\r\n")
        if blank_ends and not text:
            return fields, offset
        match = pattern.fullmatch(text)
        if match:
            fields[match.group(1)] = match.group(2).strip()
            if not blank_ends and match.group(1).lower() == "elementdatafile":
                return fields, offset
    return fields, offset if blank_ends else None  # a detached NRRD header may end without a blank line


def _check_stream(path: Path, offset: Optional[int], wbits: int, limit: Optional[int] = None) -> None:
    """Refuse the file whose compressed stream from ``offset`` is damaged or cut short (see :func:`_inflated_size`).

    A missing or unreadable file, or a stream that does not begin with its format's magic bytes, is left to ITK.
    """
    if offset is None:
        return
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            first = raw.read(2)
        if wbits == 31 and first != _GZIP_MAGIC or len(first) < 2:
            return
        have, problem = _inflated_size(path, offset, wbits, limit)
    except OSError:
        return
    if problem:
        raise _truncated(path, problem)


# ------------------------------------------------------------------------------------------------------
# label writing


def write_label_atomically(volume, mask, output, inputs: Iterable = ()) -> Path:
    """Write ``mask`` as a uint8 label image with ``volume``'s geometry to ``output``; returns its path.

    ``output`` must end in one of :data:`LABEL_EXTENSIONS` and pass :func:`check_output_path` (``inputs``:
    files it must not be). The file appears under its name only after it was written completely and read
    back (geometry, voxels, the whole compressed stream); otherwise :class:`OutputFileError` says why (a full
    disk, a file size limit...) and neither the file nor a temporary is left.
    """
    import numpy as np
    import SimpleITK as sitk

    output = check_output_path(output, inputs)
    extension = label_extension(output)
    check_format_keeps_geometry(volume.ijk_to_ras, output)
    mask = np.asarray(mask)
    label = mask.view(np.uint8) if mask.dtype == np.bool_ and mask.flags.c_contiguous else \
        np.ascontiguousarray(mask, dtype=np.uint8)  # a bool mask is taken as it is: no copy of the volume's size
    image = volume.to_sitk(label)
    with atomic_output(output, suffix=extension) as tmp:
        with native_stderr_captured() as native:
            try:
                sitk.WriteImage(image, str(tmp), True)
                failure = None
            except RuntimeError as exc:
                failure = exc
        if failure is not None:
            raise write_failed(output, tmp, label.nbytes, itk_reason(failure, native)) from None
        geometry = {"size": image.GetSize(), "spacing": image.GetSpacing(), "origin": image.GetOrigin(),
                    "direction": image.GetDirection()}
        del image  # its voxels, a copy of the label, are not needed while the file is read back
        problem = _verify_label(tmp, geometry, label, extension)
        if problem:
            raise write_failed(output, tmp, label.nbytes, "; ".join([problem, *native[:2]]))
    return output


def _verify_label(path: Path, expected: dict, label, extension: str) -> Optional[str]:
    """Why the label file at ``path`` is not ``label`` with the ``expected`` geometry (``size``, ``spacing``,
    ``origin``, ``direction`` as SimpleITK gives them): size, header, stream, voxels; None if it is."""
    import numpy as np
    import SimpleITK as sitk

    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with native_stderr_captured() as native:
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            if reader.GetSize() != expected["size"] or reader.GetNumberOfComponents() != 1:
                return f"its header says size {reader.GetSize()}, expected {expected['size']}"
            for what, got, want, tol in (("spacing", reader.GetSpacing(), expected["spacing"], 1e-5),
                                         ("origin", reader.GetOrigin(), expected["origin"], 1e-4),
                                         ("direction", reader.GetDirection(), expected["direction"], 1e-4)):
                scale = max(1.0, float(np.max(np.abs(want))))
                if not np.allclose(got, want, rtol=0, atol=tol * scale):
                    return f"its header has another {what} ({np.round(got, 5).tolist()}) than the image"
            with _beside(_stream_problem, path, extension) as stream:
                written = reader.Execute()
            if stream[0]:
                return stream[0]
        except RuntimeError as exc:
            return f"it cannot be read back ({itk_reason(exc, native)})"
    back = sitk.GetArrayViewFromImage(written)  # a view: valid while ``written`` lives
    if back.shape != label.shape or not _equal_in_slabs(back, label):
        return "its voxels differ from the label"
    return None


def _equal_in_slabs(a, b, voxels: int = 1 << 24) -> bool:
    """``np.array_equal`` of two arrays of one shape, a slab of about ``voxels`` at a time: no temporary of the
    whole volume's size."""
    import numpy as np

    step = max(1, voxels // max(1, int(np.prod(a.shape[1:]))))
    return all(np.array_equal(a[k:k + step], b[k:k + step]) for k in range(0, a.shape[0], step))


def _stream_problem(path: Path, extension: str) -> Optional[str]:
    """Why a written NIfTI file is incomplete (the whole gzip stream and its checksum are read), or None."""
    if extension not in NIFTI_EXTENSIONS:
        return None  # NRRD and MetaImage readers check their own data length and compression
    problem = _nifti_problem(path)
    return f"the file is cut short or damaged: {problem}" if problem else None


def write_failed(output: Path, tmp: Path, label_bytes: int, detail: str) -> OutputFileError:
    """The error for a file that could not be written completely (``label_bytes``: about its size): says whether
    the disk or a file size limit was full."""
    import shutil

    code, cause = None, "the file could not be written completely"
    try:
        written = tmp.stat().st_size
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        written, free = 0, None
    limit = _file_size_limit()
    if limit is not None and written >= limit - 4096:
        code, cause = errno.EFBIG, f"a file size limit ('ulimit -f', {limit} bytes) stopped it"
    elif free is not None and free < max(label_bytes, 1 << 20):
        code, cause = errno.ENOSPC, f"the disk holding {output.parent} is full ({free} bytes free)"
    error = OutputFileError(f"cannot write {output}: {cause} ({detail}). Nothing was written: free some space "
                            "or choose another folder.")
    error.errno = code
    return error


def library_write_error(exc: BaseException, output, tmp, nbytes: int) -> OutputFileError:
    """One-line :class:`OutputFileError` for a non-``OSError`` a library raised while writing ``output`` through
    ``tmp`` (safetensors' SafetensorError says "os error 28"); ``nbytes``: about the file's size."""
    lines = str(exc).strip().splitlines()
    detail = lines[0][:300] if lines else type(exc).__name__
    found = re.search(r"os error (\d+)", detail)
    if found:
        code = int(found.group(1))
        if sys.platform == "win32":  # Rust reports Windows' own error codes there
            code = _WINDOWS_ERRNO.get(code, 0)
        if code:
            return output_error(OSError(code, os.strerror(code)), output)
    return write_failed(Path(output), Path(tmp), nbytes, detail)


# Windows error codes a library may report ("os error N") -> errno: disk full, access denied, in use
_WINDOWS_ERRNO = {112: errno.ENOSPC, 39: errno.ENOSPC, 5: errno.EACCES, 32: errno.EBUSY, 3: errno.ENOENT}


def _file_size_limit() -> Optional[int]:
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def read_header(path, slices: int = 1) -> Tuple[ImageHeader, "sitk.ImageFileReader"]:
    """The header of an image file (no voxels read) and the reader, ready to ``Execute``; RuntimeError from ITK."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return ImageHeader.from_reader(reader, slices), reader


def parse_json(text):
    """``json.loads(text)``, with JSON nested too deeply for Python's parser reported as a ``ValueError``, like any
    other malformed JSON, instead of as a ``RecursionError``: a damaged or hostile file gets the caller's usual
    message."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def complete_lines(path) -> Tuple[str, bool]:
    """(the text of ``path`` up to its last newline, whether a cut-off last line was left out). The bytes are
    cut before they are decoded: a write cut inside a UTF-8 character (a torn append) is not an error."""
    data = Path(path).read_bytes()
    cut = bool(data) and not data.endswith(b"\n")
    if cut:
        data = data[:data.rfind(b"\n") + 1]
    return data.decode("utf-8"), cut


def sha256_file(path, progress=None) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks; ``progress(bytes_done, bytes_total)`` if given."""
    digest = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


#: Longest wait for another process's append to the same file (a hung writer must not hang this one for ever).
APPEND_WAIT_SECONDS = 60.0


#: Where Windows' lock of a file being appended to lies: one byte far past any real end of file. Windows' byte
#: locks are mandatory (a locked byte cannot be read by others), so readers of the file must never meet it.
WINDOWS_LOCK_OFFSET = 1 << 40


@contextlib.contextmanager
def _locked_exclusively(fd: int, path) -> Iterator[None]:
    """Hold an exclusive lock on the open file ``fd``: ``flock`` on POSIX, ``msvcrt.locking`` of one byte at
    :data:`WINDOWS_LOCK_OFFSET` on Windows. The wait polls, so it stays bounded (:data:`APPEND_WAIT_SECONDS`, then
    :class:`OutputFileError`); a file system that cannot lock (some network shares) is written unlocked."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        _wait_for_lock(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB), path)
        yield  # flock is released when fd is closed
        return
    import msvcrt

    def lock(mode: int) -> None:
        os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, mode, 1)

    locked = _wait_for_lock(lambda: lock(msvcrt.LK_NBLCK), path)
    try:
        yield
    finally:
        if locked:
            with contextlib.suppress(OSError):
                lock(msvcrt.LK_UNLCK)


def _wait_for_lock(take, path) -> bool:
    """Call ``take`` (a non-blocking lock) until it succeeds (True), or False when locks are not supported here;
    :class:`OutputFileError` after :data:`APPEND_WAIT_SECONDS` of another process holding it."""
    deadline = time.monotonic() + APPEND_WAIT_SECONDS
    while True:
        try:
            take()
            return True
        except OSError as exc:
            held = isinstance(exc, (BlockingIOError, InterruptedError)) or \
                exc.errno in (errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK))  # Windows: held
            if not held:  # a file system without locks: as before, unlocked
                return False
            if time.monotonic() > deadline:
                raise OutputFileError(f"cannot append to {path}: another process has held it for "
                                      f"{APPEND_WAIT_SECONDS:.0f} s (another evaluation into the same folder?). "
                                      "Stop it, or choose another output folder.") from None
            time.sleep(0.02)


def _last_line_end(fd: int, size: int) -> int:
    """The offset just after the last newline of the open file ``fd`` of ``size`` bytes (0 without one)."""
    position, block = size, 4096
    while position > 0:
        start = max(0, position - block)
        os.lseek(fd, start, os.SEEK_SET)
        chunk = b""
        while len(chunk) < position - start:
            more = os.read(fd, position - start - len(chunk))
            if not more:
                break
            chunk += more
        found = chunk.rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return 0


def append_lines(path: Path, text: str, header_lines: int = 0) -> None:
    """Append ``text`` (whole lines) to ``path``, durably, starting on a fresh line: a cut-off last line (a torn
    earlier write) is cut away first; the first ``header_lines`` lines of ``text`` are written only when the file
    is empty. On a failure (full disk, ...) the file is cut back to where it ended and
    :class:`~FastSAM3DLib.errors.OutputFileError` names it.

    Processes appending to one file at once (two evaluations into one folder) take turns: each append holds an
    exclusive lock on it (``flock``; on Windows a byte lock past its end), so no one cuts away a line another is
    still writing."""
    try:
        fd = open_fd(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise output_error(exc, path, "append to") from None
    try:
        with _locked_exclusively(fd, path):
            _append_at_line_end(fd, path, text, header_lines)
    finally:
        os.close(fd)


def _append_at_line_end(fd: int, path, text: str, header_lines: int) -> None:
    """:func:`append_lines`' work on the open, locked file ``fd``."""
    end = _last_line_end(fd, os.fstat(fd).st_size)
    if end and header_lines:
        text = text.split("\n", header_lines)[-1]
    data = memoryview(text.encode("utf-8"))
    try:
        os.ftruncate(fd, end)
        os.lseek(fd, end, os.SEEK_SET)
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)  # no half-written line left behind
        raise output_error(exc, path, "append to") from None
