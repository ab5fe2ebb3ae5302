"""The workbook's analysis and plotting functions: hand-checked values on small synthetic recordings, the live
feature capture against the sampler, measured runs against the cache engine's FLOPs estimate, and figures that
come out with labelled axes and reproducible files."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from analysis import figures, live_features, phenomena, redundancy_plots, schedule_plots, schedule_runs  # noqa: E402
from analysis.phenomena import AnalysisError  # noqa: E402
from lazymar import MAR, get_config  # noqa: E402
from lazymar.cache.engine import estimate_generation_flops  # noqa: E402
from lazymar.cache.schedule_file import LAZYMAR_REFRESH, exact_schedule, lazymar_schedule, none_schedule  # noqa: E402
from lazymar.recording import STATUS_CODES  # noqa: E402
from lazymar.recording.dataset import make_dataset  # noqa: E402
from lazymar.sampling import SamplingSettings, generate  # noqa: E402
from builders import tiny_mar  # noqa: E402

B, K, N, U, M = (STATUS_CODES[s] for s in ("buffer", "known", "new", "to_predict", "masked"))
LAYERS = ["encoder.0", "decoder.0", "z"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def synthetic(token_cosine=None, cfg=None, head=None, status=None) -> "xr.Dataset":  # noqa: F821
    """A recording of 2 samples, 3 steps, layers encoder.0/decoder.0/z, 1 buffer + 4 token positions,
    3 head steps and 2 head parts; NaN everywhere unless given."""
    S, T, L, P, H, Pa = 2, 3, len(LAYERS), 5, 3, 2
    nan = np.nan
    variables = {
        "status": np.asarray(status if status is not None else np.full((S, T, P), K), dtype=np.int8),
        "token_cosine": np.full((S, T, L, 3, P), nan, np.float32),
        "head_change": np.full((S, T, H, Pa), nan, np.float32),
        "tokens": np.zeros((S, 4, 1), np.float32),
    }
    variables["status"][:, :, 0] = B
    for name in ("residual_cosine", "residual_change", "cond_change", "uncond_change"):
        variables[f"cfg_{name}"] = np.full((S, T, L, P), nan, np.float32)
    if token_cosine is not None:
        variables["token_cosine"][...] = token_cosine
    for name, values in (cfg or {}).items():
        variables[f"cfg_{name}"][...] = values
    if head is not None:
        variables["head_change"][...] = head
    return make_dataset(variables, samples=np.arange(S), labels=np.array([3, 7]), batch=np.zeros(S),
                        mask_ratio=np.array([0.75, 0.25, 0.0]), cfg_scale=np.array([1.5, 2.0, 2.0]), layers=LAYERS,
                        head_parts=["eps_cfg", "res_block.0"], buffer_size=1, grid_size=2,
                        attrs={"model": "synthetic", "num_iter": T})


# --- token redundancy -----------------------------------------------------------------------------------------
def test_fraction_above_counts_finite_values_only():
    tc = np.full((2, 3, 3, 3, 5), np.nan, np.float32)
    tc[0, 1, 1, 0] = [0.90, 0.96, 0.995, np.nan, 1.0]   # decoder.0 output, step 1, sample 0
    tc[1, 1, 1, 0] = [0.97, 0.80, np.nan, np.nan, np.nan]  # sample 1
    ds = synthetic(token_cosine=tc)
    df = phenomena.fraction_above(ds, thresholds=(0.95, 0.99), layers=["decoder.0"])
    assert list(df.index) == [("decoder.0", 1)]  # steps without values are dropped
    row = df.loc[("decoder.0", 1)]
    assert row["count"] == 6
    assert row["above_0.95"] == pytest.approx(4 / 6)   # 0.96, 0.995, 1.0, 0.97
    assert row["above_0.99"] == pytest.approx(2 / 6)   # 0.995, 1.0


def test_fraction_above_by_status():
    tc = np.full((2, 3, 3, 3, 5), np.nan, np.float32)
    tc[:, 2, 1, 0] = [0.99, 0.2, 0.999, 0.999, 0.999]
    status = np.full((2, 3, 5), K)
    status[:, 2, 1] = N  # the token decoded at the previous step
    ds = synthetic(token_cosine=tc, status=status)
    new = phenomena.fraction_above(ds, thresholds=(0.95,), layers=["decoder.0"], statuses=["new"])
    known = phenomena.fraction_above(ds, thresholds=(0.95,), layers=["decoder.0"], statuses=["known"])
    assert new.loc[("decoder.0", 2), "above_0.95"] == 0.0 and new.loc[("decoder.0", 2), "count"] == 2
    assert known.loc[("decoder.0", 2), "above_0.95"] == 1.0 and known.loc[("decoder.0", 2), "count"] == 6
    with pytest.raises(AnalysisError, match="unknown status"):
        phenomena.fraction_above(ds, statuses=["decoded"])
    with pytest.raises(AnalysisError, match="not in the recording"):
        phenomena.fraction_above(ds, layers=["decoder.9"])


def test_step_layer_matrix_statistics():
    tc = np.full((2, 3, 3, 3, 5), np.nan, np.float32)
    tc[0, 1, 0, 0, :3] = [0.5, 0.7, 1.0]
    tc[1, 1, 0, 0, :1] = [0.6]
    ds = synthetic(token_cosine=tc)
    mean = phenomena.step_layer_matrix(ds, "mean")
    assert mean.dims == ("layer", "step")
    assert float(mean.sel(layer="encoder.0", step=1)) == pytest.approx(0.7)
    assert float(phenomena.step_layer_matrix(ds, "median").sel(layer="encoder.0", step=1)) == pytest.approx(0.65)
    above = phenomena.step_layer_matrix(ds, "above", threshold=0.65)
    assert float(above.sel(layer="encoder.0", step=1)) == pytest.approx(0.5)
    assert np.isnan(float(mean.sel(layer="decoder.0", step=1)))  # no values: NaN, not 0
    with pytest.raises(AnalysisError, match="threshold"):
        phenomena.step_layer_matrix(ds, "above")
    with pytest.raises(AnalysisError, match="unknown statistic"):
        phenomena.step_layer_matrix(ds, "max")
    with pytest.raises(AnalysisError, match="feature kind"):
        phenomena.step_layer_matrix(ds, kind="q")


def test_encoder_vs_decoder_uses_the_same_positions():
    tc = np.full((2, 3, 3, 3, 5), np.nan, np.float32)
    tc[:, 1, 0, 0, :] = 0.9    # encoder.0 on every position
    tc[:, 1, 1, 0, :] = 0.5    # decoder.0 on every position ...
    tc[:, 1, 1, 0, 4] = 0.0    # ... except a masked one, which the default statuses exclude
    status = np.full((2, 3, 5), K)
    status[:, :, 4] = M
    df = phenomena.encoder_vs_decoder(synthetic(token_cosine=tc, status=status))
    assert list(df.index) == [1]
    assert df.loc[1, "encoder_cosine"] == pytest.approx(0.9)
    assert df.loc[1, "decoder_cosine"] == pytest.approx(0.5)
    assert df.loc[1, "decoder_change"] == pytest.approx(0.5)
    summary = phenomena.group_summary(synthetic(token_cosine=tc, status=status), thresholds=(0.6,))
    assert summary.loc["decoder", "count"] == 10
    assert summary.loc["decoder", "above_0.6"] == 0.0
    assert summary.loc["encoder", "mean_cosine"] == pytest.approx(0.9)


def test_values_by_status_splits_and_drops_nan():
    tc = np.full((2, 3, 3, 3, 5), np.nan, np.float32)
    tc[0, 1, 1, 2] = [0.1, 0.2, 0.3, 0.4, np.nan]  # decoder.0, kind v
    status = np.full((2, 3, 5), K)
    status[0, 1, 2] = U
    groups = phenomena.values_by_status(synthetic(token_cosine=tc, status=status), "decoder.0", kind="v")
    assert set(groups) == {"buffer", "known", "to_predict"}
    np.testing.assert_allclose(groups["known"], [0.2, 0.4])
    np.testing.assert_allclose(groups["to_predict"], [0.3])


# --- condition redundancy -------------------------------------------------------------------------------------
def test_branch_vs_residual_ratio():
    cfg = {name: np.full((2, 3, 3, 5), np.nan, np.float32) for name in ("cond_change", "uncond_change",
                                                                         "residual_change")}
    cfg["cond_change"][:, 1:, 1] = 0.2
    cfg["uncond_change"][:, 1:, 1] = 0.35
    cfg["residual_change"][:, 1:, 1] = 0.01
    cfg["residual_change"][0, 2, 1, :] = 0.03   # step 2 of sample 0 changes more
    ds = synthetic(cfg=cfg)
    per_layer = phenomena.branch_vs_residual(ds, statistic="median")
    assert list(per_layer.index) == ["decoder.0"]  # layers without values are dropped
    assert per_layer.loc["decoder.0", "cond_over_residual"] == pytest.approx(20.0)
    assert per_layer.loc["decoder.0", "uncond_over_residual"] == pytest.approx(35.0)
    mean = phenomena.branch_vs_residual(ds, statistic="mean")
    assert mean.loc["decoder.0", "residual_change"] == pytest.approx((15 * 0.01 + 5 * 0.03) / 20)
    per_step = phenomena.branch_vs_residual(ds, statistic="mean", by="step", layers=["decoder.0"])
    assert per_step.loc[("decoder.0", 2), "residual_change"] == pytest.approx(0.02)
    assert per_step.loc[("decoder.0", 1), "cond_over_residual"] == pytest.approx(20.0)
    assert live_features.overall_change_ratio(per_step)["cond_over_residual"] == pytest.approx(0.4 / 0.03)


def test_absolute_change_of_branches_and_residual():
    # 2 steps, rows [cond; uncond] of one sample, one position, 2 dims
    f = torch.zeros(2, 2, 1, 2)
    f[1, 0, 0] = torch.tensor([3.0, 4.0])   # cond moves by 5
    f[1, 1, 0] = torch.tensor([0.0, 4.0])   # uncond moves by 4; residual [0,0] -> [3,0] moves by 3
    df = live_features.absolute_change(f)
    assert list(df.index) == [1]
    assert df.loc[1, "cond_change"] == pytest.approx(5.0)
    assert df.loc[1, "uncond_change"] == pytest.approx(4.0)
    assert df.loc[1, "residual_change"] == pytest.approx(3.0)
    assert df.loc[1, "cond_over_residual"] == pytest.approx(5 / 3)
    with pytest.raises(AnalysisError, match="CFG"):
        live_features.absolute_change(torch.zeros(2, 3, 1, 2))


def test_head_change_profile_means_over_samples_and_steps():
    head = np.full((2, 3, 3, 2), np.nan, np.float32)
    head[0, 1, 1] = [1.0, 0.1]
    head[1, 2, 1] = [3.0, 0.3]
    head[0, 1, 2] = [0.5, 0.05]
    profile = phenomena.head_change_profile(synthetic(head=head))
    assert list(profile.index) == [1, 2]  # head step 0 has no previous step
    assert profile.loc[1, "eps_cfg"] == pytest.approx(2.0)
    assert profile.loc[1, "res_block.0"] == pytest.approx(0.2)
    assert profile.loc[2, "eps_cfg"] == pytest.approx(0.5)


def test_log10_change_and_resolution():
    tc = np.full((2, 3, 3, 3, 5), np.nan, np.float32)
    tc[0, 1, 0, 0, :3] = [0.9, 0.99, 1.0]
    ds = synthetic(token_cosine=tc)
    assert phenomena.resolution(ds) == 2.0 ** -24  # exact float32 recording
    ds.attrs["keep_bits"] = '{"token_cosine": 14}'
    assert phenomena.resolution(ds) == 2.0 ** -15
    m = phenomena.step_layer_matrix(ds, "log10_change", floor=1e-4)
    assert float(m.sel(layer="encoder.0", step=1)) == pytest.approx((-1 - 2 - 4) / 3, abs=1e-5)


def test_step_similarity_matrix_by_hand():
    f = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 1.0]]], [[[0.0, 2.0]]]])  # 3 steps, 1 row, 1 position
    sim = live_features.step_similarity_matrix(f)
    expected = np.array([[1, 2 ** -0.5, 0], [2 ** -0.5, 1, 2 ** -0.5], [0, 2 ** -0.5, 1]])
    np.testing.assert_allclose(sim, expected, atol=1e-12)
    with pytest.raises(AnalysisError, match="steps, rows, positions, dim"):
        live_features.step_similarity_matrix(torch.zeros(3, 2))


# --- live capture and measured runs on a tiny model ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> MAR:
    return tiny_mar(img_size=64, num_sampling_steps="5", randomise="head", std=0.1)


def test_capture_step_features_matches_the_sampler(tiny):
    settings = SamplingSettings(num_iter=4, cfg=2.0)
    plain = generate(tiny, [1, 2], settings, seed=3)
    captured = live_features.capture_step_features(tiny, [1, 2], settings, layers=("decoder.1", "z"), seed=3)
    total = tiny.buffer_size + tiny.seq_len
    assert captured["decoder.1"].shape == (4, 4, total, tiny.config.decoder_embed_dim)  # steps, [cond; uncond]
    assert captured["z"].shape == (4, 4, tiny.seq_len, tiny.config.decoder_embed_dim)
    # z at the last step is the decoder's last block output through decoder_output
    torch.testing.assert_close(captured["z"][-1], tiny.decoder_output(captured["decoder.1"][-1]))
    assert torch.equal(generate(tiny, [1, 2], settings, seed=3), plain)  # hooks removed, nothing changed
    sim = live_features.step_similarity_matrix(captured["z"])
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-9)
    np.testing.assert_allclose(sim, sim.T, atol=1e-12)
    with pytest.raises(AnalysisError, match="decoder.i and z"):
        live_features.capture_step_features(tiny, [1], settings, layers=("encoder.0",))
    with pytest.raises(AnalysisError, match="out of range"):
        live_features.capture_step_features(tiny, [1], settings, layers=("decoder.7",))


def test_measure_schedules_against_the_flops_estimate(tiny):
    settings = SamplingSettings(num_iter=8, cfg=2.0)
    labels = [0, 1, 2]
    schedules = {"exact copy": exact_schedule(8), "lazymar": lazymar_schedule(8, tiny.config)}  # the reference's
    result = schedule_runs.measure_schedules(tiny, schedules, labels, settings, seed=1)
    table = result.table
    assert list(table.index) == ["none", "exact copy", "lazymar"]
    assert table.loc["none", "flops_ratio"] == 1.0 and table["psnr"].isna().all()  # latent tokens, no VAE: no images
    assert table.loc["exact copy", "token_mse"] == 0.0 < table.loc["lazymar", "token_mse"]
    predicted = (estimate_generation_flops(tiny.config, exact_schedule(8), batch_size=3).total
                 / estimate_generation_flops(tiny.config, lazymar_schedule(8, tiny.config), batch_size=3).total)
    assert table.loc["lazymar", "flops_ratio"] == pytest.approx(predicted)
    assert np.isnan(table.loc["lazymar", "accuracy"])  # not the digits model
    again = schedule_runs.measure_schedules(tiny, {"lazymar": lazymar_schedule(8, tiny.config),
                                             "same, renamed": lazymar_schedule(8, tiny.config).with_changes(name="x")},
                                      labels, settings, seed=1, baseline=result)
    assert again.table.loc["lazymar", "token_mse"] == table.loc["lazymar", "token_mse"]  # reused baseline
    assert again.table.loc["same, renamed", "seconds"] == again.table.loc["lazymar", "seconds"]  # run once
    with pytest.raises(AnalysisError, match="baseline"):
        schedule_runs.measure_schedules(tiny, {"none": none_schedule(8)}, labels, settings)


def test_ablation_schedules_switch_one_mechanism_each():
    config = get_config("digits")
    abl = schedule_runs.ablation_schedules(config, 64)
    full = abl["all (lazymar)"]
    token, cond, head = abl["token cache only"], abl["condition cache only"], abl["head cache only"]
    assert full.refresh == token.refresh and not any(token.condition_cache) and not any(token.head_cache)
    assert all(cond.refresh) and cond.condition_cache == full.condition_cache and not any(cond.head_cache)
    assert all(head.refresh) and not any(head.condition_cache) and all(head.head_cache)
    released = schedule_runs.refresh_interval_schedule(config, 64, 9)
    assert [s for s in range(64) if released.refresh[s]] == sorted(LAZYMAR_REFRESH)
    every4 = schedule_runs.refresh_interval_schedule(config, 64, 4)
    assert [s for s in range(12) if every4.refresh[s]] == [0, 1, 2, 3, 4, 5, 9]
    assert schedule_runs.selection_schedules(config, 64)["random"].selection == "random"
    with pytest.raises(AnalysisError, match="interval"):
        schedule_runs.refresh_interval_schedule(config, 64, 0)


def test_speed_quality_from_sweep_keeps_reference_preset_and_front():
    sweep = pd.DataFrame({
        "name": ["none", "lazymar", "d1", "d2", "steps-20"],
        "family": ["none", "lazymar", "derived", "derived", "fewer_steps"],
        "flops_ratio": [1.0, 2.6, 3.5, 2.0, 2.5], "psnr": [np.inf, 30.0, 33.0, 31.0, 12.0],
        "pareto": [True, False, True, False, False], "accuracy": [1.0, 0.98, 0.99, 1.0, 0.5]})
    table = schedule_runs.speed_quality_from_sweep(sweep)
    assert list(table.index) == ["none", "lazymar", "d1"]  # by FLOPs ratio; d2 is off the front
    assert table.loc["d1", "psnr"] == 33.0 and "wall_ratio" not in table
    with pytest.raises(AnalysisError, match="pareto"):
        schedule_runs.speed_quality_from_sweep(sweep.drop(columns="pareto"))


def test_schedule_heat_map_shows_computed_shares():
    from lazymar.schedules import schedule_matrix
    schedule = lazymar_schedule(64, get_config("digits"))
    shares = schedule_plots.computed_share(schedule_matrix(schedule))
    assert list(shares.index) == ["full refresh", "decoder positions after selection layer", "unconditional branch",
                                  "diffusion head without cache"]
    assert shares[0].tolist() == [1.0, 1.0, 1.0, 0.0]   # refresh step: all computed, the head cache is on
    assert shares[6].tolist() == [0.0, 1.0, 0.0, 0.0]   # cached step 6: keep 100% (ratio 1.0 before step 20)
    assert shares[45].iloc[1] == pytest.approx(0.05)    # released ratio from step 40
    with pytest.raises(AnalysisError, match="unknown schedule component"):
        schedule_plots.computed_share(pd.DataFrame({"bogus": [1.0]}))


def test_markdown_table():
    df = pd.DataFrame({"psnr": [np.inf, 31.234567], "family": ["none", "a|b"]},
                      index=pd.Index(["none", "lazymar"], name="name"))
    assert figures.markdown_table(df).splitlines() == [
        "| name | psnr | family |", "|---|---|---|", "| none | inf | none |", "| lazymar | 31.23 | a\\|b |"]


# --- figures --------------------------------------------------------------------------------------------------
def _labelled(fig) -> None:
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), f"unlabelled axes: {ax.get_title()!r}"


def _full_synthetic():
    rng = np.random.default_rng(0)
    tc = (1 - rng.uniform(0, 0.1, (2, 3, 3, 3, 5)) ** 2).astype(np.float32)
    tc[:, 0] = np.nan
    status = np.tile(np.array([B, K, N, U, M]), (2, 3, 1))
    cfg = {name: rng.uniform(0.01, 0.5, (2, 3, 3, 5)).astype(np.float32) for name in
           ("residual_cosine", "residual_change", "cond_change", "uncond_change")}
    head = rng.uniform(0.01, 1, (2, 3, 3, 2)).astype(np.float32)
    head[:, :, 0] = np.nan
    return synthetic(token_cosine=tc, cfg=cfg, head=head, status=status)


def test_every_figure_has_labelled_axes():
    from lazymar.schedules import schedule_matrix
    ds = _full_synthetic()
    figures = [
        redundancy_plots.plot_cosine_ecdf(ds),
        redundancy_plots.plot_cosine_violin(ds, layers=["decoder.0", "z"]),
        redundancy_plots.plot_step_layer_heatmap(phenomena.step_layer_matrix(ds), colorbar_label="mean cosine"),
        redundancy_plots.plot_fraction_above(phenomena.fraction_above(ds), layers=["decoder.0"]),
        redundancy_plots.plot_encoder_vs_decoder(phenomena.encoder_vs_decoder(ds)),
        redundancy_plots.plot_step_similarity(np.eye(3), "z"),
        redundancy_plots.plot_branch_vs_residual(phenomena.branch_vs_residual(ds, by="step", layers=["z"])),
        redundancy_plots.plot_change_ratio(phenomena.branch_vs_residual(ds)),
        redundancy_plots.plot_head_change(phenomena.head_change_profile(ds)),
        schedule_plots.plot_schedule(pd.DataFrame([[1, 0.5, 0.0], [1, 1, 0]], index=["decoder", "head"])),
        schedule_plots.plot_schedule(schedule_matrix(lazymar_schedule(8, get_config("digits")))),
        schedule_plots.plot_tradeoff(pd.DataFrame({"schedule": ["none", "lazymar"], "flops_ratio": [1.0, 2.5],
                                          "psnr": [np.inf, 30.0]}), highlight={"flops_ratio": 2.0, "psnr": 33.0}),
        schedule_plots.plot_ablation(pd.DataFrame({"flops_ratio": [1.3, 2.6], "psnr": [38.0, 31.0]}, index=["a", "b"])),
        schedule_plots.plot_metric_lines(pd.DataFrame({"k": [3, 9], "psnr": [33.0, 31.0]}), "k", [("psnr", "PSNR (dB)")],
                                "refresh interval (steps)"),
    ]
    for fig in figures:
        _labelled(fig)
    grid = schedule_plots.plot_sample_comparison({"uncached": torch.zeros(3, 1, 8, 8), "cached": torch.ones(3, 1, 8, 8)},
                                        labels=[0, 1, 2])
    assert len(grid.axes) == 6 and grid.axes[0].get_ylabel() == "uncached"
    with pytest.raises(AnalysisError, match="layer, step"):
        redundancy_plots.plot_step_layer_heatmap(phenomena.step_layer_matrix(ds).T)
    with pytest.raises(AnalysisError, match="no column"):
        schedule_plots.plot_tradeoff(pd.DataFrame({"x": [1.0]}))


def test_save_figure_writes_png_and_pdf_reproducibly(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ax.set_xlabel("step"), ax.set_ylabel("value")
    paths = figures.save_figure(fig, "demo", tmp_path)
    assert [p.name for p in paths] == ["demo.png", "demo.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:5] == b"%PDF-"
    first = [p.read_bytes() for p in paths]
    figures.save_figure(fig, "demo", tmp_path)
    assert [p.read_bytes() for p in paths] == first  # no timestamps in the files
    for bad in ("../escape", "demo.png", ""):
        with pytest.raises(ValueError, match="plain file stem"):
            figures.save_figure(fig, bad, tmp_path)
    with pytest.raises(ValueError, match="format"):
        figures.save_figure(fig, "demo", tmp_path, formats=("jpg",))


# --- the schedule explorer of notebook 03 ---------------------------------------------------------------------
def test_schedule_explorer_follows_its_sliders_and_measures_only_on_demand(tiny):
    import ipywidgets as widgets

    from lazymar.schedules import RedundancyProfile
    from analysis.explorer import SUMMARY_CLASS, ScheduleExplorer
    from lazymar.recording import RedundancyRecorder

    settings = SamplingSettings(num_iter=6, cfg=2.0)
    with RedundancyRecorder(tiny, model_name="tiny") as recorder:
        generate(tiny, [0, 1, 2, 3], settings, seed=0)
    profile = RedundancyProfile.from_stats(recorder.to_dataset())
    loads = []
    explorer = ScheduleExplorer(profile, model_loader=lambda: loads.append(1) or tiny, check_samples=2)
    assert loads == [] and explorer.last_check is None  # nothing is measured on display

    def sliders(widget):
        if isinstance(widget, (widgets.FloatSlider, widgets.IntSlider)):
            yield widget
        for child in getattr(widget, "children", ()):
            yield from sliders(child)

    tau = [s for s in sliders(explorer.widget) if s.description == "tau_token"]
    assert len(tau) == 1 and tau[0] is explorer.tau_token
    assert tau[0].value < tau[0].max and not tau[0].continuous_update
    assert SUMMARY_CLASS in explorer.summary._dom_classes
    before = explorer.summary.value
    assert f"tau_token = {tau[0].value:.{explorer._digits}f}" in before
    tau[0].value = tau[0].value + tau[0].step
    assert explorer.summary.value != before
    assert f"tau_token = {tau[0].value:.{explorer._digits}f}" in explorer.summary.value
    assert explorer.derived.params["tau_token"] == pytest.approx(tau[0].value)

    result = explorer.run_check()
    assert loads == [1] and list(result.table.index) == ["none", "derived", "lazymar"]
    assert result.table.loc["derived", "flops_ratio"] > 1.0
    again = explorer.run_check()  # the uncached run is reused: same reference, same PSNR
    assert loads == [1] and again.table.loc["derived", "token_mse"] == result.table.loc["derived", "token_mse"]
