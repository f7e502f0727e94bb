"""Training data: image/label pairs and phantoms cut once into model-space crops, cached, then sampled.

The crops go through exactly the inference geometry (:mod:`FastSAM3DLib.geometry`): the official
ground-truth-centred box (:func:`~FastSAM3DLib.geometry.roi_centred_on_mask`, torchio ``CropOrPad`` of the
1.5 mm RAS-canonical grid), the linear resampling of :func:`~FastSAM3DLib.geometry.extract_model_input` and
the nearest-neighbour labels of :func:`~FastSAM3DLib.geometry.extract_label`. Resampling is the expensive
part, so :func:`prepare_crops` does it once and stores every crop in a :class:`CropCache` folder (raw
intensities as float16 ``.npy`` where exact enough, binary masks as uint8).

A cached crop is ``size + 2 * margin`` voxels per side around that box. :class:`CropSampler` cuts a random
``size``^3 window out of it (a shift of up to ``margin`` voxels: the object is no longer exactly centred,
as with a user's click), applies the official masked z-normalisation to the window (as inference does),
then the augmentation of :mod:`.augment`. With ``margin=0`` and no augmentation a sample equals
``extract_model_input(volume, roi_centred_on_mask(...))`` and ``extract_label`` bit for bit.

Inputs are found like the evaluation finds them (:func:`FastSAM3DLib.evaluation.dataset.find_cases`):
folders with ``labels.json``, nnU-Net folders, ``*_seg``/``*label*`` pairs, or a .json/.csv manifest.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..files import atomic_output, parse_json
from .augment import AugmentConfig, Augmentation, apply_augmentation, draw_augmentation

DEFAULT_SIZE = 128
DEFAULT_MARGIN = 16
FLOAT16_LIMIT = 60000.0
#: Largest relative rounding error a crop stored as float16 may have (else it is stored as float32).
FLOAT16_TOLERANCE = 5e-4


def float16_exact_enough(image: np.ndarray) -> bool:
    """Whether every voxel of ``image`` survives float16 within :data:`FLOAT16_TOLERANCE` (relative), zeros and
    signs included: true for CT and MR intensities, false for tiny values (ADC maps, probabilities < 6e-5)."""
    values = np.asarray(image, dtype=np.float32)
    if not np.abs(values).max(initial=0) < FLOAT16_LIMIT:
        return False
    rounded = values.astype(np.float16).astype(np.float32)
    return bool(np.all(np.abs(rounded - values) <= FLOAT16_TOLERANCE * np.abs(values)))


@dataclass
class CropEntry:
    """One cached crop: which case and structure it shows and where its arrays are."""

    index: int
    group: str
    case: str
    value: int
    name: str
    voxels: int  # object voxels in the central size^3 box
    image_file: str
    label_file: str


def _plain_file_name(name) -> bool:
    """``name`` is a file name without any folder (on POSIX and Windows alike): an index must not name files
    outside its cache folder (a handed cache whose index names ``../`` or absolute paths)."""
    return isinstance(name, str) and name not in ("", ".", "..") and \
        PurePosixPath(name).name == name and PureWindowsPath(name).name == name


def _read_index(path: Path) -> dict:
    """A crop cache's index, or DataSourceError saying what to do when it is damaged."""
    from ..errors import DataSourceError

    try:
        meta = parse_json(path.read_text(encoding="utf-8"))
        int(meta["size"]), int(meta["margin"])
        for entry in meta["entries"]:
            crop = CropEntry(**entry)
            for name in (crop.image_file, crop.label_file):
                if not _plain_file_name(name):
                    raise ValueError(f"crop {crop.index} names {name!r}, which is not a file in the cache folder")
        return meta
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise DataSourceError(f"{path} is damaged ({type(exc).__name__}: {exc}), so this crop cache cannot be "
                              f"used: build a new one in another folder with 'python -m FastSAM3DLib "
                              f"prepare-data' (or remove {path.parent}).") from None


