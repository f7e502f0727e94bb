"""Building a memory bank from any labelled data set with our own encoder (``memory build``).

The data are what ``evaluate`` reads (:mod:`FastSAM3DLib.evaluation.dataset`): a folder, or a ``.json``/``.csv``
manifest. Manifest entries may also say, per case (all optional, recorded in the bank):

* ``patient`` (or ``patient_id``): the patient the image belongs to. **Give it** whenever several cases come from
  one patient: the evaluation's leakage guard works on patient ids. Without it the case name stands in
  (``patient_assumed: true`` in the bank, and ``memory inspect`` says so).
* ``licence`` (or ``license``) and ``dataset``: where the case comes from and under which terms.

Each structure of each case becomes one entry, made exactly as the evaluation and the session feed the model
(the inference geometry: RAS canonical, 1.5 mm, 128^3, masked z-normalisation):

* ``crop="gt"``: torchio's CropOrPad centred on the structure (the papers' and released code's protocol);
* ``crop="click"``: the interactive session's ROI around the structure's deepest voxel (where a user's first
  click would go; what the ``click`` placement of the evaluation starts from).

One encoder pass per entry up to the memory block records its keys and values as the block's ``qkv`` layer
produces them (a forward hook; nothing in the model is changed) and the retrieval descriptor of the input.
**Deviation from the released saver** (``memorysave.py``), which fed the *raw* crop to the encoder: the bank's
keys/values come from exactly the normalised input the model sees at inference.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import retrieval
from ..files import sha256_file
from .bank import KV_DTYPES, MemoryBank, MemoryBankError, default_block, model_layout, new_meta
from .plugin import attached_memory
from .settings import CROPS


def image_sha256(path) -> str:
    """The sha256 of an image file's bytes: what the evaluation's leakage guard compares, whatever the case's name
    (a case name is relative to the folder that was scanned).

    A DICOM series (a folder) is hashed over its files' relative names and bytes, in sorted order, so a copy of
    the series elsewhere has the same hash.
    """
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
        digest.update(bytes.fromhex(sha256_file(file)))
    return digest.hexdigest()


def read_provenance(source) -> List[Dict[str, object]]:
    """Per case of a ``.json``/``.csv`` manifest (in :func:`~FastSAM3DLib.evaluation.dataset.find_cases` order):
    ``patient``, ``licence``, ``dataset`` where given; ``[]`` for folders and other sources."""
    from ..evaluation.dataset import manifest_entries

    path = Path(str(source))
    if not path.is_file() or path.suffix.lower() not in (".json", ".csv"):
        return []
    out = []
    for row in manifest_entries(path):
        info = {}
        for key, names in (("patient", ("patient", "patient_id")), ("licence", ("licence", "license")),
                           ("dataset", ("dataset",))):
            for name in names:
                if row.get(name) not in (None, ""):
                    info[key] = str(row[name]).strip()
                    break
        out.append(info)
    return out


def record_kv(model, x: torch.Tensor, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The keys and values ``(B, heads, tokens, head_dim)`` of encoder ``block`` for input ``x``.

    Runs the encoder only up to that block; the keys/values are the block's ``qkv`` output, split as
    ``RelPosAttention.forward`` splits it.
    """
    encoder = model.image_encoder
    attn = encoder.blocks[block].attn
    captured = {}

    def hook(module, args, output):
        captured["qkv"] = output

    handle = attn.qkv.register_forward_hook(hook)
    try:
        with torch.no_grad():
            encoder.block_outputs(x, depth=block + 1)
    finally:
        handle.remove()
    out = captured["qkv"]
    b = out.shape[0]
    tokens = int(np.prod(attn.grid))
    qkv = out.reshape(b, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return qkv[1], qkv[2]


def deepest_voxel_ras(volume, mask_kji: np.ndarray) -> np.ndarray:
    """RAS (mm) of the mask voxel farthest from the mask's border (spacing-aware; the lowest index on ties)."""
    import edt

    ijk_to_ras = np.asarray(volume.ijk_to_ras, dtype=np.float64)
    spacing_kji = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)[::-1]
    dist = edt.edt(np.ascontiguousarray(mask_kji, dtype=np.uint8), anisotropy=tuple(float(s) for s in spacing_kji),
                   black_border=True)
    k, j, i = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]


