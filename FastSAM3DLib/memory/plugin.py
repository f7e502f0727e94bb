"""The Memorizing SAM plug-in: retrieval of bank entries per encoded region, memory mixed into one encoder block.

``handle = attach_memory(model, bank)`` changes nothing in the model's weights or state dict. It

1. registers a forward pre-hook on ``model.image_encoder``: once per encoder call (= once per region encoding;
   clicks only run the decoder) it describes the input (:mod:`.retrieval`), finds the ``k`` nearest bank entries
   (excluding any patient or case given to :meth:`MemoryHandle.exclude`) and gathers their keys and values,
   which stay on the model's device with the bank;
2. gives the chosen block's attention module an instance-level ``forward`` that reproduces
   ``RelPosAttention.forward`` exactly (same ``qkv``/``proj`` layers, relative position tables, scale, backend and
   sparse layout, same :func:`FastSAM3DLib.attention.rel_pos_attention` entry point, so the torch, eager and
   Triton backends all work) and mixes the memory in before ``proj``;
3. when no retrieval is pending (memory disabled, no allowed entry, the attention module called outside an
   encoder call, e.g. by the distillation's ``block_outputs``), calls the class's own ``forward``: the output is
   then bit-identical to the model without the plug-in. :meth:`MemoryHandle.detach` removes everything.

Rules (``rule=``), with ``r`` the local ratio (released: 0.3), ``A`` the current image's local attention map,
``V`` its values, ``d_j`` the squared descriptor distance of neighbour ``j`` and ``Mk_j, Mv_j`` its stored keys
and values:

* ``"attention"`` (default, the paper: "memory attention over retrieved keys and values, fused with local
  attention at a preset local ratio")::

      o = r * A V  +  sum_j w_j * softmax(q Mk_j^T * s + relpos) Mv_j,    w_j = (1 - r) (1/d_j) / sum_i (1/d_i)

  The relative position bias is added to the memory logits too (the released code does; token ``n`` of a
  memory is grid position ``n`` of its crop). **Deviation from the released code**, which computes this memory
  attention map and throws it away (spec 1.5): the paper describes memory *attention*, so that is the default.
* ``"values"``: the released value substitution (memory keys unused, memory values gathered with the local map
  ``A``) with the normalised inverse-distance weights the released constants evidently intend:
  ``o = A (r V + sum_j w_j Mv_j)`` with the ``w_j`` above, one attention call.
* ``"released"``: the released formula exactly (``ImageEncoder3D_m.py:345-357``), for measuring it:
  ``o = A (r V + sum_j w_j Mv_j)`` with ``w_j = d_j / ((1 - r) sum_i 1/d_i)``: **inverted** (the farthest
  neighbour weighs most) and **unnormalised** (about d^2/2.1 for k = 3; with descriptor distances of 10^4-10^7
  the local branch, the residual stream and the 0.3 vanish below float32 resolution, and only FastSAM3D's
  post-norm ``norm2`` keeps the block finite). It is refused for pre-norm (SAM-Med3D) encoders, where nothing
  would renormalise it; a non-finite embedding raises :class:`MemoryOverflowError` instead of returning NaN. As
  in the released code a neighbour at distance 0 (``1/0 = inf``) switches the memory off (all ``w_j = 0``,
  leaving ``r * A V``); with ``r = 1`` the memory weight is 0 (the released code has no such case). Its
  distances are those of this library's descriptor, not of raw HU voxels (see :mod:`.retrieval`).

In all rules the memory acts only in the attention output of the chosen block (before ``proj``); a neighbour at
distance exactly 0 in the normalised rules takes all the memory weight (the limit of the formula), split
equally among such neighbours. Excluding the query's own patient (:meth:`MemoryHandle.exclude`) is how the
evaluation keeps a case from retrieving itself.

Retrieval (``retrieval=``): ``"knn"`` (default) or ``"random"`` (the control: ``k`` allowed entries drawn at
random, seeded by ``seed`` and the input, so the same region always gets the same draw), weighted by their
true distances.

No global state: everything lives in the handle; one handle per model at a time.
"""
from __future__ import annotations

import threading
import types
import zlib
from os import PathLike
from typing import Dict, List, Optional, Sequence, Union

import torch

from .. import attention
from ..devices import supported_device
from ..errors import FastSAM3DError
from . import retrieval
from .bank import MemoryBank, MemoryBankError, check_fits, load_bank, model_layout
from .settings import DEFAULT_K, DEFAULT_LOCAL_RATIO, RETRIEVALS, RULES

