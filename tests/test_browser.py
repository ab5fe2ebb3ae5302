"""A real browser runs a widget notebook, moves a slider and sees the summary change.

Voila serves the repository on localhost and executes the notebook on page load; headless Debian Chromium,
driven by Playwright, presses an arrow key on the slider handle and waits for the summary text to differ.
Outside CI the test skips when the browser stack is missing; under CI=true (where .ci/run installs it) it fails.
"""

import os
import time
from pathlib import Path

import pytest

from browser.harness import NotebookPage, VoilaServer, WidgetTarget, launch_chromium, missing_requirements

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.browser

# Each target: a notebook (relative to the repository root), the slider to move by its description, the summary.
TARGETS = [
    WidgetTarget("tests/browser/slider_fixture.ipynb", slider="tau_token", summary=".lazymar-summary"),
    WidgetTarget("notebooks/03_cache_schedules.ipynb", slider="tau_token", summary=".lazymar-summary",
                 load_timeout_s=120),
]


@pytest.fixture(scope="module")
def browser_stack():
    missing = missing_requirements()
    if missing:
        reason = "the browser test needs " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; under CI=true .ci/run must install it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def voila_server(browser_stack, tmp_path_factory):
    with VoilaServer(REPO, tmp_path_factory.mktemp("voila") / "voila.log") as server:
        yield server


@pytest.fixture(scope="module")
def chromium(browser_stack):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.mark.parametrize("target", TARGETS, ids=lambda target: Path(target.notebook).stem)
def test_moving_the_slider_changes_the_summary(target, voila_server, chromium, tmp_path):
    from playwright.sync_api import expect

    notebook = NotebookPage(chromium, voila_server, target, shot_dir=tmp_path)
    try:
        notebook.open()
        try:  # the page renders once the notebook has executed
            expect(notebook.summary).to_have_count(1, timeout=target.load_timeout_s * 1000)
            expect(notebook.summary).not_to_have_text("", timeout=5000)
            expect(notebook.slider).to_have_count(1, timeout=5000)
        except AssertionError as error:
            raise AssertionError(notebook.report(
                f"the notebook did not render one summary {target.summary!r} and one slider {target.slider!r}: "
                f"{error}", "loaded")) from None
        notebook.screenshot("loaded")
        before, position, value_before = (notebook.summary.inner_text().strip(), notebook.slider_position(),
                                          notebook.slider_readout())

        notebook.move_slider()
        try:
            expect(notebook.slider_origin).not_to_have_attribute("style", position, timeout=5000)
        except AssertionError:
            raise AssertionError(notebook.report(
                f"the slider {target.slider!r} stayed at {value_before} after {target.presses} x {target.key}",
                "moved")) from None
        value_after = notebook.slider_readout()
        # poll the text itself: to_have_text normalises whitespace, so a multi-line summary never "equals" before
        deadline, after = time.monotonic() + target.update_timeout_s, before
        while after == before and time.monotonic() < deadline:
            notebook.page.wait_for_timeout(200)
            after = notebook.summary.inner_text().strip()
        if not after or after == before:
            raise AssertionError(notebook.report(
                f"the summary stayed {before!r} after moving {target.slider!r} from {value_before} to {value_after}",
                "moved"))
        shot = notebook.screenshot("moved")
        assert after and after != before, f"summary {before!r} -> {after!r}; screenshot: {shot}"
    finally:
        notebook.close()
