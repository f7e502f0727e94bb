"""Load checkpoint files safely and put their weights into a model with strict key checking."""
from pathlib import Path
from typing import Dict

import torch

from ..errors import CheckpointError


def load_state_dict(path) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file without running code in it; return its flat weight dictionary.

    Accepts the official training format (``{"model_state_dict": ...}``) and plain state dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist. Download the model or import the file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"Cannot read checkpoint {path}: {exc}. The file may be truncated or not a "
                              "PyTorch checkpoint; download it again.") from exc
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not contain model weights.")
    return dict(obj)


def load_into_model(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], model_name: str) -> None:
    """Copy ``state_dict`` into ``model`` after checking every key and shape; name what does not fit."""
    expected = model.state_dict()
    if not any(k.startswith("image_encoder.") for k in state_dict):
        state_dict = {("image_encoder." + k if not k.startswith(("prompt_encoder.", "mask_decoder.")) else k): v
                      for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with the wrong shape (e.g. {wrong_shape[0]})")
        raise CheckpointError(f"This checkpoint does not fit model '{model_name}': " + "; ".join(parts) + ".")
    model.load_state_dict(state_dict, strict=True)
