# Loaded by `make lab` (jupyter lab --config=jupyter_server_config.py): notebooks are saved output-free, so that
# JupyterLab's autosave keeps the committed .ipynb twins of notebooks/ clean (see analysis/notebook_hooks.py).
# Jupytext (installed with the notebooks extra) pairs them with their .py sources: notebooks/jupytext.toml.
from analysis.notebook_hooks import pre_save_hook

c = get_config()  # noqa: F821 - provided by the Jupyter config loader
c.ContentsManager.pre_save_hook = pre_save_hook
