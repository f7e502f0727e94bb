"""The registered models reproduce the official code: the public fixtures and live medim (SAM-Med3D)."""
import numpy as np
import pytest
import torch

from FastSAM3DLib import build_model, get_model_config, list_models
from FastSAM3DLib.parity import fill_like_fixture, fixture_input, relative_l2, run_prompt_steps

FIXTURES = {"fastsam3d": "fastsam3d_public.npz", "sam-med3d": "sammed3d_public.npz"}
KEY_LISTS = {"fastsam3d": "keys_fastsam3d.txt", "sam-med3d": "keys_sammed3d.txt",
             "sam-med3d-turbo": "keys_sammed3d.txt"}
REL_TOL = 5e-5


def official_keys(reference_dir, filename):
    """(key, shape) pairs from a reference key list."""
    rows = []
    for line in (reference_dir / filename).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = line.split("\t")[:2]
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


@pytest.mark.parametrize("name", sorted(KEY_LISTS))
def test_state_dict_keys_and_shapes_are_official(name, reference_dir):
    model = build_model(name)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert sorted(ours) == sorted(official_keys(reference_dir, KEY_LISTS[name]))


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def fixture_run(request, reference_dir):
    """Build a model with the fixture fill, run every recorded call, return (reference, ours)."""
    name = request.param
    ref = np.load(reference_dir / "fixtures" / FIXTURES[name])
    model = build_model(name)
    fill_like_fixture(model, ref["plus_one_keys"])
    x = fixture_input()
    np.testing.assert_allclose([x.sum().item(), x.abs().sum().item()], ref["input_stats"][:2], rtol=1e-6)
    points, labels = torch.tensor(ref["points"]), torch.tensor(ref["labels"])
    with torch.no_grad():
        embedding = model.image_encoder(x)
    ours = run_prompt_steps(model, embedding, points, labels)
    ours["image_embedding"] = embedding.numpy()
    fill_like_fixture(model, ref["plus_one_keys"], torch.tensor(ref["pe1_gaussian_matrix"]))
    ours.update(run_prompt_steps(model, embedding, points, labels, prefix="pe1_"))
    return ref, ours


def test_every_fixture_array_is_reproduced(fixture_run):
    ref, ours = fixture_run
    compared = 0
    for key in ref.files:
        if ref[key].dtype.kind != "f" or key in ("pe1_gaussian_matrix", "points", "input_stats"):
            continue
        assert key in ours, f"fixture array {key} is not produced"
        assert ours[key].shape == ref[key].shape, key
        assert relative_l2(ours[key], ref[key]) <= REL_TOL, key
        compared += 1
    assert compared >= 25


def test_thresholded_masks_match(fixture_run):
    ref, ours = fixture_run
    for key in ("step1_mask128_uint8", "step2_mask128_uint8", "step1_zeromask_mask128_uint8"):
        assert (ours[key] != ref[key]).sum() <= 1e-4 * ref[key].size, key


def test_fastsam3d_block_outputs_match(reference_dir):
    blocks = np.load(reference_dir / "fixtures" / "fastsam3d_public_encoder_blocks.npz")
    ref = np.load(reference_dir / "fixtures" / "fastsam3d_public.npz")
    model = build_model("fastsam3d")
    fill_like_fixture(model, ref["plus_one_keys"])
    with torch.no_grad():
        _, outputs = model.image_encoder(torch.tensor(blocks["input_image"]), return_block_outputs=True)
    for i, out in enumerate(outputs):
        assert relative_l2(out.numpy(), blocks[f"dbg_enc_block{i:02d}_out"]) <= REL_TOL, f"block {i}"


def test_sam_med3d_matches_medim_live():
    medim = pytest.importorskip("medim")
    ours = build_model("sam-med3d", seed=3)
    theirs = medim.create_model("SAM-Med3D", pretrained=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 1, 128, 128, 128, generator=gen)
    points = torch.tensor([[[30.0, 90.0, 60.0], [64.0, 20.0, 100.0]]])
    labels = torch.tensor([[1, 0]])
    with torch.no_grad():
        emb_ours, emb_theirs = ours.image_encoder(x), theirs.image_encoder(x)
        assert relative_l2(emb_ours.numpy(), emb_theirs.numpy()) <= REL_TOL
        results = []
        for model, emb in ((ours, emb_ours), (theirs, emb_theirs)):
            sparse, dense = model.prompt_encoder(points=(points, labels), boxes=None, masks=None)
            results.append(model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                              multimask_output=False))
    assert relative_l2(results[0][0].numpy(), results[1][0].numpy()) <= REL_TOL
    assert relative_l2(results[0][1].numpy(), results[1][1].numpy()) <= REL_TOL


def test_sam_med3d_padding_matters():
    """Dropping SAM-Med3D's zero-padded windows changes the output (so the padded path is really exercised)."""
    model = build_model("sam-med3d", seed=5)
    x = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        padded = model.image_encoder(x)
        for block in model.image_encoder.blocks:
            block.attn.window = None  # tables have 27 rows: only the padded path can use them
        with pytest.raises(ValueError):
            model.image_encoder(x)
    assert padded.shape == (1, 384, 8, 8, 8)


def test_registry_lists_models_and_rejects_unknown():
    assert {"fastsam3d", "sam-med3d-turbo", "sam-med3d", "tiny-test"} <= set(list_models())
    assert get_model_config("sam-med3d-turbo").encoder == get_model_config("sam-med3d").encoder
    with pytest.raises(ValueError, match="known models"):
        build_model("sam-huge")


def test_seeded_builds_are_reproducible():
    a, b = build_model("tiny-test", seed=1), build_model("tiny-test", seed=1)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("name", ["fastsam3d", "sam-med3d", "tiny-test"])
@pytest.mark.parametrize("batch", [1, 2])
def test_blocked_upscaling_equals_the_plain_modules(name, batch):
    """The decoder's masks from its upscaling done as matrix products in blocked voxel order (faster) against
    the official formula: the modules run as they are on the tokens viewed as a volume, then the hypernetwork
    product."""
    decoder = build_model(name, seed=0).mask_decoder
    torch.manual_seed(0)
    dim = decoder.iou_token.embedding_dim
    tokens = torch.randn(batch, 512, dim)
    hyper_in = torch.randn(batch, decoder.num_mask_tokens, dim // 8)
    volume = tokens.reshape(batch, 8, 8, 8, -1).permute(0, 4, 1, 2, 3)  # as the official decoder views its tokens
    with torch.no_grad():
        got = decoder._upscaled_masks(tokens, (8, 8, 8), hyper_in)
        upscaled = decoder.output_upscaling(volume.contiguous())
        expected = (hyper_in @ upscaled.reshape(batch, dim // 8, -1)).reshape(batch, -1, 32, 32, 32)
    assert got.shape == expected.shape == (batch, decoder.num_mask_tokens, 32, 32, 32)
    scale = expected.abs().max()
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=2e-6)


def test_blocked_upscaling_refuses_an_overlapping_convolution():
    from FastSAM3DLib.mask_decoder import _transposed_conv_rows

    with pytest.raises(ValueError, match="kernel = stride"):
        _transposed_conv_rows(torch.zeros(4, 8), torch.nn.ConvTranspose3d(8, 4, kernel_size=3, stride=2))