class CropCache:
    """A folder of cached crops with an ``index.json``; adding is resumable (present crops are skipped)."""

    INDEX = "index.json"

    def __init__(self, root, size: int = DEFAULT_SIZE, margin: int = DEFAULT_MARGIN,
                 float16: bool = True) -> None:
        self.root = Path(root)
        self.size, self.margin, self.float16 = int(size), int(margin), bool(float16)
        self.entries: List[CropEntry] = []
        self.sources: Dict[str, str] = {}  # group -> the resolved folder or manifest its crops were cut from
        index = self.root / self.INDEX
        if index.is_file():
            meta = _read_index(index)
            if (meta["size"], meta["margin"]) != (self.size, self.margin) and meta["entries"]:
                self.size, self.margin = int(meta["size"]), int(meta["margin"])
            self.entries = [CropEntry(**e) for e in meta["entries"]]
            sources = meta.get("sources", {})
            self.sources = {str(k): str(v) for k, v in sources.items()} if isinstance(sources, dict) else {}

    @classmethod
    def open(cls, root) -> "CropCache":
        """An existing cache (its size and margin come from its index); FileNotFoundError if there is none."""
        index = Path(root) / cls.INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{root} holds no crop cache ({cls.INDEX} missing); build it with "
                                    "'python -m FastSAM3DLib prepare-data'")
        meta = _read_index(index)
        return cls(root, meta["size"], meta["margin"])

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def side(self) -> int:
        """Side of a stored crop in voxels (``size + 2 * margin``)."""
        return self.size + 2 * self.margin

    def add_sources(self, sources: Sequence) -> None:
        """Remember which folder or manifest each group of ``sources`` comes from; DataSourceError (changing
        nothing) when a group name would stand for two of them: their cases of the same name would be taken for
        crops already cached."""
        from ..errors import DataSourceError

        this_run: Dict[str, str] = {}
        cached = self.groups()
        for source in sources:
            if not isinstance(source, (str, Path)):
                continue
            group, where = source_group(source), str(Path(source).resolve())
            known = this_run.get(group) or (self.sources.get(group) if cached.get(group) else None)
            if known is not None and known != where:
                raise DataSourceError(
                    f"Two data sources would both be the group '{group}': {known} and {where}. Give one of them "
                    "another name (a symbolic link or manifest file named differently), or use another crop "
                    "cache folder.")
            this_run[group] = where
        self.sources = {**self.sources, **this_run}

    def has(self, group: str, case: str, value: int) -> bool:
        """Whether the crop of structure ``value`` of ``case`` in ``group`` is cached."""
        return any(e.group == group and e.case == case and e.value == value for e in self.entries)

    def add(self, group: str, case: str, value: int, name: str, image: np.ndarray, label: np.ndarray) -> CropEntry:
        """Store one crop (raw (x, y, z) intensities and binary mask, both ``side``^3) and update the index."""
        if image.shape != (self.side,) * 3 or label.shape != image.shape:
            raise ValueError(f"crop arrays must be {(self.side,) * 3}, got {image.shape} and {label.shape}")
        self.root.mkdir(parents=True, exist_ok=True)
        index = len(self.entries)
        stem = f"{index:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', case)}_{value}"
        dtype = np.float16 if self.float16 and float16_exact_enough(image) else np.float32
        _atomic_npy(self.root / f"{stem}_image.npy", image.astype(dtype))
        _atomic_npy(self.root / f"{stem}_label.npy", (label != 0).astype(np.uint8))
        m = self.margin
        voxels = int((label[m:m + self.size, m:m + self.size, m:m + self.size] != 0).sum())
        entry = CropEntry(index, group, case, int(value), name, voxels, f"{stem}_image.npy", f"{stem}_label.npy")
        self.entries.append(entry)
        self._write_index()
        return entry

    def load(self, entry: CropEntry) -> Tuple[np.ndarray, np.ndarray]:
        """The crop's raw image and mask, memory-mapped (read-only)."""
        return (np.load(self.root / entry.image_file, mmap_mode="r"),
                np.load(self.root / entry.label_file, mmap_mode="r"))

    def groups(self) -> Dict[str, int]:
        """Number of crops per group."""
        counts: Dict[str, int] = {}
        for e in self.entries:
            counts[e.group] = counts.get(e.group, 0) + 1
        return counts

    def _write_index(self) -> None:
        text = json.dumps({"size": self.size, "margin": self.margin, "sources": self.sources,
                           "entries": [asdict(e) for e in self.entries]}, indent=1)
        with atomic_output(self.root / self.INDEX) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    with atomic_output(path, suffix=".npy") as tmp:
        np.save(tmp, array)


