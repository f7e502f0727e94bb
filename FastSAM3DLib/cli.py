"""Command line: ``python -m FastSAM3DLib segment|models|download|import|demo ...``.

Every command prints a one-line error (no traceback) and exits with status 2 for problems the user can fix.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .errors import FastSAM3DError, PromptError
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
            log=print):
    """Segment ``image`` from RAS clicks and write the label file; returns the session's last result."""
    from .geometry import Volume
    from .registry import build_model
    from .session import InteractiveSession

    if not points:
        raise PromptError("Give at least one include point with --point R,A,S.")
    volume = Volume.from_file(image)
    volume.validate()
    start = time.perf_counter()
    model = build_model(model_name, checkpoint=checkpoint or "cached", device=device,
                        attention_backend=attention_backend)
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
    seg.add_argument("--checkpoint", help="checkpoint file (default: the verified download in the model cache)")
    seg.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    seg.add_argument("--prompt-mode", choices=("newest", "all"), default=None,
                     help="feed only the newest click or all clicks (default: the model's own)")
    seg.add_argument("--attention", default=None, help="attention backend (default: automatic)")
    seg.add_argument("--output", "-o", required=True, help="label image to write (e.g. out.nii.gz, out.nrrd)")

    demo = sub.add_parser("demo", help="segment a structure of the bundled sample and write a PNG preview")
    demo.add_argument("--output-dir", default="out/demo", help="where to write the label and the preview")

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
                    args.attention)
            return 0
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.output_dir))
        return int(args.func(args) or 0)
    except FastSAM3DError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory. Close other programs, use a smaller model, or run on a GPU "
              "(--device cuda).", file=sys.stderr)
        return 2
