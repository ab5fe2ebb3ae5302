"""Bootstrap intervals (lazymar.stats): exact agreement with the plain metrics, stratified and seeded resampling,
coverage of a known true difference for a mean metric and for FID, narrowing with n, and the verdict rule."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lazymar import stats
from lazymar.metrics import frechet_distance, psnr


def test_resample_counts_are_stratified_and_seeded():
    strata = np.array([7] * 5 + [8] * 3 + [9] * 4)
    counts = stats.resample_counts(strata, 200, seed=3)
    assert counts.shape == (200, 12)
    for value, size in ((7, 5), (8, 3), (9, 4)):
        assert (counts[:, strata == value].sum(axis=1) == size).all()  # each seed keeps its share
    assert np.array_equal(counts, stats.resample_counts(strata, 200, seed=3))
    assert not np.array_equal(counts, stats.resample_counts(strata, 200, seed=4))
    with pytest.raises(ValueError, match="resamples"):
        stats.resample_counts(strata, 0)


def test_point_values_equal_the_plain_metrics():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-1, 1, (40, 1, 8, 8)), rng.uniform(-1, 1, (40, 1, 8, 8))
    sq_err = ((a - b) ** 2).reshape(40, -1).mean(1)
    assert stats.psnr_of_errors(sq_err, np.ones((1, 40)))[0] == pytest.approx(psnr(a, b), rel=1e-12)
    features = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    real_features = rng.normal(size=(80, 6))
    mu, sigma = real_features.mean(0), np.cov(real_features, rowvar=False)
    real = stats.RealStatistics.of(mu, sigma)
    expected = frechet_distance(features.mean(0), np.cov(features, rowvar=False), mu, sigma)
    assert stats.fid_of_features(features, real, np.ones((1, 50)))[0] == pytest.approx(expected, rel=1e-8)
    counts = stats.resample_counts(np.zeros(50), 3, seed=1)  # a resample = the rows drawn that many times
    rows = np.repeat(np.arange(50), counts[1])
    direct = frechet_distance(features[rows].mean(0), np.cov(features[rows], rowvar=False), mu, sigma)
    assert stats.fid_of_features(features, real, counts)[1] == pytest.approx(direct, rel=1e-8)


def test_mean_difference_intervals_cover_the_true_difference():
    """Paired samples with a true mean difference of 0.1: the 95 % interval covers it in 90-99 % of 200 trials."""
    rng = np.random.default_rng(1)
    covered = 0
    metric = stats.Metric("m", lambda a, w: stats.weighted_mean(a["x"], w), True, 0.0, needs="x")
    for trial in range(200):
        base = rng.normal(0.0, 1.0, 120)
        cand = base + 0.1 + rng.normal(0.0, 0.5, 120)  # correlated with the baseline: paired
        out = stats.compare({"b": {"x": base}, "c": {"x": cand}}, np.zeros(120), [metric], baseline="b",
                            resamples=400, seed=trial)
        covered += out["c"]["d_m_ci_low"] <= 0.1 <= out["c"]["d_m_ci_high"]
    assert 180 <= covered <= 198


def _gaussian_fid_setup(dim: int = 4):
    rng = np.random.default_rng(5)
    mix = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim))
    sigma_g = mix @ mix.T
    mu_g = np.zeros(dim)
    mu_r, sigma_r = np.full(dim, 0.6), np.eye(dim) * 1.3
    return rng, mix, mu_g, sigma_g, stats.RealStatistics.of(mu_r, sigma_r)


def test_fid_intervals_cover_the_population_value_and_difference():
    """Gaussian features, fixed real statistics: the population FID (closed form) and the population difference
    of a paired candidate (the base plus independent noise of variance 0.25) are covered in 90-99 % of 200 trials.
    (In 4 dimensions at n = 200 the finite-n bias of the FID level is small next to its spread; the difference's
    interval removes its bias.)"""
    rng, mix, mu_g, sigma_g, real = _gaussian_fid_setup()
    dim, n, noise = len(mu_g), 200, 0.5
    true_base = frechet_distance(mu_g, sigma_g, real.mu, real.sigma)
    true_cand = frechet_distance(mu_g, sigma_g + noise ** 2 * np.eye(dim), real.mu, real.sigma)
    metric = stats.standard_metrics(real=real)[2]
    hit_level = hit_diff = 0
    for trial in range(200):
        base = rng.normal(size=(n, dim)) @ mix.T
        cand = base + noise * rng.normal(size=(n, dim))
        out = stats.compare({"b": {"features": base}, "c": {"features": cand}}, np.zeros(n), [metric],
                            baseline="b", resamples=300, seed=trial)
        hit_level += out["b"]["fid_ci_low"] <= true_base <= out["b"]["fid_ci_high"]
        hit_diff += out["c"]["d_fid_ci_low"] <= true_cand - true_base <= out["c"]["d_fid_ci_high"]
    assert 180 <= hit_level <= 198
    assert 180 <= hit_diff <= 198


def test_intervals_narrow_like_one_over_sqrt_n():
    rng, mix, _, _, real = _gaussian_fid_setup()
    metrics = [stats.Metric("m", lambda a, w: stats.weighted_mean(a["x"], w), True, 0.0, needs="x"),
               stats.standard_metrics(real=real)[2]]
    widths = {}
    for n in (60, 240):
        w_mean, w_fid = [], []
        for trial in range(20):
            arrays = {"r": {"x": rng.normal(size=n), "features": rng.normal(size=(n, 4)) @ mix.T}}
            out = stats.compare(arrays, np.zeros(n), metrics, resamples=300, seed=trial)["r"]
            w_mean.append(out["m_ci_high"] - out["m_ci_low"])
            w_fid.append(out["fid_ci_high"] - out["fid_ci_low"])
        widths[n] = (np.mean(w_mean), np.mean(w_fid))
    for k in range(2):
        assert widths[60][k] / widths[240][k] == pytest.approx(2.0, rel=0.2)  # sqrt(240 / 60)


@pytest.mark.parametrize("low,high,higher,expected", [
    (0.1, 0.4, True, "better"), (-0.3, 0.2, True, "no worse"), (-0.9, -0.6, True, "worse"),
    (-0.7, 0.1, True, "inconclusive"), (-0.4, -0.1, False, "better"), (0.2, 0.4, False, "no worse"),
    (0.6, 0.9, False, "worse"), (math.nan, math.nan, True, "inconclusive")])
def test_verdict_rule(low, high, higher, expected):
    assert stats.verdict(low, high, 0.5, higher) == expected


def test_overall_verdict_and_baseline_rows():
    assert stats.overall_verdict(["better", "better"]) == "better"
    assert stats.overall_verdict(["better", "no worse"]) == "no worse"
    assert stats.overall_verdict(["better", "inconclusive"]) == "inconclusive"
    assert stats.overall_verdict(["no worse", "worse", "inconclusive"]) == "worse"
    sq = {"none": np.zeros(30), "a": np.full(30, 1e-3), "b": np.full(30, 4e-3)}
    arrays = {k: {"sq_err": v, "correct": np.ones(30)} for k, v in sq.items()}
    out = stats.compare(arrays, np.zeros(30), stats.standard_metrics(), baseline="a", resamples=50)
    assert out["a"]["verdict"] == "baseline" and out["a"]["d_psnr"] == 0.0
    assert math.isinf(out["none"]["psnr"]) and out["none"]["verdict_psnr"] == "better"
    assert out["b"]["d_psnr"] == pytest.approx(-10 * math.log10(4)) and out["b"]["verdict"] == "worse"
    assert out["b"]["verdict_accuracy"] == "no worse"  # equal accuracy: difference 0, inside the margin
    none_base = stats.compare(arrays, np.zeros(30), stats.standard_metrics(), baseline="none", resamples=50)
    assert math.isnan(none_base["a"]["d_psnr"]) and "verdict_psnr" not in none_base["a"]


def test_sweep_table_pools_seeds_with_intervals_and_verdicts():
    """lazymar.runs.intervals.annotate_table: per-seed rows averaged, metrics of the pooled samples, per-seed
    columns, interval columns around the values, differences against the baseline row with verdicts."""
    import pandas as pd
    from lazymar.runs.intervals import IntervalOptions, annotate_table, verdict_markdown
    from lazymar.sweep import front_markdown
    rng = np.random.default_rng(2)
    frames, arrays = {}, {}
    for seed in (7, 8):
        errors = {"none": np.zeros(50), "lazymar": rng.uniform(1e-3, 3e-3, 50)}
        errors["fast"] = errors["lazymar"] * 0.5  # 3 dB better on the same samples
        correct = (rng.uniform(size=50) < 0.9).astype(float)
        arrays[seed] = {k: {"sq_err": v, "correct": correct, "features": None} for k, v in errors.items()}
        frames[seed] = pd.DataFrame({
            "name": list(errors), "family": ["none", "lazymar", "derived"],
            "flops_ratio": [1.0, 2.5 + seed / 100, 4.0], "psnr": [stats.psnr_of_errors(v, np.ones((1, 50)))[0]
                                                                 for v in errors.values()],
            "accuracy": [correct.mean()] * 3, "num_samples": [50] * 3})
    df = annotate_table(frames, arrays, IntervalOptions(resamples=200), baseline="lazymar").set_index("name")
    pooled = np.concatenate([arrays[s]["lazymar"]["sq_err"] for s in (7, 8)])
    assert df.at["lazymar", "psnr"] == pytest.approx(10 * math.log10(4 / pooled.mean()))
    assert df.at["lazymar", "flops_ratio"] == pytest.approx(2.575) and df.at["fast", "num_samples"] == 100
    assert df.at["lazymar", "psnr_seed8"] == frames[8].set_index("name").at["lazymar", "psnr"]
    assert df.at["lazymar", "psnr_ci_low"] < df.at["lazymar", "psnr"] < df.at["lazymar", "psnr_ci_high"]
    assert df.at["fast", "d_psnr"] == pytest.approx(10 * math.log10(2))
    assert df.at["fast", "verdict_psnr"] == "better" and df.at["fast", "verdict_accuracy"] == "no worse"
    assert df.at["fast", "verdict"] == "no worse" and df.at["lazymar", "verdict"] == "baseline"
    assert df.at["none", "seeds"] == "7 8"
    table = front_markdown(df.reset_index(), ["name", "psnr"])
    assert f"{df.at['fast', 'psnr']:.2f} [{df.at['fast', 'psnr_ci_low']:.2f}, " in table
    assert "| fast | 3.01 [" in verdict_markdown(df.reset_index(), "lazymar", IntervalOptions())


def test_fid_of_one_sample_is_undefined_not_an_error():
    """One sample has no covariance: the bootstrap FID is NaN (as DigitsQuality's point FID), never a LinAlgError."""
    real = stats.RealStatistics.of(np.zeros(3), np.eye(3))
    assert np.isnan(stats.fid_of_features(np.ones((1, 3)), real, np.ones((4, 1)))).all()


def test_fid_resampling_in_blocks_equals_it_in_one_piece():
    """A small memory budget splits weightings and samples into blocks (Inception-sized features at 50,000
    samples stay within it) without changing the result."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 6))
    real = stats.RealStatistics.of(rng.normal(size=6), np.cov(rng.normal(size=(6, 30))))
    counts = stats.resample_counts(np.zeros(40), 7, seed=1)
    whole = stats.fid_of_features(features, real, counts)
    blocked = stats.fid_of_features(features, real, counts, budget_bytes=3 * 8 * 36 * 2)  # 2 weightings, 9 rows
    np.testing.assert_allclose(blocked, whole, rtol=1e-12)
