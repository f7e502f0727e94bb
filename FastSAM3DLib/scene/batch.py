"""Batch use from the Slicer Python console: one call segments a volume node from clicks."""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import PromptError, FastSAM3DError
from ..geometry import Volume
from .nodes import volume_from_node
from .target_checks import check_target, checked_mask, checked_region
from .writing import write_region

MODEL_TAG = "FastSAM3D.Model"  # segment tag recording which model wrote the segment


Predictor = Callable[[Volume, np.ndarray, np.ndarray], object]


def _segment_named(segmentation, name: str) -> str:
    """The ID of the segment called exactly ``name`` ("" if none); Slicer's own lookup ignores case, so
    ``"liver"`` would write into a user's "Liver"."""
    for index in range(segmentation.GetNumberOfSegments()):
        if segmentation.GetNthSegment(index).GetName() == name:
            return segmentation.GetNthSegmentID(index)
    return ""


def slicer_cache_dir() -> Optional[str]:
    """Where Slicer keeps FastSAM3D's downloaded weights (a folder in its cache folder, Application settings),
    or None outside a Slicer application. The effect, the module and these console calls share it."""
    import slicer

    app = getattr(slicer, "app", None)
    path = getattr(app, "cachePath", None) if app is not None else None
    return os.path.join(path, "FastSAM3D") if path else None


def _weights_dir(cache_dir):
    """``cache_dir``, or Slicer's weights folder when None inside Slicer (the library's default elsewhere)."""
    return cache_dir if cache_dir is not None else slicer_cache_dir()


