"""Training commands: ``prepare-data``, ``distill``, ``finetune``, ``export-weights``.

``add_subcommands(subparsers)`` registers them on the main parser (each sets ``func``, which returns the exit
code). The work is done by :mod:`.data`, :mod:`.distill`, :mod:`.finetune` and :mod:`.checkpoints`.
"""
from __future__ import annotations

import argparse
import math
import sys

EXAMPLES = """examples (the demo pipeline, see Resources/Models/MODEL_CARD.md):
  python -m FastSAM3DLib prepare-data /tmp/crops --source ../shared/data/totalseg --phantoms 200 \\
      --exclude-case example_ct --exclude-case example_ct_sm --exclude 'kidney*'
  python -m FastSAM3DLib finetune /tmp/crops --model sam-med3d-demo-teacher --train-encoder --lr 5e-4 \\
      --decoder-lr 5e-4 --steps 1000 --output runs/teacher
  python -m FastSAM3DLib distill /tmp/crops --teacher sam-med3d-demo-teacher \\
      --teacher-checkpoint runs/teacher/model.pth --student fastsam3d-demo --steps 1000 --output runs/student
  python -m FastSAM3DLib finetune /tmp/crops --model fastsam3d-demo --checkpoint runs/student/model.pth \\
      --steps 1000 --output runs/demo
  python -m FastSAM3DLib export-weights runs/demo/latest.pth Resources/Models/fastsam3d-demo.pth

Every run writes OUTPUT/latest.pth (resumable: rerun with --resume and the same settings; --steps may change)
and OUTPUT/log.jsonl (one JSON line per step and per epoch); a finished run also OUTPUT/model.pth (weights only)."""


def _floats(text: str):
    """``LOW,HIGH`` parsed (finite, LOW <= HIGH), or argparse's one-line error."""
    low, comma, high = text.partition(",")
    try:
        values = float(low), float(high)
    except ValueError:
        values = None
    if not comma or values is None or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected two numbers LOW,HIGH, got {text!r}")
    if values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"LOW must not exceed HIGH, got {text!r}")
    return values


