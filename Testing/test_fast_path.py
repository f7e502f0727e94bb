"""The ``fast`` precision (int8 image encoder, FastSAM3DLib.quantize) against the exact network.

Agreement thresholds, never timings: the int8 layers against their float32 originals; whole models (tiny,
the parity fixtures' official-size fill, the bundled demo model on real data) by relative L2 of the logits,
agreement of the thresholded masks and Dice. The measured values (README, Speed options) sit well inside the
thresholds; a change that makes the fast path drift fails here.
"""
import numpy as np
import pytest
import torch
from torch import nn

from FastSAM3DLib import quantize
from FastSAM3DLib.benchmarks import precision as agreement
from FastSAM3DLib.errors import FastSAM3DError
from FastSAM3DLib.parity import fixture_input, relative_l2
from FastSAM3DLib.quantize import Int8Conv3d, Int8Linear
from FastSAM3DLib.registry import build_model


# the int8 path on this CPU whatever its timings say (the choice by speed: test_int8_products.py)
pytestmark = pytest.mark.usefixtures("int8_kernel")


def rel(a, b):
    return relative_l2(a.detach().numpy(), b.detach().numpy())


# ------------------------------------------------------------------------------------------------------
# the int8 layers


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = nn.Linear(96, 200)
    x = torch.randn(3, 7, 96) * 4
    layer = Int8Linear.from_linear(linear).eval()
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (3, 7, 200) and out.dtype == torch.float32
        assert rel(out, linear(x)) < 0.015
        assert torch.equal(layer.bias, linear.bias.detach())  # qkv.bias is read by SAM-Med3D's padded windows
        assert layer.weight_int8.dtype == torch.int8 and layer.weight_int8.abs().max() <= 127
        zero = layer(torch.zeros(2, 96))  # all-zero rows: scale clamped, output is the bias
        assert torch.allclose(zero, linear.bias.detach().expand(2, -1))


@pytest.mark.parametrize("conv", [nn.Conv3d(24, 20, 3, padding=1, bias=False), nn.Conv3d(24, 20, 1),
                                  nn.Conv3d(1, 32, 4, stride=4), nn.Conv3d(8, 16, 3, padding=0)],
                         ids=["3x3x3-same", "1x1", "patchify", "3x3x3-valid"])
def test_int8_convolutions_are_close_to_the_float_ones(conv):
    torch.manual_seed(1)
    x = torch.randn(2, conv.in_channels, 8, 8, 8)
    layer = Int8Conv3d(conv).eval()
    with torch.no_grad():
        ref = conv(x)
        out = layer(x)
        assert out.shape == ref.shape
        assert rel(out, ref) < 0.02
        last = Int8Conv3d(conv, channels_last=True)(x)
        assert torch.equal(last, out.permute(0, 2, 3, 4, 1))


def test_unsupported_convolutions_are_refused():
    for conv in (nn.Conv3d(4, 4, 3, stride=2, padding=1), nn.Conv3d(4, 4, 3, groups=2), nn.Conv3d(4, 4, (1, 3, 3))):
        with pytest.raises(ValueError):
            Int8Conv3d(conv)


def test_the_fast_precision_refuses_to_train():
    layer = Int8Linear.from_linear(nn.Linear(8, 4))
    layer.train()
    with pytest.raises(RuntimeError, match="inference only"):
        layer(torch.randn(2, 8))
    with torch.no_grad():  # evaluation inside a training loop is fine
        layer(torch.randn(2, 8))


# ------------------------------------------------------------------------------------------------------
# choosing the precision


def test_build_model_precision_option_and_environment(monkeypatch, int8_kernel):
    monkeypatch.delenv(quantize.ENV_VAR, raising=False)
    exact = build_model("tiny-test", seed=0)
    assert exact.precision == "exact" and not any(isinstance(m, Int8Linear) for m in exact.modules())
    fast = build_model("tiny-test", seed=0, precision="fast")
    assert fast.precision == "fast" and fast.precision_note == ""
    replaced = [m for m in fast.image_encoder.modules() if isinstance(m, (Int8Linear, Int8Conv3d))]
    linears = [m for m in exact.image_encoder.modules() if isinstance(m, nn.Linear)]
    assert len([m for m in replaced if isinstance(m, Int8Linear)]) >= len(linears)
    assert not any(isinstance(m, nn.Linear) for m in fast.image_encoder.modules())
    assert any(isinstance(m, nn.Linear) for m in fast.mask_decoder.modules())  # the decoder stays float32
    monkeypatch.setenv(quantize.ENV_VAR, "fast")
    assert build_model("tiny-test", seed=0).precision == "fast"
    assert build_model("tiny-test", seed=0, precision="exact").precision == "exact"  # the argument wins
    monkeypatch.setenv(quantize.ENV_VAR, "int4")
    with pytest.raises(FastSAM3DError, match=quantize.ENV_VAR):
        build_model("tiny-test", seed=0)
    with pytest.raises(FastSAM3DError, match="precision"):
        build_model("tiny-test", seed=0, precision="half")


def test_fast_stays_exact_where_int8_cannot_run(monkeypatch):
    monkeypatch.setattr(quantize, "int8_support", lambda device_type: (False, "no int8 here"))
    model = build_model("tiny-test", seed=0, precision="fast")
    assert model.precision == "exact" and model.precision_note == "no int8 here"


