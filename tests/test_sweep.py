"""The trade-off sweep: the Pareto front of a hand table, CSV round trip and errors, the baselines' schedules, and
a tiny end-to-end sweep whose exact points reproduce the reference."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lazymar.schedules import predicted_flops
from lazymar.sweep import (COLUMNS, SweepError, SweepPoint, fewer_steps_point, fixed_interval_point,
                            load_sweep, mark_pareto, pareto_front, random_point, run_sweep, save_sweep)
from lazymar import get_config
from lazymar.cache.schedule_file import HeadCachePolicy, exact_schedule, load_schedule
from lazymar.runs import Reference, SamplePlan
from lazymar.sampling import SamplingSettings
from builders import tiny_mar, tiny_vae


def hand_table() -> pd.DataFrame:
    return pd.DataFrame({
        "name": ["none", "a", "b", "c", "d", "e", "f"],
        "flops_ratio": [1.0, 2.0, 2.0, 3.0, 2.5, 4.0, 3.0],
        "psnr": [math.inf, 30.0, 32.0, 28.0, 27.0, 20.0, 28.0],
    })


def test_pareto_front_of_a_hand_table():
    front = pareto_front(hand_table())
    # a is beaten by b (same ratio, higher PSNR), d by c (faster and better), f duplicates c (first one kept)
    assert front["name"].tolist() == ["none", "b", "c", "e"]
    marked = mark_pareto(hand_table())
    assert marked["pareto"].tolist() == [True, False, True, True, False, True, False]
    with pytest.raises(SweepError, match="no column 'fid'"):
        pareto_front(hand_table(), y="fid")


def test_pareto_front_skips_missing_values():
    df = hand_table()
    df.loc[1, "psnr"] = np.nan
    df.loc[2, "psnr"] = np.nan
    assert pareto_front(df)["name"].tolist() == ["none", "c", "e"]


def test_sweep_csv_round_trip_and_errors(tmp_path):
    df = hand_table()
    for col in COLUMNS:
        if col not in df:
            df[col] = "{}" if col in ("family", "params") else 0.5
    df = mark_pareto(df)
    path = save_sweep(df, tmp_path / "s.csv")
    back = load_sweep(path)
    assert back["name"].tolist() == df["name"].tolist()
    assert math.isinf(back["psnr"].iloc[0]) and back["pareto"].tolist() == df["pareto"].tolist()
    with pytest.raises(SweepError, match="sweep file not found"):
        load_sweep(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("name,psnr\na,1\n")
    with pytest.raises(SweepError, match="lacks the column"):
        load_sweep(tmp_path / "bad.csv")


def test_baseline_schedules():
    config, settings = get_config("digits"), SamplingSettings(num_iter=64, cfg=3.0)
    fixed = fixed_interval_point(64, 8).schedule
    fixed.validate_for(config, 64)
    assert [s for s in range(64) if fixed.refresh[s]] == list(range(0, 64, 8))
    assert fixed.selection == "status" and fixed.condition_cache[1] and not fixed.condition_cache[8]
    # fewer steps: the step count whose ratio is closest to the target, among all step counts
    point = fewer_steps_point(settings, config, 2.0)
    base = predicted_flops(exact_schedule(64), config)["total"]  # the fastest exact sampler: hoisted head

    def ratio(n):
        return base / predicted_flops(point.schedule.with_changes(
            num_iter=n, refresh=[True] * n, keep_fraction=[1.0] * n, condition_cache=[False] * n,
            head_cache=[True] * n), config)["total"]
    n = point.settings.num_iter
    assert point.schedule.num_iter == n and point.schedule.head == HeadCachePolicy(hoist_invariants=True)
    assert all(abs(ratio(n) - 2.0) <= abs(ratio(m) - 2.0) for m in range(1, 65))
    # random selection keeps the same fractions, so the same FLOPs
    lazymar = SweepPoint("lazymar", "lazymar", load_schedule("lazymar", 64, config))
    rnd = random_point(lazymar)
    assert rnd.schedule.selection == "random" and rnd.family == "random"
    assert predicted_flops(rnd.schedule, config)["total"] == predicted_flops(lazymar.schedule, config)["total"]


def test_tiny_sweep_end_to_end(one_thread):
    # random weights everywhere: the zero-initialised head would make caching exact
    model = tiny_mar(img_size=48, num_sampling_steps="4", randomise="head", std=0.1, token_std=0.5)
    settings = SamplingSettings(num_iter=4, cfg=2.0)
    vae = tiny_vae(seed=None)  # PSNR is taken on images: decode the latents
    reference = Reference(model, SamplePlan.of([0, 1, 2], seed=3, batch_size=2), settings, vae=vae)
    exact = SweepPoint("exact", "derived", exact_schedule(4))  # the reference's own sampler
    cached = SweepPoint("lazymar", "lazymar", load_schedule("lazymar", 4, model.config))
    df = run_sweep(reference, [exact, cached], quality=False, progress=False)
    assert list(df.columns[:len(COLUMNS)]) == list(COLUMNS)
    assert df["name"].tolist() == ["none", "exact", "lazymar"]
    row = df.set_index("name").loc["exact"]
    assert math.isinf(row["psnr"]) and row["token_mse"] == 0.0 and row["flops_ratio"] == 1.0
    cached_row = df.set_index("name").loc["lazymar"]
    assert cached_row["flops_ratio"] > 1.0 and 0 < cached_row["psnr"] < math.inf
    # the reference and the exact point tie at (1, inf): the first is on the front; lazymar is faster
    assert df["pareto"].tolist() == [True, False, True]


def test_sweep_cli_errors(tmp_path, capsys):
    from lazymar.cli import main
    assert main(["sweep", "--stats", str(tmp_path / "missing.nc"), "--no-defaults"]) == 2
    assert "recording not found" in capsys.readouterr().err
    (tmp_path / "out.csv").write_text("x\n")
    assert main(["sweep", "--out", str(tmp_path / "out.csv")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
