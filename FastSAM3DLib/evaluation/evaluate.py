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
from .clicks import PROTOCOLS
from .metrics import NSD_TOLERANCE_MM, require_nsd
from .model_runner import ModelRunner
from .placements import PLACEMENTS, CaseData, CaseSkipped, run_placement
from .results import ResultStore, prediction_path, unit_key
from .summary import summarise, write_summary


def _torch_threads() -> int:
    """PyTorch's CPU thread count (results can differ slightly with it: sums in another order)."""
    import torch

    return int(torch.get_num_threads())


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
                    data = CaseData(case, runner, protocol, nsd_tolerance_mm, label)
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
                            rows, final = run_placement(where, data, value, mask, voxels, clicks, rng, meta)
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
