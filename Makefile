# One-command set-up. `make demo` and `make test` each create .venv and install everything first.
# torch is installed on its own, *before* the package, so pip never resolves a bare `torch` to the
# multi-GB CUDA build on a CPU machine. GPU users: see README ("GPU set-up").
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for the torch install, e.g. an index URL that serves CPU or CUDA wheels.
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
DEMO_DIR ?= demo-out

.PHONY: install demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev]"

demo: install
	$(BIN)/sdxl demo --out $(DEMO_DIR)

# One intra-op thread per process: the tests' tiny models gain nothing from more, and two OpenMP
# threads fighting reader threads and subprocesses for two cores slow them down many times over.
TEST_ENV := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

test: install
	$(TEST_ENV) $(BIN)/python -m pytest -q

test-fast: install
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/scan.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache build *.egg-info
