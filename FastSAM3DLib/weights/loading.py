"""Load checkpoint files safely and put their weights into a model with strict key checking.

Pickled checkpoints are read with ``torch.load(weights_only=True)``: besides tensors and plain containers,
only the three harmless classes the official FastSAM3D training checkpoint stores are allowed
(``argparse.Namespace``, ``collections.Counter``, ``torch.device``). Anything else in the pickle (a function,
an arbitrary class) is refused before it runs. ``.safetensors`` files hold no code at all and are
memory-mapped. Allowing those classes needs ``torch.serialization.add_safe_globals``, new in PyTorch 2.4: the
minimum :mod:`FastSAM3DLib.requirements` states and checks.
"""
from __future__ import annotations

import argparse
import collections
import re
import threading
from pathlib import Path
from typing import Dict

import torch

from ..errors import CheckpointError

#: Keys under which training checkpoints keep the model weights, tried in this order.
WEIGHTS_KEYS = ("model_state_dict", "state_dict", "model")

# torch.serialization.safe_globals changes a process-wide list; serialise its use across threads.
_SAFE_GLOBALS_LOCK = threading.Lock()
# Phrases of torch's weights-only unpickler meaning "the pickle asks for something not on the allow-list",
# compared in lower case (torch 2.13 says "unsupported GLOBAL posix.system whose module posix is blocked").
_UNSAFE_MARKERS = ("unsupported global", "unsupported operand", "trying to call reduce", "can only build",
                   "unsupported class", "not an allowed global", "is blocked")
_DOWNLOAD_HINT = ("Get the official file with 'python -m FastSAM3DLib download MODEL' (in Slicer: the Download "
                  "button) or import a complete copy with 'python -m FastSAM3DLib import MODEL FILE'.")


def safe_globals() -> list:
    """The non-tensor classes a checkpoint may contain: exactly those the official checkpoints use."""
    return [argparse.Namespace, collections.Counter, torch.device]


def load_state_dict(path) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file without running code in it; return its flat weight dictionary.

    Accepts the official training format (``{"model_state_dict": ...}``, optimiser state and all), plain
    state dicts and ``.safetensors`` files. Raises CheckpointError saying what is wrong and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist. Check the path; for a published model, "
                              "download it (python -m FastSAM3DLib download NAME) or import the file.")
    kind = sniff_format(path)
    if kind == "safetensors":
        from .safetensors_cache import check_fast_copy

        state_dict = _load_safetensors(path)
        check_fast_copy(path, state_dict)
    else:
        state_dict = extract_weights(load_checkpoint(path, kind), path)
    check_finite(state_dict, path)
    return state_dict


def check_finite(state_dict: Dict[str, torch.Tensor], path="checkpoint") -> None:
    """Refuse weights holding NaN or infinite values (CheckpointError naming the first such tensors).

    One sum per tensor (a NaN or infinity makes it non-finite); only a tensor whose sum is not finite is
    checked value by value, so a 600 MB checkpoint costs a few tens of milliseconds.
    """
    bad = []
    for key, tensor in state_dict.items():
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
            continue
        accumulate = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None
        if bool(torch.isfinite(tensor.sum(dtype=accumulate)).all()):
            continue
        count = int((~torch.isfinite(tensor)).sum())
        if count:
            bad.append((key, count, tensor.numel()))
    if bad:
        where = ", ".join(f"{count} of {total} in '{key}'" for key, count, total in bad[:3])
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise CheckpointError(f"Refused to load {path}: its weights hold values that are not finite numbers (NaN or "
                              f"infinity: {where}{more}), so every result would be wrong. The file is damaged or "
                              f"comes from a failed training run. {_DOWNLOAD_HINT}")


