"""Memory banks: one ``.safetensors`` file per bank (never pickle), with full provenance in its header.

A bank holds, for each of its N entries (one labelled structure of one case, cut and normalised exactly as the
evaluation or the interactive session would cut it):

* ``descriptors`` (N, D) float32: the retrieval descriptor of the entry's model input (see :mod:`.retrieval`);
* ``keys``, ``values`` (N, heads, tokens, head_dim), float16 by default: the attention keys and values of the
  memory block, as its ``qkv`` layer produced them (before the relative position bias and the softmax);
* ``case_index`` (N,) int64: the entry's case in the ``cases`` list of the header.

Header metadata (safetensors allows string -> string only; lists are JSON):

==================  =====================================================================================
``format``          ``fastsam3d-memory-bank/1``
``model``           registry name of the model that made the keys/values (e.g. ``fastsam3d``)
``encoder_sha256``  :func:`~FastSAM3DLib.weights.safetensors_cache.tensors_sha256` of that image encoder's
                    state dict: a bank is only valid for exactly these weights
``checkpoint``      the checkpoint it was loaded from: ``NAME (sha256 HEX)`` for a file (``memory build``
                    resolves ``cached`` to the file), else how the weights were made (``random``)
``block``           encoder block index (0-based over all blocks, MLP-only ones included)
``num_heads``,      head layout of that block; ``grid`` the token grid (``8,8,8``), ``embed_dim`` its width
``head_dim``
``descriptor``      retrieval descriptor name (:data:`.retrieval.DESCRIPTORS`) and ``descriptor_dim``
``crop``            ``gt`` (torchio CropOrPad centred on the label, the papers' protocol) or ``click`` (the
                    session's ROI around the structure's deepest voxel); ``spacing_mm``, ``orientation``,
                    ``normalisation`` say what the model input was
``cases``           JSON list, per case: ``case``, ``patient`` (and ``patient_assumed`` when the data set gave no
                    patient id and the case name stands in for it), ``dataset``, ``licence``, ``image``, ``label``
                    (file names only, no folders)
``entries``         JSON list aligned with the rows: ``case`` (index into ``cases``), ``structure``, ``value``,
                    ``voxels``
``split``           name of the bank's data split and ``split_sha256`` (of the manifest file, when there is one)
``kv_dtype``        storage dtype of keys/values; computation is in the model's dtype
``created_by``      ``FastSAM3DLib <version>``, ``created`` (UTC time stamp)
==================  =====================================================================================

:func:`load_bank` checks the file's own consistency (shapes, dtypes, metadata) and, given the running model,
that the bank fits it (:func:`check_fits`): same head layout, token grid and an attention block at ``block``
always; same model name and encoder hash unless ``allow_other_encoder=True`` (the paper's presumed
"memory from another checkpoint" setting, whose effect must be measured, not assumed).
"""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..files import atomic_output, library_write_error
from .header import FORMAT, MemoryBankError, find_banks, read_bank_metadata  # noqa: F401
from .settings import KV_DTYPE_NAMES

TENSOR_NAMES = ("descriptors", "keys", "values", "case_index")
_REQUIRED_META = ("format", "model", "encoder_sha256", "block", "num_heads", "head_dim", "grid", "embed_dim",
                  "descriptor", "descriptor_dim", "crop", "spacing_mm", "cases", "entries", "kv_dtype")
KV_DTYPES = {name: getattr(torch, name) for name in KV_DTYPE_NAMES}


