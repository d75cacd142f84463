# upcycle — `make demo` runs the main job on the default model, `make test` runs the test suite.
# Both create the virtual environment on first use, with the exact versions of constraints.txt
# (.ci/venv). `make test-latest` runs the suite against the newest releases in .venv-latest;
# `make lock` does the same and, if it passes, writes those versions to constraints.txt.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LATEST := .venv-latest
# the installed versions as constraints.txt holds them (torch without its local +cpu label)
FREEZE  = $(1)/bin/python -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'
export PYTHON

.PHONY: venv demo test test-slow test-latest lock lint bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt .ci/venv
	bash .ci/venv locked $(VENV) dev,plot
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# A fresh environment each time, so that nothing of an earlier resolution lingers.
test-latest:
	rm -rf $(LATEST)
	bash .ci/venv latest $(LATEST) dev,plot,bench,quant
	@echo "newer than constraints.txt (>) / locked (<):"
	@$(call FREEZE,$(LATEST)) | diff -I '^#' constraints.txt - | grep '^[<>]' || echo "  nothing"
	$(LATEST)/bin/python -m pytest -q

lock: test-latest
	{ echo "# The versions \`make test\` passed with (make lock, $$(date -u +%F)); setup.cfg keeps the ranges."; \
	  $(call FREEZE,$(LATEST)); } >constraints.txt.new
	mv constraints.txt.new constraints.txt

# transformers 4.x beside .venv, for tests/test_transformers4.py (make test-slow builds it too)
.PHONY: venv-tf4
venv-tf4: .venv-tf4/.installed

.venv-tf4/.installed: .ci/venv-tf4
	bash .ci/venv-tf4 .venv-tf4

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation -e '.[bench]'
	$(BIN)/python bench/convert.py

clean:
	rm -rf $(VENV) $(LATEST) .venv-tf4 build *.egg-info
