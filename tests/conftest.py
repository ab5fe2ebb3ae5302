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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (modules opt in with ``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): tiny matrices run several times faster on one thread than on contended intra-op threads of a
    shared CPU, and some tests compare against a run made on one thread bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def git_status() -> "str | None":
    """``git status --porcelain`` of the checkout (None outside a git checkout or without git)."""
    import subprocess
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


_STATUS_AT_START: dict = {}


def pytest_sessionstart(session):
    _STATUS_AT_START["status"] = git_status()


@pytest.fixture(scope="session")
def git_status_at_start() -> "str | None":
    """The checkout's status before any test ran (tests/test_zz_clean_checkout.py compares against it)."""
    return _STATUS_AT_START.get("status")
