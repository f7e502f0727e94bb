"""Overlap metrics (Dice, IoU), the normalised surface Dice, and their per-click aggregates.

Dice = 2|A∩B| / (|A| + |B|) and IoU = |A∩B| / |A∪B| on boolean masks; both are NaN when both masks are empty
(``utils/metric_utils`` of SAM-Med3D and ``validation_student.py`` of FastSAM3D do the same). Aggregates ignore
NaN values (``nanmean``/``nanmax``) and are NaN when every value is NaN.

NSD (normalised surface Dice at a tolerance of τ mm, the CVPR 2025 interactive challenge's second metric, τ =
:data:`NSD_TOLERANCE_MM`) is that of DeepMind's ``surface-distance`` package, the implementation the challenge's
``SurfaceDice.py`` carries (Nikolov et al. 2021), with the distances between the surfaces found as in
:mod:`.surfaces` (the same values, far cheaper on large structures): each mask's surface is cut into surface elements at
the corners between voxels, each weighted by its area (marching-cubes triangles, anisotropic spacing honoured);
NSD = (area of A's surface within τ of B's + area of B's within τ of A's) / (area of A's + area of B's). NaN when
both masks are empty, 0 when exactly one is. (Counting border voxels instead, as this project did until
2026-12, gave values up to 0.48 lower at 3 mm spacing.)
"""
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

# "Mean Dice after k clicks" is reported for these k (those not above the number of clicks simulated).
REPORTED_CLICKS = (1, 3, 5, 10)
#: the CVPR 2025 interactive 3D challenge's NSD tolerance (mm)
NSD_TOLERANCE_MM = 2.0
#: how the NSD is measured, recorded with results (a folder of NSD values measured otherwise is not continued)
NSD_MEASURE = "surface elements (DeepMind surface-distance)"


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


def require_nsd() -> None:
    """Raise :class:`~FastSAM3DLib.errors.FastSAM3DError` saying what to install unless the NSD can be computed
    here (checked before an evaluation starts, not at its first structure)."""
    from ..errors import FastSAM3DError

    from .surfaces import surface_distance_package

    try:
        surface_distance_package()
    except ImportError as exc:
        raise FastSAM3DError(f"{str(exc)[0].upper()}{str(exc)[1:]} (or: pip install -e \".[evaluation]\").") from None


def normalized_surface_dice(prediction: np.ndarray, reference: np.ndarray, spacing,
                            tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """NSD of two boolean masks (module docstring); ``spacing``: mm per voxel along the arrays' three axes.

    Only the masks' surfaces are measured (:mod:`.surfaces`), so a small structure in a large volume is cheap.
    """
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape or prediction.ndim != 3:
        raise ValueError(f"NSD needs two 3D masks of one shape, got {prediction.shape} and {reference.shape}")
    from .surfaces import Surface

    return surface_dice(Surface.of(prediction, spacing), Surface.of(reference, spacing), tolerance_mm)


def nsd_in_region(region, mask: np.ndarray, reference: np.ndarray, spacing,
                  tolerance_mm: float = NSD_TOLERANCE_MM, reference_surface=None) -> float:
    """NSD of a prediction given as ``mask`` inside ``region`` (slices of ``reference``), False elsewhere.

    ``reference_surface``: ``reference``'s :class:`~.surfaces.Surface` when already built (it is the same for
    every prediction scored against that reference).
    """
    from .surfaces import Surface

    region = tuple(region)
    mask = np.asarray(mask)
    inside = np.asarray(reference)[region]
    if mask.shape != inside.shape:
        raise ValueError(f"region of shape {inside.shape} does not match the mask's {mask.shape}")
    if reference_surface is None:
        reference_surface = Surface.of(reference, spacing)
    offset = [r.start or 0 for r in region]
    return surface_dice(Surface.of(mask, spacing, offset), reference_surface, tolerance_mm)


def surface_dice(prediction, reference, tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """NSD of two :class:`~.surfaces.Surface`: NaN when both masks are empty, 0 when exactly one is, otherwise
    ``surface_distance.compute_surface_dice_at_tolerance`` of their distances."""
    if not float(tolerance_mm) >= 0:
        raise ValueError(f"the NSD tolerance must be a number of mm >= 0, got {tolerance_mm}")
    if not len(prediction) and not len(reference):
        return float("nan")
    if not len(prediction) or not len(reference):
        return 0.0
    from .surfaces import surface_distance_package, surface_distances

    distances = surface_distances(reference, prediction)
    return float(surface_distance_package().compute_surface_dice_at_tolerance(distances, float(tolerance_mm)))


def area_under_clicks(values: Sequence[float]) -> float:
    """Area under a per-click curve (trapezoids, one unit per click, as ``sklearn.metrics.auc`` over the
    interaction index in the challenge): from the first value to the last; NaN if any value is NaN."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0 or np.isnan(values).any():
        return float("nan")
    if values.size == 1:
        return 0.0
    return float(((values[1:] + values[:-1]) / 2.0).sum())
