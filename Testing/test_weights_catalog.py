"""Every selectable model (downloadable and bundled) and its weights: listed, found, explained, in any cache folder.

Slicer keeps the weights under its own cache folder, so every weights entry point takes ``cache_dir`` and never
falls back to the user cache folder when one is given.
"""
import inspect
import subprocess
import sys

import pytest

from FastSAM3DLib.errors import WeightsUnavailableError
from FastSAM3DLib.resources import resources_dir
from FastSAM3DLib.weights import catalog
from FastSAM3DLib.weights.catalog import (BUNDLED_MODELS, BundledModel, available_models, find_checkpoint,
                                          model_choice, preferred_model)
from FastSAM3DLib.weights.commands import import_weights
from test_weights_support import tiny_state_dict, training_checkpoint_bytes, write_manifest

DEMO_FILE = resources_dir() / "Models" / "fastsam3d-demo.pth"


@pytest.fixture()
def trap_home(tmp_path, monkeypatch):
    """HOME, XDG_CACHE_HOME and FASTSAM3D_CACHE point at one folder that nothing may create or write."""
    trap = tmp_path / "trap"
    monkeypatch.setenv("HOME", str(trap))
    monkeypatch.setenv("XDG_CACHE_HOME", str(trap / "xdg"))
    monkeypatch.setenv("FASTSAM3D_CACHE", str(trap / "env-cache"))
    yield trap
    assert not trap.exists(), "something used the default cache although cache_dir was given"


def tiny_manifest(tmp_path):
    """A manifest with one downloadable model 'tiny' (no published checksum) and the file to import."""
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    manifest = write_manifest(tmp_path / "models.json", {
        "name": "tiny", "architecture": "fastsam3d", "filename": "tiny.pth", "size": len(data), "sha256": None,
        "urls": ["https://weights.invalid/tiny.pth"]})
    source = tmp_path / "downloads" / "tiny.pth"
    source.parent.mkdir()
    source.write_bytes(data)
    return manifest, source


def test_every_selectable_model_is_listed_with_its_state(tmp_path, trap_home):
    choices = {c.name: c for c in available_models(tmp_path / "cache")}
    assert list(choices) == ["fastsam3d", "sam-med3d-turbo", "fastsam3d-demo"]
    demo = choices["fastsam3d-demo"]
    assert (demo.source, demo.ready, demo.state, demo.path, demo.licence) == \
        ("bundled", True, "bundled", DEMO_FILE, "Apache-2.0")
    assert demo.size == DEMO_FILE.stat().st_size
    for name in ("fastsam3d", "sam-med3d-turbo"):
        assert (choices[name].source, choices[name].ready, choices[name].state) == \
            ("download", False, "not downloaded")
        assert choices[name].path.parent == tmp_path / "cache" and choices[name].licence == "Apache-2.0"
    assert choices["sam-med3d-turbo"].checksum == "published"
    assert preferred_model(tmp_path / "cache") == "fastsam3d-demo"
    assert not (tmp_path / "cache").exists()  # listing creates nothing


def test_bundled_models_are_registered_and_shipped():
    from FastSAM3DLib.registry import get_model_config

    for bundled in BUNDLED_MODELS:
        assert get_model_config(bundled.name).weights is None  # nothing to download for it
        assert (resources_dir() / bundled.path).is_file()
        assert bundled.path in (resources_dir() / "CMakeLists.txt").read_text()


def test_download_becomes_ready_in_the_given_cache_only(tmp_path, trap_home):
    manifest, source = tiny_manifest(tmp_path)
    cache = tmp_path / "slicer-cache" / "FastSAM3D"
    assert model_choice("tiny", cache, manifest=manifest).ready is False
    import_weights("tiny", source, cache, manifest=manifest)
    choice = model_choice("tiny", cache, manifest=manifest)
    assert (choice.ready, choice.state, choice.path, choice.checksum) == \
        (True, "verified, fast copy", cache / "tiny.safetensors", "pinned")
    assert find_checkpoint("tiny", cache, manifest=manifest) == cache / "tiny.safetensors"
    assert preferred_model(cache, manifest=manifest) == "tiny"
    with pytest.raises(WeightsUnavailableError):  # another folder knows nothing of it
        find_checkpoint("tiny", tmp_path / "other", manifest=manifest)


def test_bundled_weights_need_no_cache(tmp_path, trap_home):
    assert find_checkpoint("fastsam3d-demo", tmp_path / "never-created") == DEMO_FILE
    assert not (tmp_path / "never-created").exists()


def test_missing_download_says_what_to_run_in_shell_syntax(tmp_path, trap_home):
    cache = tmp_path / "my cache"
    with pytest.raises(WeightsUnavailableError) as err:
        find_checkpoint("fastsam3d", cache)
    message = str(err.value)
    assert "\n" not in message and "No weights for model 'fastsam3d' on this machine" in message
    assert f"python -m FastSAM3DLib download fastsam3d --cache-dir '{cache}'" in message
    assert f"python -m FastSAM3DLib import fastsam3d FILE --cache-dir '{cache}'" in message
    assert "checkpoint=" not in message and "download_weights(" not in message


def test_model_without_published_weights_asks_for_a_checkpoint_file(tmp_path, trap_home):
    with pytest.raises(WeightsUnavailableError) as err:
        find_checkpoint("sam-med3d", tmp_path / "cache")
    message = str(err.value)
    assert "--checkpoint FILE" in message and "checkpoint=" not in message and "fastsam3d-demo" in message


def test_missing_bundled_file_says_reinstall(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "BUNDLED_MODELS",
                        (BundledModel("fastsam3d-demo", "Models/absent.pth", "demo", "Apache-2.0"),))
    choice = model_choice("fastsam3d-demo", tmp_path)
    assert (choice.ready, choice.state) == (False, "missing from this installation")
    with pytest.raises(WeightsUnavailableError, match="reinstall the FastSAM3D extension"):
        find_checkpoint("fastsam3d-demo", tmp_path)
    assert preferred_model(tmp_path) == "fastsam3d"


def test_registry_cached_weights_use_the_same_lookup(tmp_path, trap_home):
    from FastSAM3DLib.registry import build_model, cached_checkpoint, get_model_config

    assert cached_checkpoint(get_model_config("fastsam3d-demo"), tmp_path / "cache") == DEMO_FILE
    model = build_model("fastsam3d-demo", checkpoint="cached", cache_dir=tmp_path / "cache")
    assert model.config.name == "fastsam3d-demo" and not model.training
    with pytest.raises(WeightsUnavailableError, match="--cache-dir"):
        build_model("fastsam3d", checkpoint="cached", cache_dir=tmp_path / "cache")


def test_every_weights_entry_point_takes_cache_dir():
    from FastSAM3DLib import cli, demo, registry, weights

    functions = [weights.weights_status, weights.resolve_checkpoint, weights.download_weights,
                 weights.import_weights, weights.download_model, weights.import_file, weights.available_models,
                 weights.model_choice, weights.preferred_model, weights.find_checkpoint, weights.models_table,
                 registry.build_model, registry.cached_checkpoint, cli.segment, cli.model_weights,
                 demo.choose_weights, demo.run_demo]
    for function in functions:
        assert "cache_dir" in inspect.signature(function).parameters, function.__qualname__


def test_listing_models_imports_no_torch():
    code = ("import sys; from FastSAM3DLib.weights import available_models, find_checkpoint, weights_sha256; "
            "available_models(); find_checkpoint('fastsam3d-demo'); weights_sha256('fastsam3d-demo'); "
            "weights_sha256('fastsam3d'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
