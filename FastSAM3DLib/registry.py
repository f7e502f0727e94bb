"""Model registry: every supported model is a :class:`ModelConfig`, built by one code path.

Like ``segment_anything``'s ``sam_model_registry``: ``build_model(name)`` returns a module with
``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` whose state-dict keys and shapes are exactly the
official ones, so official checkpoints and SAM-style research code work unchanged.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from .errors import FastSAM3DError
from .image_encoder import EncoderConfig, ImageEncoder3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


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


class Sam3D(nn.Module):
    """Container with the official attribute names ``image_encoder``, ``prompt_encoder``, ``mask_decoder``."""

    mask_threshold: float = 0.0

    def __init__(self, config: ModelConfig, attention_backend: str = "torch") -> None:
        super().__init__()
        self.config = config
        self.precision = "exact"  # or "fast": see FastSAM3DLib.quantize
        self.precision_note = ""  # why a requested fast precision was not applied
        enc = config.encoder
        self.image_encoder = ImageEncoder3D(enc, backend=attention_backend)
        self.prompt_encoder = PromptEncoder3D(config.prompt_embed_dim, enc.grid, (enc.img_size,) * 3,
                                              config.mask_in_chans)
        self.mask_decoder = MaskDecoder3D(config.prompt_embed_dim, config.num_multimask_outputs, 3,
                                          config.iou_head_hidden_dim, config.decoder_depth, config.decoder_heads,
                                          config.decoder_mlp_dim)


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


def build_model(name: str, checkpoint=None, device=None, attention_backend: Optional[str] = None,
                seed: Optional[int] = None, cache_dir=None, precision: Optional[str] = None, memory=None) -> Sam3D:
    """Build model ``name`` in eval mode.

    ``checkpoint``: ``None`` for freshly initialised weights (``seed`` makes them reproducible), a path to
    an official-format checkpoint (``{"model_state_dict": ...}`` or a plain state dict, loaded safely with
    strict key checking), or ``"cached"`` for the model's own weights: bundled with the extension, or the
    verified download in the model cache ``cache_dir`` (default: ``$FASTSAM3D_CACHE`` or the platform cache folder).
    ``attention_backend``: see :mod:`FastSAM3DLib.attention` (default: the best one for the device).
    ``precision``: ``"exact"`` (the official float32 network) or ``"fast"`` (the image encoder's matrix products
    in int8 on a CPU, see :mod:`FastSAM3DLib.quantize`); default ``$FASTSAM3D_PRECISION``, else exact. Where
    fast is unavailable the model stays exact and ``model.precision_note`` says why; ``model.precision`` tells.
    A device or backend that cannot be used raises a FastSAM3DError saying what to choose instead.
    ``memory``: a Memorizing SAM bank (``.safetensors`` path or ``MemoryBank``) to attach with the default
    settings, or a dict of :func:`FastSAM3DLib.memory.attach_memory` keyword arguments with the bank as
    ``"bank"`` (a bank that does not fit these weights is refused; it is attached before the int8 conversion of
    ``fast``); ``FastSAM3DLib.memory.attached_memory(model)`` returns its handle (``.detach()``, ``.settings()``).
    """
    from . import quantize, weights

    config = get_model_config(name)
    device = check_device(device)
    backend = check_attention_backend(attention_backend)
    try:
        precision = quantize.resolve_precision(precision)
    except ValueError as exc:
        raise FastSAM3DError(f"{exc} (exact is the official network, fast the int8 CPU encoder).") from None
    if isinstance(checkpoint, str) and checkpoint == "cached":
        checkpoint = cached_checkpoint(config, cache_dir)
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = Sam3D(config, backend)
    else:
        model = Sam3D(config, backend)
    if checkpoint is not None:
        weights.load_into_model(model, weights.load_state_dict(checkpoint), name)
    model = model.to(device).eval()
    if memory is not None:  # before the int8 copy: the bank is checked against the float weights it was made with
        from .memory import attach_memory

        options = dict(memory) if isinstance(memory, dict) else {"bank": memory}
        attach_memory(model, **options)
    if precision == "fast":
        supported, model.precision_note = quantize.int8_support(torch.device(device).type)
        if supported:
            quantize.quantize_encoder(model.image_encoder)
            model.precision = "fast"
    return model


def cached_checkpoint(config: ModelConfig, cache_dir=None) -> Path:
    """The weights file of ``config``: bundled, or verified in ``cache_dir``; else a WeightsUnavailableError
    whose one-line message says what to run (see :func:`FastSAM3DLib.weights.find_checkpoint`)."""
    from .weights import find_checkpoint

    return find_checkpoint(config.weights or config.name, cache_dir)


def check_device(device=None) -> str:
    """The device name to use (``None`` means ``"cpu"``), or a FastSAM3DError saying which device to choose."""
    name = str(device or "cpu")
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise FastSAM3DError(f"Unknown device '{name}': choose cpu, cuda, cuda:N (N-th GPU) or mps.") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise FastSAM3DError(f"Device '{name}' was requested but this PyTorch sees no usable CUDA GPU: choose "
                                 "cpu (--device cpu), or install a PyTorch build with CUDA (in Slicer: the "
                                 "PyTorch Utils module).")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise FastSAM3DError(f"There is no GPU '{name}': this machine has {count} "
                                 f"(cuda:0 to cuda:{count - 1}).")
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise FastSAM3DError("Apple MPS was requested but is not available here: choose cpu (--device cpu).")
    elif parsed.type != "cpu":
        raise FastSAM3DError(f"Device '{name}' is not supported: choose cpu, cuda, cuda:N or mps.")
    return name


def check_attention_backend(backend: Optional[str] = None) -> str:
    """The validated attention backend request (see :func:`attention.resolve_backend`), or a FastSAM3DError."""
    from . import attention

    try:
        return attention.resolve_backend(backend)
    except ValueError:
        raise FastSAM3DError(
            f"Unknown attention backend {backend!r}: choose auto, torch, triton or eager (torch works on every "
            "device)." if backend not in (None, "auto") else
            f"Unknown attention backend in the environment variable {attention.ENV_VAR}: set it to auto, torch, "
            "triton or eager, or unset it.") from None