def build_bank(source, model, *, label=None, model_label: Optional[str] = None, checkpoint_label: str = "",
               block: Optional[int] = None, descriptor: str = "pooled32", crop: str = "gt",
               structures: Optional[Sequence[str]] = None, min_voxels: int = 10, kv_dtype: str = "float16",
               default_licence: str = "unknown", default_dataset: str = "", split: str = "",
               log: Callable[[str], None] = print) -> MemoryBank:
    """A bank made by ``model`` from every labelled structure of ``source`` (folder, manifest, or cases).

    ``block``: encoder block (default :func:`~.bank.default_block`: 4 for FastSAM3D). ``descriptor``: see
    :mod:`.retrieval`. ``crop``: ``"gt"`` or ``"click"`` (module docstring). ``structures``: label values or
    names (wildcards) to use instead of all. ``kv_dtype``: storage of keys/values (``float16`` halves the file;
    computation is in the model's dtype). Structures with fewer than ``min_voxels`` voxels, or none on the
    model grid, are skipped (and logged).
    """
    from ..evaluation import dataset as ds
    from ..geometry import Volume, extract_label, extract_model_input, roi_around, roi_centred_on_mask

    if attached_memory(model) is not None:
        raise MemoryBankError("detach the memory plug-in from the model before building a bank with it.")
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}; use one of {', '.join(CROPS)}")
    if descriptor not in retrieval.DESCRIPTORS:
        raise ValueError(f"unknown descriptor {descriptor!r}; use one of {', '.join(retrieval.DESCRIPTORS)}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown key/value dtype {kv_dtype!r}; use one of {', '.join(KV_DTYPES)}")
    block = default_block(model) if block is None else int(block)
    model_layout(model, block)  # raises when the block cannot hold memory
    cases = ds.find_cases(source, label) if isinstance(source, (str, Path)) else ds.as_cases(source)
    provenance = read_provenance(source) if label is None else []
    if provenance and len(provenance) != len(cases):
        provenance = []
    device = next(model.parameters()).device
    config = model.config
    size, spacing = int(config.image_size), float(config.spacing_mm)
    store = KV_DTYPES[kv_dtype]
    case_list: List[Dict[str, object]] = []
    entries: List[Dict[str, object]] = []
    descs, keys, values, case_index = [], [], [], []
    started = time.perf_counter()
    model.eval()
    reasons: List[str] = []  # why structures were left out: logged, and in the error when none is left

    def skip(text: str) -> None:
        reasons.append(text)
        log(text)

    for number, case in enumerate(cases):
        info = provenance[number] if provenance else {}
        patient = info.get("patient")
        record = {"case": case.name, "patient": patient or case.name, "dataset": info.get("dataset") or
                  default_dataset or case.image.parent.name, "licence": info.get("licence") or default_licence,
                  "image": case.image.name, "label": case.label.name, "image_sha256": image_sha256(case.image)}
        if not patient:
            record["patient_assumed"] = True
        try:
            volume, labels, _ = ds.load_case(case)
            volume.validate()
        except Exception as exc:  # noqa: BLE001 - an unreadable case is reported and skipped, as evaluate does
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            skip(f"{case.name}: skipped ({reason})")
            continue
        counts = ds.value_counts(labels)
        values_, missing = ds.select_structures(case, counts, structures)
        for selector, _, reason in missing:
            skip(f"{case.name}: {selector}: {reason}")
        if not values_ and not missing:
            skip(f"{case.name}: no labelled voxel lies on the image's grid (is {case.label.name} the label of "
                 f"{case.image.name}?)")
        label_volume = Volume(labels, volume.ijk_to_ras)
        case_number = len(case_list)
        added = 0
        for value in values_:
            name = case.structure_name(value)
            if counts.get(value, 0) < min_voxels:
                skip(f"{case.name}/{name}: skipped (only {counts.get(value, 0)} voxels)")
                continue
            mask = labels == value
            if crop == "gt":
                roi = roi_centred_on_mask(volume, mask, size, spacing)
            else:
                roi = roi_around(volume, deepest_voxel_ras(volume, mask)[None], size, spacing)
            if not (extract_label(label_volume, roi) == value).any():
                reason = ds.empty_crop_reason(volume, mask, size, spacing) if crop == "gt" else \
                    f"no voxel on the {spacing} mm model grid"
                skip(f"{case.name}/{name}: skipped ({reason})")
                continue
            image = extract_model_input(volume, roi)
            x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
            k, v = record_kv(model, x, block)
            k, v = k[0].to("cpu", store), v[0].to("cpu", store)
            if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
                raise MemoryBankError(f"{case.name}/{name}: the keys/values do not fit in {kv_dtype}; build with "
                                      "--kv-dtype float32.")
            descs.append(retrieval.describe(x, descriptor)[0].to("cpu"))
            keys.append(k)
            values.append(v)
            case_index.append(case_number)
            entries.append({"case": case_number, "structure": name, "value": int(value),
                            "voxels": int(counts[value])})
            added += 1
        if added:
            case_list.append(record)
            log(f"{case.name} (patient {record['patient']}{', assumed' if not patient else ''}): {added} entries")
    if not entries:
        why = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        raise MemoryBankError(f"no labelled structure in {source} could be used for the bank: "
                              f"{why or 'no case was found'}.")
    split_sha = ""
    if isinstance(source, (str, Path)) and Path(source).is_file():
        split_sha = sha256_file(source)
        split = split or Path(source).name
    meta = new_meta(model, model_label=model_label or config.name, block=block, descriptor=descriptor,
                    descriptor_dim=int(descs[0].numel()), crop=crop, cases=case_list, entries=entries,
                    kv_dtype=kv_dtype, checkpoint=checkpoint_label, split=split or str(source),
                    split_sha256=split_sha, options={"min_voxels": int(min_voxels),
                                                     "structures": list(structures) if structures else None,
                                                     "seconds": round(time.perf_counter() - started, 1)})
    bank = MemoryBank(torch.stack(descs), torch.stack(keys), torch.stack(values),
                      torch.tensor(case_index, dtype=torch.int64), meta)
    bank.validate()
    return bank


