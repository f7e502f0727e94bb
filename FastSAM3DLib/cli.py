"""Command line: ``python -m FastSAM3DLib segment|models|download|import|demo|evaluate|memory ...``.

``segment`` without ``--checkpoint`` and ``demo`` find weights as Slicer does (bundled, or verified in the
cache folder: ``--cache-dir``, else ``$FASTSAM3D_CACHE``, else the user cache folder).

Every command prints a one-line error (no traceback) and exits with status 2 for problems the user can fix;
Ctrl+C prints one line and exits with 130, SIGTERM likewise with 143; both unwind normally, so temporary files
are removed on the way out.
Warnings met on the way are shown only when the command succeeds, so a failure prints exactly one line.
"""
import argparse
import builtins
import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

from . import interrupts
from .errors import FastSAM3DError, PromptError, WeightsUnavailableError
from .files import check_format_keeps_geometry, check_output_path, write_label_atomically

if TYPE_CHECKING:  # numpy is imported where it is used: a Ctrl+C at start-up then lands inside main()
    import numpy as np


def parse_point(text: str) -> Tuple["np.ndarray", bool]:
    """``"R,A,S"`` -> include point; ``"R,A,S-"`` (trailing minus) -> exclude point; PromptError otherwise."""
    if not isinstance(text, str):
        raise PromptError(f"--point {text!r}: expected text R,A,S in millimetres (e.g. \"12.5,-30,40\").")
    import numpy as np

    include = not text.endswith("-")
    body = text[:-1] if not include else text
    try:
        values = [float(v) for v in body.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise PromptError(f"--point {text!r}: expected three numbers R,A,S in millimetres (e.g. --point=12.5,-30,40 "
                          "or --point=12.5,-30,40- for an exclude point)")
    return np.array(values), include


def _check_precision(precision: Optional[str]) -> None:
    """A FastSAM3DError for an unknown ``precision`` (or ``$FASTSAM3D_PRECISION``), before anything is read."""
    from .quantize import resolve_precision

    try:
        resolve_precision(precision)
    except ValueError as exc:
        raise FastSAM3DError(f"{exc} (exact is the official network, fast the int8 CPU encoder).") from None


def segment(image: str, points: List[Tuple["np.ndarray", bool]], model_name: str, checkpoint: Optional[str],
            device: Optional[str], prompt_mode: Optional[str], output: str, attention_backend: Optional[str] = None,
            log=print, cache_dir: Optional[str] = None, max_image_bytes: Optional[int] = None, memory=None,
            precision: Optional[str] = None, grow=None):
    """Segment ``image`` from RAS clicks and write the label file; returns the session's last result.

    ``grow``: True, a :class:`~FastSAM3DLib.growth.GrowthSettings`, or False for one 128^3 region; None (default):
    the model's own default (:func:`FastSAM3DLib.growth.default_for`). With growth every click's regions are kept
    and the segment grows past region faces (with a server too, where this computer has PyTorch).

    Without ``checkpoint`` the model's own weights are used: bundled, or verified in ``cache_dir``.
    ``memory``: parsed ``--memory*`` options (:func:`FastSAM3DLib.memory.cli.add_memory_arguments`) whose bank
    is attached to the model (local models only; refused before anything is read for a server).
    ``precision``: ``exact`` or ``fast`` (int8 encoder on a CPU, :mod:`FastSAM3DLib.quantize`); default
    ``$FASTSAM3D_PRECISION``, else exact.
    The output name, device, backend and weights are checked before the image is read; the image's header
    (size against ``max_image_bytes``, truncation, a grid the output format can store) before the model runs.
    """
    import numpy as np

    from .geometry import Volume
    from .remote import RemoteSession, is_server_url
    from .remote.session import grows_by_default

    if not points:
        raise PromptError("Give at least one include point with --point R,A,S.")
    check_output_path(output, inputs=[image])
    remote = is_server_url(device)
    if remote and getattr(memory, "memory", None):
        raise FastSAM3DError("--memory needs a local model (--device cpu, cuda or mps): a server runs its own "
                             "model without this computer's memory bank.")
    if not remote:
        from .registry import check_attention_backend, check_device

        device = check_device(device)
        check_attention_backend(attention_backend)
        _check_precision(precision)
        checkpoint = checkpoint or model_weights(model_name, cache_dir)
    volume = Volume.from_file(image, max_bytes=max_image_bytes)
    volume.validate()
    check_format_keeps_geometry(volume.ijk_to_ras, output)
    start = time.perf_counter()
    if remote:  # the server runs the model; the geometry stays here (token: $FASTSAM3D_TOKEN)
        session = RemoteSession(device, model_name, volume, prompt_mode=prompt_mode,
                                grow=grows_by_default(model_name) if grow is None else grow)
        if session.growth_note and grow:
            log(f"note: {session.growth_note}")
        log(f"opened a session for '{model_name}' on {device} in {time.perf_counter() - start:.2f} s")
    else:
        from . import growth
        from .registry import build_model
        from .session import InteractiveSession

        bank = None
        if getattr(memory, "memory", None):
            from .memory.cli import memory_options

            bank = dict(memory_options(memory), bank=memory.memory)
        try:
            model = build_model(model_name, checkpoint=checkpoint, device=device,
                                attention_backend=attention_backend, precision=precision, memory=bank)
        except ValueError as exc:  # a --memory-* setting out of range (e.g. --memory-k 0): one line
            if bank is None:
                raise
            raise FastSAM3DError(f"--memory: {exc}") from None
        if model.precision_note:
            log(f"precision: exact ({model.precision_note})")
        if getattr(memory, "memory", None):
            from .memory import attached_memory

            handle = attached_memory(model)
            log(f"memory bank {memory.memory}: {len(handle.bank)} entries, k {handle.k}, rule {handle.rule}")
        log(f"loaded model '{model_name}' ({model.precision} precision) in {time.perf_counter() - start:.2f} s")
        session = InteractiveSession(model, volume, prompt_mode=prompt_mode,
                                     grow=growth.default_for(model_name) if grow is None else grow)
    result = None
    for ras, include in points:
        result = session.add_click(ras, include=include)
        spent = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
        log(f"{'include' if include else 'exclude'} point {np.round(ras, 2).tolist()}: "
            f"{result.voxels} voxels{f' in {result.regions} regions' if result.regions > 1 else ''}, "
            f"predicted IoU {result.iou:.3f} ({spent})")
    write_label_atomically(volume, session.full_mask(result), Path(output), inputs=[image])
    log(f"wrote {output}")
    return result


def model_weights(model_name: str, cache_dir: Optional[str] = None) -> Path:
    """The weights file of ``model_name`` (bundled or verified in the cache); the error names a ready alternative."""
    from .registry import get_model_config
    from .weights import available_models, find_checkpoint

    try:
        return find_checkpoint(get_model_config(model_name).weights or model_name, cache_dir)
    except WeightsUnavailableError as exc:
        ready = [c.name for c in available_models(cache_dir) if c.ready and c.name != model_name]
        if not ready:
            raise
        raise WeightsUnavailableError(f"{exc} Ready here: --model {' or --model '.join(ready)}.") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    from .model_configs import list_models

    parser = argparse.ArgumentParser(prog="python -m FastSAM3DLib",
                                     description="FastSAM3D / SAM-Med3D interactive 3D segmentation")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a structure in an image from clicks in RAS millimetres")
    seg.add_argument("image", help="image file or DICOM folder (anything SimpleITK reads)")
    seg.add_argument("--point", action="append", default=[], metavar="R,A,S[-]",
                     help="click in RAS mm (repeatable); a trailing '-' marks an exclude point; "
                          "write negative values as --point=-12,3,4")
    seg.add_argument("--model", default="fastsam3d", choices=list_models())
    seg.add_argument("--checkpoint", help="checkpoint file (default: the model's bundled weights or its verified "
                                          "download in the model cache; see 'models')")
    seg.add_argument("--cache-dir", metavar="DIR", default=None,
                     help="model cache folder (default: $FASTSAM3D_CACHE or the user cache folder)")
    seg.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu), or a FastSAM3D server's "
                                                     "address http(s)://host:port (token: $FASTSAM3D_TOKEN)")
    seg.add_argument("--prompt-mode", choices=("newest", "all"), default=None,
                     help="feed only the newest click or all clicks (default: the model's own)")
    seg.add_argument("--attention", default=None, metavar="BACKEND",
                     help="attention backend: auto, torch, triton or eager (default: auto)")
    seg.add_argument("--precision", choices=("exact", "fast"), default=None,
                     help="exact: the official float32 network; fast: the image encoder in int8 on a CPU, about 2x "
                          "faster first click, masks agree on >99%% of voxels (default: $FASTSAM3D_PRECISION, "
                          "else exact)")
    seg.add_argument("--output", "-o", required=True,
                     help="label image to write: .nii.gz, .nii, .nrrd, .seg.nrrd or .mha (e.g. out.nii.gz)")
    seg.add_argument("--max-image-gb", type=_positive_float, default=None, metavar="GB",
                     help="refuse images whose voxels need more memory than this (default: refuse images whose "
                          "segmentation would need more than two thirds of this computer's memory, about 1.5 times "
                          "the image plus 2.5 bytes a voxel)")
    seg.add_argument("--grow", action=argparse.BooleanOptionalAction, default=None,
                     help="keep every region clicked and grow the segment into neighbouring 128^3 regions while it "
                          "touches their faces, for objects larger than one region (default: on, except for "
                          "fastsam3d-demo, where it was measured not to help; --no-grow: one region, which moves to "
                          "the newest click)")
    seg.add_argument("--max-regions", type=int, default=None, metavar="N",
                     help="automatic growth stops once the segment has N regions (default: 32; growth also stops "
                          "after 60 s per click); a click in a region the segment does not have still adds it")
    from .memory.cli import add_memory_arguments

    add_memory_arguments(seg)

    demo = sub.add_parser("demo", help="segment a structure of the bundled sample and write a PNG preview")
    demo.add_argument("--output-dir", default="out/demo", help="where to write the label and the preview")
    demo.add_argument("--cache-dir", metavar="DIR", default=None,
                      help="model cache folder searched for official weights (default: $FASTSAM3D_CACHE or the "
                           "user cache folder)")

    from .evaluation.cli import add_subcommand as add_evaluate_command
    from .memory.cli import add_subcommands as add_memory_commands
    from .server.command import add_subcommand as add_serve_command
    from .training.cli import add_subcommands as add_training_commands
    from .weights.commands import add_subcommands as add_weight_commands

    add_weight_commands(sub)
    add_serve_command(sub)
    add_evaluate_command(sub)
    add_memory_commands(sub)
    add_training_commands(sub)
    return parser


