"""The shipped manifest, manifest validation, and where the cache folder is."""
import json
import sys
from pathlib import Path

import pytest

from FastSAM3DLib.errors import CheckpointError
from FastSAM3DLib.weights.cache import default_cache_dir, model_files, resolve_cache_dir
from FastSAM3DLib.weights.manifest import default_manifest_path, load_manifest, parse_manifest

REPO = Path(__file__).resolve().parents[1]


def test_shipped_manifest_is_found_beside_the_package_and_valid(monkeypatch):
    monkeypatch.delenv("FASTSAM3D_RESOURCES", raising=False)
    assert default_manifest_path() == REPO / "Resources" / "models.json"
    manifest = load_manifest()
    assert manifest.names() == ["fastsam3d", "sam-med3d-turbo"]
    fast, turbo = manifest.get("fastsam3d"), manifest.get("sam-med3d-turbo")
    assert fast.urls[0] == "https://huggingface.co/techlove/FastSAM3D/resolve/main/FastSAM3D.pth"
    assert turbo.urls[0] == "https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth"
    assert fast.sha256 is None
    assert turbo.sha256 == "899a46d04d3b70f723282ceb489149373558bf0aaba389a346f5ab57da5cdd3c"
    assert (fast.architecture, turbo.architecture) == ("fastsam3d", "sam-med3d")
    assert fast.size_matches(638_000_000) and turbo.size_matches(402_040_000) and not fast.size_matches(402_000_000)
    for entry in (fast, turbo):
        assert entry.licence == "Apache-2.0" and "arXiv" in entry.citation and entry.weights_key == "model_state_dict"


def test_manifest_override_by_argument(tmp_path):
    path = tmp_path / "m.json"
    data = json.loads((REPO / "Resources" / "models.json").read_text())
    data["models"] = data["models"][:1]
    path.write_text(json.dumps(data))
    assert load_manifest(path).names() == ["fastsam3d"]


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(CheckpointError, match="no published weights for a model called 'sam2'. Known models: "
                                              "fastsam3d, sam-med3d-turbo"):
        load_manifest().get("sam2")


def good_entry(**changes):
    entry = {"name": "m", "architecture": "fastsam3d", "title": "M", "filename": "m.pth",
             "urls": ["https://example.org/m.pth"], "size": 10, "size_exact": True, "sha256": None,
             "weights_key": None, "licence": "MIT", "citation": "x"}
    entry.update(changes)
    return entry


@pytest.mark.parametrize("models, fault", [
    ([{k: v for k, v in good_entry().items() if k != "licence"}], "lacks the field 'licence'"),
    ([good_entry(sha256="ABC")], "sha256 must be 64 lower-case hex digits"),
    ([good_entry(), good_entry()], "the name 'm' appears twice"),
    ([good_entry(urls=["http://example.org/m.pth"])], "is not an https URL"),
    ([good_entry(urls=[])], "urls is empty"),
    ([good_entry(license="MIT")], "unknown field(s) license"),
    ([good_entry(size="10")], "field 'size' has the wrong type"),
    ([good_entry(size=True)], "field 'size' has the wrong type"),
    ([good_entry(filename="../m.pth")], "filename must be a plain file name"),
    ([good_entry(name="Big Model")], "name must be lower-case"),
])
def test_invalid_manifests_are_refused_with_the_reason(models, fault):
    with pytest.raises(CheckpointError) as err:
        parse_manifest({"format_version": 1, "models": models}, "test.json")
    assert fault in str(err.value) and "is invalid" in str(err.value)


def test_wrong_format_version_and_missing_or_broken_files(tmp_path):
    with pytest.raises(CheckpointError, match="format_version"):
        parse_manifest({"format_version": 2, "models": []})
    with pytest.raises(CheckpointError, match="is missing. Reinstall"):
        load_manifest(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_manifest(tmp_path / "bad.json")


def test_local_http_urls_are_allowed_for_test_servers():
    assert parse_manifest({"format_version": 1, "models": [good_entry(urls=["http://127.0.0.1:8000/m.pth"])]})


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAM3D_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "slicer") == tmp_path / "slicer"
    assert resolve_cache_dir() == tmp_path / "env"
    entry = load_manifest().get("fastsam3d")
    files = model_files(entry, tmp_path / "slicer")
    assert files.path == tmp_path / "slicer" / "FastSAM3D.pth"
    assert files.safetensors == tmp_path / "slicer" / "FastSAM3D.safetensors"
    assert not (tmp_path / "slicer").exists()  # nothing is created until something is written


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="Linux cache locations")
def test_platform_cache_dir_on_linux(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTSAM3D_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / ".cache" / "fastsam3d"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fastsam3d"


def test_importing_the_weights_package_has_no_side_effects(tmp_path):
    import subprocess

    code = ("import sys, FastSAM3DLib.weights as w, FastSAM3DLib.weights.commands, "
            "FastSAM3DLib.weights.download; assert 'torch' not in sys.modules, 'torch imported'")
    env = {"PYTHONPATH": str(REPO), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert list(tmp_path.iterdir()) == []
