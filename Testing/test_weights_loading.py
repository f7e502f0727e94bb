"""Safe loading: official-format checkpoints load; code in a pickle never runs; damaged files say what to do."""
import builtins
import datetime
import pickle

import pytest
import torch

from FastSAM3DLib.errors import CheckpointError
from FastSAM3DLib.weights.loading import load_checkpoint, load_state_dict, safe_globals
from test_weights_support import tiny_state_dict, training_checkpoint_bytes


class CreatesFile:
    """Unpickling this calls open(marker, "w"): the file appears if the loader ran code from the pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class EvalsCode:
    """Unpickling this evaluates Python source that creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.eval, (f"__import__('pathlib').Path({self.marker!r}).touch()",))


@pytest.fixture
def weights():
    return tiny_state_dict("fastsam3d")


def save(obj, path, legacy=False):
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_official_training_checkpoint_gives_only_the_weights(tmp_path, weights, legacy):
    path = tmp_path / "FastSAM3D.pth"
    path.write_bytes(training_checkpoint_bytes(weights, legacy=legacy))
    loaded = load_state_dict(path)
    assert list(loaded) == list(weights)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    full = load_checkpoint(path)
    assert full["args"].model_type == "vit_b_ori" and full["used_datas"]["CT_liver"] == 3


def test_allow_list_is_exactly_the_three_harmless_classes():
    import argparse
    import collections

    assert safe_globals() == [argparse.Namespace, collections.Counter, torch.device]


def test_plain_and_wrapped_state_dicts(tmp_path, weights):
    assert load_state_dict(save(weights, tmp_path / "plain.pth")).keys() == weights.keys()
    assert load_state_dict(save({"model": weights}, tmp_path / "model.pth")).keys() == weights.keys()


@pytest.mark.parametrize("payload", [CreatesFile, EvalsCode], ids=["open", "eval"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_never_runs_and_is_refused(tmp_path, weights, payload, legacy):
    marker = tmp_path / "pwned"
    path = save({"model_state_dict": weights, "extra": payload(marker)}, tmp_path / "evil.pth", legacy)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(path)
    assert not marker.exists()
    message = str(err.value)
    assert message.startswith("Refused to load") and "could run code" in message and "Nothing from the file was " \
        "executed" in message
    assert ("open" if payload is CreatesFile else "eval") in message
    assert "weights_only=False" not in message


def test_bare_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(CreatesFile(marker), protocol=2))
    with pytest.raises(CheckpointError, match="Refused to load"):
        load_state_dict(path)
    assert not marker.exists()


def test_class_outside_the_allow_list_is_refused(tmp_path, weights):
    path = save({"model_state_dict": weights, "when": datetime.date(2024, 9, 7)}, tmp_path / "dated.pth")
    with pytest.raises(CheckpointError, match="refers to 'datetime.date'"):
        load_state_dict(path)


def test_truncated_file(tmp_path, weights):
    data = training_checkpoint_bytes(weights)
    path = tmp_path / "FastSAM3D.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"damaged or truncated .*download MODEL"):
        load_state_dict(path)


def test_truncated_legacy_file(tmp_path, weights):
    data = training_checkpoint_bytes(weights, legacy=True)
    path = tmp_path / "old.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"is truncated \(\d+ bytes\)"):
        load_state_dict(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\).*import MODEL FILE"):
        load_state_dict(path)


def test_web_page_saved_as_checkpoint(tmp_path):
    path = tmp_path / "FastSAM3D.pth"
    path.write_text("<!DOCTYPE html><html><title>Google Drive - Virus scan warning</title></html>")
    with pytest.raises(CheckpointError, match="is a web page, not a checkpoint"):
        load_state_dict(path)


@pytest.mark.parametrize("content", [b"hello, not a checkpoint", bytes(range(256)) * 4, b'{"a": 1}'],
                         ids=["text", "binary", "json"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_state_dict(path)


def test_checkpoint_without_weights(tmp_path):
    with pytest.raises(CheckpointError, match="contains a list, not model weights"):
        load_state_dict(save([1, 2, 3], tmp_path / "list.pth"))
    with pytest.raises(CheckpointError, match="no model weights .*'epoch'"):
        load_state_dict(save({"epoch": 3, "optimizer_state_dict": {}}, tmp_path / "opt.pth"))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nothing.pth")


def test_safetensors_file_loads_and_damage_is_reported(tmp_path, weights):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    loaded = load_state_dict(path)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="damaged"):
        load_state_dict(path)

