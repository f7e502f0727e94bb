# Each target installs what it needs into .venv, so a fresh machine needs only python3 and make;
# except gpu-check, which uses the machine's own python3 (torch, Triton) and installs nothing (GPU boxes are offline).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: demo test bench gpu-check lint clean

$(RUNTIME_STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

demo: $(RUNTIME_STAMP)
	$(PY) -m FastSAM3DLib demo

test: $(DEV_STAMP)
	$(PY) -m pytest Testing

bench: $(DEV_STAMP)
	$(PY) -m FastSAM3DLib.benchmarks $(BENCH_ARGS)

# tests marked cuda, the Triton kernel against the reference on the GPU, the benchmarks on CUDA (< 8 min);
# writes Testing/Benchmarks/results/gpu-check-<GPU>-<date>.json. No venv, no pip: the repository is all it needs.
gpu-check:
	PYTHONPATH=.$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m FastSAM3DLib.benchmarks.gpu_check $(GPU_CHECK_ARGS)

lint: $(DEV_STAMP)
	$(PY) -m compileall -q FastSAM3DLib FastSAM3D Testing

clean:
	rm -rf $(VENV) .pytest_cache
