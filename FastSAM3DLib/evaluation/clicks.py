"""Simulated clicks, as the official FastSAM3D and SAM-Med3D evaluations (and training) and the CVPR 2025
interactive 3D challenge generate them.

All arrays are boolean volumes in the model's (x, y, z) voxel order; a click is ``(point (3,), label)`` with
``label`` 1 (include, placed in a false negative) or 0 (exclude, placed in a false positive). Every function
takes a ``numpy.random.Generator`` so runs are seeded and reproducible.

* :func:`interior_click` ("ritm", FastSAM3D's clicks 1 and 2): the error region (FN or FP) whose deepest voxel is
  farthest from its border wins; the click is uniform among its voxels deeper than half that depth. On the first
  click (empty prediction) this is a voxel near the centre of the object.
* :func:`random_error_click` (FastSAM3D from click 3 on, SAM-Med3D always, training): uniform over FN ∪ FP.
* :func:`random_object_click` (SAM-Med3D's first click): uniform over the object.
* :func:`largest_error_click` (the CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image
  Segmentation" challenge, ``CVPR25_iter_eval.py``, every click): in the largest 26-connected component of the
  errors (FN and FP together), the voxel farthest from the component's border (Euclidean distance in voxels;
  uniform among ties); include when the reference holds it, else exclude.

Every click is computed on the bounding box of truth ∪ prediction (:func:`error_box`, grown by one voxel for the
distance transforms): outside it there is no error, so the distances, components, ties, candidate lists and
random choices are those of the whole volume (the chosen voxel is the same), at a cost that follows the
structure, not the volume.
"""
from typing import Optional, Tuple

import numpy as np

Click = Tuple[np.ndarray, int]


