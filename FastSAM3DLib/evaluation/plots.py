"""PNG plots of an evaluation: Dice versus clicks, the CVPR 2025 challenge's DSC/NSD curves (when NSD was
computed), and overlays of the best and worst structures.

Uses matplotlib's object API with the Agg canvas (no ``pyplot``, no global backend change, safe inside Slicer
or a notebook). matplotlib is imported only when a plot is made; without it an ImportError says what to do.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .metrics import nan_mean
from .results import PLACEMENT_TITLES, prediction_path, safe_name
from .summary import challenge_summary, unit_curves

_LINESTYLES = {"gt": "-", "click": "--"}


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install matplotlib (or evaluate without plots, "
                          "--no-plots)") from exc
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    """Write ``figure`` as the PNG ``path`` atomically (a run stopped while saving leaves the former plot)."""
    from ..files import atomic_output

    with atomic_output(path, suffix=".png") as tmp:
        figure.savefig(str(tmp), bbox_inches="tight", format="png")
    return path


def _lines_by_protocol(units: Dict[tuple, Dict]):
    """(protocol, {(model, placement): [unit curves]}) for each protocol of ``unit_curves``' keys, in order."""
    for protocol in OrderedDict.fromkeys(k[1] for k in units):
        lines: Dict[tuple, List[Dict]] = OrderedDict()
        for key, unit in units.items():
            if key[1] == protocol:
                lines.setdefault((key[0], key[2]), []).append(unit)
        yield protocol, lines


def plot_dice_curves(rows: List[Dict], folder: Path) -> List[Path]:
    """``dice_vs_clicks_<protocol>.png``: mean Dice after each click, on the crop and on the source grid.

    One line per model and placement (solid: ground-truth-centred ROI, dashed: click-centred ROI).
    """
    units = unit_curves(rows)
    written = []
    for protocol, lines in _lines_by_protocol(units):
        figure = _figure(11, 4.2)
        axes = figure.subplots(1, 2, sharey=True)
        models = list(OrderedDict.fromkeys(m for m, _ in lines))
        colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
        for axis, metric, title in zip(axes, ("dice_crop", "dice_full"),
                                       ("Dice on the 128³ model crop (paper)", "Dice on the source grid")):
            for (model, placement), group in lines.items():
                clicks = len(group[0][metric])
                mean = [nan_mean(u[metric][i] for u in group) for i in range(clicks)]
                axis.plot(range(1, clicks + 1), mean, _LINESTYLES.get(placement, ":"), marker="o", markersize=3,
                          color=colours[model], label=f"{model}, {PLACEMENT_TITLES.get(placement, placement)} "
                                                      f"(n={len(group)})")
            axis.set_title(title)
            axis.set_xlabel("click")
            axis.set_ylim(0, 1)
            axis.grid(alpha=0.3)
            axis.xaxis.get_major_locator().set_params(integer=True)
        axes[0].set_ylabel("mean Dice")
        axes[1].legend(loc="lower right", fontsize=7)
        figure.suptitle(f"Dice versus clicks, {protocol} click protocol")
        written.append(_save(figure, Path(folder) / f"dice_vs_clicks_{protocol}.png"))
    return written


def plot_challenge_curves(rows: List[Dict], folder: Path) -> List[Path]:
    """``cvpr25_<protocol>.png`` for every protocol with NSD values: mean DSC and NSD (source grid) after each
    click, one line per model and placement, the legend giving the CVPR 2025 challenge's DSC_AUC / NSD_AUC as
    summary.json reports them (:func:`.summary.challenge_summary`: per case, NSD 0 unless its DSC > 0.2)."""
    units = unit_curves(rows)
    written = []
    for protocol, lines in _lines_by_protocol(units):
        if not any(np.isfinite(v).any() for group in lines.values() for u in group for v in [u["nsd_full"]]):
            continue
        figure = _figure(11, 4.2)
        axes = figure.subplots(1, 2, sharey=True)
        models = list(OrderedDict.fromkeys(m for m, _ in lines))
        colours = {m: f"C{i % 10}" for i, m in enumerate(models)}
        for axis, metric, title in zip(axes, ("dice_full", "nsd_full"), ("DSC", "NSD")):
            for (model, placement), group in lines.items():
                clicks = len(group[0][metric])
                mean = [nan_mean(u[metric][i] for u in group) for i in range(clicks)]
                area = challenge_summary(group)["dsc_auc" if metric == "dice_full" else "nsd_auc"]
                axis.plot(range(1, clicks + 1), mean, _LINESTYLES.get(placement, ":"), marker="o", markersize=3,
                          color=colours[model], label=f"{model}, {placement} ROI: challenge AUC {area:.2f} "
                                                      f"(n={len(group)})")
            axis.set_title(f"{title} on the source grid after each click")
            axis.set_xlabel("click")
            axis.set_ylim(0, 1)
            axis.grid(alpha=0.3)
            axis.xaxis.get_major_locator().set_params(integer=True)
            axis.legend(loc="best", fontsize=7)
        axes[0].set_ylabel("mean over structures")
        figure.suptitle(f"CVPR 2025 interactive challenge metrics, {protocol} click protocol (AUC as summary.json: "
                        f"per case, trapezoids from click 1, no box step)")
        written.append(_save(figure, Path(folder) / f"cvpr25_{protocol}.png"))
    return written


