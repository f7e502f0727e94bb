"""The memory bank wherever a model is used: the main command line (``memory``, ``segment --memory``,
``evaluate --memory``), ``build_model(memory=...)`` and ``make bench``. (The effect: Testing/test_effect.py.)

CPU, ``tiny-test`` with seeded random weights, the small synthetic cases of Testing/test_memory.py.
"""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from FastSAM3DLib.cli import main
from FastSAM3DLib.memory import MemoryBankError, attached_memory, build_bank, save_bank
from FastSAM3DLib.registry import build_model
from test_memory import _write_case

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Cases of two patients, a bank of P1 made by tiny-test (seed 0), and those weights as a checkpoint file."""
    folder = tmp_path_factory.mktemp("memcmd")
    a = _write_case(folder, "a1", 0, [((18, 20, 20), 6)])
    c = _write_case(folder, "b1", 2, [((20, 18, 22), 5)])
    (folder / "train.json").write_text(json.dumps([dict(a, patient="P1")]))
    (folder / "test.json").write_text(json.dumps([dict(c, patient="P2")]))
    (folder / "leaky.json").write_text(json.dumps([dict(a, patient="P1")]))
    model = build_model("tiny-test", seed=0)
    save_bank(build_bank(folder / "train.json", model, log=lambda s: None), folder / "bank.safetensors")
    torch.save(model.state_dict(), folder / "tiny.pth")
    return folder


def test_memory_is_a_command_of_the_main_cli():
    run = subprocess.run([sys.executable, "-m", "FastSAM3DLib", "memory", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "build" in run.stdout and "inspect" in run.stdout
    help_text = subprocess.run([sys.executable, "-m", "FastSAM3DLib", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=120).stdout
    assert "memory" in help_text


def test_segment_with_a_bank_attaches_it_and_refuses_a_server(data, tmp_path, capsys, one_torch_thread):
    image = str(data / "b1.nii.gz")
    point = "--point=-44,-36,50"  # the structure's centre (i, j, k) = (22, 18, 20) in LPS mm, as RAS
    common = ["segment", image, point, "--model", "tiny-test", "--checkpoint", str(data / "tiny.pth")]
    assert main(common + ["--memory", str(data / "bank.safetensors"), "-o", str(tmp_path / "on.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "memory bank" in out and "1 entries" in out and (tmp_path / "on.nii.gz").is_file()
    assert main(common + ["--memory", str(data / "bank.safetensors"), "--memory-k", "0",
                          "-o", str(tmp_path / "k0.nii.gz")]) == 2
    assert "k must be at least 1" in capsys.readouterr().err
    assert main(["segment", image, point, "--device", "http://127.0.0.1:9", "--memory",
                 str(data / "bank.safetensors"), "-o", str(tmp_path / "srv.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "local model" in err and err.count("\n") == 1 and not (tmp_path / "srv.nii.gz").exists()


def test_evaluate_with_a_bank_pairs_it_with_the_plain_run_and_guards_the_patient(data, tmp_path, capsys,
                                                                                  one_torch_thread):
    out = tmp_path / "eval"
    common = ["evaluate", str(data / "test.json"), "--model", "tiny-test", "--checkpoint", "random", "--clicks", "2",
              "--placement", "gt", "--no-plots", "--no-predictions", "--quiet", "-o", str(out)]
    assert main(common) == 0
    capsys.readouterr()
    assert main(common + ["--memory", str(data / "bank.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "memory on - off" in text and "| gt | 1 | 1 |" in text
    with open(out / "results.csv", newline="") as stream:
        models = {row["model"] for row in csv.DictReader(stream)}
    assert models == {"tiny-test", "tiny-test+memory"}
    journal = (out / "memory_retrievals.jsonl").read_text().splitlines()
    assert journal and all("patient P1" in e for line in journal for e in json.loads(line)["entries"])
    leaky = ["evaluate", str(data / "leaky.json"), "--model", "tiny-test", "--checkpoint", "random", "--clicks", "1",
             "--placement", "gt", "--quiet", "-o", str(tmp_path / "leak"), "--memory", str(data / "bank.safetensors")]
    assert main(leaky) == 2
    assert "test patient" in capsys.readouterr().err
    assert not (tmp_path / "leak" / "results.csv").exists()


def test_build_model_attaches_a_bank_that_fits_and_refuses_one_that_does_not(data):
    model = build_model("tiny-test", seed=0, memory=data / "bank.safetensors")
    handle = attached_memory(model)
    assert handle is not None and len(handle.bank) == 1 and handle.k == 3
    with pytest.raises(MemoryBankError, match="other weights"):
        build_model("tiny-test", seed=1, memory=data / "bank.safetensors")


def test_make_bench_measures_the_memory_including_int8(int8_kernel):
    """(int8_kernel: the fast precision applies whatever this CPU's timings say at the moment, so a loaded
    machine, where int8 products measured slower than float32, cannot turn the int8 rows into skips.)"""
    from FastSAM3DLib.benchmarks import memory
    from FastSAM3DLib.benchmarks.suite import Plan, extra_benchmarks

    assert memory.measure in extra_benchmarks()
    rows = memory.measure(Plan(device="cpu", precisions=("int8",), repeats=1, skip={"medim": "dry run"}), "CPU")
    retrieval = [r for r in rows if r["name"] == "memory_retrieval_ms"]
    overhead = [r for r in rows if r["name"] == "memory_overhead_ms" and r["variant"] == "memory: attention"]
    assert retrieval[0]["value"] > 0 and overhead[0]["value"] is not None and overhead[0]["precision"] == "int8"


def test_segment_fast_precision_keeps_the_bank_made_with_the_float_weights(data, tmp_path, capsys, one_torch_thread,
                                                                          int8_kernel):
    assert main(["segment", str(data / "b1.nii.gz"), "--point=-44,-36,50", "--model", "tiny-test", "--checkpoint",
                 str(data / "tiny.pth"), "--precision", "fast", "--memory", str(data / "bank.safetensors"),
                 "--memory-rule", "values", "-o", str(tmp_path / "fast.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "rule values" in out and "fast precision" in out


def _file_size_limit(limit):
    """For ``preexec_fn``: the disk is 'full' after ``limit`` bytes of a file (EFBIG, as the audit's full disk)."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_memory_build_on_a_full_disk_is_one_error_line_and_leaves_nothing(data, tmp_path):
    """safetensors reports a full disk as SafetensorError, not OSError: it ended in a traceback with status 1."""
    import os

    out = tmp_path / "bank.safetensors"
    done = subprocess.run([sys.executable, "-m", "FastSAM3DLib", "memory", "build", str(data / "train.json"),
                           "--model", "tiny-test", "--checkpoint", "random", "-o", str(out), "--quiet"],
                          cwd=REPO, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), capture_output=True,
                          text=True, timeout=600,
                          preexec_fn=_file_size_limit((data / "bank.safetensors").stat().st_size // 2))
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith(f"error: cannot write {out}: File too large") and "ulimit -f" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_bank_temporary_left_by_a_killed_build_is_swept_by_a_later_save(data, tmp_path):
    """``kill -9`` while a bank is written leaves its hidden temporary; a later save into the folder removes it
    once it is stale."""
    import os
    import time

    out = tmp_path / "bank.safetensors"
    code = ("import os, signal, sys\nimport safetensors.torch as st\nsave = st.save_file\n"
            "st.save_file = lambda *a, **k: (save(*a, **k), os.kill(os.getpid(), signal.SIGKILL))\n"
            "from FastSAM3DLib.memory import load_bank, save_bank\n"
            "save_bank(load_bank(sys.argv[1]), sys.argv[2])\n")
    done = subprocess.run([sys.executable, "-c", code, str(data / "bank.safetensors"), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".bank.safetensors") and left[0].stat().st_size > 0
    old = time.time() - 3600
    os.utime(left[0], (old, old))  # an hour later
    from FastSAM3DLib.memory import load_bank

    save_bank(load_bank(data / "bank.safetensors"), out)
    assert list(tmp_path.iterdir()) == [out]
