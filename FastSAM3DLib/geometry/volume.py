"""A 3D scalar :class:`Volume` (voxels in (K, J, I) order and its IJK->RAS matrix): read from any file SimpleITK
reads or a DICOM folder, with the checks that refuse what cannot be segmented before any voxel is allocated."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputImageError
from .matrices import apply_affine, flip_xy, sitk_image

if TYPE_CHECKING:  # annotations only: SimpleITK is imported where it is used, so importing this module needs none
    import SimpleITK as sitk


#: A DICOM series is refused when reading it on ITK's evenly spaced grid would put a slice further than this
#: fraction of the slice spacing from its own position (a missing or unreadable slice file, a duplicate).
UNEVEN_SLICES_TOLERANCE = 0.1


def _slice_positions(series_reader, count: int):
    """Each slice's distance (mm) along the series' slice normal, in reading order, from the DICOM tags that
    ``series_reader`` (after ``Execute`` with its metadata dictionaries) read; None when a tag is missing."""
    try:
        positions = [[float(v) for v in series_reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(count)]
        cosines = [float(v) for v in series_reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError, IndexError):  # a tag missing or unreadable: nothing to check against
        return None
    if len(cosines) != 6 or any(len(p) != 3 for p in positions):
        return None
    normal = np.cross(cosines[:3], cosines[3:])
    return np.asarray(positions) @ normal


def _check_even_slices(distances, path) -> None:
    """InputImageError when the slices at ``distances`` (mm, reading order) are not evenly spaced: ITK spreads
    them evenly all the same, so the image (and every segmentation of it) would be misplaced without a word.
    Slicer's DICOM module warns about such series and regularizes them."""
    if distances is None or len(distances) < 3:
        return
    steps = np.diff(distances)
    count = len(distances)
    even = distances[0] + (distances[-1] - distances[0]) * np.arange(count) / (count - 1)
    spacing = abs(distances[-1] - distances[0]) / (count - 1)
    error = float(np.abs(distances - even).max())
    if spacing > 0 and error <= max(0.01, UNEVEN_SLICES_TOLERANCE * spacing):
        return
    usual = float(np.median(np.abs(steps)))
    odd = int(np.argmax(np.abs(np.abs(steps) - usual)))
    raise InputImageError(
        f"The DICOM series in {path} has unevenly spaced slices: {usual:.4g} mm apart, but {abs(steps[odd]):.4g} mm "
        f"between slices {odd + 1} and {odd + 2} of {count} (a missing, unreadable or duplicate slice file?). Read "
        f"as one evenly spaced volume, slices would be up to {error:.2g} mm from their place. Check that the folder "
        "holds every slice of the series, or load it in Slicer's DICOM module (which regularizes such series) and "
        "segment it there.")


def _check_scalar_3d(size, components: int, pixel_type: str) -> None:
    """Raise InputImageError unless an image of this size (i, j, k...) and pixel type is a 3D scalar volume.

    A 4D image with a single time point counts as 3D.
    """
    size = tuple(size)
    dimension = len(size)
    if dimension == 2:
        raise InputImageError(
            f"The image is 2D (one slice of {size[0]}x{size[1]} pixels); FastSAM3D "
            "segments 3D volumes. Load the whole series (for DICOM, the folder with all slices) or a 3D file."
        )
    if dimension != 3 and not (dimension == 4 and size[3] == 1):
        raise InputImageError(
            f"The image is {dimension}D (size {size}), e.g. a time series or several volumes in "
            "one file. Extract a single 3D volume first (in Slicer: the Sequences module; in Python: "
            "image[:, :, :, t] with SimpleITK) and segment that."
        )
    if components != 1 or "complex" in pixel_type:
        raise InputImageError(
            f"The image has {components} components per voxel ({pixel_type}), e.g. "
            "colour, vector or tensor data. Convert it to a scalar volume first (pick one component, or "
            "convert RGB to luminance, e.g. Slicer's 'Vector to Scalar Volume' module)."
        )


