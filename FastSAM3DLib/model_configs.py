"""What defines each registered model: its encoder and decoder sizes, its weights and its defaults.

Plain data, no PyTorch: the Slicer panel, the weights catalog and the command line read a model's defaults
(prompt mode, growth) before PyTorch is installed or loaded. :mod:`FastSAM3DLib.registry` builds the models.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of the image encoder."""

    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 384
    window_size: int = 0
    global_attn_indexes: Tuple[int, ...] = ()
    mlp_only_blocks: int = 0
    block_form: str = "pre_norm"  # or "fastsam3d"
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> Tuple[int, int, int]:
        """Token grid of one input volume."""
        side = self.img_size // self.patch_size
        return (side, side, side)



@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines one registered model."""

    name: str
    description: str
    encoder: EncoderConfig
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    weights: Optional[str] = None  # manifest entry holding the official weights, if any
    spacing_mm: float = 1.5  # isotropic voxel size the model was trained on
    default_prompt_mode: str = "all"  # see session.py: "newest" (FastSAM3D's protocol) or "all"
    # whether the effect, `segment` and segment_volume_node grow segments over several regions unless told
    # (growth.py); off where growth was measured to give no gain
    grows_by_default: bool = True
    aliases: tuple = field(default=())

    @property
    def image_size(self) -> int:
        """Side of the cubic model input in voxels."""
        return self.encoder.img_size


_SAM_MED3D_ENCODER = EncoderConfig(embed_dim=768, depth=12, num_heads=12, window_size=14,
                                   global_attn_indexes=(2, 5, 8, 11), block_form="pre_norm")

_MODELS: Dict[str, ModelConfig] = {cfg.name: cfg for cfg in [
    ModelConfig(
        name="fastsam3d",
        description="FastSAM3D (Shen et al., MICCAI 2024): 6-block encoder distilled from SAM-Med3D-turbo",
        encoder=EncoderConfig(embed_dim=768, depth=6, num_heads=6, mlp_only_blocks=2, window_size=0,
                              block_form="fastsam3d"),
        weights="fastsam3d",
        default_prompt_mode="newest",
    ),
    ModelConfig(
        name="sam-med3d-turbo",
        description="SAM-Med3D-turbo (Wang et al. 2023): the 12-block teacher, fine-tuned on 44 datasets",
        encoder=_SAM_MED3D_ENCODER,
        weights="sam-med3d-turbo",
    ),
    ModelConfig(
        name="sam-med3d",
        description="SAM-Med3D architecture (same network as SAM-Med3D-turbo; bring your own checkpoint)",
        encoder=_SAM_MED3D_ENCODER,
    ),
    ModelConfig(
        name="tiny-test",
        description="Random-weight miniature of the FastSAM3D code path for tests (seconds on a CPU)",
        encoder=EncoderConfig(embed_dim=48, depth=3, num_heads=2, mlp_only_blocks=1, mlp_ratio=2.0,
                              out_chans=48, block_form="fastsam3d"),
        prompt_embed_dim=48, mask_in_chans=8, decoder_heads=4, decoder_mlp_dim=64, iou_head_hidden_dim=32,
    ),
    # Models of this project's own training pipeline (FastSAM3DLib/training, Resources/Models/MODEL_CARD.md).
    ModelConfig(
        name="tiny-test-teacher",
        description="Random-weight 6-block SAM-Med3D-style miniature: the teacher of tiny-test in training tests",
        encoder=EncoderConfig(embed_dim=64, depth=6, num_heads=2, mlp_ratio=2.0, window_size=14,
                              global_attn_indexes=(2, 5), out_chans=48, block_form="pre_norm"),
        prompt_embed_dim=48, mask_in_chans=8, decoder_heads=4, decoder_mlp_dim=64, iou_head_hidden_dim=32,
    ),
    ModelConfig(
        name="sam-med3d-demo-teacher",
        description="Small SAM-Med3D-style model (12 blocks, width 192) trained by this project: the demo's teacher",
        encoder=EncoderConfig(embed_dim=192, depth=12, num_heads=6, window_size=14, global_attn_indexes=(2, 5, 8, 11),
                              out_chans=96, block_form="pre_norm"),
        prompt_embed_dim=96, mask_in_chans=16, decoder_heads=4, decoder_mlp_dim=384, iou_head_hidden_dim=64,
        default_prompt_mode="newest",
    ),
    ModelConfig(
        name="fastsam3d-demo",
        description="Small FastSAM3D-style model (6 blocks, width 192) distilled and fine-tuned by this project; "
                    "bundled in Resources/Models for offline use",
        encoder=EncoderConfig(embed_dim=192, depth=6, num_heads=3, mlp_only_blocks=2, window_size=0,
                              out_chans=96, block_form="fastsam3d"),
        prompt_embed_dim=96, mask_in_chans=16, decoder_heads=4, decoder_mlp_dim=384, iou_head_hidden_dim=64,
        default_prompt_mode="newest",
        # measured on example_ct's structures > 150 mm: it never reaches a region's border, and keeping its
        # earlier regions cost 0.017 Dice (README, growth)
        grows_by_default=False,
    ),
]}


def list_models() -> List[str]:
    """Names of all registered models."""
    return list(_MODELS)


def get_model_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` registered under ``name``."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_MODELS)}") from None
