"""The ``evaluate`` command: ``python -m FastSAM3DLib evaluate DATA --model NAME [...]``.

``add_subcommand(subparsers)`` registers it on the main parser (it sets ``func``, which returns the exit code);
all the work is :func:`~FastSAM3DLib.evaluation.evaluate.evaluate_dataset`.
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List, Optional

EXAMPLES = """examples:
  python -m FastSAM3DLib evaluate ../shared/data/totalseg --model fastsam3d --clicks 10 --output out/eval
  python -m FastSAM3DLib evaluate ct.nii.gz --label seg.nii.gz --structures liver "kidney*" 5 --output out/eval
  python -m FastSAM3DLib evaluate cases.csv --model sam-med3d-turbo --protocol sam-med3d --placement gt -o out/eval

Rerunning with the same --output continues an interrupted run (finished structures are kept) and adds other
models or placements next to the earlier ones; summary.json and the plots then cover all of them."""


def _structures(values: Optional[List[str]]) -> Optional[List[str]]:
    if not values:
        return None
    out = [part.strip() for value in values for part in re.split(r",", value) if part.strip()]
    return out or None


def add_subcommand(subparsers) -> None:
    """Register ``evaluate`` on an argparse subparsers object."""
    import argparse

    from ..registry import list_models
    from .clicks import PROTOCOLS

    parser = subparsers.add_parser(
        "evaluate", help="simulated-click evaluation (Dice/IoU per click) on a folder or manifest of image/label pairs",
        description="Simulate clicks on every labelled structure, as the official FastSAM3D / SAM-Med3D evaluations "
                    "do, and write per-click Dice/IoU (results.csv), a summary (summary.json) and plots.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="folder of image/label pairs (searched recursively; labels.json, nnU-Net "
                                     "and *_seg/*label* names are understood), a .json/.csv manifest, or an "
                                     "image file with --label")
    parser.add_argument("--label", help="the label image, when DATA is a single image")
    parser.add_argument("--model", default="fastsam3d", choices=list_models())
    parser.add_argument("--checkpoint", default="cached",
                        help="checkpoint file, 'cached' (the verified download, default) or 'random' (seeded "
                             "random weights, for smoke tests only)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    parser.add_argument("--attention", default=None, help="attention backend (default: automatic)")
    parser.add_argument("--clicks", type=int, default=10, help="clicks per structure (default: 10)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="fastsam3d",
                        help="fastsam3d: 2 interior clicks then random errors, newest click fed; sam-med3d: "
                             "random object voxel then random errors, all clicks fed (default: fastsam3d)")
    parser.add_argument("--placement", choices=("gt", "click", "both"), default="both",
                        help="ROI centred on the ground truth (the papers' protocol), on the clicks as the "
                             "interactive session places it (what a user gets), or both (default)")
    parser.add_argument("--structures", nargs="+", metavar="S",
                        help="label values or names to evaluate (wildcards allowed, e.g. 'kidney*'); default: all")
    parser.add_argument("--min-voxels", type=int, default=10,
                        help="skip structures with fewer voxels on the source grid (default: 10)")
    parser.add_argument("--seed", type=int, default=2023, help="seed of the simulated clicks (default: 2023)")
    parser.add_argument("--name", default=None,
                        help="name of the model in the results (default: --model), e.g. to compare checkpoints")
    parser.add_argument("--output", "-o", default="out/evaluation", help="results folder (default: out/evaluation)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    parser.add_argument("--no-predictions", action="store_true",
                        help="do not save the last prediction of each structure (the overlay montage needs them)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_evaluate)


def _table(summary: Dict) -> str:
    lines = []
    for model, protocols in summary.get("results", {}).items():
        for protocol, placements in protocols.items():
            for placement, block in placements.items():
                overall = block["overall"]
                full, crop = overall["dice_full"], overall["dice_crop"]

                def fmt(value):
                    return "  -  " if value is None else f"{value:.3f}"

                lines.append(f"  {model:<16} {protocol:<9} {placement:<5} n={overall['n']:<4} "
                             f"Dice full: after 1 {fmt(full.get('after_1'))}, last {fmt(full['last'])}, "
                             f"max {fmt(full['max'])} | crop: last {fmt(crop['last'])}, max {fmt(crop['max'])}")
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    """Run :func:`evaluate_dataset` from parsed arguments and print a short table; returns the exit code."""
    from .dataset import find_cases
    from .evaluate import evaluate_dataset

    try:
        cases = find_cases(args.data, args.label)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cases:
        print(f"error: no image/label pairs found in {args.data}. Name label files *_seg*/*label*/*mask*, add a "
              "labels.json, or pass a manifest (.json/.csv with image,label columns).", file=sys.stderr)
        return 2
    print(f"{len(cases)} case(s) in {args.data}; model {args.model}, {args.clicks} clicks, protocol {args.protocol}, "
          f"placement {args.placement}")
    summary = evaluate_dataset(
        cases, args.model, args.output, clicks=args.clicks, protocol=args.protocol, placement=args.placement,
        structures=_structures(args.structures), seed=args.seed, min_voxels=args.min_voxels,
        checkpoint=args.checkpoint, device=args.device, name=args.name, attention=args.attention,
        save_predictions=not args.no_predictions, plots=not args.no_plots, progress=not args.quiet)
    runtime = summary["runtime"]
    skipped = summary["skipped"]
    print(f"evaluated {runtime['structures_evaluated']} structure(s) in {runtime['seconds']:.1f} s; "
          f"{len(skipped)} skipped in total (reasons in {args.output}/skipped.csv)")
    table = _table(summary)
    if table:
        print(table)
    print(f"results: {args.output}/results.csv, {args.output}/summary.json"
          + (", plots: " + ", ".join(p.rsplit("/", 1)[-1] for p in summary.get("plots", [])) if summary.get("plots")
             else ""))
    return 0
