"""Input files cut short or damaged: refused before ITK reads them as zeros or garbage.

Truncated NIfTI and Analyze files, damaged compressed data (their checksums are verified) and detached headers
that name a pipe or a device are refused with a message that says what to do.
"""
from __future__ import annotations

import contextlib
import gzip
import re
import struct
import zlib
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from ..errors import InputImageError


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
    when the body ends (see :func:`running_beside`)."""
    return running_beside(check_complete, path)


@contextlib.contextmanager
def running_beside(check, *args) -> Iterator[List]:
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
    problem = nifti_problem(path)
    if problem:
        raise _truncated(path, problem)


def nifti_problem(path: Path) -> Optional[str]:
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
