"""Helpful strictness: official layouts, what a file looks like, which model it fits, the split release."""
import pytest
import torch

from FastSAM3DLib.errors import CheckpointError
from FastSAM3DLib.weights.identify import combine_split_release, identify_state_dict
from FastSAM3DLib.weights.layouts import full_layout, official_layout
from FastSAM3DLib.weights.loading import load_into_model
from test_weights_support import meta_state_dict, module_with_shapes, tiny_layouts, tiny_state_dict


def official_meta(arch):
    return meta_state_dict(official_layout(arch))


def encoder_only(state_dict):
    """The image encoder without its prefix, as the older split release stores it."""
    n = len("image_encoder.")
    return {k[n:]: v for k, v in state_dict.items() if k.startswith("image_encoder.")}


def sam2d_vit_b():
    """Key names and shapes of a 2D SAM ViT-B checkpoint (segment-anything layout), as meta tensors."""
    shapes = {"image_encoder.pos_embed": (1, 64, 64, 768), "image_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
              "image_encoder.patch_embed.proj.bias": (768,)}
    for i in range(12):
        b = f"image_encoder.blocks.{i}."
        rows = 127 if i in (2, 5, 8, 11) else 27
        shapes.update({b + "norm1.weight": (768,), b + "attn.rel_pos_h": (rows, 64), b + "attn.rel_pos_w": (rows, 64),
                       b + "attn.qkv.weight": (2304, 768), b + "attn.proj.weight": (768, 768),
                       b + "norm2.weight": (768,), b + "mlp.lin1.weight": (3072, 768),
                       b + "mlp.lin2.weight": (768, 3072)})
    shapes.update({"image_encoder.neck.0.weight": (256, 768, 1, 1), "image_encoder.neck.2.weight": (256, 256, 3, 3),
                   "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
                   **{f"prompt_encoder.point_embeddings.{i}.weight": (1, 256) for i in range(4)},
                   "mask_decoder.iou_token.weight": (1, 256), "mask_decoder.mask_tokens.weight": (4, 256)})
    return meta_state_dict(shapes)


def test_official_layouts_match_the_reference_key_lists(reference_dir):
    for arch, name, count in [("fastsam3d", "keys_fastsam3d.txt", 216), ("sam-med3d", "keys_sammed3d.txt", 324)]:
        rows = [line.split("\t")[:2] for line in (reference_dir / name).read_text().splitlines()
                if line and not line.startswith("#")]
        reference = [(key, tuple(int(n) for n in shape.strip("()").split(",") if n.strip())) for key, shape in rows]
        assert list(official_layout(arch).items()) == reference and len(reference) == count


def test_registry_models_have_the_official_layouts():
    registry = pytest.importorskip("FastSAM3DLib.registry")
    for name, arch in [("fastsam3d", "fastsam3d"), ("sam-med3d-turbo", "sam-med3d")]:
        with torch.device("meta"):
            model = registry.Sam3D(registry.get_model_config(name), "torch")
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_layout(arch)


def test_official_checkpoints_are_named_and_matched_to_their_models():
    fast = identify_state_dict(official_meta("fastsam3d"))
    assert fast.description == "a FastSAM3D checkpoint (6 encoder blocks, 6 heads)"
    assert fast.official and fast.fits == ("fastsam3d",)
    turbo = identify_state_dict(official_meta("sam-med3d"))
    assert turbo.description == "a SAM-Med3D / SAM-Med3D-turbo checkpoint (12 encoder blocks, 12 heads)"
    assert turbo.fits == ("sam-med3d-turbo",) and "fits model 'sam-med3d-turbo'" in turbo.sentence()


def test_encoder_only_file_of_the_split_release():
    found = identify_state_dict(encoder_only(official_meta("fastsam3d")))
    assert found.kind == "encoder-only" and found.fits == ()
    assert found.description == "an encoder-only FastSAM3D file (6 encoder blocks, 6 heads)"
    assert "combine_split_release" in found.sentence()


def test_2d_sam_checkpoint():
    found = identify_state_dict(sam2d_vit_b())
    assert found.description == "a 2D SAM ViT-B checkpoint (12 encoder blocks, 12 heads)"
    assert "cannot run in this 3D plugin" in found.sentence()


def test_unknown_file():
    found = identify_state_dict({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)})
    assert found.kind == "unknown" and found.description.startswith("unknown")
    assert found.sentence().startswith("Its contents are unknown (2 tensors; first keys: fc.weight")