def _distance_inside(region: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels) of each region voxel to the nearest non-region voxel, outside counted as such."""
    try:
        import edt
    except ImportError as exc:  # pragma: no cover - edt is in the evaluation/training requirements
        raise ImportError("simulated 'interior' clicks need the 'edt' package: pip install edt") from exc
    return edt.edt(np.ascontiguousarray(region, dtype=np.uint8), black_border=True)


def _errors(truth: np.ndarray, prediction: np.ndarray):
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    return truth & ~prediction, ~truth & prediction


def _nonzero_span(mask: np.ndarray, axis: int) -> Optional[Tuple[int, int]]:
    """First and last index along ``axis`` of the nonzero voxels of ``mask``; ``None`` when it has none."""
    hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
    return (int(hits[0]), int(hits[-1])) if len(hits) else None


def error_box(*masks: np.ndarray, margin: int = 1) -> Optional[Tuple[slice, ...]]:
    """Slices of the bounding box of the union of ``masks`` (truth, prediction: their nonzero voxels, on one
    grid) grown by ``margin`` voxels and clipped to the volume; ``None`` when all are empty (then no error).

    Every error (FN or FP) lies inside the box, so inside it an error region's distance to its nearest non-error
    voxel (the crop's border counted as one, as the volume's border is with ``black_border``) and its connected
    components are those of the whole volume; a margin of one voxel makes the crop's border background.
    """
    masks = [np.asarray(mask) for mask in masks]
    box = []
    for axis, size in enumerate(masks[0].shape):
        spans = [s for s in (_nonzero_span(mask, axis) for mask in masks) if s is not None]
        if not spans:
            return None
        low, high = min(s[0] for s in spans), max(s[1] for s in spans)
        box.append(slice(max(low - margin, 0), min(high + 1 + margin, size)))
    return tuple(box)


def _box_start(box: Tuple[slice, ...]) -> np.ndarray:
    return np.array([s.start for s in box], dtype=np.int64)


def _on_error_box(truth, prediction, margin: int = 1):
    """``(box, truth[box], prediction[box])`` on :func:`error_box` (grown by ``margin``), or None when both are
    empty; ValueError when their shapes differ."""
    truth, prediction = np.asarray(truth), np.asarray(prediction)
    if truth.shape != prediction.shape:
        raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} differ in shape")
    box = error_box(truth, prediction, margin=margin)
    return None if box is None else (box, truth[box], prediction[box])


def interior_click(truth: np.ndarray, prediction: np.ndarray, rng: np.random.Generator) -> Optional[Click]:
    """The official "ritm" click; ``None`` when the prediction is perfect.

    Computed on :func:`error_box` (the same voxel as on the whole volume: the candidates are error voxels, all in
    the box, listed in the same order).
    """
    boxed = _on_error_box(truth, prediction)
    if boxed is None:
        return None
    box, truth, prediction = boxed
    false_neg, false_pos = _errors(truth, prediction)
    if not false_neg.any() and not false_pos.any():
        return None
    dist_fn, dist_fp = _distance_inside(false_neg), _distance_inside(false_pos)
    use_fn = bool(dist_fn.max() > dist_fp.max())  # strictly, as the official code: a tie clicks the false positive
    dist = dist_fn if use_fn else dist_fp
    candidates = np.argwhere(dist > dist.max() / 2.0)
    point = candidates[rng.integers(len(candidates))] + _box_start(box)
    return point.astype(np.float64), int(use_fn)


def random_error_click(truth: np.ndarray, prediction: np.ndarray, rng: np.random.Generator) -> Optional[Click]:
    """A uniformly random voxel of FN ∪ FP, labelled include if it is a false negative; ``None`` if no error.

    Listed on :func:`error_box` (the errors in the same order as on the whole volume: the same voxel).
    """
    boxed = _on_error_box(truth, prediction, margin=0)
    if boxed is None:
        return None
    box, truth, prediction = boxed
    false_neg, false_pos = _errors(truth, prediction)
    candidates = np.argwhere(false_neg | false_pos)
    if len(candidates) == 0:
        return None
    point = candidates[rng.integers(len(candidates))]
    return (point + _box_start(box)).astype(np.float64), int(false_neg[tuple(point)])


def random_object_click(truth: np.ndarray, rng: np.random.Generator) -> Optional[Click]:
    """A uniformly random voxel of the object (include); ``None`` for an empty object.

    Listed on the object's bounding box (its voxels in the same order as on the whole volume: the same voxel).
    """
    truth = np.asarray(truth)
    box = error_box(truth, margin=0)
    if box is None:
        return None
    candidates = np.argwhere(truth[box].astype(bool))
    if len(candidates) == 0:
        return None
    return (candidates[rng.integers(len(candidates))] + _box_start(box)).astype(np.float64), 1


def _largest_component(region: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean volume (the lowest label on equal sizes)."""
    try:
        from scipy import ndimage
    except ImportError as exc:  # pragma: no cover - scipy comes with Slicer and the evaluation requirements
        raise ImportError("the cvpr25 click protocol needs scipy: pip install scipy") from exc
    labels, count = ndimage.label(region, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def largest_error_click(truth: np.ndarray, prediction: np.ndarray, rng: np.random.Generator) -> Optional[Click]:
    """The CVPR 2025 challenge click (module docstring); ``None`` when the prediction is perfect.

    Computed on :func:`error_box`: the components (numbered in scan order, which the box keeps), the distances
    and the ties are those of the whole volume, so the voxel is the same.
    """
    boxed = _on_error_box(truth, prediction)
    if boxed is None:
        return None
    box, truth, prediction = boxed
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    errors = truth != prediction
    if not errors.any():
        return None
    component = _largest_component(errors)
    dist = _distance_inside(component)
    candidates = np.argwhere(dist == dist.max())
    point = candidates[rng.integers(len(candidates))]
    return (point + _box_start(box)).astype(np.float64), int(truth[tuple(point)])


def protocol_click(protocol: str, index: int, truth: np.ndarray, prediction: np.ndarray,
                   rng: np.random.Generator) -> Optional[Click]:
    """Click number ``index`` (0-based) of an official protocol: ``"fastsam3d"`` or ``"sam-med3d"``."""
    if protocol == "fastsam3d":
        return (interior_click if index < 2 else random_error_click)(truth, prediction, rng)
    if protocol == "sam-med3d":
        return random_object_click(truth, rng) if index == 0 else random_error_click(truth, prediction, rng)
    if protocol == "cvpr25":
        return largest_error_click(truth, prediction, rng)
    raise ValueError(f"unknown click protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


# How each protocol turns the model's output into the "prediction" its click generator sees, and which clicks
# it feeds to the model. (Additions for the evaluation loop; the click functions above are unchanged.)

CLICK_THRESHOLDS = {"fastsam3d": 0.5, "sam-med3d": 0.0, "cvpr25": 0.0}
#: cvpr25: the challenge hands every click so far (and the previous prediction) to the model
PROMPT_MODES = {"fastsam3d": "newest", "sam-med3d": "all", "cvpr25": "all"}
PROTOCOLS = tuple(PROMPT_MODES)


def prediction_for_clicks(protocol: str, upsampled_logits: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """The mask the protocol's click generator treats as the current prediction.

    ``upsampled_logits``: the model's logits on the 128^3 grid (trilinear upsampling of the 32^3 output), or
    ``None`` before the first click (then the prediction is empty, as the official zeros mask input gives).

    Quirk reproduced on purpose: FastSAM3D's official click generators (``utils/click_method.py``,
    ``mask_threshold = 0.5``) compare the upsampled **logits** with 0.5, not with 0, so voxels with logits in
    (0, 0.5] count as background for the next click although they belong to the reported prediction
    (``sigmoid > 0.5``, i.e. logits > 0). SAM-Med3D's generator thresholds ``sigmoid(logits) > 0.5`` (logits
    > 0), consistent with its reported prediction. See reference/PIPELINE.md §8.
    """
    try:
        threshold = CLICK_THRESHOLDS[protocol]
    except KeyError:
        raise ValueError(f"unknown click protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}") from None
    if upsampled_logits is None:
        return None
    return np.asarray(upsampled_logits) > threshold


def next_protocol_click(protocol: str, index: int, truth: np.ndarray, upsampled_logits: Optional[np.ndarray],
                        rng: np.random.Generator) -> Optional[Click]:
    """Click number ``index`` (0-based) of ``protocol`` given the model's current upsampled logits (or None).

    :func:`prediction_for_clicks` (with FastSAM3D's 0.5 threshold quirk) followed by :func:`protocol_click`;
    ``None`` when the prediction the generator sees has no error.
    """
    prediction = prediction_for_clicks(protocol, upsampled_logits)
    if prediction is None:
        prediction = np.zeros(np.shape(truth), dtype=bool)
    return protocol_click(protocol, index, truth, prediction, rng)
