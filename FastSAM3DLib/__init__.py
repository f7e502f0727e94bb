"""FastSAM3DLib: FastSAM3D and SAM-Med3D interactive 3D segmentation, exact to the official checkpoints.

Public entry points are imported lazily so that ``import FastSAM3DLib`` is cheap and does not import torch
(Slicer loads the extension at start-up, before the user has installed PyTorch).
"""

_EXPORTS = {
    "build_model": "registry",
    "list_models": "registry",
    "get_model_config": "registry",
    "ModelConfig": "registry",
    "InteractiveSession": "session",
    "Volume": "geometry",
    "FastSAM3DError": "errors",
    "InputImageError": "errors",
    "PromptError": "errors",
    "CheckpointError": "errors",
    "WeightsUnavailableError": "errors",
    "DownloadError": "errors",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    """Import public names on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'FastSAM3DLib' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
