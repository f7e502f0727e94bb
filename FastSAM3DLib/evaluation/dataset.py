"""Evaluation data: finding image/label pairs, their structure names, loading them, choosing structures.

A :class:`Case` is one image with one label image. :func:`find_cases` accepts

* a **folder**, searched recursively. Pairs come, in this order, from ``labels.json`` files (this project's
  data format: ``{"<label file>": {"image": "<image file or DICOM folder>", "labels": {"1": {"name": ...}}}}``),
  nnU-Net folders (``imagesTr/<case>_0000.nii.gz`` with ``labelsTr/<case>.nii.gz``, names from
  ``dataset.json``), then, per folder, every remaining file whose name says it is a label (``seg``, ``label``,
  ``mask``, ``gt``, ``truth``, ``annot``, ``multiclass``) paired with the image(s) of that folder sharing the
  longest name prefix with it that ends where a name part ends (``ct_1_seg``: ``ct_1``, not ``ct_10``; the image
  named exactly as the label without its label word first), preferring those on the same voxel grid; a label
  named unlike every image (``segmentation-0``) is paired only with an image on its grid that no other label
  is named like; in a folder with one image, every label is paired with it;
* a **manifest**: a ``.json`` list of ``{"image", "label", "structures"?, "names"?, "case"?}`` objects (or
  ``{"cases": [...]}``), or a ``.csv`` with columns ``image,label[,structures][,case]`` (structures separated
  by ``;``). Relative paths are relative to the manifest;
* an **image** file together with ``label=``.

Folders are searched by :mod:`.discovery`, file names read by :mod:`.file_names`. Label names
(:mod:`.label_names`) come from ``labels.json``, nnU-Net ``dataset.json``, an ITK-SNAP ``.label`` description or a
Slicer colour table (``.ctbl`` / ``*ColorTable.txt``) beside the label file; unnamed values are called
``label_<value>``.
"""
from __future__ import annotations

import csv
import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataSourceError
from ..files import parse_json
from .discovery import IncompleteDataWarning, discover_pairs
from .file_names import IMAGE_SUFFIXES, PathLike, image_stem, is_image_file, looks_like_label
from .label_names import label_names

__all__ = ["Case", "IMAGE_SUFFIXES", "IncompleteDataWarning", "as_cases", "empty_crop_reason", "find_cases",
           "image_stem", "is_image_file", "label_names", "label_values", "load_case", "looks_like_label",
           "manifest_entries", "read_label", "read_label_values", "select_structures", "value_counts"]


@dataclass
class Case:
    """One image and its label image; optionally which structures to evaluate and the label names."""

    name: str
    image: Path
    label: Path
    structures: Optional[List[str]] = None  # label values or (glob) names; None = all
    names: Dict[int, str] = field(default_factory=dict)

    def __post_init__(self):
        self.image, self.label = Path(self.image), Path(self.label)
        self.names = {int(k): str(v) for k, v in (self.names or {}).items()}
        if self.structures is not None:
            self.structures = [str(s) for s in self.structures]

    def structure_name(self, value: int) -> str:
        """The name of label ``value`` (``label_<value>`` when unnamed)."""
        return self.names.get(int(value)) or f"label_{int(value)}"


def _name_cases(pairs, root: Optional[Path]) -> List[Case]:
    def rel(path: Path) -> str:  # as listed under the root: a symbolic link is named by its own path
        try:
            text = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix() if root \
                else path.name
        except ValueError:  # another drive (Windows)
            text = str(path)
        if text.startswith("../"):
            text = str(path)
        parent, _, _ = text.rpartition("/")
        return f"{parent}/{image_stem(path)}" if parent else image_stem(path)

    names = [rel(image) for image, _, _ in pairs]
    cases = []
    for (image, label, names_map), name in zip(pairs, names):
        if names.count(name) > 1:
            name = f"{name}~{image_stem(label)}"
        cases.append(Case(name, image, label, None, names_map))
    return cases


_MANIFEST_FORMS = ("a JSON list of {\"image\": ..., \"label\": ...} objects (or {\"cases\": [...]}), or a CSV "
                   "file with image and label columns, paths relative to the manifest")


