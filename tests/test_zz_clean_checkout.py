"""The test suite leaves the checkout as it found it (runs last: pytest collects files in name order)."""
import pytest

from conftest import git_status


def test_the_suite_changed_no_file_of_the_checkout(git_status_at_start):
    if git_status_at_start is None:
        pytest.skip("not a git checkout")
    assert git_status() == git_status_at_start, "tests wrote into the checkout (compare `git status`)"