# ------------------------------------------------------------------------------------------------------
# cutting crops


def crop_structure(volume, label_kji: np.ndarray, value: int, size: int = DEFAULT_SIZE,
                   margin: int = DEFAULT_MARGIN, spacing: float = 1.5) -> Tuple[np.ndarray, np.ndarray]:
    """Raw image and binary mask ((x, y, z), ``size + 2 margin`` per side) around structure ``value``.

    The central ``size``^3 box is the official evaluation/training box
    (:func:`~FastSAM3DLib.geometry.roi_centred_on_mask`); the image is not normalised yet.
    """
    from ..geometry import Volume, extract_label, extract_model_input, roi_centred_on_mask

    mask = np.asarray(label_kji) == value
    roi = roi_centred_on_mask(volume, mask, size, spacing)
    box = roi.sub_grid((-margin,) * 3, (size + 2 * margin,) * 3) if margin else roi
    image = extract_model_input(volume, box, normalize=False)
    label = extract_label(Volume(mask.astype(np.uint8), volume.ijk_to_ras), box) != 0
    return image, label


def _matches(selector: str, case_name: str, value: int, name: str) -> bool:
    """``[CASE_GLOB:]STRUCTURE`` where STRUCTURE is a label value or a name glob (case-insensitive)."""
    case_glob, _, structure = selector.rpartition(":")
    if case_glob and not fnmatch.fnmatchcase(case_name.lower(), case_glob.lower()):
        return False
    structure = structure.strip()
    if re.fullmatch(r"-?\d+", structure):
        return int(structure) == value
    return fnmatch.fnmatchcase(name.lower(), structure.lower())


def source_group(source) -> str:
    """The group of a data source: its folder's or manifest's name (``pairs`` for image/label pairs)."""
    if not isinstance(source, (str, Path)):
        return "pairs"
    group = Path(source).name
    return Path(group).stem if group.endswith((".json", ".csv")) else group


