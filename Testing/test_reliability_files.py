"""Reliability of file output and input (issue 15): every failure is one `error:` line, exit 2, no file, no temporary.

The failures are real: a full tmpfs or a file size limit (``ulimit -f``), a read-only tmpfs, device nodes and
pipes, links to the input, truncated and sheared files, processes killed with SIGINT, SIGTERM and SIGKILL.
Mounting needs root; those tests skip with the reason elsewhere and the file size limit covers the full disk.
"""
import contextlib
import gzip
import hashlib
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib import build_model
from FastSAM3DLib.cli import main, parse_point
from FastSAM3DLib.errors import InputImageError, OutputFileError, PromptError
from FastSAM3DLib.files import (LABEL_EXTENSIONS, STALE_TEMP_SECONDS, check_output_path, is_our_temporary,
                                remove_stale_temporaries, write_label_atomically)
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib.resources import sample_path

try:
    import resource
except ImportError:  # Windows: no file size limits
    resource = None

REPO = Path(__file__).resolve().parents[1]
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file systems, signals and resource limits")


# ------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """tiny-test weights in the official training format."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model_state_dict": build_model("tiny-test", seed=0).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def sample():
    return sample_path("totalseg_example_ct_sm.nii.gz")


def centre_point(image) -> str:
    """``--point=R,A,S`` at the centre voxel of ``image``."""
    volume = Volume.from_file(image)
    ras = (volume.ijk_to_ras @ np.array([*((np.array(volume.shape[::-1]) - 1) / 2), 1.0]))[:3]
    return "--point=" + ",".join(f"{v:.3f}" for v in ras)


def segment_args(image, output, checkpoint, *extra):
    return ["segment", str(image), centre_point(image), "--model", "tiny-test", "--checkpoint", str(checkpoint),
            "-o", str(output), *map(str, extra)]


def run_main(capfd, args):
    """Run the CLI in this process; returns (exit status, stdout, stderr) as file descriptors 1 and 2 saw them."""
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def one_line_error(code, err) -> str:
    """The single ``error:`` line of a failed command (exit 2, nothing else on stderr, no traceback)."""
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


def leftovers(folder) -> list:
    """Names in ``folder`` that are our temporary files."""
    return sorted(n for n in os.listdir(folder) if is_our_temporary(n))


def cli_env():
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A real tmpfs mounted at ``folder`` with ``options`` (``size=8k``, ``ro``); skips where mounting is impossible."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a real small or read-only disk) needs root")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def write_nifti_claiming(path: Path, dims) -> None:
    """An uncompressed NIfTI whose header promises ``dims`` int16 voxels while holding only 8 of them."""
    sitk.WriteImage(sitk.Image(2, 2, 2, sitk.sitkInt16), str(path))
    data = bytearray(path.read_bytes())
    data[40:56] = struct.pack("<8h", 3, *dims, 1, 1, 1, 1)
    path.write_bytes(bytes(data))


def sphere_image(size=40, spacing=(1.0, 1.0, 1.0), direction=None, pixel=sitk.sitkInt16) -> sitk.Image:
    """A bright ball in noise: an image the models can normalise and segment."""
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[:size, :size, :size]
    ball = (i - size / 2) ** 2 + (j - size / 2) ** 2 + (k - size / 2) ** 2 < (size / 4) ** 2
    array = (rng.integers(1, 100, (size,) * 3) + 500 * ball).astype(np.int16)
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    return image


# ------------------------------------------------------------------------------------------------------
# item 1: the writer lives in the files package


def test_files_imports_neither_the_cli_nor_simpleitk():
    """``write_label_atomically`` moved to the files package: importing it pulls in no CLI (the old import circle)."""
    code = ("import sys; from FastSAM3DLib.files import write_label_atomically\n"
            "import FastSAM3DLib.demo, FastSAM3DLib.evaluation.evaluate\n"
            "bad = [m for m in ('FastSAM3DLib.cli', 'SimpleITK') if m in sys.modules]\n"
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert write_label_atomically.__module__ == "FastSAM3DLib.files.label_writing"


# ------------------------------------------------------------------------------------------------------
# full disk


@posix_only
@pytest.mark.parametrize("extension", LABEL_EXTENSIONS)
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, sample, tiny_checkpoint, capfd, extension):
    """An 8 KiB tmpfs: the label does not fit. NIfTI's writer reports nothing; the read-back notices."""
    with tmpfs(tmp_path / "disk", "size=8k") as disk:
        out = disk / f"label{extension}"
        code, out_text, err = run_main(capfd, segment_args(sample, out, tiny_checkpoint))
        message = one_line_error(code, err)
        assert "full" in message and str(out) in message, message
        assert os.listdir(disk) == [] and "wrote" not in out_text  # no file, no temporary