@dataclass
class MemoryBank:
    """A loaded (or freshly built) memory bank; tensors may live on any device (see :meth:`to`)."""

    descriptors: torch.Tensor  # (N, D) float32
    keys: torch.Tensor  # (N, heads, tokens, head_dim)
    values: torch.Tensor  # (N, heads, tokens, head_dim)
    case_index: torch.Tensor  # (N,) int64
    meta: Dict[str, object] = field(default_factory=dict)  # parsed header (lists/ints decoded)
    path: Optional[Path] = None

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return int(self.descriptors.shape[0])

    @property
    def cases(self) -> List[Dict[str, object]]:
        """The cases the bank was built from (header ``cases``)."""
        return list(self.meta.get("cases", []))

    @property
    def entries(self) -> List[Dict[str, object]]:
        """One record per row: its case, structure, label value and voxels (header ``entries``)."""
        return list(self.meta.get("entries", []))

    @property
    def block(self) -> int:
        """Index of the encoder's attention block whose keys and values are stored."""
        return int(self.meta["block"])

    @property
    def descriptor(self) -> str:
        """Name of the case descriptor retrieval compares (header ``descriptor``)."""
        return str(self.meta["descriptor"])

    @property
    def device(self) -> torch.device:
        """Where the bank's tensors are."""
        return self.keys.device

    def entry_patients(self) -> List[str]:
        """The patient id of every row."""
        cases = self.cases
        return [str(cases[int(i)]["patient"]) for i in self.case_index.tolist()]

    def entry_cases(self) -> List[str]:
        """The case name of every row."""
        cases = self.cases
        return [str(cases[int(i)]["case"]) for i in self.case_index.tolist()]

    def patients(self) -> List[str]:
        """Distinct patient ids in the bank, in order of first appearance."""
        return list(dict.fromkeys(str(c["patient"]) for c in self.cases))

    def describe(self, row: int) -> str:
        """``case/structure (patient P)`` of one row."""
        case = self.cases[int(self.case_index[row])]
        entry = self.entries[row]
        return f"{case['case']}/{entry.get('structure')} (patient {case['patient']})"

    def to(self, device) -> "MemoryBank":
        """The bank with its tensors on ``device`` (self when they already are)."""
        device = torch.device(device)
        if self.keys.device == device and self.descriptors.device == device:
            return self
        return MemoryBank(self.descriptors.to(device), self.keys.to(device), self.values.to(device),
                          self.case_index.to(device), dict(self.meta), self.path)

    def sha256(self) -> str:
        """SHA-256 of the bank's tensors (recorded in a saved bank's header; computed for one not saved)."""
        recorded = self.meta.get("tensors_sha256")
        if recorded:
            return str(recorded)
        return _tensors_digest({name: getattr(self, name).detach().to("cpu").contiguous() for name in TENSOR_NAMES})

    def nbytes(self) -> int:
        """Bytes of all tensors."""
        return sum(t.numel() * t.element_size() for t in (self.descriptors, self.keys, self.values,
                                                           self.case_index))

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`MemoryBankError` when tensors and metadata disagree."""
        where = f"memory bank {self.path}" if self.path else "memory bank"
        for key in _REQUIRED_META:
            if key not in self.meta:
                raise MemoryBankError(f"{where} has no '{key}' in its metadata; it is not a complete "
                                      f"{FORMAT} file. Build it again with: python -m FastSAM3DLib memory build")
        if self.meta["format"] != FORMAT:
            raise MemoryBankError(f"{where} has format {self.meta['format']!r}, this version reads {FORMAT!r}.")
        problems = _header_problems(self.meta)
        if problems:
            raise MemoryBankError(f"{where} has a damaged header: {'; '.join(problems)}. Copy or build it again.")
        n = len(self)
        heads, head_dim = int(self.meta["num_heads"]), int(self.meta["head_dim"])
        tokens = _grid_tokens(self.meta["grid"])
        expected_kv = (n, heads, tokens, head_dim)
        if self.descriptors.dim() != 2 or self.descriptors.dtype != torch.float32 or \
                self.descriptors.shape[1] != int(self.meta["descriptor_dim"]):
            problems.append(f"descriptors {tuple(self.descriptors.shape)} {self.descriptors.dtype}, expected "
                            f"({n}, {self.meta['descriptor_dim']}) float32")
        for name in ("keys", "values"):
            tensor = getattr(self, name)
            if tuple(tensor.shape) != expected_kv or tensor.dtype not in KV_DTYPES.values():
                problems.append(f"{name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected_kv}")
        if tuple(self.case_index.shape) != (n,) or self.case_index.dtype != torch.int64:
            problems.append(f"case_index {tuple(self.case_index.shape)} {self.case_index.dtype}, expected ({n},) "
                            "int64")
        elif n and (int(self.case_index.min()) < 0 or int(self.case_index.max()) >= len(self.cases)):
            problems.append(f"case_index points outside the {len(self.cases)} cases of the header")
        if len(self.entries) != n:
            problems.append(f"{len(self.entries)} entries in the header for {n} rows")
        elif tuple(self.case_index.shape) == (n,) and \
                [int(e.get("case", -1)) for e in self.entries] != self.case_index.tolist():
            problems.append("the entries' cases in the header differ from case_index")
        for number, case in enumerate(self.cases):
            if not isinstance(case, dict) or not case.get("case") or not case.get("patient"):
                problems.append(f"case {number} of the header has no case or patient id")
                break
        if problems:
            raise MemoryBankError(f"{where} is inconsistent: {'; '.join(problems)}.")


def _header_problems(meta: Dict[str, object]) -> List[str]:
    """What is malformed in a bank header's structure (types, the descriptor and its size), [] when nothing."""
    from .retrieval import DESCRIPTORS

    problems = []
    try:
        tokens = _grid_tokens(meta["grid"])
        if tokens < 1:
            problems.append(f"grid {meta['grid']!r} holds no tokens")
    except (TypeError, ValueError):
        problems.append(f"grid {meta['grid']!r} is not a list of sizes")
    if not isinstance(meta.get("cases"), list) or not isinstance(meta.get("entries"), list) or \
            not all(isinstance(e, dict) for e in meta["entries"]):
        problems.append("its cases and entries are not lists of records")
    elif not all(isinstance(e.get("case"), int) and not isinstance(e.get("case"), bool) for e in meta["entries"]):
        problems.append("an entry's case is not the number of a case")
    name = meta.get("descriptor")
    if name not in DESCRIPTORS:
        problems.append(f"unknown retrieval descriptor {name!r} (known: {', '.join(DESCRIPTORS)})")
    else:
        size = int(meta.get("image_size", 128))
        expected = DESCRIPTORS[name][0] * size ** 3 // 128 ** 3
        if int(meta["descriptor_dim"]) != expected:
            problems.append(f"descriptor '{name}' has {expected} numbers for {size}^3 inputs, the header says "
                            f"{meta['descriptor_dim']}")
    return problems


