# Set-up and entry points. `make run` and `make test` each do all the set-up on a fresh machine.
VENV       ?= .venv
PYTHON     ?= python3
# This workplace keeps these two releases on disk; elsewhere any torch>=2.4 works.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN        := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup run test browser clean gpu-check
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

test: setup browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# On a machine with a CUDA GPU: the cuda-marked tests, then training throughput eager and compiled.
gpu-check: setup
	$(BIN)/python -m pytest -q -m cuda -rs $(PYTEST_ARGS)
	$(BIN)/python benchmarks/train_throughput.py --device cuda --batch-size 128 --steps 30
	$(BIN)/python benchmarks/train_throughput.py --device cuda --batch-size 128 --steps 30 --compile

clean:
	rm -rf $(VENV) out .pytest_cache