@dataclass(eq=False)
class Volume:
    """A 3D scalar image: array in (K, J, I) order as SimpleITK/Slicer arrays are, and the 4x4 IJK->RAS matrix."""

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if not self.array.dtype.isnative:  # e.g. nibabel's view of a big-endian file: SimpleITK refuses it
            self.array = self.array.astype(self.array.dtype.newbyteorder("="))
        self.ijk_to_ras = np.array(self.ijk_to_ras, dtype=np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {self.ijk_to_ras.shape}")

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """Wrap a 3D scalar SimpleITK image (LPS) as a Volume (RAS); other images raise InputImageError."""
        import SimpleITK as sitk
        _check_scalar_3d(image.GetSize(), image.GetNumberOfComponentsPerPixel(), image.GetPixelIDTypeAsString())
        if image.GetDimension() == 4:  # a 3D volume stored with a singleton time axis
            size = list(image.GetSize())
            image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
        ijk_to_lps[:3, 3] = image.GetOrigin()
        return cls(sitk.GetArrayFromImage(image), flip_xy(ijk_to_lps))

    @classmethod
    def from_file(cls, path, max_bytes: int | None = None) -> Volume:
        """Read any image SimpleITK reads; a directory is read as a DICOM series (the largest one in it).

        The header is read first, and these are refused with InputImageError before any voxel is allocated:
        images that are not 3D scalar volumes, images whose voxels need more than ``max_bytes`` (by default, whose
        segmentation would need more than two thirds of this computer's memory: :func:`FastSAM3DLib.files.run_bytes`),
        truncated or damaged files, and paths that are neither a file nor a folder (devices, pipes).
        """
        import SimpleITK as sitk

        from .. import files

        path = Path(path)
        if not path.exists():
            raise InputImageError(f"{path} does not exist. Check the path of the image file or DICOM folder.")
        from ..files import utf8_path

        if not utf8_path(path):
            raise InputImageError(f"{str(path)!r} has a folder or file name that is not valid text (UTF-8), which the "
                                  "image reader cannot open: rename it, or copy the image to a folder with a plain "
                                  "name.")
        if not (path.is_dir() or path.is_file()):
            raise InputImageError(f"{path} is neither a file nor a folder (a device or a pipe?). Give an image "
                                  "file (NIfTI, NRRD, MHA...) or a DICOM folder.")
        try:
            with files.native_stderr_captured() as native:
                if path.is_dir():
                    series_reader = sitk.ImageSeriesReader()
                    series = series_reader.GetGDCMSeriesIDs(str(path))
                    if not series:
                        raise InputImageError(
                            f"The folder {path} holds no DICOM series. Give the folder that contains the slice "
                            "files of one series, or an image file (NIfTI, NRRD, MHA...)."
                        )
                    names = max((series_reader.GetGDCMSeriesFileNames(str(path), uid) for uid in series), key=len)
                    header, _ = files.read_header(names[0], slices=len(names))
                    _check_scalar_3d(header.size, header.components, header.pixel_type)
                    files.check_memory_budget(header, path, max_bytes)
                    series_reader.SetFileNames(names)
                    series_reader.MetaDataDictionaryArrayUpdateOn()  # each slice's position, for the check below
                    image = series_reader.Execute()
                    _check_even_slices(_slice_positions(series_reader, len(names)), path)
                else:
                    files.check_data_files(path)
                    header, reader = files.read_header(path)
                    _check_scalar_3d(header.size, header.components, header.pixel_type)
                    files.check_memory_budget(header, path, max_bytes)
                    with files.checked_complete(path):
                        image = reader.Execute()
        except RuntimeError as error:
            if path.is_file():
                files.check_complete(path)  # a damaged file (ITK may stumble on it in the header): say so
            reason = files.itk_reason(error, native)
            short = files.short_data_refusal(path, reason)  # a raw NRRD or MetaImage cut short
            if short is not None:
                raise short from error
            raise InputImageError(
                f"SimpleITK cannot read {path}: {reason}. Use a format SimpleITK "
                "reads (NIfTI, NRRD, MHA, a DICOM folder...) or convert the file, e.g. by saving it from Slicer."
            ) from error
        return cls.from_sitk(image)

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """A SimpleITK image (LPS) holding ``array`` (default: this volume's voxels) with this volume's geometry."""
        array = self.array if array is None else np.asarray(array)
        if array.shape != self.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume's (K, J, I) shape {self.shape}")
        return sitk_image(array, self.ijk_to_ras)

    @property
    def shape(self) -> tuple:
        """Array shape (K, J, I)."""
        return tuple(self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    def validate(self) -> None:
        """Raise InputImageError, saying what to do, if this volume cannot be segmented."""
        array = self.array
        if array.ndim != 3:
            raise InputImageError(
                f"The image has {array.ndim} dimensions (shape {array.shape}); FastSAM3D segments 3D scalar "
                "volumes. Load a 3D volume, or extract one 3D scalar volume from this image first."
            )
        if array.size == 0:
            raise InputImageError(
                f"The image is empty (shape {array.shape}: no voxels). Load a volume that has image data; if "
                "it was read from DICOM, check that the folder holds the whole series."
            )
        if 1 in array.shape:
            size = "x".join(str(n) for n in array.shape[::-1] if n != 1)
            raise InputImageError(
                f"The image is a single slice ({size} pixels); FastSAM3D segments 3D volumes. Load the whole "
                "series (for DICOM, the folder with all slices) or a 3D file."
            )
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
            raise InputImageError(
                f"The image has voxels of type {array.dtype}; a real-valued scalar volume is needed. Convert it "
                "to a scalar (e.g. magnitude or one component) first."
            )
        spacing = self.spacing
        if not np.all(np.isfinite(self.ijk_to_ras)) or np.any(spacing <= 0) or \
                abs(np.linalg.det(self.ijk_to_ras[:3, :3])) <= 1e-12 * np.prod(spacing):
            raise InputImageError(
                f"The image geometry is invalid (voxel spacing {spacing}, IJK-to-RAS matrix not invertible). "
                "Fix the spacing/direction in the file header (e.g. in Slicer's Volumes module) and try again."
            )
        low, high = _value_range(array)
        if np.issubdtype(array.dtype, np.floating) and not (np.isfinite(low) and np.isfinite(high)):
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))  # counted only to say how many
            raise InputImageError(
                f"The image has {bad} NaN or infinite voxels. Replace them with a finite value (for example "
                "the image minimum, or 0) before segmenting, e.g. numpy.nan_to_num or Slicer's "
                "'Threshold Scalar Volume' module."
            )
        if low == high:
            raise InputImageError(
                f"All voxels of the image have the same value ({low}); there is nothing to segment. Check that "
                "the right volume is selected and that it was loaded completely."
            )


def _value_range(array: np.ndarray):
    """(min, max) of ``array``: NaN if it holds a NaN, so a non-finite pair flags NaN or infinite voxels.

    One multi-threaded pass with PyTorch when the process has already imported it and it takes the array (a
    300x512x512 float32 CT: 67 -> 11-19 ms against NumPy's finiteness check, min and max), else NumPy's min and
    max (a client without PyTorch, unsigned types, flipped views).
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            with warnings.catch_warnings():  # a read-only array (e.g. a view of a file's buffer) is only read here
                warnings.simplefilter("ignore", UserWarning)
                both = torch.aminmax(torch.from_numpy(array))
            return both.min.item(), both.max.item()
        except (TypeError, ValueError, RuntimeError, NotImplementedError):
            pass
    return array.min(), array.max()


def ras_to_ijk(volume: Volume, ras: np.ndarray) -> np.ndarray:
    """Convert RAS points (N, 3) in mm to continuous voxel indices (i, j, k) of ``volume``."""
    return apply_affine(np.linalg.inv(volume.ijk_to_ras), ras)
