# One-command set-up. `make demo` and `make test` each create .venv and install everything first.
# torch is installed on its own, *before* the package, so pip never resolves a bare `torch` to the
# multi-GB CUDA build on a CPU machine. GPU users: see README ("GPU set-up").
# Every other package comes at the exact version in constraints.txt (the versions CI tested);
# `make test-latest` tries the newest versions pyproject.toml allows, in a venv of its own.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
CONSTRAINTS ?= constraints.txt
# PIP_CONSTRAINT also reaches pip's isolated build environment (setuptools, wheel); -c would not.
PIP := $(if $(CONSTRAINTS),PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) )$(VENV)/bin/python -m pip
# Extra pip arguments for the torch install, e.g. an index URL that serves CPU or CUDA wheels.
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin
DEMO_DIR ?= demo-out

.PHONY: install demo test test-fast test-latest constraints bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) install --quiet "torch$(if $(TORCH_VERSION),==$(TORCH_VERSION))" $(TORCH_PIP_ARGS)
	$(PIP) install --quiet $(PACKAGE_PIP_ARGS) -e ".[dev]"

demo: install
	$(BIN)/sdxl demo --out $(DEMO_DIR)

# One intra-op thread per process: the tests' tiny models gain nothing from more, and two OpenMP
# threads fighting reader threads and subprocesses for two cores slow them down many times over.
TEST_ENV := OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

# --durations: each slow test's time is printed, so the margin to CI's time limit stays visible.
# -n: one pytest worker per core (pytest-xdist), each file's tests on one worker so that its module
# fixtures are built once; the demo test (single-threaded, ~15 min) runs beside the rest instead of
# before it. TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= auto
test: install
	$(TEST_ENV) $(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

# Not in CI: the newest torch and packages that pyproject.toml allows, so a dependency change is
# found on purpose. After it passes, `make constraints VENV=.venv-latest` records that set as the tested one.
test-latest:
	$(MAKE) $(VENV)-latest/bin/python VENV=$(VENV)-latest CONSTRAINTS=
	$(VENV)-latest/bin/python -m pip install --quiet --upgrade torch $(TORCH_PIP_ARGS)
	$(MAKE) test VENV=$(VENV)-latest CONSTRAINTS= PACKAGE_PIP_ARGS="--upgrade --upgrade-strategy eager"

# Record the versions installed in $(VENV) as the tested set (after `make test` passes on them).
constraints:
	{ grep -E '^(#|pip==|setuptools==|wheel==)' constraints.txt; $(PIP) freeze --exclude-editable | grep -v -i '^torch=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

test-fast: install
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/scan.py

clean:
	rm -rf $(VENV) .venv-latest $(DEMO_DIR) .pytest_cache build *.egg-info
