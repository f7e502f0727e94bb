"""Command line: ``python -m FastSAM3DLib segment|models|download|import|demo ...``.

``segment`` without ``--checkpoint`` and ``demo`` find weights as Slicer does (bundled, or verified in the
cache folder: ``--cache-dir``, else ``$FASTSAM3D_CACHE``, else the user cache folder).

Every command prints a one-line error (no traceback) and exits with status 2 for problems the user can fix.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .errors import FastSAM3DError, PromptError, WeightsUnavailableError
from .files import atomic_output


def parse_point(text: str) -> Tuple[np.ndarray, bool]:
    """``"R,A,S"`` -> include point; ``"R,A,S-"`` (trailing minus) -> exclude point."""
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


def write_label_atomically(volume, mask: np.ndarray, output: Path) -> None:
    """Write ``mask`` as a uint8 label image with the volume's geometry; never leaves a partial file."""
    import SimpleITK as sitk

    output = Path(output)
    with atomic_output(output, suffix="".join(output.suffixes) or ".nii.gz") as tmp:
        sitk.WriteImage(volume.to_sitk(mask.astype(np.uint8)), str(tmp), True)


def segment(image: str, points: List[Tuple[np.ndarray, bool]], model_name: str, checkpoint: Optional[str],
            device: Optional[str], prompt_mode: Optional[str], output: str, attention_backend: Optional[str] = None,
            log=print, cache_dir: Optional[str] = None):
    """Segment ``image`` from RAS clicks and write the label file; returns the session's last result.

    Without ``checkpoint`` the model's own weights are used: bundled, or verified in ``cache_dir``.
    Device, backend and weights are checked before the image is read.
    """
    from .geometry import Volume
    from .registry import build_model, check_attention_backend, check_device
    from .session import InteractiveSession

    if not points:
        raise PromptError("Give at least one include point with --point R,A,S.")
    device = check_device(device)
    check_attention_backend(attention_backend)
    checkpoint = checkpoint or model_weights(model_name, cache_dir)
    volume = Volume.from_file(image)
    volume.validate()
    start = time.perf_counter()
    model = build_model(model_name, checkpoint=checkpoint, device=device, attention_backend=attention_backend)
    log(f"loaded model '{model_name}' in {time.perf_counter() - start:.2f} s")
    session = InteractiveSession(model, volume, prompt_mode=prompt_mode)
    result = None
    for ras, include in points:
        result = session.add_click(ras, include=include)
        spent = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
        log(f"{'include' if include else 'exclude'} point {np.round(ras, 2).tolist()}: "
            f"{result.voxels} voxels, predicted IoU {result.iou:.3f} ({spent})")
    write_label_atomically(volume, session.full_mask(result), Path(output))
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
    from .registry import list_models

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
    seg.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    seg.add_argument("--prompt-mode", choices=("newest", "all"), default=None,
                     help="feed only the newest click or all clicks (default: the model's own)")
    seg.add_argument("--attention", default=None, metavar="BACKEND",
                     help="attention backend: auto, torch, triton or eager (default: auto)")
    seg.add_argument("--output", "-o", required=True, help="label image to write (e.g. out.nii.gz, out.nrrd)")

    demo = sub.add_parser("demo", help="segment a structure of the bundled sample and write a PNG preview")
    demo.add_argument("--output-dir", default="out/demo", help="where to write the label and the preview")
    demo.add_argument("--cache-dir", metavar="DIR", default=None,
                      help="model cache folder searched for official weights (default: $FASTSAM3D_CACHE or the "
                           "user cache folder)")

    from .evaluation.cli import add_subcommand as add_evaluate_command
    from .training.cli import add_subcommands as add_training_commands
    from .weights.commands import add_subcommands as add_weight_commands

    add_weight_commands(sub)
    add_evaluate_command(sub)
    add_training_commands(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "segment":
            points = [parse_point(p) for p in args.point]
            segment(args.image, points, args.model, args.checkpoint, args.device, args.prompt_mode, args.output,
                    args.attention, cache_dir=args.cache_dir)
            return 0
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.output_dir), cache_dir=args.cache_dir)
        return int(args.func(args) or 0)
    except FastSAM3DError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory. Close other programs, use a smaller model, or run on a GPU "
              "(--device cuda).", file=sys.stderr)
        return 2