_ATTR = "_fastsam3d_memory_handle"


class MemoryOverflowError(FastSAM3DError):
    """The released formula's unnormalised weights overflowed float32; nothing was returned."""


def memory_weights(distances: torch.Tensor, local_ratio: float, rule: str) -> torch.Tensor:
    """The per-neighbour memory weights ``(B, k)`` (float64; on the CPU for MPS distances, MPS has no float64) of
    ``rule`` for squared distances ``(B, k)``."""
    d = distances.to(supported_device(distances.device), torch.float64)
    r = float(local_ratio)
    if d.shape[-1] == 0:
        return d
    if rule == "released":
        if r >= 1.0:
            return torch.zeros_like(d)
        with torch.no_grad():
            base = (1.0 / d).sum(dim=-1, keepdim=True) * (1.0 - r)  # inf when some d == 0
            return d / base  # released: d_j / (0.7 * sum 1/d_i); 0 everywhere when base is inf
    if rule in ("attention", "values"):
        zero = d == 0
        inverse = torch.where(zero.any(dim=-1, keepdim=True), zero.to(d.dtype), 1.0 / d)
        return (1.0 - r) * inverse / inverse.sum(dim=-1, keepdim=True)
    raise ValueError(f"unknown memory rule {rule!r}; choose one of {', '.join(RULES)}")