def _axial(volume, array: np.ndarray):
    """``array`` on ``volume``'s grid reoriented to LPS (closest axes), so that an array slice [k] is an axial view
    in the radiological convention (anterior up, patient right on the left); returns (array, spacing i, j, k)."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(volume.to_sitk(array), "LPS")
    return sitk.GetArrayFromImage(image), np.array(image.GetSpacing())


def _slice_view(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, spacing):
    """The (K, J, I) slice with the most reference voxels, cropped around the reference (with a margin)."""
    k = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
    rows, cols = np.flatnonzero(truth[k].any(axis=1)), np.flatnonzero(truth[k].any(axis=0))
    margins = [max(8, (idx[-1] - idx[0] + 1) // 2) for idx in (rows, cols)]
    r0, r1 = max(rows[0] - margins[0], 0), min(rows[-1] + margins[0] + 1, truth.shape[1])
    c0, c1 = max(cols[0] - margins[1], 0), min(cols[-1] + margins[1] + 1, truth.shape[2])
    crop = (slice(r0, r1), slice(c0, c1))
    aspect = float(spacing[1] / spacing[0])  # row (j) spacing over column (i) spacing
    return k, image[k][crop], truth[k][crop], prediction[k][crop], aspect


def plot_montage(rows: List[Dict], folder: Path, cases: Dict[str, Dict], model: str, protocol: str,
                 placement: str, per_row: int = 3) -> Optional[Path]:
    """``montage_<model>_<protocol>_<placement>.png``: best and worst structures by Dice after the last click.

    Each panel is the axial slice (radiological view) through the structure with the most reference voxels,
    cropped around it; green contour: reference, red: the saved prediction after the last click. Units whose case
    files or saved prediction are missing are left out; returns None when none is left.
    """
    from ..geometry import Volume
    from . import dataset as ds

    units = [u for k, u in unit_curves(rows).items() if k[0] == model and k[1] == protocol and k[2] == placement]
    candidates = []
    for unit in units:
        row = unit["rows"][-1]
        path = prediction_path(folder, model, protocol, placement, row["case"], row["value"], row["structure"])
        if row["case"] in cases and path.is_file() and not np.isnan(row["dice_full"]):
            candidates.append((row["dice_full"], row, path))
    if not candidates:
        return None
    candidates.sort(key=lambda c: -c[0])
    k = min(per_row, max(1, len(candidates) // 2))
    best = candidates[:k]
    worst = [c for c in candidates[::-1][:k] if all(c is not b for b in best)]
    panels = [("best", best)] + ([("worst", worst)] if worst else [])
    figure = _figure(3.4 * k, 3.6 * len(panels))
    axes = np.atleast_2d(figure.subplots(len(panels), k, squeeze=False))
    loaded: Dict[str, tuple] = {}
    for r, (title, chosen) in enumerate(panels):
        for c in range(k):
            axis = axes[r, c]
            axis.axis("off")
            if c >= len(chosen):
                continue
            score, row, path = chosen[c]
            if row["case"] not in loaded:
                files = cases[row["case"]]
                loaded.clear()  # keep one case in memory
                loaded[row["case"]] = ds.load_case(ds.Case(row["case"], files["image"], files["label"]))
            volume, labels, _ = loaded[row["case"]]
            prediction = Volume.from_file(path).array != 0
            truth = labels == int(row["value"])
            if prediction.shape != truth.shape:
                continue
            image, spacing = _axial(volume, volume.array.astype(np.float32))
            truth, _ = _axial(volume, truth.astype(np.uint8))
            prediction, _ = _axial(volume, prediction.astype(np.uint8))
            index, image, ref, pred, aspect = _slice_view(image, truth != 0, prediction != 0, spacing)
            low, high = np.percentile(image, [0.5, 99.5]) if image.size else (0, 1)
            axis.imshow(image, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=aspect,
                        interpolation="nearest")
            if ref.any():
                axis.contour(ref.astype(float), levels=[0.5], colors="lime", linewidths=1.0)
            if pred.any():
                axis.contour(pred.astype(float), levels=[0.5], colors="red", linewidths=1.0)
            axis.set_title(f"{title}: {row['structure']}\n{row['case']} (k={index})\nDice {score:.3f}", fontsize=8)
    clicks = max(int(r["click"]) for r in rows)
    figure.suptitle(f"{model}, {protocol}, {PLACEMENT_TITLES.get(placement, placement)}: green reference, "
                    f"red prediction after click {clicks}", fontsize=9)
    return _save(figure, Path(folder) / f"montage_{safe_name(model)}_{protocol}_{placement}.png")


def make_plots(folder, rows: List[Dict], settings: Dict) -> List[Path]:
    """All plots of a results folder: the Dice curves and one montage per model, protocol and placement."""
    folder = Path(folder)
    if not rows:
        return []
    written = plot_dice_curves(rows, folder) + plot_challenge_curves(rows, folder)
    cases = settings.get("cases", {})
    for model, protocol, placement in OrderedDict.fromkeys((r["model"], r["protocol"], r["placement"]) for r in rows):
        path = plot_montage(rows, folder, cases, model, protocol, placement)
        if path is not None:
            written.append(path)
    return written
