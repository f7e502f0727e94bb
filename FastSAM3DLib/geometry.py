"""Geometry: volumes, coordinate systems, the model's region of interest, resampling and paste-back.

This module is the one place that owns the coordinate conventions of the library:

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
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputImageError, PromptError

if TYPE_CHECKING:  # annotations only: SimpleITK is imported where it is used, so importing this module needs none
    import SimpleITK as sitk

MODEL_SPACING = 1.5
MODEL_SIZE = 128

# ------------------------------------------------------------------------------------------------------
# small matrix helpers


def _flip_xy(matrix: np.ndarray) -> np.ndarray:
    """Convert a 4x4 voxel->RAS matrix to voxel->LPS (or back): negate the first two rows."""
    flipped = np.array(matrix, dtype=np.float64, copy=True)
    flipped[:2] *= -1.0
    return flipped


def box_corners(low, high) -> np.ndarray:
    """The 8 corners (8, 3) of the axis-aligned box [low, high]."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    return np.array([np.where(bits, high, low) for bits in np.ndindex(2, 2, 2)])


def _translation(offset) -> np.ndarray:
    """4x4 matrix translating homogeneous voxel indices by ``offset``."""
    matrix = np.eye(4)
    matrix[:3, 3] = np.asarray(offset, dtype=np.float64)
    return matrix


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine matrix to points of shape (..., 3); returns float64 of the same shape."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape[-1:] != (3,):
        raise ValueError(f"points must have shape (N, 3) or (3,), got {points.shape}")
    flat = points.reshape(-1, 3)
    return affine_rows(flat, matrix).reshape(points.shape)