def prepare_crops(cache_dir, sources: Sequence = (), phantoms: int = 0, size: int = DEFAULT_SIZE,
                  margin: int = DEFAULT_MARGIN, min_voxels: int = 1000, include: Optional[Sequence[str]] = None,
                  exclude: Sequence[str] = (), exclude_cases: Sequence[str] = (), per_phantom: int = 2,
                  seed: int = 0, spacing: float = 1.5, float16: bool = True,
                  log: Callable[[str], None] = print) -> CropCache:
    """Cut and cache the crops of every selected structure of ``sources`` plus ``phantoms`` synthetic phantoms.

    ``sources``: folders, manifests or ``(image, label)`` pairs (see the module docstring); each source's
    folder name is its *group* (for weighted sampling). ``include``: structure selectors (values or name
    globs; None = all); ``exclude``: ``[CASE_GLOB:]STRUCTURE`` selectors never used; ``exclude_cases``: case
    name globs never used (held-out data). ``min_voxels``: structures with fewer voxels in the size^3 box
    are skipped (the official loader redraws labels with <= 1000). ``float16``: store intensities as float16
    (half the disk; relative rounding < 5e-4) unless out of range; False keeps them exact (float32).
    Rerunning continues an interrupted run.
    """
    from ..errors import DataSourceError, FastSAM3DError
    from ..evaluation.dataset import as_cases, load_case, select_structures

    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise DataSourceError(f"{cache_dir} is a file, not a folder: give a folder for the crop cache.")
    cache = CropCache(cache_dir, size, margin, float16)
    if (cache.size, cache.margin) != (size, margin):
        log(f"{cache.root} holds {cache.size}^3 crops with margin {cache.margin}: adding crops of that shape")
        size, margin = cache.size, cache.margin
    cache.add_sources(sources)
    unusable = []
    for source in sources:
        group = source_group(source)
        cases = as_cases([source] if isinstance(source, (str, Path)) else [source])
        if not cases:
            log(f"[{group}] {source}: no image/label pairs found")
        for case in cases:
            if any(fnmatch.fnmatchcase(case.name.lower(), g.lower()) for g in exclude_cases):
                log(f"[{group}] {case.name}: held out (excluded case)")
                continue
            try:
                image, labels, _ = load_case(case)
                image.validate()
            except (FastSAM3DError, OSError, RuntimeError, ValueError) as exc:  # one bad case stops nothing
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                log(f"[{group}] {case.name}: skipped, {case.image} or {case.label} cannot be used: {reason}")
                unusable.append(case.name)
                continue
            present = np.unique(labels)
            values, _ = select_structures(case, [int(v) for v in present if v != 0], include)
            added = 0
            for value in values:
                name = case.structure_name(value)
                if any(_matches(s, case.name, value, name) for s in exclude) or cache.has(group, case.name, value):
                    continue
                try:
                    crop, mask = crop_structure(image, labels, value, size, margin, spacing)
                except FastSAM3DError as exc:
                    log(f"[{group}] {case.name} {name}: skipped ({str(exc).strip()})")
                    continue
                inner = mask[margin:margin + size, margin:margin + size, margin:margin + size].sum()
                if inner < min_voxels:
                    continue
                cache.add(group, case.name, value, name, crop, mask)
                added += 1
            log(f"[{group}] {case.name}: {added} structures cached ({len(cache)} crops in all)")
    if unusable:
        log(f"{len(unusable)} case(s) skipped because their files cannot be used: {', '.join(unusable[:10])}"
            + (" ..." if len(unusable) > 10 else ""))
    if phantoms:
        from .phantoms import make_phantom

        cached = {}  # phantom -> its crops already in the cache (a run stopped part way through a phantom)
        for entry in cache.entries:
            if entry.group == "phantom":
                cached[entry.case] = cached.get(entry.case, 0) + 1
        for number in range(phantoms):
            case_name = f"phantom_{seed}_{number:05d}"
            if cached.get(case_name, 0) >= per_phantom:
                continue
            rng = np.random.default_rng([seed, number])
            phantom = make_phantom(rng)
            values = list(phantom.names)
            rng.shuffle(values)
            taken = 0
            for value in values:
                if taken >= per_phantom:
                    break
                if cache.has("phantom", case_name, value):  # cached before the run stopped: the same crop
                    taken += 1
                    continue
                crop, mask = crop_structure(phantom.image, phantom.label.array, value, size, margin, spacing)
                if mask[margin:margin + size, margin:margin + size, margin:margin + size].sum() < min_voxels:
                    continue
                cache.add("phantom", case_name, value, phantom.names[value], crop, mask)
                taken += 1
            if (number + 1) % 25 == 0 or number + 1 == phantoms:
                log(f"[phantom] {number + 1}/{phantoms} phantoms ({len(cache)} crops in all)")
    return cache


# ------------------------------------------------------------------------------------------------------
# sampling


def masked_z_normalise(values: np.ndarray) -> np.ndarray:
    """The official normalisation (torchio ``ZNormalization(masking_method=x > 0)``), as inference applies it.

    Raises ValueError when fewer than two voxels are > 0 or their standard deviation is 0.
    """
    foreground = values[values > 0]
    if foreground.size < 2:
        raise ValueError("fewer than two voxels > 0")
    mean = foreground.mean(dtype=np.float64)
    std = foreground.std(dtype=np.float64, ddof=1)
    if std == 0:
        raise ValueError("standard deviation 0")
    return (values - np.float32(mean)) / np.float32(std)


@dataclass(frozen=True)
class SampleSpec:
    """Everything that determines one training sample: the crop, the window offset and the augmentation."""

    entry: int
    offset: Tuple[int, int, int]
    augmentation: Augmentation

    def key(self) -> str:
        """A text identifying the sample (for feature caches)."""
        return f"{self.entry}@{','.join(map(str, self.offset))}@{self.augmentation.key()}"


