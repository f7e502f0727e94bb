"""The JSON summary of an evaluation's rows: per-click curves per unit, their means per model, protocol,
placement and structure, and the CVPR 2025 challenge's numbers (``summary.json``, see :func:`summarise`)."""
from __future__ import annotations

import json
import math
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..files import write_text_atomically
from .metrics import click_curve_summary, nan_mean
from .results import METRICS, PLACEMENT_TITLES, json_clean, unit_key


def unit_curves(rows: List[Dict]) -> Dict[tuple, Dict]:
    """Group rows into units: key -> {"rows": [...] sorted by click, metric name -> per-click list}."""
    units: Dict[tuple, Dict] = OrderedDict()
    for row in rows:
        units.setdefault(unit_key(row), {"rows": []})["rows"].append(row)
    for unit in units.values():
        unit["rows"].sort(key=lambda r: r["click"])
        for metric in METRICS + ("nsd_full", "time_s", "pred_iou"):
            unit[metric] = [float(r.get(metric, float("nan"))) for r in unit["rows"]]
    return units


def _group_summary(units: List[Dict], clicks: int) -> Dict:
    out = {"n": len(units)}
    for metric in METRICS:
        out[metric] = click_curve_summary([u[metric] for u in units], clicks)
    out["time_s"] = {"first_click": nan_mean(u["time_s"][0] for u in units),
                     "later_clicks": nan_mean(t for u in units for t in u["time_s"][1:]), **_unit_times(units)}
    if any(math.isfinite(v) for u in units for v in u["nsd_full"]):
        out["nsd_full"] = click_curve_summary([u["nsd_full"] for u in units], clicks)
    out["cvpr25"] = challenge_summary(units)
    return out


def _unit_times(units: List[Dict]) -> Dict:
    """``per_structure``: model seconds of all clicks of a structure; ``per_case``: summed over a case's
    structures (the CVPR 2025 challenge's time per case); both means."""
    per_case: Dict[str, float] = OrderedDict()
    for unit in units:
        case = str(unit["rows"][0]["case"])
        per_case[case] = per_case.get(case, 0.0) + float(np.nansum(unit["time_s"]))
    return {"per_structure": nan_mean(float(np.nansum(u["time_s"])) for u in units),
            "per_case": nan_mean(per_case.values())}


CHALLENGE_NSD_MIN_DSC = 0.2  # CVPR25_iter_eval.py: a case's NSD counts as 0 unless its DSC is above this


def challenge_summary(units: List[Dict]) -> Dict:
    """The CVPR 2025 challenge's numbers on the source grid, scored as its ``CVPR25_iter_eval.py`` does: per case
    and click, the mean DSC over the case's evaluated structures and their mean NSD, which counts as 0 where that
    DSC is not above 0.2; per case the area under each per-click curve (:func:`.metrics.area_under_clicks`) and
    the values after the last click; then means over cases: ``dsc_auc``, ``nsd_auc``, ``final_dsc``,
    ``final_nsd`` (NSD entries None without NSD). Its time per case is ``time_s.per_case``."""
    from .metrics import area_under_clicks

    by_case: Dict[str, List[Dict]] = OrderedDict()
    for unit in units:
        by_case.setdefault(str(unit["rows"][0]["case"]), []).append(unit)
    dsc_auc, nsd_auc, final_dsc, final_nsd = [], [], [], []
    for members in by_case.values():
        clicks = min(len(u["dice_full"]) for u in members)
        dsc = [nan_mean(u["dice_full"][c] for u in members) for c in range(clicks)]
        nsd = [nan_mean(u["nsd_full"][c] for u in members) for c in range(clicks)]
        nsd = [value if not math.isfinite(value) or d > CHALLENGE_NSD_MIN_DSC else 0.0
               for value, d in zip(nsd, dsc)]
        dsc_auc.append(area_under_clicks(dsc))
        nsd_auc.append(area_under_clicks(nsd))
        final_dsc.append(dsc[-1] if dsc else float("nan"))
        final_nsd.append(nsd[-1] if nsd else float("nan"))
    return {"dsc_auc": nan_mean(dsc_auc), "nsd_auc": nan_mean(nsd_auc), "final_dsc": nan_mean(final_dsc),
            "final_nsd": nan_mean(final_nsd), "cases": len(by_case)}


