"""Layer-wise progressive distillation of a FastSAM3D-style image encoder from a SAM-Med3D-style teacher.

The teacher (any registered model with its checkpoint) is frozen; the student (any registered model) learns
to reproduce the teacher's intermediate features and its final image embedding, as in the FastSAM3D paper.

**Layer pairing** (:func:`default_layer_pairs`). ``ImageEncoder3D.forward(x, return_block_outputs=True)``
returns the tokens after every block, 0-based: ``outputs[i]`` is the output *of block i* (i.e. after i + 1
blocks). With ``r = teacher_depth / student_depth`` the default pairs student output ``i`` with teacher
output ``r (i + 1) - 1``: "after student block i+1 <-> after teacher block r (i+1)" in 1-based words. For a
6-block student and a 12-block teacher: student 0..5 <-> teacher 1, 3, 5, 7, 9, 11 (after teacher blocks
2, 4, ..., 12), the paper's "student layer i <-> teacher layer 2i". Any other pairing can be given
explicitly (``pairs=[(0, 1), (1, 3), ...]``, CLI ``--pairs 0:1,1:3,...``). The final image embedding (the
neck output) is always matched too, as the last "pair" (``"neck"``).

**Progressive schedule** (:func:`active_pairs`). Training starts with the first pair; every ``stage_epochs``
epochs the next pair is added, until all block pairs and finally the neck are matched (with 6 pairs:
7 stages). ``neck_from_start=True`` matches the neck from the first epoch (what the official
``distillation.py`` effectively trains, since its layer-wise term is commented out) and adds the block pairs
progressively. The loss is the sum over active pairs of ``feature_loss(student, teacher)`` (MSE by default).
Until the neck is matched, a stage runs student and teacher only up to their deepest active block (the
blocks after it would not change the loss), so the early stages cost a fraction of a full step.

**Widths.** When a student's width differs from the teacher's (block tokens or neck channels), a learnable
linear projection per pair maps the student features to the teacher's width (``projections``); it is
trained with the student but saved only in the resumable checkpoint's ``extra_state_dict``, never in the
student's weights. ``require_equal_widths=True`` refuses such pairs instead.

**Teacher features** are computed on the fly (no disk round trip); :class:`TeacherFeatureCache` optionally
keeps them in memory (bounded) or on disk, keyed by the exact sample (crop, window, augmentation). The disk
cache lives in ``<output>/teacher_features/<id>/``, ``id`` a hash of what else changes the features (the teacher's
name, architecture and weights, the attention backend, the crop cache and augmentation settings), so features of
another teacher or crop cache are never served; a run that starts without a checkpoint removes the other ids' folders.

**The student checkpoint** is a complete model of the student config: the distilled encoder plus (by default)
the teacher's prompt encoder and mask decoder when their shapes fit (the FastSAM3D recipe assembles the
distilled encoder with the teacher's decoder before fine-tuning), so ``build_model(student, checkpoint=...)``
loads it strictly.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import SettingError
from ..weights.safetensors_cache import tensors_sha256
from .augment import AugmentConfig
from .data import CropCache, CropSampler
from .engine import LoopConfig, TrainingTask, run_training
from .losses import feature_loss

NECK = "neck"
Pair = Tuple[int, int]


def default_layer_pairs(student_depth: int, teacher_depth: int) -> List[Pair]:
    """Student block output ``i`` <-> teacher block output ``r (i + 1) - 1`` with ``r = teacher/student depth``."""
    if student_depth < 1 or teacher_depth < student_depth or teacher_depth % student_depth:
        raise SettingError(f"no default pairing for a {student_depth}-block student and a {teacher_depth}-block "
                           "teacher (the teacher depth must be a multiple of the student's); give pairs explicitly")
    ratio = teacher_depth // student_depth
    return [(i, ratio * (i + 1) - 1) for i in range(student_depth)]


def parse_pairs(text: Optional[str]) -> Optional[List[Pair]]:
    """``"0:1,1:3,2:5"`` -> ``[(0, 1), (1, 3), (2, 5)]`` (student output : teacher output, 0-based)."""
    if not text:
        return None
    pairs = []
    for part in text.split(","):
        s, _, t = part.partition(":")
        try:
            pairs.append((int(s), int(t)))
        except ValueError:
            raise SettingError(f"pairs must look like '0:1,1:3' (student:teacher block outputs), got {text!r}"
                               ) from None
    return pairs


def active_pairs(epoch: int, pairs: Sequence[Pair], stage_epochs: int,
                 neck_from_start: bool = False) -> List[Union[Pair, str]]:
    """The pairs matched during ``epoch`` (0-based): the schedule of the module docstring."""
    if stage_epochs < 1:
        raise SettingError("stage_epochs must be >= 1")
    stages = list(pairs) + ([] if neck_from_start else [NECK])
    count = min(1 + epoch // stage_epochs, len(stages))
    active: List[Union[Pair, str]] = list(stages[:count])
    if neck_from_start:
        active.append(NECK)
    return active


def pair_name(pair: Union[Pair, str]) -> str:
    """``"s0-t1"`` for a block pair, ``"neck"`` for the final embedding."""
    return pair if isinstance(pair, str) else f"s{pair[0]}-t{pair[1]}"


class TeacherFeatureCache:
    """Teacher features per sample key: ``mode`` ``"none"``, ``"memory"`` (at most ``max_items``, LRU) or
    ``"disk"`` (``folder``/<hash>.pt, float16)."""

    MODES = ("none", "memory", "disk")

    def __init__(self, mode: str = "none", folder=None, max_items: int = 256) -> None:
        if mode not in self.MODES:
            raise SettingError(f"teacher cache must be one of {', '.join(self.MODES)}, got {mode!r}")
        if mode == "disk" and folder is None:
            raise SettingError("a disk teacher cache needs a folder")
        self.mode, self.max_items = mode, max_items
        self.folder = Path(folder) if folder is not None else None
        self.memory: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        return self.folder / (hashlib.sha1(key.encode()).hexdigest() + ".pt")

    def get(self, key: str) -> Optional[Dict[str, torch.Tensor]]:
        """The cached features of ``key`` (float16, CPU) or None."""
        found = None
        if self.mode == "memory" and key in self.memory:
            self.memory.move_to_end(key)
            found = self.memory[key]
        elif self.mode == "disk" and self._path(key).is_file():
            found = torch.load(self._path(key), map_location="cpu", weights_only=True)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, features: Dict[str, torch.Tensor]) -> None:
        """Store ``features`` of ``key`` (moved to the CPU as float16)."""
        if self.mode == "none":
            return
        small = {k: v.detach().to("cpu", torch.float16) for k, v in features.items()}
        if self.mode == "memory":
            self.memory[key] = small
            while len(self.memory) > self.max_items:
                self.memory.popitem(last=False)
        else:
            from .checkpoints import atomic_save

            atomic_save(small, self._path(key))


@dataclass
class DistillConfig:
    """What to distil from what (model names are registry names)."""

    teacher: str
    student: str
    data: str  # crop cache folder (see data.prepare_crops)
    teacher_checkpoint: Optional[str] = None
    student_checkpoint: Optional[str] = None  # start from these student weights (else seeded random init)
    pairs: Optional[List[Pair]] = None  # default: default_layer_pairs
    stage_epochs: int = 3  # the official layerepoch
    neck_from_start: bool = False
    loss: str = "mse"
    require_equal_widths: bool = False
    decoder_from_teacher: bool = True
    lr: float = 8e-4  # official distillation.py
    teacher_cache: str = "none"
    teacher_cache_items: int = 256
    group_weights: Optional[Dict[str, float]] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    attention: Optional[str] = None


class DistillationTask(TrainingTask):
    """The distillation loss (see the module docstring) as a :class:`~.engine.TrainingTask`."""

    def __init__(self, config: DistillConfig, loop: LoopConfig, device: torch.device) -> None:
        from ..registry import build_model, get_model_config

        self.config = config
        teacher_cfg, student_cfg = get_model_config(config.teacher), get_model_config(config.student)
        if teacher_cfg.image_size != student_cfg.image_size:
            raise SettingError("teacher and student must take the same input size")
        self.teacher = build_model(config.teacher, checkpoint=config.teacher_checkpoint, device=device,
                                   attention_backend=config.attention, seed=loop.seed)
        self.teacher.eval().requires_grad_(False)
        self.model = build_model(config.student, checkpoint=config.student_checkpoint, device=device,
                                 attention_backend=config.attention, seed=loop.seed + 1)
        if config.decoder_from_teacher and config.student_checkpoint is None:
            self.copied_decoder = copy_prompt_and_decoder(self.teacher, self.model)
        else:
            self.copied_decoder = False
        self.model.prompt_encoder.requires_grad_(False)
        self.model.mask_decoder.requires_grad_(False)
        s_enc, t_enc = student_cfg.encoder, teacher_cfg.encoder
        self.pairs = list(config.pairs) if config.pairs else default_layer_pairs(s_enc.depth, t_enc.depth)
        for s, t in self.pairs:
            if not (0 <= s < s_enc.depth and 0 <= t < t_enc.depth):
                raise SettingError(f"pair {s}:{t} is outside the student's {s_enc.depth} / teacher's {t_enc.depth} "
                                   "block outputs")
        widths = {pair_name(p): (s_enc.embed_dim, t_enc.embed_dim) for p in self.pairs}
        widths[NECK] = (s_enc.out_chans, t_enc.out_chans)
        self.extra = nn.ModuleDict()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(loop.seed + 2)  # seeded projections, independent of the global RNG
            for name, (sw, tw) in widths.items():
                if sw != tw:
                    if config.require_equal_widths:
                        raise SettingError(f"pair {name}: student width {sw} != teacher width {tw} "
                                           "(require_equal_widths is set)")
                    self.extra[name.replace("-", "_")] = nn.Linear(sw, tw)
        self.extra.to(device)
        self.loss_fn = feature_loss(config.loss)
        self.teacher_weights = tensors_sha256(self.teacher.state_dict())  # the weights' identity
        self.sampler = CropSampler(CropCache.open(config.data), config.augment, config.group_weights)
        self.stale_features: List[str] = []
        folder = None
        if config.teacher_cache == "disk":
            folder = self._teacher_feature_folder(Path(loop.output), teacher_cfg)
        self.cache = TeacherFeatureCache(config.teacher_cache, folder, config.teacher_cache_items)
        if config.teacher_cache != "none" and (config.augment.enabled or self.sampler.cache.margin):
            warnings.warn(f"the teacher cache hits only when a sample repeats exactly, so it needs --no-augment and "
                          f"a crop cache made with --margin 0 (this one has margin {self.sampler.cache.margin}, "
                          f"augmentation {'on' if config.augment.enabled else 'off'}); here it would almost never "
                          f"hit and only cost memory or disk", stacklevel=2)
        self.batch_size, self.loop, self.device = loop.batch_size, loop, device
        self.args = {"command": "distill", "teacher": config.teacher, "student": config.student,
                     "model_name": config.student, "distill": config, "pairs": self.pairs,
                     "projections": sorted(self.extra.keys()), "copied_teacher_decoder": self.copied_decoder}
        self.fingerprint = {"teacher": config.teacher, "student": config.student, "pairs": self.pairs,
                            "seed": loop.seed, "stage_epochs": config.stage_epochs, "loss": config.loss,
                            "neck_from_start": config.neck_from_start, "teacher_checkpoint": config.teacher_checkpoint,
                            "teacher_weights": self.teacher_weights,
                            "steps_per_epoch": loop.steps_per_epoch, "batch_size": loop.batch_size,
                            "accumulate": loop.accumulate, "group_weights": config.group_weights,
                            "augment": config.augment}

    def _teacher_feature_folder(self, output: Path, teacher_cfg) -> Path:
        """``<output>/teacher_features/<id>``, ``id`` a hash of everything but the sample key that changes the
        teacher features; without a checkpoint in ``output`` (a new run, or one killed before its first) the
        folders of other ids, and files of the older flat layout, are removed (``stale_features``)."""
        from .checkpoints import CHECKPOINT_NAME, plain

        crops = self.sampler.cache
        identity = {"teacher": self.config.teacher, "teacher_config": plain(teacher_cfg),
                    "teacher_weights": self.teacher_weights, "attention": self.config.attention,
                    "augment": plain(self.config.augment),
                    "crops": {"size": crops.size, "margin": crops.margin, "sources": crops.sources,
                              "entries": plain(crops.entries)}}
        text = json.dumps(identity, sort_keys=True, default=str)
        root = output / "teacher_features"
        folder = root / hashlib.sha256(text.encode()).hexdigest()[:16]
        if root.is_dir() and not (output / CHECKPOINT_NAME).is_file():
            for stale in sorted(root.iterdir()):
                if stale != folder:
                    self.stale_features.append(stale.name)
                    if stale.is_dir() and not stale.is_symlink():
                        shutil.rmtree(stale)
                    else:
                        stale.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        about = folder / "teacher.json"
        if not about.is_file():
            from ..files import atomic_output

            summary = dict(identity, crops=dict(identity["crops"], root=str(crops.root), entries=len(crops.entries)))
            with atomic_output(about) as tmp:
                tmp.write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
        return folder

    def param_groups(self):
        params = [p for p in self.model.image_encoder.parameters() if p.requires_grad] + list(self.extra.parameters())
        return [{"params": params, "lr": self.config.lr}]

    def train_mode(self) -> None:
        self.model.train()
        self.extra.train()
        self.teacher.eval()

    def active(self, epoch: int):
        """The pairs matched in ``epoch``."""
        return active_pairs(epoch, self.pairs, self.config.stage_epochs, self.config.neck_from_start)

    def status(self, step: int, epoch: int) -> Dict[str, Any]:
        return {"pairs": [pair_name(p) for p in self.active(epoch)],
                "teacher_cache_hits": self.cache.hits}

    def depths(self, active) -> Tuple[Optional[int], Optional[int]]:
        """How many (student, teacher) blocks the ``active`` pairs need; None: the whole encoder and its neck."""
        if NECK in active:
            return None, None
        return max(s for s, _ in active) + 1, max(t for _, t in active) + 1

    def teacher_features(self, images: torch.Tensor, keys: Sequence[str],
                         depth: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Teacher block outputs (the paired ones) and neck output, from the cache or computed now.

        ``depth``: run only the first ``depth`` teacher blocks (no neck) when nothing is cached; a cache always
        gets every paired output and the neck, so that its entries serve the later stages too.
        """
        needed = sorted({t for _, t in self.pairs})
        if self.cache.mode != "none":
            cached = [self.cache.get(k) for k in keys]
            if all(c is not None for c in cached):
                return {k: torch.cat([c[k] for c in cached]).to(self.device, torch.float32) for k in cached[0]}
            depth = None
        encoder = self.teacher.image_encoder
        with torch.no_grad():
            if depth is None:
                neck, blocks = encoder(images, return_block_outputs=True)
            else:
                neck, blocks = None, encoder.block_outputs(images, depth)
        features = {f"t{t}": blocks[t].float() for t in needed if t < len(blocks)}
        if neck is not None:
            features[NECK] = neck.float()
        if self.cache.mode != "none":
            for i, key in enumerate(keys):
                self.cache.put(key, {k: v[i:i + 1] for k, v in features.items()})
            # the targets a cache hit would give (float16-rounded): the same sample gets the same targets
            # whether it was cached or not, so a resumed run (its memory cache empty) continues exactly
            features = {k: v.to(torch.float16).to(torch.float32) for k, v in features.items()}
        return features

    def loss(self, step: int, epoch: int, rng: np.random.Generator):
        images, _, keys = self.sampler.batch(rng, self.batch_size)
        images = images.to(self.device)
        active = self.active(epoch)
        student_depth, teacher_depth = self.depths(active)  # early stages skip the blocks after their pairs
        target = self.teacher_features(images, keys, teacher_depth)
        if student_depth is None:
            neck, blocks = self.model.image_encoder(images, return_block_outputs=True)
        else:
            neck, blocks = None, self.model.image_encoder.block_outputs(images, student_depth)
        total = blocks[0].new_zeros((), dtype=torch.float32)
        metrics: Dict[str, float] = {}
        for pair in active:
            name = pair_name(pair)
            if pair == NECK:
                student, teacher = neck.permute(0, 2, 3, 4, 1), target[NECK].permute(0, 2, 3, 4, 1)
            else:
                student, teacher = blocks[pair[0]], target[f"t{pair[1]}"]
            key = name.replace("-", "_")  # ModuleDict keys cannot hold "-"
            if key in self.extra:
                student = self.extra[key](student)
            value = self.loss_fn(student, teacher)
            metrics[f"loss_{name}"] = float(value.detach())
            total = total + value
        return total, metrics