def load_checkpoint(path, kind: str = "") -> object:
    """The whole unpickled object of a PyTorch checkpoint (weights, optimiser state, ...), read safely."""
    path = Path(path)
    kind = kind or sniff_format(path)
    size = path.stat().st_size
    if kind == "empty":
        raise CheckpointError(f"{path} is empty (0 bytes): a download or copy did not finish. {_DOWNLOAD_HINT}")
    if kind == "html":
        raise CheckpointError(f"{path} is a web page, not a checkpoint (often a proxy sign-in page or a Google "
                              f"Drive confirmation page saved under the checkpoint's name). {_DOWNLOAD_HINT}")
    if kind not in ("zip", "pickle"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (it does not start like one). {_DOWNLOAD_HINT}")
    try:
        return _torch_load(path, mmap=kind == "zip")
    except Exception as exc:  # noqa: BLE001 - translated into one message the user can act on
        raise _load_error(path, kind, size, exc) from None


def extract_weights(obj, path="checkpoint") -> Dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside a loaded checkpoint object (unwrapping ``model_state_dict``).

    Only names that are strings and tensors that hold data in memory (dense, on the CPU) count as weights."""
    if isinstance(obj, dict):
        for key in WEIGHTS_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and _weights_dict(inner):
                return dict(inner)
        if _weights_dict(obj):
            return dict(obj)
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(f"{path} contains no model weights that this plugin recognises (top-level keys: "
                              f"{keys}). Use the official checkpoint file for the model.")
    raise CheckpointError(f"{path} contains a {type(obj).__name__}, not model weights. Use the official "
                          "checkpoint file for the model.")


def _weights_dict(value: dict) -> bool:
    """Whether ``value`` is a non-empty ``{str: dense CPU tensor}`` dict (meta, sparse or quantized tensors and
    non-string names are not weights this library can load)."""
    return bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.device.type == "cpu"
                               and v.layout == torch.strided and not v.is_quantized for k, v in value.items())


def sniff_format(path) -> str:
    """What a file looks like from its first bytes: zip, pickle, safetensors, html, empty or unknown."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < Path(path).stat().st_size:
        return "safetensors"
    if head.lstrip()[:1] == b"<":
        return "html"
    return "unknown"


def load_into_model(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], model_name: str) -> None:
    """Copy ``state_dict`` into ``model`` after checking every key and shape; name what does not fit.

    When the file was made for another model, the message says what the file looks like (for example
    "a SAM-Med3D / SAM-Med3D-turbo checkpoint (12 encoder blocks, 12 heads)") and which model it fits.
    """
    expected = model.state_dict()
    if (any(k.startswith("image_encoder.") for k in expected)
            and not any(k.startswith("image_encoder.") for k in state_dict)):
        state_dict = {(k if k.startswith(("prompt_encoder.", "mask_decoder.")) else "image_encoder." + k): v
                      for k, v in state_dict.items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong_shape:
        from .identify import identify_state_dict

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(f"{len(wrong_shape)} with the wrong shape (e.g. {k}: {tuple(state_dict[k].shape)} in the "
                         f"file, {tuple(expected[k].shape)} in the model)")
        found = identify_state_dict(state_dict)
        raise CheckpointError(f"This checkpoint does not fit model '{model_name}'. {found.sentence()} "
                              f"Keys: " + "; ".join(parts) + ".")
    model.load_state_dict(state_dict, strict=True)


def _torch_load(path: Path, mmap: bool):
    """torch.load with weights_only=True and the allow-list (falls back gracefully on older torch)."""
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        with _SAFE_GLOBALS_LOCK, serialization.safe_globals(safe_globals()):
            return _torch_load_mmap(path, mmap)
    if hasattr(serialization, "add_safe_globals"):  # torch 2.4
        serialization.add_safe_globals(safe_globals())
    return _torch_load_mmap(path, mmap)  # torch < 2.4: only tensors and containers can be read


def _torch_load_mmap(path: Path, mmap: bool):
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except TypeError:  # torch < 2.1 has no mmap argument
            pass
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_error(path: Path, kind: str, size: int, exc: Exception) -> CheckpointError:
    text = str(exc)
    if any(marker in text.lower() for marker in _UNSAFE_MARKERS):
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"<class '([\w.]+)'>", text)
        name = found.group(1) if found else "an object that is not plain data"
        if name in ("argparse.Namespace", "collections.Counter") and not hasattr(torch.serialization,
                                                                               "add_safe_globals"):
            from ..requirements import TORCH_MINIMUM

            return CheckpointError(f"{path} stores training settings ({name}) that PyTorch {torch.__version__} "
                                   f"cannot read safely. Update PyTorch to {'%d.%d' % TORCH_MINIMUM} or newer (in "
                                   "Slicer: the PyTorch Utils module).")
        return CheckpointError(
            f"Refused to load {path} as unsafe: it refers to '{name}', which a weights file never needs; "
            "unpickling it could run code on this computer. Nothing from the file was executed. Only use "
            f"checkpoints from sources you trust. {_DOWNLOAD_HINT}")
    if kind == "zip" and ("central directory" in text or "PytorchStreamReader" in text or "zip" in text.lower()):
        return CheckpointError(f"{path} is damaged or truncated ({size} bytes): the download or copy did not "
                               f"finish. {_DOWNLOAD_HINT}")
    lowered = text.lower()
    if isinstance(exc, EOFError) or any(w in lowered for w in ("ran out of input", "truncated", "unexpected eof")):
        return CheckpointError(f"{path} is truncated ({size} bytes). {_DOWNLOAD_HINT}")
    detail = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    detail = detail.group(1) if detail else (text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    return CheckpointError(f"Cannot read checkpoint {path} ({detail[:200]}). The file may be damaged or not a "
                           f"PyTorch checkpoint. {_DOWNLOAD_HINT}")


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"Reading {path} needs the 'safetensors' package: install it with "
                              "'pip install safetensors' (in Slicer: pip_install('safetensors')).") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
        raise CheckpointError(f"{path} is damaged ({exc}). Delete it; it is rebuilt from the original checkpoint "
                              "on the next load.") from None
