"""``make gpu-check`` without a GPU: its dry run, its result schema and tables, the README benchmark table.

The dry run is the real entry point (``python -m FastSAM3DLib.benchmarks.gpu_check --dry-run``) in a child
process in which SimpleITK cannot be imported, as on a bare GPU machine: it must finish, run every step on
the CPU (the Triton kernel under the interpreter) and write a result that follows the schema.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from FastSAM3DLib.benchmarks import report

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE_LIMIT = 64 * 2 ** 20  # what the GPU machine accepts: the repository without .venv
# a child python in which ``import SimpleITK`` raises ImportError (None in sys.modules), then the entry point
BLOCKED_RUN = ("import runpy, sys; sys.modules['SimpleITK'] = None; sys.argv = ['gpu_check'] + sys.argv[1:]; "
               "runpy.run_module('FastSAM3DLib.benchmarks.gpu_check', run_name='__main__')")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """(completed process, result dict) of one dry run without SimpleITK (about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT)] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--dry-run", "--output-dir", str(out), "--threads",
                           "1"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    files = sorted(out.glob("gpu-check-dry-run-*.json"))
    assert proc.returncode == 0, f"dry run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert len(files) == 1, f"expected one result file in {out}, found {files}"
    return proc, json.loads(files[0].read_text())


def _values(result, **where):
    return [m for m in result["measurements"] if all(m[k] == v for k, v in where.items())]


def test_dry_run_result_follows_the_schema(dry_run):
    _, result = dry_run
    assert report.validate(result) == []
    assert result["kind"] == "gpu-check" and result["dry_run"] is True and result["status"]["ok"] is True
    env = result["environment"]
    for key in ("machine", "platform", "cpu", "threads", "device"):
        assert env[key], key
    assert env["threads"] == 1 and env["versions"]["torch"] and "triton" in env["versions"]
    # the host-steadiness probe ran before every unit of the benchmark suite
    host = _values(result, name="host_steadiness")
    assert len(host) == 1 and host[0]["value"] >= 1.0 and "probes" in host[0]["note"]
    probes = result["details"]["steadiness"]["probes"]
    assert len(probes) >= 10 and any(title.startswith("session") for title, _ in probes)


def test_dry_run_runs_the_cuda_tests_with_pytest(dry_run):
    tests = dry_run[1]["checks"]["cuda_tests"]
    assert "test_attention_triton.py" in tests["files"]
    # no GPU here: pytest ran and every cuda test skipped with its reason
    assert tests["status"] == "skipped" and tests["skipped"] > 0 and tests["passed"] == 0 and tests["failed"] == 0
    assert "CUDA" in tests["reason"]


def test_dry_run_checks_every_kernel_variant_against_the_reference(dry_run):
    kernel = dry_run[1]["checks"]["kernel"]
    assert kernel["status"] == "passed"
    variants = {(c["kind"], c["precision"]) for c in kernel["cases"]}
    assert variants == {(k, p) for k in ("dense", "sparse", "padded") for p in ("fp32", "bf16", "fp16")}
    for case in kernel["cases"]:
        assert case["ok"] and case["triton_ran"] and not case["identical_to_torch"], case
        assert case["rel_l2"] <= case["tolerance"] and case["triton_launches"] >= 1


def test_dry_run_times_the_attention_ops_in_every_precision(dry_run):
    """Step 4 runs in the dry run too (it once failed every time on a GPU: bf16 inputs, float32 tables)."""
    ops = dry_run[1]["details"]["attention"]["attention_ops"]["results"]
    assert {r["dtype"] for r in ops} == {"float32", "bfloat16", "float16"}
    assert {r["op"] for r in ops} == {"global", "padded-window"} and {r["backend"] for r in ops} >= {"torch", "eager"}
    assert all("error" not in r and r["median_ms"] > 0 for r in ops), [r for r in ops if "error" in r]
    assert dry_run[1]["status"]["partial"] is False and dry_run[1]["environment"]["triton_failure"] is None


def test_a_run_cut_off_keeps_what_it_measured(tmp_path, monkeypatch):
    """The JSON is rewritten after every unit: a benchmark that raises (or a kill) leaves the numbers before it."""
    from FastSAM3DLib.benchmarks import gpu_check, suite

    def stops(plan, env, log=print, model_names=None, after_unit=None):
        measured = [report.measurement("encoder_ms", 1.5, model="tiny-test", device="cpu", precision="fp32")]
        after_unit(measured, {"volume": "a test volume"}, [])
        raise RuntimeError("the second model failed to build")

    monkeypatch.setattr(suite, "run", stops)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))  # main's setdefault is undone
    assert gpu_check.main(["--dry-run", "--skip-tests", "--output-dir", str(tmp_path)]) == 1
    result = json.loads(next(tmp_path.glob("gpu-check-dry-run-*.json")).read_text())
    assert [m["value"] for m in result["measurements"]] == [1.5] and result["details"]["volume"] == "a test volume"
    assert any("benchmarks stopped" in p and "failed to build" in p for p in result["status"]["problems"])
    assert "attention" in result["details"]  # the steps after it still ran