def inspect_text(bank_or_meta, entries: bool = False, nbytes: Optional[int] = None) -> str:
    """What ``memory inspect`` prints: provenance, layout, sizes, and (``entries``) one line per entry."""
    meta = bank_or_meta.meta if isinstance(bank_or_meta, MemoryBank) else bank_or_meta
    cases, rows = meta.get("cases", []), meta.get("entries", [])
    patients = list(dict.fromkeys(str(c["patient"]) for c in cases))
    assumed = [c["case"] for c in cases if c.get("patient_assumed")]
    licences: Dict[str, int] = {}
    for c in cases:
        licences[str(c.get("licence"))] = licences.get(str(c.get("licence")), 0) + 1
    datasets = list(dict.fromkeys(str(c.get("dataset")) for c in cases))
    structures = list(dict.fromkeys(str(e.get("structure")) for e in rows))
    lines = [
        f"format        {meta.get('format')}",
        f"model         {meta.get('model')} (encoder sha256 {meta.get('encoder_sha256')})",
        f"checkpoint    {meta.get('checkpoint') or '-'}",
        f"memory block  {meta.get('block')}: {meta.get('num_heads')} heads x {meta.get('head_dim')}, token grid "
        f"{meta.get('grid')}, width {meta.get('embed_dim')}",
        f"descriptor    {meta.get('descriptor')} ({meta.get('descriptor_dim')} numbers)",
        f"crop          {meta.get('crop')}, {meta.get('spacing_mm')} mm, {meta.get('image_size', 128)}^3, "
        f"{meta.get('normalisation', '')}",
        f"keys/values   {meta.get('kv_dtype')}",
        f"entries       {len(rows)} ({len(structures)} distinct structures)",
        f"cases         {len(cases)}; patients {len(patients)}"
        + (f" ({len(assumed)} case(s) without a patient id: the case name stands in)" if assumed else ""),
        f"datasets      {', '.join(datasets)}",
        f"licences      {', '.join(f'{k} ({v} case(s))' for k, v in licences.items())}",
        f"split         {meta.get('split') or '-'}" + (f" (sha256 {meta['split_sha256'][:16]}...)"
                                                        if meta.get("split_sha256") else ""),
        f"created       {meta.get('created')} by {meta.get('created_by')}",
    ]
    if nbytes is not None:
        lines.append(f"size          {nbytes / 2 ** 20:.1f} MiB of tensors")
    if entries:
        lines.append("")
        lines.append("row  case / structure (value, voxels)  patient  dataset  licence")
        for row, entry in enumerate(rows):
            case = cases[int(entry["case"])]
            lines.append(f"{row:>3}  {case['case']} / {entry.get('structure')} ({entry.get('value')}, "
                         f"{entry.get('voxels')})  {case['patient']}  {case.get('dataset')}  {case.get('licence')}")
    return "\n".join(lines)
