"""A real browser runs the widget notebooks in Voila and in JupyterLab 4 (widget comms over kernel subshells, as
JupyterLab 4.6 with ipykernel 7 does by default): a moved slider changes the summary; Measure runs in the
background while a slider moves; the sample grid the browser shows has the expected number of drawn cells.

Headless Debian Chromium, driven by Playwright, presses keys and buttons. The grid is checked in pixels (a
screenshot of the element, tests/browser/pixels.py), and a deliberately blank grid (the fixture's ``?broken=1``)
is shown to fail that check. Outside CI the browser tests skip when the browser stack is missing; under CI=true
(where .ci/run installs it) they fail. ``LAZYMAR_BROWSER_TIMINGS=FILE`` appends each measured slider latency to
FILE (one JSON line per run), for reports.
"""

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from browser.harness import (JupyterLabServer, NotebookPage, VoilaServer, WidgetTarget, launch_chromium,
                             missing_requirements)
from browser.pixels import check_sample_grid, sample_cells

REPO = Path(__file__).resolve().parents[1]
SERVERS = {"voila": VoilaServer, "jupyterlab": JupyterLabServer}

# Each target: a notebook (relative to the repository root), the slider to move by its description, the summary.
SLIDER_FIXTURE = WidgetTarget("tests/browser/slider_fixture.ipynb", slider="tau_token", summary=".lazymar-summary",
                              load_timeout_s=120)
NOTEBOOK_03 = WidgetTarget("notebooks/03_cache_schedules.ipynb", slider="tau_token", summary=".lazymar-summary",
                           load_timeout_s=180)
EXPLORER = WidgetTarget("tests/browser/explorer_fixture.ipynb", slider="tau_token", summary=".lazymar-summary",
                        load_timeout_s=180)
CHECK_SAMPLES = 2  # the explorer fixture's; its first check draws uncached, derived and lazymar rows
GRID_CELLS = 3 * CHECK_SAMPLES
MEASURE_TIMEOUT_S = 600  # a check of 3 x 2 samples on a loaded 2-core CPU, model loading included
MOVE_AFTER_S = 5.0  # the slider moves this long into the measurement


@pytest.fixture(scope="module")
def browser_stack():
    missing = missing_requirements()
    if missing:
        reason = "the browser test needs " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; under CI=true .ci/run must install it", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request, browser_stack, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    with SERVERS[request.param](REPO, folder / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def voila(browser_stack, tmp_path_factory):
    with VoilaServer(REPO, tmp_path_factory.mktemp("voila-only") / "server.log") as running:
        yield running


@pytest.fixture(scope="module")
def chromium(browser_stack):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


def _open_rendered(notebook: NotebookPage, query: str = "") -> None:
    from playwright.sync_api import expect
    target = notebook.target
    notebook.open(query)
    try:  # the page renders once the notebook has executed
        expect(notebook.summary).to_have_count(1, timeout=target.load_timeout_s * 1000)
        expect(notebook.summary).not_to_have_text("", timeout=10000)
        expect(notebook.slider).to_have_count(1, timeout=10000)
    except AssertionError as error:
        raise AssertionError(notebook.report(
            f"the notebook did not render one summary {target.summary!r} and one slider {target.slider!r}: "
            f"{error}", "loaded")) from None
    notebook.screenshot("loaded")


def _wait_for_new_summary(notebook: NotebookPage, before: str, timeout_s: float) -> tuple[str, float]:
    """(the summary's text once it differs from ``before``, seconds it took); polls the text itself, because
    to_have_text normalises whitespace, so a multi-line summary never "equals" before."""
    start = time.monotonic()
    after = before
    while after == before and time.monotonic() - start < timeout_s:
        notebook.page.wait_for_timeout(50)
        after = notebook.summary.inner_text().strip()
    return after, time.monotonic() - start


