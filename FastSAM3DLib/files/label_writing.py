"""Label files written atomically and verified: a label counts as written only after it was read back
(geometry, every voxel, and for compressed files the whole stream: NIfTI's writer does not report a full disk)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from .atomic import atomic_output
from .completeness import nifti_problem, running_beside
from .native_stderr import itk_reason, native_stderr_captured
from .output_checks import NIFTI_EXTENSIONS, check_format_keeps_geometry, check_output_path, label_extension
from .output_errors import write_failed


def write_label_atomically(volume, mask, output, inputs: Iterable = ()) -> Path:
    """Write ``mask`` as a uint8 label image with ``volume``'s geometry to ``output``; returns its path.

    ``output`` must end in one of :data:`LABEL_EXTENSIONS` and pass :func:`check_output_path` (``inputs``:
    files it must not be). The file appears under its name only after it was written completely and read
    back (geometry, voxels, the whole compressed stream); otherwise :class:`OutputFileError` says why (a full
    disk, a file size limit...) and neither the file nor a temporary is left.
    """
    import numpy as np
    import SimpleITK as sitk

    output = check_output_path(output, inputs)
    extension = label_extension(output)
    check_format_keeps_geometry(volume.ijk_to_ras, output)
    mask = np.asarray(mask)
    label = mask.view(np.uint8) if mask.dtype == np.bool_ and mask.flags.c_contiguous else \
        np.ascontiguousarray(mask, dtype=np.uint8)  # a bool mask is taken as it is: no copy of the volume's size
    image = volume.to_sitk(label)
    with atomic_output(output, suffix=extension) as tmp:
        with native_stderr_captured() as native:
            try:
                sitk.WriteImage(image, str(tmp), True)
                failure = None
            except RuntimeError as exc:
                failure = exc
        if failure is not None:
            raise write_failed(output, tmp, label.nbytes, itk_reason(failure, native)) from None
        geometry = {"size": image.GetSize(), "spacing": image.GetSpacing(), "origin": image.GetOrigin(),
                    "direction": image.GetDirection()}
        del image  # its voxels, a copy of the label, are not needed while the file is read back
        problem = _verify_label(tmp, geometry, label, extension)
        if problem:
            raise write_failed(output, tmp, label.nbytes, "; ".join([problem, *native[:2]]))
    return output


def _verify_label(path: Path, expected: dict, label, extension: str) -> Optional[str]:
    """Why the label file at ``path`` is not ``label`` with the ``expected`` geometry (``size``, ``spacing``,
    ``origin``, ``direction`` as SimpleITK gives them): size, header, stream, voxels; None if it is."""
    import numpy as np
    import SimpleITK as sitk

    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with native_stderr_captured() as native:
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            if reader.GetSize() != expected["size"] or reader.GetNumberOfComponents() != 1:
                return f"its header says size {reader.GetSize()}, expected {expected['size']}"
            for what, got, want, tol in (("spacing", reader.GetSpacing(), expected["spacing"], 1e-5),
                                         ("origin", reader.GetOrigin(), expected["origin"], 1e-4),
                                         ("direction", reader.GetDirection(), expected["direction"], 1e-4)):
                scale = max(1.0, float(np.max(np.abs(want))))
                if not np.allclose(got, want, rtol=0, atol=tol * scale):
                    return f"its header has another {what} ({np.round(got, 5).tolist()}) than the image"
            with running_beside(_stream_problem, path, extension) as stream:
                written = reader.Execute()
            if stream[0]:
                return stream[0]
        except RuntimeError as exc:
            return f"it cannot be read back ({itk_reason(exc, native)})"
    back = sitk.GetArrayViewFromImage(written)  # a view: valid while ``written`` lives
    if back.shape != label.shape or not _equal_in_slabs(back, label):
        return "its voxels differ from the label"
    return None


def _equal_in_slabs(a, b, voxels: int = 1 << 24) -> bool:
    """``np.array_equal`` of two arrays of one shape, a slab of about ``voxels`` at a time: no temporary of the
    whole volume's size."""
    import numpy as np

    step = max(1, voxels // max(1, int(np.prod(a.shape[1:]))))
    return all(np.array_equal(a[k:k + step], b[k:k + step]) for k in range(0, a.shape[0], step))


def _stream_problem(path: Path, extension: str) -> Optional[str]:
    """Why a written NIfTI file is incomplete (the whole gzip stream and its checksum are read), or None."""
    if extension not in NIFTI_EXTENSIONS:
        return None  # NRRD and MetaImage readers check their own data length and compression
    problem = nifti_problem(path)
    return f"the file is cut short or damaged: {problem}" if problem else None
