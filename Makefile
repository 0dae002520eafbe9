# Set-up and entry points. `make run` and `make test` each do all the set-up on a fresh machine.
VENV       ?= .venv
PYTHON     ?= python3
# This workplace keeps these two releases on disk; elsewhere any torch>=2.6 (see pyproject.toml).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN        := $(VENV)/bin
PYTEST_ARGS ?=
FLOORS_VENV ?= .venv-floors
# The tests that touch the floor-pinned packages: image reading (PNG, JPEG, DICOM), the ONNX
# backend and the REST API on it, the PACS front end. All torch-free (torch tests skip there).
FLOORS_TESTS ?= tests/test_images.py tests/test_light_install.py tests/test_pacs_results.py tests/test_pacs.py

.PHONY: setup run test lint floors browser services clean gpu-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $@

# The main job: analyze a real bundled X-ray with the bundled model, with a Grad-CAM overlay.
run: setup
	$(BIN)/chestxray predict examples/00013125_000.png --cam out/cam

# Headless Chromium for the browser test (Debian packages; skipped if already there).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "could not install Debian's chromium (needs root and apt): the browser test will be skipped"

# A real PACS for the PACS tests: Orthanc with its DICOMweb plugin, and dciodvfy (dicom3tools)
# to validate the SR and SC objects (Debian packages; skipped if already there).
services:
	@{ [ -x /usr/sbin/Orthanc ] && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && command -v dciodvfy >/dev/null 2>&1; } \
	  || { apt-get update -qq && apt-get install -y -qq orthanc orthanc-dicomweb dicom3tools >/dev/null \
	       && { service orthanc stop >/dev/null 2>&1 || true; }; } \
	  || echo "could not install Debian's orthanc, orthanc-dicomweb and dicom3tools (needs root and apt): the PACS tests will be skipped"

test: setup browser services lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# On a machine with a CUDA GPU: the cuda-marked tests, training throughput (eager, compiled) and bulk predict.
gpu-check: setup
	PY=$(BIN)/python bash benchmarks/gpu_check.sh

# ruff (lint and format check) and mypy on src/, configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check src
	$(BIN)/ruff format --check src
	$(BIN)/mypy

# Floor versions: a separate venv with the LOWEST versions pyproject.toml allows for the light
# install (core + infer + serve, pinned by tools/floor_versions.py), then the tests that touch
# them. Torch is not installed there: other torch builds are multi-GB (CUDA) downloads and this
# workplace keeps only torch 2.14.1 on disk, so the torch floor is argued in pyproject.toml and
# the torch paths run on 2.14.1 in `make test`. "A download failure" warnings are errors: nothing
# may fetch files at run time (pydicom 3.0.0 did on import).
floors: $(FLOORS_VENV)/.installed
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider -W "error:A download failure:UserWarning" $(FLOORS_TESTS)

$(FLOORS_VENV)/.installed: pyproject.toml tools/floor_versions.py
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(PYTHON) tools/floor_versions.py > $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/pip install -q -r $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/pip install -q --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) $(FLOORS_VENV) out .pytest_cache
