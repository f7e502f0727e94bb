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

The time of a refining click's write (:func:`measure_refine`): the previous result is in the segment and the new
one differs in one place (a 24-voxel bump on its surface), written with the library's cut to the changed box and
over the whole region (as before the cut), for a single region (``BOX``) and for a segment grown over the whole
volume (a 78.6-million-voxel region).

Run: ``python -m FastSAM3DLib.benchmarks.scene_memory`` (prints JSON; ``--refine`` for the refining writes).
"""
from __future__ import annotations

import json
import subprocess
import sys

SHAPE = (300, 512, 512)  # (K, J, I)
SEGMENTS = 10
BOX = (slice(90, 210), slice(176, 336), slice(176, 336))
VARIANTS = ("box rollback", "whole snapshot", "series give-back")
REFINE_VARIANTS = ("one region", "one region, whole region written", "grown over the volume",
                   "grown over the volume, whole region written")


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

    from ..scene.nodes import vtk_matrix_from_array
    from ..scene.oriented_images import oriented_image

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
    volume.SetIJKToRASMatrix(vtk_matrix_from_array(np.diag([0.8, 0.8, 1.5, 1.0])))
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
        image = oriented_image(slab, matrix, [0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1])
        logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE, image.GetExtent())
    return (scene, app_logic, logics), volume, segmentation


def measure_variant(variant: str) -> dict:
    """Peak memory growth (MB) and time (s) of one click's write in this process."""
    import time

    import numpy as np

    from .. import scene as sc
    from ..scene import rollback

    keep, volume, segmentation = _scene()
    target = segmentation.GetSegmentation().GetNthSegmentID(3)
    if variant == "whole snapshot":
        original = rollback.Rollback.__init__

        def whole(self, segmentation_node, modifiers, editor_node):
            editor_node.SetOverwriteMode(editor_node.OverwriteNone)  # takes the whole-segmentation snapshot
            original(self, segmentation_node, modifiers, editor_node)
            editor_node.SetOverwriteMode(editor_node.OverwriteAllSegments)

        rollback.Rollback.__init__ = whole
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


def measure_refine_variant(variant: str) -> dict:
    """Time (s) of a refining click's write in this process (see the module doc)."""
    import time

    import numpy as np

    from .. import scene as sc
    from ..scene import writing

    if variant.endswith("whole region written"):
        writing._changed_part = lambda segmentation, segment_id, grid, *edit: edit
    keep, volume, segmentation = _scene()
    target = segmentation.GetSegmentation().GetNthSegmentID(3)
    box = BOX if variant.startswith("one region") else (slice(0, SHAPE[0]), slice(0, SHAPE[1]), slice(0, SHAPE[2]))
    shape = tuple(s.stop - s.start for s in box)
    kk, jj, ii = np.ogrid[:shape[0], :shape[1], :shape[2]]
    centre = [n / 2 for n in shape]
    if variant.startswith("one region"):
        previous = (kk - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (ii - centre[2]) ** 2 < 55 ** 2
        bump = (centre[0], centre[1], centre[2] + 55)
    else:  # a long object through every slice, as a segment grown region by region
        previous = np.broadcast_to((jj - centre[1]) ** 2 + (ii - centre[2]) ** 2 < 90 ** 2, shape)
        bump = (centre[0], centre[1], centre[2] + 90)
    refined = previous | ((kk - bump[0]) ** 2 + (jj - bump[1]) ** 2 + (ii - bump[2]) ** 2 < 12 ** 2)
    editor = sc.LogicEditor(volume.GetScene(), undo_states=2)
    taken = sc.SegmentBaseline(segmentation, target, volume).taken
    sc.write_region(segmentation, target, volume, box, previous, editor=editor, taken=taken)
    start = time.perf_counter()
    sc.write_region(segmentation, target, volume, box, refined, editor=editor, taken=taken)
    seconds = time.perf_counter() - start
    editor.close()
    del keep
    return {"variant": variant, "write_s": round(seconds, 3), "region_voxels": int(np.prod(shape))}


def measure_refine() -> list:
    """Every refining-write variant, each in a fresh Python process."""
    return [_in_subprocess("--refine-variant", variant) for variant in REFINE_VARIANTS]


def _in_subprocess(flag: str, variant: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "FastSAM3DLib.benchmarks.scene_memory", flag, variant], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure() -> list:
    """Every variant, each in a fresh Python process (peak memory is per process)."""
    return [_in_subprocess("--variant", variant) for variant in VARIANTS]


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
    elif len(sys.argv) == 3 and sys.argv[1] == "--variant":
        print(json.dumps(measure_variant(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "--refine-variant":
        print(json.dumps(measure_refine_variant(sys.argv[2])))
    else:
        print(json.dumps(measure_refine() if sys.argv[1:] == ["--refine"] else measure(), indent=1))
