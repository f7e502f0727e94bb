"""Label names from the description files beside a label image: this project's ``labels.json``, nnU-Net's
``dataset.json``, an ITK-SNAP ``.label`` description or a Slicer colour table (``.ctbl``, ``*_ColorTable.txt``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

from ..files import parse_json
from .file_names import PathLike, image_stem


def names_from_labels_json(path: Path, label_file: str) -> Optional[Dict[int, str]]:
    """The names ``labels.json`` at ``path`` gives the values of ``label_file``; None when it names none."""
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


def names_from_dataset_json(path: Path) -> Optional[Dict[int, str]]:
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
            names = names_from_labels_json(candidate, label.name)
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
            names = names_from_dataset_json(candidate)
            if names:
                return names
    return {}
