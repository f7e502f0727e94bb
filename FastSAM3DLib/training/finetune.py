"""Fine-tuning with simulated clicks (the official ``train.py`` recipe), and training a model from scratch.

By default the image encoder is frozen and the prompt encoder and mask decoder learn, as in the official
decoder fine-tuning (reference/PIPELINE.md §11): 11 clicks per sample (:mod:`.interaction`), Dice +
cross-entropy (:class:`~.losses.DiceCELoss`) summed over the clicks. Options:

* ``unfreeze_blocks=k``: the last ``k`` encoder blocks and the neck learn too (the official
  ``train_unfreeze.py`` unfreezes from the last block backwards);
* ``train_encoder=True``: the whole encoder learns (patch embedding, positional embedding, every block, neck):
  training a model from scratch on the segmentation task, e.g. the small teacher of the demo pipeline;
* ``iou_weight=w`` adds the IoU-prediction term (:func:`~.interaction.simulate_clicks`; the official loss has
  none, so the official recipe leaves the predicted IoU untrained); ``iou_head_only=True`` trains nothing but
  the IoU prediction head, so that the masks of a trained model stay exactly as they are.

Learning rates: ``lr`` for encoder parameters, ``decoder_lr`` for the prompt encoder and mask decoder (the
official script uses ``lr`` 8e-4 and ``0.1 * lr`` for the decoder parts). Frozen blocks run without
gradients; only the trainable tail of the encoder is differentiated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import SettingError
from .augment import AugmentConfig
from .data import CropCache, CropSampler
from .engine import LoopConfig, TrainingTask, holding_output, resolve_device, run_training
from .interaction import DEFAULT_CLICKS, simulate_clicks
from .losses import DiceCELoss


@dataclass
class FinetuneConfig:
    """What to fine-tune and how (the model name is a registry name)."""

    model: str
    data: str  # crop cache folder (see data.prepare_crops)
    checkpoint: Optional[str] = None  # None: seeded random initialisation (training from scratch)
    unfreeze_blocks: int = 0
    train_encoder: bool = False
    lr: float = 8e-4
    decoder_lr: Optional[float] = None  # default 0.1 * lr (official)
    clicks: int = DEFAULT_CLICKS
    loss_size: Optional[int] = None  # None: the full 128^3 grid (official); e.g. 64 for CPU runs
    iou_weight: float = 0.0  # 0: no IoU-prediction term (official)
    iou_head_only: bool = False  # train only the IoU prediction head (needs iou_weight > 0)
    group_weights: Optional[Dict[str, float]] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    attention: Optional[str] = None


def set_trainable(model, unfreeze_blocks: int = 0, train_encoder: bool = False,
                  iou_head_only: bool = False) -> List[str]:
    """Freeze/unfreeze the encoder as configured (prompt encoder and decoder train unless ``iou_head_only``,
    which freezes everything but the IoU prediction head); returns the names of the trainable encoder parts."""
    encoder = model.image_encoder
    depth = len(encoder.blocks)
    if unfreeze_blocks < 0 or unfreeze_blocks > depth:
        raise SettingError(f"--unfreeze-blocks (unfreeze_blocks) must be in 0..{depth}, got {unfreeze_blocks}")
    if iou_head_only:
        if unfreeze_blocks or train_encoder:
            raise SettingError("iou_head_only trains the IoU head alone: it cannot be combined with encoder "
                               "training")
        model.requires_grad_(False)
        model.mask_decoder.iou_prediction_head.requires_grad_(True)
        return []
    encoder.requires_grad_(bool(train_encoder))
    parts = ["all"] if train_encoder else []
    if not train_encoder and unfreeze_blocks:
        for index in range(depth - unfreeze_blocks, depth):
            encoder.blocks[index].requires_grad_(True)
            parts.append(f"blocks.{index}")
        encoder.neck.requires_grad_(True)
        parts.append("neck")
    model.prompt_encoder.requires_grad_(True)
    model.mask_decoder.requires_grad_(True)
    return parts


class FinetuneTask(TrainingTask):
    """The simulated-click segmentation loss as a :class:`~.engine.TrainingTask`."""

    def __init__(self, config: FinetuneConfig, loop: LoopConfig, device: torch.device) -> None:
        from ..registry import build_model

        self.config = config
        if int(config.clicks) < 2:  # the last step is the mask alone: one step would never give a click
            raise SettingError(f"clicks must be at least 2 (the last step's prompt is the mask alone), got "
                               f"{config.clicks}")
        self.model = build_model(config.model, checkpoint=config.checkpoint, device=device,
                                 attention_backend=config.attention, seed=loop.seed)
        if config.iou_head_only and config.iou_weight <= 0:
            raise SettingError("--iou-head-only needs --iou-weight above 0 (iou_head_only, iou_weight: the IoU term is "
                               "its only loss)")
        self.trainable_encoder = set_trainable(self.model, config.unfreeze_blocks, config.train_encoder,
                                               config.iou_head_only)
        self.encoder_trains = any(p.requires_grad for p in self.model.image_encoder.parameters())
        self.sampler = CropSampler(CropCache.open(config.data), config.augment, config.group_weights)
        self.loss_fn = DiceCELoss()
        self.batch_size, self.device = loop.batch_size, device
        self.args = {"command": "finetune", "model_name": config.model, "finetune": config,
                     "trainable_encoder": self.trainable_encoder}
        self.fingerprint = {"model": config.model, "seed": loop.seed, "unfreeze_blocks": config.unfreeze_blocks,
                            "train_encoder": config.train_encoder, "clicks": config.clicks,
                            "loss_size": config.loss_size, "iou_weight": config.iou_weight,
                            "iou_head_only": config.iou_head_only, "batch_size": loop.batch_size,
                            "accumulate": loop.accumulate, "group_weights": config.group_weights,
                            "augment": config.augment}

    def param_groups(self):
        decoder_lr = self.config.decoder_lr if self.config.decoder_lr is not None else 0.1 * self.config.lr
        groups = []
        for module, lr in ((self.model.image_encoder, self.config.lr), (self.model.prompt_encoder, decoder_lr),
                           (self.model.mask_decoder, decoder_lr)):
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": lr})
        return groups

    def train_mode(self) -> None:
        self.model.train()
        if not self.encoder_trains:
            self.model.image_encoder.eval()

    def loss(self, step: int, epoch: int, rng: np.random.Generator):
        images, labels, _ = self.sampler.batch(rng, self.batch_size)
        images, labels = images.to(self.device), labels.to(self.device)
        with torch.set_grad_enabled(self.encoder_trains):
            embedding = self.model.image_encoder(images)
        return simulate_clicks(self.model, embedding, labels, self.loss_fn, rng, self.config.clicks,
                               loss_size=self.config.loss_size, iou_weight=self.config.iou_weight,
                               mask_loss=not self.config.iou_head_only)


def finetune(config: FinetuneConfig, loop: LoopConfig, log=print) -> Dict[str, Any]:
    """Run a fine-tuning (or from-scratch) run; returns the summary of :func:`~.engine.run_training`.

    Writes ``<loop.output>/latest.pth`` (resumable) and ``<loop.output>/model.pth`` (weights only); both load
    with ``build_model(config.model, checkpoint=...)``.
    """
    device = resolve_device(loop.device)
    with holding_output(loop):
        task = FinetuneTask(config, loop, device)
        what = "whole model" if config.train_encoder else "IoU prediction head only" if config.iou_head_only else (
            f"prompt encoder + mask decoder + {', '.join(task.trainable_encoder)}" if task.trainable_encoder
            else "prompt encoder + mask decoder (encoder frozen)")
        log(f"fine-tuning {config.model} on {device}: {what}; {config.clicks} simulated clicks per sample")
        return run_training(task, loop, log, desc="finetune")
