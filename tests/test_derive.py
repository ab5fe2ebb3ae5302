"""Derived cache schedules: hand-computable derivations on a synthetic recording, monotonicity, JSON round trips,
exact fast FLOPs, the selection-layer study on a perfect predictor, and the CLI's errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lazymar.schedules import (DerivationError, RedundancyProfile, derive_schedule, error_components, predicted_flops,
                               schedule_matrix, search_budget, selection_study)
from lazymar.schedules.levels import count_below as _count_below, levels as _levels
from lazymar.cache.engine import estimate_generation_flops
from lazymar.cache.schedule_file import CacheSchedule, HeadCachePolicy, exact_schedule, load_schedule
from lazymar.cli import main
from lazymar.config import MARConfig
from lazymar.recording import STATUS_CODES, save_stats
from lazymar.recording.dataset import CFG_STATS, FEATURE_KINDS, make_dataset

CONFIG = MARConfig(img_size=3, vae_stride=1, patch_size=1, vae_embed_dim=1, encoder_embed_dim=8, encoder_depth=1,
                   encoder_num_heads=2, decoder_embed_dim=8, decoder_depth=3, decoder_num_heads=2, buffer_size=2,
                   diffloss_d=2, diffloss_w=8, class_num=2, num_sampling_steps="6")
S, BUF, L, T = 6, 2, 9, 6
P = BUF + L
TOKEN_CHANGE = [np.nan, 0.005, 0.005, 0.01, 0.02, 0.01]      # calibrated: 0.5, 0.5, 1, 2, 1
RESIDUAL_ANGLE = [np.nan, 0.1, 0.2, 0.1, 0.3, 0.1]                # radians between r_t and r_{t-1}
HEAD_CHANGE = {"eps_cfg": 0.1, "res_block.0": 0.05, "res_block.1": 0.4}


def statuses(order: list[int]) -> np.ndarray:
    """(S, P) statuses when token order[k] is decoded at step k."""
    out = np.zeros((S, P), dtype=np.int8)
    for s in range(S):
        for k, t in enumerate(order):
            name = "known" if k < s - 1 else "new" if k == s - 1 else "to_predict" if k == s else "masked"
            out[s, BUF + t] = STATUS_CODES[name]
    return out


def synthetic(decoder_depth: int = 3, v_similarity=None, target=None, samples: int = 2, cfg_scale=None):
    """A hand-made recording: sample 0 decodes tokens 0..8 in order, sample 1 in reverse order."""
    orders = [list(range(L)), list(range(L))[::-1]] + [list(np.random.default_rng(i).permutation(L))
                                                        for i in range(samples - 2)]
    status = np.stack([statuses(o) for o in orders[:samples]])
    layers = ["encoder.0"] + [f"decoder.{i}" for i in range(decoder_depth)] + ["z"]
    cos = np.ones((samples, S, len(layers), len(FEATURE_KINDS), P), dtype=np.float32)
    cos[:, :, :, 0, :] = (1.0 - np.asarray(TOKEN_CHANGE))[None, :, None, None]
    if v_similarity is not None:
        for layer, values in v_similarity.items():
            cos[:, :, layers.index(f"decoder.{layer}"), FEATURE_KINDS.index("v"), :] = values
    if target is not None:
        cos[:, :, layers.index(f"decoder.{decoder_depth - 1}"), 0, :] = target
    cos[:, 0] = np.nan  # step 0 has no previous step
    cfg = {f"cfg_{name}": np.zeros((samples, S, len(layers), P), dtype=np.float32) for name in CFG_STATS}
    residual = np.ones((samples, S, len(layers), P), dtype=np.float32)
    unknown = (status == STATUS_CODES["to_predict"]) | (status == STATUS_CODES["masked"])
    angle = np.asarray(RESIDUAL_ANGLE)[None, :, None]
    residual[:, :, layers.index(f"decoder.{decoder_depth - 1}")] = np.where(unknown, np.cos(angle), -1.0)
    residual[:, 0] = np.nan
    cfg["cfg_residual_cosine"] = residual
    head = np.zeros((samples, S, T, len(HEAD_CHANGE)), dtype=np.float32)
    head[:] = np.asarray(list(HEAD_CHANGE.values()))
    head[:, :, 0] = np.nan
    variables = {"status": status, "token_cosine": cos, **cfg, "head_change": head,
                 "tokens": np.zeros((samples, L, 1), dtype=np.float32)}
    config = CONFIG if decoder_depth == 3 else MARConfig(**{**CONFIG.to_dict(), "decoder_depth": decoder_depth})
    attrs = {"model": "synthetic", "config": config.to_dict(), "num_iter": S, "cfg": 3.0, "temperature": 1.0,
             "cfg_schedule": "linear", "seed": 0, "schedule": "none"}
    return make_dataset(variables, np.arange(samples), np.zeros(samples), np.zeros(samples), np.linspace(1, 0, S),
                        np.full(S, 3.0) if cfg_scale is None else np.asarray(cfg_scale), layers,
                        list(HEAD_CHANGE), BUF, 3, attrs)


def keep_test_similarity() -> np.ndarray:
    """V similarity at decoder.1: 0.2 at 1 skippable position of sample 0 and 3 of sample 1, else 0.9."""
    v = np.full((2, S, P), 0.9, dtype=np.float32)
    v[0, :, 0] = 0.2            # buffer position 0 (never always-kept)
    v[1, :, [0, 1, 2]] = 0.2    # both buffer positions and token 0, decoded last by sample 1
    return v


@pytest.fixture(scope="module")
def profile() -> RedundancyProfile:
    return RedundancyProfile.from_stats(synthetic(v_similarity={1: keep_test_similarity()}))


# --- derivation by hand --------------------------------------------------------------------------------------
def test_keep_fractions_by_hand(profile):
    # steps >= 1: 2 always kept (to predict, new) + on average (1 + 3) / 2 below tau, of 11 positions
    np.testing.assert_allclose(profile.keep_fractions(0.5, 1)[1:], 4 / 11)
    np.testing.assert_allclose(profile.keep_fractions(0.1, 1)[1:], 2 / 11)
    np.testing.assert_allclose(profile.keep_fractions(0.95, 1)[1:], 1.0)
    assert profile.keep_fractions(0.5, 1)[0] == pytest.approx(1 / 11)  # step 0: nothing recorded, 1 to predict


def test_token_quantile(profile):
    only_always = derive_schedule(profile, token_quantile=0.0, selection_layer=1).schedule
    everything = derive_schedule(profile, token_quantile=1.0, selection_layer=1).schedule
    cached = [s for s in range(S) if not only_always.refresh[s]]
    assert cached and all(only_always.keep_fraction[s] == pytest.approx(2 / 11, abs=1e-6) for s in cached)
    assert all(everything.keep_fraction[s] == 1.0 for s in cached)
    with pytest.raises(DerivationError, match="not both"):
        derive_schedule(profile, tau_token=0.5, token_quantile=0.5, selection_layer=1)


def test_refresh_steps_by_hand(profile):
    np.testing.assert_allclose(profile.step_change, [0, 0.5, 0.5, 1, 2, 1], rtol=1e-5)
    assert np.flatnonzero(profile.refresh_steps(1.5)).tolist() == [0, 3, 4]
    assert np.flatnonzero(profile.refresh_steps(0.75)).tolist() == [0, 2, 3, 4, 5]
    assert np.flatnonzero(profile.refresh_steps(1e9)).tolist() == [0]


def test_condition_cache_by_hand(profile):
    # the angle counts only unknown token positions (the others are at angle pi and would break every step)
    np.testing.assert_allclose(profile.residual_angle[1:], RESIDUAL_ANGLE[1:], rtol=1e-4)
    tau = math.cos(0.25)  # constant guidance: weight 1; cache while the summed angle stays <= 0.25
    assert np.flatnonzero(profile.condition_steps(tau, profile.refresh_steps(1.5))).tolist() == [1, 5]
    assert np.flatnonzero(profile.condition_steps(tau, profile.refresh_steps(1e9))).tolist() == [1, 3, 5]


def test_condition_cache_weighs_by_guidance():
    # guidance scale 1 at steps 0-2: the unconditional branch does not matter there, whatever the drift
    prof = RedundancyProfile.from_stats(synthetic(cfg_scale=[1, 1, 1, 3, 3, 3]))
    np.testing.assert_allclose(prof.guidance_weight, [0, 0, 0, 1, 1, 1])
    assert np.flatnonzero(prof.condition_steps(math.cos(0.25), prof.refresh_steps(1e9))).tolist() == [1, 2, 5]


def test_encoder_buffer_policy_by_hand(profile):
    # the buffer's encoder outputs change like every position here: 1 - cosine = TOKEN_CHANGE
    np.testing.assert_allclose(profile.buffer_change, np.nan_to_num(TOKEN_CHANGE), rtol=1e-4)
    refresh = profile.refresh_steps(1.5)  # [0, 3, 4]: accumulated drift 0, .005, .01, 0, 0, .01
    np.testing.assert_allclose(profile.buffer_drift(refresh), [0, 0.005, 0.01, 0, 0, 0.01], rtol=1e-4)
    policy = lambda tau: derive_schedule(profile, tau_refresh=1.5, tau_buffer=tau, selection_layer=1).schedule
    assert policy(0.989).encoder == "new-tokens"
    assert policy(0.991).encoder == "incremental" and policy(1.0).encoder == "incremental"
    derived = derive_schedule(profile, tau_refresh=1.5, tau_buffer=0.98, selection_layer=1)
    assert error_components(profile, derived)["encoder"] == pytest.approx(0.025 / S, rel=1e-4)
    cheaper = predicted_flops(derived.schedule, CONFIG)["total"]
    assert cheaper < predicted_flops(policy(1.0), CONFIG)["total"]
    assert derived.schedule.name.endswith("-b0.98") and "encoder new-tokens" in derived.summary()


def test_head_policy_by_hand(profile):
    errors = profile.head_errors(3)  # full head steps i = 5, 3, 0; cached j = 1, 3, 4 carry c, c, 2c
    for part, change in HEAD_CHANGE.items():
        assert errors[part] == pytest.approx(4 / 3 * change, rel=1e-5)
    assert profile.head_policy(0.0) == HeadCachePolicy(hoist_invariants=True)
    assert profile.head_policy(0.06) == HeadCachePolicy(refresh_every=2, reuse_blocks=(0,), hoist_invariants=True)
    for tau in (0.06, 0.15, 0.3, 1.0):
        policy = profile.head_policy(tau)
        errors = profile.head_errors(policy.refresh_every)
        reused = (["eps_cfg"] if policy.cfg_cache else []) + [f"res_block.{b}" for b in policy.reuse_blocks]
        assert reused and all(errors[p] <= tau for p in reused)


def test_derive_schedule_by_hand(profile):
    d = derive_schedule(profile, tau_token=0.5, tau_refresh=1.5, tau_cfg=math.cos(0.25), selection_layer=1,
                        tau_head=0.06)
    s = d.schedule
    assert list(s.refresh) == [True, False, False, True, True, False]
    np.testing.assert_allclose(s.keep_fraction, [1, 4 / 11, 4 / 11, 1, 1, 4 / 11], atol=1e-6)
    assert list(s.condition_cache) == [False, True, False, False, False, True]
    assert s.head == HeadCachePolicy(refresh_every=2, reuse_blocks=(0,), hoist_invariants=True)
    assert s.selection_layer == 1 and s.selection == "similarity" and all(s.head_cache)
    assert d.predicted_flops_ratio == pytest.approx(
        estimate_generation_flops(CONFIG, exact_schedule(S)).total
        / estimate_generation_flops(CONFIG, s).total)
    assert "refreshes 3 steps [0, 3-4]" in d.summary()
    matrix = schedule_matrix(s)
    assert list(matrix.columns) == ["refresh", "keep_fraction", "condition_cache", "head_cache"]
    assert matrix.shape == (S, 4) and matrix["keep_fraction"].iloc[1] == pytest.approx(4 / 11)
    assert matrix["head_cache"].tolist() == [1.0] * S


def test_deterministic_and_fast_flops_are_exact(profile):
    a = derive_schedule(profile, tau_token=0.5, tau_refresh=1.5, tau_cfg=0.96, selection_layer=1, tau_head=0.3)
    b = derive_schedule(profile, tau_token=0.5, tau_refresh=1.5, tau_cfg=0.96, selection_layer=1, tau_head=0.3)
    assert a.schedule == b.schedule
    for batch in (1, 3):
        assert predicted_flops(a.schedule, CONFIG, batch_size=batch)["total"] == estimate_generation_flops(
            CONFIG, a.schedule, batch_size=batch).total


def test_higher_tau_token_recomputes_more():
    rng = np.random.default_rng(0)
    v = (1.0 - rng.uniform(0, 0.01, size=(2, S, P))).astype(np.float32)
    prof = RedundancyProfile.from_stats(synthetic(v_similarity={0: v, 1: v}))
    last_keep, last_ratio = None, None
    for tau in (0.99, 0.992, 0.995, 0.997, 0.999, 1.0):
        d = derive_schedule(prof, tau_token=tau, tau_refresh=1e9, tau_cfg=0.9, selection_layer=0, tau_head=0.3)
        keep = np.asarray(d.schedule.keep_fraction)
        if last_keep is not None:
            assert (keep >= last_keep - 1e-12).all() and d.predicted_flops_ratio <= last_ratio + 1e-12
        last_keep, last_ratio = keep, d.predicted_flops_ratio
    assert last_keep[1:].min() == 1.0  # tau 1.0: every recorded similarity is below it


def test_quantised_similarities_count_continuously():
    # a cosine stored with 14 mantissa bits as 1.0 stands for [1 - 2**-16, 1]
    lower, upper, count = _levels(np.array([1.0, 1.0, np.nan]), 14)
    assert (lower[0], upper[0], count[0]) == (1 - 2 ** -16, 1.0, 2)
    assert _count_below(1 - 2 ** -17, lower, upper, count) == pytest.approx(1.0)
    assert _count_below(0.5, *_levels(np.array([0.25, 0.75]), None)) == 1.0


def test_schedule_validates_and_round_trips(profile, tmp_path):
    s = derive_schedule(profile, tau_token=0.5, tau_refresh=1.5, tau_cfg=0.96, selection_layer=1).schedule
    assert CacheSchedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    path = s.save(tmp_path / "derived.json")
    assert load_schedule(path, S, CONFIG) == s


@pytest.mark.parametrize("kwargs, message", [
    (dict(selection_layer=2), "selection_layer must be a decoder block in 0..1"),
    (dict(tau_token=1.5), r"tau_token is a cosine similarity threshold in \[-1, 1.000001\]"),
    (dict(tau_refresh=0), "tau_refresh must be > 0"),
    (dict(tau_head=-1), "tau_head must be >= 0"),
])
def test_bad_thresholds(profile, kwargs, message):
    with pytest.raises(DerivationError, match=message):
        derive_schedule(profile, **{"selection_layer": 1, **kwargs})


def test_budget_search_without_measuring(profile):
    grid = {"tau_token": (0.1, 0.5, 0.95), "tau_refresh": (1.5, 1e9), "tau_cfg": (0.9, 1.0), "tau_head": (0, 0.3)}
    result = search_budget(profile, 1.3, grid=grid)
    assert result.best.predicted_flops_ratio >= 1.3
    with pytest.raises(DerivationError, match="no derived schedule reaches a FLOPs ratio of 1000"):
        search_budget(profile, 1000, grid=grid)


# --- selection-layer study -----------------------------------------------------------------------------------
def test_selection_study_finds_the_perfect_layer():
    rng = np.random.default_rng(1)
    change = rng.uniform(0, 0.1, size=(3, S, P)).astype(np.float32)
    ds = synthetic(decoder_depth=4, samples=3, target=1.0 - change, v_similarity={
        0: 1.0 - rng.uniform(0, 0.1, size=(3, S, P)),  # unrelated
        1: 1.0 - change ** 2,                           # a monotone function of the change: perfect
        2: change,                                      # perfectly reversed
    })
    table = selection_study(ds)
    assert table.loc["decoder.1", "spearman"] == pytest.approx(1.0)
    assert table.loc["decoder.1", "auroc"] == pytest.approx(1.0)
    assert table.loc["decoder.2", "spearman"] == pytest.approx(-1.0)
    assert table.loc["decoder.2", "auroc"] == pytest.approx(0.0)
    assert abs(table.loc["decoder.0", "spearman"]) < 0.5
    assert table.attrs["recommended"] == 1 and table["recommended"].sum() == 1
    # the study skips the always-kept positions: 9 - 2 + 2 = 9 skippable positions at steps >= 1, 5 steps x 3
    assert table.loc["decoder.1", "pairs"] == 3 * (S - 1)


# --- CLI -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "synthetic.nc"
    save_stats(synthetic(v_similarity={1: keep_test_similarity()}), path)
    return path


def test_cli_derive_writes_a_loadable_schedule(stats_file, tmp_path, capsys):
    out = tmp_path / "s.json"
    args = ["derive", "--stats", str(stats_file), "--tau-token", "0.5", "--tau-refresh", "1.5", "--tau-cfg", "0.96",
            "--selection-layer", "1", "--out", str(out), "--json"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert load_schedule(out, S, CONFIG).refresh == (True, False, False, True, True, False)
    assert printed["predicted_flops_ratio"] > 1 and out.with_suffix(".md").is_file()
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_cli_derive_report_prices_one_image_of_the_priced_batch(stats_file, tmp_path, capsys):
    """--flops-batch-size prices a whole batch; the report's per-image figure divides it back."""
    out = tmp_path / "s.json"
    assert main(["derive", "--stats", str(stats_file), "--tau-token", "0.5", "--tau-refresh", "1.5", "--tau-cfg",
                 "0.96", "--selection-layer", "1", "--flops-batch-size", "4", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    priced = predicted_flops(load_schedule(out, S, CONFIG), CONFIG, True, 4)
    line = next(l for l in out.with_suffix(".md").read_text().splitlines() if "predicted FLOPs per image" in l)
    assert "(batch of 4)" in line
    assert f"{priced['total'] / 4 / 1e9:.3f} GFLOPs (uncached {priced['baseline'] / 4 / 1e9:.3f})" in line


def test_cli_errors(stats_file, tmp_path, capsys):
    assert main(["derive", "--stats", str(tmp_path / "missing.nc")]) == 2
    assert "recording not found" in capsys.readouterr().err
    assert main(["derive", "--stats", str(stats_file), "--target-flops-ratio", "1000"]) == 2
    assert "no derived schedule reaches a FLOPs ratio of 1000" in capsys.readouterr().err
    assert main(["derive", "--stats", str(stats_file), "--target-flops-ratio", "0.5", "--no-measure"]) == 2
    assert "--target-flops-ratio: must be > 1" in capsys.readouterr().err


# --- out-of-core: the profile from a dask-backed recording, chunk by chunk -----------------------------------------
def _profiles_equal(a: RedundancyProfile, b: RedundancyProfile) -> None:
    for name in ("always_kept", "step_change", "raw_step_change", "buffer_change", "residual_angle",
                 "guidance_weight"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(a.head.change, b.head.change, equal_nan=True)
    for layer_a, layer_b in zip(a.similarity_levels, b.similarity_levels):
        for level_a, level_b in zip(layer_a, layer_b):
            for x, y in zip(level_a, level_b):
                np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(a.selection[["spearman", "auroc"]], b.selection[["spearman", "auroc"]], rtol=1e-9)
    assert a.recommended_layer == b.recommended_layer


def test_profile_of_a_chunked_recording_reads_one_chunk_at_a_time():
    """A dask-backed recording (as a Zarr store opens) gives the same profile, and no task ever holds more than
    one chunk of samples of token_cosine: the reductions never materialise a whole variable."""
    from dask.callbacks import Callback

    ds = synthetic(v_similarity={1: np.random.default_rng(0).uniform(0.5, 1.0, (6, S, P))}, samples=6)
    eager = RedundancyProfile.from_stats(ds)
    chunked = ds.chunk({"sample": 2})
    largest = []

    class Largest(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            largest.append(getattr(result, "nbytes", 0))

    with Largest():
        lazy = RedundancyProfile.from_stats(chunked)
    _profiles_equal(eager, lazy)
    whole = ds["token_cosine"].nbytes
    assert largest and max(largest) <= whole / 3  # 2 of 6 samples
    derived = [derive_schedule(p, tau_refresh=1.5, selection_layer=1, token_quantile=0.5) for p in (eager, lazy)]
    assert derived[0].schedule == derived[1].schedule


def test_similarity_quantiles_match_numpy(profile):
    from lazymar.schedules.levels import merge_counts, value_counts
    values = np.random.default_rng(1).integers(0, 7, 200) / 8.0
    merged = merge_counts(value_counts(values[:50]), value_counts(values[50:]))
    np.testing.assert_array_equal(merged[0], np.unique(values))
    np.testing.assert_array_equal(merged[1], np.unique(values, return_counts=True)[1])
    levels = profile.similarity_levels[1]
    repeated = np.concatenate([np.repeat((lo + hi) / 2, c) for lo, hi, c in levels])
    q = (0.0, 0.05, 0.3, 0.5, 0.95, 1.0)
    expected = {x: float(np.quantile(repeated, x)) for x in q}
    assert profile.similarity_quantiles(1, q) == pytest.approx(expected, rel=1e-12)


def test_head_policy_is_priced_by_the_flops_module(profile):
    """Derivation has no FLOPs formula of its own: the head cost it ranks policies by is the flops module's."""
    policy = HeadCachePolicy(refresh_every=2, cfg_cache=True, reuse_blocks=(0,), hoist_invariants=True)
    one_step = CacheSchedule(num_iter=1, refresh=[True], keep_fraction=[1.0], condition_cache=[False],
                             head_cache=[True], head=policy)
    assert profile._head_cost(policy) == estimate_generation_flops(CONFIG, one_step).totals()["head"]
