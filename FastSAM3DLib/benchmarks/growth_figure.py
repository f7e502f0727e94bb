"""A PNG that shows a grown segment crossing the borders between its regions (no seam).

Left: the curved-tube phantom (:mod:`.long_phantoms`, 450 mm) seen from above (maximum intensity along S), the
segment grown from one click by the threshold stand-in model (:mod:`.threshold_model`) in red, the click in
green and each region's extent along R as a coloured bar with its faces as dashed lines. Right: the first
border enlarged, the voxels the two regions share shaded and the segment's outline in yellow.

Run: ``python -m FastSAM3DLib.benchmarks.growth_figure [PATH]`` (default
``Testing/Benchmarks/results/growth-seam.png``; needs matplotlib).
"""
from __future__ import annotations

import sys
from pathlib import Path


def draw(path: str = "Testing/Benchmarks/results/growth-seam.png") -> Path:
    """Grow the tube from one click and write the figure to ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..session import InteractiveSession
    from .long_phantoms import curved_tube, tube_centre
    from .threshold_model import threshold_model

    volume, truth = curved_tube()
    y0, z0 = tube_centre(0.0)
    session = InteractiveSession(threshold_model(), volume, grow=True)
    result = session.add_click([0.0, float(y0), float(z0)])
    mask = session.full_mask(result)
    state = session.region_set
    lattice = state.lattice
    indices = sorted(state.regions)

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    image = volume.array.max(axis=0).astype(np.float32)  # (J, I): x along columns, y along rows
    extent = [volume.ijk_to_ras[0, 3], volume.ijk_to_ras[0, 3] + volume.ijk_to_ras[0, 0] * image.shape[1],
              volume.ijk_to_ras[1, 3], volume.ijk_to_ras[1, 3] + volume.ijk_to_ras[1, 1] * image.shape[0]]
    left.imshow(image, cmap="gray", origin="lower", extent=extent, vmin=-100, vmax=400, aspect="equal")
    overlay = np.zeros(image.shape + (4,))
    overlay[mask.any(axis=0)] = (1.0, 0.15, 0.15, 0.55)
    left.imshow(overlay, origin="lower", extent=extent, aspect="equal")
    left.plot([0.0], [y0], "o", color="lime", markersize=5)
    colours = plt.cm.tab10(np.arange(len(indices)))
    for colour, index in zip(colours, indices):
        corners = lattice.roi(index).extent_corners_ras()
        low, high = corners[:, 0].min(), corners[:, 0].max()
        bar = extent[2] + 4 + 5 * (indices.index(index) % 2)
        left.plot([low, high], [bar, bar], color=colour, linewidth=3)
        for face in (low, high):
            left.axvline(face, color=colour, linestyle="--", linewidth=0.8)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    left.set_title(f"one click, {len(indices)} regions: Dice {dice:.3f}")
    left.set_xlabel("R (mm)")
    left.set_ylabel("A (mm)")

    # the first border, enlarged: the segment's outline runs through the shared voxels without a step
    a, b = indices[0], indices[1]
    shared_low = max(lattice.roi(a).extent_corners_ras()[:, 0].min(), lattice.roi(b).extent_corners_ras()[:, 0].min())
    shared_high = min(lattice.roi(a).extent_corners_ras()[:, 0].max(), lattice.roi(b).extent_corners_ras()[:, 0].max())
    right.imshow(image, cmap="gray", origin="lower", extent=extent, vmin=-100, vmax=400, aspect="equal")
    right.imshow(overlay, origin="lower", extent=extent, aspect="equal")
    right.contour(mask.any(axis=0), levels=[0.5], colors="yellow", linewidths=0.8, origin="lower", extent=extent)
    right.axvspan(shared_low, shared_high, color="cyan", alpha=0.15)
    for face in (shared_low, shared_high):
        right.axvline(face, color="cyan", linestyle="--", linewidth=0.8)
    centre = (shared_low + shared_high) / 2
    yc = float(tube_centre(centre)[0])
    right.set_xlim(centre - 60, centre + 60)
    right.set_ylim(yc - 35, yc + 35)
    right.set_title(f"border of regions {a} and {b} (shared voxels shaded)", fontsize=9)
    right.set_xlabel("R (mm)")
    figure.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


if __name__ == "__main__":
    print(draw(*sys.argv[1:2]))
