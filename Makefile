# upcycle — `make demo` runs the main job on the default model, `make test` runs the test suite.
# Both create the virtual environment on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU machines get the CPU build of torch (pinned; an unpinned torch pulls a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0

.PHONY: venv demo test test-slow lint bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch; \
	else \
	  $(BIN)/python -m pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/python -m pip install -q -e '.[dev,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/convert.py

clean:
	rm -rf $(VENV) build *.egg-info
