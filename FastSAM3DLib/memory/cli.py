"""The ``memory`` command: ``python -m FastSAM3DLib memory build|inspect ...``, and the ``--memory`` options.

``add_subcommands(subparsers)`` registers ``memory`` on the main parser (it sets ``func``, returning the exit
code), like the ``evaluate`` command; :func:`main` runs it alone. :func:`add_memory_arguments` and
:func:`attach_from_args` give any model-using command (``segment``, ``evaluate``) the same ``--memory BANK``
options in two lines.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

EXAMPLES = """examples:
  python -m FastSAM3DLib memory build train.json --model fastsam3d-demo --checkpoint cached -o bank.safetensors
  python -m FastSAM3DLib memory inspect bank.safetensors --entries

A .json manifest may give "patient", "licence" and "dataset" per case; they are recorded in the bank, and the
evaluation never retrieves entries of the patient it is testing."""


def add_subcommands(subparsers) -> None:
    """Register ``memory build`` and ``memory inspect`` on an argparse subparsers object."""
    from ..model_configs import list_models
    from .settings import CROPS, DESCRIPTOR_NAMES, KV_DTYPE_NAMES

    memory = subparsers.add_parser(
        "memory", help="Memorizing SAM memory banks: build one from labelled data, inspect one",
        description="Memory banks for the Memorizing SAM plug-in (keys/values of one encoder block per labelled "
                    "structure, with their provenance), stored as one .safetensors file.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = memory.add_subparsers(dest="memory_command", required=True)

    build = sub.add_parser("build", help="make a bank from a folder or manifest of image/label pairs")
    build.add_argument("data", help="folder of image/label pairs or a .json/.csv manifest (as for 'evaluate'); "
                                    "manifest entries may add patient, licence, dataset")
    build.add_argument("--label", help="the label image, when DATA is a single image")
    build.add_argument("--model", default="fastsam3d", choices=list_models())
    build.add_argument("--checkpoint", default="cached",
                       help="checkpoint file, 'cached' (bundled or verified download, default) or 'random' "
                            "(seeded random weights, for tests only)")
    build.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cpu)")
    build.add_argument("--attention", default=None, help="attention backend (default: automatic)")
    build.add_argument("--output", "-o", required=True, help="bank file to write (.safetensors)")
    build.add_argument("--block", type=int, default=None,
                       help="encoder block (default: the second-to-last global-attention block, 4 for FastSAM3D)")
    build.add_argument("--descriptor", choices=DESCRIPTOR_NAMES, default="pooled32",
                       help="retrieval descriptor of the normalised input (default: pooled32)")
    build.add_argument("--crop", choices=CROPS, default="gt",
                       help="gt: crop centred on the label (the papers' protocol, default); click: the session's "
                            "region around the structure's deepest voxel")
    build.add_argument("--structures", nargs="+", metavar="S", help="label values or names to use (default: all)")
    build.add_argument("--min-voxels", type=int, default=10, help="skip smaller structures (default: 10)")
    build.add_argument("--kv-dtype", choices=KV_DTYPE_NAMES, default="float16",
                       help="storage of keys and values (default: float16)")
    build.add_argument("--licence", default="unknown", help="licence of cases whose manifest entry names none")
    build.add_argument("--dataset", default="", help="data set name of cases whose manifest entry names none")
    build.add_argument("--split", default="", help="name of this data split (default: the manifest's file name)")
    build.add_argument("--quiet", action="store_true", help="print only the summary")
    build.set_defaults(func=cmd_build)

    inspect = sub.add_parser("inspect", help="print a bank's provenance, layout and entries")
    inspect.add_argument("bank", help="bank file (.safetensors)")
    inspect.add_argument("--entries", action="store_true", help="one line per entry")
    inspect.add_argument("--json", action="store_true", help="print the header as JSON")
    inspect.set_defaults(func=cmd_inspect)


def cmd_build(args) -> int:
    """Build and save a bank; returns the exit code."""
    from pathlib import Path

    from ..evaluation.evaluate import resolve_model
    from ..files import check_output_path, sha256_file
    from .bank import save_bank
    from .build import build_bank, inspect_text

    inputs = [Path(args.data)] + ([Path(args.label)] if args.label else [])
    output = check_output_path(args.output, inputs, extensions=(".safetensors",), input_name="input")
    model, _, description = resolve_model(args.model, args.checkpoint, args.device, None, args.attention)
    if description == "cached":  # the verified file's checksum (a download loads its fast copy, other bytes)
        from ..registry import cached_checkpoint, get_model_config
        from ..weights import weights_sha256

        config = get_model_config(args.model)
        path, sha = cached_checkpoint(config), weights_sha256(config.weights or config.name)
        description = f"{config.weights or config.name} weights (sha256 {sha})" if sha else str(path)
    if description and Path(description).is_file():
        description = f"{Path(description).name} (sha256 {sha256_file(description)})"
    log = (lambda text: None) if args.quiet else print
    try:
        bank = build_bank(args.data, model, label=args.label, model_label=args.model,
                          checkpoint_label=description or "", block=args.block, descriptor=args.descriptor,
                          crop=args.crop, structures=args.structures, min_voxels=args.min_voxels,
                          kv_dtype=args.kv_dtype, default_licence=args.licence, default_dataset=args.dataset,
                          split=args.split, log=log)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_bank(bank, output)
    print(inspect_text(bank, nbytes=bank.nbytes()))
    print(f"wrote {output} ({output.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


def cmd_inspect(args) -> int:
    """Print a bank; returns the exit code."""
    from .bank import load_bank
    from .build import inspect_text

    bank = load_bank(args.bank)
    if args.json:
        print(json.dumps(bank.meta, indent=2))
    else:
        print(inspect_text(bank, entries=args.entries, nbytes=bank.nbytes()))
    return 0


def add_memory_arguments(parser, evaluation: bool = False) -> None:
    """``--memory BANK`` and its settings, for commands that run a model (segment, evaluate).

    ``evaluation``: also ``--memory-guard refuse|exclude`` (what to do when a test patient is in the bank).
    """
    from .settings import DEFAULT_K, DEFAULT_LOCAL_RATIO, RETRIEVALS, RULES

    group = parser.add_argument_group("memory (Memorizing SAM)")
    group.add_argument("--memory", metavar="BANK", default=None,
                       help="memory bank (.safetensors) to attach to the model's encoder (default: none)")
    group.add_argument("--memory-k", type=int, default=DEFAULT_K, help=f"neighbours per region (default: {DEFAULT_K})")
    group.add_argument("--memory-local-ratio", type=float, default=DEFAULT_LOCAL_RATIO,
                       help=f"weight of the local attention, 0-1 (default: {DEFAULT_LOCAL_RATIO}; 1 = memory off)")
    group.add_argument("--memory-rule", choices=RULES, default="attention",
                       help="attention: memory attention (the paper, default); values: the released value "
                            "substitution with normalised weights; released: the released formula exactly")
    group.add_argument("--memory-retrieval", choices=RETRIEVALS, default="knn",
                       help="knn (default) or random (a control)")
    group.add_argument("--memory-other-encoder", action="store_true",
                       help="accept a bank made by other weights (same head layout): measure, do not assume")
    if evaluation:
        group.add_argument("--memory-guard", choices=("refuse", "exclude"), default="refuse",
                           help="a test patient found in the bank: refuse to run (default), or exclude that "
                                "patient's entries from retrieval for its own cases")


def memory_options(args) -> dict:
    """The plug-in settings of parsed ``--memory-*`` options, as keyword arguments of ``attach_memory`` and
    :func:`~FastSAM3DLib.memory.evaluation.evaluate_with_memory`."""
    return {"k": args.memory_k, "local_ratio": args.memory_local_ratio, "rule": args.memory_rule,
            "retrieval_mode": args.memory_retrieval, "allow_other_encoder": args.memory_other_encoder}


def attach_from_args(model, args, exclude_patients=()):
    """Attach the bank named by ``args.memory`` (None when there is none); returns the handle or None."""
    if not getattr(args, "memory", None):
        return None
    from .plugin import attach_memory

    return attach_memory(model, args.memory, exclude_patients=exclude_patients, **memory_options(args))


def main(argv: Optional[List[str]] = None) -> int:
    """``memory`` alone: ``main(["build", ...])`` or ``main(["inspect", BANK])``; returns the exit status."""
    from ..errors import FastSAM3DError

    parser = argparse.ArgumentParser(prog="python -m FastSAM3DLib")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["memory"] + list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except FastSAM3DError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
