"""An image file's header, read before any voxel: its size and pixel type, and the memory a run on it needs."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Optional, Tuple

from ..errors import InputImageError

if TYPE_CHECKING:  # annotations only: SimpleITK is imported where it is used
    import SimpleITK as sitk


class ImageHeader:
    """What an image file's header promises: size (i, j, k...), components per voxel, pixel type."""

    def __init__(self, size, components: int, pixel_id: int, pixel_type: str, bytes_per_component: int):
        self.size = tuple(int(n) for n in size)
        self.components = int(components)
        self.pixel_id = int(pixel_id)
        self.pixel_type = pixel_type
        self.bytes_per_component = int(bytes_per_component)

    @property
    def dimension(self) -> int:
        """Number of axes."""
        return len(self.size)

    @property
    def voxel_bytes(self) -> int:
        """Bytes the voxels take in memory."""
        total = self.components * self.bytes_per_component
        for n in self.size:
            total *= n
        return total

    @classmethod
    def from_reader(cls, reader: "sitk.ImageFileReader", slices: int = 1) -> "ImageHeader":
        """From an ``ImageFileReader`` after ``ReadImageInformation``; ``slices`` multiplies the last axis (DICOM)."""
        import SimpleITK as sitk

        size = list(reader.GetSize())
        if slices > 1:
            size = size[:2] + [max(size[2] if len(size) > 2 else 1, 1) * slices]
        components = reader.GetNumberOfComponents()
        pixel_id = reader.GetPixelID()
        try:
            bytes_per_component = sitk.Image([1] * 2, pixel_id, components).GetSizeOfPixelComponent()
        except (RuntimeError, TypeError):
            bytes_per_component = 8
        return cls(size, components, pixel_id, sitk.GetPixelIDValueAsString(pixel_id), bytes_per_component)


def memory_budget() -> int:
    """Memory one segmentation run may take by default: two thirds of this computer's (6 GB where unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 6 << 30
    return max(int(total) * 2 // 3, 1 << 28)


def run_bytes(header: ImageHeader) -> int:
    """About the memory a segmentation run needs for the image of ``header``, beyond the model: 1.5 times its
    voxels (read, SimpleITK's buffer and the array overlap briefly) plus 2.5 bytes a voxel (mask, label, the
    label read back). Measured (one click, demo model, peak above the loaded model): 5.1 bytes a voxel for a
    0.43 GB int16 CT, 4.0 for its uint8 copy, where this says 5.5 and 4."""
    return int(1.5 * header.voxel_bytes + 2.5 * math.prod(header.size))


def check_memory_budget(header: ImageHeader, path, max_bytes: Optional[int] = None) -> None:
    """Refuse (InputImageError) an image whose voxels need more than ``max_bytes``, or by default one whose run
    would need more than :func:`memory_budget` (:func:`run_bytes`)."""
    need = header.voxel_bytes
    size = f"{path} holds {' x '.join(map(str, header.size))} voxels of {header.pixel_type} ({_gb(need)} in memory)"
    advice = ("Crop or downsample it first (e.g. Slicer's Crop Volume module), or raise the limit (--max-image-gb "
              "on the command line, max_bytes= in Python) if this computer has the memory.")
    if max_bytes is not None:
        if need > int(max_bytes):
            raise InputImageError(f"{size}, more than the {_gb(int(max_bytes))} allowed for one image. {advice}")
        return
    budget, run = memory_budget(), run_bytes(header)
    if run > budget:
        raise InputImageError(f"{size}; segmenting it needs about {_gb(run)}, more than the {_gb(budget)} a run may "
                              f"take (two thirds of this computer's memory). {advice}")


def _gb(n: int) -> str:
    gb = n / 1e9
    return f"{gb:,.0f} GB" if gb >= 10 else f"{gb:.2g} GB"


def read_header(path, slices: int = 1) -> Tuple[ImageHeader, "sitk.ImageFileReader"]:
    """The header of an image file (no voxels read) and the reader, ready to ``Execute``; RuntimeError from ITK."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return ImageHeader.from_reader(reader, slices), reader
