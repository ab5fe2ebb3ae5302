# %% [markdown]
# # 04 · Paper figures
#
# Regenerates every figure (PNG and PDF) and table (CSV and Markdown) of the write-up into `FIGURES` (by default
# the ignored `runs/figures`; the committed `data/figures` are made by `make figures`, which pins the settings):
# token redundancy, condition redundancy, the schedules, the speed/quality table (none / lazymar / derived), and
# the ablations (each cache mechanism alone; similarity vs random selection; refresh interval). The ablations are
# measured here on `ABLATION_SAMPLES` samples at the recording's settings; FID needs more samples than that, so
# they report FLOPs ratio, PSNR against the uncached run and class accuracy. The last section puts the models of
# `COMPARE` side by side (their recordings and sweeps; a missing file is skipped and named).

# %% tags=["parameters"]
STATS = "../data/stats/digits.nc"
SWEEP = "../data/sweeps/digits.csv"        # speed/quality from the sweep when present, else measured here
SCHEDULES = "../data/schedules"            # derived schedules <model name>_*.json to include (the model name: MODEL,
                                           # or a checkpoint's file stem); none: derive with defaults
MODEL = "digits"                           # "digits", "digits16" or a path to an official MAR checkpoint
VAE = None                                 # path to the KL-16 VAE of an official MAR (images, PSNR); None: none
DEVICE = "cpu"
ARCH = None                                # architecture of a checkpoint that does not name it (e.g. "mar_base")
FIGURES = "../runs/figures"                # the ignored runs/; `make figures` writes the committed data/figures
LIVE_SAMPLES = 4                           # live captures (step x step matrix, absolute changes)
ABLATION_SAMPLES = 10                      # measured runs of the ablations (one per class for digits)
REFRESH_INTERVALS = (3, 5, 9, 16)          # refresh every k steps after the warm-up (9 = released at 64 steps)
SEED = 0
COMPARE = {                                # models side by side: name -> (recording, sweep); missing files skipped
    "digits": ("../data/stats/digits.nc", "../data/sweeps/digits_heldout_seed7.csv"),
    "digits16": ("../data/stats/digits16.zarr", "../data/sweeps/digits16_heldout_seed7.csv"),
}

# %%
import json
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from analysis import (figures, live_features, model_comparison, phenomena, redundancy_plots, schedule_plots, schedule_runs,
                      workbook)
from lazymar.cache.schedule_file import CacheSchedule, lazymar_schedule
from lazymar.recording import load_stats
from lazymar.runs import balanced_labels
from lazymar.schedules import RedundancyProfile, derive_schedule, schedule_matrix

writer = workbook.FigureWriter(FIGURES)
save, save_table = writer.figure, writer.table


# %%
ds = load_stats(STATS)
settings = phenomena.sampling_settings(ds.attrs)
display(Markdown(workbook.describe_recording(ds, STATS)))
model, vae = workbook.load_model(MODEL, VAE, DEVICE, ARCH)
live_labels = balanced_labels(LIVE_SAMPLES, model.config.class_num)

# %% [markdown]
# ## Token redundancy

# %%
decoder_layers = [layer for layer in map(str, ds.layer.values) if layer.startswith("decoder.")]
save(redundancy_plots.plot_cosine_ecdf(ds, layers=decoder_layers, kind="v", ncols=len(decoder_layers)), "token_ecdf_v");
save(redundancy_plots.plot_step_layer_heatmap(phenomena.step_layer_matrix(ds, "log10_change"),
                                   title="Typical change of a position (block outputs)",
                                   colorbar_label="mean log10(1 − cosine to step s−1)"), "token_heatmap_change");
save(redundancy_plots.plot_step_layer_heatmap(phenomena.step_layer_matrix(ds, "mean", statuses=["new"]),
                                   title="Mean cosine of the tokens decoded at step s−1", colorbar_label="mean cosine",
                                   cmap="magma"), "token_heatmap_new");
fractions = phenomena.fraction_above(ds, (0.95, 0.99), layers=[decoder_layers[0], decoder_layers[-1], "z"])
save(redundancy_plots.plot_fraction_above(fractions), "token_fraction_above");
save(redundancy_plots.plot_encoder_vs_decoder(phenomena.encoder_vs_decoder(ds)), "token_encoder_vs_decoder");
captured = live_features.capture_step_features(model, live_labels, settings, layers=(decoder_layers[0], "z"), seed=SEED,
                                          progress=True)
similarity = live_features.step_similarity_matrix(captured["z"][:, :LIVE_SAMPLES])
save(redundancy_plots.plot_step_similarity(similarity, "z"), "token_step_similarity");
save_table(phenomena.group_summary(ds, (0.95, 0.99)), "token_group_summary")

