# The README's two commands are `make demo` and `make test`; both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench lint clean

install: $(STAMP)

# Reinstall only when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet --constraint constraints.txt -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/ruff check mmembed_rag finetune integrations tests benchmarks notebooks
	$(BIN)/python -m pytest

demo: install
	$(BIN)/python -m mmembed_rag.demo

bench: install
	$(BIN)/python benchmarks/encode_pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info
