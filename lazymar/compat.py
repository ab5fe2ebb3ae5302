"""The torch features lazymar needs beyond the oldest torch it allows, checked where they are used.

``pyproject.toml`` allows torch >= :data:`TORCH_FLOOR`: the weights-only loading of checkpoints and statistics
allowlists ``argparse.Namespace`` and numpy's reconstruction functions with the context manager
``torch.serialization.safe_globals``, given as (function, pickled name) pairs (both torch 2.6). An older torch gets
one line naming the version needed instead of a misleading "not a checkpoint".
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Sequence

import torch

from .errors import LazymarError

TORCH_FLOOR = "2.6"


class TorchVersionError(LazymarError):
    """The installed torch lacks an API lazymar uses; the message names the version needed."""


def safe_globals(allowed: Sequence[Any]) -> ContextManager[None]:
    """``torch.serialization.safe_globals(allowed)``, or TorchVersionError on a torch without it."""
    manager = getattr(torch.serialization, "safe_globals", None)
    if manager is None:
        raise TorchVersionError(f"loading checkpoints needs torch >= {TORCH_FLOOR} "
                                f"(torch.serialization.safe_globals); this is torch {torch.__version__}")
    return manager(list(allowed)) if allowed else contextlib.nullcontext()
