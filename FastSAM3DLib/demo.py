"""``make demo``: segment the right kidney of the bundled sample CT from one click and write a PNG preview."""
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import WeightsUnavailableError
from .geometry import Volume
from .resources import sample_path
from .weights.catalog import bundled_model

SAMPLE_IMAGE = "totalseg_example_ct_sm.nii.gz"
SAMPLE_LABEL = "totalseg_example_ct_sm_seg.nii.gz"
DEMO_STRUCTURE = (2, "right kidney")  # label value and name in the sample's reference labels
DEMO_WEIGHTS = bundled_model("fastsam3d-demo").path  # the bundled weights' file in Resources
#: Models the demo tries, best first, with how the demo describes their weights.
DEMO_MODELS = (("fastsam3d", "official FastSAM3D weights from the cache"),
               ("fastsam3d-demo", "bundled demo weights"))


def interior_point(volume: Volume, structure_mask: np.ndarray) -> np.ndarray:
    """RAS point of the structure voxel farthest from its boundary (a click a user would make)."""
    import SimpleITK as sitk

    distance = sitk.SignedMaurerDistanceMap(sitk.GetImageFromArray(structure_mask.astype(np.uint8)),
                                            insideIsPositive=True, squaredDistance=False, useImageSpacing=False)
    k, j, i = np.unravel_index(np.argmax(sitk.GetArrayFromImage(distance)), structure_mask.shape)
    return (volume.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]


def choose_weights(cache_dir=None) -> Optional[Tuple[str, object, str]]:
    """(model name, checkpoint, description) of the best weights available offline, or None.

    The official FastSAM3D weights when they are verified in ``cache_dir``, else the bundled demo weights; the
    same lookup as ``segment`` without ``--checkpoint`` and Slicer (:func:`FastSAM3DLib.weights.find_checkpoint`).
    """
    from .weights import find_checkpoint

    for name, description in DEMO_MODELS:
        try:
            path = find_checkpoint(name, cache_dir)
        except WeightsUnavailableError:
            continue
        return name, path, f"{description} ({path})"
    return None


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (NaN if both are empty)."""
    total = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


def run_demo(output_dir: Path, log=print, weights: Optional[Tuple[str, object, str]] = None,
             cache_dir=None) -> int:
    """Run the demo; returns the exit status (0 also when no weights exist, after saying so plainly).

    ``weights`` = (model name, checkpoint, description) overrides the automatic choice (for tests);
    ``cache_dir`` is the model cache searched for the official weights (default: the user cache folder).
    """
    from .files import check_output_path, write_label_atomically
    from .preview import render_preview
    from .registry import build_model
    from .session import InteractiveSession

    output_dir = Path(output_dir)
    label_path, png_path = output_dir / "demo_label.nii.gz", output_dir / "demo_preview.png"
    check_output_path(label_path)  # before any work: a folder or a pipe of that name is refused, not half-written
    check_output_path(png_path, extensions=(".png",))
    image, reference = Volume.from_file(sample_path(SAMPLE_IMAGE)), Volume.from_file(sample_path(SAMPLE_LABEL))
    value, name = DEMO_STRUCTURE
    truth = reference.array == value
    point = interior_point(image, truth)
    weights = weights or choose_weights(cache_dir)
    if weights is None:
        from .weights import weights_hint
        from .weights.catalog import bundled_path

        log("No model weights are available offline, so the demo cannot segment anything meaningful.\n"
            f"  - official FastSAM3D weights: {weights_hint('fastsam3d', cache_dir)}\n"
            f"  - the bundled demo weights ({bundled_path(bundled_model('fastsam3d-demo'))}) are missing from "
            "this installation.")
        return 0
    model_name, checkpoint, description = weights
    log(f"model: {model_name}, {description}")
    session = InteractiveSession(build_model(model_name, checkpoint=checkpoint), image)
    result = session.add_click(point, include=True)
    mask = session.full_mask(result)
    write_label_atomically(image, mask, label_path)
    render_preview(image, mask, point, png_path)
    timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
    log(f"clicked the {name} at RAS {np.round(point, 1).tolist()}: {result.voxels} voxels ({timing}); "
        f"Dice against the sample's reference label {dice(mask, truth):.3f}")
    log(f"label:   {label_path.resolve()}\npreview: {png_path.resolve()}")
    return 0