def _grid_tokens(grid) -> int:
    dims = [int(v) for v in str(grid).split(",")] if not isinstance(grid, (list, tuple)) else [int(v) for v in grid]
    out = 1
    for v in dims:
        out *= v
    return out


def _grid_text(grid: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in grid)


# ---------------------------------------------------------------------------------------------- model checks
def encoder_sha256(model) -> str:
    """The sha256 of the model's image encoder state dict (name, dtype, shape and bytes of every tensor)."""
    from ..weights.safetensors_cache import tensors_sha256

    encoder = getattr(model, "image_encoder", model)
    return tensors_sha256(encoder.state_dict())


def model_layout(model, block: int) -> Dict[str, object]:
    """Head layout, grid and width of ``block`` of the model's encoder; MemoryBankError when it has no
    global attention there."""
    encoder = getattr(model, "image_encoder", model)
    blocks = encoder.blocks
    if not 0 <= int(block) < len(blocks):
        raise MemoryBankError(f"the model's image encoder has blocks 0-{len(blocks) - 1}; memory block {block} "
                              "does not exist.")
    attn = blocks[int(block)].attn
    if attn is None:
        raise MemoryBankError(f"block {block} of the image encoder has no attention (MLP-only); choose one of the "
                              f"attention blocks {attention_blocks(model)}.")
    if attn.window is not None:
        raise MemoryBankError(f"block {block} uses zero-padded window attention; the memory plug-in needs a "
                              f"global-attention block: one of {attention_blocks(model, global_only=True)}.")
    return {"num_heads": int(attn.num_heads), "head_dim": int(attn.head_dim), "grid": tuple(attn.grid),
            "embed_dim": int(attn.qkv.in_features)}


def attention_blocks(model, global_only: bool = False) -> List[int]:
    """Indices of the encoder blocks with (global, if asked) attention."""
    encoder = getattr(model, "image_encoder", model)
    return [i for i, b in enumerate(encoder.blocks)
            if b.attn is not None and (not global_only or b.attn.window is None)]