def _move_and_check(notebook: NotebookPage) -> tuple[str, str, float]:
    """Move the slider one step; (summary before, summary after, seconds until it changed)."""
    from playwright.sync_api import expect
    target = notebook.target
    before, position, value_before = (notebook.summary.inner_text().strip(), notebook.slider_position(),
                                      notebook.slider_readout())
    notebook.move_slider()
    try:
        expect(notebook.slider_origin).not_to_have_attribute("style", position, timeout=5000)
    except AssertionError:
        raise AssertionError(notebook.report(
            f"the slider {target.slider!r} stayed at {value_before} after {target.presses} x {target.key}",
            "moved")) from None
    after, seconds = _wait_for_new_summary(notebook, before, target.update_timeout_s)
    if not after or after == before:
        raise AssertionError(notebook.report(
            f"the summary stayed {before!r} after moving {target.slider!r} from {value_before} to "
            f"{notebook.slider_readout()}", "moved"))
    return before, after, seconds


@pytest.mark.browser
@pytest.mark.parametrize("target", [SLIDER_FIXTURE], ids=lambda target: Path(target.notebook).stem)
def test_moving_the_slider_changes_the_summary(target, server, chromium, tmp_path):
    notebook = NotebookPage(chromium, server, target, shot_dir=tmp_path)
    try:
        _open_rendered(notebook)
        before, after, _ = _move_and_check(notebook)
        assert after != before
    finally:
        notebook.close()


@pytest.mark.browser
def test_notebook_03_slider_changes_the_summary_in_voila(voila, chromium, tmp_path):
    notebook = NotebookPage(chromium, voila, NOTEBOOK_03, shot_dir=tmp_path)
    try:
        _open_rendered(notebook)
        before, after, _ = _move_and_check(notebook)
        assert after != before
    finally:
        notebook.close()


def _measure(notebook: NotebookPage, move_slider: bool = True) -> dict:
    """Press Measure; optionally move the slider MOVE_AFTER_S into the measurement; wait for its end.
    Returns what happened: the schedule measured, the summaries, the latency and the grid's PNG."""
    from playwright.sync_api import expect
    page = notebook.page
    status, cancel = page.locator(".lazymar-status"), page.locator(".widget-button", has_text="Cancel")
    summary_before = notebook.summary.inner_text().strip()
    measured_name = re.search(r"(derived-[^\s:]+):", summary_before).group(1)
    page.locator(".widget-button", has_text=f"Measure on {CHECK_SAMPLES} samples").click()
    clicked = time.monotonic()
    happened = {"measured": measured_name}
    try:
        expect(status).to_contain_text("MAR steps", timeout=MEASURE_TIMEOUT_S * 1000)  # running, with an estimate
        assert "about" in status.inner_text() and "s left" in status.inner_text()
        expect(cancel).to_be_enabled()
    except AssertionError as error:
        raise AssertionError(notebook.report(f"the measurement did not show its progress: {error}", "measuring"))
    if move_slider:
        page.wait_for_timeout(max(0.0, MOVE_AFTER_S - (time.monotonic() - clicked)) * 1000)
        running_at_move = cancel.is_enabled()
        happened["moved_at_s"] = time.monotonic() - clicked
        before, after, latency = _move_and_check(notebook)
        happened.update(summary_after=after, latency_s=latency, still_running=running_at_move and cancel.is_enabled(),
                        progress_at_move=status.inner_text())
        notebook.screenshot("moved_during_measurement")
    try:
        expect(status).to_contain_text("measured", timeout=MEASURE_TIMEOUT_S * 1000)
        expect(cancel).to_be_disabled(timeout=10000)
        samples = page.locator(".lazymar-samples")
        expect(samples).to_be_visible(timeout=10000)
        samples.scroll_into_view_if_needed()
    except AssertionError as error:
        raise AssertionError(notebook.report(f"the measurement did not finish: {error}", "measured"))
    happened["grid_png"] = samples.screenshot()
    happened["results"] = page.locator(".lazymar-results").inner_text()
    happened["seconds"] = time.monotonic() - clicked
    notebook.screenshot("measured")
    return happened


