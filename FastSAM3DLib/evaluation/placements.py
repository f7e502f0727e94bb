"""The placements of the 128^3 region of interest and the simulated clicks of one structure in each (see
:mod:`.evaluate`): ``gt`` (centred on the ground truth, the papers' protocol), ``click`` (an interactive session,
as a user gets it) and ``grow`` (the session with growth, :mod:`.growing`). A case is loaded once
(:class:`CaseData`) for all its structures."""
from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np

from . import dataset as ds
from .clicks import PROMPT_MODES, next_protocol_click
from .metrics import dice_iou, dice_iou_in_region, nsd_in_region
from .model_runner import ModelRunner, upsample_logits

PLACEMENTS = ("gt", "click", "grow")  # "grow": the session with growth (.growing)


class CaseSkipped(Exception):
    """A unit that cannot be evaluated; the message is the recorded reason."""


#: The metric columns of a unit's rows before its first prediction (NaN: nothing predicted yet).
NO_PREDICTION = {"dice_crop": float("nan"), "iou_crop": float("nan"), "dice_full": float("nan"),
                 "iou_full": float("nan"), "nsd_full": float("nan"), "pred_iou": float("nan")}


def _session_logits(session):
    """The session's current low-res logits."""
    if session.low_res_logits is None:
        raise RuntimeError("the session has no prediction yet")
    return session.low_res_logits


def _offset_in_grid(roi, grid) -> np.ndarray:
    """Integer position of ``roi``'s voxel 0 in ``grid`` (ROIs of the session are sub-grids of the canonical grid)."""
    relative = np.linalg.inv(grid.model_to_ras) @ roi.model_to_ras
    start = np.rint(relative[:3, 3])
    if not (np.allclose(relative[:3, :3], np.eye(3), atol=1e-6) and np.allclose(relative[:3, 3], start, atol=1e-4)):
        raise RuntimeError("the session's ROI is not a sub-grid of the volume's canonical model grid")
    return start.astype(int)


def _paste_into_grid(buffer: np.ndarray, values: np.ndarray, start: np.ndarray) -> None:
    """Fill ``buffer`` with -inf, then copy ``values`` (placed at ``start``, clipped) into it."""
    buffer.fill(-np.inf)
    low = np.maximum(start, 0)
    high = np.minimum(start + np.array(values.shape), buffer.shape)
    if np.any(high <= low):
        return
    dst = tuple(slice(a, b) for a, b in zip(low, high))
    src = tuple(slice(a - s, b - s) for a, b, s in zip(low, high, start))
    buffer[dst] = values[src]


class CaseData:
    """The loaded image and label of a case, with the lazily built pieces the placements need."""

    def __init__(self, case: ds.Case, runner: ModelRunner, protocol: str,
                 nsd_tolerance_mm: Optional[float] = None, label=None) -> None:
        from ..geometry import Volume

        self.case = case
        self.runner = runner
        self.protocol = protocol
        self.nsd_tolerance_mm = nsd_tolerance_mm
        self.volume, self.labels, self.resampled = ds.load_case(case, label)  # label: case.label already read
        self.volume.validate()
        self.label_volume = Volume(self.labels, self.volume.ijk_to_ras)
        self._grid = self._label_grid = None
        self._sessions = {}  # grow (bool) -> InteractiveSession
        self._reference_surface = None  # (weak reference to a mask, its Surface): the structure scored last

    def grid(self):
        """The whole volume on the model grid (1.5 mm, canonical order) and the labels resampled onto it."""
        if self._grid is None:
            from ..geometry import canonical_grid, extract_label

            self._grid = canonical_grid(self.volume, self.runner.spacing)
            self._label_grid = extract_label(self.label_volume, self._grid)
        return self._grid, self._label_grid

    def nsd(self, region, mask: np.ndarray, reference: np.ndarray) -> float:
        """NSD on the source grid of a prediction inside ``region`` (NaN when no tolerance is set)."""
        if self.nsd_tolerance_mm is None:
            return float("nan")
        spacing_kji = self.volume.spacing[::-1]
        if self._reference_surface is None or self._reference_surface[0]() is not reference:
            import weakref

            from .surfaces import Surface

            # once per structure; the weak reference does not keep a structure's mask alive after it is done
            self._reference_surface = (weakref.ref(reference), Surface.of(reference, spacing_kji))
        return nsd_in_region(region, mask, reference, spacing_kji, self.nsd_tolerance_mm,
                             self._reference_surface[1])

    def session(self, grow: bool = False):
        """An interactive session on this volume with the protocol's prompting mode, made once; ``grow``: the
        session that grows over several regions (:mod:`FastSAM3DLib.growth`, default settings), a separate one."""
        grow = bool(grow)
        if grow not in self._sessions:
            from ..session import InteractiveSession

            self._sessions[grow] = InteractiveSession(self.runner.model, self.volume, PROMPT_MODES[self.protocol],
                                                      grow=grow)
        return self._sessions[grow]


def click_fields(point_ras, label) -> Dict:
    """The click columns of a result row: RAS position and label, NaN and -1 for a row without a click."""
    if point_ras is None:
        return {"click_r": float("nan"), "click_a": float("nan"), "click_s": float("nan"), "click_label": -1}
    r, a, s = (float(v) for v in point_ras)
    return {"click_r": r, "click_a": a, "click_s": s, "click_label": int(label)}


def unclicked_row(meta: Dict, index: int, previous: Dict) -> Dict:
    """The row of click ``index`` when the protocol places none (the prediction it sees is perfect): the metrics
    stay ``previous``, nothing is encoded, no time is spent."""
    return {**meta, "click": index + 1, **click_fields(None, None), **previous, "encoded": 0, "time_s": 0.0}


