"""A PNG preview: three orthogonal slices through a point, with the mask overlaid in red and the point in green."""
from pathlib import Path

import numpy as np

from .geometry import Volume, ras_to_ijk


def _window(values: np.ndarray) -> np.ndarray:
    """Map intensities to 0..255 with a robust (1st-99th percentile) window."""
    lo, hi = np.percentile(values, [1, 99])
    return (np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _stretch(rgb: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Repeat rows or columns so one pixel covers the same millimetres both ways."""
    unit = min(row_mm, col_mm)
    rows = np.round(np.arange(round(rgb.shape[0] * row_mm / unit)) * unit / row_mm).astype(int)
    cols = np.round(np.arange(round(rgb.shape[1] * col_mm / unit)) * unit / col_mm).astype(int)
    return rgb[np.minimum(rows, rgb.shape[0] - 1)][:, np.minimum(cols, rgb.shape[1] - 1)]


def render_preview(volume: Volume, mask_kji: np.ndarray, point_ras, path) -> Path:
    """Write a PNG with axial, coronal and sagittal slices (LPS display: anterior and superior up)."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(volume.to_sitk(volume.array.astype(np.float32)), "LPS")
    label = sitk.DICOMOrient(volume.to_sitk(mask_kji.astype(np.uint8)), "LPS")
    grey, mask = _window(sitk.GetArrayFromImage(image)), sitk.GetArrayFromImage(label) > 0
    ijk = np.round(ras_to_ijk(volume, np.asarray(point_ras, float)[None])[0]).astype(int)
    centre_ras = volume.ijk_to_ras @ np.append(ijk, 1.0)
    lps = (-centre_ras[0], -centre_ras[1], centre_ras[2])
    x, y, z = image.TransformPhysicalPointToIndex(lps)
    sx, sy, sz = image.GetSpacing()
    views = [  # (slice of grey, slice of mask, point row/col, row mm, col mm, flip rows)
        (np.s_[z, :, :], (y, x), sy, sx, False),
        (np.s_[:, y, :], (z, x), sz, sx, True),
        (np.s_[:, :, x], (z, y), sz, sy, True),
    ]
    panels = []
    for index, (row, col), row_mm, col_mm, flip in views:
        g, m = grey[index], mask[index]
        rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float32)
        rgb[m] = 0.55 * rgb[m] + 0.45 * np.array([255, 40, 40])
        rgb = rgb.astype(np.uint8)
        rgb[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2] = (40, 255, 40)
        if flip:
            rgb = rgb[::-1]
        panels.append(_stretch(rgb, row_mm, col_mm))
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    canvas = np.concatenate(padded, axis=1)
    from .files import atomic_output

    path = Path(path)
    with atomic_output(path, suffix=".png") as tmp:  # a reader never sees half a PNG; a failure leaves none
        sitk.WriteImage(sitk.GetImageFromArray(canvas, isVector=True), str(tmp))
    return path