@posix_only
@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".mha"])
def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, sample, tiny_checkpoint, extension):
    """``ulimit -f`` (RLIMIT_FSIZE, SIGXFSZ ignored) in a real process: the disk "fills" after 8 KiB."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    out = tmp_path / "out" / f"label{extension}"
    out.parent.mkdir()
    done = subprocess.run([sys.executable, "-m", "FastSAM3DLib", *segment_args(sample, out, tiny_checkpoint)],
                          capture_output=True, text=True, env=cli_env(), preexec_fn=limit, timeout=300)
    message = one_line_error(done.returncode, done.stderr)
    assert "ulimit -f" in message, message
    assert os.listdir(out.parent) == []


@pytest.mark.parametrize("extension", LABEL_EXTENSIONS)
def test_a_writer_that_fails_silently_is_caught_by_the_read_back(tmp_path, monkeypatch, extension):
    """A writer that returns normally but leaves half a file (what NIfTI does on a full disk) is refused."""
    real_write = sitk.WriteImage

    def half_write(image, name, *args):
        real_write(image, name, *args)
        data = Path(name).read_bytes()
        Path(name).write_bytes(data[:len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    volume = Volume.from_sitk(sphere_image(size=24))
    mask = np.random.default_rng(1).random(volume.shape) > 0.5
    with pytest.raises(OutputFileError, match="cannot write"):
        write_label_atomically(volume, mask, tmp_path / f"label{extension}")
    assert os.listdir(tmp_path) == []


def _resized(image):
    return image[:, :, 1:]


def _moved(image):
    image.SetOrigin(tuple(o + 0.5 for o in image.GetOrigin()))  # half a millimetre off a CT-like origin
    return image


def _rescaled(image):
    image.SetSpacing(tuple(3.0 * s for s in image.GetSpacing()))
    return image


def _turned(image):
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("wrong, message", [(None, "the file is empty"), (_resized, "header says size"),
                                            (_moved, "another origin"), (_rescaled, "another spacing"),
                                            (_turned, "another direction")],
                         ids=["empty", "resized", "moved", "rescaled", "turned"])
def test_a_file_whose_header_differs_from_the_label_is_refused(tmp_path, monkeypatch, extension, wrong, message):
    """A writer that returns normally but leaves an empty file, or a complete one whose header does not describe
    the image (another size, origin, spacing or direction: the label would not overlay the image) is refused by
    the read-back, which says which, and no file is left."""
    real_write = sitk.WriteImage

    def wrong_write(image, name, *args):
        if wrong is None:
            Path(name).write_bytes(b"")
        else:
            real_write(wrong(sitk.Image(image)), name, *args)

    monkeypatch.setattr(sitk, "WriteImage", wrong_write)
    image = sphere_image(size=12)
    image.SetOrigin((-180.5, 96.25, -402.0))
    volume = Volume.from_sitk(image)
    mask = np.random.default_rng(5).random(volume.shape) > 0.5
    with pytest.raises(OutputFileError, match=message):
        write_label_atomically(volume, mask, tmp_path / f"label{extension}")
    assert os.listdir(tmp_path) == []


def test_a_written_label_is_the_mask_on_the_image_grid(tmp_path):
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    volume = Volume.from_sitk(sphere_image(size=20, spacing=(0.7, 0.8, 2.5), direction=direction))
    mask = np.random.default_rng(2).random(volume.shape) > 0.5
    for extension in LABEL_EXTENSIONS:
        path = write_label_atomically(volume, mask, tmp_path / f"label{extension}")
        back = Volume.from_file(path)
        np.testing.assert_array_equal(back.array, mask.astype(np.uint8))
        np.testing.assert_allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-5)
    assert leftovers(tmp_path) == []


def test_a_label_is_written_from_any_0_1_mask_layout(tmp_path):
    """A bool mask is written without a copy; a strided view of one, or 0/1 integers of any width, are converted
    (viewing an int32 array's bytes as a label would write four times the voxels, most of them zero)."""
    volume = Volume.from_sitk(sphere_image(size=12))
    mask = np.random.default_rng(3).random(volume.shape) > 0.5
    wide = np.random.default_rng(4).random((volume.shape[0], volume.shape[1], 2 * volume.shape[2])) > 0.5
    for given in (mask, mask.astype(np.int32), mask.astype(np.int64), np.asfortranarray(mask), wide[:, :, ::2]):
        path = write_label_atomically(volume, given, tmp_path / "label.nrrd")
        np.testing.assert_array_equal(Volume.from_file(path).array, np.asarray(given, np.uint8))
    assert os.listdir(tmp_path) == ["label.nrrd"]


# ------------------------------------------------------------------------------------------------------
# outputs refused before any work


@posix_only
def test_device_nodes_and_pipes_are_refused_and_left_alone(tmp_path, sample, tiny_checkpoint, capfd):
    """A character device (a copy of /dev/null's node, also reached through a link) and a pipe are refused and
    stay what they were. The real /dev/null is only given to the check: a regression must not replace it."""
    targets = []
    if os.geteuid() == 0:
        node = tmp_path / "null.nii.gz"
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        link = tmp_path / "null-link.nii.gz"
        link.symlink_to(node)
        targets += [node, link]
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    targets.append(fifo)
    for target in targets:
        code, _, err = run_main(capfd, segment_args(sample, target, tiny_checkpoint))
        assert "device or other special file" in one_line_error(code, err), target
    assert fifo.is_fifo() and all(t.is_char_device() for t in targets[:-1])
    with pytest.raises(OutputFileError, match="device or other special file"):
        check_output_path("/dev/null")
    assert Path("/dev/null").is_char_device()


@posix_only
def test_output_equal_to_the_input_is_refused(tmp_path, sample, tiny_checkpoint, capfd):
    """Same file by its own name, another spelling, a symbolic link, a hard link: the CT is never overwritten."""
    image = tmp_path / "ct.nii.gz"
    image.write_bytes(Path(sample).read_bytes())
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    (tmp_path / "sub").mkdir()
    symlink, hardlink = tmp_path / "link.nii.gz", tmp_path / "hard.nii.gz"
    symlink.symlink_to(image)
    os.link(image, hardlink)
    for target in (image, tmp_path / "sub" / ".." / "ct.nii.gz", symlink, hardlink):
        code, _, err = run_main(capfd, segment_args(image, target, tiny_checkpoint))
        assert "is the input image" in one_line_error(code, err), target  # the segment command names it
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest and symlink.is_symlink()


@pytest.mark.parametrize("name", ["out", "out.txt", "label.NII.GZ", "label.mhd", "label.gz"])
def test_unknown_extensions_are_refused_with_the_list(tmp_path, sample, tiny_checkpoint, capfd, name):
    code, _, err = run_main(capfd, segment_args(sample, tmp_path / name, tiny_checkpoint))
    message = one_line_error(code, err)
    assert all(ext in message for ext in LABEL_EXTENSIONS), message
    assert os.listdir(tmp_path) == []


def test_existing_folder_file_as_parent_and_trailing_slash(tmp_path, sample, tiny_checkpoint, capfd):
    folder = tmp_path / "result.nii.gz"
    folder.mkdir()
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    cases = {folder: "existing folder", afile / "label.nii.gz": "is a file, not a folder",
             afile / "deeper" / "label.nii.gz": "is a file, not a folder", f"{tmp_path}/new.nii.gz/": "not a file name"}
    for target, words in cases.items():
        code, _, err = run_main(capfd, segment_args(sample, target, tiny_checkpoint))
        assert words in one_line_error(code, err), target
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "result.nii.gz"] and os.listdir(folder) == []


