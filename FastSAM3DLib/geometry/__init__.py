"""Geometry: volumes, coordinate systems, the model's region of interest, resampling and paste-back.

This package is the one place that owns the coordinate conventions of the library:

* A :class:`Volume` stores its voxels as SimpleITK and Slicer arrays do, in ``(K, J, I)`` order, with a 4x4
  matrix mapping the homogeneous voxel index ``(i, j, k, 1)`` to RAS millimetres.
* *Model space* is the grid the official models were trained on: the volume resampled to 1.5 mm with the
  torchio 1.2.1 ``Resample(1.5)`` grid rule, then ``ToCanonical`` (voxel axes permuted/flipped to the closest
  RAS axes, never rotated), voxel order ``(x, y, z)``. A :class:`RegionOfInterest` is a box of that grid; its
  ``model_to_ras`` maps the homogeneous model voxel ``(x, y, z, 1)`` to RAS. Points given to the model are
  continuous model voxel coordinates in that same ``(x, y, z)`` order.
* A grid covers half a voxel beyond its outer voxel centres: continuous index ``-0.5 .. n - 0.5``.

torchio is the reference these functions reproduce (see ``reference/PIPELINE.md``) but is never imported
here; resampling is done with SimpleITK's ``ResampleImageFilter``, exactly as torchio does it.

One module per responsibility: :mod:`.matrices` (4x4 matrices, SimpleITK images and resampling),
:mod:`.volume` (the volume and reading it), :mod:`.roi` (model space and its regions of interest),
:mod:`.model_input` (the model's input and labels), :mod:`.paste` (logits back onto the volume). The names
below are the package's interface.
"""
from .matrices import affine_rows, apply_affine, box_corners
from .model_input import MAX_NORMALISED_MAGNITUDE, extract_label, extract_model_input, sitk_model_input
from .paste import paste_back, paste_field_sitk, positive_model_box, source_box
from .roi import MODEL_SIZE, MODEL_SPACING, RegionOfInterest, canonical_grid, roi_around, roi_centred_on_mask
from .volume import UNEVEN_SLICES_TOLERANCE, Volume, ras_to_ijk

__all__ = ["affine_rows", "apply_affine", "box_corners", "MAX_NORMALISED_MAGNITUDE", "extract_label",
           "extract_model_input", "sitk_model_input", "paste_back", "paste_field_sitk", "positive_model_box",
           "source_box", "MODEL_SIZE", "MODEL_SPACING", "RegionOfInterest", "canonical_grid", "roi_around",
           "roi_centred_on_mask", "UNEVEN_SLICES_TOLERANCE", "Volume", "ras_to_ijk"]