def summarise(rows: List[Dict], skipped: List[Dict], clicks: int, settings: Optional[Dict] = None) -> Dict:
    """The JSON summary of all rows.

    ``results[model][protocol][placement]`` holds ``overall`` (means over all evaluated structures of all
    cases) and ``structures[name]`` (means over the cases having that structure), each with, for each of
    ``dice_crop``, ``iou_crop`` (128^3 model crop, as the paper) and ``dice_full``, ``iou_full`` (source grid):
    ``after_1``, ``after_3``, ``after_5``, ``after_10`` (mean after that click), ``last`` (after the last
    click) and ``max`` (mean of the maximum over clicks, the FastSAM3D paper's number); plus ``n`` and mean
    seconds per click. ``skipped`` lists every skipped unit with its reason. NaN (both masks empty) is
    ignored in means and written as null.
    """
    tree: Dict = defaultdict(lambda: defaultdict(dict))
    groups: Dict[tuple, List[Dict]] = OrderedDict()
    for key, unit in unit_curves(rows).items():
        groups.setdefault(key[:3], []).append(unit)
    for (model, protocol, placement), units in groups.items():
        by_structure: Dict[str, List[Dict]] = OrderedDict()
        for unit in units:
            by_structure.setdefault(unit["rows"][0]["structure"], []).append(unit)
        tree[model][protocol][placement] = {
            "placement": PLACEMENT_TITLES.get(placement, placement),
            "overall": _group_summary(units, clicks),
            "structures": {name: _group_summary(us, clicks) for name, us in by_structure.items()},
        }
    summary = {
        "clicks": clicks,
        "metrics": {"dice_crop/iou_crop": "on the 128^3 model crop (1.5 mm), as the FastSAM3D paper",
                    "dice_full/iou_full": "on the source volume's grid after paste-back",
                    "after_k": "mean after click k", "last": "mean after the last click",
                    "max": "mean over structures of the maximum over clicks (the paper's 'Dice')",
                    "nsd_full": "normalised surface Dice on the source grid at nsd_tolerance_mm, measured as "
                                "the challenge does (nsd_measure; see evaluation/metrics.py)",
                    "cvpr25": "CVPR 2025 interactive 3D challenge numbers, scored as CVPR25_iter_eval.py: per "
                              "case the mean DSC/NSD over its structures after each click (NSD 0 where that DSC "
                              "is not above 0.2), the area under those curves (trapezoids, one unit per click) and "
                              "the final values, then means over cases. Deviations: from click 1 (no bounding-box "
                              "step, these models take points only); each structure is segmented and scored on "
                              "its own, not as one multi-class label map, and structures too small to evaluate "
                              "are left out of their case's mean; clicks are placed on the 128^3 crop (gt) or "
                              "the model grid (click), not the image grid; its time per case is time_s.per_case, "
                              "measured, not capped at the challenge's 90 s per class"
                              + ("" if clicks == 5 else f"; with {clicks} clicks the AUC spans all of them (the "
                                 "challenge has 5)")},
        "settings": {k: v for k, v in (settings or {}).items() if k != "cases"},
        "results": json_clean({m: {p: dict(v) for p, v in d.items()} for m, d in tree.items()}),
        "n_rows": len(rows),
        "skipped": [dict(r) for r in skipped],
    }
    return json_clean(summary)


def write_summary(folder: Path, summary: Dict) -> Path:
    """Write ``summary.json`` atomically; returns its path."""
    path = Path(folder) / "summary.json"
    write_text_atomically(path, json.dumps(json_clean(summary), indent=1, allow_nan=False) + "\n")
    return path
