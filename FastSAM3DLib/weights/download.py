"""Download a model file into the cache, or import one copied by hand, and verify it before anyone uses it.

What happens, in order (:func:`download_model`):

1. If the cached file is already verified, return it at once (no network).
2. Take the file's lock (``O_CREAT | O_EXCL``), so parallel threads or processes wait for one download.
3. GET each manifest URL in turn through urllib's default opener, which honours ``HTTPS_PROXY``,
   ``HTTP_PROXY`` and ``NO_PROXY``; every socket operation has a timeout. The bytes go to ``NAME.part``;
   when an earlier attempt left one, an HTTP ``Range`` request resumes it (``If-Range`` guards against a
   changed file). A dropped connection is resumed automatically ``retries`` times.
4. Check the size (``Content-Length`` against the manifest, then the bytes received) and the sha256 (the
   published one, or the one pinned by the first verified download), then ``os.replace`` the ``.part`` onto
   the final name: a half-written file is never visible under the final name. When no checksum is known yet,
   ``check`` (the model's architecture) accepts the file first: the pin is written last, so an interrupted or
   killed run can never leave a wrong file pinned.

Hardening: a redirect from https to plain http (or to any address the manifest could not name) is refused;
the ``.part`` file is opened with ``O_NOFOLLOW`` and must be a plain file with one link, so a symlink or hard
link planted at its predictable name is removed, never written through; every other file written here gets a
random name and ``O_EXCL``. A cache folder where the lock cannot be created (read-only, full) gives a one-line
error at once.

What stays behind after a failure: only a resumable ``.part`` when the transfer was interrupted (connection
dropped, timed out mid-transfer, or cancelled from the progress callback). A wrong size, a wrong checksum, a
server error or a full disk leave nothing. Every error message says what to do next.
"""
from __future__ import annotations

import http.client
import logging
import math
import os
import re
import socket
import ssl
import time
import stat
import urllib.error
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple
from urllib.parse import urljoin, urlsplit

from ..errors import CheckpointError, DownloadError
from ..files import open_fd, parse_json, replace_file, sha256_file, temporary_beside
from .cache import ModelFiles, PathLike, model_files
from .filelock import FileLock, LockUnavailable
from .manifest import SIZE_TOLERANCE, ManifestLike, ModelEntry, url_allowed, load_manifest
from .verify import Progress, expected_sha256, is_verified, read_record, write_json_atomic, write_record

log = logging.getLogger(__name__)

#: ``check(path, origin)``: refuses (CheckpointError) a complete file that is not the model, before it is pinned.
PinCheck = Callable[[Path, str], None]

#: Seconds any single network operation (connect, or one read) may take.
DEFAULT_TIMEOUT = 30.0
_CHUNK = 1 << 20
_USER_AGENT = "FastSAM3DLib-weights/1 (Python urllib)"


def download_model(name: str, cache_dir: Optional[PathLike] = None, progress: Optional[Progress] = None, *,
                   manifest: ManifestLike = None, timeout: float = DEFAULT_TIMEOUT, retries: int = 3,
                   retry_delay: float = 1.0, check: Optional[PinCheck] = None) -> Path:
    """Download model ``name`` into the cache (unless a verified copy is there) and return its path.

    ``progress(bytes_done, bytes_total)`` is called as bytes arrive (``bytes_total`` may be None when the
    server does not say); returning False from it cancels the download, keeping the resumable ``.part``.
    ``timeout`` bounds each network operation in seconds; ``retries`` is how many times a dropped
    connection is resumed before giving up. ``check(path, url)`` is called on a complete file whose checksum
    this download would pin, before it is put in place: the CheckpointError it raises refuses the file (deleted,
    nothing pinned), so not even a killed process can leave a wrong file pinned. Raises DownloadError saying
    what to do.
    """
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
        raise DownloadError(f"The download timeout must be a positive number of seconds, got {timeout!r} (the "
                            f"default is {DEFAULT_TIMEOUT:g}).")
    entry = load_manifest(manifest).get(name)
    files = model_files(entry, cache_dir)
    if is_verified(entry, files):
        return files.path
    _make_directory(files)
    lock = FileLock(files.lock, stale_after=max(120.0, 4 * timeout))
    try:
        lock.acquire(on_wait=lambda: _report_other_download(files, entry, progress))  # waits while a holder works
    except LockUnavailable as exc:
        raise DownloadError(f"Cannot download into the model cache folder {files.directory}: {exc.strerror}. "
                            "Choose a writable folder with free space: set FASTSAM3D_CACHE or use --cache-dir "
                            "(in Slicer: the cache folder setting).") from None
    try:
        if is_verified(entry, files) or _adopt_existing(entry, files):
            return files.path
        failures: List[_Failure] = []
        for url in entry.urls:
            try:
                _download_from(url, entry, files, lock, progress, timeout, retries, retry_delay, check)
                return files.path
            except _Failure as failure:
                log.info("download of %s from %s failed: %s", name, url, failure.reason)  # the error says it too
                _keep_or_discard(files)
                failures.append(failure)
                if failure.kind in ("cancelled", "disk"):
                    break
        raise DownloadError(_failure_message(entry, files, failures))
    finally:
        lock.release()


