"""Model weights: safe loading, strict checking (and, later, manifest, download, cache)."""
from .loading import load_into_model, load_state_dict

__all__ = ["load_state_dict", "load_into_model"]
