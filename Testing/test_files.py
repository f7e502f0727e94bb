"""Atomic writes (FastSAM3DLib.files): a reader sees the old file or the new one, never a partial one."""
import os

import pytest

from FastSAM3DLib.files import atomic_output


def test_atomic_output_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "sub" / "result.txt"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("first")
    assert target.read_text() == "first"
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("interrupted")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.txt"]  # no temporary file left


def test_atomic_output_keeps_the_suffix_writers_choose_the_format_by(tmp_path):
    with atomic_output(tmp_path / "label.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "label.nii.gz").read_bytes() == b"x"
