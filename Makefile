# Two set-up commands: `make demo` runs the demo, `make test` runs the tests. Both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := build/.installed

.PHONY: install demo test lint
install: $(STAMP)

# The native op is compiled against the installed torch, so the build runs without isolation.
$(STAMP): pyproject.toml constraints.txt CMakeLists.txt $(wildcard cpp_ext/*/*)
	$(PIP) install --quiet -c constraints.txt torch==2.13.0 scikit-build-core
	$(PIP) install --quiet --no-build-isolation -c constraints.txt -e ".[dev,export,bench]"
	@mkdir -p build && touch $(STAMP)

demo: install
	crnet demo --checkpoint checkpoints/tiny_fold0.pt --out runs/demo

test: install
	$(PYTHON) -m pytest -q

lint: install
	ruff check .
	ruff format --check crnet export engines tests benchmarks
