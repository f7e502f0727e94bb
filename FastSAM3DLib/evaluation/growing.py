"""The ``grow`` placement: the interactive session with growth, measured on the whole object.

Like the ``click`` placement (what a user gets: clicks simulated anywhere in the object on the whole volume's
model grid, Dice on the source grid), but the session keeps every region it has segmented and grows into
neighbouring regions (:mod:`FastSAM3DLib.growth`), so the prediction the click generator sees is the blend of
all regions, not the newest region alone. Each row adds, on the source grid: ``recall_full`` (the fraction of
the object's voxels predicted), ``coverage`` (the fraction inside some region's extent: what the regions could
reach) and ``regions`` (how many). The first click is the ``click`` placement's (same random stream), so the two
placements are paired structure by structure.
"""
from __future__ import annotations

import time
from typing import Dict

import numpy as np


def blended_field(session, grid_size) -> np.ndarray:
    """The session's regions blended and upsampled onto the whole model grid (x, y, z), -inf outside every region."""
    import torch
    import torch.nn.functional as F

    from .. import regions

    field = np.full(tuple(grid_size), -np.inf, dtype=np.float32)
    state = session.region_set
    blended = regions.blend(state.lattice, state.logits()) if state.regions else None
    if blended is None:
        return field
    first, low, covered = blended
    with torch.no_grad():
        up = F.interpolate(low.float()[None, None], scale_factor=4, mode="trilinear", align_corners=False)[0, 0]
        inside = covered.repeat_interleave(4, 0).repeat_interleave(4, 1).repeat_interleave(4, 2)
        up = torch.where(inside, up, torch.full_like(up, -np.inf)).cpu().numpy()
    start = np.asarray(state.lattice.origin) + 4 * np.asarray(first)
    low_corner = np.maximum(start, 0)
    high_corner = np.minimum(start + np.array(up.shape), field.shape)
    if np.all(high_corner > low_corner):
        field[tuple(slice(a, b) for a, b in zip(low_corner, high_corner))] = \
            up[tuple(slice(a - s, b - s) for a, b, s in zip(low_corner, high_corner, start))]
    return field


def run_grow_placement(data, value: int, mask: np.ndarray, voxels: int, clicks: int, rng: np.random.Generator,
                       meta: Dict):
    """The growing session driven by simulated clicks; returns (rows, final source-grid mask)."""
    from .. import regions
    from ..geometry import extract_label
    from .clicks import next_protocol_click
    from .metrics import dice_iou, dice_iou_in_region
    from .model_runner import upsample_logits
    from .placements import NO_PREDICTION, CaseSkipped, click_fields, unclicked_row

    runner, protocol = data.runner, data.protocol
    grid, label_grid = data.grid()
    truth = label_grid == value
    if not truth.any():
        raise CaseSkipped("not on the model grid: the structure has no voxel after nearest-neighbour resampling to "
                    f"{runner.spacing} mm (too thin or small)")
    session = data.session(grow=True)
    session.reset()
    field = None
    crops: Dict = {}
    rows, result = [], None
    previous = {**NO_PREDICTION, "recall_full": float("nan"), "coverage": float("nan"), "regions": 0}
    for index in range(clicks):
        click = next_protocol_click(protocol, index, truth, field, rng)
        if click is None:
            rows.append(unclicked_row(meta, index, previous))
            continue
        point, label = click
        ras = grid.model_to_ras_points(point)
        start = time.perf_counter()
        result = session.add_click(ras, include=bool(label))
        spent = time.perf_counter() - start
        field = blended_field(session, grid.size)
        roi = session.roi
        if roi is not None:
            if roi not in crops:
                crops[roi] = extract_label(data.label_volume, roi) == value
            up = upsample_logits(session.low_res_logits, runner.size)
            dice_crop, iou_crop = dice_iou(up > 0, crops[roi])
        else:
            dice_crop = iou_crop = float("nan")
        dice_full, iou_full = dice_iou_in_region(result.region, result.mask, mask, voxels)
        found = np.count_nonzero(result.mask & (mask[result.region] != 0))
        state = session.region_set
        previous = {"dice_crop": dice_crop, "iou_crop": iou_crop, "dice_full": dice_full, "iou_full": iou_full,
                    "nsd_full": data.nsd(result.region, result.mask, mask), "pred_iou": float(result.iou),
                    "recall_full": float(found / voxels),
                    "coverage": float(regions.coverage_fraction(data.volume, state.lattice, list(state.regions), mask)),
                    "regions": len(state.regions)}
        rows.append({**meta, "click": index + 1, **click_fields(ras, label), **previous,
                     "encoded": int(result.encoded), "time_s": spent})
    final = session.full_mask(result) if result is not None else np.zeros(data.volume.shape, dtype=bool)
    return rows, final