def default_block(model) -> int:
    """The memory block when none is given: the second-to-last global-attention block.

    That is block 4 for FastSAM3D (the released ``memorylayer = 4``: the 3rd of its 4 attention blocks) and for
    ``fastsam3d-demo``; block 8 for SAM-Med3D (the 3rd of its global blocks 2, 5, 8, 11); block 1 for ``tiny-test``.
    """
    blocks = attention_blocks(model, global_only=True)
    if not blocks:
        raise MemoryBankError("this model's encoder has no global-attention block for the memory plug-in.")
    return blocks[-2] if len(blocks) >= 2 else blocks[-1]


def model_name(model) -> str:
    """The registry name of ``model`` (its config's), or its class name for a model without one."""
    config = getattr(model, "config", None)
    return str(getattr(config, "name", type(model).__name__))


def check_fits(bank: MemoryBank, model, allow_other_encoder: bool = False) -> None:
    """Raise :class:`MemoryBankError` (saying what to do) when ``bank`` cannot be used with ``model``."""
    where = f"memory bank {bank.path.name}" if bank.path else "the memory bank"
    name = model_name(model)
    build_hint = (f"Build a bank for this model with: python -m FastSAM3DLib memory build DATA --model {name} "
                  "--output BANK.safetensors")
    try:
        layout = model_layout(model, bank.block)
    except MemoryBankError as exc:
        raise MemoryBankError(f"{where} was made at encoder block {bank.block} of model '{bank.meta['model']}', "
                              f"which does not fit model '{name}': {exc} {build_hint}") from None
    mine = (int(bank.meta["num_heads"]), int(bank.meta["head_dim"]), tuple(_grid_list(bank.meta["grid"])),
            int(bank.meta["embed_dim"]))
    theirs = (layout["num_heads"], layout["head_dim"], tuple(layout["grid"]), layout["embed_dim"])
    if mine != theirs:
        raise MemoryBankError(
            f"{where} was made by model '{bank.meta['model']}' ({mine[0]} heads of {mine[1]}, token grid "
            f"{_grid_text(mine[2])}, width {mine[3]} at block {bank.block}); the running model '{name}' has "
            f"{theirs[0]} heads of {theirs[1]}, grid {_grid_text(theirs[2])}, width {theirs[3]} there. {build_hint}")
    if allow_other_encoder:
        return
    if str(bank.meta["model"]) != name:
        raise MemoryBankError(f"{where} was made by model '{bank.meta['model']}', not by the running model '{name}'. "
                              f"{build_hint}, or choose another bank. To use another model's memory on purpose: "
                              "allow_other_encoder=True in Python, --memory-other-encoder on the command line.")
    mine_hash = encoder_sha256(model)
    if mine_hash != bank.meta["encoder_sha256"]:
        raise MemoryBankError(
            f"{where} was made with other weights of '{name}' (encoder sha256 {str(bank.meta['encoder_sha256'])[:12]}, "
            f"the running one is {mine_hash[:12]}): its keys and values belong to those weights. {build_hint}, or "
            "choose another bank. To use it on purpose: allow_other_encoder=True in Python, --memory-other-encoder "
            "on the command line.")


def _grid_list(grid) -> List[int]:
    return [int(v) for v in (grid.split(",") if isinstance(grid, str) else grid)]


# ---------------------------------------------------------------------------------------------- file I/O
def _meta_to_strings(meta: Dict[str, object]) -> Dict[str, str]:
    out = {}
    for key, value in meta.items():
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, (list, dict, tuple)) or value is None or isinstance(value, bool):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


def save_bank(bank: MemoryBank, path) -> Path:
    """Write ``bank`` to ``path`` (a ``.safetensors`` file) atomically; returns the path.

    Raises :class:`~FastSAM3DLib.errors.OutputFileError` naming the file when it cannot be written (full disk,
    read-only folder); then neither it nor a temporary is left."""
    from safetensors.torch import save_file

    bank.validate()
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MemoryBankError(f"memory banks are .safetensors files; got {path.name!r}. Name it e.g. "
                              f"{path.with_suffix('.safetensors').name}.")
    tensors = {name: getattr(bank, name).detach().to("cpu").contiguous() for name in TENSOR_NAMES}
    meta = dict(bank.meta)
    meta["tensors_sha256"] = _tensors_digest(tensors)
    with atomic_output(path) as tmp:  # OutputFileError (one line, nothing left) when it cannot be written
        try:
            save_file(tensors, str(tmp), metadata=_meta_to_strings(meta))
        except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError, not OSError, for a full disk
            raise library_write_error(exc, path, tmp, sum(t.nbytes for t in tensors.values())) from None
    bank.meta = meta
    bank.path = path
    return path


