"""The schedule explorer of notebook 03 (analysis.explorer) without a browser: the summary bolds the slider that
moved; a measured check runs in a background thread, measures the schedule shown when it started even if a
slider moves meanwhile, keeps earlier rows and can be cancelled; "Save schedule" writes what `lazymar derive`
writes, refuses to overwrite unless told, and the saved file runs in `lazymar bench --schedule PATH` unchanged.
(tests/test_browser.py drives the same widget in a real browser.)"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from builders import tiny_mar
from lazymar.recording import RedundancyRecorder
from lazymar.sampling import SamplingSettings, generate
from lazymar.schedules import RedundancyProfile

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_mar(img_size=64, num_sampling_steps="5", randomise="head", std=0.1)


@pytest.fixture(scope="module")
def tiny_profile(tiny) -> RedundancyProfile:
    with RedundancyRecorder(tiny, model_name="tiny") as recorder:
        generate(tiny, [0, 1, 2, 3], SamplingSettings(num_iter=6, cfg=2.0), seed=0)
    return RedundancyProfile.from_stats(recorder.to_dataset())


def _explorer(profile, model=None, **kwargs):
    from analysis.explorer import ScheduleExplorer
    return ScheduleExplorer(profile, model_loader=(lambda: model) if model is not None else None, check_samples=2,
                            **kwargs)


def test_the_summary_bolds_the_slider_that_moved(tiny_profile):
    explorer = _explorer(tiny_profile)
    assert "<b>tau_" not in explorer.summary.value.split("<br>")[0]  # nothing moved yet
    explorer.tau_refresh.value = explorer.tau_refresh.value - 1.0
    head = explorer.summary.value.split("<br>")[0]
    assert f"<b>tau_refresh = {explorer.tau_refresh.value:g}</b>" in head and "<b>tau_token" not in head
    explorer.tau_head.value = 0.5
    head = explorer.summary.value.split("<br>")[0]
    assert "<b>tau_head = 0.5</b>" in head and "<b>tau_refresh" not in head
    assert explorer.heatmap.value[:8] == b"\x89PNG\r\n\x1a\n" and explorer.tradeoff.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_check_measures_the_schedule_it_started_with_and_keeps_earlier_rows(tiny_profile, tiny):
    from analysis import explorer as explorer_module
    explorer = _explorer(tiny_profile, tiny)
    first = explorer.derived.schedule.name
    release = threading.Event()
    started = threading.Event()

    class Gate(explorer_module._StepCounter):  # hold the measurement at its first step until the slider moved
        def on_step_start(self, ctx):
            started.set()
            release.wait(60)
            super().on_step_start(ctx)

    original = explorer_module._StepCounter
    explorer_module._StepCounter = Gate
    try:
        worker = explorer.start_check()
        assert worker is not None and started.wait(60) and explorer.measuring
        assert explorer.start_check() is None  # one check at a time
        explorer.tau_refresh.value = explorer.tau_refresh.value - 2.0  # the sliders stay live meanwhile
        moved = explorer.derived.schedule.name
        assert moved != first and moved in explorer.summary.value
        release.set()
        worker.join(120)
    finally:
        explorer_module._StepCounter = original
    assert explorer.error is None and not explorer.measuring
    table = explorer.history_table()
    assert list(table["schedule"]) == ["none", "lazymar", first]  # the schedule shown when Measure was pressed
    assert "tau_token=" in table.iloc[-1]["parameters"] and table.iloc[-1]["flops_ratio"] > 1.0
    assert explorer.progress.value == 1.0 and "measured" in explorer.status.value
    explorer.run_check(timeout=120)  # a second check adds its row and keeps the others
    table = explorer.history_table()
    assert list(table["schedule"]) == ["none", "lazymar", first, moved] and list(table["check"]) == [1, 1, 1, 2]
    assert first in explorer.results.value and moved in explorer.results.value


def test_a_check_can_be_cancelled(tiny_profile, tiny):
    from analysis import explorer as explorer_module
    explorer = _explorer(tiny_profile, tiny)
    started = threading.Event()

    class Started(explorer_module._StepCounter):
        def on_step_start(self, ctx):
            started.set()
            explorer.cancel()  # pressed during the first step
            super().on_step_start(ctx)

    original = explorer_module._StepCounter
    explorer_module._StepCounter = Started
    try:
        assert explorer.run_check(timeout=120) is None
    finally:
        explorer_module._StepCounter = original
    assert started.is_set() and "cancelled" in explorer.status.value and explorer.history == []
    assert not explorer.button.disabled and explorer.cancel_button.disabled


def test_saved_schedule_is_what_derive_writes_and_is_not_overwritten(tmp_path):
    from lazymar.cache.schedule_file import CacheSchedule
    profile = RedundancyProfile.from_stats(REPO / "data" / "stats" / "digits.nc")
    explorer = _explorer(profile, save_path=tmp_path / "tuned.json")
    explorer.tau_refresh.value = 12.0
    explorer._on_save(None)
    path, report = tmp_path / "tuned.json", tmp_path / "tuned.md"
    assert "saved" in explorer.save_status.value and path.is_file() and report.is_file()
    assert CacheSchedule.from_dict(json.loads(path.read_text())) == explorer.derived.schedule
    assert report.read_text().startswith(f"# Derived cache schedule `{explorer.derived.schedule.name}`")
    assert "thresholds:" in report.read_text() and "selection-layer study" in report.read_text()
    saved = path.read_text()
    explorer.tau_refresh.value = 16.0
    explorer._on_save(None)  # exists: refused without the confirmation
    assert "not saved" in explorer.save_status.value and "overwrite" in explorer.save_status.value
    assert path.read_text() == saved
    explorer.overwrite.value = True
    explorer._on_save(None)
    assert "saved" in explorer.save_status.value and path.read_text() != saved
    assert not explorer.overwrite.value  # the confirmation is for one save


def test_a_schedule_saved_from_the_explorer_runs_in_bench_unchanged(tmp_path):
    profile = RedundancyProfile.from_stats(REPO / "data" / "stats" / "digits.nc")
    explorer = _explorer(profile)
    path, _ = explorer.save_schedule(tmp_path / "explorer.json")
    run = subprocess.run([sys.executable, "-m", "lazymar.cli", "bench", "--model", "digits", "--schedule", str(path),
                          "--num-samples", "1", "--repeats", "1", "--threads", "1", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["schedule"] == str(path) and out["model"] == "digits"
    assert out["flops_ratio"] > 1.0 and out["psnr"] > 0  # the cache ran, against the uncached run