def _number(minimum: float, inclusive: bool = True):
    """An argparse type: a finite number of at least (or, not inclusive, above) ``minimum``."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} {minimum:g}, "
                                             f"got {text}")
        return value

    return parse


def _at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (argparse's one-line error otherwise)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _group_weights(text):
    """``--group-weights`` parsed, or argparse's one-line error."""
    from .data import parse_group_weights

    try:
        return parse_group_weights(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_data_arguments(parser) -> None:
    parser.add_argument("data", help="crop cache folder made by 'prepare-data'")
    parser.add_argument("--group-weights", default=None, metavar="G=W,...", type=_group_weights,
                        help="sampling weight per data group, e.g. 'phantom=1,totalseg=2' (default: every crop "
                             "equally often)")
    parser.add_argument("--no-augment", action="store_true", help="no flips and no intensity scale/shift")
    parser.add_argument("--intensity-scale", type=_floats, default=(0.9, 1.1), metavar="LOW,HIGH",
                        help="random factor on the normalised image (default 0.9,1.1)")
    parser.add_argument("--intensity-shift", type=_floats, default=(-0.1, 0.1), metavar="LOW,HIGH",
                        help="random offset added to the normalised image (default -0.1,0.1)")


def _add_loop_arguments(parser, lr: float) -> None:
    parser.add_argument("--output", "-o", required=True, help="run folder (latest.pth, model.pth, log.jsonl)")
    parser.add_argument("--steps", type=_at_least(1), default=1000, help="optimiser steps in all (default 1000)")
    parser.add_argument("--steps-per-epoch", type=_at_least(1), default=100, help="steps per epoch (default 100)")
    parser.add_argument("--batch-size", type=_at_least(1), default=1,
                        help="samples per micro-batch (default 1, official)")
    parser.add_argument("--accumulate", type=_at_least(1), default=1,
                        help="micro-batches per optimiser step (default 1)")
    parser.add_argument("--lr", type=_number(0, inclusive=False), default=lr, help=f"learning rate (default {lr:g})")
    parser.add_argument("--weight-decay", type=_number(0), default=0.1,
                        help="AdamW weight decay (default 0.1, official)")
    parser.add_argument("--warmup-steps", type=_at_least(0), default=0, help="linear warm-up steps (default 0)")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                        help="learning rate after the warm-up (default cosine)")
    parser.add_argument("--grad-clip", type=_number(0), default=1.0, help="max gradient norm, 0 = off (default 1)")
    parser.add_argument("--checkpoint-every", type=_at_least(1), default=50,
                        help="steps between checkpoints (default 50)")
    parser.add_argument("--seed", type=int, default=2023, help="random seed (default 2023, official)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA (never used on CPU)")
    parser.add_argument("--threads", type=_at_least(1), default=None, help="torch CPU threads")
    parser.add_argument("--attention", default=None, help="attention backend (default: automatic)")
    parser.add_argument("--max-minutes", type=_number(0, inclusive=False), default=None,
                        help="stop after this many minutes with a checkpoint (continue later with --resume)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from latest.pth")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_subcommands(subparsers) -> None:
    """Register ``prepare-data``, ``distill``, ``finetune`` and ``export-weights``."""
    from ..model_configs import list_models

    fmt = argparse.RawDescriptionHelpFormatter
    prep = subparsers.add_parser(
        "prepare-data", help="cut and cache 128^3 training crops from image/label folders and synthetic phantoms",
        description="Resample every selected structure's box (the official GT-centred 128^3 box at 1.5 mm, "
                    "RAS order, plus a margin for random shifts) once and cache it for training.",
        epilog=EXAMPLES, formatter_class=fmt)
    prep.add_argument("cache", help="crop cache folder (created; rerunning adds what is missing)")
    prep.add_argument("--source", action="append", default=[],
                      help="folder or manifest of image/label pairs (repeatable; as 'evaluate' finds them)")
    prep.add_argument("--phantoms", type=_at_least(0), default=0, help="synthetic phantoms to add (default 0)")
    prep.add_argument("--per-phantom", type=_at_least(1), default=2,
                      help="structures cropped per phantom (default 2)")
    prep.add_argument("--structures", nargs="+", default=None, metavar="S",
                      help="label values or names to use (wildcards allowed); default: all")
    prep.add_argument("--exclude", action="append", default=[], metavar="[CASE:]S",
                      help="structures never used, e.g. 'kidney*' or 't2:50' (repeatable)")
    prep.add_argument("--exclude-case", action="append", default=[], metavar="CASE",
                      help="case names (wildcards allowed) never used: held-out data (repeatable)")
    prep.add_argument("--min-voxels", type=int, default=1000,
                      help="skip structures with fewer voxels in the 128^3 box (default 1000, official)")
    prep.add_argument("--margin", type=_at_least(0), default=16,
                      help="extra voxels per side for random shifts (default 16)")
    prep.add_argument("--seed", type=int, default=0, help="seed of the phantoms (default 0)")
    prep.set_defaults(func=cmd_prepare)

    dist = subparsers.add_parser(
        "distill", help="layer-wise progressive distillation of a student encoder from a frozen teacher",
        description="Student block i is matched to teacher block r(i+1)-1 (0-based outputs; r = depth ratio); "
                    "one more pair every --stage-epochs epochs, the neck output last. See "
                    "FastSAM3DLib/training/distill.py.", epilog=EXAMPLES, formatter_class=fmt)
    _add_data_arguments(dist)
    dist.add_argument("--teacher", required=True, choices=list_models())
    dist.add_argument("--teacher-checkpoint", default=None, help="teacher weights (default: 'cached' if the model "
                                                                 "has published weights, else random: tests only)")
    dist.add_argument("--student", required=True, choices=list_models())
    dist.add_argument("--student-checkpoint", default=None, help="initial student weights (default: random)")
    dist.add_argument("--pairs", default=None, metavar="S:T,...",
                      help="explicit student:teacher block-output pairs (0-based), e.g. 0:1,1:3,2:5")
    dist.add_argument("--stage-epochs", type=_at_least(1), default=3,
                      help="epochs before the next pair is added (default 3)")
    dist.add_argument("--neck-from-start", action="store_true", help="match the neck output from the first epoch")
    dist.add_argument("--loss", choices=("mse", "l1", "smooth_l1", "cosine"), default="mse")
    dist.add_argument("--require-equal-widths", action="store_true",
                      help="refuse pairs of different widths instead of learning a projection")
    dist.add_argument("--keep-student-decoder", action="store_true",
                      help="do not copy the teacher's prompt encoder and mask decoder into the student")
    dist.add_argument("--teacher-cache", choices=("none", "memory", "disk"), default="none",
                      help="keep teacher features per sample (hits only with --no-augment and a crop cache "
                           "made with --margin 0); default none")
    dist.add_argument("--teacher-cache-items", type=_at_least(1), default=256, help="memory cache size (default 256)")
    _add_loop_arguments(dist, lr=8e-4)
    dist.set_defaults(func=cmd_distill)

    fine = subparsers.add_parser(
        "finetune", help="train the prompt encoder and mask decoder (optionally the encoder) with simulated clicks",
        description="The official recipe: 11 random-error clicks per sample, newest click only, logits fed back, "
                    "mask-only steps, Dice + cross-entropy summed over the clicks.", epilog=EXAMPLES,
        formatter_class=fmt)
    _add_data_arguments(fine)
    fine.add_argument("--model", required=True, choices=list_models())
    fine.add_argument("--checkpoint", default=None, help="initial weights (default: random, i.e. from scratch)")
    fine.add_argument("--unfreeze-blocks", type=_at_least(0), default=0,
                      help="also train the last K encoder blocks + neck")
    fine.add_argument("--train-encoder", action="store_true", help="train the whole encoder too (from scratch)")
    fine.add_argument("--decoder-lr", type=_number(0, inclusive=False), default=None,
                      help="learning rate of prompt encoder and decoder (default 0.1 * --lr, official)")
    fine.add_argument("--clicks", type=_at_least(2), default=11,
                      help="simulated clicks per sample, at least 2: the last step is always the mask alone "
                           "(default 11)")
    fine.add_argument("--loss-size", type=_at_least(1), default=None,
                      help="compute the loss on a SIZE^3 grid (label area-averaged) instead of the full 128^3 "
                           "(official); e.g. 64 makes CPU runs several times faster")
    fine.add_argument("--iou-weight", type=_number(0), default=0.0,
                      help="also train the predicted IoU: this weight times the squared error to each click's "
                           "actual IoU (default 0: the official loss has no IoU term)")
    fine.add_argument("--iou-head-only", action="store_true",
                      help="train only the IoU prediction head (masks stay exactly as they are; the loss is the IoU "
                           "term alone); needs --iou-weight")
    _add_loop_arguments(fine, lr=8e-4)
    fine.set_defaults(func=cmd_finetune)

    export = subparsers.add_parser("export-weights", help="write a checkpoint's weights without optimiser state")
    export.add_argument("checkpoint", help="training checkpoint (latest.pth or model.pth)")
    export.add_argument("output", help="weights file to write, .pth or .pt (official format, optimizer_state_dict "
                                       "None); not the checkpoint itself")
    export.add_argument("--float16", action="store_true", help="store floating-point weights as float16")
    export.set_defaults(func=cmd_export)