def copy_prompt_and_decoder(source: nn.Module, target: nn.Module) -> bool:
    """Copy ``source``'s prompt encoder and mask decoder into ``target`` when every shape fits; True if copied."""
    src = {k: v for k, v in source.state_dict().items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    dst = {k: v for k, v in target.state_dict().items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    if set(src) != set(dst) or any(src[k].shape != dst[k].shape for k in src):
        return False
    target.load_state_dict(src, strict=False)
    return True


def distill(config: DistillConfig, loop: LoopConfig, log=print) -> Dict[str, Any]:
    """Run a distillation; returns the summary of :func:`~.engine.run_training`.

    Writes ``<loop.output>/latest.pth`` (resumable) and ``<loop.output>/model.pth`` (the student's weights:
    ``build_model(config.student, checkpoint=...)`` loads either).
    """
    from .engine import holding_output, resolve_device

    device = resolve_device(loop.device)
    with holding_output(loop):  # before the task removes another run's teacher features
        task = DistillationTask(config, loop, device)
        if task.stale_features:
            log(f"removed {len(task.stale_features)} teacher feature cache(s) of another teacher, crop cache or "
                f"augmentation from {Path(loop.output) / 'teacher_features'} (left by a run without a checkpoint)")
        log(f"distilling {config.teacher} -> {config.student} on {device}: pairs "
            f"{', '.join(pair_name(p) for p in task.pairs)} + neck, one more every {config.stage_epochs} epoch(s); "
            f"projections: {', '.join(task.extra.keys()) or 'none'}; teacher decoder copied: {task.copied_decoder}")
        return run_training(task, loop, log, desc="distill")