def _run_gt_placement(data: CaseData, value: int, mask: np.ndarray, voxels: int, clicks: int,
                      rng: np.random.Generator, meta: Dict):
    """The official protocol on the ground-truth-centred crop; returns (rows, final source-grid mask)."""
    from ..geometry import extract_label, extract_model_input, paste_back, roi_centred_on_mask

    runner, protocol = data.runner, data.protocol
    roi = roi_centred_on_mask(data.volume, mask, runner.size, runner.spacing)
    truth = extract_label(data.label_volume, roi) == value
    if not truth.any():
        raise CaseSkipped(ds.empty_crop_reason(data.volume, mask, runner.size, runner.spacing))
    start = time.perf_counter()
    embedding = runner.encode(extract_model_input(data.volume, roi))
    encode_time = time.perf_counter() - start
    points, labels, rows = [], [], []
    low = up = None
    previous = dict(NO_PREDICTION)
    region = full = None
    for index in range(clicks):
        click = next_protocol_click(protocol, index, truth, up, rng)
        if click is None:  # the prediction the generator sees is perfect: nothing to click, nothing changes
            rows.append(unclicked_row(meta, index, previous))
            continue
        point, label = click
        points.append(point)
        labels.append(label)
        fed = slice(-1, None) if PROMPT_MODES[protocol] == "newest" else slice(None)
        start = time.perf_counter()
        low, pred_iou = runner.decode(embedding, np.stack(points[fed]), labels[fed], low)
        up = upsample_logits(low, runner.size)
        region, full = paste_back(data.volume, roi, up)
        spent = time.perf_counter() - start + (encode_time if index == 0 else 0.0)
        dice_crop, iou_crop = dice_iou(up > 0, truth)
        dice_full, iou_full = dice_iou_in_region(region, full, mask, voxels)
        previous = {"dice_crop": dice_crop, "iou_crop": iou_crop, "dice_full": dice_full, "iou_full": iou_full,
                    "nsd_full": data.nsd(region, full, mask), "pred_iou": pred_iou}
        rows.append({**meta, "click": index + 1, **click_fields(roi.model_to_ras_points(point), label), **previous,
                     "encoded": int(index == 0), "time_s": spent})
    final = np.zeros(data.volume.shape, dtype=bool)
    if region is not None:
        final[region] = full
    return rows, final


def _run_click_placement(data: CaseData, value: int, mask: np.ndarray, voxels: int, clicks: int,
                         rng: np.random.Generator, meta: Dict):
    """The interactive session driven by simulated clicks; returns (rows, final source-grid mask)."""
    from ..geometry import extract_label

    runner, protocol = data.runner, data.protocol
    grid, label_grid = data.grid()
    truth = label_grid == value
    if not truth.any():
        raise CaseSkipped("not on the model grid: the structure has no voxel after nearest-neighbour resampling to "
                    f"{runner.spacing} mm (too thin or small)")
    session = data.session()
    session.reset()
    field = np.empty(grid.size, dtype=np.float32)
    have_logits = False
    crops: Dict = {}
    rows, result = [], None
    previous = dict(NO_PREDICTION)
    for index in range(clicks):
        click = next_protocol_click(protocol, index, truth, field if have_logits else None, rng)
        if click is None:
            rows.append(unclicked_row(meta, index, previous))
            continue
        point, label = click
        ras = grid.model_to_ras_points(point)
        start = time.perf_counter()
        result = session.add_click(ras, include=bool(label))
        spent = time.perf_counter() - start
        roi = session.roi
        up = upsample_logits(_session_logits(session), runner.size)
        _paste_into_grid(field, up, _offset_in_grid(roi, grid))
        have_logits = True
        if roi not in crops:
            crops[roi] = extract_label(data.label_volume, roi) == value
        dice_crop, iou_crop = dice_iou(up > 0, crops[roi])
        dice_full, iou_full = dice_iou_in_region(result.region, result.mask, mask, voxels)
        previous = {"dice_crop": dice_crop, "iou_crop": iou_crop, "dice_full": dice_full, "iou_full": iou_full,
                    "nsd_full": data.nsd(result.region, result.mask, mask), "pred_iou": float(result.iou),
                    "recall_full": float(np.count_nonzero(result.mask & (mask[result.region] != 0)) / voxels)}
        rows.append({**meta, "click": index + 1, **click_fields(ras, label), **previous,
                     "encoded": int(result.encoded), "time_s": spent})
    final = session.full_mask(result) if result is not None else np.zeros(data.volume.shape, dtype=bool)
    return rows, final


def _run_grow_placement(*args):
    """The interactive session with growth (:func:`.growing.run_grow_placement`)."""
    from .growing import run_grow_placement

    return run_grow_placement(*args)


_RUNNERS = {"gt": _run_gt_placement, "click": _run_click_placement, "grow": _run_grow_placement}


def run_placement(placement: str, data: CaseData, value: int, mask: np.ndarray, voxels: int, clicks: int,
                  rng: np.random.Generator, meta: Dict):
    """Evaluate the structure ``value`` (``mask`` on the source grid, ``voxels`` of it) of ``data`` with
    ``clicks`` simulated clicks in the placement ``placement``; returns (result rows, final source-grid mask).
    Raises :class:`CaseSkipped` with the reason when the structure cannot be evaluated there."""
    return _RUNNERS[placement](data, value, mask, voxels, clicks, rng, meta)