def import_file(name: str, path: PathLike, cache_dir: Optional[PathLike] = None,
                progress: Optional[Progress] = None, *, manifest: ManifestLike = None,
                check: Optional[PinCheck] = None) -> Path:
    """Put a file the user obtained by hand into the cache as model ``name``, with the download's checks.

    The file is copied (never moved), its size and sha256 are checked against the manifest (or the pinned
    checksum; without either, this import pins it, after ``check(copy, source)`` accepted it, as for a
    download), and only then renamed into place. Raises CheckpointError.
    """
    entry = load_manifest(manifest).get(name)
    files = model_files(entry, cache_dir)
    source = Path(path).expanduser()
    if not source.is_file():
        raise CheckpointError(f"Cannot import {source}: there is no such file. Give the path of the downloaded "
                              f"{entry.filename}.")
    size = source.stat().st_size
    expected_size, exact = _expected_size(entry, files)
    if not _size_ok(size, expected_size, exact):
        raise CheckpointError(f"{source} has {_mb(size)} but the {entry.name} weights file ({entry.filename}) has "
                              f"{'' if exact else 'about '}{_mb(expected_size)}: this is not the right file. "
                              f"Download {entry.urls[0]} and import that.")
    _make_directory(files)
    lock = FileLock(files.lock)
    try:
        lock.acquire()
    except LockUnavailable as exc:
        raise CheckpointError(f"Cannot import {source} into the model cache folder {files.directory}: "
                              f"{exc.strerror}. Choose a writable folder with free space: set FASTSAM3D_CACHE or "
                              "use --cache-dir (in Slicer: the cache folder setting).") from None
    try:
        expected, checksum_source = expected_sha256(entry, files)
        same_file = files.path.exists() and os.path.samefile(source, files.path)
        try:
            with nullcontext(files.path) if same_file else temporary_beside(files.path, ".import") as copy:
                sha = sha256_file(source, progress) if same_file else _copy_hashing(source, copy, progress)
                if expected is not None and sha != expected:
                    raise CheckpointError(
                        f"{source} is not the {entry.name} weights file: its sha256 is {sha}, expected {expected} "
                        f"({_checksum_origin(checksum_source, files)}). Nothing was imported. Download "
                        f"{entry.urls[0]} again (the copy may be damaged) and import that."
                        + _pin_hint(checksum_source, files))
                if expected is None and check is not None:  # this import pins: refuse a wrong file before that
                    check(copy, str(source))
                if not same_file:
                    replace_file(copy, files.path)
            _discard_part(files)
            write_record(files, entry, sha, str(source.resolve()))
        except OSError as exc:
            raise CheckpointError(f"Cannot import {source} into {files.directory}: {exc}. Check the free disk "
                                  "space and that the cache folder is writable.") from exc
    finally:
        lock.release()
    return files.path


# ---------------------------------------------------------------------------------------------------- internals


@dataclass
class _Failure(Exception):
    """Why one URL did not give a verified file; ``kind`` selects the advice in the final message."""

    url: str
    kind: str  # network | timeout | ssl | http | size | checksum | interrupted | cancelled | disk
    reason: str

    def __str__(self) -> str:
        return f"{self.url}: {self.reason}"


class _Interrupted(Exception):
    """The transfer stopped part way; the .part file can be resumed."""