def test_dry_run_measures_every_model_and_precision(dry_run):
    result = dry_run[1]
    for model in ("tiny-test", "tiny-test-teacher"):
        for precision in ("fp32", "bf16"):
            row = {m["name"]: m for m in _values(result, model=model, precision=precision, variant="")}
            for name in ("encoder_ms", "decoder_ms", "speedup_vs_eager", "speedup_vs_sam2d"):
                assert row[name]["value"] > 0, (model, precision, name)
            # the CPU has no CUDA graphs; without SimpleITK the session resamples in PyTorch, so clicks run
            assert "encoder_cuda_graph_ms" not in row
            for name in ("first_click_ms", "next_click_ms"):
                assert row[name]["value"] > 0, (model, precision, name)
            eager = _values(result, model=model, precision=precision, variant=report.EAGER_VARIANT)
            assert eager[0]["value"] > 0
            assert row["speedup_vs_eager"]["value"] == pytest.approx(eager[0]["value"] / row["encoder_ms"]["value"])
    sam = _values(result, model=report.SAM2D_MODEL, name="encoder_ms")
    assert len(sam) == 2 and all(m["value"] > 0 and "128" in m["note"] for m in sam)
    medim = _values(result, model=report.MEDIM_MODEL)
    assert medim and all(m["value"] is None and "dry run" in m["skipped"] for m in medim)


def test_dry_run_prints_the_tables(dry_run):
    out = dry_run[0].stdout
    assert "Triton kernel vs float64 reference" in out and "padded 64 tokens" in out
    for header in ("model", "precision", "encoder", "first click", "next click", "peak memory", "vs official eager",
                   "vs 2D SAM"):
        assert header in out, header
    assert "not measured: first click" not in out  # measured without SimpleITK (PyTorch resampling)
    assert "gpu-check: OK" in out and "wrote " in out


def test_session_benchmark_with_simpleitk():
    """The click path the dry run skips: first/next click and memory through the real session (tiny model)."""
    pytest.importorskip("SimpleITK")
    from FastSAM3DLib.benchmarks import pipeline
    from FastSAM3DLib.registry import build_model

    model = build_model("tiny-test", seed=0)
    result = pipeline.bench_session(model, pipeline.ct_sized_volume((40, 64, 64)), "cpu", "fp32", repeats=1,
                                    memory_clicks=1)
    assert result["first_click"]["median_ms"] > 0 and result["next_click"]["median_ms"] > 0
    assert result["peak_memory_mib"] > result["weights_mib"] > 0
    assert result["next_click_paste_median_ms"] >= 0