def segment_volume_node(volume_node, points_ras, labels=None, segmentation_node=None,
                        segment_name: str = "FastSAM3D", model: Optional[str] = None,
                        predictor: Optional[Predictor] = None, editor_settings=None, device: str = "auto",
                        cache_dir=None, grow=None):
    """Segment one object of ``volume_node`` from clicks and write it into a segment; returns (node, segment ID).

    ``points_ras``: (N, 3) world RAS clicks in the order a user would click them (the first must be an include
    point); ``labels``: N values, 1 = include, 0 = exclude (default: all include). ``segmentation_node``:
    where to write (default: a new segmentation named after the volume); the segment named ``segment_name`` is
    reused if it exists, else added. ``predictor(volume, points_ras, labels)`` returns ``(region, mask)`` (or an
    object with ``.region`` and ``.mask``); the default runs ``model`` (default: the first model whose weights
    are ready, offline the bundled demo, as the effect offers) on ``device`` ("auto", "cuda", "cpu",
    "mps") with an :class:`~FastSAM3DLib.session.InteractiveSession` and the model's weights (bundled, or
    verified in the weights cache ``cache_dir``; default: Slicer's, where the effect downloads them, or outside
    Slicer the platform cache folder); ``grow`` (True, or a
    :class:`~FastSAM3DLib.growth.GrowthSettings`; False: one 128^3 region; None, the default: the model's own
    default, :func:`~FastSAM3DLib.growth.default_for`) keeps every clicked region and grows the segment past
    region faces, for objects larger than 192 mm. ``editor_settings``: see
    :func:`write_region` (default: the Segment Editor's defaults, so voxels the result takes are removed from
    other segments; pass ``EditorSettings(overwrite="none")`` to keep them). The segment's tag
    :data:`MODEL_TAG` records ``model``, or the predictor's ``model_name`` attribute, else "custom predictor".
    A failure leaves the scene as it was. Example for the Slicer Python console::

        from FastSAM3DLib.scene import segment_volume_node
        clicks = {"CTChest": [[-40.0, 20.0, -110.0]], "CTLiver": [[-60.0, 15.0, 30.0]]}
        for name, points in clicks.items():
            volume = slicer.util.getNode(name)
            segmentation, segment_id = segment_volume_node(volume, points, segment_name="lesion")
            slicer.util.saveNode(segmentation, f"/tmp/{name}.seg.nrrd")
    """
    try:
        points = np.asarray(points_ras, dtype=np.float64)
    except (TypeError, ValueError):
        raise PromptError("points_ras must be N x 3 finite RAS coordinates (numbers), e.g. [[12.5, -30.0, 40.0]]."
                          ) from None
    if points.ndim == 1 and points.size == 3:
        points = points[None]
    if points.size == 0:
        raise PromptError("No points were given (an empty list, or a point list without placed points): give at "
                          "least one include point inside the object, e.g. [[12.5, -30.0, 40.0]].")
    if points.ndim != 2 or points.shape[1] != 3 or not np.all(np.isfinite(points)):
        raise PromptError(f"points_ras must be N x 3 finite RAS coordinates (got shape {points.shape}).")
    try:
        labels = np.ones(len(points), np.int64) if labels is None else np.asarray(labels).astype(np.int64).ravel()
    except (TypeError, ValueError):
        raise PromptError("labels must hold one 1 (include) or 0 (exclude) per point.") from None
    if labels.shape != (len(points),) or not np.isin(labels, (0, 1)).all():
        raise PromptError("labels must hold one 1 (include) or 0 (exclude) per point.")
    if not labels.any():
        raise PromptError("Give at least one include point (label 1) inside the object.")
    volume = volume_from_node(volume_node)
    if segmentation_node is not None:
        check_target(segmentation_node, editor_settings)  # before the model runs (seconds), not after
    cache_dir = _weights_dir(cache_dir)
    if predictor is None and model is None:
        from ..weights import preferred_model

        model = preferred_model(cache_dir)
    predict = predictor or session_predictor(model, device=device, cache_dir=cache_dir, grow=grow)
    result = predict(volume, points, labels)
    region, mask = (result.region, result.mask) if hasattr(result, "region") else tuple(result)[:2]
    checked_mask(mask, checked_region(region, volume.shape[::-1]))  # a bad result adds nothing to the scene

    scene = volume_node.GetScene()
    created_node = segmentation_node is None
    if created_node:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                    scene.GenerateUniqueName(f"{volume_node.GetName()} FastSAM3D"))
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    segment_id = _segment_named(segmentation, segment_name)
    created_segment = not segment_id
    try:
        if created_segment:
            segment_id = segmentation.AddEmptySegment("", segment_name)
            segment = segmentation.GetSegment(segment_id)
            segment.SetNameAutoGenerated(False)
        write_region(segmentation_node, segment_id, volume_node, region, mask, editor_settings)
        tag = model if predictor is None else getattr(predictor, "model_name", None) or "custom predictor"
        segmentation.GetSegment(segment_id).SetTag(MODEL_TAG, tag)
    except BaseException:
        if created_node:
            _remove_with_display_nodes(scene, segmentation_node)
        elif created_segment and segment_id:
            segmentation.RemoveSegment(segment_id)
        raise
    return segmentation_node, segment_id


def _remove_with_display_nodes(scene, node) -> None:
    display_nodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    scene.RemoveNode(node)
    for display_node in display_nodes:
        if display_node is not None and display_node.GetScene() is not None:
            scene.RemoveNode(display_node)


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" if available, else "mps" if available, else "cpu"; other names are returned checked."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FastSAM3DError("CUDA was requested but this PyTorch has no usable CUDA GPU. Choose 'auto' or "
                             "'cpu', or reinstall PyTorch with CUDA support (PyTorch Util module).")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise FastSAM3DError("Apple MPS was requested but is not available here. Choose 'auto' or 'cpu'.")
    return device


def load_model(model: str = "fastsam3d", device: str = "cpu", checkpoint: str = "cached", cache_dir=None,
               precision: Optional[str] = None, memory_bank=None):
    """Build ``model`` on ``device`` (a resolved name, see :func:`resolve_device`) with its weights.

    ``checkpoint="cached"``: the bundled weights, or the verified download in the weights cache ``cache_dir``
    (default: Slicer's weights folder inside Slicer, :func:`slicer_cache_dir`). The last two models built are kept,
    so a loop over volumes or a series of clicks loads the weights once. ``precision``: see
    :func:`~FastSAM3DLib.registry.build_model`. ``memory_bank``: a Memorizing SAM bank file attached to the
    model; a model with another bank (or none) is another model, so a session never sees its model's bank
    change because another caller wanted a different one. A bank or checkpoint file rewritten since (same
    path, other size or time) is loaded again; one deleted since is an error, as for a first load.
    """
    cache_dir = _weights_dir(cache_dir)
    bank = _file_key(memory_bank) if memory_bank else None
    if checkpoint not in ("cached", None) and os.path.exists(os.fspath(checkpoint)):
        checkpoint = _file_key(checkpoint)
    return _cached_model(model, device, checkpoint, cache_dir, precision, bank)