def _download_from(url: str, entry: ModelEntry, files: ModelFiles, lock: FileLock, progress: Optional[Progress],
                   timeout: float, retries: int, retry_delay: float, check: Optional[PinCheck]) -> None:
    """Fetch ``url`` into the .part file (resuming after drops), verify it and move it into place."""
    attempt = 0
    while True:
        try:
            _transfer(url, entry, files, lock, progress, timeout)
            break
        except _Interrupted as exc:
            attempt += 1
            if attempt > retries:
                kind = "timeout" if isinstance(exc.__cause__, (socket.timeout, TimeoutError)) else "interrupted"
                raise _Failure(url, kind, str(exc)) from exc
            log.info("%s; resuming (attempt %d of %d)", exc, attempt, retries)
            time.sleep(retry_delay * attempt)
        lock.heartbeat()
    size = _part_size(files)
    expected_size, exact = _expected_size(entry, files)
    if not _size_ok(size, expected_size, exact):
        _discard_part(files)
        raise _Failure(url, "size", f"received {_mb(size)}, expected {'' if exact else 'about '}"
                                    f"{_mb(expected_size)}; the file was deleted")
    sha = _hash_file(files.part)
    expected, source = expected_sha256(entry, files)
    if expected is not None and sha != expected:
        _discard_part(files)
        raise _Failure(url, "checksum", f"the file received has sha256 {sha}, expected {expected} "
                                        f"({_checksum_origin(source, files)}); it was deleted")
    if expected is None and check is not None:  # this download pins: refuse a wrong file before it is in place
        try:
            check(files.part, url)
        except CheckpointError:
            _discard_part(files)
            raise
    try:
        replace_file(files.part, files.path)
    except OSError as exc:
        _discard_part(files)
        raise _Failure(url, "disk", f"cannot put the file in place ({exc}); close programs using "
                                    f"{files.path} and try again") from exc
    _remove(files.part_info)
    write_record(files, entry, sha, url)


def _transfer(url: str, entry: ModelEntry, files: ModelFiles, lock: FileLock, progress: Optional[Progress],
              timeout: float) -> None:
    """One HTTP request: append to (or restart) the .part file until the server's last byte."""
    info = _read_part_info(files)
    offset = _part_size(files)
    if offset and info.get("url") != url and entry.sha256 is None:
        # Another address may serve other bytes; with a published checksum any mirror can continue it.
        _discard_part(files)
        info, offset = {}, 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        validator = _resume_validator(info, url)
        if validator is None and expected_sha256(entry, files)[0] is None:
            # Nothing would tell whether the server's file is still the one the .part began, and no checksum
            # would catch a splice of two versions (the first download pins what it gets): start again.
            _discard_part(files)
            info, offset = {}, 0
        else:
            headers["Range"] = f"bytes={offset}-"
            if validator is not None:
                headers["If-Range"] = validator
    requested = offset
    opener = urllib.request.build_opener(_SafeRedirects())  # per call: reads the proxy variables as they are now
    try:
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            if info.get("total") == offset:
                return  # the .part file was already complete
            _discard_part(files)
            raise _Interrupted("the server refused to resume; starting again") from exc
        raise _http_failure(url, exc.code, exc.reason) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        if offset:
            _keep_or_discard(files)
        raise _network_failure(url, exc, timeout) from exc

    with response:
        total = _content_length(response)
        if requested and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                _discard_part(files)
                raise _Interrupted(f"the server resumed at byte {start}, not {offset}; starting again")
        else:
            offset = 0  # the server sent the whole file (no range support, or If-Range said it changed)
        expected_size, exact = _expected_size(entry, files)
        if total is not None and not _size_ok(total, expected_size, exact):
            if not requested:  # an answer to a resume (a proxy's page, say) leaves the .part as it was
                _discard_part(files)
            raise _Failure(url, "size", f"the server offers {_mb(total)}, but the {entry.name} file has "
                                        f"{'' if exact else 'about '}{_mb(expected_size)}: not the right file "
                                        "(a proxy or login page?); nothing was saved")
        limit = total if total is not None else int(expected_size * (1 + SIZE_TOLERANCE)) + 1
        _write_part_info(files, {"url": url, "etag": response.headers.get("ETag"), "total": total,
                                 "last_modified": response.headers.get("Last-Modified")})
        done = offset
        try:
            out = _open_part(files, offset)
        except OSError as exc:
            raise _Failure(url, "disk", f"cannot write {files.part}: {exc}") from exc
        with out:
            while True:
                try:
                    block = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:  # timeout, reset, truncated chunk
                    so_far = f"{_mb(done)}{' of ' + _mb(total) if total else ''}"
                    if isinstance(exc, (socket.timeout, TimeoutError)):
                        raise _Interrupted(f"no data for {timeout:g} s after {so_far}") from exc
                    raise _Interrupted(f"the connection dropped after {so_far} ({_describe(exc)})") from exc
                if not block:
                    break
                if done + len(block) > limit:
                    out.close()
                    _discard_part(files)
                    raise _Failure(url, "size", f"the server sent more than {_mb(limit)}; nothing was saved")
                try:
                    out.write(block)
                except OSError as exc:
                    out.close()
                    _discard_part(files)
                    raise _Failure(url, "disk", f"cannot write {files.part}: {exc}") from exc
                done += len(block)
                lock.heartbeat()
                if progress is not None and progress(done, total) is False:
                    raise _Failure(url, "cancelled", f"cancelled after {_mb(done)}")
    if total is not None and done < total:
        raise _Interrupted(f"the connection closed after {_mb(done)} of {_mb(total)}")


