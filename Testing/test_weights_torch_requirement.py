"""The real PyTorch minimum (2.4, for add_safe_globals in the official checkpoints), checked without importing torch."""
import re
import subprocess
import sys
import types
from importlib import metadata, util
from pathlib import Path

import pytest

from FastSAM3DLib import requirements
from FastSAM3DLib.requirements import (TORCH_MINIMUM, TORCH_REQUIREMENT, parse_version, torch_requirement_problem,
                                       torch_restart_problem)

REPO = Path(__file__).resolve().parents[1]


def installed(monkeypatch, version):
    """Pretend the torch distribution ``version`` is installed (None: not installed)."""
    def fake_version(name):
        assert name == "torch"
        if version is None:
            raise metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(metadata, "version", fake_version)


def test_requirement_constants_agree():
    assert TORCH_MINIMUM == (2, 4) and TORCH_REQUIREMENT == ">=2.4"


@pytest.mark.parametrize("version", ["2.1.0", "2.1.2+cu121", "2.3.1", "1.13.1", "2.0.0+cpu"])
def test_old_torch_is_refused_with_the_minimum_named(monkeypatch, version):
    installed(monkeypatch, version)
    problem = torch_requirement_problem()
    assert problem is not None and "\n" not in problem
    assert f"PyTorch {version} is installed" in problem and "2.4 or newer" in problem
    assert "PyTorch Utils" in problem and 'pip install --upgrade "torch>=2.4"' in problem


@pytest.mark.parametrize("version", ["2.4.0", "2.4.1+cu124", "2.5.1+cu121", "2.13.0", "2.13.0+cpu",
                                     "2.4.0a0+git1234abc", "2.6.0.dev20241201", "3.0.0"])
def test_new_enough_torch_is_accepted(monkeypatch, version):
    installed(monkeypatch, version)
    assert torch_requirement_problem() is None
    assert torch_requirement_problem(version) is None


@pytest.mark.parametrize("loaded, on_disk, restart", [
    ("2.2.2", "2.6.0", True),  # updated while the old one runs (PyTorch Utils in a running Slicer)
    ("2.2.2+cu118", "2.5.1+cu121", True),
    ("2.2.2", "2.2.2", False),  # not updated: the update message, not a restart
    ("2.2.2", "2.3.1", False),  # updated, still too old: updating again is what helps
    ("2.6.0", "2.6.0", False),
    ("2.6.0", "2.2.2", False),  # a newer one runs: the installed one is judged, as before
])
def test_an_old_pytorch_still_loaded_after_an_update_asks_for_a_restart(monkeypatch, loaded, on_disk, restart):
    """The panel said "all installed" after PyTorch Utils updated PyTorch while an old one was already imported,
    and every click then failed to load the model."""
    installed(monkeypatch, on_disk)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__=loaded))
    problem = torch_requirement_problem()
    assert (torch_restart_problem() is not None) == restart
    if restart:
        assert problem.startswith(f"PyTorch {on_disk} is installed, but PyTorch {loaded}") and "Restart" in problem
    else:
        assert problem is None or "Restart" not in problem
    assert (torch_requirement_problem(on_disk) is None) == (parse_version(on_disk) >= TORCH_MINIMUM)  # as before


def test_explicit_version_argument_needs_no_installation(monkeypatch):
    installed(monkeypatch, "2.13.0")
    assert "2.2.0" in torch_requirement_problem("2.2.0")


def test_parse_version():
    assert parse_version("2.5.1+cu121") == (2, 5) and parse_version("2.13") == (2, 13)
    assert parse_version("v2.4.0") == (2, 4) and parse_version("nonsense") is None
    assert torch_requirement_problem("nonsense") is None  # unreadable: not judged


def test_torch_not_installed(monkeypatch):
    installed(monkeypatch, None)
    monkeypatch.setattr(util, "find_spec", lambda name: None)
    problem = torch_requirement_problem()
    assert problem.startswith("PyTorch is not installed") and "2.4 or newer" in problem
    assert requirements.installed_torch_version() is None


def test_torch_without_metadata_is_imported_for_its_version(monkeypatch):
    installed(monkeypatch, None)
    monkeypatch.setattr(util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.2.1"))
    assert requirements.installed_torch_version() == "2.2.1"
    assert "2.2.1" in torch_requirement_problem()


def test_check_does_not_import_torch():
    code = ("import sys; from FastSAM3DLib.requirements import torch_requirement_problem; "
            "print(torch_requirement_problem(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["None", "False"]


def test_package_metadata_states_the_same_minimum():
    text = (REPO / "pyproject.toml").read_text()
    found = re.search(r'"torch\s*([<>=!~][^"]*)"', text)
    assert found and found.group(1).replace(" ", "") == TORCH_REQUIREMENT, \
        f"pyproject.toml must require torch{TORCH_REQUIREMENT}"


def test_slicer_module_uses_the_library_requirement():
    source = (REPO / "FastSAM3D" / "FastSAM3D.py").read_text()
    assert "torch_requirement_problem" in source and "TORCH_REQUIREMENT" in source
    assert not re.search(r'["\']>=\s*2\.[0-3]\b', source), "the module states an older torch minimum"


@pytest.mark.parametrize("version", [None, "2.2.2"])
def test_on_an_intel_mac_the_message_says_that_no_new_pytorch_exists_and_what_to_do(monkeypatch, version):
    """PyTorch 2.2 was the last build for macOS on x86_64: 'update it' cannot work there, a server can."""
    monkeypatch.setattr(requirements.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(requirements.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(requirements, "installed_torch_version", lambda: version)
    message = torch_requirement_problem()
    assert "no build for macOS on Intel" in message and "server" in message and "Update it" not in message
    assert torch_requirement_problem("2.5.0") is None  # a self-built new PyTorch is fine


def test_elsewhere_no_platform_is_said_to_lack_pytorch(monkeypatch):
    for system, machine in (("Darwin", "arm64"), ("Linux", "x86_64"), ("Windows", "AMD64")):
        monkeypatch.setattr(requirements.platform, "system", lambda: system)
        monkeypatch.setattr(requirements.platform, "machine", lambda: machine)
        assert requirements.no_torch_build_here() is None
