# Set-up and entry points. `make run` and `make test` each do all the set-up on a fresh machine.
VENV       ?= .venv
PYTHON     ?= python3
# `make run`'s own light venv: the [infer] extra only (onnxruntime, no torch, no CUDA wheels).
RUN_VENV   ?= .venv-run
# This workplace keeps these two releases on disk; elsewhere any torch>=2.6 (see pyproject.toml).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN        := $(VENV)/bin
PYTEST_ARGS ?=
FLOORS_VENV ?= .venv-floors
# The tests that touch the floor-pinned packages: image reading (PNG, JPEG, DICOM), the ONNX
# backend and the REST API on it, the PACS front end. All torch-free (torch tests skip there).
FLOORS_TESTS ?= tests/test_images.py tests/test_light_install.py tests/test_pacs_results.py tests/test_pacs.py

.PHONY: setup run test lint floors browser services clean gpu-check docs docs-serve docs-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[all,dev,docs]'
	touch $@

# The main job: analyze a real bundled X-ray with the packaged ONNX model, with Grad-CAM overlays.
# Its venv holds only the light install (about 300 MB, no torch), apart from the full .venv of
# `make test`, so `make run` stays quick on a fresh clone and both targets work on one clone.
run: $(RUN_VENV)/.installed
	$(RUN_VENV)/bin/chestxray predict --backend onnx examples/00013125_000.png --cam out/cam

$(RUN_VENV)/.installed: pyproject.toml
	rm -rf $(RUN_VENV)
	$(PYTHON) -m venv $(RUN_VENV)
	$(RUN_VENV)/bin/pip install -q -e '.[infer]'
	@if $(RUN_VENV)/bin/pip list --format=freeze 2>/dev/null | grep -iE '^(nvidia-|torch=)'; then \
	  echo "make run: the light venv got the packages above; [infer] must not pull torch or CUDA" >&2; exit 1; fi
	touch $@

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

# The documentation site (docs/, mkdocs.yml) into site/; `make test` builds it too (tests/test_docs.py).
docs: setup
	$(BIN)/mkdocs build --strict

docs-serve: setup
	$(BIN)/mkdocs serve

# Run every example of README.md and docs/ marked runnable and compare its output with the page
# (also part of `make test`). `$(BIN)/python tools/docs_check.py --update` rewrites drifted outputs.
docs-check: setup
	$(BIN)/python tools/docs_check.py

# On a machine with a CUDA GPU: the cuda-marked tests, training throughput (eager, compiled) and bulk predict.
gpu-check: setup
	PY=$(BIN)/python bash benchmarks/gpu_check.sh

# The edit loop: the suite without the tests marked slow or browser (under 90 s on 2 cores).
# `make test` runs them all.
.PHONY: test-fast
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not browser" $(PYTEST_ARGS)

# ruff (lint and format check) on src/ and tests/, mypy on src/; configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
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
	rm -rf $(VENV) $(RUN_VENV) $(FLOORS_VENV) out site .pytest_cache
