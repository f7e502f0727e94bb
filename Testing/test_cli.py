"""The command line: segment writes a label with the input's geometry; bad input gives a clear error and no file."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FastSAM3DLib import build_model
from FastSAM3DLib.cli import main, parse_point
from FastSAM3DLib.demo import run_demo
from FastSAM3DLib.errors import PromptError
from FastSAM3DLib.geometry import Volume
from FastSAM3DLib.resources import sample_path
from FastSAM3DLib.session import InteractiveSession


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """tiny-test weights saved in the official training format."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model_state_dict": build_model("tiny-test", seed=0).state_dict(), "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def sample():
    return sample_path("totalseg_example_ct_sm.nii.gz")


def kidney_point(sample):
    volume = Volume.from_file(sample)
    k, j, i = np.argwhere(Volume.from_file(sample_path("totalseg_example_ct_sm_seg.nii.gz")).array == 2).mean(0)
    return (volume.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "FastSAM3DLib", *map(str, args)], capture_output=True, text=True,
                          env=env)


def clean_home(tmp_path):
    """Environment of a fresh user account: empty HOME, no cache variables (returns (env, home))."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("FASTSAM3D_CACHE", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    return env, home


def one_line_error(proc):
    """The single ``error:`` line of a failed command (exit 2, no traceback, nothing else on stderr)."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_parse_point():
    xyz, include = parse_point("1.5,-2,3")
    assert include and xyz.tolist() == [1.5, -2.0, 3.0]
    xyz, include = parse_point("-1,2,-3-")
    assert not include and xyz.tolist() == [-1.0, 2.0, -3.0]
    for bad in ("1,2", "a,b,c", "1,2,nan", ""):
        with pytest.raises(PromptError):
            parse_point(bad)


def test_segment_writes_label_with_input_geometry(tmp_path, sample, tiny_checkpoint):
    point = kidney_point(sample)
    out = tmp_path / "label.nrrd"
    proc = run_cli("segment", sample, f"--point={point[0]},{point[1]},{point[2]}", "--model", "tiny-test",
                   "--checkpoint", tiny_checkpoint, "-o", out)
    assert proc.returncode == 0, proc.stderr
    written, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(sample))
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    # the same as the library's own session
    volume = Volume.from_file(sample)
    session = InteractiveSession(build_model("tiny-test", checkpoint=tiny_checkpoint), volume)
    expected = session.full_mask(session.add_click(point))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written) > 0, expected)
    assert "voxels" in proc.stdout and proc.stdout.splitlines()[-1] == f"wrote {out}"


def test_dicom_folder_input(tmp_path, shared_data, tiny_checkpoint):
    folder = shared_data / "totalseg" / "example_ct_dicom"
    volume = Volume.from_file(folder)
    centre = (volume.ijk_to_ras @ np.array([*(np.array(volume.shape[::-1]) / 2), 1.0]))[:3]
    out = tmp_path / "dicom_label.nii.gz"
    code = main(["segment", str(folder), f"--point={centre[0]},{centre[1]},{centre[2]}", "--model", "tiny-test",
                 "--checkpoint", str(tiny_checkpoint), "-o", str(out)])
    assert code == 0 and sitk.ReadImage(str(out)).GetSize() == (512, 512, 20)


def bad_images(tmp_path, shared_data):
    """(name, path) of images the CLI must refuse."""
    flat = tmp_path / "flat2d.nii.gz"
    sitk.WriteImage(sitk.Image(40, 40, sitk.sitkFloat32), str(flat))
    constant = tmp_path / "constant.nii.gz"
    sitk.WriteImage(sitk.Image(40, 40, 40, sitk.sitkFloat32) + 7.0, str(constant))
    bad = shared_data / "bad_inputs"
    # (tensor_t1.nii.gz is a valid scalar volume, not a multi-component one: test_reliability_files covers those)
    return [("2D", flat), ("constant", constant), ("4D", bad / "img4d_11f.nii.gz"), ("NaN", bad / "nan.mha")]