def _augment(args):
    from .augment import AugmentConfig

    return AugmentConfig(enabled=not args.no_augment, scale=tuple(args.intensity_scale),
                         shift=tuple(args.intensity_shift))


def _loop(args):
    from .engine import LoopConfig

    return LoopConfig(output=args.output, steps=args.steps, steps_per_epoch=args.steps_per_epoch,
                      batch_size=args.batch_size, accumulate=args.accumulate, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup_steps, schedule=args.schedule, grad_clip=args.grad_clip,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
                      amp=not args.no_amp, threads=args.threads, resume=args.resume, quiet=args.quiet,
                      max_seconds=None if args.max_minutes is None else args.max_minutes * 60)


def _teacher_checkpoint(name: str, given):
    if given:
        return given
    from ..registry import get_model_config

    return "cached" if get_model_config(name).weights else None


def _report(summary) -> int:
    """Print a training run's summary; the exit code."""
    if not summary.get("finished", True):  # --max-minutes: stopped with a checkpoint, no weights yet
        print(f"stopped: {summary['steps']} steps, last loss {summary['loss']:.4f}; checkpoint "
              f"{summary['checkpoint']} (continue with --resume; model.pth is written when the run finishes)")
        return 0
    print(f"done: {summary['steps']} steps, last loss {summary['loss']:.4f}; weights {summary.get('weights')}")
    return 0


