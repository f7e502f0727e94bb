"""Fast cached weights (safetensors round trip and invalidation), resolve_checkpoint, and the commands."""
import argparse
import io
import os
import re

import pytest
import torch

from FastSAM3DLib.errors import CheckpointError
from FastSAM3DLib.weights.cache import ModelFiles
from FastSAM3DLib.weights.commands import TextProgress, add_subcommands, import_weights, models_table
from FastSAM3DLib.weights.loading import load_state_dict
from FastSAM3DLib.weights.safetensors_cache import FORMAT_TAG, read_metadata, tensors_sha256, write_safetensors
from FastSAM3DLib.weights.store import resolve_checkpoint, weights_status
from FastSAM3DLib.weights.verify import read_record
from test_weights_support import (no_proxy_env, server, sha256, tiny_state_dict,  # noqa: F401 - fixtures
                                  training_checkpoint_bytes, write_manifest)


def setup(tmp_path, data, sha=None, architecture="fastsam3d"):
    """A manifest for one model whose file is ``data``; return (manifest, cache, file to import)."""
    manifest = write_manifest(tmp_path / "models.json", {
        "name": "tiny", "architecture": architecture, "filename": "tiny.pth", "size": len(data),
        "sha256": sha, "urls": ["https://weights.invalid/tiny.pth"]})
    source = tmp_path / "downloads" / "tiny.pth"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(data)
    return manifest, tmp_path / "cache", source


def same_weights(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_first_load_writes_weights_only_safetensors_tagged_with_the_source(tmp_path):
    weights = tiny_state_dict("fastsam3d", seed=1)
    data = training_checkpoint_bytes(weights)
    manifest, cache, source = setup(tmp_path, data)
    fast = import_weights("tiny", source, cache, manifest=manifest)
    assert fast == cache / "tiny.safetensors"
    assert read_metadata(fast) == {"format": FORMAT_TAG, "source_sha256": sha256(data), "model": "tiny",
                                   "source_file": "tiny.pth", "tensors_sha256": tensors_sha256(weights)}
    assert same_weights(load_state_dict(fast), weights)
    assert fast.stat().st_size < len(data) / 2  # no optimiser state
    assert resolve_checkpoint("tiny", cache, manifest=manifest) == fast
    mtime = fast.stat().st_mtime_ns
    assert resolve_checkpoint("tiny", cache, manifest=manifest) == fast and fast.stat().st_mtime_ns == mtime


def test_fast_copy_is_rebuilt_when_the_source_changes(tmp_path):
    old = training_checkpoint_bytes(tiny_state_dict("fastsam3d", seed=1))
    manifest, cache, source = setup(tmp_path, old)
    import_weights("tiny", source, cache, manifest=manifest)
    # The publisher replaces the file: the user accepts it by deleting the pin, then imports the new one.
    new_weights = tiny_state_dict("fastsam3d", seed=2)
    new = training_checkpoint_bytes(new_weights)
    assert len(new) == len(old)
    ModelFiles(cache, "tiny.pth").record.unlink()
    source.write_bytes(new)
    fast = import_weights("tiny", source, cache, manifest=manifest)
    assert read_metadata(fast)["source_sha256"] == sha256(new)
    assert same_weights(load_state_dict(fast), new_weights)


def test_fast_copy_from_another_source_is_never_used(tmp_path):
    weights = tiny_state_dict("fastsam3d", seed=1)
    data = training_checkpoint_bytes(weights)
    manifest, cache, source = setup(tmp_path, data)
    import_weights("tiny", source, cache, manifest=manifest)
    fast = cache / "tiny.safetensors"
    write_safetensors(tiny_state_dict("fastsam3d", seed=9), fast, "0" * 64, "tiny")
    assert resolve_checkpoint("tiny", cache, manifest=manifest) == fast
    assert read_metadata(fast)["source_sha256"] == sha256(data)
    assert same_weights(load_state_dict(fast), weights)


def test_without_conversion_the_verified_checkpoint_is_returned(tmp_path):
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    manifest, cache, source = setup(tmp_path, data, sha=sha256(data))
    assert resolve_checkpoint("tiny", cache, manifest=manifest) is None
    from FastSAM3DLib.weights.download import import_file

    import_file("tiny", source, cache, manifest=manifest)
    assert resolve_checkpoint("tiny", cache, manifest=manifest, convert=False) == cache / "tiny.pth"
    assert not (cache / "tiny.safetensors").exists()


def test_changed_cached_file_is_not_returned(tmp_path):
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    manifest, cache, source = setup(tmp_path, data, sha=sha256(data))
    import_weights("tiny", source, cache, manifest=manifest)
    (cache / "tiny.safetensors").unlink()
    (cache / "tiny.pth").write_bytes(data[::-1])
    assert resolve_checkpoint("tiny", cache, manifest=manifest) is None
    status = weights_status("tiny", cache, manifest=manifest)
    assert status.cached and not status.verified


def test_record_lost_but_file_intact_is_verified_again(tmp_path):
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    manifest, cache, source = setup(tmp_path, data, sha=sha256(data))
    import_weights("tiny", source, cache, manifest=manifest)
    (cache / "tiny.safetensors").unlink()
    os.utime(cache / "tiny.pth", ns=(1, 1))  # e.g. the cache folder was copied without timestamps
    assert resolve_checkpoint("tiny", cache, manifest=manifest) == cache / "tiny.safetensors"
    assert read_record(ModelFiles(cache, "tiny.pth")).mtime_ns == 1


def test_import_of_a_file_of_the_wrong_architecture_is_undone(tmp_path):
    data = training_checkpoint_bytes(tiny_state_dict("sam-med3d"))
    manifest, cache, source = setup(tmp_path, data)  # no published checksum: this import would pin it
    with pytest.raises(CheckpointError) as err:
        import_weights("tiny", source, cache, manifest=manifest)
    message = str(err.value)
    assert "The file for 'tiny' does not hold a complete FastSAM3D model." in message
    assert "a SAM-Med3D / SAM-Med3D-turbo checkpoint" in message and "removed from the cache" in message
    assert sorted(p.name for p in cache.iterdir()) == []


def test_models_table_shows_cache_state_files_and_pins(tmp_path):
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    manifest, cache, source = setup(tmp_path, data)
    before = models_table(cache, manifest=manifest).splitlines()
    assert before[0].split() == ["NAME", "READY", "WEIGHTS", "SIZE", "LICENCE"]
    assert before[1].split()[:6] == ["tiny", "no", "download,", "sha256", "not", "yet"]
    assert any(line.split()[:2] == ["tiny", "not"] and f"python -m FastSAM3DLib download tiny --cache-dir {cache}"
               in line for line in before)
    import_weights("tiny", source, cache, manifest=manifest)
    after = models_table(cache, manifest=manifest)
    row = after.splitlines()[1]
    assert row.split()[:5] == ["tiny", "yes", "download,", "sha256", "pinned"] and "Apache-2.0" in row
    assert re.search(rf"^  tiny +{re.escape(str(cache / 'tiny.safetensors'))} \(weights-only fast copy\)$", after, re.M)
    assert f"Cache folder: {cache}" in after and f"sha256 {sha256(data)}" in after and "report" in after


def test_shipped_manifest_table_lists_downloads_and_the_bundled_demo(tmp_path):
    from FastSAM3DLib.resources import resources_dir

    table = models_table(tmp_path / "empty-cache")
    rows = {line.split()[0]: line for line in table.splitlines()[1:4]}
    assert set(rows) == {"fastsam3d", "sam-med3d-turbo", "fastsam3d-demo"}
    assert rows["fastsam3d"].split()[1] == "no" and "published" in rows["sam-med3d-turbo"]
    assert rows["fastsam3d-demo"].split()[1:3] == ["yes", "bundled"] and "Apache-2.0" in rows["fastsam3d-demo"]
    demo_file = resources_dir() / "Models" / "fastsam3d-demo.pth"
    assert re.search(rf"^  fastsam3d-demo +{re.escape(str(demo_file))}$", table, re.M)
    assert not (tmp_path / "empty-cache").exists()


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="fastsam3d")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_import_and_models(tmp_path, capsys):
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    manifest, cache, source = setup(tmp_path, data)
    common = ["--cache-dir", str(cache), "--manifest", str(manifest)]
    assert run_cli(["import", "tiny", str(source), *common]) == 0
    out = capsys.readouterr()
    assert "tiny: imported and verified" in out.out and "Checking tiny.pth" in out.err
    assert run_cli(["models", *common]) == 0
    assert "pinned" in capsys.readouterr().out


