"""Cost of the Memorizing SAM plug-in (:mod:`FastSAM3DLib.memory`): retrieval and encoder overhead, in ms.

For ``fastsam3d`` (random weights: speed does not depend on their values; ``tiny-test`` in a dry run) with a
synthetic bank of :data:`ENTRIES` entries resident on the device (``pooled32`` descriptors, float16 keys/values,
the layout of a real bank made at block 4):

* ``memory_retrieval_ms``: what runs once per region encoding before the encoder: the descriptor of the input,
  the exact kNN over the bank (k = 3) and the gathering of the neighbours' keys/values;
* ``encoder_ms`` with variants ``memory: attention`` and ``memory: released formula``: the encoder with the
  plug-in attached (retrieval included), beside the plain encoder (no variant) measured the same way here;
* ``memory_overhead_ms`` per rule: with-memory median minus plain median (the paper reports +4.38 ms on a GPU);
* ``memory_bank_mib``: the bank's tensors on the device.

Medians after a warm-up round (plain, memory attention and released runs interleaved, so a busy machine slows
all alike), synchronised on CUDA, for every precision of the plan (bf16/fp16 under autocast).
Registered in :func:`.suite.extra_benchmarks` (``make bench`` and ``make gpu-check``); ``int8`` runs on the
int8-encoder copy of the model (:func:`.pipeline.model_for`).
"""
from __future__ import annotations

import statistics
import time
from typing import List, Optional

import torch

from . import report

ENTRIES = 100
DRY_RUN_ENTRIES = 8
K = 3


def _dry_run(plan) -> bool:
    return any("dry run" in str(reason) for reason in (plan.skip or {}).values())


def synthetic_bank(model, entries: int, seed: int = 0):
    """A bank with the layout of a real one for ``model`` (random contents), on the model's device."""
    from ..memory.bank import MemoryBank, default_block, new_meta
    from ..memory.retrieval import DESCRIPTORS

    block = default_block(model)
    attn = model.image_encoder.blocks[block].attn
    tokens = 1
    for g in attn.grid:
        tokens *= int(g)
    size = int(model.config.image_size)
    dim = DESCRIPTORS["pooled32"][1](torch.zeros(1, 1, size, size, size)).shape[1]
    gen = torch.Generator().manual_seed(seed)
    shape = (entries, attn.num_heads, tokens, attn.head_dim)
    cases = [{"case": f"synthetic{i}", "patient": f"synthetic{i}"} for i in range(entries)]
    rows = [{"case": i, "structure": "synthetic", "value": 1, "voxels": 1} for i in range(entries)]
    meta = new_meta(model, model_label=model.config.name, block=block, descriptor="pooled32", descriptor_dim=dim,
                    crop="gt", cases=cases, entries=rows, kv_dtype="float16")
    bank = MemoryBank(torch.randn(entries, dim, generator=gen), torch.randn(shape, generator=gen).half(),
                      torch.randn(shape, generator=gen).half(), torch.arange(entries), meta)
    return bank.to(next(model.parameters()).device)


def measure(plan, device_name: str, model_name: Optional[str] = None, entries: Optional[int] = None) -> List[dict]:
    """The measurements of the module docstring for ``plan.device`` and each of ``plan.precisions``."""
    from ..memory import attach_memory
    from ..registry import build_model
    from .attention import sync_device
    from .attention import measure as time_it
    from .pipeline import MissingDependency, autocast, encoder_input, model_for

    dry = _dry_run(plan)
    model_name = model_name or ("tiny-test" if dry else "fastsam3d")
    entries = int(entries or (DRY_RUN_ENTRIES if dry else ENTRIES))
    device = torch.device(plan.device)
    skipped = (plan.skip or {}).get("memory")
    names = [("memory_retrieval_ms", "", "memory retrieval (descriptor + kNN + gather), once per region"),
             ("encoder_ms", "memory: attention", None), ("encoder_ms", "memory: released formula", None),
             ("memory_overhead_ms", "memory: attention", "encoder overhead of the memory"),
             ("memory_overhead_ms", "memory: released formula", "encoder overhead of the memory"),
             ("memory_bank_mib", "", "memory bank on the device")]
    if skipped:
        return [report.measurement(name, None, model=model_name, device=device_name, precision=p, variant=v,
                                   unit="MiB" if name.endswith("mib") else "ms", label=label, skipped=skipped)
                for p in plan.precisions for name, v, label in names]
    model = build_model(model_name, seed=0, device=device)
    bank = synthetic_bank(model, entries)
    note = f"{entries}-entry bank on the device, k = {K}, block {bank.block}, pooled32 descriptors, fp16 keys/values"
    repeats = max(1, int(plan.repeats))
    out = []
    x = encoder_input(model, device)
    float_model = model
    for precision in plan.precisions:
        common = dict(model=model_name, device=device_name, precision=precision)
        try:  # int8: the int8-encoder copy; its weights differ from the bank's hash by construction (same layout)
            model = model_for(float_model, precision)
        except MissingDependency as exc:
            out += [report.measurement(name, None, unit="MiB" if name.endswith("mib") else "ms", label=label,
                                       variant=v, skipped=str(exc), **common) for name, v, label in names]
            continue
        other = model is not float_model

        def encode():
            with autocast(device, precision):
                return model.image_encoder(x)

        attention_handle = attach_memory(model, bank, k=K, rule="attention", allow_other_encoder=other)
        try:
            retrieval = time_it(lambda: attention_handle._before_encoder(model.image_encoder, (x,)), device,
                                max(repeats, 5), warmup=1, memory=False)["median_ms"]
            attention_handle._pending = None
        finally:
            attention_handle.detach()
        # plain and with-memory runs interleaved, so that a busy machine slows all of them alike
        times = {"plain": [], "attention": [], "released": []}
        released_why = None
        with torch.inference_mode():
            for rep in range(repeats + 1):  # the first round is the warm-up
                for variant in times:
                    if variant == "released" and released_why:
                        continue
                    handle = None if variant == "plain" else attach_memory(model, bank, k=K, rule=variant,
                                                                           allow_other_encoder=other)
                    try:
                        start = time.perf_counter()
                        encode()
                        sync_device(device)
                        if rep:
                            times[variant].append((time.perf_counter() - start) * 1e3)
                    except Exception as exc:  # the released formula may overflow: say so, keep the rest
                        released_why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                    finally:
                        if handle is not None:
                            handle.detach()
        plain = statistics.median(times["plain"])
        with_attention = statistics.median(times["attention"])
        with_released = statistics.median(times["released"]) if times["released"] and not released_why else None
        out.append(report.measurement("memory_retrieval_ms", retrieval, unit="ms", label=names[0][2], note=note,
                                      **common))
        out.append(report.measurement("encoder_ms", with_attention, variant="memory: attention", note=note,
                                      **common))
        out.append(report.measurement("encoder_ms", with_released, variant="memory: released formula", note=note,
                                      skipped=released_why, **common))
        out.append(report.measurement("memory_overhead_ms", with_attention - plain, variant="memory: attention",
                                      unit="ms", label=names[3][2], note=f"plain encoder {plain:.1f} ms; {note}",
                                      **common))
        out.append(report.measurement("memory_overhead_ms", None if with_released is None else with_released - plain,
                                      variant="memory: released formula", unit="ms", label=names[4][2],
                                      note=f"plain encoder {plain:.1f} ms; {note}", skipped=released_why, **common))
        out.append(report.measurement("memory_bank_mib", bank.nbytes() / 2 ** 20, unit="MiB", label=names[5][2],
                                      note=note, **common))
    return out