@posix_only
def test_read_only_folder_is_refused_before_any_work(tmp_path, sample, tiny_checkpoint, capfd, monkeypatch):
    """A read-only tmpfs (root ignores chmod, a read-only disk stops even root); refused before reading the image."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as folder:
        runs = [segment_args(sample, target, tiny_checkpoint)
                for target in (folder / "label.nii.gz", folder / "new" / "label.nrrd")]
        monkeypatch.setattr("FastSAM3DLib.geometry.Volume.from_file",
                            lambda *a, **k: pytest.fail("the image was read before the output was checked"))
        for args in runs:
            code, _, err = run_main(capfd, args)
            assert "read-only" in one_line_error(code, err), args


@posix_only
def test_folder_without_write_permission_is_refused(tmp_path, sample, tiny_checkpoint, capfd):
    if os.geteuid() == 0:
        pytest.skip("root writes in any folder whatever its permissions (the read-only disk test covers root)")
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, _, err = run_main(capfd, segment_args(sample, folder / "label.nii.gz", tiny_checkpoint))
        assert "permission" in one_line_error(code, err)
    finally:
        folder.chmod(0o755)


@posix_only
def test_long_names_work_up_to_the_limit_and_are_refused_beyond(tmp_path, sample, tiny_checkpoint, capfd):
    """A legal 247-byte name is written (the temporary's name is shortened to fit); 300 bytes is one line."""
    legal = tmp_path / ("b" * 240 + ".nii.gz")
    code, out, err = run_main(capfd, segment_args(sample, legal, tiny_checkpoint))
    assert code == 0 and err == "" and legal.is_file(), err
    code, _, err = run_main(capfd, segment_args(sample, tmp_path / ("c" * 300 + ".nii.gz"), tiny_checkpoint))
    assert "too long" in one_line_error(code, err)
    assert os.listdir(tmp_path) == [legal.name]


# ------------------------------------------------------------------------------------------------------
# inputs that cannot be trusted


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "raw"])
@pytest.mark.parametrize("extension", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_truncated_inputs_are_refused_in_one_line(tmp_path, tiny_checkpoint, capfd, extension, compressed):
    """ITK reads a truncated NIfTI as if the rest were zeros; we compare the header's size with the data. A raw
    NRRD or MetaImage cut short fails in ITK: the message says the file is truncated, not to convert it."""
    full = tmp_path / f"full{extension}"
    sitk.WriteImage(sphere_image(), str(full), compressed)
    data = full.read_bytes()
    image = tmp_path / f"cut{extension}"
    image.write_bytes(data[:len(data) * 2 // 3])
    args = ["segment", str(image), "--point=0,0,0", "--model", "tiny-test", "--checkpoint", str(tiny_checkpoint),
            "-o", str(tmp_path / "label.nii.gz")]
    code, _, err = run_main(capfd, args)
    message = one_line_error(code, err)
    assert "truncated or damaged" in message and "convert" not in message, message
    assert not (tmp_path / "label.nii.gz").exists()
    with pytest.raises(InputImageError):
        Volume.from_file(image)


@pytest.mark.parametrize("header", [".nhdr", ".mhd"])
def test_a_detached_header_whose_raw_data_file_is_cut_short_names_that_file(tmp_path, header):
    """Copying the header again would not help: the message names the data file that is short."""
    image = tmp_path / f"ct{header}"
    sitk.WriteImage(sphere_image(), str(image), False)
    data = next(p for p in tmp_path.iterdir() if p != image)
    data.write_bytes(data.read_bytes()[:data.stat().st_size * 2 // 3])
    with pytest.raises(InputImageError, match="truncated or damaged") as caught:
        Volume.from_file(image)
    assert str(caught.value).startswith(f"{data} (the data file of {image})"), caught.value


def zero_middle(path: Path, count: int = 200) -> None:
    """Zero ``count`` bytes in the middle of ``path``: a disk or transfer error that keeps the file's length."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(count)
    path.write_bytes(bytes(data))


# (name written, file whose compressed data get damaged): attached data, and data in a named file beside the header
COMPRESSED_FORMATS = [("ct.nii.gz", "ct.nii.gz"), ("ct.nrrd", "ct.nrrd"), ("ct.mha", "ct.mha"),
                      ("ct.nhdr", "ct.raw.gz"), ("ct.mhd", "ct.zraw"), ("ct.hdr.gz", "ct.img.gz")]


@pytest.mark.parametrize("name, data_file", COMPRESSED_FORMATS)
def test_damaged_compressed_inputs_are_refused_and_sound_ones_read(tmp_path, tiny_checkpoint, capfd, name,
                                                                    data_file):
    """Zeroing 200 bytes in the middle of a .nii.gz, a gzip NRRD or a zlib MHA was segmented with exit 0: ITK
    read half the voxels as garbage. The length in the gzip trailer was trusted and NRRD/MHA were not checked;
    now every compressed stream's own checksum (CRC-32, Adler-32) is verified before ITK reads it. (64 voxels a
    side: in a smaller .nii.gz the damage lies within what ITK decompresses for the header, and ITK fails itself.)"""
    image = sphere_image(size=64)
    path = tmp_path / name
    sitk.WriteImage(image, str(path), True)
    np.testing.assert_array_equal(Volume.from_file(path).array, sitk.GetArrayFromImage(image))
    zero_middle(tmp_path / data_file)
    with pytest.raises(InputImageError, match=f"^{tmp_path / data_file} is truncated or damaged: its compressed "
                                              r"data are corrupt \(.*copy it again"):
        Volume.from_file(path)
    code, _, err = run_main(capfd, segment_args_raw(path, tmp_path / "label.nii.gz", tiny_checkpoint))
    assert "compressed data are corrupt" in one_line_error(code, err)
    assert not (tmp_path / "label.nii.gz").exists()


def test_multi_member_gzip_nifti_reads_and_a_damaged_later_member_is_refused(tmp_path):
    """gzip files may hold several members (``cat a.gz b.gz``, pigz, bgzip) and trailing zeros: they read. Before,
    damage in a later member was counted as missing bytes ("the file holds ...") instead of named."""
    image = sphere_image()
    sitk.WriteImage(image, str(tmp_path / "one.nii"))
    raw = (tmp_path / "one.nii").read_bytes()
    members = [gzip.compress(raw[:1000]), gzip.compress(raw[1000:60000]), gzip.compress(raw[60000:])]
    sound = tmp_path / "members.nii.gz"
    sound.write_bytes(b"".join(members) + bytes(16))
    np.testing.assert_array_equal(Volume.from_file(sound).array, sitk.GetArrayFromImage(image))
    second = bytearray(members[1])
    second[len(second) // 2:len(second) // 2 + 200] = bytes(200)
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(members[0] + bytes(second) + members[2])
    with pytest.raises(InputImageError, match="truncated or damaged: its compressed data are corrupt"):
        Volume.from_file(damaged)


def write_analyze_big_endian(path: Path, array: np.ndarray) -> None:
    """A big-endian Analyze 7.5 pair (``path`` .hdr, int16 voxels in the .img beside it), as old SPM or
    Solaris wrote them: no NIfTI magic, so only the header size (348 when read big-endian) gives the byte order."""
    header = bytearray(348)
    struct.pack_into(">i", header, 0, 348)
    struct.pack_into(">ib", header, 32, 16384, ord("r"))
    struct.pack_into(">8h", header, 40, 3, *array.shape[::-1], 1, 1, 1, 1)
    struct.pack_into(">hh", header, 70, 4, 16)  # datatype DT_SIGNED_SHORT, bitpix
    struct.pack_into(">8f", header, 76, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    path.write_bytes(bytes(header))
    path.with_suffix(".img").write_bytes(array.astype(">i2").tobytes())


def write_pair(folder: Path, kind: str, image: sitk.Image) -> Tuple[Path, Path]:
    """A two-file image of ``kind``; returns (the name to read it by, the file holding its voxels)."""
    if kind == "analyze big-endian":
        write_analyze_big_endian(folder / "pair.hdr", sitk.GetArrayFromImage(image))
        return folder / "pair.hdr", folder / "pair.img"
    compressed = kind.endswith(".gz")
    header = folder / ("pair.hdr.gz" if compressed else "pair.hdr")
    sitk.WriteImage(image, str(header), compressed)
    if kind == "analyze":  # NIfTI-1 pair without its magic 'ni1': Analyze 7.5 as SPM99 and older tools wrote it
        data = bytearray(header.read_bytes())
        assert data[344:348] == b"ni1\0"
        data[344:348] = bytes(4)
        header.write_bytes(bytes(data))
    voxels = folder / ("pair.img.gz" if compressed else "pair.img")
    return (voxels if kind.startswith("given as .img") else header), voxels


@pytest.mark.parametrize("kind", ["nifti pair", "analyze", "analyze big-endian", "given as .img",
                                  "given as .img.gz", "compressed .hdr.gz"])
def test_truncated_two_file_images_are_refused_and_sound_ones_read(tmp_path, tiny_checkpoint, capfd, kind):
    """A .hdr + .img pair (NIfTI-1 or Analyze 7.5) whose .img lost its last 40 % was segmented with exit 0: ITK
    fills the missing voxels with zeros, and only names ending .nii/.nii.gz were compared with their header."""
    image = sphere_image()
    name, voxels = write_pair(tmp_path, kind, image)
    np.testing.assert_array_equal(Volume.from_file(name).array, sitk.GetArrayFromImage(image))
    data = voxels.read_bytes()
    voxels.write_bytes(data[:len(data) * 6 // 10])
    header = "pair.hdr.gz" if kind.endswith(".gz") else "pair.hdr"
    promise = (f"its compressed data end early, after \\d+ of the 128000 bytes its header {header} promises"
               if kind.endswith(".gz") else f"its header {header} promises 128000 bytes, the file holds 76800")
    with pytest.raises(InputImageError, match=f"^{voxels} is truncated or damaged: {promise}\\. .*copy it again"):
        Volume.from_file(name)
    code, _, err = run_main(capfd, segment_args_raw(name, tmp_path / "label.nii.gz", tiny_checkpoint))
    assert f"{voxels} is truncated or damaged" in one_line_error(code, err)
    assert not (tmp_path / "label.nii.gz").exists()


def test_sheared_grid_is_refused_for_nifti_and_kept_by_nrrd_and_mha(tmp_path, tiny_checkpoint, capfd, monkeypatch):
    """NIfTI would make the axes perpendicular (the label would not overlay the image); NRRD and MHA keep them."""
    axes = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    axes /= np.linalg.norm(axes, axis=0)
    image = tmp_path / "sheared.nrrd"
    sitk.WriteImage(sphere_image(direction=tuple(axes.ravel())), str(image), True)

    import FastSAM3DLib.registry as registry

    real_build = registry.build_model
    monkeypatch.setattr(registry, "build_model", lambda *a, **k: pytest.fail("the model ran before the refusal"))
    code, _, err = run_main(capfd, segment_args(image, tmp_path / "label.nii.gz", tiny_checkpoint))
    assert "not perpendicular" in one_line_error(code, err) and ".nrrd" in err
    monkeypatch.setattr(registry, "build_model", real_build)
    for extension in (".nrrd", ".mha"):
        out = tmp_path / f"label{extension}"
        code, _, err = run_main(capfd, segment_args(image, out, tiny_checkpoint))
        assert code == 0, err
        np.testing.assert_allclose(sitk.ReadImage(str(out)).GetDirection(), axes.ravel(), atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["label.mha", "label.nrrd", "sheared.nrrd"]


def test_images_over_the_memory_budget_are_refused_before_allocating(tmp_path, sample, tiny_checkpoint, capfd,
                                                                      monkeypatch):
    """A header promising 65 TB is refused from the header alone; ``--max-image-gb`` lowers the budget."""
    huge = tmp_path / "huge.nii"
    write_nifti_claiming(huge, (32000, 32000, 32000))
    monkeypatch.setattr(sitk.ImageFileReader, "Execute",
                        lambda self: pytest.fail("the voxels were read before the size was checked"))
    code, _, err = run_main(capfd, segment_args_raw(huge, tmp_path / "a.nii.gz", tiny_checkpoint))
    message = one_line_error(code, err)
    assert "65,536 GB" in message and "--max-image-gb" in message, message
    code, _, err = run_main(capfd, segment_args_raw(sample, tmp_path / "b.nii.gz", tiny_checkpoint,
                                                    "--max-image-gb", "0.0001"))
    assert "0.0001 GB allowed" in one_line_error(code, err)
    with pytest.raises(InputImageError, match="allowed for one image"):
        Volume.from_file(sample, max_bytes=1000)
    assert not list(tmp_path.glob("*.nii.gz"))


def segment_args_raw(image, output, checkpoint, *extra):
    """``segment`` arguments with a fixed point (for images that are never read)."""
    return ["segment", str(image), "--point=0,0,0", "--model", "tiny-test", "--checkpoint", str(checkpoint),
            "-o", str(output), *map(str, extra)]


def test_dicom_series_over_the_budget_is_refused(shared_data):
    folder = shared_data / "totalseg" / "example_ct_dicom"
    with pytest.raises(InputImageError, match="allowed for one image"):
        Volume.from_file(folder, max_bytes=1_000_000)


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz", ".mha"])
def test_real_multi_component_images_are_refused(tmp_path, tiny_checkpoint, capfd, extension):
    """Real vector images (3 components per voxel), refused from the header before any voxel is read."""
    vector = sitk.Compose([sitk.Cast(sphere_image(size=24), sitk.sitkFloat32)] * 3)
    assert vector.GetNumberOfComponentsPerPixel() == 3
    image = tmp_path / f"vector{extension}"
    sitk.WriteImage(vector, str(image))
    code, _, err = run_main(capfd, segment_args_raw(image, tmp_path / "label.nii.gz", tiny_checkpoint))
    assert "3 components per voxel" in one_line_error(code, err)
    assert not (tmp_path / "label.nii.gz").exists()


def test_the_shared_tensor_t1_is_a_valid_scalar_volume(shared_data):
    """The data notes were wrong: ``bad_inputs/tensor_t1.nii.gz`` is a plain 3D scalar volume, not a bad input."""
    volume = Volume.from_file(shared_data / "bad_inputs" / "tensor_t1.nii.gz")
    assert volume.array.ndim == 3 and volume.array.dtype == np.int16


# ------------------------------------------------------------------------------------------------------
# stderr, interrupts and killed processes


def test_warnings_are_shown_only_when_the_command_succeeds(tmp_path, sample, tiny_checkpoint, capfd, monkeypatch,
                                                           recwarn):
    """A warning met on the way is not printed above the one error line; after success it is shown
    (here to pytest's recorder, in a real process on stderr)."""
    import warnings

    import FastSAM3DLib.registry as registry

    real_check = registry.check_device

    def warning_check(device):
        warnings.warn("a warning met on the way", UserWarning)
        return real_check(device)

    monkeypatch.setattr(registry, "check_device", warning_check)
    code, _, err = run_main(capfd, segment_args_raw(tmp_path / "missing.nii.gz", tmp_path / "a.nii.gz",
                                                    tiny_checkpoint))
    assert "does not exist" in one_line_error(code, err)
    assert not [w for w in recwarn if "met on the way" in str(w.message)]
    code, _, err = run_main(capfd, segment_args(sample, tmp_path / "b.nii.gz", tiny_checkpoint))
    assert code == 0 and [w for w in recwarn if "met on the way" in str(w.message)]


@posix_only
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, sample, tiny_checkpoint):
    out = tmp_path / "label.nii.gz"
    args = segment_args(sample, out, tiny_checkpoint)
    args[2:3] = [args[2]] * 40  # forty clicks: plenty of time to interrupt
    # as from a terminal: a test run started in the background (CI, nohup) ignores SIGINT, and its children
    # would inherit that
    proc = subprocess.Popen([sys.executable, "-m", "FastSAM3DLib", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert line.startswith("loaded model"), (line, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.splitlines() == [err.strip()] and "interrupted" in err, err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def big_image(tmp_path_factory):
    """A 320 x 320 x 160 image, so that writing its 16 MB label takes long enough to catch the writer."""
    path = tmp_path_factory.mktemp("big") / "big.nii"
    rng = np.random.default_rng(3)
    array = rng.integers(1, 100, (160, 320, 320), dtype=np.int16)
    array[60:100, 140:180, 140:180] += 600
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def start_and_catch_the_writer(big_image, out, checkpoint):
    """Start ``segment`` writing a big uncompressed label; returns (process, its temporary) once the file exists."""
    proc = subprocess.Popen([sys.executable, "-m", "FastSAM3DLib", *segment_args(big_image, out, checkpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        names = leftovers(out.parent)
        if names:
            return proc, out.parent / names[0]
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before its temporary was seen: "
                        f"{proc.stderr.read()[-500:]}")
        time.sleep(0.0002)
    proc.kill()
    pytest.fail("the writer never started")


@posix_only
def test_sigterm_while_writing_leaves_no_temporary(tmp_path, big_image, tiny_checkpoint):
    out = tmp_path / "label.nii"
    proc, _ = start_and_catch_the_writer(big_image, out, tiny_checkpoint)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.splitlines() == [err.strip()] and "terminated" in err, err
    assert os.listdir(tmp_path) == []


@posix_only
def test_kill_9_leftovers_are_removed_by_the_next_run_when_stale(tmp_path, big_image, sample, tiny_checkpoint,
                                                                 capfd):
    """kill -9 cannot be caught: the temporary stays; the next write into the folder removes it once stale,
    and leaves young temporaries (a run in progress), links and other files alone."""
    out = tmp_path / "label.nii"
    proc, temporary = start_and_catch_the_writer(big_image, out, tiny_checkpoint)
    proc.kill()
    proc.communicate(timeout=60)
    assert temporary.exists() and not out.exists()
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(temporary, (old, old))
    young = tmp_path / ".other.nii.gz.fastsam3d-tmp-abcd1234.nii.gz"
    young.write_bytes(b"in progress")
    old_link = tmp_path / ".x.nii.fastsam3d-tmp-zzzz9999.nii"
    old_link.symlink_to(sample)
    os.utime(old_link, (old, old), follow_symlinks=False)
    unrelated = tmp_path / ".label.nii.backup"
    unrelated.write_bytes(b"mine")
    os.utime(unrelated, (old, old))
    code, _, err = run_main(capfd, segment_args(sample, tmp_path / "next.nii.gz", tiny_checkpoint))
    assert code == 0, err
    assert not temporary.exists()
    assert sorted(os.listdir(tmp_path)) == sorted([young.name, old_link.name, unrelated.name, "next.nii.gz"])
    assert remove_stale_temporaries(tmp_path, older_than=0) == [young]


# ------------------------------------------------------------------------------------------------------
# malformed points in the Python API


@pytest.mark.parametrize("bad", [None, 12, ["1", "2", "3"], "1,2,3,4", "1;2;3", "x,y,z-", "1,2,inf"])
def test_parse_point_raises_prompt_error(bad):
    with pytest.raises(PromptError):
        parse_point(bad)


@pytest.mark.parametrize("bad", [[1.0, 2.0], "abc", [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
def test_add_click_with_a_malformed_point_raises_prompt_error(bad):
    from FastSAM3DLib.session import InteractiveSession

    session = InteractiveSession(build_model("tiny-test", seed=0), Volume.from_sitk(sphere_image(size=24)))
    with pytest.raises(PromptError):
        session.add_click(bad)


@pytest.mark.parametrize("bad", ["abc", [[1.0, 2.0, 3.0], [1.0, 2.0]]])
def test_segment_volume_node_with_malformed_points_raises_prompt_error(bad):
    from FastSAM3DLib.scene import segment_volume_node

    with pytest.raises(PromptError):
        segment_volume_node(None, bad)  # refused before the node is used


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("header", ["NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n"
                                    "endian: little\ndata file: {}\n\n",
                                    "ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_SHORT\n"
                                    "ElementDataFile = {}\n"])
def test_a_detached_header_whose_data_file_is_a_pipe_is_refused_not_waited_on(tmp_path, header):
    """The input itself was checked to be a file, but not the data file its header names: ITK opened the pipe
    and ``segment`` waited for ever."""
    import threading

    os.mkfifo(tmp_path / "data.raw")
    path = tmp_path / ("ct.nhdr" if header.startswith("NRRD") else "ct.mhd")
    path.write_text(header.format("data.raw"))
    failure = []
    reader = threading.Thread(target=lambda: failure.append(pytest.raises(InputImageError, Volume.from_file, path)),
                              daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive(), "Volume.from_file waits on the pipe"
    assert "names the data file" in str(failure[0].value) and "not a regular file" in str(failure[0].value)


def test_a_small_damaged_nifti_that_itk_cannot_even_open_is_named_damaged(tmp_path):
    """In a small .nii.gz the damage lies within what ITK decompresses for the header: its own vague error
    ("Unable to determine ImageIO reader") was shown instead of the checksum's."""
    path = tmp_path / "small.nii.gz"
    sitk.WriteImage(sphere_image(size=24), str(path), True)
    zero_middle(path)
    with pytest.raises(InputImageError, match="small.nii.gz is truncated or damaged: its compressed data"):
        Volume.from_file(path)


def test_the_input_check_runs_beside_the_read_and_its_refusal_wins(tmp_path):
    """The checksum is verified in a thread while ITK reads the file (both decompress it: on several cores the
    check then costs little). A damaged file's refusal replaces the error the damage caused in the reader; a
    sound file lets the reader's own errors through, and Ctrl+C is not held up."""
    from FastSAM3DLib.files import checked_complete

    sound, damaged = tmp_path / "sound.nii.gz", tmp_path / "damaged.nii.gz"
    sitk.WriteImage(sphere_image(size=64), str(sound), True)
    sitk.WriteImage(sphere_image(size=64), str(damaged), True)
    zero_middle(damaged)
    with checked_complete(sound):
        image = sitk.ReadImage(str(sound))
    assert image.GetSize() == (64, 64, 64)
    with pytest.raises(InputImageError, match="damaged.nii.gz is truncated or damaged: its compressed data"):
        with checked_complete(damaged):
            raise RuntimeError("ITK's own error about the garbage it read")
    with pytest.raises(InputImageError, match="compressed data are corrupt"):
        with checked_complete(damaged):
            pass  # the reader read garbage without a word
    with pytest.raises(RuntimeError, match="ITK's own"):
        with checked_complete(sound):
            raise RuntimeError("ITK's own error")
    with pytest.raises(KeyboardInterrupt):
        with checked_complete(damaged):
            raise KeyboardInterrupt


def test_writing_a_label_makes_no_copy_of_the_volumes_size_in_numpy(tmp_path):
    """The bool mask was copied to uint8 and the read-back compared with a temporary bool array, two copies of
    the volume's size besides SimpleITK's own (a 1.7 GB label needed 3.4 GB more); a bool mask is now taken as
    uint8 as it is, and compared a slab at a time. (tracemalloc sees NumPy's buffers, not SimpleITK's.)"""
    import tracemalloc

    volume = Volume(np.zeros((300, 256, 256), np.int16), np.eye(4))
    mask = np.zeros(volume.shape, bool)
    mask[100:200, 50:150, 60:160] = True
    tracemalloc.start()
    try:
        write_label_atomically(volume, mask, tmp_path / "label.nii")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.9 * mask.nbytes, (peak, mask.nbytes)
    np.testing.assert_array_equal(Volume.from_file(tmp_path / "label.nii").array, mask)


def test_a_label_whose_last_voxel_was_written_wrong_is_refused(tmp_path, monkeypatch):
    """The read-back is compared a slab at a time: a difference in any slab counts, the last one too."""
    from FastSAM3DLib import files

    real_write = sitk.WriteImage

    def last_voxel_flipped(image, name, *args):
        array = sitk.GetArrayFromImage(image)
        array[-1, -1, -1] ^= 1
        wrong = sitk.GetImageFromArray(array)
        wrong.CopyInformation(image)
        real_write(wrong, name, *args)

    equal = files.label_writing._equal_in_slabs
    for voxels in (1, 7, 9, 10, 1 << 24):  # slabs of one slice (also for fewer voxels than a slice), 2, or all
        assert equal(np.zeros((9, 3, 3)), np.zeros((9, 3, 3)), voxels=voxels)
        for position in np.ndindex(9, 3, 3):  # a difference anywhere counts, in the first slab as in the last
            other = np.zeros((9, 3, 3))
            other[position] = 1
            assert not equal(np.zeros((9, 3, 3)), other, voxels=voxels), (voxels, position)
    monkeypatch.setattr(sitk, "WriteImage", last_voxel_flipped)
    volume = Volume.from_sitk(sphere_image(size=24))
    with pytest.raises(OutputFileError, match="voxels differ from the label"):
        write_label_atomically(volume, np.ones(volume.shape, bool), tmp_path / "label.nrrd")
    assert os.listdir(tmp_path) == []


def test_the_default_budget_counts_what_the_whole_run_needs_not_the_image_alone(tmp_path, monkeypatch):
    """The default refused images over a quarter of the memory by their voxels alone, while a run needs about
    1.5 times the image plus 2.5 bytes a voxel: an 8-bit image just under the limit needed more memory than the
    computer had (6x its size before the label's copies were cut, 4x now)."""
    from FastSAM3DLib import files

    monkeypatch.setattr(files.image_header, "memory_budget", lambda: 10 ** 9)
    huge = tmp_path / "huge.nii"
    write_nifti_claiming(huge, (1000, 1000, 120))  # 120 M int16 voxels: 0.24 GB, a run of about 0.66 GB
    header, _ = files.read_header(huge)
    assert files.run_bytes(header) == int(1.5 * 240e6 + 2.5 * 120e6)
    files.check_memory_budget(header, huge)
    write_nifti_claiming(huge, (1000, 1000, 200))  # 0.4 GB of voxels, well under the budget; a run of 1.1 GB
    header, _ = files.read_header(huge)
    with pytest.raises(InputImageError, match=r"\(0.4 GB in memory\); segmenting it needs about 1.1 GB, more "
                                              r"than the 1 GB a run may take .*--max-image-gb"):
        files.check_memory_budget(header, huge)
    files.check_memory_budget(header, huge, max_bytes=int(0.5e9))  # an explicit limit is on the voxels, as asked