def _tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    from ..weights.safetensors_cache import tensors_sha256

    return tensors_sha256(tensors)


def load_bank(path, model=None, device=None, allow_other_encoder: bool = False,
              verify: bool = True) -> MemoryBank:
    """Load a bank file (safetensors only; nothing is unpickled) and check it.

    ``model``: the running model; the bank is refused (:class:`MemoryBankError`) unless it fits (:func:`check_fits`)
    and its tensors are moved to the model's device (else to ``device``, default CPU).
    ``verify``: recompute the tensors' sha256 and compare it with the one written at build time (catches damage).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise MemoryBankError(f"{path.name}: memory banks are .safetensors files (pickled .pt/.pth banks are "
                              "never loaded).")
    meta = read_bank_metadata(path)
    try:
        # each tensor copied out of the mapping, which closes with the file: on Windows a mapped file cannot be
        # replaced or deleted while a model holds the bank (a rebuilt bank, Explorer); reading the bytes whole
        # instead would briefly need twice the bank's size in memory
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise MemoryBankError(f"memory bank {path.name} cannot be read ({exc}); it is damaged or truncated. "
                              "Copy or build it again.") from None
    missing = [n for n in TENSOR_NAMES if n not in tensors]
    if missing:
        raise MemoryBankError(f"memory bank {path.name} lacks the tensor(s) {', '.join(missing)}; build it again.")
    if verify and not meta.get("tensors_sha256"):
        raise MemoryBankError(f"memory bank {path.name} has no checksum of its tensors, so damage could not be "
                              "noticed; build it again with: python -m FastSAM3DLib memory build")
    if verify and _tensors_digest({n: tensors[n] for n in TENSOR_NAMES}) != meta["tensors_sha256"]:
        raise MemoryBankError(f"memory bank {path.name} is damaged: its tensors do not match the checksum written "
                              "when it was built. Copy or build it again.")
    bank = MemoryBank(tensors["descriptors"], tensors["keys"], tensors["values"], tensors["case_index"], meta, path)
    bank.validate()
    if model is not None:
        check_fits(bank, model, allow_other_encoder)
        device = next(model.parameters()).device
    return bank.to(device or "cpu")


def new_meta(model, *, model_label: str, block: int, descriptor: str, descriptor_dim: int, crop: str,
             cases: List[Dict[str, object]], entries: List[Dict[str, object]], kv_dtype: str,
             checkpoint: str = "", split: str = "", split_sha256: str = "",
             options: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """The header of a new bank made by ``model``."""
    from .. import __version__

    layout = model_layout(model, block)
    config = getattr(model, "config", None)
    return {
        "format": FORMAT,
        "model": model_label,
        "encoder_sha256": encoder_sha256(model),
        "checkpoint": checkpoint,
        "block": int(block),
        "num_heads": layout["num_heads"],
        "head_dim": layout["head_dim"],
        "grid": _grid_text(layout["grid"]),
        "embed_dim": layout["embed_dim"],
        "descriptor": descriptor,
        "descriptor_dim": int(descriptor_dim),
        "crop": crop,
        "spacing_mm": float(getattr(config, "spacing_mm", 1.5)),
        "image_size": int(getattr(config, "image_size", 128)),
        "orientation": "RAS canonical (x, y, z) voxel order",
        "normalisation": "masked z-score (mean and unbiased std over voxels > 0), as at inference",
        "cases": cases,
        "entries": entries,
        "kv_dtype": kv_dtype,
        "split": split,
        "split_sha256": split_sha256,
        "options": options or {},
        "created_by": f"FastSAM3DLib {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
