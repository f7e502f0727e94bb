"""The official training interaction: simulated clicks on one batch, loss summed over the clicks.

As ``interaction()`` of the official ``train.py`` (FastSAM3D and SAM-Med3D, reference/PIPELINE.md §6, §11):

* ``num_clicks`` (11) steps per sample; the first mask input is zeros (32^3);
* each step's click is a uniformly random voxel of the current error region (false negatives and false
  positives; include if it is a false negative): :func:`FastSAM3DLib.evaluation.clicks.random_error_click`,
  with the prediction the generator sees taken as upsampled logits > 0.5 (FastSAM3D's ``click_method.py``
  threshold, :func:`~FastSAM3DLib.evaluation.clicks.prediction_for_clicks`);
* only the newest click is fed (``--multi_click`` off), with the previous step's low-res logits;
* at one random step in ``[2, 9)`` and at the last step the prompt is the mask alone (``points=None``);
* the logits are upsampled trilinearly to the label's size (:func:`~FastSAM3DLib.upsample.trilinear_upsample`, the
  same resize as ``F.interpolate`` computed as matrix products) and the segmentation loss of every step is summed.
  ``loss_size`` (an option, not the official recipe) computes the loss on a coarser grid instead (logits
  upsampled to ``loss_size``^3, the label area-averaged to it: soft targets): on a CPU the full-resolution
  loss of 11 clicks costs far more than the model itself. Clicks are always simulated at full resolution.

The logits fed back keep their graph, as in the official code (gradients flow through the feedback chain).

``iou_weight`` (an option, not the official recipe, whose loss has no IoU term) adds ``iou_weight`` times the
mean squared error between the decoder's predicted IoU and the actual IoU of each step's full-resolution mask,
so that the predicted IoU shown to users means something.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluation.clicks import prediction_for_clicks, random_error_click
from ..evaluation.metrics import dice_iou
from ..upsample import trilinear_upsample

DEFAULT_CLICKS = 11
MASK_ONLY_RANGE = (2, 9)


def mask_only_steps(rng: np.random.Generator, num_clicks: int) -> Tuple[int, ...]:
    """The steps whose prompt is the mask alone: one random step in [2, 9) and the last one (official)."""
    return tuple(sorted({int(rng.integers(*MASK_ONLY_RANGE)), num_clicks - 1}))


def next_clicks(labels: np.ndarray, upsampled_logits: Optional[np.ndarray], rng: np.random.Generator):
    """One random error click per sample: points (B, 1, 3) float32 and labels (B, 1) int64 (numpy).

    ``labels`` (B, S, S, S) bool; ``upsampled_logits`` (B, S, S, S) or None before the first click. A sample
    without any error gets a click at its object's first voxel (include), so the batch stays rectangular.
    """
    points, click_labels = [], []
    for b in range(labels.shape[0]):
        prediction = prediction_for_clicks("fastsam3d", None if upsampled_logits is None else upsampled_logits[b])
        if prediction is None:
            prediction = np.zeros(labels[b].shape, dtype=bool)
        click = random_error_click(labels[b], prediction, rng)
        if click is None:
            click = (np.argwhere(labels[b])[0].astype(np.float64), 1)
        points.append(click[0])
        click_labels.append(click[1])
    return (np.asarray(points, dtype=np.float32)[:, None], np.asarray(click_labels, dtype=np.int64)[:, None])


def simulate_clicks(model, image_embedding: torch.Tensor, labels: torch.Tensor, loss_fn, rng: np.random.Generator,
                    num_clicks: int = DEFAULT_CLICKS, mask_only: Optional[Sequence[int]] = None,
                    loss_size: Optional[int] = None, iou_weight: float = 0.0,
                    mask_loss: bool = True) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Run the official click loop on a batch; returns (summed loss, {"dice_last": ..., "clicks": n}, plus
    "iou_error", the mean absolute error of the predicted IoU, when ``iou_weight`` is set).

    ``model``: a Sam3D (prompt_encoder, mask_decoder); ``image_embedding`` (B, C, 8, 8, 8); ``labels``
    (B, 1, S, S, S) float {0, 1}; ``loss_fn(logits, labels)``; ``mask_only``: the mask-only steps (default:
    :func:`mask_only_steps`); ``loss_size``: side of the loss grid (default: the label's, official);
    ``iou_weight``: weight of the IoU-prediction term (default 0, official); ``mask_loss=False`` leaves out the
    segmentation term (for training the IoU head alone, where it reaches no trainable weight).
    """
    if mask_only is None:
        mask_only = mask_only_steps(rng, num_clicks)
    device = image_embedding.device
    b, size = labels.shape[0], labels.shape[-3:]
    low = tuple(s // 4 for s in size)
    truth = labels[:, 0].detach().cpu().numpy() > 0.5
    low_res = torch.zeros((b, 1) + low, device=device, dtype=image_embedding.dtype)
    upsampled_np = None
    loss_grid = tuple(size) if not loss_size or loss_size == size[0] else (int(loss_size),) * 3
    target = labels if loss_grid == tuple(size) else F.interpolate(labels.float(), size=loss_grid, mode="area")
    total = image_embedding.new_zeros((), dtype=torch.float32)
    iou_errors = []
    prompt_encoder, decoder = model.prompt_encoder, model.mask_decoder
    dense_pe = prompt_encoder.get_dense_pe()
    for step in range(num_clicks):
        if step in mask_only:
            points = None
        else:
            coords, click_labels = next_clicks(truth, upsampled_np, rng)
            points = (torch.from_numpy(coords).to(device), torch.from_numpy(click_labels).to(device))
        sparse, dense = prompt_encoder(points=points, boxes=None, masks=low_res)
        low_res, predicted_iou = decoder(image_embeddings=image_embedding, image_pe=dense_pe,
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=False)
        if mask_loss:
            upsampled = trilinear_upsample(low_res.float(), loss_grid)
            total = total + loss_fn(upsampled, target)
        if not mask_loss or loss_grid != tuple(size):
            with torch.no_grad():
                upsampled = trilinear_upsample(low_res.float(), size)
        upsampled_np = upsampled[:, 0].detach().cpu().numpy()
        if iou_weight:
            dice, iou = overlap(upsampled_np > 0, truth)
            actual = torch.as_tensor(iou, dtype=torch.float32, device=device)
            total = total + iou_weight * F.mse_loss(predicted_iou[:, 0].float(), actual)
            iou_errors.append(float((predicted_iou[:, 0].detach().float() - actual).abs().mean()))
    if not iou_weight:
        dice, _ = overlap(upsampled_np > 0, truth)
    metrics = {"dice_last": float(np.mean(dice)), "clicks": float(num_clicks)}
    if iou_errors:
        metrics["iou_error"] = float(np.mean(iou_errors))
    return total, metrics


def overlap(prediction: np.ndarray, truth: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-sample (Dice, IoU) of boolean (B, ...) arrays (:func:`~FastSAM3DLib.evaluation.metrics.dice_iou`),
    1.0 instead of NaN where both are empty (a training target: nothing to find, nothing found)."""
    scores = np.array([dice_iou(p, t) for p, t in zip(prediction, truth)], dtype=np.float64).reshape(-1, 2)
    scores = np.nan_to_num(scores, nan=1.0)
    return scores[:, 0], scores[:, 1]
