"""The int8 kernels of the fast precision (FastSAM3DLib.int8_products): exact sums, quantisation, the choice.

Every kernel that runs on this CPU is tested, whether or not it is the one chosen here; the choice itself is
tested with given timings (never by asserting a speed).
"""
import copy
import time

import pytest
import torch
from torch import nn

from FastSAM3DLib import int8_products, quantize
from FastSAM3DLib.registry import build_model

WORKING = [k for k in int8_products.KERNELS if int8_products.kernel_works(k)[0]]


@pytest.fixture
def fresh_choice(monkeypatch):
    """choose_kernel decides again (and again after the test), without $FASTSAM3D_INT8_KERNEL."""
    monkeypatch.delenv(int8_products.ENV_VAR, raising=False)
    int8_products.choose_kernel.cache_clear()
    yield
    int8_products.choose_kernel.cache_clear()


def test_some_kernel_runs_on_this_cpu():
    reasons = {k: int8_products.kernel_works(k)[1] for k in int8_products.KERNELS}
    assert WORKING, reasons


@pytest.mark.parametrize("kernel", WORKING)
def test_integer_products_are_exact_at_the_extremes(kernel):
    generator = torch.Generator().manual_seed(3)
    low, high = (-127, 127) if kernel == "int_mm" else (0, int8_products.ONEDNN_LEVELS)
    values = torch.randint(low, high + 1, (40, 300), generator=generator)
    values[:4] = high  # rows of the largest values against columns of the largest weights: the largest sums
    values[4:8] = low
    weight = torch.randint(-127, 128, (300, 70), generator=generator)
    weight[:, :3] = 127
    weight[:, 3:6] = -127
    dtype = torch.int8 if kernel == "int_mm" else torch.uint8
    packed = int8_products.PackedWeights()
    for _ in range(2):  # the second product reuses the packed weights
        out = int8_products.integer_product(values.to(dtype), weight.to(torch.int8), kernel, packed)
        assert out.dtype == torch.float32 and out.shape == (40, 70)
        assert torch.equal(out.double(), values.double() @ weight.double())


@pytest.mark.parametrize("kernel", int8_products.KERNELS)
def test_activation_quantisation_round_trip(kernel):
    x = torch.randn(50, 64) * torch.linspace(0.01, 30, 50)[:, None]
    x[0] = 0.0  # an all-zero row
    x[1] = x[1].abs()  # a row without negative values
    values, scale, zero = int8_products.quantize_activations(x, kernel)
    if kernel == "int_mm":
        assert values.dtype == torch.int8 and zero is None and values.abs().max() <= 127
        restored = values.float() * scale
    else:
        assert values.dtype == torch.uint8 and int(values.max()) <= int8_products.ONEDNN_LEVELS
        assert torch.equal(zero, zero.round()) and zero[1].item() == 0  # no negatives: zero point 0
        restored = (values.float() - zero) * scale
        assert torch.all(restored[x == 0] == 0)  # 0 is represented exactly
    assert torch.all((restored - x).abs() <= scale * 0.5001 + 1e-6)
    assert torch.all(restored[0] == 0)


@pytest.mark.parametrize("kernel", WORKING)
def test_each_kernel_gives_layers_close_to_the_float_ones(kernel):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200)
    x = torch.randn(3, 7, 96) * 4
    conv = nn.Conv3d(24, 20, 3, padding=1)
    volume = torch.randn(2, 24, 6, 6, 6)
    with torch.no_grad():
        layer = quantize.Int8Linear.from_linear(linear, kernel)
        assert layer.int8_kernel == kernel and kernel in repr(layer)
        out = layer(x)
        assert (out - linear(x)).norm() / linear(x).norm() < 0.02
        assert torch.allclose(layer(torch.zeros(2, 96)), linear.bias.expand(2, -1))
        int8_conv = quantize.Int8Conv3d(conv, kernel=kernel)
        assert (int8_conv(volume) - conv(volume)).norm() / conv(volume).norm() < 0.02


def test_the_kernels_agree_with_each_other():
    if len(WORKING) < 2:
        pytest.skip(f"only {WORKING} runs on this CPU")
    torch.manual_seed(1)
    linear = nn.Linear(128, 64)
    x = torch.randn(30, 128)
    with torch.no_grad():
        outs = [quantize.Int8Linear.from_linear(linear, k)(x) for k in WORKING]
        assert (outs[0] - outs[1]).norm() / outs[0].norm() < 0.02


def test_a_deep_copy_of_an_int8_model_runs_and_gives_the_same_result():
    model = build_model("tiny-test", seed=0)
    quantize.quantize_encoder(model.image_encoder, WORKING[-1])
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.image_encoder(x)  # packs weights (oneDNN): opaque tensors a deep copy cannot copy
        copied = copy.deepcopy(model)
        assert torch.equal(copied.image_encoder(x), before)


# ------------------------------------------------------------------------------------------------------
# the choice


