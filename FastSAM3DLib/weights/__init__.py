"""Model weights: manifest, per-user cache, verified download and import, safe loading, fast cached copies,
the list of selectable models (downloadable and bundled), and helpful checks of which model a checkpoint
belongs to.

Names are imported on first use (PEP 562), so ``import FastSAM3DLib.weights`` neither imports torch nor
touches the disk; downloading works without torch.
"""

_EXPORTS = {
    # safe loading and strict checking (loading.py)
    "load_state_dict": "loading",
    "load_into_model": "loading",
    "load_checkpoint": "loading",
    # what a file is (identify.py, layouts.py)
    "identify_state_dict": "identify",
    "Identification": "identify",
    "combine_split_release": "identify",
    "official_layout": "layouts",
    # manifest and cache (manifest.py, cache.py)
    "load_manifest": "manifest",
    "Manifest": "manifest",
    "ModelEntry": "manifest",
    "default_cache_dir": "cache",
    "resolve_cache_dir": "cache",
    "CacheWarning": "cache",
    # download and import (download.py)
    "download_model": "download",
    "import_file": "download",
    # the registry's entry point and cache state (store.py)
    "resolve_checkpoint": "store",
    "weights_status": "store",
    # every selectable model, downloadable and bundled, and the file to load (catalog.py)
    "available_models": "catalog",
    "model_choice": "catalog",
    "ModelChoice": "catalog",
    "preferred_model": "catalog",
    "find_checkpoint": "catalog",
    "weights_hint": "catalog",
    "weights_sha256": "catalog",
    # commands (commands.py)
    "add_subcommands": "commands",
    "download_weights": "commands",
    "import_weights": "commands",
    "models_table": "commands",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    """Import public names on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'FastSAM3DLib.weights' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)


def __dir__():
    return sorted(list(globals()) + __all__)