class MemoryHandle:
    """The plug-in attached to one model; :meth:`detach` (or leaving a ``with`` block) removes it."""

    def __init__(self, model, bank: MemoryBank, k: int, local_ratio: float, rule: str, retrieval_mode: str,
                 seed: int, exclude_patients: Sequence[str], exclude_cases: Sequence[str]) -> None:
        self.model = model
        self.encoder = model.image_encoder
        self.block = bank.block
        self.attn = self.encoder.blocks[self.block].attn
        self.bank = bank
        self.k = int(k)
        self.local_ratio = float(local_ratio)
        self.rule = rule
        self.retrieval = retrieval_mode
        self.seed = int(seed)
        self.enabled = True
        # each thread's retrieval waiting for the memory block, and its last encoder call's (the effect's worker
        # and a console script, or two Segment Editors, may encode with one cached model at once)
        self._local = threading.local()
        self.retrievals = 0  # encoder calls that retrieved memory
        #: called with :attr:`last` after every retrieval (e.g. to log what was retrieved), or None
        self.on_retrieval = None
        self._row_patients = bank.entry_patients()
        self._row_cases = bank.entry_cases()
        self._allowed = torch.ones(len(bank), dtype=torch.bool)
        self.exclude(exclude_patients, exclude_cases)
        self._hooks = []
        self.attached = False

    @property
    def last(self) -> List[Dict[str, object]]:
        """Per batch item of this thread's last encoder call: {"rows", "distances", "weights", "entries"}."""
        return getattr(self._local, "last", [])

    @last.setter
    def last(self, value: List[Dict[str, object]]) -> None:
        self._local.last = value

    @property
    def _pending(self):
        return getattr(self._local, "pending", None)

    @_pending.setter
    def _pending(self, value) -> None:
        self._local.pending = value

    def __getstate__(self) -> Dict[str, object]:  # a deep copy of the model copies its handle: not the threads'
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state: Dict[str, object]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    # ------------------------------------------------------------------ public
    def exclude(self, patients: Sequence[str] = (), cases: Sequence[str] = ()) -> None:
        """Never retrieve entries of these patients or cases (replaces the previous exclusion)."""
        if isinstance(patients, str):
            patients = [patients]
        if isinstance(cases, str):
            cases = [cases]
        self.excluded_patients = tuple(str(p) for p in patients)
        self.excluded_cases = tuple(str(c) for c in cases)
        self._allowed = retrieval.allowed_rows(self._row_patients, self._row_cases, self.excluded_patients,
                                               self.excluded_cases)

    def settings(self) -> Dict[str, object]:
        """The plug-in's settings, for results files."""
        return {"bank": str(self.bank.path) if self.bank.path else None, "bank_sha256": self.bank.sha256(),
                "entries": len(self.bank),
                "block": self.block, "k": self.k, "local_ratio": self.local_ratio, "rule": self.rule,
                "retrieval": self.retrieval, "descriptor": self.bank.descriptor, "seed": self.seed}

    def detach(self) -> None:
        """Remove the plug-in; the model is exactly as before :func:`attach_memory`."""
        if not self.attached:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.attn.__dict__.pop("forward", None)
        self.attn.__dict__.pop(_ATTR, None)
        if getattr(self.encoder, _ATTR, None) is self:
            delattr(self.encoder, _ATTR)
        self._pending = None
        self.attached = False

    def __enter__(self) -> "MemoryHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        self._hooks.append(self.encoder.register_forward_pre_hook(self._before_encoder))
        self._hooks.append(self.encoder.register_forward_hook(self._after_encoder, always_call=True))
        self.attn.forward = types.MethodType(_memory_attention_forward, self.attn)
        setattr(self.attn, _ATTR, self)  # found there by the forward: a deep copy of the model uses its own copy
        setattr(self.encoder, _ATTR, self)
        self.attached = True

    def _before_encoder(self, module, args):
        self._pending = None
        self.last = []
        if not self.enabled or not args:
            return None
        x = args[0]
        if not torch.is_tensor(x) or x.dim() != 5:
            return None
        if self.bank.device != x.device:  # the model moved: the bank follows it once
            self.bank = self.bank.to(x.device)
        with torch.no_grad():
            query = retrieval.describe(x.detach(), self.bank.descriptor)
            if query.shape[1] != self.bank.descriptors.shape[1]:
                raise MemoryBankError(f"the memory bank's '{self.bank.descriptor}' descriptors have "
                                      f"{self.bank.descriptors.shape[1]} numbers, this input gives "
                                      f"{query.shape[1]} (another input size?).")
            allowed = self._allowed
            if self.retrieval == "knn":
                distances, rows = retrieval.knn(query, self.bank.descriptors, self.k, allowed)
            else:
                seed = self.seed ^ zlib.crc32(query.to("cpu", torch.float32).numpy().tobytes())
                generator = torch.Generator().manual_seed(seed & 0x7FFFFFFF)
                rows = retrieval.random_rows(query.shape[0], allowed, self.k, generator).to(query.device)
                distances = torch.stack([retrieval.squared_distances(query[b:b + 1], self.bank.descriptors[r])[0]
                                         for b, r in enumerate(rows.to(self.bank.descriptors.device))])
            if rows.shape[1] == 0:
                self.last = [{"rows": [], "distances": [], "weights": [], "entries": [],
                              "note": "no bank entry allowed (all excluded): memory off"} for _ in range(len(x))]
                return None
            weights = memory_weights(distances, self.local_ratio, self.rule)
            rows = rows.to(self.bank.keys.device)
            mk = self.bank.keys[rows]  # (B, k, heads, tokens, head_dim)
            mv = self.bank.values[rows]
        self._pending = (weights, mk, mv, distances)
        self.retrievals += 1
        rows_l, d_l, w_l = rows.tolist(), distances.tolist(), weights.tolist()
        self.last = [{"rows": r, "distances": d, "weights": w, "entries": [self.bank.describe(i) for i in r]}
                     for r, d, w in zip(rows_l, d_l, w_l)]
        if self.on_retrieval is not None:
            self.on_retrieval(self.last)
        return None

    def _after_encoder(self, module, args, output):
        applied = self._pending is not None
        pending, self._pending = self._pending, None
        if applied and torch.is_tensor(output) and not bool(torch.isfinite(output).all()):
            distances = pending[3].flatten().tolist()
            raise MemoryOverflowError(
                f"the '{self.rule}' memory rule gave NaN or infinite numbers (descriptor distances "
                f"{', '.join(f'{d:.3g}' for d in distances)}; weights "
                f"{', '.join(f'{w:.3g}' for w in pending[0].flatten().tolist())}). "
                + ("The released formula's weights grow with the squared distance and overflow float32; use "
                   "rule='attention' (the default) or 'values'." if self.rule == "released" else
                   "Check the bank and the model's precision."))
        return None

    def _attention_forward(self, attn, x: torch.Tensor) -> torch.Tensor:
        pending = self._pending
        if pending is None:
            return type(attn).forward(attn, x)
        weights, mk, mv, _ = pending
        b, d, h, w, c = x.shape
        if (d, h, w) != attn.grid:
            raise ValueError(f"token grid {(d, h, w)} does not match the configured grid {attn.grid}")
        qkv = attn.qkv(x).reshape(b, d * h * w, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        tables = (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w)
        if mk.shape[0] != b:
            raise ValueError(f"memory retrieved for {mk.shape[0]} volumes, the block got {b}")
        kk = mk.shape[1]
        wts = weights.to(device=q.device, dtype=q.dtype)[:, :, None, None, None]  # (B, k, 1, 1, 1)
        mv = mv.to(device=q.device, dtype=v.dtype)
        r = self.local_ratio

        def run(q_, k_, v_):
            return attention.rel_pos_attention(q_, k_, v_, *tables, attn.grid, attn.scale, backend=attn.backend,
                                               sparse=attn.sparse)

        if self.rule == "attention":
            local = run(q, k, v)
            mk = mk.to(device=q.device, dtype=k.dtype)
            q_rep = q[:, None].expand(b, kk, *q.shape[1:]).reshape(b * kk, *q.shape[1:])
            memory = run(q_rep, mk.reshape(b * kk, *mk.shape[2:]), mv.reshape(b * kk, *mv.shape[2:]))
            out = local * r + (memory.view(b, kk, *memory.shape[1:]) * wts).sum(dim=1)
        else:  # "values" and "released": one attention call with mixed values (attention is linear in V)
            out = run(q, k, v * r + (mv * wts).sum(dim=1))
        out = out.permute(0, 2, 1, 3).reshape(b, d, h, w, c)
        return attn.proj(out)


def _memory_attention_forward(attn, x: torch.Tensor) -> torch.Tensor:
    """The attention block's ``forward`` while a plug-in is attached: the plug-in is looked up on the block (never
    captured in a closure), so ``copy.deepcopy`` of the model gives a copy that reads its own plug-in."""
    return getattr(attn, _ATTR)._attention_forward(attn, x)


def attach_memory(model, bank: Union[MemoryBank, str, PathLike], block: Optional[int] = None,
                  k: int = DEFAULT_K, local_ratio: float = DEFAULT_LOCAL_RATIO, rule: str = "attention",
                  retrieval_mode: str = "knn", seed: int = 0, exclude_patients: Sequence[str] = (),
                  exclude_cases: Sequence[str] = (), allow_other_encoder: bool = False) -> MemoryHandle:
    """Attach the memory plug-in to ``model`` (a built ``Sam3D``); returns the handle that can :meth:`detach`.

    ``bank``: a :class:`MemoryBank` or the path of a bank file (loaded with :func:`load_bank`, refused when it does
    not fit the model). ``block``: the encoder block the bank was made at (default and only choice: the bank's own;
    FastSAM3D: 4). ``k``: neighbours per region (released: 3). ``local_ratio``: weight of the local attention
    (released: 0.3; 1 = memory off). ``rule``: see the module docstring. ``exclude_patients``/``exclude_cases``:
    never retrieve these (the evaluation excludes the test patient).
    """
    if isinstance(bank, MemoryBank):
        check_fits(bank, model, allow_other_encoder)
        bank = bank.to(next(model.parameters()).device)
    else:
        bank = load_bank(bank, model, allow_other_encoder=allow_other_encoder)
    if block is not None and int(block) != bank.block:
        raise MemoryBankError(f"the memory bank was made at encoder block {bank.block}, so the plug-in can only act "
                              f"there (block {block} was asked for). Build a bank at block {block} with "
                              f"'memory build --block {block}'.")
    if rule not in RULES:
        raise ValueError(f"unknown memory rule {rule!r}; choose one of {', '.join(RULES)}")
    if retrieval_mode not in RETRIEVALS:
        raise ValueError(f"unknown memory retrieval {retrieval_mode!r}; choose one of {', '.join(RETRIEVALS)}")
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not 0.0 <= float(local_ratio) <= 1.0:
        raise ValueError(f"local_ratio must be between 0 and 1, got {local_ratio}")
    model_layout(model, bank.block)
    if rule == "released" and getattr(model.image_encoder.cfg, "block_form", "") != "fastsam3d":
        raise MemoryBankError("the released memory formula is only defined for FastSAM3D-form encoders (post-norm "
                              "blocks renormalise its huge weights); this model's blocks are pre-norm, where it "
                              "would flood every later block. Use rule='attention' or 'values'.")
    existing = getattr(model.image_encoder, _ATTR, None)
    if existing is not None and existing.attached:
        raise MemoryBankError("this model already has a memory bank attached; detach it first (handle.detach()).")
    handle = MemoryHandle(model, bank, k, local_ratio, rule, retrieval_mode, seed, exclude_patients, exclude_cases)
    handle._attach()
    return handle


def attached_memory(model) -> Optional[MemoryHandle]:
    """The handle attached to ``model``, or None."""
    handle = getattr(getattr(model, "image_encoder", model), _ATTR, None)
    return handle if handle is not None and handle.attached else None


def detach_memory(model) -> bool:
    """Detach whatever memory is attached to ``model``; True when there was one."""
    handle = attached_memory(model)
    if handle is None:
        return False
    handle.detach()
    return True