def manifest_entries(path: Path) -> List[Dict]:
    """The entries (one dict per case, as written) of a ``.json`` or ``.csv`` manifest; DataSourceError naming
    the file and the accepted forms when it cannot be read as one."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".json":
            data = parse_json(path.read_text(encoding="utf-8"))
            entries = data.get("cases") if isinstance(data, dict) else data
        else:
            with open(path, newline="", encoding="utf-8") as handle:
                entries = list(csv.DictReader(handle))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise DataSourceError(f"{path} is not a readable manifest ({exc}); write it as {_MANIFEST_FORMS}.") from None
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise DataSourceError(f"{path}: expected {_MANIFEST_FORMS}.")
    return entries


def _read_manifest(path: Path) -> List[Case]:
    base = path.parent
    entries = manifest_entries(path)
    cases = []
    for number, entry in enumerate(entries, 1):
        if not entry.get("image") or not entry.get("label"):
            raise DataSourceError(f"{path}: entry {number} needs both 'image' and 'label' ({_MANIFEST_FORMS}).")
        image, label = base / str(entry["image"]).strip(), base / str(entry["label"]).strip()
        structures = entry.get("structures")
        if isinstance(structures, str):
            structures = [s.strip() for s in re.split(r"[;|]", structures) if s.strip()] or None
        elif isinstance(structures, (int, float)):
            structures = [str(int(structures))]
        names = entry.get("names") or label_names(label)
        cases.append((entry.get("case") or None, image, label, structures, names))
    named = _name_cases([(c[1], c[2], c[4]) for c in cases], base)
    return [Case(given or auto.name, image, label, structures, names)
            for (given, image, label, structures, names), auto in zip(cases, named)]


def find_cases(source: PathLike, label: Optional[PathLike] = None) -> List[Case]:
    """The cases of a folder, a manifest (.json/.csv), or one image with ``label`` (see the module docstring)."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if label is not None:
        label = Path(label)
        return [Case(image_stem(source), source, label, None, label_names(label))]
    if source.is_file() and source.suffix.lower() in (".json", ".csv"):
        return _read_manifest(source)
    if source.is_dir():
        return _name_cases(discover_pairs(source), source)
    raise DataSourceError(f"{source} is neither a folder, a .json/.csv manifest, nor an image given with its "
                          "label.")


def as_cases(pairs) -> List[Case]:
    """Normalise what :func:`~FastSAM3DLib.evaluation.evaluate.evaluate_dataset` accepts into cases.

    ``pairs``: a folder/manifest path, a :class:`Case`, ``(image, label)`` tuples, or a list mixing these.
    """
    if isinstance(pairs, (str, Path)):
        return find_cases(pairs)
    if isinstance(pairs, Case):
        return [pairs]
    cases = []
    for item in pairs:
        if isinstance(item, Case):
            cases.append(item)
        elif isinstance(item, (str, Path)):
            cases.extend(find_cases(item))
        else:
            image, label = item[0], item[1]
            cases.append(Case(image_stem(image), Path(image), Path(label), None, label_names(label)))
    seen = set()
    for case in cases:
        if case.name in seen:
            raise ValueError(f"two cases are named {case.name!r}; give them distinct names (Case(name=...))")
        seen.add(case.name)
    return cases


# ------------------------------------------------------------------------------------------------------
# loading and choosing structures


def read_label_values(path: PathLike) -> Dict[int, int]:
    """Nonzero values of a label file and their voxel counts on the label's own grid."""
    return label_values(read_label(path))


def read_label(path: PathLike):
    """The label image at ``path`` as a Volume, as :func:`load_case` reads it (give it there to read it once)."""
    from ..geometry import Volume

    return Volume.from_file(path)


def label_values(label) -> Dict[int, int]:
    """Nonzero values of a label Volume (from :func:`read_label`) and their voxel counts on its own grid."""
    return value_counts(_as_integer_labels(label.array))


