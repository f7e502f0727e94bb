"""The evaluation loop: simulated clicks on every labelled structure, Dice/IoU after each click.

For each case, structure, and *placement* of the 128^3 region of interest (ROI):

* ``"gt"``, the papers' protocol (reference/PIPELINE.md §3, §10): the ROI is torchio's ``CropOrPad`` centred
  on the ground truth's bounding box (:func:`~FastSAM3DLib.geometry.roi_centred_on_mask`); the encoder runs
  once; clicks are simulated on that crop, exactly as ``validation_student.py`` (FastSAM3D) or
  ``validate_paired_img_gt`` (SAM-Med3D) do. It needs the answer to place the box, so it flatters the model.
* ``"click"``, what a user gets: an :class:`~FastSAM3DLib.session.InteractiveSession` is driven with the
  simulated clicks converted to RAS. The session places the ROI around the first click
  (:func:`~FastSAM3DLib.geometry.roi_around`) and moves it, re-encoding, when a click falls outside it. Clicks
  are simulated on the whole volume resampled to the model grid (1.5 mm, canonical RAS order, the grid the
  session's ROIs are cut from), with the prediction there taken from the session's current logits (nothing
  outside the current ROI), so errors anywhere in the structure can be clicked, as a user would.

Click protocols (:mod:`.clicks`): ``"fastsam3d"`` (clicks 1-2 "interior"/ritm, then random error voxels;
only the newest click is fed; the click generator sees upsampled logits > 0.5, the official quirk),
``"sam-med3d"`` (first click a random object voxel, then random errors; all clicks fed) and ``"cvpr25"`` (the
CVPR 2025 interactive 3D challenge: every click at the centre of the largest error component, all clicks fed;
up to 5 clicks; NSD at 2 mm). In all the previous low-res logits are fed back (zeros at the first click).
**cvpr25 deviations**, stated in every summary: the challenge starts from a bounding-box prediction, these
point-prompt models start from the first click (so its area under the click curve spans clicks 1-5, not box +
5 clicks); its clicks are placed on the 128^3 crop (``gt``) or the model grid (``click``), not the image grid.

Per click: Dice and IoU on the 128^3 crop (``*_crop``, model space: the paper's numbers) and on the source grid
after paste-back (``*_full``), the NSD on the source grid when a tolerance is set (``nsd_full``; default for
cvpr25), the model's predicted IoU, and the seconds of the model step. Results are written as they come (see
:mod:`.results`), so a rerun continues an interrupted one.
"""
from __future__ import annotations

import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from .. import interrupts
from ..errors import FastSAM3DError, OutOfMemoryError
from . import dataset as ds
from .clicks import PROMPT_MODES, PROTOCOLS, next_protocol_click
from .metrics import NSD_TOLERANCE_MM, dice_iou, dice_iou_in_region, nsd_in_region, require_nsd
from .results import ResultStore, prediction_path, unit_key
from .summary import summarise, write_summary

PLACEMENTS = ("gt", "click", "grow")  # "grow": the session with growth (.growing)


class CaseSkipped(Exception):
    """A unit that cannot be evaluated; the message is the recorded reason."""


# ------------------------------------------------------------------------------------------------------
# the model, spelled out as the official evaluation calls it


