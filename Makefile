# Two set-up commands: `make demo` runs the demo, `make test` runs the tests. Both install first, into a
# virtual environment of their own (.venv), so that no other crnet on PATH or in site-packages is used.
# Activate it (`. .venv/bin/activate`) to run `crnet` by hand; VENV=DIR puts it elsewhere.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
STAMP := $(VENV)/.crnet-installed

.PHONY: install demo test lint wheel-check
install: $(STAMP)

$(PYTHON):
	python3 -m venv $(VENV)

# The native op is compiled against the installed torch, so the build runs without isolation.
$(STAMP): $(PYTHON) pyproject.toml constraints.txt CMakeLists.txt $(wildcard cpp_ext/*/*)
	$(PIP) install --quiet -c constraints.txt torch==2.13.0 scikit-build-core
	$(PIP) install --quiet --no-build-isolation -c constraints.txt -e ".[dev,export,bench]"
	@touch $(STAMP)

demo: install
	$(PYTHON) -m crnet demo --checkpoint checkpoints/tiny_fold0.pt --out runs/demo

# Test files on parallel worker processes, one per core up to 8 (each builds the suite's shared fixtures):
# 11 min instead of 13 on 2 cores (docs/BENCHMARKS.md). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 8 ? n : 8 )))
test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS)

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check crnet export engines tests benchmarks

# A regular (non-editable) wheel in a fresh environment outside the tree, used from another directory.
wheel-check: install
	bash .ci/wheel $(PYTHON)