def test_cli_download_shows_progress_and_errors_return_1(tmp_path, server, capsys):
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    url = server.serve("/tiny.pth", data)
    manifest = write_manifest(tmp_path / "m.json", {"name": "tiny", "filename": "tiny.pth", "size": len(data),
                                                    "sha256": sha256(data), "urls": [url]})
    common = ["--cache-dir", str(tmp_path / "cache"), "--manifest", str(manifest)]
    assert run_cli(["download", "tiny", *common]) == 0
    out = capsys.readouterr()
    assert "Downloading tiny" in out.err and "100%" in out.err and "tiny: verified, ready to use" in out.out
    with pytest.raises(CheckpointError, match="no published weights for a model called 'nonexistent'"):
        run_cli(["download", "nonexistent", *common])


def test_commands_are_wired_into_the_project_cli(tmp_path, capsys):
    cli = pytest.importorskip("FastSAM3DLib.cli")
    data = training_checkpoint_bytes(tiny_state_dict("fastsam3d"))
    manifest, cache, source = setup(tmp_path, data)
    common = ["--cache-dir", str(cache), "--manifest", str(manifest)]
    assert cli.main(["import", "tiny", str(source), "--quiet", *common]) == 0
    assert cli.main(["models", *common]) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli.main(["download", "nonexistent", *common]) != 0
    assert "error: There are no published weights for a model called 'nonexistent'" in capsys.readouterr().err


def test_text_progress_on_a_terminal_and_in_a_log():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = TextProgress("Downloading x", tty, width=10)
    bar(500_000, 1_000_000)
    bar(1_000_000, 1_000_000)
    bar.close()
    assert "\rDownloading x [#####.....]  50%" in tty.getvalue() and tty.getvalue().endswith("\n")
    log = io.StringIO()
    bar = TextProgress("x", log)
    for done in range(0, 1_000_001, 1000):
        bar(done, 1_000_000)
    assert len(log.getvalue().splitlines()) == 11
    unknown = io.StringIO()
    TextProgress("x", unknown)(2_000_000, None)
    assert "2.0 MB" in unknown.getvalue()
