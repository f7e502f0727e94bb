"""Finding image/label pairs in a folder: labels.json entries, nnU-Net folders, then names and voxel grids.

The rules are those of :func:`~FastSAM3DLib.evaluation.dataset.find_cases` for a folder (see its module doc).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..files import parse_json
from .file_names import LABEL_WORDS, image_stem, is_image_file, looks_like_label
from .label_names import label_names, names_from_dataset_json, names_from_labels_json

_NNUNET_IMAGE_DIRS = {"imagesTr": "labelsTr", "imagesTs": "labelsTs", "imagesVal": "labelsVal"}


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
    word = LABEL_WORDS.search(stem)
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


def discover_pairs(root: Path) -> List[Tuple[Path, Path, Dict[int, str]]]:
    """(image, label, names) for every pair found under the folder ``root``, in the order :mod:`.dataset` describes;
    missing files are left out with an :class:`IncompleteDataWarning`."""
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
                pairs.append((image, label, names_from_labels_json(manifest, label_file) or {}))
                used.update({label.resolve(), image.resolve()})
            else:
                incomplete.append(f"{label if not label.exists() else image} (listed in {manifest})")
                used.update(path.resolve() for path in (label, image) if path.exists())  # never paired otherwise
    for images_dir in sorted(p for p in root.rglob("images*") if p.is_dir() and p.name in _NNUNET_IMAGE_DIRS):
        labels_dir = images_dir.parent / _NNUNET_IMAGE_DIRS[images_dir.name]
        if not labels_dir.is_dir():
            continue
        names = names_from_dataset_json(images_dir.parent / "dataset.json") or {}
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