def affine_rows(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``points @ matrix[:3, :3].T + matrix[:3, 3]`` for (N, 3) float64 points, without a BLAS call.

    NumPy's matrix product hands large (N, 3) x (3, 3) products to OpenBLAS threads, which then busy-wait on the
    other cores for ~0.1 s and slow down the PyTorch work of the click that follows (2-3x with two threads);
    three scaled columns cost the same and use one core.
    """
    linear = np.asarray(matrix, dtype=np.float64)
    out = points[:, 0:1] * linear[:3, 0] + linear[:3, 3]
    out += points[:, 1:2] * linear[:3, 1]
    out += points[:, 2:3] * linear[:3, 2]
    return out


def _sitk_geometry(index_to_ras: np.ndarray):
    """(origin, spacing, direction) in SimpleITK's LPS convention for a 4x4 voxel->RAS matrix."""
    to_lps = _flip_xy(index_to_ras)
    spacing = np.linalg.norm(to_lps[:3, :3], axis=0)
    direction = to_lps[:3, :3] / spacing
    return tuple(to_lps[:3, 3]), tuple(spacing), tuple(direction.ravel())


def _sitk_image(array_kji: np.ndarray, index_to_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image holding ``array_kji`` (copied) on the grid ``index_to_ras``."""
    import SimpleITK as sitk
    array = np.asarray(array_kji)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = sitk.GetImageFromArray(array)
    origin, spacing, direction = _sitk_geometry(index_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def _resample(image: sitk.Image, grid_to_ras: np.ndarray, size_ijk, interpolator, default: float,
              output_pixel=None) -> np.ndarray:
    """Resample ``image`` onto the grid (``grid_to_ras``, size in i,j,k order); returns the (k, j, i) array."""
    import SimpleITK as sitk
    origin, spacing, direction = _sitk_geometry(grid_to_ras)
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputDirection(direction)
    resampler.SetSize([int(n) for n in size_ijk])
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(default)
    if output_pixel is not None:
        resampler.SetOutputPixelType(output_pixel)
    return sitk.GetArrayFromImage(resampler.Execute(image))


# ------------------------------------------------------------------------------------------------------
# Volume


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
        return cls(sitk.GetArrayFromImage(image), _flip_xy(ijk_to_lps))

    @classmethod
    def from_file(cls, path, max_bytes: int | None = None) -> Volume:
        """Read any image SimpleITK reads; a directory is read as a DICOM series (the largest one in it).

        The header is read first, and these are refused with InputImageError before any voxel is allocated:
        images that are not 3D scalar volumes, images whose voxels need more than ``max_bytes`` (by default, whose
        segmentation would need more than two thirds of this computer's memory: :func:`FastSAM3DLib.files.run_bytes`),
        truncated or damaged files, and paths that are neither a file nor a folder (devices, pipes).
        """
        import SimpleITK as sitk

        from . import files

        path = Path(path)
        if not path.exists():
            raise InputImageError(f"{path} does not exist. Check the path of the image file or DICOM folder.")
        from .files import utf8_path

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
        return _sitk_image(array, self.ijk_to_ras)

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


# ------------------------------------------------------------------------------------------------------
# Region of interest in model space


@dataclass(frozen=True, eq=False)
class RegionOfInterest:
    """A model-space box: voxel (x,y,z) of the model input -> RAS via model_to_ras."""

    model_to_ras: np.ndarray
    size: tuple = (MODEL_SIZE, MODEL_SIZE, MODEL_SIZE)

    def __post_init__(self):
        matrix = np.array(self.model_to_ras, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"model_to_ras must be a 4x4 matrix, got shape {matrix.shape}")
        matrix.flags.writeable = False
        size = tuple(int(n) for n in self.size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"size must be three positive integers, got {self.size}")
        object.__setattr__(self, "model_to_ras", matrix)
        object.__setattr__(self, "size", size)

    def __eq__(self, other):
        if not isinstance(other, RegionOfInterest):
            return NotImplemented
        return self.size == other.size and np.array_equal(self.model_to_ras, other.model_to_ras)

    def __hash__(self):
        return hash((self.size, (self.model_to_ras + 0.0).tobytes()))  # + 0.0 maps -0.0 to 0.0

    def ras_to_model(self, ras: np.ndarray) -> np.ndarray:
        """Convert RAS points (N, 3) to continuous model voxel coordinates (x, y, z) of this box."""
        return apply_affine(np.linalg.inv(self.model_to_ras), ras)

    def model_to_ras_points(self, xyz: np.ndarray) -> np.ndarray:
        """Convert model voxel coordinates (N, 3) in (x, y, z) order to RAS points."""
        return apply_affine(self.model_to_ras, xyz)

    def contains(self, ras: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """True for each RAS point inside the box shrunk by ``margin`` model voxels (the box spans -0.5..size-0.5)."""
        xyz = self.ras_to_model(ras).reshape(-1, 3)
        size = np.asarray(self.size, dtype=np.float64)
        inside = (xyz >= -0.5 + margin) & (xyz <= size - 0.5 - margin)
        return inside.all(axis=1).reshape(np.shape(ras)[:-1])

    def sub_grid(self, start, size=(MODEL_SIZE, MODEL_SIZE, MODEL_SIZE)) -> RegionOfInterest:
        """The box of the same grid whose voxel 0 is this box's voxel ``start`` (may lie outside), of ``size``."""
        return RegionOfInterest(self.model_to_ras @ _translation(start), tuple(size))

    def extent_corners_ras(self) -> np.ndarray:
        """RAS positions (8, 3) of the corners of the box's extent (half a voxel beyond the outer centres)."""
        return self.model_to_ras_points(box_corners(-0.5, np.asarray(self.size) - 0.5))


def _closest_ras_axes(directions: np.ndarray):
    """For each RAS axis, the voxel axis closest to it and whether that voxel axis points the opposite way.

    The rule of torchio's ToCanonical (nibabel's orientation rule): orthogonalise the direction matrix, then
    walk the voxel axes in order, give each the still free world axis with the largest absolute component.
    """
    u, _, vt = np.linalg.svd(directions)
    rotation = u @ vt
    voxel_axis = [0, 0, 0]
    flipped = [False, False, False]
    for axis in range(3):
        column = rotation[:, axis]
        world = int(np.argmax(np.abs(column)))
        voxel_axis[world] = axis
        flipped[world] = bool(column[world] < 0)
        rotation[world, :] = 0.0
    return voxel_axis, flipped


def canonical_grid(volume: Volume, spacing: float = MODEL_SPACING) -> RegionOfInterest:
    """The whole grid of torchio's ``ToCanonical()(Resample(spacing)(image))`` for this volume, as a box."""
    size_ijk = np.array(volume.shape[::-1], dtype=np.float64)
    old_spacing = volume.spacing
    directions = volume.ijk_to_ras[:3, :3] / old_spacing
    centre = apply_affine(volume.ijk_to_ras, (size_ijk - 1) / 2)
    # torchio: floor(old_size * old_spacing / new_spacing); snap float noise of the spacing (a column norm
    # here) so that an exact multiple stays exact.
    ratio = size_ijk * old_spacing / spacing
    ratio = np.where(np.abs(ratio - np.round(ratio)) <= 1e-9 * np.maximum(ratio, 1.0), np.round(ratio), ratio)
    new_size = np.maximum(np.floor(ratio), 1.0)
    new_size[size_ijk == 1] = 1.0
    resampled_to_ras = np.eye(4)
    resampled_to_ras[:3, :3] = directions * spacing
    resampled_to_ras[:3, 3] = centre - directions @ ((new_size - 1) / 2 * spacing)

    voxel_axis, flipped = _closest_ras_axes(directions)
    model_to_resampled = np.zeros((4, 4))
    model_to_resampled[3, 3] = 1.0
    for world in range(3):
        axis = voxel_axis[world]
        if flipped[world]:
            model_to_resampled[axis, world] = -1.0
            model_to_resampled[axis, 3] = new_size[axis] - 1
        else:
            model_to_resampled[axis, world] = 1.0
    size = tuple(int(new_size[voxel_axis[world]]) for world in range(3))
    return RegionOfInterest(resampled_to_ras @ model_to_resampled, size)


def _torchio_crop_start(centre: float, target: int) -> int:
    """First voxel of torchio CropOrPad's window of ``target`` voxels around ``centre`` (voxel units, mask rule).

    torchio moves a centre by -0.5 when ``target`` is even XOR the centre is on a voxel index; the window then
    starts at ``centre - target / 2``, which is always a whole number here.
    """
    on_index = float(centre) % 1 == 0
    even = target % 2 == 0
    if even != on_index:
        centre -= 0.5
    return int(centre - target / 2)


def _torchio_centre_start(length: int, target: int) -> int:
    """First voxel of torchio CropOrPad's window when it centres on the volume (all-zero mask fallback)."""
    if length >= target:
        return int(np.ceil((length - target) / 2))
    return -int(np.ceil((target - length) / 2))


def _check_points(volume: Volume, ras_points: np.ndarray) -> np.ndarray:
    """Return ras_points as (N, 3) float64; PromptError if empty, not finite or outside the volume."""
    points = np.asarray(ras_points, dtype=np.float64)
    if points.size == 0 or points.shape[-1] != 3 or not np.all(np.isfinite(points)):
        raise PromptError(
            f"Got points of shape {points.shape}; give at least one point as finite (R, A, S) coordinates in mm "
            "inside the volume."
        )
    points = points.reshape(-1, 3)
    ijk = ras_to_ijk(volume, points)
    limit = np.array(volume.shape[::-1], dtype=np.float64) - 0.5
    outside = np.any((ijk < -0.5 - 1e-6) | (ijk > limit + 1e-6), axis=1)
    if outside.any():
        first = points[np.argmax(outside)]
        raise PromptError(
            f"{int(outside.sum())} point(s) lie outside the volume (e.g. R={first[0]:.1f}, A={first[1]:.1f}, "
            f"S={first[2]:.1f} mm). Click inside the image; remove or move points placed outside it, or check "
            "that the point list belongs to this volume and is not moved by a transform."
        )
    return points


def roi_around(volume: Volume, ras_points: np.ndarray, size: int = MODEL_SIZE,
               spacing: float = MODEL_SPACING) -> RegionOfInterest:
    """The ``size``^3 box of the canonical grid centred on the voxel nearest the centre of the points' bounding box.

    For that centre voxel the box is the one torchio's CropOrPad cuts (a one-voxel mask there); it may reach
    beyond the volume (zero padding). PromptError if a point lies outside the volume.
    """
    points = _check_points(volume, ras_points)
    grid = canonical_grid(volume, spacing)
    xyz = grid.ras_to_model(points)
    centre = np.floor((xyz.min(axis=0) + xyz.max(axis=0)) / 2 + 0.5)
    start = [_torchio_crop_start(c, size) for c in centre]
    return grid.sub_grid(start, (size, size, size))


def roi_centred_on_mask(volume: Volume, mask_kji: np.ndarray, size: int = MODEL_SIZE,
                        spacing: float = MODEL_SPACING) -> RegionOfInterest:
    """The official evaluation box: torchio ``CropOrPad(size, mask_name=...)`` of the resampled canonical mask.

    ``mask_kji`` (nonzero = object) lies on ``volume``'s grid; it is resampled nearest-neighbour onto the
    canonical grid and the box is centred on its bounding box (on the volume centre when it is empty).
    """
    import SimpleITK as sitk
    mask = np.asarray(mask_kji)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's (K, J, I) shape {volume.shape}")
    grid = canonical_grid(volume, spacing)
    resampled = _resample_onto(Volume((mask != 0).astype(np.uint8), volume.ijk_to_ras), grid,
                               sitk.sitkNearestNeighbor)
    present = [np.flatnonzero(resampled.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(len(p) == 0 for p in present):
        start = [_torchio_centre_start(length, size) for length in grid.size]
    else:
        start = [_torchio_crop_start((p[0] + p[-1] + 1) / 2, size) for p in present]
    return grid.sub_grid(start, (size, size, size))


# ------------------------------------------------------------------------------------------------------
# Resampling between the source volume and model space


def _resample_onto(volume: Volume, roi: RegionOfInterest, interpolator) -> np.ndarray:
    """Resample the volume onto the ROI grid (zero outside the volume), in the volume's pixel type, (x, y, z)."""
    return _resample_onto_kji(volume, roi, interpolator).transpose(2, 1, 0)


def _resample_onto_kji(volume: Volume, roi: RegionOfInterest, interpolator) -> np.ndarray:
    """:func:`_resample_onto` in SimpleITK's own (k, j, i) order, before the transposing view to (x, y, z)."""
    ijk = ras_to_ijk(volume, roi.extent_corners_ras())
    low, high = ijk.min(axis=0), ijk.max(axis=0)
    last = np.array(volume.shape[::-1]) - 1
    # the source block the interpolator can touch (plus one voxel against float noise), clipped to the volume
    first = np.maximum(np.floor(low).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(high).astype(int) + 1, last) + 1
    if np.any(stop <= first):
        dtype = np.uint8 if volume.array.dtype == np.bool_ else volume.array.dtype
        return np.zeros(roi.size[::-1], dtype=dtype)
    block = volume.array[first[2]:stop[2], first[1]:stop[1], first[0]:stop[0]]
    image = _sitk_image(block, volume.ijk_to_ras @ _translation(first))
    # like torchio, interpolated values keep the source pixel type (ITK clamps and truncates towards zero)
    return _resample(image, roi.model_to_ras, roi.size, interpolator, 0.0)


def _resample_onto_torch(volume: Volume, roi: RegionOfInterest) -> np.ndarray:
    """:func:`_resample_onto` with linear interpolation in PyTorch: float32 (x, y, z), C-contiguous."""
    import torch

    from . import resample

    values = resample.resample_linear(volume.array, volume.ijk_to_ras, roi.model_to_ras, roi.size, 0.0,
                                      ijk_order=True)
    return values.to(torch.float32).numpy()


def _masked_z_normalise(values: np.ndarray) -> np.ndarray:
    """torchio ``ZNormalization(masking_method=lambda x: x > 0)``, in place on the float32 ``values`` (returned):
    statistics over x > 0 (float64, unbiased std), applied to all voxels.

    The foreground is gathered by a boolean index: on real CT and MR regions (long runs of foreground) it took
    2.2-4.3 ms against 4.5-5.4 ms for ``np.compress``, which wins only on speckled masks (4.8 against 16 ms).
    """
    foreground = values[values > 0]
    if foreground.size < 2:
        raise InputImageError(
            "The region around the points has fewer than two voxels brighter than 0, so it cannot be "
            "normalised the way the models were trained (statistics over voxels > 0). Click on the object "
            "itself; if the image has no positive intensities, rescale it (e.g. shift it so tissue is > 0)."
        )
    mean = foreground.mean(dtype=np.float64)
    std = foreground.std(dtype=np.float64, ddof=1)
    if std == 0:
        raise InputImageError(
            "All voxels brighter than 0 in the region around the points have the same value, so it cannot be "
            "normalised (standard deviation 0). Click on a part of the image with contrast, or check the volume."
        )
    np.subtract(values, np.float32(mean), out=values)
    return np.divide(values, np.float32(std), out=values)


def _float32_xyz(values_kji: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 (x, y, z) copy of a (k, j, i) array: one multi-threaded pass in PyTorch when the
    process has already imported it (2x faster than NumPy's transposing copy), else NumPy; the same values."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            source = torch.from_numpy(values_kji)
        except (TypeError, ValueError):  # a type PyTorch does not hold: NumPy below
            pass
        else:
            out = torch.empty(values_kji.shape[::-1], dtype=torch.float32)
            return out.copy_(source.permute(2, 1, 0)).numpy()
    return np.ascontiguousarray(values_kji.transpose(2, 1, 0), dtype=np.float32)


def sitk_model_input(volume: Volume, roi: RegionOfInterest, normalize: bool = True) -> np.ndarray:
    """:func:`extract_model_input` through SimpleITK (bit-identical to torchio's resampling, ties included);
    needs no PyTorch (the remote client uses it directly)."""
    import SimpleITK as sitk

    values = _float32_xyz(_resample_onto_kji(volume, roi, sitk.sitkLinear))
    return _finite_and_normalised(values, normalize)


#: Normalised model input further than this many standard deviations from the mean is refused: it comes from a
#: fill value such as -3.4e38 ("no data"), overflows the network to NaN (its layer norms square the features),
#: and was reported as damaged weights.
MAX_NORMALISED_MAGNITUDE = 1e12


def _finite_and_normalised(values: np.ndarray, normalize: bool) -> np.ndarray:
    """``values`` (float32 model input) after the finiteness check, masked-z-normalised in place if asked."""
    if not np.all(np.isfinite(values)):
        raise InputImageError(
            "The region around the points holds NaN or infinite voxels, or values beyond the range of 32-bit "
            "floats (+-3.4e38). Replace non-finite voxels with a finite value (e.g. the image minimum), or rescale "
            "the image (e.g. to Hounsfield units), before segmenting."
        )
    if not normalize:
        return values
    values = _masked_z_normalise(values)
    low, high = float(values.min()), float(values.max())
    if max(-low, high) > MAX_NORMALISED_MAGNITUDE:
        raise InputImageError(
            f"The region around the points holds extreme values ({low:.3g} to {high:.3g} standard deviations "
            "from the tissue's mean), e.g. a 'no data' fill of -3.4e38, which would overflow the model. Replace "
            "them with an ordinary value (e.g. the lowest value of real tissue, or 0) and segment again."
        )
    return values


def extract_model_input(volume: Volume, roi: RegionOfInterest, normalize: bool = True) -> np.ndarray:
    """The model input: float32 (x, y, z) array of the volume resampled linearly onto ``roi`` (0 outside).

    As in torchio the interpolated values keep the volume's pixel type; with ``normalize`` the masked
    z-normalisation of the official pipeline follows (mean and unbiased std over voxels > 0, applied to all).
    Resampled with SimpleITK when it is installed, else (or with ``FASTSAM3D_RESAMPLE=torch``) in PyTorch
    (:mod:`.resample`: ITK's arithmetic, equal but at exact ties).
    """
    from . import resample

    if resample.backend("input") == "sitk":
        return sitk_model_input(volume, roi, normalize)
    return _finite_and_normalised(_resample_onto_torch(volume, roi), normalize)


def extract_label(volume_like: Volume, roi: RegionOfInterest) -> np.ndarray:
    """A label volume resampled nearest-neighbour onto ``roi``, (x, y, z) integer array (0 outside), for evaluation."""
    import SimpleITK as sitk
    array = volume_like.array
    if np.issubdtype(array.dtype, np.floating):
        volume_like = Volume(np.rint(array).astype(np.int32), volume_like.ijk_to_ras)
    values = _resample_onto(volume_like, roi, sitk.sitkNearestNeighbor)
    return np.ascontiguousarray(values)


def _model_logits(logits, size) -> np.ndarray:
    """Model-space logits as a float32 (x, y, z) array of ``size``; a 4x smaller grid is upsampled like the official code."""
    shape = tuple(logits.shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    if shape == tuple(size) and isinstance(logits, np.ndarray):
        return np.asarray(logits, dtype=np.float32).reshape(shape)
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(logits).detach().reshape(shape)
    if shape == tuple(n // 4 for n in size):
        with torch.no_grad():
            tensor = F.interpolate(tensor.float()[None, None], size=tuple(size), mode="trilinear",
                                   align_corners=False)[0, 0]
    elif shape != tuple(size):
        raise ValueError(f"logits of shape {tuple(logits.shape)} fit neither the ROI {size} nor its quarter")
    return tensor.float().cpu().numpy()


def source_box(volume: Volume, roi: RegionOfInterest, low_xyz, high_xyz):
    """Source voxels (first, stop) in (i, j, k), clipped to the volume, whose centres may lie in the model box."""
    ijk = ras_to_ijk(volume, roi.model_to_ras_points(box_corners(low_xyz, high_xyz)))
    last = np.array(volume.shape[::-1]) - 1
    first = np.maximum(np.ceil(ijk.min(axis=0) - 1e-6).astype(int), 0)
    stop = np.minimum(np.floor(ijk.max(axis=0) + 1e-6).astype(int), last) + 1
    return first, np.maximum(stop, first)


def paste_back(volume: Volume, roi: RegionOfInterest, logits, threshold: float = 0.0):
    """Threshold model-space logits on the source grid, only inside the ROI's bounding box.

    ``logits``: (x, y, z) array or tensor, the ROI's size or the 4x smaller low-res grid (upsampled trilinearly,
    ``align_corners=False``). The logits are resampled linearly onto the source voxels and thresholded
    (``> threshold``). Returns ``(region, mask)``: ``region = (slice_k, slice_j, slice_i)`` on the source
    array, clipped to the volume, and ``mask`` a bool array of that region's shape (False outside the ROI).
    Computed in PyTorch on the logits' device (:func:`.resample.threshold_logits`: the same mask as SimpleITK) or,
    with ``FASTSAM3D_RESAMPLE=sitk``, with SimpleITK. Logits holding NaN or infinity are refused (ValueError):
    the paths would spread them differently (a matrix product makes one NaN blank whole planes).
    """
    from . import resample

    finite = bool(logits.isfinite().all()) if hasattr(logits, "isfinite") else bool(np.isfinite(logits).all())
    if not finite:
        raise ValueError("the logits hold NaN or infinite values; a model output like that has no mask")
    if resample.backend("paste") != "sitk":
        return _paste_back_torch(volume, roi, logits, threshold)
    return paste_field_sitk(volume, roi, _model_logits(logits, roi.size), threshold)


def paste_field_sitk(volume: Volume, roi: RegionOfInterest, field: np.ndarray, threshold: float = 0.0):
    """:func:`paste_back` of the full-size (x, y, z) float32 ``field`` with SimpleITK's linear resampling.

    Which source voxels lie inside the ROI is decided by :func:`.grid_map.inside_field`, the rule of the PyTorch
    path, not by ITK: a voxel centre exactly on a face of the ROI (3 mm slices and a 1.5 mm model grid make that
    common) falls either way with ITK's float noise. Their values are ITK's: the field is padded with a copy of
    its edge voxels, which gives at the face exactly ITK's half-voxel clamp.
    """
    import SimpleITK as sitk

    from .grid_map import index_map, inside_field

    size = np.asarray(roi.size, dtype=np.float64)
    first, stop = source_box(volume, roi, -0.5, size - 0.5)
    region = tuple(slice(int(first[axis]), int(stop[axis])) for axis in (2, 1, 0))
    mask = np.zeros(tuple(int(stop[axis] - first[axis]) for axis in (2, 1, 0)), dtype=bool)
    above = field > threshold
    positive = [np.flatnonzero(np.any(above, axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if mask.size == 0 or any(len(p) == 0 for p in positive):
        return region, mask
    # a linear interpolant exceeds the threshold only within one model voxel of a voxel that does
    low = np.maximum([p[0] - 1.0 for p in positive], -0.5)
    high = np.minimum([p[-1] + 1.0 for p in positive], size - 0.5)
    box_first, box_stop = source_box(volume, roi, low, high)
    box_first, box_stop = np.maximum(box_first, first), np.maximum(np.minimum(box_stop, stop), box_first)
    if np.any(box_stop <= box_first):
        return region, mask
    crop_first = np.maximum([p[0] - 1 for p in positive], 0)  # the model voxels those source voxels interpolate
    crop_stop = np.minimum([p[-1] + 2 for p in positive], roi.size)
    crop = field[crop_first[0]:crop_stop[0], crop_first[1]:crop_stop[1], crop_first[2]:crop_stop[2]]
    pad = [(int(crop_first[a] == 0), int(crop_stop[a] == roi.size[a])) for a in range(3)]  # at the ROI's faces
    crop = np.pad(crop, pad, mode="edge")
    crop_to_ras = roi.model_to_ras @ _translation(crop_first - np.array([before for before, _ in pad]))
    image = _sitk_image(np.ascontiguousarray(crop.transpose(2, 1, 0)), crop_to_ras)
    box_to_ras = volume.ijk_to_ras @ _translation(box_first)
    values = _resample(image, box_to_ras, box_stop - box_first, sitk.sitkLinear, -np.inf, sitk.sitkFloat32)
    inside = inside_field(index_map(roi.model_to_ras, box_to_ras), box_stop - box_first, roi.size)
    offset = box_first - first
    box = tuple(slice(int(offset[axis]), int(offset[axis] + box_stop[axis] - box_first[axis])) for axis in (2, 1, 0))
    mask[box] = (values > threshold) & inside
    return region, mask


def positive_model_box(spans, shape, size):
    """The model-voxel box ``(low, high)`` (x, y, z) outside which a field cannot exceed a threshold.

    ``spans``: per axis the first and last index of the field's (``shape``) slabs holding a value above it;
    the field is upsampled linearly to ``size`` (when smaller) and then interpolated linearly: an upsampled
    voxel can exceed the threshold only where it reads such a slab, and an interpolated position only within one
    model voxel of such a voxel.
    """
    from . import resample

    low, high = [], []
    for axis in range(3):
        weights = resample.upsample_matrix(shape[axis], size[axis])[:, spans[axis][0]:spans[axis][1] + 1]
        touched = np.flatnonzero(np.any(weights != 0, axis=1))
        low.append(max(touched[0] - 1.0, -0.5))
        high.append(min(touched[-1] + 1.0, size[axis] - 0.5))
    return np.array(low), np.array(high)


def _paste_back_torch(volume: Volume, roi: RegionOfInterest, logits, threshold: float):
    """:func:`paste_back` in PyTorch: the same region and mask, without forming the upsampled 128³ field."""
    import torch

    from . import resample

    tensor = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    shape = tuple(tensor.shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    if shape != tuple(roi.size) and shape != tuple(n // 4 for n in roi.size):
        raise ValueError(f"logits of shape {tuple(logits.shape)} fit neither the ROI {roi.size} nor its quarter")
    tensor = tensor.detach().reshape(shape)
    size = np.asarray(roi.size, dtype=np.float64)
    first, stop = source_box(volume, roi, -0.5, size - 0.5)
    region = tuple(slice(int(first[axis]), int(stop[axis])) for axis in (2, 1, 0))
    region_shape = tuple(int(stop[axis] - first[axis]) for axis in (2, 1, 0))
    above = tensor > threshold
    positive = [torch.nonzero(above.any(dim=a).any(dim=b - 1)).flatten().cpu().numpy()
                for a, b in ((1, 2), (0, 2), (0, 1))]
    if int(np.prod(region_shape)) == 0 or any(len(p) == 0 for p in positive):
        return region, np.zeros(region_shape, dtype=bool)
    low, high = positive_model_box([(p[0], p[-1]) for p in positive], shape, roi.size)
    box_first, box_stop = source_box(volume, roi, low, high)
    box_first, box_stop = np.maximum(box_first, first), np.maximum(np.minimum(box_stop, stop), box_first)
    if np.any(box_stop <= box_first):
        return region, np.zeros(region_shape, dtype=bool)
    values = resample.threshold_logits(tensor, roi.model_to_ras, roi.size, volume.ijk_to_ras, box_first,
                                       box_stop - box_first, threshold).cpu().numpy()
    if np.array_equal(box_first, first) and np.array_equal(box_stop, stop):
        return region, values
    mask = np.zeros(region_shape, dtype=bool)
    offset = box_first - first
    box = tuple(slice(int(offset[axis]), int(offset[axis] + box_stop[axis] - box_first[axis])) for axis in (2, 1, 0))
    mask[box] = values
    return region, mask
