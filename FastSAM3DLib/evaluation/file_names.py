"""Image file names: which files are images, their stems, and which names say "label"."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl.gz", ".gipl", ".hdr", ".img.gz",
                  ".img", ".mnc", ".vtk", ".tif", ".tiff")
#: Words in a file name that say it holds labels.
LABEL_WORDS = re.compile(r"seg|label|mask|truth|annot|multiclass|(^|[^a-z])gt([^a-z]|$)", re.IGNORECASE)


def image_stem(path: PathLike) -> str:
    """File name without its image extension (``a.nii.gz`` -> ``a``); a folder keeps its name."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_file(path: Path) -> bool:
    """True for a file with an extension SimpleITK reads as an image (``.raw``/``.img`` data files excluded
    when a header beside them names them)."""
    name = path.name.lower()
    if not path.is_file() or not any(name.endswith(s) for s in IMAGE_SUFFIXES):
        return False
    if name.endswith((".img", ".img.gz")) and path.with_name(image_stem(path) + ".hdr").exists():
        return False
    return True


def looks_like_label(path: PathLike) -> bool:
    """True when the file name says it holds labels (seg, label, mask, gt, truth, annot, multiclass)."""
    return bool(LABEL_WORDS.search(image_stem(path)))
