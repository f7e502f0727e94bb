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

Label names come from ``labels.json``, nnU-Net ``dataset.json``, an ITK-SNAP ``.label`` description or a
Slicer colour table (``.ctbl`` / ``*ColorTable.txt``) beside the label file; unnamed values are called
``label_<value>``.
"""
from __future__ import annotations

import csv
import fnmatch
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DataSourceError
from ..files import parse_json

PathLike = Union[str, Path]

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl.gz", ".gipl", ".hdr", ".img.gz",
                  ".img", ".mnc", ".vtk", ".tif", ".tiff")
_LABEL_WORDS = re.compile(r"seg|label|mask|truth|annot|multiclass|(^|[^a-z])gt([^a-z]|$)", re.IGNORECASE)
_NNUNET_IMAGE_DIRS = {"imagesTr": "labelsTr", "imagesTs": "labelsTs", "imagesVal": "labelsVal"}


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


# ------------------------------------------------------------------------------------------------------
# file names


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
    return bool(_LABEL_WORDS.search(image_stem(path)))


# ------------------------------------------------------------------------------------------------------
# label names


def _names_from_labels_json(path: Path, label_file: str) -> Optional[Dict[int, str]]:
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = data.get(label_file) if isinstance(data, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("labels"), dict):
        return None
    names = {}
    for value, info in entry["labels"].items():
        name = info.get("name") if isinstance(info, dict) else info
        if str(value).lstrip("-").isdigit() and name:
            names[int(value)] = str(name)
    return names


def _names_from_dataset_json(path: Path) -> Optional[Dict[int, str]]:
    """nnU-Net v1 (``{"1": "liver"}``) or v2 (``{"liver": 1}``, regions as lists ignored) label names."""
    try:
        labels = parse_json(path.read_text(encoding="utf-8")).get("labels")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(labels, dict):
        return None
    names = {}
    for key, value in labels.items():
        if str(key).isdigit():
            names[int(key)] = str(value)
        elif isinstance(value, int):
            names[value] = str(key)
    names.pop(0, None)
    return names


def _names_from_itksnap(path: Path) -> Dict[int, str]:
    """ITK-SNAP label description: ``IDX R G B A VIS MSH "LABEL"`` per line, ``#`` comments."""
    names = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = re.match(r'\s*(\d+)\s+.*"(.*)"\s*$', line)
        if match and not line.lstrip().startswith("#") and int(match.group(1)) != 0:
            names[int(match.group(1))] = match.group(2)
    return names


def _names_from_color_table(path: Path) -> Dict[int, str]:
    """Slicer colour table: ``value name R G B A`` per line, ``#`` comments."""
    names = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and not line.lstrip().startswith("#") and int(parts[0]) != 0:
            names[int(parts[0])] = parts[1]
    return names


def label_names(label: PathLike) -> Dict[int, str]:
    """Names of the values of ``label``, from the description files beside it ({} when there are none)."""
    label = Path(label)
    folder, stem = label.parent, image_stem(label)
    for candidate in (folder / "labels.json",):
        if candidate.is_file():
            names = _names_from_labels_json(candidate, label.name)
            if names:
                return names
    snap = [folder / f"{stem}.label"] + sorted(folder.glob("*.label"))
    snap = [p for p in dict.fromkeys(snap) if p.is_file()]
    if snap and (snap[0].stem == stem or len(snap) == 1):
        return _names_from_itksnap(snap[0])
    for candidate in (folder / f"{stem}.ctbl", folder / f"{stem}_ColorTable.txt", folder / f"{stem}.txt"):
        if candidate.is_file():
            names = _names_from_color_table(candidate)
            if names:
                return names
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        if candidate.is_file():
            names = _names_from_dataset_json(candidate)
            if names:
                return names
    return {}


# ------------------------------------------------------------------------------------------------------
# finding cases


