"""Atomic writes (FastSAM3DLib.files): a reader sees the old file or the new one, never a partial one."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from FastSAM3DLib.errors import OutputFileError
from FastSAM3DLib.files import atomic_output
from windows_files import windows_sharing

REPO = Path(__file__).resolve().parents[1]


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


def test_atomic_output_never_sets_the_process_umask(tmp_path, monkeypatch):
    """The umask is process-wide: setting it (even only to read it) lets a file another thread creates meanwhile
    get other permissions. The usual permissions come from the system applying it at creation."""
    mask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *args: pytest.fail("atomic_output set the umask"))
        for name in ("a.txt", "b.nii.gz"):
            with atomic_output(tmp_path / name, suffix=".nii.gz" if name.endswith(".gz") else "") as tmp:
                tmp.write_bytes(b"x")
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o640
    finally:
        monkeypatch.undo()
        os.umask(mask)


def test_atomic_output_never_opens_an_existing_file_as_its_temporary(tmp_path, monkeypatch):
    """The temporary is created exclusively: a name that exists is never reused (here every random name is the
    same and taken, so after its attempts the write is refused and the taken file is untouched)."""
    import secrets

    from FastSAM3DLib.errors import OutputFileError
    from FastSAM3DLib.files.atomic import _temp_prefix

    monkeypatch.setattr(secrets, "choice", lambda characters: "a")
    taken = tmp_path / (_temp_prefix(tmp_path / "result.txt", ".tmp") + "aaaaaaaa.tmp")
    taken.write_text("someone else's")
    with pytest.raises(OutputFileError):
        with atomic_output(tmp_path / "result.txt") as tmp:
            tmp.write_text("new")
    assert taken.read_text() == "someone else's" and not (tmp_path / "result.txt").exists()


def test_atomic_output_keeps_the_suffix_writers_choose_the_format_by(tmp_path):
    with atomic_output(tmp_path / "label.nii.gz", suffix=".nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
    assert (tmp_path / "label.nii.gz").read_bytes() == b"x"


posix_only = pytest.mark.skipif(os.name == "nt" or os.environ.get("FASTSAM3D_EMULATE_WINDOWS") == "1",
                                reason="POSIX semantics (open files, file size limits)")


@posix_only
def test_a_reader_holding_the_old_file_keeps_reading_the_old_bytes(tmp_path):
    """The new file replaces the old one as a whole: a reader that opened the old one is not disturbed
    (issue 19, bug 5: writing in place would show it the new bytes)."""
    target = tmp_path / "result.bin"
    old, new = b"old " * 50_000, b"NEW!" * 60_000
    target.write_bytes(old)
    with open(target, "rb") as reader:
        with atomic_output(target) as tmp:
            tmp.write_bytes(new)
        assert target.read_bytes() == new
        assert reader.read() == old


def test_on_windows_a_file_another_program_has_open_is_kept_and_the_error_says_to_close_it(tmp_path,
                                                                                          monkeypatch):
    """Windows cannot replace a file that is open (emulated): the old file stays whole, no temporary is left,
    and the message names the cause instead of a missing permission."""
    refused = windows_sharing(monkeypatch)
    target = tmp_path / "result.bin"
    target.write_bytes(b"old")
    with open(target, "rb"):
        with pytest.raises(OutputFileError) as error:
            with atomic_output(target) as tmp:
                tmp.write_bytes(b"new")
    assert refused and refused[0][0] == "replace"
    assert "another program has the file open" in str(error.value) and "permission" not in str(error.value)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.bin"]


def test_on_windows_a_file_held_for_a_moment_is_replaced_once_it_is_let_go(tmp_path, monkeypatch):
    """A virus scanner or the search indexer opens a new file for a moment (emulated: a reader for 0.3 s): the
    replace is tried again and succeeds, instead of failing the write."""
    refused = windows_sharing(monkeypatch)
    target = tmp_path / "result.bin"
    target.write_bytes(b"old")
    reader = open(target, "rb")
    threading.Timer(0.3, reader.close).start()
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
    assert reader.closed and refused and target.read_bytes() == b"new"


def test_a_permission_error_that_is_not_a_file_in_use_is_not_tried_again(tmp_path, monkeypatch):
    calls = []

    def refuse(source, target):
        calls.append(target)
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputFileError, match="no permission"):
        with atomic_output(tmp_path / "result.bin") as tmp:
            tmp.write_bytes(b"new")
    assert len(calls) == 1


@posix_only
def test_a_failure_while_putting_the_new_file_in_place_leaves_the_old_one_whole(tmp_path):
    """When the disk refuses more bytes after the new file is written (a file size limit set in a child
    process), the target is the old file or the whole new one, never a mixture (issue 19, bug 5)."""
    target = tmp_path / "result.bin"
    old, new = b"o" * 200_000, b"n" * 200_000
    target.write_bytes(old)
    code = (
        "import resource, signal, sys\n"
        "from FastSAM3DLib.files import atomic_output\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "with atomic_output(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'n' * 200_000)\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (65_536, resource.RLIM_INFINITY))  # no file may grow further\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True, text=True,
                          timeout=60)
    content = target.read_bytes()
    assert content in (old, new), \
        f"the target holds {len(content)} bytes, a mixture (exit {done.returncode}: {done.stderr[-300:]})"
    assert content == new and done.returncode == 0, done.stderr  # renaming needs no new bytes: it succeeds


def test_missing_folders_are_created(tmp_path):
    target = tmp_path / "a" / "b" / "c" / "result.txt"
    with atomic_output(target) as tmp:
        tmp.write_text("x")
    assert target.read_text() == "x"


def test_a_failed_write_takes_back_the_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new" / "nested" / "result.txt"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("the writer failed")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]  # "Nothing was written": no folders either


@pytest.mark.skipif(sys.platform != "linux", reason="a file name of undecodable bytes needs a Linux file system")
def test_a_folder_name_that_is_not_utf8_is_refused_not_a_crash(tmp_path):
    """SimpleITK aborts the whole process (uncatchable C++ exception) on such a name; it must never get one."""
    import numpy as np

    from FastSAM3DLib.errors import InputImageError, OutputFileError
    from FastSAM3DLib.files import write_label_atomically
    from FastSAM3DLib.geometry import Volume

    folder = os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9")  # a Latin-1 name from an old disk
    os.mkdir(folder)
    output = Path(os.fsdecode(folder)) / "label.nii.gz"
    volume = Volume(np.zeros((4, 5, 6), np.int16), np.eye(4))
    with pytest.raises(OutputFileError, match="UTF-8"):
        write_label_atomically(volume, np.ones((4, 5, 6), bool), output)
    assert os.listdir(folder) == []
    with open(os.path.join(folder, b"image.nii.gz"), "wb") as stream:
        stream.write(b"not read")
    with pytest.raises(InputImageError, match="UTF-8"):
        Volume.from_file(Path(os.fsdecode(folder)) / "image.nii.gz")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to count open files")
def test_no_file_handle_is_left_open(tmp_path):
    """Many writes leave no open handle behind (an open handle would also block the rename on Windows)."""
    before = len(os.listdir("/proc/self/fd"))
    for n in range(50):
        with atomic_output(tmp_path / "result.txt") as tmp:
            tmp.write_text(str(n))
    assert len(os.listdir("/proc/self/fd")) < before + 10
    assert (tmp_path / "result.txt").read_text() == "49"


def test_the_library_replaces_files_only_through_replace_file():
    """Every write of a result, weights file, record or bank waits for Windows to let go (files.replace_file); only
    breaking a stale lock file renames directly."""
    offenders = []
    for source in sorted((REPO / "FastSAM3DLib").rglob("*.py")):
        atomic = source.relative_to(REPO).as_posix() == "FastSAM3DLib/files/atomic.py"
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            if "os.replace(" in line and not (atomic and line.strip() == "os.replace(source, target)") \
                    and not (source.name == "filelock.py" and "os.replace(self.path, moved)" in line):
                offenders.append(f"{source.relative_to(REPO)}:{number}")
    assert offenders == []


@pytest.mark.parametrize("platform, code, expected", [("linux", 28, "full"), ("win32", 112, "full"),
                                                      ("win32", 5, "ermission")])
def test_a_librarys_os_error_code_is_read_as_the_systems_own(tmp_path, monkeypatch, platform, code, expected):
    """safetensors (Rust) reports "os error N" with the system's own code: on Windows 112 is a full disk, which
    read as an errno was "Unknown error" with no advice."""
    from FastSAM3DLib.files import library_write_error

    monkeypatch.setattr(sys, "platform", platform)
    error = library_write_error(RuntimeError(f"Error while serializing: IoError(Os {{ code: {code} }}) (os error "
                                             f"{code})"), tmp_path / "bank.safetensors", tmp_path / ".tmp", 1000)
    assert expected in str(error) and "Unknown error" not in str(error), str(error)


def test_json_nested_too_deeply_is_malformed_json_not_a_recursion_error(tmp_path):
    """Every reader of a JSON file catches ValueError; Python's parser raises RecursionError past ~1,000 levels,
    which escaped as a traceback (a dataset's cases.json, a bank's header, a cache record)."""
    from FastSAM3DLib.evaluation.dataset import manifest_entries
    from FastSAM3DLib.errors import DataSourceError
    from FastSAM3DLib.files import parse_json

    assert parse_json('{"a": [1, 2]}') == {"a": [1, 2]} and parse_json(b"[[1]]") == [[1]]
    with pytest.raises(ValueError, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000)
    cases = tmp_path / "cases.json"
    cases.write_text("[" * 100_000)
    with pytest.raises(DataSourceError, match="nested too deeply"):
        manifest_entries(cases)
