"""The ``models``, ``download`` and ``import`` commands, and the functions behind them for Slicer.

``add_subcommands(subparsers)`` registers the three commands on an argparse sub-parser set; each sets
``func``, which takes the parsed arguments and returns the exit code. Failures raise FastSAM3DError
subclasses whose messages say what to do; ``FastSAM3DLib.cli`` prints them. :func:`download_weights` and
:func:`import_weights` are what the Slicer module calls (with its own progress dialog and cache folder).
"""
from __future__ import annotations

import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Optional, TextIO

from ..errors import CheckpointError
from .cache import PathLike, model_files, resolve_cache_dir
from .catalog import available_models
from .download import DEFAULT_TIMEOUT, download_model, import_file
from .manifest import ManifestLike, load_manifest
from .store import resolve_checkpoint, weights_status
from .verify import Progress, expected_sha256, read_record

__all__ = ["add_subcommands", "cmd_models", "cmd_download", "cmd_import", "models_table", "download_weights",
           "import_weights", "resolve_checkpoint", "TextProgress"]


def download_weights(name: str, cache_dir: Optional[PathLike] = None, progress: Optional[Progress] = None, *,
                     manifest: ManifestLike = None, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Download and verify model ``name``, then prepare its fast weights; return the file to load."""
    pinning = _will_pin(name, cache_dir, manifest)
    download_model(name, cache_dir, progress, manifest=manifest, timeout=timeout,
                   check=_pin_check(name, manifest, keep_file=False))
    return _prepare(name, cache_dir, manifest, pinning)


def import_weights(name: str, path: PathLike, cache_dir: Optional[PathLike] = None,
                   progress: Optional[Progress] = None, *, manifest: ManifestLike = None) -> Path:
    """Import a file copied by hand as model ``name`` (verified like a download); return the file to load."""
    pinning = _will_pin(name, cache_dir, manifest)
    cached = model_files(load_manifest(manifest).get(name), cache_dir).path
    in_place = cached.exists() and Path(path).expanduser().exists() and cached.samefile(Path(path).expanduser())
    import_file(name, path, cache_dir, progress, manifest=manifest, check=_pin_check(name, manifest, in_place))
    return _prepare(name, cache_dir, manifest, pinning, keep_file=in_place)


def models_table(cache_dir: Optional[PathLike] = None, *, manifest: ManifestLike = None) -> str:
    """The text of ``python -m FastSAM3DLib models``: every selectable model, whether it is ready, its file and
    licence, then the cache folder and the checksums pinned on this computer."""
    choices = available_models(cache_dir, manifest=manifest)
    loaded = load_manifest(manifest)
    rows = [("NAME", "READY", "WEIGHTS", "SIZE", "LICENCE")]
    files, pins = [], []
    for choice in choices:
        if choice.source == "bundled":
            weights = "bundled with the extension" if choice.ready else "bundled: MISSING, reinstall"
            size = f"{choice.size / 1e6:.0f} MB" if choice.ready else "-"
        else:
            weights = f"download, sha256 {choice.checksum}"
            approx = "" if (loaded.get(choice.name).size_exact or choice.state != "not downloaded") else "~"
            size = f"{approx}{choice.size / 1e6:.0f} MB"
        rows.append((choice.name, "yes" if choice.ready else "no", weights, size, choice.licence))
        if choice.ready:
            note = " (weights-only fast copy)" if choice.state == "verified, fast copy" else ""
            files.append((choice.name, f"{choice.path}{note}"))
        elif choice.source == "bundled":
            files.append((choice.name, f"missing: {choice.path}"))
        else:
            command = f"python -m FastSAM3DLib download {choice.name}"
            if cache_dir is not None:
                command += f" --cache-dir {shlex.quote(str(cache_dir))}"
            what = "changed since it was verified" if choice.state.startswith("changed") else "not downloaded"
            files.append((choice.name, f"{what}: {command}"))
        record = read_record(weights_status(choice.name, cache_dir, manifest=loaded).files) \
            if choice.checksum == "pinned" else None
        if record is not None:
            pins.append(f"  {choice.name}: sha256 {record.sha256}  {record.size} bytes  pinned "
                        f"{record.verified_at} from {record.origin}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    name_width = max(len(name) for name, _ in files)
    lines += ["", "Files:"] + [f"  {name.ljust(name_width)}  {where}" for name, where in files]
    lines.append(f"Cache folder: {resolve_cache_dir(cache_dir)} (--cache-dir DIR or FASTSAM3D_CACHE moves it)")
    if pins:
        lines.append("Checksums pinned on this computer (the authors publish none; please report them, see the "
                     "README, 'Model weights'):")
        lines += pins
    return "\n".join(lines)


def add_subcommands(subparsers) -> None:
    """Register ``models``, ``download NAME`` and ``import NAME FILE`` on an argparse subparsers object."""
    def common(parser) -> None:
        parser.add_argument("--cache-dir", metavar="DIR", default=None,
                            help="model cache folder (default: $FASTSAM3D_CACHE or the user cache folder)")
        parser.add_argument("--manifest", metavar="FILE", default=None,
                            help="model manifest (default: Resources/models.json of this installation)")

    p = subparsers.add_parser("models", help="list the models you can use, whether their weights are ready, "
                                             "where the files are, and their licences")
    common(p)
    p.set_defaults(func=cmd_models)

    p = subparsers.add_parser("download", help="download a model's weights into the cache and verify them")
    p.add_argument("name", help="model name, as listed by 'models'")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="network timeout in seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_download)

    p = subparsers.add_parser("import", help="import a weights file you downloaded by hand (offline use)")
    p.add_argument("name", help="model name, as listed by 'models'")
    p.add_argument("file", help="the downloaded file, e.g. FastSAM3D.pth")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=cmd_import)


def cmd_models(args) -> int:
    """``models``: print the table of models."""
    print(models_table(args.cache_dir, manifest=args.manifest))
    return 0


def cmd_download(args) -> int:
    """``download NAME``: download, verify and prepare a model, with a progress bar."""
    bar = None if args.quiet else TextProgress(f"Downloading {args.name}")
    try:
        path = download_weights(args.name, args.cache_dir, bar, manifest=args.manifest, timeout=args.timeout)
    finally:
        if bar is not None:
            bar.close()
    print(f"{args.name}: verified, ready to use ({path})")
    return 0


def cmd_import(args) -> int:
    """``import NAME FILE``: verify a hand-copied file and put it in the cache."""
    bar = None if args.quiet else TextProgress(f"Checking {Path(args.file).name}")
    try:
        path = import_weights(args.name, args.file, args.cache_dir, bar, manifest=args.manifest)
    finally:
        if bar is not None:
            bar.close()
    print(f"{args.name}: imported and verified, ready to use ({path})")
    return 0


class TextProgress:
    """A one-line text progress bar for ``(bytes_done, bytes_total)`` callbacks, written to stderr."""

    def __init__(self, label: str, stream: Optional[TextIO] = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._start = time.monotonic()
        self._last = 0.0
        self._shown = False
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._step: Optional[int] = None

    def __call__(self, done: int, total: Optional[int]) -> None:
        now = time.monotonic()
        final = total is not None and done >= total
        if self._tty and not final and now - self._last < 0.2:
            return
        if not self._tty:  # logs and pipes: a line every 10 % (every 10 MB when the size is unknown)
            step = int(10 * done / total) if total else done // 10_000_000
            if step == self._step and not final:
                return
            self._step = step
        self._last = now
        rate = done / max(now - self._start, 1e-6) / 1e6
        if total:
            filled = int(self.width * min(done / total, 1.0))
            text = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {100 * done / total:3.0f}% "
                    f"{done / 1e6:.1f}/{total / 1e6:.1f} MB {rate:.1f} MB/s")
        else:
            text = f"{self.label} {done / 1e6:.1f} MB {rate:.1f} MB/s"
        self.stream.write(("\r" + text) if self._tty else (text + "\n"))
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """End the bar's line."""
        if self._shown and self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _will_pin(name: str, cache_dir, manifest) -> bool:
    """Whether the next verified file for ``name`` will be pinned (no checksum published or pinned yet)."""
    entry = load_manifest(manifest).get(name)
    return expected_sha256(entry, model_files(entry, cache_dir))[0] is None


def _pin_check(name: str, manifest, keep_file: bool):
    """``check(path, origin)`` for download and import: refuses a file that is not a complete model of ``name``'s
    architecture before its checksum is pinned (None without PyTorch: the first load checks it instead)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    entry = load_manifest(manifest).get(name)

    def check(path: Path, origin: str) -> None:
        try:
            _check_architecture(entry, path)
        except Exception as exc:  # noqa: BLE001 - whatever the file does wrong, it is not pinned
            # Clearing the failed load's frames unmaps the file (Windows cannot delete a mapped file).
            traceback.clear_frames(exc.__traceback__)
            text = str(exc).replace(str(path), origin)  # name the user's file or URL, not the temporary
            error = text if isinstance(exc, CheckpointError) else (
                f"The weights file of '{name}' cannot be loaded ({type(exc).__name__}: {text}). Download it "
                "again, or import the official file.")
            what = "its checksum was not kept" if keep_file else \
                "the file was removed from the cache and its checksum not kept"
            raise CheckpointError(f"{error} Nothing was pinned: {what}.") from None
    return check


def _check_architecture(entry, path: Path) -> None:
    """Load ``path`` and refuse it unless it holds a complete model of ``entry``'s architecture."""
    from . import store
    from .loading import load_state_dict

    store.architecture_check(entry)(load_state_dict(path))


def _prepare(name: str, cache_dir, manifest, pinned_now: bool, keep_file: bool = False) -> Path:
    """Check the new file's architecture and write its fast copy; undo a pin made for a wrong file (and remove
    that file from the cache, unless ``keep_file``: the user imported the cached file itself)."""
    try:
        import torch  # noqa: F401
    except ImportError:  # the check and the fast copy happen at the first load instead
        return model_files(load_manifest(manifest).get(name), cache_dir).path
    try:
        path = resolve_checkpoint(name, cache_dir, manifest=manifest)
    except Exception as exc:  # noqa: BLE001 - whatever the file does wrong, a pin made for it is undone
        # The failed load's frames still hold the checkpoint's tensors, memory-mapped from the file
        # (torch.load(mmap=True)); Windows cannot delete a mapped file. Clearing them unmaps it.
        traceback.clear_frames(exc.__traceback__)
        error = exc if isinstance(exc, CheckpointError) else CheckpointError(
            f"The weights file of '{name}' cannot be loaded ({type(exc).__name__}: {exc}). Download it again, or "
            "import the official file.")
        if not pinned_now:
            raise _with_pin_hint(error, name, cache_dir, manifest) from (None if error is exc else exc)
        files = model_files(load_manifest(manifest).get(name), cache_dir)
        for stale in (files.record,) if keep_file else (files.path, files.record):
            if stale.exists():
                stale.unlink()
        what = "its checksum was not kept" if keep_file else \
            "the file was removed from the cache and its checksum not kept"
        raise CheckpointError(f"{error} Nothing was pinned: {what}.") from None
    if path is None:  # pragma: no cover - download/import just verified it
        raise CheckpointError(f"The weights of '{name}' were verified but cannot be found in the cache.")
    return path


def _with_pin_hint(error: CheckpointError, name: str, cache_dir, manifest) -> CheckpointError:
    """``error``, telling how to start again when the refused file is the one whose checksum was pinned here
    (a cache pinned by an older version that was interrupted before it could undo a wrong file's pin)."""
    entry = load_manifest(manifest).get(name)
    files = model_files(entry, cache_dir)
    if expected_sha256(entry, files)[1] != "pinned":
        return error
    return CheckpointError(f"{error} Its checksum was pinned on this computer ({files.record}); if it is not the "
                           f"{name} weights file, delete {files.path} and {files.record}, then download or import "
                           "the model again.")