def test_miniature_is_recognised_but_fits_no_registered_model():
    found = identify_state_dict(tiny_state_dict("sam-med3d"))
    assert found.architecture == "sam-med3d" and not found.official and found.fits == ()
    assert "(12 encoder blocks, 12 heads, width 24)" in found.description


def test_wrong_checkpoint_for_the_model_names_what_it_is_and_what_fits():
    model = module_with_shapes(official_layout("fastsam3d"), device="meta")
    with pytest.raises(CheckpointError) as err:
        load_into_model(model, official_meta("sam-med3d"), "fastsam3d")
    message = str(err.value)
    assert message.startswith("This checkpoint does not fit model 'fastsam3d'.")
    assert "a SAM-Med3D / SAM-Med3D-turbo checkpoint (12 encoder blocks, 12 heads)" in message
    assert "fits model 'sam-med3d-turbo'" in message and "wrong shape" in message


def test_a_checkpoint_of_a_registered_variant_names_that_model():
    """The bundled demo model's file (or anything trained for it) loaded into another model was said to fit 'none
    of the registered models'."""
    from FastSAM3DLib.registry import build_model

    demo = {k: v.to("meta") for k, v in build_model("fastsam3d-demo", seed=0).state_dict().items()}
    assert identify_state_dict(demo).fits == ("fastsam3d-demo",)
    with pytest.raises(CheckpointError, match="fits model 'fastsam3d-demo': choose that model"):
        load_into_model(module_with_shapes({k: tuple(v.shape) for k, v in
                                            build_model("tiny-test", seed=0).state_dict().items()}, device="meta"),
                        demo, "tiny-test")


def test_encoder_only_file_into_full_model_points_to_the_split_release():
    model = module_with_shapes(official_layout("fastsam3d"), device="meta")
    with pytest.raises(CheckpointError) as err:
        load_into_model(model, encoder_only(official_meta("fastsam3d")), "fastsam3d")
    assert "an encoder-only FastSAM3D file" in str(err.value) and "combine_split_release" in str(err.value)
    assert "missing" in str(err.value)


def test_2d_checkpoint_into_3d_model():
    model = module_with_shapes(official_layout("sam-med3d"), device="meta")
    with pytest.raises(CheckpointError, match="a 2D SAM ViT-B checkpoint"):
        load_into_model(model, sam2d_vit_b(), "sam-med3d-turbo")


def test_matching_checkpoint_loads_every_value():
    weights = tiny_state_dict("fastsam3d", seed=3)
    model = module_with_shapes(full_layout(tiny_layouts()["fastsam3d"]))
    load_into_model(model, weights, "tiny")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_split_release_combines_into_one_fastsam3d_state_dict():
    encoder = tiny_state_dict("fastsam3d", seed=1, part="encoder")
    teacher = tiny_state_dict("sam-med3d", seed=2)
    combined = combine_split_release(encoder, teacher)
    assert list(combined) == list(full_layout(tiny_layouts()["fastsam3d"]))
    assert combined["image_encoder.blocks.0.mlp.lin1.weight"] is encoder["blocks.0.mlp.lin1.weight"]
    assert combined["mask_decoder.iou_token.weight"] is teacher["mask_decoder.iou_token.weight"]
    assert identify_state_dict(combined).architecture == "fastsam3d"
    model = module_with_shapes(full_layout(tiny_layouts()["fastsam3d"]))
    load_into_model(model, combined, "tiny")


def test_split_release_accepts_prefixed_encoder_and_official_shapes():
    combined = combine_split_release(
        {k: v for k, v in official_meta("fastsam3d").items() if k.startswith("image_encoder.")},
        official_meta("sam-med3d"))
    assert identify_state_dict(combined).fits == ("fastsam3d",)


def test_split_release_mistakes_are_explained():
    encoder = tiny_state_dict("fastsam3d", part="encoder")
    teacher = tiny_state_dict("sam-med3d")
    with pytest.raises(CheckpointError, match="first file must be the encoder-only FastSAM3D file. It looks like a "
                                              "SAM-Med3D"):
        combine_split_release(teacher, encoder)
    with pytest.raises(CheckpointError, match="already a complete FastSAM3D checkpoint"):
        combine_split_release(tiny_state_dict("fastsam3d"), teacher)
    with pytest.raises(CheckpointError, match="second file must be a SAM-Med3D checkpoint"):
        combine_split_release(encoder, {"fc.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="do not belong together"):
        combine_split_release(encoder, official_meta("sam-med3d"))