@pytest.mark.browser
def test_measure_runs_in_the_background_and_draws_the_grid(server, chromium, tmp_path):
    """Measure keeps the sliders live (the summary follows a slider moved 5 s into the measurement, while it
    still runs); the result table names the schedule measured (the one shown when Measure was pressed) with its
    thresholds; the grid the browser shows has 3 rows x 2 drawn digit cells."""
    notebook = NotebookPage(chromium, server, EXPLORER, shot_dir=tmp_path)
    try:
        _open_rendered(notebook)
        happened = _measure(notebook)
        timings = os.environ.get("LAZYMAR_BROWSER_TIMINGS")
        if timings:
            with open(timings, "a") as log:
                threads = notebook.page.locator(".lazymar-callback-thread").inner_text().strip()
                log.write(json.dumps({"server": server.name, "threads": threads, **{k: v for k, v in happened.items()
                                                                if k in ("latency_s", "moved_at_s", "seconds",
                                                                         "still_running")}}) + "\n")
        assert happened["still_running"], (
            f"the measurement ended before the slider's summary updated ({happened['seconds']:.0f} s in all); "
            f"progress then: {happened['progress_at_move']!r}")
        assert happened["measured"] not in happened["summary_after"], "the summary did not move on"
        assert happened["measured"] in happened["results"] and "tau_token=" in happened["results"], (
            f"the result table does not name the measured schedule {happened['measured']}:\n{happened['results']}")
        try:
            check_sample_grid(happened["grid_png"], GRID_CELLS)
        except AssertionError as error:
            raise AssertionError(notebook.report(str(error), "grid")) from None
        threads = notebook.page.locator(".lazymar-callback-thread").inner_text().strip()
        print(f"{server.name}: {threads}")
        if isinstance(server, JupyterLabServer):  # JupyterLab opened kernel subshells (threads) for widget comms
            assert "subshell-" in threads, f"no subshell in the kernel: {threads}"
    finally:
        notebook.close()


@pytest.mark.browser
def test_a_blank_grid_fails_the_pixel_check(voila, chromium, tmp_path):
    """The fixture's deliberately broken drawing (an empty figure) reaches the browser and the same pixel check
    used above rejects it."""
    notebook = NotebookPage(chromium, voila, EXPLORER, shot_dir=tmp_path)
    try:
        _open_rendered(notebook, query="broken=1")
        png = _measure(notebook, move_slider=False)["grid_png"]
        assert sample_cells(png) == []
        with pytest.raises(AssertionError, match="shows 0 framed cells"):
            check_sample_grid(png, GRID_CELLS)
    finally:
        notebook.close()


# --- the pixel check itself, without a browser ---------------------------------------------------------------
def _digits(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = -np.ones((n, 1, 8, 8))
    images[:, :, 2:6, 3:5] = rng.uniform(0.5, 1.0, size=(n, 1, 4, 2))  # a stroke
    return images


def test_pixel_check_counts_drawn_cells():
    from analysis import figures, schedule_plots
    png = figures.figure_png(schedule_plots.plot_sample_comparison({"uncached": _digits(4), "derived": _digits(4, 1),
                                                         "lazymar": _digits(4, 2)}, labels=[0, 1, 2, 3]))
    cells = check_sample_grid(png, 12)
    assert len({c.top for c in cells}) == 3  # three rows, four cells each
    with pytest.raises(AssertionError, match="expected 9"):
        check_sample_grid(png, 9)


def test_pixel_check_rejects_blank_and_partial_grids():
    from matplotlib.figure import Figure

    from analysis import figures, schedule_plots
    assert sample_cells(figures.figure_png(Figure(figsize=(8, 4)))) == []
    images = _digits(4)
    images[2] = -1.0  # one sample drawn empty (white)
    png = figures.figure_png(schedule_plots.plot_sample_comparison({"uncached": images}, labels=[0, 1, 2, 3]))
    with pytest.raises(AssertionError, match=r"blank cells: \[2\]"):
        check_sample_grid(png, 4)
