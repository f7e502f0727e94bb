"""Memory and time of writing one click's result into a large segmentation (needs ``slicer-core``).

The scene is a 512 x 512 x 300 CT-sized volume with a segmentation of 10 segments in one shared labelmap
layer, as a Segment Editor user has after a while. One click's result (a ball in a 160 x 160 x 120 voxel box)
is written through the Segment Editor logic, with its undo state, as the effect does. Each variant runs in a
fresh process and reports how far the resident memory rose above its level before the write (Linux):

* ``box rollback``: what the library does (a failed write can be undone from the edited box of each layer);
* ``whole snapshot``: the previous rollback, a deep copy of the segmentation (Slicer's segmentation
  history), kept for overwrite modes "visible" and "none";
* ``series give-back``: the box rollback inside a series of points (:class:`~FastSAM3DLib.scene.TakenVoxels`,
  what the effect writes with), the worst case: the previous point's result filled the box around the ball,
  taking the voxels of four segments, and the measured write gives back all but the ball; ``series_start_s``
  is the time the series' first write adds (remembering the segment as it was, :class:`SegmentBaseline`).

Run: ``python -m FastSAM3DLib.benchmarks.scene_memory`` (prints JSON).
"""
from __future__ import annotations

import json
import subprocess
import sys

SHAPE = (300, 512, 512)  # (K, J, I)
SEGMENTS = 10
BOX = (slice(90, 210), slice(176, 336), slice(176, 336))
VARIANTS = ("box rollback", "whole snapshot", "series give-back")


def _reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets the peak resident size)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def _scene():
    """The scene with the volume and the 10-segment segmentation; returns (keep-alive, volume, segmentation)."""
    import numpy as np
    import slicer
    import vtk

    from ..scene.nodes import _vtk_matrix
    from ..scene.writing import _oriented_image

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    logics = []
    for name, logic in [("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic()),
                        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic())]:
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics.append(logic)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer.util.updateVolumeFromArray(volume, np.zeros(SHAPE, np.int16))
    volume.SetIJKToRASMatrix(_vtk_matrix(np.diag([0.8, 0.8, 1.5, 1.0])))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ijk = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk)
    matrix = np.array([[ijk.GetElement(r, c) for c in range(4)] for r in range(4)])
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    for index in range(SEGMENTS):  # ten slabs, side by side, all in one shared layer
        segment_id = segmentation.GetSegmentation().AddEmptySegment("", f"organ {index}")
        slab = np.zeros(SHAPE, np.uint8)
        slab[:, :, 40 + 40 * index:70 + 40 * index] = 1
        image = _oriented_image(slab, matrix, [0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1])
        logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE, image.GetExtent())
    return (scene, app_logic, logics), volume, segmentation


def measure_variant(variant: str) -> dict:
    """Peak memory growth (MB) and time (s) of one click's write in this process."""
    import time

    import numpy as np

    from .. import scene as sc
    from ..scene import writing

    keep, volume, segmentation = _scene()
    target = segmentation.GetSegmentation().GetNthSegmentID(3)
    if variant == "whole snapshot":
        original = writing._Rollback.__init__

        def whole(self, segmentation_node, modifiers, editor_node):
            editor_node.SetOverwriteMode(editor_node.OverwriteNone)  # takes the whole-segmentation snapshot
            original(self, segmentation_node, modifiers, editor_node)
            editor_node.SetOverwriteMode(editor_node.OverwriteAllSegments)

        writing._Rollback.__init__ = whole
    kk, jj, ii = np.indices(tuple(s.stop - s.start for s in BOX))
    centre = [(s.stop - s.start) / 2 for s in BOX]
    mask = (kk - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (ii - centre[2]) ** 2 < 55 ** 2
    editor = sc.LogicEditor(volume.GetScene(), undo_states=2)
    start = time.perf_counter()
    taken = sc.SegmentBaseline(segmentation, target, volume).taken if variant == "series give-back" else None
    series_start = time.perf_counter() - start  # what the effect adds to the first write of a series
    sc.write_region(segmentation, target, volume, BOX, ~mask, editor=editor, taken=taken)  # an undo baseline
    _reset_peak_rss()
    before = _status_mb("VmRSS")
    start = time.perf_counter()
    sc.write_region(segmentation, target, volume, BOX, mask, editor=editor, taken=taken)
    seconds = time.perf_counter() - start
    peak = _status_mb("VmHWM") - before
    editor.close()
    del keep
    row = {"variant": variant, "peak_growth_MiB": round(peak, 1), "write_s": round(seconds, 3)}
    if taken is not None:
        row["series_start_s"] = round(series_start, 3)
    return row


def measure() -> list:
    """Every variant, each in a fresh Python process (peak memory is per process)."""
    results = []
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "FastSAM3DLib.benchmarks.scene_memory", "--variant", variant], check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        print(json.dumps(measure_variant(sys.argv[2])))
    else:
        print(json.dumps(measure(), indent=1))
