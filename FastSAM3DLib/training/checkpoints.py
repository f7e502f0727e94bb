"""Training checkpoints: the official format, written atomically, read back safely, resumable.

File layout (the official FastSAM3D / SAM-Med3D training format, see reference/PIPELINE.md §11)::

    {"model_state_dict": {...},        # the whole Sam3D model (image_encoder.*, prompt_encoder.*, mask_decoder.*)
     "optimizer_state_dict": {...},    # AdamW state (None in exported, weights-only files)
     "epoch": int,                     # epoch of the last finished step
     "args": {...},                    # the run's settings as a plain dict (str/int/float/bool/None/list/dict)
     # additions of this trainer (ignored by every loader that reads only "model_state_dict"):
     "step": int,                      # optimiser steps done
     "scaler_state_dict": {...},       # AMP GradScaler state (CUDA runs)
     "extra_state_dict": {...}}        # trainer-only modules, e.g. distillation projections (never in the model)

Everything in it is plain data, so ``torch.load(path, weights_only=True)`` reads it (no argparse.Namespace)
and ``build_model(name, checkpoint=path)`` loads the weights strictly.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..files import atomic_output

CHECKPOINT_NAME = "latest.pth"
WEIGHTS_NAME = "model.pth"


def plain(value: Any) -> Any:
    """``value`` as plain data: dataclasses/Namespaces/Paths/tuples become dicts/strings/lists, recursively."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if not callable(v)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.device):
        return str(value)
    return repr(value)


def atomic_save(obj: Any, path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a partial file."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_checkpoint(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], epoch: int,
                    step: int, args: Dict[str, Any], scaler=None,
                    extra: Optional[torch.nn.Module] = None) -> Path:
    """Write a resumable checkpoint (official keys plus ``step``, scaler and trainer-only modules) atomically."""
    payload = {
        "model_state_dict": _cpu(model.state_dict()),
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "args": plain(args),
        "step": int(step),
    }
    if scaler is not None and scaler.is_enabled():
        payload["scaler_state_dict"] = scaler.state_dict()
    if extra is not None and len(extra.state_dict()):
        payload["extra_state_dict"] = _cpu(extra.state_dict())
    return atomic_save(payload, path)


def export_weights(source, destination, dtype: Optional[torch.dtype] = None) -> Path:
    """Copy a checkpoint's model weights, epoch and args into a small file without the optimiser state.

    The result keeps the official keys (``optimizer_state_dict`` is ``None``), so every loader of the
    official format reads it; ``dtype`` (e.g. ``torch.float16``) optionally stores floating weights smaller.
    """
    checkpoint = load_checkpoint(source)
    state = checkpoint["model_state_dict"]
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    payload = {"model_state_dict": {k: v.contiguous().clone() for k, v in state.items()},
               "optimizer_state_dict": None, "epoch": checkpoint.get("epoch", 0),
               "args": checkpoint.get("args", {}), "step": checkpoint.get("step", 0)}
    return atomic_save(payload, destination)


def load_checkpoint(path) -> Dict[str, Any]:
    """Read a checkpoint written by this trainer with ``torch.load(weights_only=True)`` (no code runs)."""
    from ..errors import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - translated into one actionable message
        raise CheckpointError(f"Cannot read checkpoint {path} ({type(exc).__name__}: {str(exc)[:200]}). "
                              "It may be damaged or not written by this trainer; start a new run.") from None
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model_state_dict').")
    return checkpoint


def model_weights(path) -> Dict[str, torch.Tensor]:
    """The flat model state dict of a checkpoint file (any format the library's loader accepts)."""
    from ..weights import load_state_dict

    return load_state_dict(path)


def _cpu(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in state.items()}