def cmd_prepare(args) -> int:
    """``prepare-data``."""
    from .data import prepare_crops

    if not args.source and not args.phantoms:
        print("error: give at least one --source or --phantoms N", file=sys.stderr)
        return 2
    cache = prepare_crops(args.cache, args.source, args.phantoms, margin=args.margin, min_voxels=args.min_voxels,
                          include=args.structures, exclude=args.exclude, exclude_cases=args.exclude_case,
                          per_phantom=args.per_phantom, seed=args.seed)
    if not len(cache):
        print(f"error: no crop was made (the lines above say why: no image/label pairs in the sources, every case "
              f"held out or unusable, or every structure under --min-voxels {args.min_voxels}); {cache.root} holds "
              "nothing to train on", file=sys.stderr)
        return 2
    print(f"{len(cache)} crops in {cache.root}: " + ", ".join(f"{g} {n}" for g, n in cache.groups().items()))
    return 0


def cmd_distill(args) -> int:
    """``distill``."""
    from .distill import DistillConfig, distill, parse_pairs

    config = DistillConfig(teacher=args.teacher, student=args.student, data=args.data,
                           teacher_checkpoint=_teacher_checkpoint(args.teacher, args.teacher_checkpoint),
                           student_checkpoint=args.student_checkpoint, pairs=parse_pairs(args.pairs),
                           stage_epochs=args.stage_epochs, neck_from_start=args.neck_from_start, loss=args.loss,
                           require_equal_widths=args.require_equal_widths,
                           decoder_from_teacher=not args.keep_student_decoder, lr=args.lr,
                           teacher_cache=args.teacher_cache, teacher_cache_items=args.teacher_cache_items,
                           group_weights=args.group_weights, augment=_augment(args),
                           attention=args.attention)
    return _report(distill(config, _loop(args)))


def cmd_finetune(args) -> int:
    """``finetune``."""
    from .finetune import FinetuneConfig, finetune

    config = FinetuneConfig(model=args.model, data=args.data, checkpoint=args.checkpoint,
                            unfreeze_blocks=args.unfreeze_blocks, train_encoder=args.train_encoder, lr=args.lr,
                            decoder_lr=args.decoder_lr, clicks=args.clicks, loss_size=args.loss_size,
                            iou_weight=args.iou_weight, iou_head_only=args.iou_head_only,
                            group_weights=args.group_weights, augment=_augment(args),
                            attention=args.attention)
    return _report(finetune(config, _loop(args)))


def cmd_export(args) -> int:
    """``export-weights``."""
    import torch

    from ..files import check_output_path
    from .checkpoints import export_weights

    output = check_output_path(args.output, [args.checkpoint], extensions=(".pth", ".pt"), input_name="checkpoint")
    path = export_weights(args.checkpoint, output, torch.float16 if args.float16 else None)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
