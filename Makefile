# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv, install torch
# (the pinned CPU build, only when the venv has no torch), the package with its extras, then run.
PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_PIN   ?= torch==2.13.0
BASE_STAMP  := $(VENV)/.autoprune-base
FULL_STAMP  := $(VENV)/.autoprune-full
JOBS        ?= 2

.PHONY: install demo test test-slow bench lint clean info

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)

# torch first, and only if missing: a bare or ranged `pip install torch` would pull the CUDA wheels.
# --no-build-isolation: the package (and its C++ extension) builds against the torch in the venv.
# Base (enough for the demo): the package and the dev extra, no C++ build, no Triton.
$(BASE_STAMP): $(PY) pyproject.toml setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q "setuptools>=70.1" wheel
	AUTOPRUNE_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	@touch $(BASE_STAMP)

# Full (for the tests): adds Triton and builds the C++ extension ahead of time.
$(FULL_STAMP): $(BASE_STAMP) $(wildcard csrc/*.* csrc/*/*.*)
	MAX_JOBS=$(JOBS) $(PY) -m pip install -q --no-build-isolation -e ".[triton,dev]"
	@touch $(FULL_STAMP)

install: $(FULL_STAMP)

info: install
	$(VENV)/bin/autoprune-ext info

# The main job on the bundled digits data: dense LeNet-300-100 -> AutoPrune -> fine-tune -> table.
demo: $(BASE_STAMP)
	$(VENV)/bin/autoprune-ext prune --model lenet300 --data digits --out runs/demo

# Unit tests, backend conformance (Triton through its CPU interpreter, the C++ extension), and one
# smoke run of every benchmark so they cannot rot. Slow tests: `make test-slow`.
test: install
	$(PY) -m pytest -q --benchmark-disable -p no:cacheprovider tests benchmarks

test-slow: install
	$(PY) -m pytest -q --benchmark-disable -p no:cacheprovider -m slow tests benchmarks

# Benchmarks for real (meaningful on a GPU machine; on CPU they time the C++ kernels).
bench: install
	$(PY) -m pytest -q -m "" --benchmark-only --benchmark-columns=min,median,mean,rounds benchmarks

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks runs
