# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test notebooks lab figures clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,notebooks]"
	touch $@

# The main job on the embedded digits model: a sample grid and its quality. Output goes to the ignored runs/, so the
# checkout stays clean (README's command table says how to regenerate the committed data/figures/digits_samples.png).
# The eval (500 samples of 64 steps, then scored) is the long part; the last line says what its numbers mean.
demo: setup
	$(BIN)/lazymar sample --model digits --labels 0-9 --per-label 8 --seed 0 --out runs/digits_samples.png --force
	$(BIN)/lazymar eval --model digits --num-samples 500 --seed 0 --json | tee runs/demo_eval.json
	@$(BIN)/python -c "$$DEMO_SUMMARY" runs/demo_eval.json

define DEMO_SUMMARY
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\nSummary: samples in runs/digits_samples.png. accuracy {r['accuracy']:.3f} = share of the {r['num_samples']} "
      f"samples a digits classifier reads as the class asked for (1 is perfect); fid {r['fid']:.2f} = digits-FID "
      f"against real digits (lower is better); fid_floor {r['fid_floor']:.2f} = what real held-out digits score, "
      f"the best reachable. Good: accuracy near 1 and fid near fid_floor.")
endef
export DEMO_SUMMARY

test: setup
	$(BIN)/python -m pytest

# jupyter_server_config.py saves notebooks output-free (JupyterLab's autosave keeps the .ipynb twins clean). As root
# (containers) JupyterLab needs --allow-root; it is added then.
lab: setup
	$(BIN)/jupyter lab --config=jupyter_server_config.py $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

# The committed figures and tables of data/figures/ (and data/figures/digits16/): notebook 04 on each model with
# pinned settings (one torch thread, seed 0, the sample counts below). Notebooks run by hand write to the ignored
# runs/ instead. Timings: only the `seconds` and `wall_ratio` columns of ablations.* (and of speed_quality.* when no
# sweep is given) are measured here, on the machine that runs this; FLOPs ratios, PSNR, accuracy and every figure
# are machine-independent.
FIGURE_SETTINGS = --set SEED=0 --set LIVE_SAMPLES=4 --set ABLATION_SAMPLES=10 --set 'REFRESH_INTERVALS=(3, 5, 9, 16)'
figures: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m analysis.run_notebook \
	    notebooks/04_paper_figures.py $(FIGURE_SETTINGS) --set FIGURES='"../data/figures"'
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m analysis.run_notebook \
	    notebooks/04_paper_figures.py $(FIGURE_SETTINGS) --set MODEL='"digits16"' \
	    --set STATS='"../data/stats/digits16.zarr"' --set SWEEP='"../data/sweeps/digits16_heldout_seed7.csv"' \
	    --set FIGURES='"../data/figures/digits16"'
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m analysis.run_notebook \
	    notebooks/05_beyond_the_paper.py --set FIGURES='"../data/figures/beyond"'
	@echo "data/figures: timings (seconds, wall_ratio of ablations.*) were measured on this machine, one thread"

# After editing a notebook's .py source (the .ipynb twins follow; see notebooks/jupytext.toml).
notebooks: setup
	$(BIN)/jupytext --sync notebooks/0*.py

clean:
	rm -rf $(VENV) .pytest_cache runs
