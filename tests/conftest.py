import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """The official-implementation fixtures: $LAZYMAR_REFERENCE_DIR or ../shared/reference beside the repo."""
    return Path(os.environ.get("LAZYMAR_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