def _resume_validator(info: dict, url: str) -> Optional[str]:
    """The ``If-Range`` value that makes ``url``'s server send the whole file if it changed since the .part began:
    its strong ETag, else its Last-Modified date; None when it gave neither (or the .part came from elsewhere)."""
    if info.get("url") != url:
        return None
    etag, modified = info.get("etag"), info.get("last_modified")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    return modified if isinstance(modified, str) and modified else None


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https (plain http only from plain http, to this machine): no downgrade."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urljoin(req.full_url, newurl)
        if urlsplit(req.full_url).scheme == "https" and urlsplit(target).scheme != "https" \
                or not url_allowed(target):
            fp.close()
            raise _Failure(req.full_url, "insecure", f"the server redirected to {target}, which is not a secure "
                                                     "(https) address; refused, nothing was downloaded")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _part_size(files: ModelFiles) -> int:
    """Bytes in the ``.part`` file; 0 (after removing it) if it is missing or anything but a plain file of ours."""
    try:
        st = os.lstat(files.part)
    except FileNotFoundError:
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        log.warning("%s is not a plain file (a link or something else was put there); removed, starting again",
                    files.part)
        _discard_part(files)
        return 0
    return st.st_size


def _open_part(files: ModelFiles, offset: int):
    """The ``.part`` file for writing: appended to at ``offset``, or new; never through a link."""
    if offset:
        fd = open_fd(files.part, os.O_WRONLY | os.O_APPEND)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size == offset:
            return os.fdopen(fd, "ab")
        os.close(fd)
        raise OSError(f"{files.part} changed while resuming")
    _remove(files.part)
    return os.fdopen(open_fd(files.part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb")


def _hash_file(path: Path) -> str:
    """sha256 of a plain file, opened without following a symlink."""
    import hashlib

    digest = hashlib.sha256()
    with os.fdopen(open_fd(path, os.O_RDONLY), "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _adopt_existing(entry: ModelEntry, files: ModelFiles) -> bool:
    """A file already at the final name whose record is missing or stale: keep it if its checksum is right (also
    through a symbolic link, e.g. to a shared copy: loading reads through it and checks the same checksum)."""
    expected, _ = expected_sha256(entry, files)
    if expected is None or not files.path.is_file():
        return False
    if sha256_file(files.path) != expected:
        return False
    write_record(files, entry, expected, "found in the cache")
    return True


def _report_other_download(files: ModelFiles, entry: ModelEntry, progress: Optional[Progress]) -> None:
    """While another thread or process downloads the file, show its progress."""
    if progress is None:
        return
    try:
        done = files.part.stat().st_size
    except OSError:
        return
    total = _read_part_info(files).get("total")
    progress(done, total if isinstance(total, int) else None)


def _expected_size(entry: ModelEntry, files: ModelFiles) -> Tuple[int, bool]:
    """(size, exact): the pinned file's exact size when there is a pin, else the manifest's."""
    record = read_record(files)
    if entry.sha256 is None and record is not None and record.checksum_source == "pinned":
        return record.size, True
    return entry.size, entry.size_exact


def _size_ok(size: int, expected: int, exact: bool) -> bool:
    return size == expected if exact else abs(size - expected) <= SIZE_TOLERANCE * expected


def _content_length(response) -> Optional[int]:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _content_range(value: Optional[str]) -> Tuple[int, Optional[int]]:
    """(first byte, total size or None) from ``bytes FIRST-LAST/TOTAL``."""
    match = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*$", value or "")
    if not match:
        return -1, None
    return int(match.group(1)), (None if match.group(2) == "*" else int(match.group(2)))


def _read_part_info(files: ModelFiles) -> dict:
    try:
        data = parse_json(files.part_info.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_part_info(files: ModelFiles, info: dict) -> None:
    write_json_atomic(files.part_info, info)


def _keep_or_discard(files: ModelFiles) -> None:
    """After a failure: keep a non-empty .part (resumable), remove an empty one."""
    try:
        if os.lstat(files.part).st_size == 0:
            _discard_part(files)
    except FileNotFoundError:
        _remove(files.part_info)


def _discard_part(files: ModelFiles) -> None:
    _remove(files.part)
    _remove(files.part_info)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _copy_hashing(source: Path, dest: Path, progress: Optional[Progress]) -> str:
    """Copy ``source`` to ``dest`` and return the sha256 of the bytes copied."""
    import hashlib

    digest = hashlib.sha256()
    total = source.stat().st_size
    done = 0
    with open(source, "rb") as src, os.fdopen(open_fd(dest, os.O_WRONLY | os.O_TRUNC), "wb") as dst:
        for block in iter(lambda: src.read(_CHUNK), b""):
            digest.update(block)
            dst.write(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def _make_directory(files: ModelFiles) -> None:
    try:
        files.ensure_directory()
    except OSError as exc:
        raise DownloadError(f"Cannot create the model cache folder {files.directory} ({exc}). Choose a writable "
                            "folder: set FASTSAM3D_CACHE (or the cache folder in Slicer's settings).") from exc


def _http_failure(url: str, code: int, reason) -> _Failure:
    if code == 407:
        return _Failure(url, "proxy-auth", "HTTP 407: the proxy wants a user name and password")
    if code in (401, 403):
        return _Failure(url, "http", f"HTTP {code} ({reason}): access was refused (some networks block this host)")
    if code == 404:
        return _Failure(url, "http", "HTTP 404: the file is no longer at this address")
    return _Failure(url, "http", f"HTTP {code} ({reason})" + (": a problem on the server" if code >= 500 else ""))


def _network_failure(url: str, exc: BaseException, timeout: float) -> _Failure:
    cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(cause, (socket.timeout, TimeoutError)):
        return _Failure(url, "timeout", f"no answer within {timeout:g} s")
    if isinstance(cause, ssl.SSLError):
        return _Failure(url, "ssl", f"secure connection failed ({_describe(cause)})")
    return _Failure(url, "network", f"cannot connect ({_describe(cause)})")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _checksum_origin(source: str, files: ModelFiles) -> str:
    if source == "pinned":
        return f"pinned by the first verified download, recorded in {files.record}"
    return "published in the model manifest"


def _pin_hint(source: str, files: ModelFiles) -> str:
    if source != "pinned":
        return ""
    return (f" If the publisher has replaced the file, delete {files.record} to accept the new one, and please "
            "report the new checksum (see the README, 'Model weights').")


def _failure_message(entry: ModelEntry, files: ModelFiles, failures: List[_Failure]) -> str:
    kinds = {f.kind for f in failures}
    lines = [f"Could not download the {entry.name} weights ({entry.filename}, {'' if entry.size_exact else 'about '}"
             f"{_mb(entry.size)}):"]
    lines += [f"  - {f}" for f in failures]
    if kinds & {"network", "timeout", "interrupted", "http"}:
        lines.append("Check that this computer is online and can open " + ", ".join(
            sorted({u.split('/')[2] for u in entry.urls})) + ". Behind a proxy, set HTTPS_PROXY (for example "
            "HTTPS_PROXY=http://proxy.example.org:3128) before starting Slicer or the command.")
    if "proxy-auth" in kinds:
        lines.append("Put the proxy user name and password in the variable: "
                     "HTTPS_PROXY=http://USER:PASSWORD@proxy.example.org:3128.")
    if "ssl" in kinds:
        lines.append("If your network inspects HTTPS, point SSL_CERT_FILE at your organisation's certificate "
                     "bundle (ask your IT department).")
    if "checksum" in kinds or "size" in kinds:
        lines.append("The bytes received were not the expected file (a proxy, captive portal or a changed upload "
                     "can cause this)." + _pin_hint(expected_sha256(entry, files)[1], files))
    if "insecure" in kinds:
        lines.append("A download address must stay on https; report the redirect if it persists (see the README, "
                     "'Model weights').")
    if "disk" in kinds:
        lines.append(f"Free some disk space in {files.directory} or choose another cache folder "
                     "(FASTSAM3D_CACHE).")
    if files.part.exists():
        lines.append(f"The {_mb(files.part.stat().st_size)} received so far are kept in {files.part}; run the "
                     "download again to resume.")
    else:
        lines.append("Nothing was saved.")
    lines.append(f"Or download {entry.urls[0]} with a browser on any computer and import it: "
                 f"python -m FastSAM3DLib import {entry.name} FILE (in Slicer: 'Import weights from file').")
    return "\n".join(lines)


def _mb(nbytes: Optional[int]) -> str:
    if nbytes is None:
        return "an unknown size"
    if nbytes >= 10**6:
        return f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes} bytes"