def test_int8_support_follows_the_kernel_choice():
    kernel, why = quantize.int8_products.choose_kernel("cpu")
    assert quantize.int8_support("cpu") == (kernel is not None, why)
    assert quantize.int8_support("cuda")[0] is False and "bf16" in quantize.int8_support("cuda")[1]


def test_sam_med3d_padded_windows_run_in_int8():
    """The windowed blocks read qkv.bias for the padding tokens: it must still be a tensor."""
    exact = build_model("tiny-test-teacher", seed=0)
    fast = agreement.fast_copy(exact)
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(fast.image_encoder(x), exact.image_encoder(x)) < 0.05


# ------------------------------------------------------------------------------------------------------
# agreement with the exact network


def test_tiny_model_session_masks_agree(one_torch_thread):
    from FastSAM3DLib.benchmarks.pipeline import click_centre, ct_sized_volume
    from FastSAM3DLib.session import InteractiveSession

    volume = ct_sized_volume((40, 80, 80))
    centre = click_centre(volume)
    exact = build_model("tiny-test", seed=0)
    fast = agreement.fast_copy(exact)
    masks = []
    for model in (exact, fast):
        session = InteractiveSession(model, volume)
        session.add_click(centre)
        result = session.add_click(centre + [4.0, -3.0, 2.0])
        masks.append(session.full_mask(result))
    assert masks[0].any()
    assert np.mean(masks[0] == masks[1]) >= 0.99  # random weights; measured 99.4 % of the volume


def test_fixture_fill_agreement(reference_dir, one_torch_thread):
    """Official-size FastSAM3D and SAM-Med3D with the fixtures' weight fill: the pessimistic case.

    Random weights leave most logits near 0, so int8 noise flips more voxels than with trained weights:
    measured 99.35 % (FastSAM3D) and 99.39 % (SAM-Med3D) of the 128³ voxels agree, embedding rel-L2 0.026,
    with torch._int_mm (symmetric rows); 99.13 % and 99.15 %, rel-L2 0.036, with oneDNN's kernel (rows on
    0..128). Below the 99.5 % bar, which is why fast is an option, not the default, for the official models.
    """
    rows = agreement.fixture_agreement(reference_dir)
    assert {r["model"] for r in rows} == {"fastsam3d", "sam-med3d"}
    for row in rows:
        assert row["embedding_rel_l2"] < 0.04, row
        for step in ("step1", "step2", "step1_zeromask"):
            assert row[f"{step}_logits_rel_l2"] < 0.04, row
            assert row[f"{step}_mask_agreement_pct"] > 99.0, row


def test_demo_model_on_real_data_agrees(shared_data, one_torch_thread, monkeypatch):
    """The bundled demo model on real CT and MR: measured >= 99.97 % of the voxels and Dice within 0.004."""
    from FastSAM3DLib.evaluation.dataset import as_cases

    cases = as_cases([(shared_data / "totalseg" / "example_ct.nii.gz", shared_data / "totalseg" / "example_seg.nii.gz"),
                      (shared_data / "sct" / "t2.nii.gz", shared_data / "sct" / "t2_seg-manual.nii.gz")])
    monkeypatch.setattr(agreement, "_cases", lambda data_dir: ((case.name, case) for case in cases))
    rows = agreement.data_agreement(shared_data, clicks=3, structures=2, log=lambda _: None)
    assert len({(r["case"], r["structure"]) for r in rows}) >= 3
    for row in rows:
        assert row["mask_agreement_pct"] >= 99.9, row
        assert row["logits_rel_l2"] < 0.01, row
        assert abs(row["dice_fast"] - row["dice_exact"]) <= 0.01, row
    summary = agreement.summarise_data(rows)
    assert all(s["min_mask_agreement_pct"] >= 99.9 for s in summary)


def test_random_official_weights_agreement_is_reported():
    rows = agreement.random_weight_agreement(models=("fastsam3d",))
    assert rows[0]["step1_mask_agreement_pct"] > 99.0 and rows[0]["embedding_rel_l2"] < 0.04


def test_fast_copy_leaves_the_original_exact():
    exact = build_model("tiny-test", seed=0)
    before = {k: v.clone() for k, v in exact.state_dict().items()}
    fast = agreement.fast_copy(exact)
    assert fast.precision == "fast" and exact.precision == "exact"
    assert all(torch.equal(before[k], v) for k, v in exact.state_dict().items())
    x = fixture_input()
    with torch.no_grad():
        assert not torch.equal(fast.image_encoder(x), exact.image_encoder(x))


def test_the_fast_model_of_the_memory_comparison_retrieves_from_its_own_bank(tmp_path):
    """The --memory comparison deep-copies the exact model with its bank: the copy's attention once still read
    the exact model's retrieval, so it compared exact + bank with int8 and no bank."""
    from FastSAM3DLib.benchmarks.memory import synthetic_bank
    from FastSAM3DLib.memory import attached_memory, save_bank

    plain = build_model("tiny-test", seed=0)
    bank = save_bank(synthetic_bank(plain, 3), tmp_path / "bank.safetensors")
    exact = build_model("tiny-test", seed=0, memory=bank)
    fast, fast_plain = agreement.fast_copy(exact), agreement.fast_copy(plain)
    x = fixture_input()
    with torch.no_grad():
        with_bank, without = fast.image_encoder(x), fast_plain.image_encoder(x)
    assert fast.precision == "fast" and exact.precision == "exact"
    assert attached_memory(fast).retrievals == 1 and attached_memory(exact).retrievals == 0
    assert not torch.equal(with_bank, without)