def _grid_signature(path: Path):
    """(size, origin, spacing, direction) of an image file from its header only; None if unreadable."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return (reader.GetSize(), np.array(reader.GetOrigin()), np.array(reader.GetSpacing()),
                np.array(reader.GetDirection()))
    except RuntimeError:
        return None


def _same_grid(a, b) -> bool:
    return a is not None and b is not None and a[0] == b[0] and all(
        np.allclose(x, y, atol=1e-3) for x, y in zip(a[1:], b[1:]))


_SEPARATORS = "_-. "


def _common_prefix(a: str, b: str) -> int:
    """Characters ``a`` and ``b`` share from the start, ignoring case (an index into both)."""
    n = 0
    for x, y in zip(a, b):
        if x.casefold() != y.casefold():
            break
        n += 1
    return n


def _pairs_by_name(labels: Sequence[Path], images: Sequence[Path]) -> List[Tuple[Path, Path]]:
    """(image, label) pairs of one folder's files by name (see the module doc); labels no image fits are left out.

    In a folder with one image every label is its own (``ct`` with ``liver_mask`` and ``spleen_mask``). Else a
    label belongs to the image named as the label without its label word (``case_10seg``: ``case_10``), else
    to the images whose names share the longest prefix with its own that ends where a name part ends
    (``ct_1_seg``: ``ct_1``, not ``ct_10``; ``brats_seg``: ``brats_t1`` and ``brats_t2``), those on its voxel
    grid preferred. A label no image fits by name (``segmentation-0`` beside ``volume-0``) takes, among the
    images no other label fits by name, those sharing its longest prefix and lying on its grid.
    """
    if len(images) == 1:
        return [(images[0], label) for label in labels]
    grids: Dict[Path, object] = {}  # each header read once per folder

    def on_its_grid(label: Path, candidates: Sequence[Path]) -> List[Path]:
        for path in (label, *candidates):
            if path not in grids:
                grids[path] = _grid_signature(path)
        return [i for i in candidates if _same_grid(grids[label], grids[i])]

    fits = {label: _name_fits(label, images, on_its_grid) for label in labels}
    claimed = {image for found in fits.values() for image in found}
    pairs = []
    for label in labels:
        found = fits[label] or on_its_grid(label, _longest_prefix(label, [i for i in images if i not in claimed]))
        pairs += [(image, label) for image in found]
    return pairs


def _name_fits(label: Path, images: Sequence[Path], on_its_grid) -> List[Path]:
    stem = image_stem(label)
    word = _LABEL_WORDS.search(stem)
    case = (stem[:word.start()] if word else stem).rstrip(_SEPARATORS).casefold()
    exact = [i for i in images if case and image_stem(i).casefold() == case]
    if exact:
        return exact
    scores = [_common_parts(stem, image_stem(i)) for i in images]
    best = [i for i, score in zip(images, scores) if score and score == max(scores)]
    return (on_its_grid(label, best) or best) if len(best) > 1 else best


def _longest_prefix(label: Path, images: Sequence[Path]) -> List[Path]:
    """The images sharing the longest name prefix with the label (all of them when none shares any)."""
    stem = image_stem(label)
    scores = [_common_prefix(stem, image_stem(i)) for i in images]
    return [i for i, score in zip(images, scores) if score == max(scores, default=0)]


def _common_parts(a: str, b: str) -> int:
    """The length of the longest common prefix of the names ``a`` and ``b`` that ends where a part of each ends
    (at a separator, or the name's end): 4 for ``ct_1_seg`` and ``ct_1``, 3 (``ct_``) for ``ct_1_seg`` and
    ``ct_10``, 0 for ``patientC_seg`` and ``patientA``."""
    n = _common_prefix(a, b)
    if all(n == len(x) or x[n] in _SEPARATORS for x in (a, b)):
        return n
    return max((i + 1 for i in range(n) if a[i] in _SEPARATORS), default=0)


class IncompleteDataWarning(UserWarning):
    """A labels.json entry or an nnU-Net image whose image or label file is missing was left out."""


def _discover(root: Path) -> List[Tuple[Path, Path, Dict[int, str]]]:
    pairs, used, incomplete = [], set(), []
    for manifest in sorted(root.rglob("labels.json")):
        try:
            data = parse_json(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for label_file, entry in (data.items() if isinstance(data, dict) else []):
            if not isinstance(entry, dict) or "image" not in entry:
                continue
            label, image = manifest.parent / label_file, manifest.parent / entry["image"]
            if label.exists() and image.exists():
                pairs.append((image, label, _names_from_labels_json(manifest, label_file) or {}))
                used.update({label.resolve(), image.resolve()})
            else:
                incomplete.append(f"{label if not label.exists() else image} (listed in {manifest})")
                used.update(path.resolve() for path in (label, image) if path.exists())  # never paired otherwise
    for images_dir in sorted(p for p in root.rglob("images*") if p.is_dir() and p.name in _NNUNET_IMAGE_DIRS):
        labels_dir = images_dir.parent / _NNUNET_IMAGE_DIRS[images_dir.name]
        if not labels_dir.is_dir():
            continue
        names = _names_from_dataset_json(images_dir.parent / "dataset.json") or {}
        for image in sorted(p for p in images_dir.iterdir() if is_image_file(p)):
            stem = image_stem(image)
            if not re.search(r"_0000$", stem):
                continue
            matches = [p for p in labels_dir.iterdir() if is_image_file(p) and image_stem(p) == stem[:-5]]
            if matches:
                pairs.append((image, matches[0], names))
                used.update({image.resolve(), matches[0].resolve()})
            elif images_dir.name == "imagesTr":  # imagesTs usually has no labels
                incomplete.append(f"the label of {image} (in {labels_dir})")
        used.update(p.resolve() for p in images_dir.iterdir())
        used.update(p.resolve() for p in labels_dir.iterdir())
    folders = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if is_image_file(p) and p.resolve() not in used)
        labels = [p for p in files if looks_like_label(p)]
        images = [p for p in files if not looks_like_label(p)]
        found = _pairs_by_name(labels, images)
        pairs += [(image, label, label_names(label)) for image, label in found]
        paired = {label for _, label in found}
        incomplete += [f"the image of {label} (its folder holds none named like it, nor one on its grid that no "
                       "other label is named like)" for label in labels if images and label not in paired]
    if incomplete:
        warnings.warn(f"{len(incomplete)} case(s) of {root} left out because a file is missing: "
                      + "; ".join(incomplete[:5]) + (" ..." if len(incomplete) > 5 else ""), IncompleteDataWarning,
                      stacklevel=3)
    return pairs


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
        return _name_cases(_discover(source), source)
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
