# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test notebooks lab clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,notebooks]"
	touch $@

# The main job on the embedded digits model: a sample grid and its quality. Output goes to the ignored runs/, so the
# checkout stays clean (README's command table says how to regenerate the committed data/figures/digits_samples.png).
demo: setup
	$(BIN)/lazymar sample --model digits --labels 0-9 --per-label 8 --seed 0 --out runs/digits_samples.png --force
	$(BIN)/lazymar eval --model digits --num-samples 500 --seed 0 --json

test: setup
	$(BIN)/python -m pytest

lab: setup
	$(BIN)/jupyter lab notebooks/

# After editing a notebook's .py source (the .ipynb twins follow; see notebooks/jupytext.toml).
notebooks: setup
	$(BIN)/jupytext --sync notebooks/0*.py

clean:
	rm -rf $(VENV) .pytest_cache runs
