"""Memorizing SAM plug-in (FastSAM3DLib.memory): identity without memory, the rules against an explicit
reference, retrieval and the leakage guard, the bank file and its refusals, building, the CLI, the session.

All on CPU with ``tiny-test`` (random weights) and small synthetic volumes; see reference/MEMORIZING_SAM.md §6.5.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from FastSAM3DLib.attention.reference import official_bias
from FastSAM3DLib.evaluation.results import EvaluationStateError
from FastSAM3DLib.image_encoder import EncoderConfig, ImageEncoder3D
from FastSAM3DLib.memory import (MemoryBank, MemoryBankError, MemoryOverflowError, attach_memory, attached_memory,
                                 build_bank, knn, load_bank, memory_weights, save_bank)
from FastSAM3DLib.memory.bank import default_block, new_meta
from FastSAM3DLib.memory.retrieval import squared_distances
from FastSAM3DLib.registry import build_model

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers
class _Model(nn.Module):
    """A bare encoder with the attributes the plug-in uses (config name/size, image_encoder)."""

    def __init__(self, cfg: EncoderConfig, name: str = "layout-test", backend: str = "torch") -> None:
        super().__init__()
        self.config = SimpleNamespace(name=name, image_size=cfg.img_size, spacing_mm=1.5)
        self.image_encoder = ImageEncoder3D(cfg, backend=backend)


def _random_bank(model, n=5, block=None, descriptor_dim=None, seed=0, patients=None, kv_dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    block = default_block(model) if block is None else block
    attn = model.image_encoder.blocks[block].attn
    tokens = int(np.prod(attn.grid))
    dim = descriptor_dim or (model.config.image_size // 4) ** 3
    patients = patients or [f"p{i % 2}" for i in range(n)]
    cases = [{"case": f"c{i}", "patient": patients[i]} for i in range(n)]
    entries = [{"case": i, "structure": f"s{i}", "value": 1, "voxels": 100} for i in range(n)]
    meta = new_meta(model, model_label=model.config.name, block=block, descriptor="pooled32", descriptor_dim=dim,
                    crop="gt", cases=cases, entries=entries, kv_dtype=str(kv_dtype).split(".")[-1])
    shape = (n, attn.num_heads, tokens, attn.head_dim)
    return MemoryBank(torch.randn(n, dim, generator=gen), torch.randn(shape, generator=gen).to(kv_dtype),
                      torch.randn(shape, generator=gen).to(kv_dtype), torch.arange(n), meta)


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny-test", seed=0)


@pytest.fixture(scope="module")
def volumes():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 1, 128, 128, 128, generator=gen)


def _encode(model, x):
    with torch.no_grad():
        return model.image_encoder(x)


def _capture_block_input(model, block, x):
    """(input tokens of the block's attention, its output) during one encoder call."""
    seen = {}
    attn = model.image_encoder.blocks[block].attn

    def hook(module, args, output):
        seen["x"], seen["out"] = args[0], output

    handle = attn.register_forward_hook(hook)
    try:
        _encode(model, x)
    finally:
        handle.remove()
    return seen["x"], seen["out"]


def _explicit_attention(attn, q, k):
    """The attention map A = softmax(q k^T * s + official relpos bias), built explicitly: (B, h, N, N)."""
    b, nh, n, c = q.shape
    s = attn.grid[0]
    bias = official_bias(q.reshape(b, nh, s, s, s, c), attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w, attn.grid)
    return torch.softmax((q * attn.scale) @ k.transpose(-1, -2) + bias, dim=-1)


def _reference_block(attn, x, bank, rows, distances, rule, r):
    """Spec §1.5 literally: per neighbour, the memory term with an explicit attention matrix; then proj."""
    b, d, h, w, c = x.shape
    qkv = torch.nn.functional.linear(x, attn.qkv.weight.double(), attn.qkv.bias.double())
    qkv = qkv.reshape(b, d * h * w, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn64 = SimpleNamespace(grid=attn.grid, scale=attn.scale, rel_pos_d=attn.rel_pos_d.double(),
                             rel_pos_h=attn.rel_pos_h.double(), rel_pos_w=attn.rel_pos_w.double())
    a = _explicit_attention(attn64, q, k)
    out = r * (a @ v)
    for item in range(b):
        dist = torch.as_tensor(distances[item], dtype=torch.float64)
        if rule == "released":
            weights = dist / ((1 - r) * (1 / dist).sum())
        else:
            weights = (1 - r) * (1 / dist) / (1 / dist).sum()
        for j, row in enumerate(rows[item]):
            mk, mv = bank.keys[row].double()[None], bank.values[row].double()[None]
            if rule == "attention":
                m = _explicit_attention(attn64, q[item:item + 1], mk)  # the released code's discarded "mattn"
                out[item] += weights[j] * (m @ mv)[0]
            else:
                out[item] += weights[j] * (a[item:item + 1] @ mv)[0]  # released: memory values, local map
    out = out.permute(0, 2, 1, 3).reshape(b, d, h, w, c)
    return torch.nn.functional.linear(out, attn.proj.weight.double(), attn.proj.bias.double())


# ------------------------------------------------------------------------------------------------ identity
def test_without_memory_outputs_are_bit_identical(tiny, volumes):
    base = _encode(tiny, volumes)
    bank = _random_bank(tiny)
    handle = attach_memory(tiny, bank)
    assert attached_memory(tiny) is handle
    assert set(tiny.state_dict()) == set(build_model("tiny-test", seed=0).state_dict())  # no new parameters
    handle.enabled = False
    assert torch.equal(_encode(tiny, volumes), base)
    handle.enabled = True
    handle.exclude(patients=["p0", "p1"])  # every entry excluded: memory off
    assert torch.equal(_encode(tiny, volumes), base)
    assert "memory off" in handle.last[0]["note"]
    handle.exclude()
    assert not torch.allclose(_encode(tiny, volumes), base)  # memory on changes the embedding
    handle.detach()
    assert attached_memory(tiny) is None and "forward" not in tiny.image_encoder.blocks[1].attn.__dict__
    assert torch.equal(_encode(tiny, volumes), base)
    assert torch.equal(_encode(build_model("tiny-test", seed=0), volumes), base)  # the model as never attached


@pytest.mark.parametrize("rule", ["attention", "values"])
def test_local_ratio_one_is_bit_identical(tiny, volumes, rule):
    base = _encode(tiny, volumes)
    with attach_memory(tiny, _random_bank(tiny), local_ratio=1.0, rule=rule):
        assert torch.equal(_encode(tiny, volumes), base)
    assert torch.equal(_encode(tiny, volumes), base)


def test_block_outputs_outside_an_encoder_call_are_untouched(tiny, volumes):
    """The distillation calls block_outputs directly: no retrieval is pending, the class forward runs."""
    base = tiny.image_encoder.block_outputs(volumes[:1])[-1].detach()
    with attach_memory(tiny, _random_bank(tiny)):
        assert torch.equal(tiny.image_encoder.block_outputs(volumes[:1])[-1].detach(), base)


# ------------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize("layout", [(96, 6), (96, 12)], ids=["6-heads", "12-heads"])
@pytest.mark.parametrize("rule", ["attention", "values", "released"])
def test_rules_match_explicit_reference(layout, rule):
    """Fused paths (batched memory attention; one call with mixed values) == the literal per-neighbour formula,
    in both head layouts of the spec (FastSAM3D 6 heads, SAM-Med3D 12 heads; narrow here, same code)."""
    width, heads = layout
    cfg = EncoderConfig(img_size=64, embed_dim=width, depth=3, num_heads=heads, mlp_only_blocks=1, mlp_ratio=1.0,
                        out_chans=16, block_form="fastsam3d")
    torch.manual_seed(3)
    model = _Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    bank = _random_bank(model, n=6, kv_dtype=torch.float32)
    bank.descriptors = bank.descriptors * 0.05  # distances ~ 10^3: finite released weights
    x = torch.randn(2, 1, 64, 64, 64)
    block = bank.block
    with attach_memory(model, bank, rule=rule, k=3) as handle:
        tokens, out = _capture_block_input(model, block, x)
        rows = [item["rows"] for item in handle.last]
        distances = [item["distances"] for item in handle.last]
    attn = model.image_encoder.blocks[block].attn
    with torch.no_grad():
        ref = _reference_block(attn, tokens.double(), bank, rows, distances, rule, 0.3)
    scale = ref.abs().max()
    assert (out.double() - ref).abs().max() / scale < 2e-5


def test_memory_weights():
    d = torch.tensor([[1.0, 2.0, 4.0]])
    w = memory_weights(d, 0.3, "attention")
    assert torch.allclose(w.sum(), torch.tensor(0.7, dtype=torch.float64)) and w[0, 0] > w[0, 2]
    released = memory_weights(d, 0.3, "released")  # d_j / (0.7 * sum 1/d): the farthest weighs most
    assert torch.allclose(released, d.double() / (0.7 * 1.75))
    zero = torch.tensor([[0.0, 2.0, 4.0]])
    assert torch.equal(memory_weights(zero, 0.3, "released"), torch.zeros(1, 3, dtype=torch.float64))
    assert torch.allclose(memory_weights(zero, 0.3, "attention"), torch.tensor([[0.7, 0, 0]], dtype=torch.float64))
    assert torch.equal(memory_weights(d, 1.0, "released"), torch.zeros(1, 3, dtype=torch.float64))


def test_released_rule_self_hit_turns_memory_off_and_overflow_raises(tiny, volumes):
    """d_0 = 0 -> the released weights are all 0: the block gives proj(0.3 A V); distances ~1e16 -> NaN -> error."""
    x = volumes[:1]
    bank = _random_bank(tiny, kv_dtype=torch.float32)
    with torch.no_grad():
        bank.descriptors[2] = torch.nn.functional.avg_pool3d(x, 4).flatten()
    block = bank.block
    with attach_memory(tiny, bank, rule="released") as handle:
        tokens, out = _capture_block_input(tiny, block, x)
        assert handle.last[0]["rows"][0] == 2 and handle.last[0]["distances"][0] == 0.0
        assert handle.last[0]["weights"] == [0.0, 0.0, 0.0]
    attn = tiny.image_encoder.blocks[block].attn
    with torch.no_grad():
        plain = attn.proj(_local_only(attn, tokens, 0.3))
    assert torch.allclose(out, plain, atol=1e-5)
    far = _random_bank(tiny, kv_dtype=torch.float32)
    far.descriptors = far.descriptors + 1e7
    with attach_memory(tiny, far, rule="released"):
        with pytest.raises(MemoryOverflowError, match="released formula"):
            _encode(tiny, x)
    with attach_memory(tiny, far, rule="attention"):
        assert torch.isfinite(_encode(tiny, x)).all()  # the normalised rule does not care about the scale


def _local_only(attn, x, r):
    """r * A V before proj, explicitly."""
    b, d, h, w, c = x.shape
    qkv = attn.qkv(x).reshape(b, d * h * w, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    out = r * (_explicit_attention(attn, q, k) @ v)
    return out.permute(0, 2, 1, 3).reshape(b, d, h, w, c)


def test_released_rule_refused_for_pre_norm_encoders():
    model = build_model("tiny-test-teacher", seed=0)
    bank = _random_bank(model)
    with pytest.raises(MemoryBankError, match="pre-norm"):
        attach_memory(model, bank, rule="released")
    attach_memory(model, bank, rule="attention").detach()


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_backends_agree_with_memory(tiny, volumes, backend):
    bank = _random_bank(tiny)
    results = {}
    for name in ("torch", backend):
        tiny.image_encoder.set_attention_backend(name)
        try:
            with attach_memory(tiny, bank):
                results[name] = _encode(tiny, volumes)
        finally:
            tiny.image_encoder.set_attention_backend("torch")
    assert torch.allclose(results["torch"], results[backend], atol=1e-4)


def test_triton_backend_in_interpreter():
    """The memory rules through the Triton kernel (TRITON_INTERPRET=1, in a child process) == the eager backend."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import json, torch
        from types import SimpleNamespace
        from torch import nn
        from FastSAM3DLib.image_encoder import EncoderConfig, ImageEncoder3D
        from FastSAM3DLib.memory import attach_memory, MemoryBank
        from FastSAM3DLib.memory.bank import new_meta
        torch.manual_seed(0)
        cfg = EncoderConfig(img_size=64, embed_dim=32, depth=2, num_heads=2, mlp_only_blocks=0, mlp_ratio=1.0,
                            out_chans=8, block_form="fastsam3d")
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.config = SimpleNamespace(name="t", image_size=64, spacing_mm=1.5)
                self.image_encoder = ImageEncoder3D(cfg)
        m = M().eval()
        n = 4
        meta = new_meta(m, model_label="t", block=0, descriptor="pooled32", descriptor_dim=16 ** 3, crop="gt",
                        cases=[{"case": f"c{i}", "patient": f"p{i}"} for i in range(n)],
                        entries=[{"case": i, "structure": "s", "value": 1, "voxels": 1} for i in range(n)],
                        kv_dtype="float32")
        bank = MemoryBank(torch.randn(n, 16 ** 3), torch.randn(n, 2, 64, 16), torch.randn(n, 2, 64, 16),
                          torch.arange(n), meta)
        x = torch.randn(1, 1, 64, 64, 64)
        from FastSAM3DLib import attention
        assert attention.resolve_backend("triton", "cpu") == "triton"
        calls = []
        import FastSAM3DLib.attention.triton_kernel as tk
        original = tk.rel_pos_attention_triton
        def counted(*a, **kw):
            calls.append(1)
            return original(*a, **kw)
        tk.rel_pos_attention_triton = counted
        out = {}
        for rule in ("attention", "values"):
            res = {}
            for backend in ("eager", "triton"):
                m.image_encoder.set_attention_backend(backend)
                with attach_memory(m, bank, rule=rule):
                    with torch.no_grad():
                        res[backend] = m.image_encoder(x)
            out[rule] = float((res["eager"] - res["triton"]).abs().max())
        out["triton_calls"] = len(calls)
        print(json.dumps(out))
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    diffs = json.loads(done.stdout.strip().splitlines()[-1])
    assert diffs.pop("triton_calls") >= 4, "the Triton kernel was not used"  # 1 + 1 attention calls per rule
    assert all(v < 1e-4 for v in diffs.values()), diffs


# ------------------------------------------------------------------------------------------------ retrieval
def test_knn_matches_a_naive_loop():
    gen = np.random.default_rng(0)
    bank = gen.normal(size=(40, 64)).astype(np.float32)
    bank[7] = bank[3]  # an exact tie: the lower row comes first
    queries = np.stack([gen.normal(size=64).astype(np.float32), bank[3]])
    allowed = torch.ones(40, dtype=torch.bool)
    allowed[11] = False
    distances, rows = knn(torch.from_numpy(queries), torch.from_numpy(bank), 5, allowed)
    for b, q in enumerate(queries):
        naive = []
        for i, row in enumerate(bank):
            if i == 11:
                continue
            naive.append((float(sum((float(a) - float(c)) ** 2 for a, c in zip(row, q))), i))
        naive.sort()
        assert rows[b].tolist() == [i for _, i in naive[:5]]
        assert np.allclose(distances[b].numpy(), [d for d, _ in naive[:5]], rtol=1e-9, atol=1e-9)
    assert rows[1, :2].tolist() == [3, 7] and distances[1, 0].item() == 0.0
    assert torch.equal(squared_distances(torch.from_numpy(bank[:1]), torch.from_numpy(bank))[0, 0],
                       torch.tensor(0.0, dtype=torch.float64))
    none = torch.zeros(40, dtype=torch.bool)
    assert knn(torch.from_numpy(queries), torch.from_numpy(bank), 3, none)[1].shape == (2, 0)


def test_random_retrieval_is_seeded_by_the_input(tiny, volumes):
    bank = _random_bank(tiny, n=8)
    with attach_memory(tiny, bank, retrieval_mode="random", seed=5) as handle:
        _encode(tiny, volumes[:1])
        first = handle.last[0]["rows"]
        _encode(tiny, volumes[:1])
        assert handle.last[0]["rows"] == first and len(set(first)) == 3
        with torch.no_grad():
            d = squared_distances(torch.nn.functional.avg_pool3d(volumes[:1], 4).flatten(1), bank.descriptors)
        assert np.allclose(handle.last[0]["distances"], d[0, first].tolist())


# ------------------------------------------------------------------------------------------------ bank files
def test_bank_round_trip_and_refusals(tiny, tmp_path):
    bank = _random_bank(tiny)
    path = save_bank(bank, tmp_path / "bank.safetensors")
    loaded = load_bank(path, tiny)
    for name in ("descriptors", "keys", "values", "case_index"):
        assert torch.equal(getattr(loaded, name), getattr(bank, name))
    assert {k: v for k, v in loaded.meta.items()} == {k: v for k, v in bank.meta.items()}
    assert loaded.entry_patients() == ["p0", "p1", "p0", "p1", "p0"]
    # other weights of the same model: refused unless asked for
    other = build_model("tiny-test", seed=1)
    with pytest.raises(MemoryBankError, match="other weights"):
        load_bank(path, other)
    load_bank(path, other, allow_other_encoder=True)
    # another head layout: always refused
    four_heads = _Model(EncoderConfig(embed_dim=48, depth=3, num_heads=4, mlp_only_blocks=1, mlp_ratio=2.0,
                                      out_chans=48, block_form="fastsam3d"), name="tiny-test")
    with pytest.raises(MemoryBankError, match="2 heads of 24.*4 heads of 12"):
        load_bank(path, four_heads, allow_other_encoder=True)
    with pytest.raises(MemoryBankError, match="window attention"):  # block 1 of the teacher is windowed
        load_bank(path, build_model("tiny-test-teacher", seed=0), allow_other_encoder=True)
    # a block the bank was not made at
    with pytest.raises(MemoryBankError, match="block"):
        attach_memory(tiny, loaded, block=2)
    moved = _random_bank(tiny)
    moved.meta["block"] = 0  # MLP-only block in tiny-test
    with pytest.raises(MemoryBankError, match="no attention"):
        attach_memory(tiny, moved)
    # never pickle; not a bank; damaged
    torch.save({"keys": bank.keys}, tmp_path / "bank.pt")
    with pytest.raises(MemoryBankError, match="safetensors"):
        load_bank(tmp_path / "bank.pt")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MemoryBankError, match="not a FastSAM3D memory bank"):
        load_bank(tmp_path / "other.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "damaged.safetensors").write_bytes(bytes(raw))
    with pytest.raises(MemoryBankError, match="damaged"):
        load_bank(tmp_path / "damaged.safetensors")


def test_a_model_kept_for_reuse_follows_its_bank_and_checkpoint_files(tiny, tmp_path):
    """Slicer's model cache was keyed by the bank's path: a bank rebuilt there, or deleted, kept being used."""
    from FastSAM3DLib.scene import batch

    checkpoint = tmp_path / "tiny.pth"
    torch.save({"model_state_dict": tiny.state_dict()}, checkpoint)
    path = tmp_path / "bank.safetensors"
    save_bank(_random_bank(tiny, n=3), path)
    batch._cached_model.cache_clear()
    try:
        first = batch.load_model("tiny-test", "cpu", str(checkpoint), memory_bank=path)
        assert batch.load_model("tiny-test", "cpu", str(checkpoint), memory_bank=path) is first  # reused
        assert len(attached_memory(first).bank) == 3
        save_bank(_random_bank(tiny, n=2), path)  # rebuilt at the same path
        assert len(attached_memory(batch.load_model("tiny-test", "cpu", str(checkpoint), memory_bank=path)).bank) == 2
        path.unlink()
        with pytest.raises(MemoryBankError, match="bank.safetensors"):
            batch.load_model("tiny-test", "cpu", str(checkpoint), memory_bank=path)
        other = build_model("tiny-test", seed=1)
        torch.save({"model_state_dict": other.state_dict(), "note": "other weights"}, checkpoint)
        reloaded = batch.load_model("tiny-test", "cpu", str(checkpoint))
        assert torch.equal(reloaded.mask_decoder.iou_prediction_head.layers[0].weight,
                           other.mask_decoder.iou_prediction_head.layers[0].weight)
    finally:
        batch._cached_model.cache_clear()


def test_two_threads_encoding_with_one_model_each_use_their_own_retrieval(tiny):
    """The effect's worker and a console script (or two Segment Editors) share one cached model: the retrieval
    waiting for the memory block was one attribute, so thread B could run with thread A's memory, or none."""
    import threading

    import torch.nn.functional as F

    bank = _random_bank(tiny, n=4, seed=3)
    inputs = {name: F.interpolate(bank.descriptors[row].reshape(1, 1, 32, 32, 32), scale_factor=4)
              for name, row in (("A", 0), ("B", 2))}
    handle = attach_memory(tiny, bank, k=1)
    try:
        with torch.no_grad():
            serial = {}
            for name, x in inputs.items():
                serial[name] = tiny.image_encoder(x)
                serial[name + " rows"] = handle.last[0]["rows"]
        assert serial["A rows"] != serial["B rows"]
        both_retrieved, a_done = threading.Barrier(2), threading.Event()

        def first_block(module, args):  # both threads have retrieved before either reaches the memory block
            both_retrieved.wait(timeout=60)

        def memory_block(module, args):  # A finishes first, then B runs its memory block
            if threading.current_thread().name == "B":
                a_done.wait(timeout=60)

        hooks = [tiny.image_encoder.blocks[0].register_forward_pre_hook(first_block),
                 tiny.image_encoder.blocks[handle.block].register_forward_pre_hook(memory_block)]
        out, rows = {}, {}

        def run(name):
            with torch.no_grad():
                out[name] = tiny.image_encoder(inputs[name])
            rows[name] = handle.last[0]["rows"]
            if name == "A":
                a_done.set()

        threads = [threading.Thread(target=run, args=(name,), name=name) for name in inputs]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            for hook in hooks:
                hook.remove()
        for name in inputs:
            assert torch.equal(out[name], serial[name]) and rows[name] == serial[name + " rows"], name
    finally:
        handle.detach()


def test_attach_keeps_one_handle_and_the_bank_on_the_model_device(tiny):
    bank = _random_bank(tiny)
    with attach_memory(tiny, bank) as handle:
        assert handle.bank.keys.device == next(tiny.parameters()).device
        with pytest.raises(MemoryBankError, match="already"):
            attach_memory(tiny, bank)
    attach_memory(tiny, bank).detach()



def test_a_deep_copy_of_a_model_with_memory_keeps_its_own_memory(tiny, volumes):
    """The attention block's forward captured the original plug-in in a closure: a copy's hooks filled the
    copy's plug-in, its attention read the original's (nothing pending there) and the copy ran without memory."""
    import copy

    base = _encode(tiny, volumes)
    with attach_memory(tiny, _random_bank(tiny)) as handle:
        with_memory = _encode(tiny, volumes)
        twin = copy.deepcopy(tiny)
        twin_handle = attached_memory(twin)
        assert twin_handle is not handle and twin_handle.attached
        before = handle.retrievals, twin_handle.retrievals
        assert torch.equal(_encode(twin, volumes), with_memory) and not torch.equal(with_memory, base)
        assert (handle.retrievals, twin_handle.retrievals) == (before[0], before[1] + 1)
        twin_handle.detach()
        assert torch.equal(_encode(twin, volumes), base)
        assert torch.equal(_encode(tiny, volumes), with_memory)  # the original keeps its memory
    assert torch.equal(_encode(tiny, volumes), base)

# ------------------------------------------------------------------------------------------------ real files
def _write_case(folder: Path, name: str, seed: int, centres):
    import SimpleITK as sitk

    gen = np.random.default_rng(seed)
    shape = (36, 40, 44)  # k, j, i
    kk, jj, ii = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    image = gen.normal(0, 20, size=shape).astype(np.float32) + 100
    label = np.zeros(shape, dtype=np.uint8)
    for value, (c, radius) in enumerate(centres, 1):
        inside = ((kk - c[0]) ** 2 + (jj - c[1]) ** 2 + (ii - c[2]) ** 2) <= radius ** 2
        label[inside] = value
        image[inside] += 200 * value
    for array, suffix in ((image, ""), (label, "_seg")):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing((2.0, 2.0, 2.5))
        sitk.WriteImage(img, str(folder / f"{name}{suffix}.nii.gz"))
    return {"image": f"{name}.nii.gz", "label": f"{name}_seg.nii.gz", "case": name}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memdata")
    a = _write_case(folder, "a1", 0, [((18, 20, 20), 6), ((12, 12, 30), 4)])
    b = _write_case(folder, "a2", 1, [((16, 22, 24), 7)])
    c = _write_case(folder, "b1", 2, [((20, 18, 22), 5), ((10, 28, 12), 4)])
    train = [dict(a, patient="P1", licence="CC0", dataset="synthetic"), dict(b, patient="P1", licence="CC0")]
    test = [dict(c, patient="P2", licence="MIT")]
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "test.json").write_text(json.dumps(test))
    (folder / "leaky.json").write_text(json.dumps([dict(a, patient="P1")] + test))
    return folder


@pytest.fixture(scope="module")
def built(tiny, dataset):
    bank = build_bank(dataset / "train.json", tiny, log=lambda s: None)
    return bank


def test_build_records_provenance_and_self_retrieval(tiny, dataset, built):
    bank = built
    assert len(bank) == 3 and bank.meta["crop"] == "gt" and bank.meta["block"] == 1
    assert [c["patient"] for c in bank.cases] == ["P1", "P1"]
    assert bank.cases[0]["licence"] == "CC0" and bank.cases[0]["dataset"] == "synthetic"
    assert bank.meta["split"] == "train.json" and len(bank.meta["split_sha256"]) == 64
    assert bank.keys.dtype == torch.float16 and bank.descriptors.dtype == torch.float32
    # the recorded keys/values are the block's qkv output for exactly the input the evaluation feeds
    from FastSAM3DLib.evaluation import dataset as ds
    from FastSAM3DLib.geometry import extract_model_input, roi_centred_on_mask
    case = ds.find_cases(dataset / "train.json")[0]
    volume, labels, _ = ds.load_case(case)
    roi = roi_centred_on_mask(volume, labels == 1, 128, 1.5)
    x = torch.from_numpy(extract_model_input(volume, roi))[None, None]
    tokens, _ = _capture_block_input(tiny, 1, x)
    attn = tiny.image_encoder.blocks[1].attn
    with torch.no_grad():
        qkv = attn.qkv(tokens).reshape(1, 512, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    assert torch.allclose(bank.keys[0].float(), qkv[1, 0], atol=2e-3, rtol=1e-3)
    assert torch.allclose(bank.values[0].float(), qkv[2, 0], atol=2e-3, rtol=1e-3)
    # self-retrieval at distance 0; the leakage guard removes the patient's entries
    with attach_memory(tiny, bank, k=3) as handle:
        _encode(tiny, x)
        assert handle.last[0]["rows"][0] == 0 and handle.last[0]["distances"][0] == 0.0
        handle.exclude(cases=["a1"])
        _encode(tiny, x)
        assert handle.last[0]["rows"] == [2]
        handle.exclude(patients=["P1"])
        _encode(tiny, x)
        assert handle.last[0]["rows"] == []


def test_click_crop_bank(tiny, dataset):
    bank = build_bank(dataset / "train.json", tiny, crop="click", descriptor="pooled16", kv_dtype="float32",
                      log=lambda s: None)
    assert bank.meta["crop"] == "click" and bank.descriptors.shape == (3, 16 ** 3)
    assert bank.keys.dtype == torch.float32


def test_cli_build_and_inspect(dataset, tmp_path, capsys):
    from FastSAM3DLib.memory.cli import main

    out = tmp_path / "bank.safetensors"
    assert main(["build", str(dataset / "train.json"), "--model", "tiny-test", "--checkpoint", "random",
                 "--output", str(out), "--quiet"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["inspect", str(out), "--entries"]) == 0
    text = capsys.readouterr().out
    assert "patients 1" in text and "CC0" in text and "a1 / label_1" in text and "encoder sha256" in text
    assert main(["build", str(dataset / "train.json"), "--model", "tiny-test", "--checkpoint", "random",
                 "--output", str(tmp_path / "bank.pt")]) == 2
    import os
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    for refused, message in ((tmp_path / "fifo.safetensors", "special file"),
                             (tmp_path / "folder.safetensors", "existing folder"),
                             (dataset / "train.json", "is the input")):
        capsys.readouterr()
        assert main(["build", str(dataset / "train.json"), "--model", "tiny-test", "--checkpoint", "random",
                     "--output", str(refused), "--quiet"]) == 2  # refused before the build, not after it
        assert message in capsys.readouterr().err
    assert (tmp_path / "fifo.safetensors").is_fifo() and not any((tmp_path / "folder.safetensors").iterdir())
    capsys.readouterr()  # with --quiet nothing is logged, so the error itself says why nothing could be used
    assert main(["build", str(dataset / "a1.nii.gz"), "--label", str(tmp_path / "nope.nii.gz"), "--model",
                 "tiny-test", "--checkpoint", "random", "--output", str(tmp_path / "none.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nope.nii.gz does not exist" in err and "messages above" not in err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    # the bank made with seed-0 random weights is accepted by a model with the same weights only
    assert load_bank(out, build_model("tiny-test", seed=0)).meta["model"] == "tiny-test"
    from FastSAM3DLib.memory import find_banks
    (tmp_path / "not-a-bank.safetensors").write_bytes(b"garbage")
    assert [b["path"] for b in find_banks([tmp_path], model="tiny-test")] == [out]
    assert find_banks([tmp_path], model="fastsam3d") == []


def test_main_cli_can_register_the_command():
    import argparse

    from FastSAM3DLib.memory.cli import add_memory_arguments, add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory", "inspect", "x.safetensors"])
    assert args.func.__name__ == "cmd_inspect"
    seg = argparse.ArgumentParser()
    add_memory_arguments(seg)
    args = seg.parse_args(["--memory", "b.safetensors", "--memory-rule", "released", "--memory-k", "5"])
    assert (args.memory, args.memory_rule, args.memory_k, args.memory_local_ratio) == ("b.safetensors", "released",
                                                                                         5, 0.3)


# ------------------------------------------------------------------------------------------------ evaluation
def test_evaluation_guard_and_journal(tiny, dataset, built, tmp_path):
    from FastSAM3DLib.memory.evaluation import evaluate_with_memory, paired_comparison

    common = dict(clicks=2, placement="gt", plots=False, progress=False, save_predictions=False, log=lambda s: None)
    with pytest.raises(MemoryBankError, match="test patient"):
        evaluate_with_memory(dataset / "leaky.json", tiny, tmp_path / "leak", bank=built, **common)
    assert attached_memory(tiny) is None
    out = tmp_path / "eval"
    evaluate_with_memory(dataset / "test.json", tiny, out, bank=None, name="off", **common)
    evaluate_with_memory(dataset / "test.json", tiny, out, bank=built, name="on", **common)
    evaluate_with_memory(dataset / "leaky.json", tiny, tmp_path / "excl", bank=built, name="on", guard="exclude",
                         **common)
    assert attached_memory(tiny) is None
    journal = [json.loads(line) for line in (tmp_path / "excl" / "memory_retrievals.jsonl").read_text().splitlines()]
    for item in journal:  # a1's own patient (P1) is never retrieved for it
        if item["case"] == "a1":
            assert item["rows"] == [] and "memory off" in item["note"]
        else:
            assert item["rows"] and all("patient P1" in e for e in item["entries"])
    stats = paired_comparison(out, "off", "on", clicks=(1, 2))
    assert [s["click"] for s in stats] == [1, 2] and all(s["n"] == 2 for s in stats)
    # the warm-up on a blank input is not journalled; every line names its structure
    plain = [json.loads(line) for line in (out / "memory_retrievals.jsonl").read_text().splitlines()]
    assert plain and all(item["case"] == "b1" and item["structure"] and item["placement"] == "gt"
                         for item in plain), plain[:2]
    # the same name with other memory settings is refused before anything is written (it 'resumed' every unit
    # and showed the first setting's numbers under the second's)
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    for other, match in ((dict(k=1), "memory bank"), (dict(rule="released"), "memory bank"),
                         (dict(local_ratio=0.5), "memory bank"), (dict(clicks=3), "clicks=2")):
        with pytest.raises(EvaluationStateError, match=match):
            evaluate_with_memory(dataset / "test.json", tiny, out, bank=built, name="on", **{**common, **other})
        assert attached_memory(tiny) is None
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before
    evaluate_with_memory(dataset / "test.json", tiny, out, bank=built, name="on", **common)  # same: resumes


def test_the_guard_knows_the_bank_image_under_another_case_name(tiny, tmp_path):
    """A case name is relative to the folder scanned: the bank made from ``data/`` calls the image ``sub/a1``, an
    evaluation of ``data/sub/`` calls it ``a1``. The guard compares the image files' bytes too."""
    from FastSAM3DLib.memory.evaluation import evaluate_with_memory

    import shutil

    test, made_from = tmp_path / "test", tmp_path / "data" / "sub"
    test.mkdir()
    made_from.mkdir(parents=True)
    _write_case(test, "a1", 0, [((18, 20, 20), 6)])
    _write_case(test, "b1", 2, [((20, 18, 22), 5)])
    for name in ("a1.nii.gz", "a1_seg.nii.gz"):
        shutil.copy(test / name, made_from / name)
    bank = build_bank(tmp_path / "data", tiny, log=lambda s: None)
    assert [c["case"] for c in bank.cases] == ["sub/a1"]  # the same image under another case name
    common = dict(clicks=1, placement="gt", plots=False, progress=False, save_predictions=False, log=lambda s: None)
    with pytest.raises(MemoryBankError, match="a1"):
        evaluate_with_memory(test, tiny, tmp_path / "refused", bank=bank, **common)
    summary = evaluate_with_memory(test, tiny, None, bank=bank, guard="exclude", **common)
    assert summary["runtime"]["structures_evaluated"] == 2  # both cases, though no results folder was given
    evaluate_with_memory(test, tiny, tmp_path / "excl", bank=bank, guard="exclude", **common)
    journal = [json.loads(line) for line in (tmp_path / "excl" / "memory_retrievals.jsonl").read_text().splitlines()]
    assert all(item["rows"] == [] for item in journal if item["case"] == "a1")  # never its own image
    assert any(item["rows"] and "sub/a1" in item["entries"][0] for item in journal if item["case"] == "b1")


def _write_dicom_series(image, folder: Path) -> None:
    """``image`` as a DICOM series, one file per slice, that SimpleITK's GDCM series reader puts back together.

    GDCM's writer leaves the process's LC_CTYPE at "C" (then every later ``read_text()`` without an encoding
    decodes ASCII): the locale is put back afterwards."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(image, folder)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(image, folder: Path) -> None:
    import SimpleITK as sitk

    folder.mkdir()
    image = sitk.Cast(image, sitk.sitkInt16)
    series = "1.2.826.0.1.3680043.2.1125.1.1"
    direction = image.GetDirection()
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in (("0020|000e", series), ("0020|000d", series + ".9"), ("0008|0060", "CT"),
                           ("0020|0013", str(k + 1)), ("0008|0018", f"{series}.{k + 1}"),
                           ("0020|0032", "\\".join(f"{v:g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0037", "\\".join(f"{v:g}" for v in direction[0:7:3] + direction[1:8:3]))):
            piece.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # else every slice gets a series of its own
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(piece)


def test_a_dicom_series_is_banked_and_guarded_by_its_files(tiny, tmp_path):
    """A case whose image is a DICOM folder gets a checksum over its files, so a copy of the series elsewhere is
    recognised by the leakage guard (the checksum once read the folder as a file and failed)."""
    import shutil

    import SimpleITK as sitk

    from FastSAM3DLib.memory.build import image_sha256
    from FastSAM3DLib.memory.evaluation import evaluate_with_memory

    made_from, test = tmp_path / "train", tmp_path / "test"
    made_from.mkdir()
    _write_case(made_from, "a1", 0, [((18, 20, 20), 6)])
    _write_dicom_series(sitk.ReadImage(str(made_from / "a1.nii.gz")), made_from / "a1_series")
    (made_from / "train.json").write_text(json.dumps([{"image": "a1_series", "label": "a1_seg.nii.gz",
                                                        "case": "a1", "patient": "P1"}]))
    bank = build_bank(made_from / "train.json", tiny, log=lambda s: None)
    assert bank.cases[0]["image_sha256"] == image_sha256(made_from / "a1_series")
    shutil.copytree(made_from / "a1_series", test / "other_series")
    shutil.copy(made_from / "a1_seg.nii.gz", test / "b_seg.nii.gz")
    (test / "test.json").write_text(json.dumps([{"image": "other_series", "label": "b_seg.nii.gz", "case": "b",
                                                 "patient": "P9"}]))
    common = dict(clicks=1, placement="gt", plots=False, progress=False, save_predictions=False, log=lambda s: None)
    with pytest.raises(MemoryBankError, match=r"images of test case\(s\) b \(under other case names"):
        evaluate_with_memory(test / "test.json", tiny, tmp_path / "refused", bank=bank, **common)
    first = sorted((test / "other_series").iterdir())[0]
    first.write_bytes(first.read_bytes()[:-2] + b"\x00\x01")  # one pixel differs: another image
    assert image_sha256(test / "other_series") != bank.cases[0]["image_sha256"]


def test_a_bank_with_a_damaged_header_is_refused_clearly(tiny, tmp_path):
    import struct

    path = save_bank(_random_bank(tiny), tmp_path / "good.safetensors")
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])

    def edited(**changes):
        meta = dict(header["__metadata__"])
        for key, value in changes.items():
            if value is None:
                meta.pop(key)
            else:
                meta[key] = value
        text = json.dumps(dict(header, __metadata__=meta)).encode()
        text += b" " * (-len(text) % 8)
        out = tmp_path / "edited.safetensors"
        out.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
        return out

    entries = json.loads(header["__metadata__"]["entries"])
    lettered = json.dumps([dict(e, case=f"a{e['case']}") for e in entries])  # was a ValueError traceback
    for changes, message in [({"grid": "abc"}, "grid"), ({"entries": "[1, 2, 3, 4, 5]"}, "records"),
                             ({"entries": lettered}, "not the number of a case"),
                             ({"descriptor": "nonsense"}, "unknown retrieval descriptor"),
                             ({"descriptor": "pooled16"}, "numbers"), ({"tensors_sha256": None}, "no checksum"),
                             ({"format": "fastsam3d-memory-bank/2"}, "format 'fastsam3d-memory-bank/2'.*update")]:
        with pytest.raises(MemoryBankError, match=message):
            load_bank(edited(**changes), tiny)
        assert attached_memory(tiny) is None
    (tmp_path / "cut.safetensors").write_bytes(data[:100])
    with pytest.raises(MemoryBankError, match="damaged or truncated"):
        load_bank(tmp_path / "cut.safetensors", tiny)


def test_an_unreadable_bank_is_said_to_be_unreadable_not_damaged(tiny, tmp_path, monkeypatch):
    import builtins

    path = save_bank(_random_bank(tiny), tmp_path / "locked.safetensors")
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):  # tests run as root, which ignores file permissions
        if Path(os.fspath(file)) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(MemoryBankError, match="cannot be opened \\(Permission denied\\).*permissions"):
        load_bank(path, tiny)


def test_paired_comparison_by_hand(tmp_path):
    from FastSAM3DLib.memory.evaluation import comparison_table, paired_comparison

    rows = []
    for model, offset in (("off", 0.0), ("on", 0.1)):
        for unit in range(6):
            for click in (1, 2, 3):
                rows.append({"model": model, "case": f"c{unit}", "structure": "s", "value": "1",
                             "placement": "gt", "protocol": "fastsam3d", "click": str(click),
                             "dice_crop": str(0.1 * click + offset * (unit % 2))})
    import csv
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stats = paired_comparison(tmp_path, "off", "on", clicks=(1, 3), patients={f"c{u}": f"P{u}" for u in range(6)})
    assert stats[0]["n"] == 6 and abs(stats[0]["diff"] - 0.05) < 1e-9
    assert stats[0]["wins"] == 3 and stats[0]["ties"] == 3 and stats[0]["ci_over"] == "patients"
    assert stats[0]["ci95"][0] <= 0.05 <= stats[0]["ci95"][1]
    assert "| gt | 1 | 6 |" in comparison_table(stats)
    # cases of one patient are not independent: two patients are too few to resample, whatever the case count
    two = paired_comparison(tmp_path, "off", "on", clicks=(1,), patients={f"c{u}": f"P{u % 2}" for u in range(6)})
    assert two[0]["patients"] == 2 and two[0]["ci_over"].startswith("units")
    assert paired_comparison(tmp_path, "off", "on", clicks=(1,))[0]["ci_over"].startswith("cases")


# ------------------------------------------------------------------------------------------------ session
def test_session_retrieves_once_per_region(tiny, dataset, built):
    from FastSAM3DLib.evaluation import dataset as ds
    from FastSAM3DLib.session import InteractiveSession

    case = ds.find_cases(dataset / "test.json")[0]
    volume, _, _ = ds.load_case(case)
    centre = volume.ijk_to_ras @ np.array([22, 18, 20, 1.0])
    with attach_memory(tiny, built) as handle:
        session = InteractiveSession(tiny, volume)
        for offset in (0.0, 2.0, -2.0):
            session.add_click(centre[:3] + offset)
        assert handle.retrievals == 1  # three clicks, one region encoding, one retrieval


# ------------------------------------------------------------------------------------------------ benchmark
def test_benchmark_dry_run_gives_valid_measurements():
    from FastSAM3DLib.benchmarks import report
    from FastSAM3DLib.benchmarks.memory import measure
    from FastSAM3DLib.benchmarks.suite import Plan

    plan = Plan(device="cpu", precisions=("fp32",), repeats=1, skip={"medim": "dry run"})
    rows = measure(plan, "CPU, 2 threads")
    names = {(r["name"], r["variant"]) for r in rows}
    assert ("memory_retrieval_ms", "") in names and ("memory_overhead_ms", "memory: attention") in names
    assert all(r["model"] == "tiny-test" for r in rows)
    assert not report.validate({"schema": 1, "kind": "bench", "date": "x", "environment": {}, "measurements": rows})
    assert all(r["value"] is not None for r in rows if r["name"] != "memory_overhead_ms")
    skipped = measure(Plan(device="cpu", precisions=("fp32",), skip={"memory": "not wanted"}), "CPU")
    assert all(r["skipped"] == "not wanted" for r in skipped)


def test_the_bank_menu_says_which_banks_the_model_cannot_use_without_importing_torch(tiny, tmp_path):
    """The effect's menu reads headers on Slicer's main thread: a bank that records other weights than the
    model loads, and one of a newer format, are listed with the reason (not found out at the first click, nor
    hidden), files that are no banks are left out, and PyTorch is not imported."""
    from safetensors.numpy import save_file

    from FastSAM3DLib.memory.header import NEWER_FORMAT, OTHER_WEIGHTS

    mine, theirs = "a" * 64, "b" * 64
    for name, label in (("mine", f"mine.pth (sha256 {mine})"), ("theirs", f"theirs.pth (sha256 {theirs})"),
                        ("random", "random weights (seed 0)"), ("python", ""),  # python: no file named: unknown
                        ("fast", f"fastsam3d.safetensors (sha256 {theirs})")):  # a download's fast copy: unknown
        bank = _random_bank(tiny)
        bank.meta["checkpoint"] = label
        save_bank(bank, tmp_path / f"{name}.safetensors")
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "newer.safetensors"),
              metadata={"format": "fastsam3d-memory-bank/2", "model": "tiny-test"})
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "newer-other-model.safetensors"),
              metadata={"format": "fastsam3d-memory-bank/2", "model": "fastsam3d"})
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage")
    code = textwrap.dedent(f"""
        import json, sys
        from FastSAM3DLib.memory.header import find_banks
        print(json.dumps([(b["path"].stem, b["problem"], b["entries"])
                          for b in find_banks([{str(tmp_path)!r}], model="tiny-test", weights_sha256={mine!r})]))
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    listed, torch_loaded = out.strip().splitlines()
    assert json.loads(listed) == [["fast", "", 5], ["mine", "", 5], ["newer", NEWER_FORMAT, 0], ["python", "", 5],
                                  ["random", OTHER_WEIGHTS, 5], ["theirs", OTHER_WEIGHTS, 5]]
    assert torch_loaded == "False"
    from FastSAM3DLib.memory import find_banks
    assert all(b["problem"] in ("", NEWER_FORMAT) for b in find_banks([tmp_path], model="tiny-test"))  # unchecked


def test_the_weights_checksum_a_bank_is_compared_with(tmp_path):
    from FastSAM3DLib.files import sha256_file
    from FastSAM3DLib.weights import find_checkpoint, weights_sha256

    assert weights_sha256("fastsam3d-demo") == sha256_file(find_checkpoint("fastsam3d-demo"))
    assert weights_sha256("no-such-model", tmp_path) is None
    assert weights_sha256("tiny-test", tmp_path) is None  # no published weights


def test_a_bank_built_from_cached_weights_records_the_verified_files_checksum(tmp_path):
    """`memory build --checkpoint cached` recorded the file it loaded: for a download that is the fast
    .safetensors copy, whose checksum is never the verified file's, so the menu called its banks unusable."""
    from FastSAM3DLib.memory.cli import main
    from FastSAM3DLib.memory.header import find_banks, read_bank_metadata
    from FastSAM3DLib.weights import weights_sha256

    case = _write_case(tmp_path, "a1", 0, [((18, 20, 20), 6)])
    (tmp_path / "train.json").write_text(json.dumps([dict(case, patient="P1")]))
    out = tmp_path / "banks" / "demo.safetensors"
    assert main(["build", str(tmp_path / "train.json"), "--model", "fastsam3d-demo", "--checkpoint", "cached",
                 "--output", str(out), "--quiet"]) == 0
    sha = weights_sha256("fastsam3d-demo")
    assert read_bank_metadata(out)["checkpoint"] == f"fastsam3d-demo weights (sha256 {sha})"
    assert [b["problem"] for b in find_banks([out.parent], "fastsam3d-demo", weights_sha256=sha)] == [""]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see open and mapped files")
def test_a_loaded_bank_holds_its_file_neither_open_nor_mapped(tiny, tmp_path):
    """The bank's tensors were memory-mapped from its file: on Windows a bank a model holds (Slicer's cached
    model) could then not be rebuilt at its path, nor deleted (FASTSAM3D_EMULATE_WINDOWS showed it)."""
    from windows_files import open_in_this_process

    path = save_bank(_random_bank(tiny, n=3), tmp_path / "bank.safetensors")
    bank = load_bank(path, tiny)
    assert len(bank) == 3 and not open_in_this_process(path)


def test_loading_a_bank_does_not_hold_a_second_copy_of_its_file_in_memory(tiny, tmp_path):
    """Reading the file's bytes whole and then making the tensors from them needed twice the bank's size at once
    (about 2 x 160 MB for a 100-entry bank of the official model); the tensors are now copied from a mapping."""
    import tracemalloc

    path = save_bank(_random_bank(tiny, n=40), tmp_path / "bank.safetensors")
    size = path.stat().st_size
    assert size > 1_000_000
    tracemalloc.start()
    try:
        bank = load_bank(path, tiny)
        peak = tracemalloc.get_traced_memory()[1]  # Python objects only (a bytes copy of the file would be one)
    finally:
        tracemalloc.stop()
    assert len(bank) == 40 and peak < size / 4, (peak, size)


def test_a_bank_whose_header_is_nested_too_deeply_is_refused_with_the_usual_message(tiny, tmp_path, capsys):
    """JSON nested 100,000 deep raised RecursionError, not ValueError: one such file in the bank folder broke
    the effect's whole bank menu, and ``memory inspect`` printed a traceback."""
    from safetensors.numpy import save_file

    from FastSAM3DLib.cli import main
    from FastSAM3DLib.memory.header import find_banks, read_bank_metadata

    save_bank(_random_bank(tiny), tmp_path / "good.safetensors")
    deep = tmp_path / "deep.safetensors"
    save_file({"x": np.zeros(1, np.float32)}, str(deep),
              metadata={"format": "fastsam3d-memory-bank/1", "model": "tiny-test", "entries": "[" * 100_000})
    assert [b["path"].name for b in find_banks([tmp_path], model="tiny-test")] == ["good.safetensors"]
    with pytest.raises(MemoryBankError, match="unreadable metadata .the JSON is nested too deeply"):
        read_bank_metadata(deep)
    assert main(["memory", "inspect", str(deep)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