class CropSampler:
    """Draw and build training samples from a :class:`CropCache` (see the module docstring).

    ``group_weights``: relative sampling weight per group (``{"phantom": 1, "totalseg": 2}``); each group's
    share is spread evenly over its crops; None samples every crop equally often. ``shift``: cut a random
    window of the margin (else the centred one).
    """

    def __init__(self, cache: CropCache, augment: AugmentConfig = AugmentConfig(),
                 group_weights: Optional[Dict[str, float]] = None, shift: bool = True) -> None:
        from ..errors import DataSourceError, SettingError

        if not len(cache):
            raise DataSourceError(f"the crop cache {cache.root} is empty; add data with 'prepare-data'")
        self.cache, self.augment, self.shift = cache, augment, shift
        counts = cache.groups()
        if group_weights:
            unknown = set(group_weights) - set(counts)
            if unknown:
                raise SettingError(f"--group-weights names group(s) {sorted(unknown)} that the crop cache does not "
                                   f"hold; its groups are {sorted(counts)}")
            unlisted = sorted(set(counts) - set(group_weights))
            if unlisted:
                warnings.warn(f"the group weights do not list the group(s) {unlisted} of the crop cache, so their "
                              f"crops are never drawn; give them a weight (name=0 leaves a group out on purpose)",
                              stacklevel=2)
            weights = np.array([group_weights.get(e.group, 0.0) / counts[e.group] for e in cache.entries])
        else:
            weights = np.ones(len(cache))
        if weights.sum() <= 0:
            raise ValueError("the group weights give every crop probability 0")
        self.probabilities = weights / weights.sum()

    @property
    def size(self) -> int:
        """Side of a sample in voxels."""
        return self.cache.size

    def draw(self, rng: np.random.Generator) -> SampleSpec:
        """Draw a sample description."""
        entry = int(rng.choice(len(self.probabilities), p=self.probabilities))
        m = self.cache.margin
        offset = tuple(int(v) for v in rng.integers(0, 2 * m + 1, size=3)) if (self.shift and m) else (m, m, m)
        return SampleSpec(entry, offset, draw_augmentation(rng, self.augment))

    def build(self, spec: SampleSpec) -> Tuple[np.ndarray, np.ndarray]:
        """(normalised, augmented image float32, mask uint8), both ``size``^3 in (x, y, z) order."""
        image, label = self.cache.load(self.cache.entries[spec.entry])
        (x, y, z), s = spec.offset, self.size
        window = np.asarray(image[x:x + s, y:y + s, z:z + s], dtype=np.float32)
        mask = np.asarray(label[x:x + s, y:y + s, z:z + s])
        return apply_augmentation(masked_z_normalise(window), mask, spec.augmentation)

    def sample(self, rng: np.random.Generator, attempts: int = 20):
        """(spec, image, mask) of a random usable sample (windows that cannot be normalised are redrawn)."""
        for _ in range(attempts):
            spec = self.draw(rng)
            try:
                image, mask = self.build(spec)
            except ValueError:
                continue
            if mask.any():
                return spec, image, mask
        raise RuntimeError("could not draw a usable training sample in 20 attempts; check the crop cache")

    def batch(self, rng: np.random.Generator, batch_size: int):
        """(images (B, 1, S, S, S) float32 tensor, masks (B, 1, S, S, S) float32 tensor, sample keys)."""
        import torch

        specs, images, masks = [], [], []
        for _ in range(batch_size):
            spec, image, mask = self.sample(rng)
            specs.append(spec.key())
            images.append(torch.from_numpy(image))
            masks.append(torch.from_numpy(mask.astype(np.float32)))
        return torch.stack(images)[:, None], torch.stack(masks)[:, None], specs


def parse_group_weights(text: Optional[str]) -> Optional[Dict[str, float]]:
    """``"phantom=1,totalseg=2"`` -> ``{"phantom": 1.0, "totalseg": 2.0}`` (None or empty -> None)."""
    if not text:
        return None
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if not name.strip() or not value.strip():
            raise ValueError(f"group weights must look like 'phantom=1,totalseg=2', got {text!r}")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not 0 <= weight < math.inf:
            raise ValueError(f"a group weight must be a number of at least 0, got {part.strip()!r}")
        weights[name.strip()] = weight
    return weights


def iter_entries(cache: CropCache, groups: Optional[Iterable[str]] = None) -> List[CropEntry]:
    """The cache's entries, optionally only those of ``groups``."""
    groups = set(groups) if groups else None
    return [e for e in cache.entries if groups is None or e.group in groups]
