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
  python -m FastSAM3DLib evaluate test.json --model fastsam3d-demo --memory bank.safetensors -o out/eval

Rerunning with the same --output continues an interrupted run (finished structures are kept) and adds other
models or placements next to the earlier ones; summary.json and the plots then cover all of them.
With --memory the results are stored as '<model>+memory' (or --name): run once without and once with the bank
into the same folder, and the memory-on/off comparison (same cases and click seeds) is printed."""


def _structures(values: Optional[List[str]]) -> Optional[List[str]]:
    if not values:
        return None
    out = [part.strip() for value in values for part in re.split(r",", value) if part.strip()]
    return out or None


def add_subcommand(subparsers) -> None:
    """Register ``evaluate`` on an argparse subparsers object."""
    import argparse

    from ..model_configs import list_models
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
    parser.add_argument("--clicks", type=int, default=None,
                        help="clicks per structure (default: 5 with --protocol cvpr25, else 10)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="fastsam3d",
                        help="fastsam3d: 2 interior clicks then random errors, newest click fed; sam-med3d: "
                             "random object voxel then random errors, all clicks fed; cvpr25: the CVPR 2025 "
                             "interactive 3D challenge (centre of the largest error, all clicks fed, DSC and NSD "
                             "after each click and their area under the click curve) (default: fastsam3d)")
    parser.add_argument("--nsd-tolerance", type=float, default=None, metavar="MM",
                        help="also compute the normalised surface Dice at this tolerance in mm after every click "
                             "(default: 2 with --protocol cvpr25, the challenge's; none otherwise)")
    parser.add_argument("--placement", choices=("gt", "click", "both", "grow"), default="both",
                        help="ROI centred on the ground truth (the papers' protocol), on the clicks as the "
                             "interactive session places it (what a user gets), or both (default); grow: the "
                             "session with growth (regions kept and grown, whole-object Dice, recall, coverage)")
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
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="PyTorch CPU threads (default: PyTorch's). Dice can differ slightly with the count: "
                             "sums in another order move logits near the threshold; summary.json records it")
    from ..memory.cli import add_memory_arguments

    add_memory_arguments(parser, evaluation=True)
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
                challenge = overall.get("cvpr25") or {}
                if challenge.get("nsd_auc") is not None:
                    lines.append(f"  {'':<16} {'':<9} {'':<5} {'':<6} CVPR25: DSC AUC {fmt(challenge['dsc_auc'])}, "
                                 f"NSD AUC {fmt(challenge['nsd_auc'])}, final DSC {fmt(challenge['final_dsc'])}, "
                                 f"final NSD {fmt(challenge['final_nsd'])}, "
                                 f"{fmt(overall['time_s'].get('per_case'))} s per case")
    return "\n".join(lines)


def _check_label(label) -> None:
    """ValueError saying what to do when the one label file given cannot be read (checked before any output)."""
    from pathlib import Path

    from .dataset import read_label

    if not Path(label).exists():
        raise ValueError(f"the label {label} does not exist: give the label image (or DICOM folder) of DATA")
    try:
        read_label(label)  # readable; its values are counted when the evaluation plans its structures
    except Exception as exc:  # noqa: BLE001 - SimpleITK's and the library's reasons alike, in one line
        raise ValueError(f"cannot read the label {label}: {str(exc).strip().splitlines()[-1]}") from None


def cmd_evaluate(args) -> int:
    """Run :func:`evaluate_dataset` from parsed arguments and print a short table; returns the exit code."""
    from .dataset import find_cases
    from .evaluate import evaluate_dataset

    try:
        cases = find_cases(args.data, args.label)
        if args.label:
            _check_label(args.label)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cases:
        print(f"error: no image/label pairs found in {args.data}. Name label files *_seg*/*label*/*mask*, add a "
              "labels.json, or pass a manifest (.json/.csv with image,label columns).", file=sys.stderr)
        return 2
    if args.nsd_tolerance is not None and not 0 <= args.nsd_tolerance < float("inf"):
        print(f"error: --nsd-tolerance must be a number of mm >= 0, got {args.nsd_tolerance}", file=sys.stderr)
        return 2
    if args.clicks is None:
        args.clicks = 5 if args.protocol == "cvpr25" else 10
    if args.clicks < 1:
        print(f"error: --clicks must be at least 1, got {args.clicks}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    print(f"{len(cases)} case(s) in {args.data}; model {args.model}, {args.clicks} clicks, protocol {args.protocol}, "
          f"placement {args.placement}")
    common = dict(clicks=args.clicks, protocol=args.protocol, placement=args.placement,
                  nsd_tolerance_mm=args.nsd_tolerance,
                  structures=_structures(args.structures), seed=args.seed, min_voxels=args.min_voxels,
                  save_predictions=not args.no_predictions, plots=not args.no_plots, progress=not args.quiet)
    if getattr(args, "memory", None):
        summary = _evaluate_with_memory(args, cases, common)
    else:
        summary = evaluate_dataset(cases, args.model, args.output, checkpoint=args.checkpoint, device=args.device,
                                   name=args.name, attention=args.attention, **common)
    runtime = summary["runtime"]
    skipped = summary["skipped"]
    print(f"evaluated {runtime['structures_evaluated']} structure(s) in {runtime['seconds']:.1f} s; "
          f"{len(skipped)} skipped in total" + (f" (reasons in {args.output}/skipped.csv)" if skipped else ""))
    if not summary.get("n_rows") and skipped:  # nothing could be evaluated at all: an error, with the reasons
        reasons = sorted({str(record.get("reason", "")) for record in skipped})
        given = f" with {args.label}" if args.label else ""
        print(f"error: nothing of {args.data}{given} could be evaluated: {'; '.join(reasons)[:400]}",
              file=sys.stderr)
        return 2
    table = _table(summary)
    if table:
        print(table)
    if getattr(args, "memory", None):
        _print_memory_comparison(args, cases)
    print(f"results: {args.output}/results.csv, {args.output}/summary.json"
          + (", plots: " + ", ".join(p.rsplit("/", 1)[-1] for p in summary.get("plots", [])) if summary.get("plots")
             else ""))
    return 0


def _evaluate_with_memory(args, cases, common) -> Dict:
    """``evaluate --memory``: the model built once, the bank attached with the leakage guard (patient ids from
    the manifest), results stored as ``<model>+memory`` unless ``--name`` says otherwise."""
    from ..errors import FastSAM3DError
    from ..memory.cli import memory_options
    from ..memory.evaluation import case_patients, evaluate_with_memory
    from .evaluate import resolve_model

    model, _, description = resolve_model(args.model, args.checkpoint, args.device, None, args.attention)
    patients = case_patients(args.data if not args.label else None, cases)
    if args.memory_k < 1 or not 0.0 <= args.memory_local_ratio <= 1.0:
        raise FastSAM3DError(f"--memory-k must be at least 1 and --memory-local-ratio between 0 and 1 (got "
                             f"{args.memory_k} and {args.memory_local_ratio}).")
    return evaluate_with_memory(cases, model, args.output, bank=args.memory, name=args.name or f"{args.model}+memory",
                                guard=args.memory_guard, patients=patients, checkpoint=description,
                                **memory_options(args), **common)


def _print_memory_comparison(args, cases) -> None:
    """The paired memory-on/off table when the folder also holds the model's results without memory; its interval
    resamples the manifest's patients (cases of one patient are not independent)."""
    from ..memory.evaluation import case_patients, comparison_table, paired_comparison

    patients = case_patients(args.data if not args.label else None, cases)
    entries = paired_comparison(args.output, args.model, args.name or f"{args.model}+memory", clicks=(1, 3, 5),
                                metric="dice_full", placements=None, patients=patients)
    entries = [e for e in entries if e["n"] and e["click"] <= args.clicks]
    if entries:
        print(f"memory on - off, Dice on the source grid, paired by structure ({args.model} vs "
              f"{args.name or args.model + '+memory'}, same click seeds):")
        print(comparison_table(entries))
    else:
        print(f"(run the same command without --memory into {args.output} to get the paired on/off comparison)")