def _growth(args):
    """``--grow``/``--no-grow`` and ``--max-regions`` as the session's ``grow`` argument (None: the model's default)."""
    if args.grow is False:
        return False
    if args.max_regions is None:
        return args.grow
    from .growth import GrowthSettings

    try:
        return GrowthSettings(max_regions=args.max_regions)
    except ValueError:
        raise FastSAM3DError(f"--max-regions must be a whole number >= 1, got {args.max_regions}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class _Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl+C, so every temporary file is removed on the way out."""


@contextlib.contextmanager
def _sigterm_unwinds(entry_point: bool = False):
    """While the block runs in the main thread, SIGTERM raises :class:`_Terminated` instead of killing at once,
    and both it and Ctrl+C wait while a file is set up or cleaned up (:mod:`.interrupts`). For the command line
    itself (``entry_point``) the handlers are not restored afterwards: :func:`_exit_on_interrupt` has set them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        interrupts.raise_or_defer(_Terminated())

    def interrupt(signum, frame):
        interrupts.raise_or_defer(KeyboardInterrupt())

    previous = signal.signal(signal.SIGTERM, terminate)
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # leave an ignored or a custom Ctrl+C as it is
        signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        if not entry_point:
            signal.signal(signal.SIGTERM, previous)
            if previous_int is signal.default_int_handler:
                signal.signal(signal.SIGINT, previous_int)


def _exit_on_interrupt(status: int) -> None:
    """From now on Ctrl+C and SIGTERM end the process at once with ``status``: the command has ended, and one
    arriving while Python shuts down printed a traceback or changed the exit status of work that is done (and a
    shutdown that hangs, e.g. in a GPU driver, can still be stopped)."""
    def leave(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)

    signal.signal(signal.SIGINT, leave)
    signal.signal(signal.SIGTERM, leave)


@contextlib.contextmanager
def _imports_complete():
    """While the block runs, a Ctrl+C or SIGTERM that arrives during an ``import`` is raised once that import is
    done: numpy or PyTorch interrupted half-way through their import broke the process (recursion errors,
    an abort inside PyTorch, or the signal swallowed and the command finishing)."""
    original = builtins.__import__

    def importing(*args, **kwargs):
        with interrupts.deferred():
            return original(*args, **kwargs)

    builtins.__import__ = importing
    try:
        yield
    finally:
        builtins.__import__ = original


def _one_line(text) -> str:
    """The message on one line (lines joined by a space; spaces inside a line, e.g. in a path, are kept)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit status.

    Without ``argv`` (the command line: ``python -m FastSAM3DLib``, ``fastsam3d``) Ctrl+C and SIGTERM end the
    process at once with the command's status once it has ended; called with ``argv`` (tests, Python code) the
    previous handlers are restored."""
    entry_point = argv is None and threading.current_thread() is threading.main_thread()
    with _sigterm_unwinds(entry_point), _imports_complete():
        try:
            with warnings.catch_warnings(record=True) as caught:
                status = _run(argv)
                if entry_point:
                    _exit_on_interrupt(status)
        except KeyboardInterrupt:
            if entry_point:
                _exit_on_interrupt(130)
            print("error: interrupted (Ctrl+C); the command did not finish.", file=sys.stderr)
            return 130
        except _Terminated:
            if entry_point:
                _exit_on_interrupt(143)
            print("error: terminated (SIGTERM); the command did not finish.", file=sys.stderr)
            return 143
    if status == 0:  # on failure the one error line is all that is printed
        for warning in caught:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    return status


def _run(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "segment":
            points = [parse_point(p) for p in args.point]
            max_bytes = None if args.max_image_gb is None else int(min(args.max_image_gb * 1e9, 2.0 ** 62))
            segment(args.image, points, args.model, args.checkpoint, args.device, args.prompt_mode, args.output,
                    args.attention, cache_dir=args.cache_dir, max_image_bytes=max_bytes, memory=args,
                    precision=args.precision, grow=_growth(args))
            return 0
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.output_dir), cache_dir=args.cache_dir)
        return int(args.func(args) or 0)
    except FastSAM3DError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory. Close other programs, use a smaller model, or run on a GPU "
              "(--device cuda).", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused something not foreseen above: still one line
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"error: {_one_line(exc.strerror or exc)}{where}. Check the path, free space and permissions.",
              file=sys.stderr)
        return 2