class ModelRunner:
    """Image encoder once, then prompt encoder + mask decoder per click, as ``validation_student.py`` does."""

    def __init__(self, model) -> None:
        self.model = model
        self.size = int(model.config.image_size)
        self.spacing = float(model.config.spacing_mm)

    @property
    def device(self):
        """Device of the model's weights."""
        return next(self.model.parameters()).device

    def encode(self, image_xyz: np.ndarray):
        """Image embedding of a (x, y, z) float32 model input."""
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(image_xyz, dtype=np.float32))[None, None].to(self.device)
        with torch.no_grad():
            return self.model.image_encoder(tensor)

    def decode(self, embedding, points_xyz: np.ndarray, labels: Sequence[int], previous=None):
        """(low-res logits (1, 1, s/4, s/4, s/4), predicted IoU) for the given points and previous logits."""
        import torch

        low = self.size // 4
        with torch.no_grad():
            coords = torch.as_tensor(np.asarray(points_xyz), dtype=torch.float32, device=self.device)[None]
            label_t = torch.as_tensor(list(labels), dtype=torch.int64, device=self.device)[None]
            if previous is None:
                previous = torch.zeros(1, 1, low, low, low, device=self.device)
            prompt, decoder = self.model.prompt_encoder, self.model.mask_decoder
            sparse, dense = prompt(points=(coords, label_t), boxes=None, masks=previous)
            logits, iou = decoder(image_embeddings=embedding, image_pe=prompt.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
        return logits, float(iou[0, 0])


    def warm_up(self) -> None:
        """One encode and decode on a blank input, so that one-off start-up costs do not count in the timings."""
        embedding = self.encode(np.zeros((self.size,) * 3, dtype=np.float32))
        self.decode(embedding, np.full((1, 3), self.size / 2), [1])


def _torch_threads() -> int:
    """PyTorch's CPU thread count (results can differ slightly with it: sums in another order)."""
    import torch

    return int(torch.get_num_threads())


def upsample_logits(low_res, size: int) -> np.ndarray:
    """The official ``F.interpolate(low_res, size, mode="trilinear", align_corners=False)`` as (x, y, z) numpy."""
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(low_res).detach().float()
    while tensor.dim() < 5:
        tensor = tensor[None]
    with torch.no_grad():
        up = F.interpolate(tensor, size=(size, size, size), mode="trilinear", align_corners=False)
    return up[0, 0].cpu().numpy()


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


# ------------------------------------------------------------------------------------------------------
# one case: everything shared by its structures


class _CaseData:
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
        self._grid = self._label_grid = self._session = None
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

    def session(self):
        """An interactive session on this volume with the protocol's prompting mode."""
        if self._session is None:
            from ..session import InteractiveSession

            self._session = InteractiveSession(self.runner.model, self.volume, PROMPT_MODES[self.protocol])
        return self._session


def click_fields(point_ras, label) -> Dict:
    """The click columns of a result row: RAS position and label, NaN and -1 for a row without a click."""
    if point_ras is None:
        return {"click_r": float("nan"), "click_a": float("nan"), "click_s": float("nan"), "click_label": -1}
    r, a, s = (float(v) for v in point_ras)
    return {"click_r": r, "click_a": a, "click_s": s, "click_label": int(label)}


def _run_gt_placement(data: _CaseData, value: int, mask: np.ndarray, voxels: int, clicks: int,
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
    previous = {"dice_crop": float("nan"), "iou_crop": float("nan"), "dice_full": float("nan"),
                "iou_full": float("nan"), "nsd_full": float("nan"), "pred_iou": float("nan")}
    region = full = None
    for index in range(clicks):
        click = next_protocol_click(protocol, index, truth, up, rng)
        if click is None:  # the prediction the generator sees is perfect: nothing to click, nothing changes
            rows.append({**meta, "click": index + 1, **click_fields(None, None), **previous, "encoded": 0,
                         "time_s": 0.0})
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


def _run_click_placement(data: _CaseData, value: int, mask: np.ndarray, voxels: int, clicks: int,
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
    previous = {"dice_crop": float("nan"), "iou_crop": float("nan"), "dice_full": float("nan"),
                "iou_full": float("nan"), "nsd_full": float("nan"), "pred_iou": float("nan")}
    for index in range(clicks):
        click = next_protocol_click(protocol, index, truth, field if have_logits else None, rng)
        if click is None:
            rows.append({**meta, "click": index + 1, **click_fields(None, None), **previous, "encoded": 0,
                         "time_s": 0.0})
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


def unit_rng(seed: int, case: str, value: int, protocol: str, placement: str) -> np.random.Generator:
    """The random generator of one unit: depends only on these, so results do not depend on order or resuming."""
    words = [int(seed) % 2 ** 32, zlib.crc32(case.encode("utf-8")), int(value) % 2 ** 32,
             PROTOCOLS.index(protocol), PLACEMENTS.index("click" if placement == "grow" else placement)]
    return np.random.default_rng(words)


# ------------------------------------------------------------------------------------------------------
# progress


class _Progress:
    """tqdm when installed, else one printed line per finished structure; silent when disabled."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]) -> None:
        self.total, self.count, self.log, self.bar = total, 0, log, None
        self.enabled = enabled
        if enabled and total:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, unit="structure", desc="evaluate", dynamic_ncols=True)

    def done(self, text: str) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.set_postfix_str(text[-60:], refresh=False)
            self.bar.update(1)
        elif self.enabled:
            self.log(f"[{self.count}/{self.total}] {text}")

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------------
# the public entry point


def _placements(placement: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(placement, str):
        placement = ("gt", "click") if placement == "both" else (placement,)
    out = list(dict.fromkeys(placement))
    for p in out:
        if p not in PLACEMENTS:
            raise ValueError(f"unknown placement {p!r}; use 'gt', 'click' or 'both'")
    return out


def resolve_model(model, checkpoint, device, name, attention):
    """(model, name under which results are stored, checkpoint description)."""
    from ..registry import build_model

    if isinstance(model, str):
        if checkpoint == "random":
            built = build_model(model, None, device, attention, seed=0)
            description = "random weights (seed 0)"
        else:
            checkpoint = checkpoint or "cached"
            built = build_model(model, checkpoint=checkpoint, device=device, attention_backend=attention)
            description = "cached" if checkpoint == "cached" else str(Path(checkpoint).resolve())
        return built, name or model, description
    if device is not None:
        model = model.to(device)
    return model.eval(), name or model.config.name, (str(checkpoint) if checkpoint else None)


def _sole_writer(folder: Optional[Path]):
    """Hold the evaluation lock of the output ``folder`` while the block runs (:func:`..sole_writer.sole_writer`):
    two evaluations writing into one folder would each rewrite run.json and skipped.csv from their own view,
    losing the other's records (a checkpoint that would then not be checked); a second one is refused."""
    from ..sole_writer import sole_writer
    from .results import EvaluationStateError

    def refusal(holder: str, lock_path: Path) -> Exception:
        return EvaluationStateError(
            f"Another evaluation is writing into {folder} ({holder}): wait until it has finished, or choose another "
            f"--output folder (if none is running, delete {lock_path}).")

    return sole_writer(folder, ".evaluate.lock", "evaluating into the same folder", refusal)


def evaluate_dataset(pairs, model, output: Optional[Union[str, Path]] = None, *, clicks: Optional[int] = None,
                     protocol: str = "fastsam3d", placement: Union[str, Sequence[str]] = "both",
                     structures: Optional[Sequence[str]] = None, seed: int = 2023, min_voxels: int = 10,
                     checkpoint: Optional[str] = None, device: Optional[str] = None, name: Optional[str] = None,
                     attention: Optional[str] = None, save_predictions: bool = True, plots: bool = True,
                     progress: bool = True, log: Callable[[str], None] = print,
                     nsd_tolerance_mm: Optional[float] = None,
                     on_unit: Optional[Callable[[Dict], None]] = None,
                     on_unit_done: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Evaluate ``model`` with simulated clicks on every structure of ``pairs``; return the summary dict.

    ``pairs``: a folder, a manifest, :class:`~.dataset.Case` objects or ``(image, label)`` tuples (see
    :func:`~.dataset.as_cases`). ``model``: a built model (``registry.build_model``) or a registered name, then
    built from ``checkpoint`` (a path, ``"cached"`` (default) or ``"random"`` for seeded random weights) on
    ``device``. ``output``: results folder (``results.csv``, ``skipped.csv``, ``summary.json``, PNG plots,
    ``predictions/``); an existing one is continued, units already there are skipped. ``None`` keeps everything
    in memory (no plots, no resuming). ``placement``: ``"gt"``, ``"click"`` or ``"both"``. ``structures``:
    label values or names (wildcards allowed) to evaluate instead of all; a case's own list wins.
    ``min_voxels``: structures with fewer voxels on the source grid are skipped (recorded with the reason).
    ``name``: the model's name in the results (default: the model name), to compare checkpoints in one folder.
    ``clicks``: per structure (default 5 for ``protocol="cvpr25"``, the challenge's budget, else 10).
    ``nsd_tolerance_mm``: compute the NSD at this tolerance after every click (default: 2 mm for cvpr25, none
    otherwise: it costs a distance transform around the structure per click). ``on_unit``: called with each
    structure's description (model, case, structure, value, voxels, placement, protocol) before its clicks run;
    ``on_unit_done`` with the same once its clicks are done, just before its rows are written (a Ctrl+C waits
    until both are done; what it records of a structure whose rows are missing belongs to an unfinished one).

    The summary is that of :func:`.summary.summarise` over every row in the folder (all models), plus
    ``runtime`` for this call.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown click protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if clicks is None:
        clicks = 5 if protocol == "cvpr25" else 10
    if int(clicks) < 1:
        raise ValueError("clicks must be at least 1")
    if nsd_tolerance_mm is None and protocol == "cvpr25":
        nsd_tolerance_mm = NSD_TOLERANCE_MM
    if nsd_tolerance_mm is not None and not float(nsd_tolerance_mm) >= 0:
        raise ValueError(f"the NSD tolerance must be a number of mm >= 0, got {nsd_tolerance_mm}")
    if nsd_tolerance_mm is not None:
        require_nsd()
    started = time.perf_counter()
    placements = _placements(placement)
    cases = ds.as_cases(pairs)
    built, model_name, description = resolve_model(model, checkpoint, device, name, attention)
    runner = ModelRunner(built)
    folder = Path(output) if output is not None else None
    with _sole_writer(folder):  # a second evaluation into this folder is refused
        store = ResultStore(folder, clicks)
        store.check_cases(cases)
        store.check_settings({"clicks": int(clicks), "seed": int(seed), "min_voxels": int(min_voxels),
                              "nsd_tolerance_mm": None if nsd_tolerance_mm is None else float(nsd_tolerance_mm),
                              "protocol": protocol},
                             model_name, description)
        store.record_cases(cases)
        if store.dropped_units:
            log(f"dropped {store.dropped_units} incomplete structure(s) from {store.results_csv}; they are redone")

        def key(case, value, where):
            return unit_key({"model": model_name, "protocol": protocol, "placement": where, "case": case.name,
                             "value": value})

        def skip(case, structure, value, where, reason):
            store.add_skip({"model": model_name, "case": case.name, "structure": structure, "value": value,
                            "placement": where, "protocol": protocol, "reason": reason})

        # plan: which units are left (reads only the label files). The label of the first case with work is kept
        # for its evaluation, which comes next (a single case's label is then read once, not twice).
        plan, already, first_label = [], 0, None
        for case in cases:
            label = None
            try:
                label = ds.read_label(case.label)
                present = ds.label_values(label)
            except (FastSAM3DError, RuntimeError, OSError) as exc:
                for where in placements:
                    skip(case, "*", "*", where, f"unreadable label: {str(exc).strip().splitlines()[-1]}")
                continue
            store.forget_case_skips(model_name, protocol, placements, case.name)  # decided again below
            values, missing = ds.select_structures(case, present, structures)
            for structure, value, reason in missing:
                for where in placements:
                    skip(case, structure, value or structure, where, reason)
            if not values and not missing:  # an empty label: said, not passed over in silence
                for where in placements:
                    skip(case, "*", "*", where, "empty label: no labelled voxel")
            todo = [(v, [w for w in placements if not store.is_done(key(case, v, w))]) for v in values]
            already += sum(len(placements) - len(w) for _, w in todo)
            todo = [(v, w) for v, w in todo if w]
            if todo:
                if not plan:
                    first_label = label
                plan.append((case, todo))
        label = None
        total = sum(len(w) for _, todo in plan for _, w in todo)
        if already:
            log(f"resuming: {already} structure evaluation(s) already in {folder}, {total} to do")

        if total:
            runner.warm_up()
        bar = _Progress(total, progress, log)
        evaluated = clicks_run = 0
        try:
            for case, todo in plan:
                label, first_label = first_label, None
                try:
                    data = _CaseData(case, runner, protocol, nsd_tolerance_mm, label)
                except (FastSAM3DError, RuntimeError, OSError) as exc:
                    label = None
                    reason = f"cannot evaluate this case: {str(exc).strip().splitlines()[-1]}"
                    for value, wheres in todo:
                        for where in wheres:
                            skip(case, case.structure_name(value), value, where, reason)
                            bar.done(f"{case.name} {case.structure_name(value)} {where}: skipped")
                    bar.note(f"{case.name}: {reason}")
                    continue
                label = None  # a label on another grid was resampled: the one read is no longer needed
                if data.resampled:
                    bar.note(f"{case.name}: label on another grid, resampled (nearest) onto the image grid")
                for value, wheres in todo:
                    structure = case.structure_name(value)
                    mask = data.labels == value
                    voxels = int(np.count_nonzero(mask))
                    for where in wheres:
                        text = f"{case.name} {structure} {where}"
                        if voxels < min_voxels:
                            reason = (f"too small: {voxels} voxel(s) on the source grid, fewer than min_voxels "
                                      f"{min_voxels}" if voxels else "missing: no voxels on the image grid")
                            skip(case, structure, value, where, reason)
                            bar.done(f"{text}: skipped ({reason.split(':')[0]})")
                            continue
                        meta = {"model": model_name, "case": case.name, "structure": structure, "value": value,
                                "voxels": voxels, "placement": where, "protocol": protocol}
                        if on_unit is not None:
                            on_unit(dict(meta))
                        rng = unit_rng(seed, case.name, value, protocol, where)
                        try:
                            rows, final = _RUNNERS[where](data, value, mask, voxels, clicks, rng, meta)
                        except OutOfMemoryError:
                            raise  # not a property of the structure: stop; a rerun continues from here
                        except (CaseSkipped, FastSAM3DError) as exc:
                            skip(case, structure, value, where, str(exc))
                            bar.done(f"{text}: skipped")
                            continue
                        if save_predictions and folder is not None:
                            from ..files import write_label_atomically

                            write_label_atomically(data.volume, final, prediction_path(
                                folder, model_name, protocol, where, case.name, value, structure))
                        with interrupts.deferred():  # the rows and what on_unit_done records go together
                            if on_unit_done is not None:
                                on_unit_done(dict(meta))
                            store.add_unit(rows)
                        evaluated += 1
                        clicks_run += sum(1 for r in rows if r["click_label"] >= 0)
                        bar.done(f"{text}: Dice {rows[-1]['dice_full']:.3f}")
        finally:
            bar.close()
            store.flush()

        summary = summarise(store.rows, store.skipped, clicks, store.settings)
        elapsed = time.perf_counter() - started
        summary["runtime"] = {"scope": "the call that wrote this summary", "seconds": elapsed,
                              "structures_evaluated": evaluated, "model_clicks": clicks_run,
                              "seconds_per_structure": elapsed / evaluated if evaluated else None,
                              "torch_threads": _torch_threads()}
        if folder is not None:
            write_summary(folder, summary)
            if plots:
                try:
                    from . import plots as plotting

                    written = plotting.make_plots(folder, store.rows, store.settings)
                    summary["plots"] = [str(p) for p in written]
                except ImportError as exc:
                    log(f"no plots: {exc}")
                write_summary(folder, summary)
        return summary