def _file_key(path) -> tuple:
    """(real path, size, modification time in ns) of a file; (real path, None, None) when it is missing."""
    real = os.path.realpath(os.fspath(path))
    try:
        info = os.stat(real)
    except OSError:
        return real, None, None
    return real, info.st_size, info.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _cached_model(model: str, device: str, checkpoint, cache_dir, precision: Optional[str],
                  memory_bank: Optional[tuple]):
    """:func:`load_model`'s cache: one key however the arguments were passed (files by their path, size and
    modification time)."""
    from ..registry import build_model

    if isinstance(checkpoint, tuple):
        checkpoint = checkpoint[0]
    return build_model(model, checkpoint=checkpoint, device=device, cache_dir=cache_dir, precision=precision,
                       memory=memory_bank[0] if memory_bank else None)


def session_predictor(model: str = "fastsam3d", device: str = "auto", prompt_mode: Optional[str] = None,
                      checkpoint: str = "cached", cache_dir=None, grow=None) -> Predictor:
    """The default predictor: a fresh :class:`InteractiveSession` per volume, clicks fed in order.

    ``grow``: the session's growth (True: default settings; False: one region; a GrowthSettings; None: the
    model's default, :func:`~FastSAM3DLib.growth.default_for`).

    The model is built once and kept for the next call with the same model and device.
    """

    def predict(volume: Volume, points_ras: Sequence, labels: Sequence):
        from ..growth import default_for
        from ..session import InteractiveSession

        session = InteractiveSession(load_model(model, resolve_device(device), checkpoint, cache_dir), volume,
                                     prompt_mode=prompt_mode, grow=default_for(model) if grow is None else grow)
        return replay_clicks(session, points_ras, labels)

    predict.model_name = model
    return predict


def replay_clicks(session, points_ras, labels, progress=None):
    """Bring an :class:`~FastSAM3DLib.session.InteractiveSession` to exactly these clicks; return the last result.

    The point list is the user's record of the clicks: one more point than the session knows is a new click
    (``add_click``), one fewer is an undone click (``undo``); any other difference (points edited or removed
    elsewhere, a new session) resets the session and feeds every point again, in order; if one of them fails,
    the session is restored to the clicks it had before the call. Returns None when nothing had to change or no
    point is left (then the session is empty). ``progress``: passed to
    ``add_click`` of a session with growth (see :meth:`~FastSAM3DLib.session.InteractiveSession.add_click`).
    """
    extra = {"progress": progress} if progress is not None and getattr(session, "growth", None) else {}
    wanted = [(np.asarray(p, dtype=np.float64).reshape(3), bool(label))
              for p, label in zip(np.asarray(points_ras, dtype=np.float64).reshape(-1, 3), labels)]
    known = [(np.asarray(c.ras, dtype=np.float64), bool(c.include)) for c in session.clicks]

    def same(a, b):
        return len(a) == len(b) and all(x[1] == y[1] and np.allclose(x[0], y[0], atol=1e-6) for x, y in zip(a, b))

    if same(known, wanted):
        return None
    if len(known) == len(wanted) + 1 and same(known[:-1], wanted):
        return session.undo()
    if len(known) + 1 == len(wanted) and same(known, wanted[:-1]):
        return session.add_click(wanted[-1][0], include=wanted[-1][1], **extra)
    saved = session.checkpoint()
    try:  # all or nothing: a point that fails leaves the session at the clicks it had, as each single click does
        session.reset()
        result = None
        for ras, include in wanted:
            result = session.add_click(ras, include=include, **extra)
    except BaseException:
        session.restore(saved)
        raise
    return result