def test_the_fastest_kernel_that_pays_off_is_chosen(fresh_choice, monkeypatch):
    monkeypatch.setattr(int8_products, "kernel_works", lambda kernel: (True, ""))
    monkeypatch.setattr(int8_products, "time_kernels", lambda: {"float32": 0.010, "int_mm": 0.30, "onednn": 0.004})
    assert int8_products.choose_kernel("cpu") == ("onednn", "")
    int8_products.choose_kernel.cache_clear()
    monkeypatch.setattr(int8_products, "time_kernels", lambda: {"float32": 0.010, "int_mm": 0.003, "onednn": 0.004})
    assert int8_products.choose_kernel("cpu") == ("int_mm", "")


def test_no_kernel_when_int8_is_not_faster_and_the_model_stays_exact(fresh_choice, monkeypatch):
    """An AVX2 CPU without oneDNN: torch._int_mm is ~35x slower than float32 there (measured)."""
    monkeypatch.setattr(int8_products, "kernel_works", lambda kernel: (kernel == "int_mm", "no oneDNN"))
    monkeypatch.setattr(int8_products, "time_kernels", lambda: {"float32": 0.010, "int_mm": 0.350})
    kernel, why = int8_products.choose_kernel("cpu")
    assert kernel is None and "not faster than float32" in why and "int_mm 350.0 ms" in why
    assert quantize.int8_support("cpu") == (False, why)
    model = build_model("tiny-test", seed=0, precision="fast")
    assert model.precision == "exact" and model.precision_note == why
    assert not any(isinstance(m, quantize.Int8Linear) for m in model.modules())


def test_no_kernel_works(fresh_choice, monkeypatch):
    monkeypatch.setattr(int8_products, "kernel_works", lambda kernel: (False, f"{kernel} is missing"))
    kernel, why = int8_products.choose_kernel("cpu")
    assert kernel is None and why == "int_mm is missing; onednn is missing"


def test_a_kernel_can_be_forced_and_a_bad_name_is_refused(fresh_choice, monkeypatch):
    for kernel in WORKING:
        monkeypatch.setenv(int8_products.ENV_VAR, kernel)
        int8_products.choose_kernel.cache_clear()
        assert int8_products.choose_kernel("cpu") == (kernel, "")
        model = build_model("tiny-test", seed=0, precision="fast")
        assert model.precision == "fast" and model.image_encoder.blocks[0].mlp.lin1.int8_kernel == kernel
    monkeypatch.setenv(int8_products.ENV_VAR, "avx9000")
    int8_products.choose_kernel.cache_clear()
    with pytest.raises(ValueError, match=int8_products.ENV_VAR):
        int8_products.choose_kernel("cpu")


def test_gpus_get_no_int8_kernel(fresh_choice):
    kernel, why = int8_products.choose_kernel("cuda")
    assert kernel is None and "bf16" in why


def test_the_race_interleaves_and_drops_a_hopeless_kernel():
    order = []

    def contender(name, seconds):
        def run():
            order.append(name)
            time.sleep(seconds)
        return run

    def builds_first(name, first, then):  # like oneDNN: the first call builds the kernel
        calls = []

        def run():
            order.append(name)
            time.sleep(then if calls else first)
            calls.append(1)
        return run

    best = int8_products.race({"float32": contender("f", 0.002), "slow": contender("s", 0.03),
                               "middling": contender("m", 0.005), "quick": builds_first("q", 0.04, 0.001)},
                              repeats=3)
    assert order[:4] == ["f", "s", "m", "q"]  # one warm-up each, not judged
    # interleaved; "slow" (15x float32) left after its first round, "middling" (2.5x) ran every round
    assert order[4:] == ["f", "s", "m", "q"] + ["f", "m", "q"] * 2
    assert best["slow"] >= 0.03 and best["quick"] < best["float32"] < best["middling"] < best["slow"]


def test_make_bench_reports_each_kernel_against_float32(fresh_choice, monkeypatch):
    from FastSAM3DLib.benchmarks import int8_kernels, report
    from FastSAM3DLib.benchmarks.suite import Plan, extra_benchmarks

    assert int8_kernels.bench_rows in extra_benchmarks()
    monkeypatch.setattr(int8_products, "kernel_works",
                        lambda kernel: (True, "") if kernel == "onednn" else (False, "int_mm is missing"))
    monkeypatch.setattr(int8_products, "time_kernels", lambda: {"float32": 0.010, "onednn": 0.006})
    rows = {r["variant"]: r for r in int8_kernels.bench_rows(Plan(), "test CPU")}
    assert rows["onednn"]["value"] == pytest.approx(0.6) and "used by the fast precision" in rows["onednn"]["note"]
    assert rows["int_mm"]["value"] is None and rows["int_mm"]["skipped"] == "int_mm is missing"
    int8_products.choose_kernel.cache_clear()
    monkeypatch.setattr(int8_products, "time_kernels", lambda: {"float32": 0.010, "onednn": 0.012})
    rows = int8_kernels.bench_rows(Plan(), "test CPU")
    assert rows[-1]["value"] == pytest.approx(1.2) and "stays exact" in rows[-1]["note"]
    for row in int8_kernels.bench_rows(Plan(device="cuda"), "GPU"):
        assert row["value"] is None and "CPU path" in row["skipped"]
    assert "int8 / float32 time" in report.render_markdown([{"environment": {"cpu": "test"}, "date": "2026-12-01",
                                                              "measurements": rows, "details": {}}])
