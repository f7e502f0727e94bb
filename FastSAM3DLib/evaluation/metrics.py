"""Overlap metrics (Dice, IoU) and their per-click aggregates, exactly as the official evaluations define them.

Dice = 2|A∩B| / (|A| + |B|) and IoU = |A∩B| / |A∪B| on boolean masks; both are NaN when both masks are empty
(``utils/metric_utils`` of SAM-Med3D and ``validation_student.py`` of FastSAM3D do the same). Aggregates ignore
NaN values (``nanmean``/``nanmax``) and are NaN when every value is NaN.
"""
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

# "Mean Dice after k clicks" is reported for these k (those not above the number of clicks simulated).
REPORTED_CLICKS = (1, 3, 5, 10)


def overlap_from_counts(intersection: int, predicted: int, reference: int) -> Tuple[float, float]:
    """(Dice, IoU) from the voxel counts |A∩B|, |A|, |B|; (NaN, NaN) when both masks are empty."""
    intersection, predicted, reference = int(intersection), int(predicted), int(reference)
    if intersection < 0 or intersection > min(predicted, reference):
        raise ValueError(f"inconsistent counts: |A∩B|={intersection}, |A|={predicted}, |B|={reference}")
    total = predicted + reference
    if total == 0:
        return float("nan"), float("nan")
    return 2.0 * intersection / total, intersection / (total - intersection)


def dice_iou(prediction: np.ndarray, reference: np.ndarray) -> Tuple[float, float]:
    """(Dice, IoU) of two boolean (or nonzero = object) masks of the same shape; NaN when both are empty."""
    prediction, reference = np.asarray(prediction) != 0, np.asarray(reference) != 0
    if prediction.shape != reference.shape:
        raise ValueError(f"mask shapes differ: {prediction.shape} vs {reference.shape}")
    return overlap_from_counts(np.count_nonzero(prediction & reference), np.count_nonzero(prediction),
                               np.count_nonzero(reference))


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient 2|A∩B|/(|A|+|B|); NaN when both masks are empty."""
    return dice_iou(prediction, reference)[0]


def iou(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union |A∩B|/|A∪B|; NaN when both masks are empty."""
    return dice_iou(prediction, reference)[1]


def dice_iou_in_region(region, mask: np.ndarray, reference: np.ndarray,
                       reference_count: int = None) -> Tuple[float, float]:
    """(Dice, IoU) of a prediction given as ``mask`` inside ``region`` (slices of ``reference``), False elsewhere.

    This is how predictions come back from :func:`FastSAM3DLib.geometry.paste_back` and the session; it avoids
    building a whole-volume mask. ``reference_count`` (|B|) may be passed when already known.
    """
    mask = np.asarray(mask, dtype=bool)
    inside = np.asarray(reference[tuple(region)]) != 0
    if inside.shape != mask.shape:
        raise ValueError(f"region of shape {inside.shape} does not match the mask's {mask.shape}")
    if reference_count is None:
        reference_count = np.count_nonzero(reference)
    return overlap_from_counts(np.count_nonzero(mask & inside), np.count_nonzero(mask), reference_count)


def _nan_stat(values, function) -> float:
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0 or np.all(np.isnan(values)):
        return float("nan")
    return float(function(values))


def nan_mean(values: Iterable[float]) -> float:
    """Mean ignoring NaN; NaN for no values or only NaN."""
    return _nan_stat(values, np.nanmean)


def nan_max(values: Iterable[float]) -> float:
    """Maximum ignoring NaN; NaN for no values or only NaN."""
    return _nan_stat(values, np.nanmax)


def click_curve_summary(curves: Sequence[Sequence[float]], clicks: int) -> Dict[str, float]:
    """Means over structures of one metric's per-click curves (each of length ``clicks``).

    Returns ``after_k`` (mean value after click k, for k in :data:`REPORTED_CLICKS` up to ``clicks``), ``last``
    (after the last click: what a user ends with) and ``max`` (mean of each curve's maximum over clicks: the
    number the FastSAM3D paper reports as "Dice").
    """
    curves = [list(c) for c in curves]
    for curve in curves:
        if len(curve) != clicks:
            raise ValueError(f"a curve has {len(curve)} values, expected {clicks}")
    out = {f"after_{k}": nan_mean(c[k - 1] for c in curves) for k in REPORTED_CLICKS if k <= clicks}
    out["last"] = nan_mean(c[-1] for c in curves) if clicks else float("nan")
    out["max"] = nan_mean(nan_max(c) for c in curves)
    return out
