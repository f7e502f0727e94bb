"""Where the extension's ``Resources/`` folder is (sample data, model manifest, bundled weights)."""
import os
from pathlib import Path


def resources_dir() -> Path:
    """The ``Resources`` folder: ``$FASTSAM3D_RESOURCES``, else beside the library (repository and Slicer layout)."""
    override = os.environ.get("FASTSAM3D_RESOURCES")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "Resources", here / "Resources"):
        if candidate.is_dir():
            return candidate
    return here.parent / "Resources"


def sample_path(name: str) -> Path:
    """Path of a bundled sample file (``Resources/SampleData/<name>``)."""
    return resources_dir() / "SampleData" / name
