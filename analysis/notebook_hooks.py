"""Keep the stored ``.ipynb`` twins output-free when JupyterLab saves them (``make lab`` loads
``jupyter_server_config.py``, which installs :func:`pre_save_hook`). JupyterLab autosaves every two minutes, and a
notebook that has run would otherwise write its outputs, execution counts and widget state into the checkout."""
from __future__ import annotations

from typing import Any

STORED_METADATA = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}


def clean_notebook(nb: Any) -> Any:
    """The notebook (an nbformat node or its dict, changed in place) as the workbook stores it: no outputs, no
    execution counts, cell metadata reduced to tags, notebook metadata reduced to the kernel's name."""
    for cell in nb["cells"]:
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        tags = cell.get("metadata", {}).get("tags")
        cell["metadata"] = {"tags": tags} if tags else {}
    nb["metadata"] = {key: dict(value) for key, value in STORED_METADATA.items()}
    return nb


def pre_save_hook(model: dict, path: str, **_: Any) -> None:
    """jupyter_server's ``ContentsManager.pre_save_hook``: every notebook is saved clean (the paired ``.py``
    is text and carries no outputs anyway)."""
    if model.get("type") == "notebook" and model.get("content") is not None:
        clean_notebook(model["content"])