def test_sam2d_stand_in_is_the_official_vit():
    """The torch-only 2D SAM encoder timed on GPU machines equals segment-anything's, weights loaded by name."""
    import torch

    from FastSAM3DLib.benchmarks import sam2d

    try:
        official_vit_b = sam2d.official_encoder(sam2d.VIT_B)
    except ImportError:
        pytest.skip("segment-anything is not installed")
    ours = sam2d.ViTImageEncoder(sam2d.VIT_B)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in official_vit_b.state_dict().items()}
    del official_vit_b, ours
    # windows that do not tile the grid (padding), global blocks, random relative position tables
    config = sam2d.ViTConfig(img_size=80, embed_dim=32, depth=3, num_heads=2, window_size=3, global_attn_indexes=(1,),
                             out_chans=16)
    official = sam2d.official_encoder(config).eval()
    with torch.no_grad():
        for p in official.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    ours = sam2d.ViTImageEncoder(config).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    x = sam2d.image_input(config, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- report
def _result(measurements):
    return {"schema": report.SCHEMA, "kind": "bench", "date": "2026-01-01T00:00:00+00:00",
            "environment": {"cpu": "Test CPU", "cpu_count": 2, "threads": 1, "versions": {"torch": "2.x"}},
            "measurements": measurements}


def test_report_ratios_tables_and_extension():
    m = report.measurement
    rows = [m("encoder_ms", 100.0, model="fastsam3d", device="cpu", precision="fp32"),
            m("first_click_ms", None, model="fastsam3d", device="cpu", precision="fp32", skipped="no SimpleITK"),
            m("encoder_ms", 250.0, model="fastsam3d", device="cpu", precision="fp32", variant=report.EAGER_VARIANT),
            m("encoder_ms", 1000.0, model=report.MEDIM_MODEL, device="cpu", precision="fp32"),
            m("encoder_ms", 64000.0, model=report.SAM2D_MODEL, device="cpu", precision="fp32",
              variant=report.SAM2D_VARIANT),
            # a kind of number the table does not know: listed under "other measurements"
            m("gil_ratio", 1.3, model="fastsam3d", device="cpu", precision="fp32", unit="x", label="GIL ratio")]
    rows += report.derive_ratios(rows)
    ratios = {r["name"]: r["value"] for r in rows if r["name"].startswith("speedup")}
    assert ratios == {"speedup_vs_eager": 2.5, "speedup_vs_medim": 10.0, "speedup_vs_sam2d": 640.0}
    result = _result(rows)
    assert report.validate(result) == []
    markdown = report.render_markdown([result], ["x.json"])
    assert "| FastSAM3D | cpu | fp32 | 100 ms | — | " in markdown
    assert "| 2.50× | 10.0× | 640× |" in markdown
    assert "| GIL ratio | FastSAM3D | cpu | fp32 | 1.30× |" in markdown
    assert "Not measured: first click of FastSAM3D (cpu, fp32): no SimpleITK" in markdown
    text = report.render_text([result])
    assert "2.50x" in text and "640x" in text and "×" not in text


def test_report_validation_names_the_problems():
    bad = _result([{"name": "encoder_ms", "value": None}])
    assert any("exactly the keys" in p for p in report.validate(bad))
    missing = report.measurement("encoder_ms", None, model="m", device="d", precision="p")
    assert missing["skipped"] == "not measured"
    assert report.validate({"kind": "bench"}) and report.format_value(1234.5, "ms") == "1.23 s"


def test_readme_table_is_rendered_from_the_committed_results():
    text = (REPO_ROOT / "README.md").read_text()
    block = report.readme_block(text)
    assert block is not None, "README.md lacks the generated benchmark block"
    sources, _ = block
    assert sources and all((REPO_ROOT / s).is_file() for s in sources), sources
    current = text[text.index(report.BEGIN):text.index(report.END) + len(report.END)]
    assert current == report.render_readme_block(sources), \
        "README benchmark table is stale: python -m FastSAM3DLib.benchmarks.report --update-readme"


# ------------------------------------------------------------------------------- make target and repository
def test_makefile_gpu_check_target_needs_no_venv():
    lines = (REPO_ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("gpu-check:"))
    assert lines[start].split(":", 1)[1].strip() == "", "gpu-check must not depend on the venv targets"
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line)
    recipe = "\n".join(recipe)
    assert "-m FastSAM3DLib.benchmarks.gpu_check" in recipe and "PYTHONPATH=." in recipe
    assert "pip" not in recipe and "venv" not in recipe.lower() and "$(PY) " not in recipe


def test_cuda_test_discovery_finds_the_kernel_tests():
    from FastSAM3DLib.benchmarks import gpu_check

    names = [p.name for p in gpu_check.cuda_test_files(REPO_ROOT)]
    assert "test_attention_triton.py" in names and "test_gpu_check.py" not in names


def test_repository_fits_the_gpu_machine():
    """Tracked files (what a clone has; .venv is not tracked) stay under the GPU machine's 64 MiB."""
    try:
        proc = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, timeout=60)
    except OSError:
        pytest.skip("git is not installed")
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    paths = [REPO_ROOT / p.decode() for p in proc.stdout.split(b"\0") if p]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    assert paths and total < SIZE_LIMIT, f"tracked files hold {total / 2 ** 20:.1f} MiB (limit 64 MiB)"
    assert not any(part == ".venv" for p in paths for part in p.relative_to(REPO_ROOT).parts)


def test_readme_block_is_regenerated_from_its_sources(tmp_path):
    m = report.measurement
    result = _result([m("encoder_ms", 12.0, model="fastsam3d", device="cpu", precision="fp32")])
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a.json").write_text(json.dumps(result))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}: sources: results/a.json -->\nold table\n{report.END}\noutro\n")
    assert report.update_readme(readme, root=tmp_path) is True
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{report.END}\noutro\n") and "old table" not in text
    assert "| FastSAM3D | cpu | fp32 | 12.0 ms |" in text and report.readme_block(text)[0] == ["results/a.json"]
    assert report.update_readme(readme, root=tmp_path) is False  # idempotent


def test_real_check_without_a_gpu_says_to_dry_run_and_keeps_the_diagnostics(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the real check would run")
    proc = subprocess.run([sys.executable, "-m", "FastSAM3DLib.benchmarks.gpu_check", "--output-dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--dry-run" in proc.stdout
    saved = json.loads(next(tmp_path.glob("gpu-check-no-gpu-*.json")).read_text())["no_gpu"]
    assert saved["torch"] == torch.__version__ and "nvidia_smi" in saved


def test_a_python_without_torch_gets_one_line_saying_which_python_to_use(monkeypatch, capsys):
    """``make gpu-check`` runs the machine's ``python3``; where that one has no PyTorch (a workstation whose
    PyTorch is in ``.venv``), one line says so instead of a traceback."""
    from FastSAM3DLib.benchmarks import gpu_check

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as when it is not installed
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what --dry-run sets: undone after the test
    assert gpu_check.main(["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "has no PyTorch" in err and "PYTHON=.venv/bin/python" in err and "Traceback" not in err
