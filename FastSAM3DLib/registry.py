"""Model registry: every supported model is a :class:`ModelConfig`, built by one code path.

Like ``segment_anything``'s ``sam_model_registry``: ``build_model(name)`` returns a module with
``image_encoder``, ``prompt_encoder`` and ``mask_decoder`` whose state-dict keys and shapes are exactly the
official ones, so official checkpoints and SAM-style research code work unchanged.
"""
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import FastSAM3DError
from .image_encoder import ImageEncoder3D
from .mask_decoder import MaskDecoder3D
from .model_configs import EncoderConfig, ModelConfig, get_model_config, list_models  # noqa: F401 - re-exported
from .prompt_encoder import PromptEncoder3D


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