# %% [markdown]
# ## Condition redundancy

# %%
unknown = ["to_predict", "masked"]
not_encoder = [layer for layer in map(str, ds.layer.values) if not layer.startswith("encoder.")]
save(redundancy_plots.plot_step_layer_heatmap(
    phenomena.step_layer_matrix(ds, "mean", variable="cfg_residual_cosine", statuses=unknown, layers=not_encoder),
    title=r"$\cos(r_s, r_{s-1})$ of the CFG residual, unknown positions", colorbar_label="mean cosine"),
    "condition_residual_heatmap");
relative = save_table(phenomena.branch_vs_residual(ds, statistic="median"), "condition_relative_change")
save(redundancy_plots.plot_change_ratio(relative, ylabel="branch / residual relative change"), "condition_relative_ratio");
absolute = {layer: live_features.absolute_change(f) for layer, f in captured.items()}
ratios = pd.DataFrame({layer: live_features.overall_change_ratio(df) for layer, df in absolute.items()}).T
ratios.index.name = "layer"
save_table(ratios, "condition_absolute_ratio")
save(redundancy_plots.plot_branch_vs_residual(absolute["z"], ylabel=r"$\|x_s - x_{s-1}\|$ (mean over positions)",
                                   title=f"Absolute change per step at z ({LIVE_SAMPLES} live samples)"),
     "condition_absolute_change");
save(redundancy_plots.plot_head_change(phenomena.head_change_profile(ds, statistic="median")), "head_change");
display(Markdown(
    f"Absolute change, branch over residual (z): cond {ratios.loc['z', 'cond_over_residual']:.2f}x, "
    f"uncond {ratios.loc['z', 'uncond_over_residual']:.2f}x; relative change at z: cond "
    f"{relative.loc['z', 'cond_over_residual']:.2f}x."))

# %% [markdown]
# ## Schedules

# %%
profile = RedundancyProfile.from_stats(ds)
derived = {}
for path in sorted(Path(SCHEDULES).glob(f"{workbook.model_label(MODEL)}_*.json")) if Path(SCHEDULES).is_dir() else []:
    schedule = CacheSchedule.from_dict(json.loads(path.read_text()))
    if schedule.num_iter == settings.num_iter:
        derived[f"derived ({path.stem})"] = schedule
if not derived:
    default = derive_schedule(profile)
    derived[f"derived ({default.schedule.name})"] = default.schedule
released = lazymar_schedule(settings.num_iter, model.config)
shown = {"lazymar": released, **derived}
fig, axes = figures.subplots(len(shown), 1, figsize=(8, 1.9 * len(shown)))
for ax, (name, schedule) in zip(np.atleast_1d(axes), shown.items()):
    schedule_plots.plot_schedule(schedule_matrix(schedule), title=name, ax=ax)
save(fig, "schedules");
display(Markdown("Schedules: " + ", ".join(f"`{name}`" for name in shown) + "."))

# %% [markdown]
# ## Speed / quality

# %%
from lazymar.sweep import load_sweep, pareto_front

if Path(SWEEP).is_file():
    sweep = load_sweep(SWEEP)
    table = schedule_runs.speed_quality_from_sweep(sweep)
    samples = f"{int(sweep['num_samples'].iloc[0])} samples" if "num_samples" in sweep else "its samples"
    source = f"the sweep `{SWEEP}` ({samples}; derived rows: those on the Pareto front)"
    save(schedule_plots.plot_tradeoff(sweep, label="name", front=pareto_front(sweep)), "tradeoff");
else:
    labels = balanced_labels(ABLATION_SAMPLES, model.config.class_num)
    runs = schedule_runs.measure_schedules(model, {"lazymar": released, **derived}, labels, settings, seed=SEED,
                                     progress=True, vae=vae)
    table = runs.table[["flops_ratio", "wall_ratio", "psnr", "accuracy"]]
    source = f"measured here on {ABLATION_SAMPLES} samples (no sweep at `{SWEEP}`; FID needs more samples)"
save_table(table, "speed_quality")
display(table.round(3))
display(Markdown(f"Speed/quality from {source}."))

# %% [markdown]
# ## Ablations

# %%
labels = balanced_labels(ABLATION_SAMPLES, model.config.class_num)
metrics = [("flops_ratio", "FLOPs ratio (uncached / cached)"), ("psnr", "PSNR vs uncached (dB)")]
mechanisms = schedule_runs.ablation_schedules(model.config, settings.num_iter)
selection = {f"token cache, {k} selection": s for k, s in schedule_runs.selection_schedules(model.config, settings.num_iter,
                                                                                      seed=SEED).items()}