def _as_integer_labels(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        return np.rint(array).astype(np.int32)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    return array


#: Voxels counted per step by :func:`value_counts`: ``np.bincount`` makes an int64 copy of what it counts (8 bytes
#: a voxel, 8 MB a step) and ``np.unique`` a sorted one; counting a whole label at once needed 8 times its size
#: (and was slower: 9 s instead of 0.8 s for 0.2 G voxels).
_COUNT_CHUNK = 1 << 20


def _flat_chunks(array: np.ndarray, size: int):
    """The voxels of ``array`` as 1-D pieces of about ``size`` (views where the memory allows; any order)."""
    if array.ndim <= 1 or array.flags.c_contiguous or array.flags.f_contiguous:
        flat = array.reshape(-1, order="A")  # a view of a contiguous array
        for start in range(0, flat.size, size):
            yield flat[start:start + size]
        return
    rows = max(1, size // max(1, array[0].size))  # slabs of the first axis: at most one slab is copied at a time
    for start in range(0, array.shape[0], rows):
        yield array[start:start + rows].reshape(-1)


def value_counts(array: np.ndarray) -> Dict[int, int]:
    """Nonzero values of ``array`` and their voxel counts, in increasing order of value, counted in pieces of
    :data:`_COUNT_CHUNK` voxels (the same numbers as counting the whole array at once, in bounded memory)."""
    dtype = array.dtype
    if np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2:
        low = int(np.iinfo(dtype).min)  # 0, or the offset that makes signed values bincount's indices
        counts = np.zeros(1 << (8 * dtype.itemsize), dtype=np.int64)
        for chunk in _flat_chunks(array, _COUNT_CHUNK):
            if low:
                chunk = chunk.astype(np.int32) - low
            counts += np.bincount(chunk, minlength=counts.size)
        values = np.flatnonzero(counts)
        counts = counts[values]
        values = values + low
    else:
        parts = [np.unique(chunk, return_counts=True) for chunk in _flat_chunks(array, _COUNT_CHUNK)]
        if len(parts) == 1:
            values, counts = parts[0]
        else:
            values, where = np.unique(np.concatenate([v for v, _ in parts] or [array.reshape(0)]),
                                      return_inverse=True)
            counts = np.zeros(len(values), dtype=np.int64)
            np.add.at(counts, where, np.concatenate([c for _, c in parts] or [np.zeros(0, np.int64)]))
    return {int(v): int(c) for v, c in zip(values, counts) if v != 0}


def load_case(case: Case, label=None):
    """(image Volume, integer label array (K, J, I) on the image's grid, label_was_resampled).

    A label on another grid is resampled nearest-neighbour onto the image grid (world coordinates). ``label``:
    ``case.label`` already read (:func:`read_label`), so that it is not read again.
    """
    import SimpleITK as sitk

    from ..geometry import Volume

    image = Volume.from_file(case.image)
    if label is None:
        label = read_label(case.label)
    array = _as_integer_labels(label.array)
    if label.shape == image.shape and np.allclose(label.ijk_to_ras, image.ijk_to_ras, atol=1e-3):
        return image, array, False
    reference = image.to_sitk(np.zeros(image.shape, dtype=np.uint8))
    moving = Volume(array, label.ijk_to_ras).to_sitk()
    resampled = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              moving.GetPixelID())
    return image, sitk.GetArrayFromImage(resampled), True


def select_structures(case: Case, present: Iterable[int],
                      selectors: Optional[Sequence[str]] = None) -> Tuple[List[int], List[Tuple[str, str, str]]]:
    """Which label values of ``case`` to evaluate.

    ``present``: values found in the label image. ``selectors`` (the case's own list wins over this argument):
    label values or names, names matched case-insensitively with shell wildcards (``kidney*``); None = all.
    Returns ``(values, missing)`` where ``missing`` lists ``(selector, value or "", reason)`` for selectors
    that match nothing present.
    """
    present = sorted(int(v) for v in present)
    selectors = case.structures if case.structures is not None else selectors
    if not selectors:
        return present, []
    chosen, missing = [], []
    for selector in selectors:
        selector = str(selector).strip()
        if re.fullmatch(r"-?\d+", selector):
            value = int(selector)
            if value in present:
                chosen.append(value)
            else:
                missing.append((case.structure_name(value), str(value),
                                f"missing: label value {value} has no voxels in {case.label.name} on the image's grid"))
            continue
        pattern = selector.lower()
        named = {v: n for v, n in case.names.items() if fnmatch.fnmatchcase(n.lower(), pattern)}
        named.update({v: case.structure_name(v) for v in present
                      if fnmatch.fnmatchcase(case.structure_name(v).lower(), pattern)})
        hits = [v for v in sorted(named) if v in present]
        chosen.extend(hits)
        if not hits:
            if named:
                values = ", ".join(str(v) for v in sorted(named))
                missing.append((selector, ";".join(str(v) for v in sorted(named)),
                                f"missing: '{selector}' (value {values}) has no voxels in {case.label.name} on the "
                                "image's grid"))
            else:
                source = "its label names" if case.names else "unnamed labels (no labels.json/.label file found)"
                missing.append((selector, "", f"missing: no structure named '{selector}' in this case ({source})"))
    return list(dict.fromkeys(chosen)), missing


def empty_crop_reason(volume, mask: np.ndarray, size: int, spacing: float) -> str:
    """Why a crop of ``size`` voxels of ``spacing`` mm centred on the bounding box of ``mask`` (a structure on
    ``volume``'s grid) holds none of it: its parts lie further apart than the crop is wide (left and right organs
    under one value), or it is too thin or small for the model grid."""
    from .clicks import error_box

    box = error_box(mask, margin=0) or (slice(0, 0),) * 3  # the bounding box, k, j, i
    extent = float(max((s.stop - s.start) * mm for s, mm in zip(box, volume.spacing[::-1])))
    crop = size * spacing
    if extent > crop:
        return (f"not in its crop: the {crop:.0f} mm crop centred on its bounding box holds none of it, as it spans "
                f"{extent:.0f} mm (parts far apart under one value, e.g. left and right organs): give each part a "
                "value of its own")
    return (f"not on the model grid: the structure has no voxel after nearest-neighbour resampling to {spacing} mm "
            "(too thin or small)")
