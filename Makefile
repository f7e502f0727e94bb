# Each target installs what it needs into .venv, so a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: demo test bench lint clean

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
	$(PY) -m FastSAM3DLib.benchmarks

lint: $(DEV_STAMP)
	$(PY) -m compileall -q FastSAM3DLib FastSAM3D Testing

clean:
	rm -rf $(VENV) .pytest_cache
