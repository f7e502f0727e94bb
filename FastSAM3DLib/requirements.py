"""The PyTorch version FastSAM3D needs, checked without importing torch.

The official checkpoints store ``argparse.Namespace`` training settings; reading them safely
(``torch.load(weights_only=True)``) needs ``torch.serialization.add_safe_globals``, new in PyTorch 2.4
(see :mod:`FastSAM3DLib.weights.loading`). Older versions can only read plain state dicts.
"""
import platform
import re
import sys
from typing import Optional, Tuple

#: Oldest PyTorch (major, minor) that reads the official checkpoints safely.
TORCH_MINIMUM: Tuple[int, int] = (2, 4)
#: The same as a pip requirement specifier, e.g. for Slicer's ``PyTorchUtils ... torchVersionRequirement``.
TORCH_REQUIREMENT = ">=%d.%d" % TORCH_MINIMUM

_UPDATE_HINT = ("Update it: in Slicer with the PyTorch Utils module, elsewhere with "
                f"pip install --upgrade \"torch{TORCH_REQUIREMENT}\".")


def installed_torch_version() -> Optional[str]:
    """The installed torch version string (e.g. ``"2.5.1+cu121"``), or None when torch is not installed.

    Read from the package metadata, so torch is not imported; imported only when it has no metadata.
    """
    from importlib import metadata, util

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        pass
    if util.find_spec("torch") is None:
        return None
    import torch  # a torch without metadata (e.g. a source build on sys.path)

    return str(torch.__version__)


def parse_version(text: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of a version such as ``"2.5.1+cu121"``, ``"2.4.0a0+git1"`` or ``"2.13"``; None if unreadable."""
    found = re.match(r"\s*v?(\d+)\.(\d+)", text or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def no_torch_build_here() -> Optional[str]:
    """Why no PyTorch new enough can be installed in this Python (a message saying what to do), else None.

    PyTorch 2.2 was the last release built for macOS on Intel (x86_64) processors; an x86_64 Python on an Apple
    Silicon Mac (an Intel build of Slicer, under Rosetta) cannot install the arm64 builds either.
    """
    if platform.system() == "Darwin" and platform.machine() == "x86_64":
        return ("PyTorch %d.%d or newer has no build for macOS on Intel (x86_64) processors (the last is 2.2). On "
                "an Intel Mac, use a FastSAM3D server: choose the server device under 'Model options'. On an Apple "
                "Silicon Mac, install the Apple Silicon (arm64) build of Slicer." % TORCH_MINIMUM)
    return None


def torch_restart_problem() -> Optional[str]:
    """A message saying to restart when this process still runs a PyTorch older than :data:`TORCH_MINIMUM` that
    was imported before a newer one was installed (e.g. by PyTorch Utils in a running Slicer), else None."""
    loaded = getattr(sys.modules.get("torch"), "__version__", None)
    parsed = parse_version(str(loaded)) if loaded is not None else None
    if parsed is None or parsed >= TORCH_MINIMUM:
        return None
    installed = installed_torch_version()
    if installed is None or installed == str(loaded) or (parse_version(installed) or (0, 0)) < TORCH_MINIMUM:
        return None  # nothing newer on disk: updating is what helps (torch_requirement_problem says so)
    return (f"PyTorch {installed} is installed, but PyTorch {loaded}, loaded before the update, still runs in "
            "this program. Restart Slicer (or this Python program) to use the new one.")


def torch_requirement_problem(version: Optional[str] = None) -> Optional[str]:
    """None when the installed PyTorch (or ``version``) is new enough, else a one-line message saying what to do.

    Pre-releases and local builds of the minimum (``2.4.0a0+git...``) are accepted; an unreadable version
    string is not judged (None). Without ``version``, an older PyTorch still loaded in this process after an
    update asks for a restart (:func:`torch_restart_problem`).
    """
    if version is None:
        restart = torch_restart_problem()
        if restart:
            return restart
    version = installed_torch_version() if version is None else version
    minimum = "%d.%d" % TORCH_MINIMUM
    parsed = parse_version(version) if version is not None else None
    if version is not None and (parsed is None or parsed >= TORCH_MINIMUM):
        return None
    no_build = no_torch_build_here()
    if no_build:  # installing or updating cannot help there
        return no_build
    if version is None:
        return (f"PyTorch is not installed; FastSAM3D needs PyTorch {minimum} or newer. Install it: in Slicer "
                f"with the PyTorch Utils module, elsewhere with pip install \"torch{TORCH_REQUIREMENT}\".")
    return (f"PyTorch {version} is installed, but FastSAM3D needs PyTorch {minimum} or newer to read the official "
            f"checkpoints safely. {_UPDATE_HINT}")