intervals = {f"refresh every {k}": schedule_runs.refresh_interval_schedule(model.config, settings.num_iter, k)
             for k in REFRESH_INTERVALS}
runs = schedule_runs.measure_schedules(model, {**mechanisms, **selection, **intervals}, labels, settings, seed=SEED,
                                 progress=True, vae=vae)
table = runs.table
save_table(table, "ablations")
save(schedule_plots.plot_ablation(table.loc[list(mechanisms)], metrics, title="Cache mechanisms alone and together"),
     "ablation_mechanisms");
save(schedule_plots.plot_ablation(table.loc[list(selection)], metrics, title="Token cache: which positions to recompute"),
     "ablation_selection");
refresh = table.loc[list(intervals)].assign(interval=list(REFRESH_INTERVALS))
save(schedule_plots.plot_metric_lines(refresh, "interval", metrics, "refresh interval (MAR steps)",
                             title="Refresh interval of the LazyMAR scheme"), "ablation_refresh_interval");
display(table.round(3))
sim, rnd = table.loc["token cache, similarity selection"], table.loc["token cache, random selection"]
display(Markdown(
    f"On {ABLATION_SAMPLES} samples: the token cache alone gives {table.loc['token cache only', 'flops_ratio']:.2f}x "
    f"FLOPs at {table.loc['token cache only', 'psnr']:.1f} dB, the condition cache alone "
    f"{table.loc['condition cache only', 'flops_ratio']:.2f}x at {table.loc['condition cache only', 'psnr']:.1f} dB, "
    f"the head cache alone {table.loc['head cache only', 'flops_ratio']:.2f}x at "
    f"{table.loc['head cache only', 'psnr']:.1f} dB, all together {table.loc['all (lazymar)', 'flops_ratio']:.2f}x at "
    f"{table.loc['all (lazymar)', 'psnr']:.1f} dB. At equal FLOPs, similarity selection reaches {sim['psnr']:.1f} dB "
    f"and random selection {rnd['psnr']:.1f} dB. Class accuracy over all runs: {table['accuracy'].min():.0%} to "
    f"{table['accuracy'].max():.0%}."))

# %% [markdown]
# ## Models side by side: the token grid
#
# The models of `COMPARE` (e.g. `digits`, 8x8 tokens of one channel, and `digits16`, 16x16 tokens of 4 channels:
# the official layout of 256 tokens + a 64-position buffer) from their own recordings and sweeps: token redundancy
# (V of the first and last decoder block, positions a token cache may reuse), condition redundancy (the CFG
# residual at z), the selection-layer study, and the best schedules of each sweep.

# %%
models = model_comparison.open_models(COMPARE)
if models.missing:
    display(Markdown("Left out of the comparison:\n\n" + models.missing_markdown()))
if models.recordings:
    tokens = model_comparison.token_redundancy(models.recordings)
    save(model_comparison.plot_token_redundancy(tokens), "models_token_redundancy");
    condition = model_comparison.condition_redundancy(models.recordings)
    save(model_comparison.plot_condition_redundancy(condition), "models_condition_redundancy");
    selection = model_comparison.selection_layers(models.recordings)
    save(model_comparison.plot_selection_layers(selection), "models_selection_layer");
    save_table(selection.set_index(["model", "layer"]), "models_selection_layer")
    best = model_comparison.best_schedules(models.sweeps)
    save(model_comparison.plot_tradeoffs(models.sweeps, best), "models_tradeoff");
    if len(best):
        save_table(best, "models_summary")
        display(best.round(3))
    finest = max(tokens["threshold"])
    lines = []
    for name in models.recordings:
        reusable = tokens[(tokens["model"] == name) & (tokens["threshold"] == finest)].groupby("block")["fraction"]
        chosen = selection[(selection["model"] == name) & selection["recommended"]]["layer"].item()
        residual = condition.loc[condition["model"] == name, "residual_cosine"].mean()
        lines.append(f"- **{name}** ({selection.loc[selection['model'] == name, 'grid'].iloc[0]}): V cosine > "
                     f"{finest:g} on {reusable.mean()['first decoder block']:.0%} (first decoder block) and "
                     f"{reusable.mean()['last decoder block']:.0%} (last) of the reusable positions, mean over steps; "
                     f"CFG residual cosine at z {residual:.5f}; selection layer {chosen}.")
    display(Markdown("\n".join(lines)))
else:
    display(Markdown("No recording of `COMPARE` exists: no comparison."))

# %%
display(Markdown(writer.summary()))