def test_bad_images_give_an_error_and_no_file(tmp_path, shared_data, tiny_checkpoint, capsys):
    for name, path in bad_images(tmp_path, shared_data):
        out = tmp_path / f"out_{name}.nii.gz"
        code = main(["segment", str(path), "--point=0,0,0", "--model", "tiny-test", "--checkpoint",
                     str(tiny_checkpoint), "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("error: ") and "Traceback" not in err, name
        assert not out.exists(), name
    assert not list(tmp_path.glob(".fastsam3d-*"))


def test_bad_points_and_checkpoints_give_an_error_and_no_file(tmp_path, sample, tiny_checkpoint):
    point = kidney_point(sample)
    good = f"--point={point[0]},{point[1]},{point[2]}"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    wrong = tmp_path / "sammed3d_like.pth"
    torch.save({"model_state_dict": build_model("fastsam3d").state_dict()}, wrong)
    cases = {
        "outside": ["--point=5000,0,0", "--checkpoint", tiny_checkpoint],
        "no point": ["--checkpoint", tiny_checkpoint],
        "truncated": [good, "--checkpoint", truncated],
        "wrong model": [good, "--checkpoint", wrong],
        "missing file": [good, "--checkpoint", tmp_path / "nope.pth"],
    }
    for name, extra in cases.items():
        out = tmp_path / f"{name}.nii.gz"
        proc = run_cli("segment", sample, "--model", "tiny-test", *extra, "-o", out)
        assert proc.returncode == 2, (name, proc.stderr)
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert not out.exists(), name
    assert "tiny-test" in run_cli("segment", sample, "--model", "tiny-test", good, "--checkpoint", wrong,
                                  "-o", tmp_path / "x.nii.gz").stderr
    no_output = run_cli("segment", sample, "--model", "tiny-test", good, "--checkpoint", tiny_checkpoint)
    assert no_output.returncode == 2 and "the following arguments are required: --output/-o" in no_output.stderr


@pytest.mark.parametrize("limit", ["0", "-1", "nan", "inf", "-inf", "lots"])
def test_a_memory_limit_that_is_not_a_positive_number_is_refused_by_the_parser(tmp_path, capsys, limit):
    with pytest.raises(SystemExit) as exited:
        main(["segment", str(tmp_path / "ct.nii.gz"), "--point=0,0,0", f"--max-image-gb={limit}",
              "-o", str(tmp_path / "out.nii.gz")])
    assert exited.value.code == 2
    assert f"argument --max-image-gb: expected a positive number, got '{limit}'" in capsys.readouterr().err


@pytest.mark.parametrize("failure, line", [
    (MemoryError(), "error: out of memory. Close other programs, use a smaller model, or run on a GPU "
                    "(--device cuda)."),
    (PermissionError(13, "Permission denied", "/data/ct.nii.gz"),
     "error: Permission denied: /data/ct.nii.gz. Check the path, free space and permissions."),
    (OSError(5, "Input/output\nerror"), "error: Input/output error. Check the path, free space and permissions.")])
def test_an_unforeseen_memory_or_file_system_failure_is_one_line_with_status_2(tmp_path, capsys, monkeypatch,
                                                                             failure, line):
    import FastSAM3DLib.cli as cli

    def fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(cli, "segment", fails)
    assert main(["segment", str(tmp_path / "ct.nii.gz"), "--point=0,0,0", "-o", str(tmp_path / "out.nii.gz")]) == 2
    assert capsys.readouterr().err == line + "\n"


def test_segment_finds_the_bundled_demo_weights_on_a_clean_account(tmp_path, sample):
    env, home = clean_home(tmp_path)
    point = kidney_point(sample)
    out = tmp_path / "kidney.nii.gz"
    proc = run_cli("segment", sample, f"--point={point[0]},{point[1]},{point[2]}", "--model", "fastsam3d-demo",
                   "-o", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "loaded model 'fastsam3d-demo'" in proc.stdout and out.is_file()
    assert not home.exists()  # no cache folder was needed or created


def test_missing_weights_give_one_line_in_shell_syntax(tmp_path, sample):
    env, home = clean_home(tmp_path)
    point = kidney_point(sample)
    good = f"--point={point[0]},{point[1]},{point[2]}"
    message = one_line_error(run_cli("segment", sample, good, "--model", "fastsam3d", "-o", tmp_path / "o.nii.gz",
                                     env=env))
    assert "python -m FastSAM3DLib download fastsam3d " in message
    assert "python -m FastSAM3DLib import fastsam3d FILE" in message and "--model fastsam3d-demo" in message
    cache = tmp_path / "slicer cache"
    message = one_line_error(run_cli("segment", sample, good, "--model", "sam-med3d-turbo", "--cache-dir", cache,
                                     "-o", tmp_path / "o.nii.gz", env=env))
    assert f"python -m FastSAM3DLib download sam-med3d-turbo --cache-dir '{cache}'" in message
    message = one_line_error(run_cli("segment", sample, good, "--model", "sam-med3d", "-o", tmp_path / "o.nii.gz",
                                     env=env))
    assert "--checkpoint FILE" in message
    assert not (tmp_path / "o.nii.gz").exists() and not home.exists() and not cache.exists()


def test_models_command_lists_every_model_with_readiness_file_and_licence(tmp_path):
    env, home = clean_home(tmp_path)
    proc = run_cli("models", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:4]}
    assert rows["fastsam3d-demo"][:3] == ["fastsam3d-demo", "yes", "bundled"] and "Apache-2.0" in rows["fastsam3d-demo"]
    assert rows["fastsam3d"][1] == rows["sam-med3d-turbo"][1] == "no"
    assert str(sample_path("x").parent.parent / "Models" / "fastsam3d-demo.pth") in proc.stdout
    assert "not downloaded: python -m FastSAM3DLib download fastsam3d" in proc.stdout
    assert not home.exists()


@pytest.mark.parametrize("args, advice", [
    (["--device", "cuda"], "--device cpu"),
    (["--device", "cuda:7"], "cpu"),
    (["--device", "gpu"], "choose cpu, cuda"),
    (["--attention", "bogus"], "choose auto, torch, triton or eager"),
])
def test_unusable_device_or_backend_is_one_line_before_any_work(tmp_path, sample, monkeypatch, capsys, args,
                                                                 advice):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    monkeypatch.setattr("FastSAM3DLib.geometry.Volume.from_file",
                        lambda *a: pytest.fail("the image was read before the options were checked"))
    out = tmp_path / "never.nii.gz"
    code = main(["segment", str(sample), "--point=0,0,0", "--model", "fastsam3d-demo", *args, "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and advice in err, err
    assert not out.exists()


def test_bad_attention_environment_variable_is_one_line(tmp_path, sample):
    env, _ = clean_home(tmp_path)
    env["FASTSAM3D_ATTENTION"] = "bogus"
    message = one_line_error(run_cli("segment", sample, "--point=0,0,0", "--model", "fastsam3d-demo",
                                     "-o", tmp_path / "o.nii.gz", env=env))
    assert "FASTSAM3D_ATTENTION" in message and "unset it" in message


def test_cuda_without_cuda_in_a_real_process(tmp_path, sample):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env, _ = clean_home(tmp_path)
    message = one_line_error(run_cli("segment", sample, "--point=0,0,0", "--model", "fastsam3d-demo",
                                     "--device", "cuda", "-o", tmp_path / "o.nii.gz", env=env))
    assert "no usable CUDA GPU" in message and "--device cpu" in message


def test_demo_and_segment_share_one_lookup(tmp_path):
    from FastSAM3DLib.demo import choose_weights
    from FastSAM3DLib.resources import resources_dir

    name, path, description = choose_weights(tmp_path / "empty-cache")
    assert (name, path) == ("fastsam3d-demo", resources_dir() / "Models" / "fastsam3d-demo.pth")
    assert "bundled" in description and not (tmp_path / "empty-cache").exists()


def test_demo_without_weights_says_so_and_writes_nothing(tmp_path, monkeypatch):
    from FastSAM3DLib.weights import catalog

    monkeypatch.setattr(catalog, "BUNDLED_MODELS",
                        (catalog.BundledModel("fastsam3d-demo", "Models/not-in-this-build.pth", "demo", "x"),))
    lines = []
    assert run_demo(tmp_path / "demo", log=lines.append, cache_dir=tmp_path / "empty-cache") == 0
    text = "\n".join(lines)
    assert "No model weights are available offline" in text and "not-in-this-build.pth" in text
    assert f"python -m FastSAM3DLib download fastsam3d --cache-dir {tmp_path / 'empty-cache'}" in text
    assert not (tmp_path / "demo").exists()


def test_demo_writes_label_and_preview(tmp_path, tiny_checkpoint):
    lines = []
    assert run_demo(tmp_path / "demo", log=lines.append, weights=("tiny-test", tiny_checkpoint, "test")) == 0
    label = sitk.ReadImage(str(tmp_path / "demo" / "demo_label.nii.gz"))
    assert label.GetSize() == (122, 101, 30)
    png = sitk.ReadImage(str(tmp_path / "demo" / "demo_preview.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize()[0] > 200
    text = "\n".join(lines)
    assert "Dice" in text and "preview:" in text


def test_demo_refuses_unusable_outputs_before_it_writes_anything(tmp_path, tiny_checkpoint):
    """A folder named like the preview left the label written and a traceback; a pipe named like it hung."""
    import os

    from FastSAM3DLib.errors import OutputFileError

    for name, make in (("folder", lambda p: p.mkdir()), ("pipe", os.mkfifo)):
        out = tmp_path / name
        out.mkdir()
        make(out / "demo_preview.png")
        with pytest.raises(OutputFileError, match="demo_preview.png"):  # the CLI's one line, exit 2
            run_demo(out, log=lambda text: None, weights=("tiny-test", tiny_checkpoint, "test"))
        assert sorted(p.name for p in out.iterdir()) == ["demo_preview.png"]


def test_fast_precision_segments_with_the_int8_encoder(tmp_path, sample, tiny_checkpoint, int8_kernel):
    point = kidney_point(sample)
    outs = {}
    for precision in ("exact", "fast"):
        outs[precision] = tmp_path / f"{precision}.nrrd"
        proc = run_cli("segment", sample, f"--point={point[0]},{point[1]},{point[2]}", "--model", "tiny-test",
                       "--checkpoint", tiny_checkpoint, "--precision", precision, "-o", outs[precision])
        assert proc.returncode == 0, proc.stderr
        assert f"({precision} precision)" in proc.stdout
    exact, fast = (sitk.GetArrayFromImage(sitk.ReadImage(str(outs[p]))) > 0 for p in ("exact", "fast"))
    assert exact.any() and (exact == fast).mean() > 0.99


def test_bad_precision_environment_variable_is_one_line_before_any_work(tmp_path, sample):
    env, _ = clean_home(tmp_path)
    env["FASTSAM3D_PRECISION"] = "int4"
    out = tmp_path / "o.nii.gz"
    message = one_line_error(run_cli("segment", sample, "--point=0,0,0", "--model", "fastsam3d-demo", "-o", out,
                                     env=env))
    assert "FASTSAM3D_PRECISION" in message and "exact, fast" in message and not out.exists()


def test_bad_int8_kernel_environment_variable_is_one_line(tmp_path, sample, tiny_checkpoint):
    """It gave a traceback (a plain ValueError from choosing the kernel)."""
    env, _ = clean_home(tmp_path)
    env["FASTSAM3D_INT8_KERNEL"] = "bogus"
    out = tmp_path / "o.nii.gz"
    message = one_line_error(run_cli("segment", sample, "--point=0,0,0", "--model", "tiny-test", "--checkpoint",
                                     tiny_checkpoint, "--precision", "fast", "-o", out, env=env))
    assert "FASTSAM3D_INT8_KERNEL" in message and "int_mm" in message and not out.exists()


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_command_ended_changes_nothing(tmp_path, signum):
    """Ctrl+C or SIGTERM arriving once main() returned (while Python shuts down) printed a KeyboardInterrupt
    traceback or ended the finished command with -2/-15. Emulates ``python -m FastSAM3DLib`` / ``fastsam3d``."""
    code = ("import os, signal, sys, time\nfrom FastSAM3DLib.cli import main\n"
            "sys.argv = ['fastsam3d', 'models', '--cache-dir', sys.argv[1]]\nstatus = main()\n"
            f"os.kill(os.getpid(), signal.{signum})\ntime.sleep(0.2)\nsys.exit(status)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "fastsam3d-demo" in proc.stdout


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_shutdown_that_hangs_after_the_command_can_still_be_stopped_with_its_status(tmp_path, signum):
    """Once the command had ended both signals were ignored, so a shutdown that hung (a GPU driver, a thread)
    could only be killed; now they end it at once with the finished command's status and no traceback."""
    code = ("import atexit, sys, time\nfrom FastSAM3DLib.cli import main\n"
            "sys.argv = ['fastsam3d', 'models', '--cache-dir', sys.argv[1]]\nstatus = main()\n"
            "atexit.register(lambda: (print('shutting down', flush=True), time.sleep(60)))\nsys.exit(status)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "shutting down":
                break
        proc.send_signal(getattr(signal, signum))
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == ""
    finally:
        proc.kill()
        proc.wait()


def test_main_called_from_python_restores_the_signal_handlers(tmp_path, capsys):
    import signal

    # Python's own Ctrl+C handler, as a console or a script has it: main() replaces it while it runs (an earlier
    # call that left its own handler behind would otherwise be compared with itself)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        assert main(["models", "--cache-dir", str(tmp_path / "cache")]) == 0
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGINT, outside)
