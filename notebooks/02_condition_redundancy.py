# %% [markdown]
# # 02 · Condition redundancy
#
# With classifier-free guidance every step runs a conditional and an unconditional branch. LazyMAR reuses their
# difference, the residual *r = h_cond − h_uncond*, between refreshes, because it changes little from step to step.
# The recording holds, per layer, step and position, the cosine of *r_s* with *r_{s−1}* and the relative changes
# ‖x_s − x_{s−1}‖ / ‖x_{s−1}‖ of *r*, of *h_cond* and of *h_uncond*; and in the diffusion head, across its own
# sampling steps, the relative change of the eps CFG difference and of each res-block's residual update.

# %% tags=["parameters"]
STATS = "../data/stats/digits.nc"   # a recording made with `lazymar record` (with CFG): a .nc file or a .zarr
                                    # store (read lazily, chunk by chunk: a store larger than memory works)
MODEL = "digits"                    # model for the live absolute-change measurement
LIVE_SAMPLES = 4
LIVE_LAYERS = ("decoder.0", "decoder.3", "z")
SEED = 0
FIGURES = None                      # folder to also save the figures into (None: display only)

# %%
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from analysis import phenomena, plots, redundancy_plots, workbook
from lazymar.recording import load_stats


writer = workbook.FigureWriter(FIGURES)
save = writer.figure

# %%
ds = load_stats(STATS)
settings = phenomena.sampling_settings(ds.attrs)
display(Markdown(workbook.describe_recording(ds, STATS)))
if settings.cfg == 1.0:
    raise ValueError(f"{STATS} was recorded without CFG (cfg = 1): there is no condition redundancy to show")

# %% [markdown]
# ## Residual similarity per step and layer
#
# Mean cosine of *r_s* with *r_{s−1}* over the positions still unknown (to predict or masked), whose *z* the head
# reads; the first step has no predecessor.

# %%
unknown = ["to_predict", "masked"]
not_encoder = [layer for layer in map(str, ds.layer.values) if not layer.startswith("encoder.")]  # sees no unknowns
residual = phenomena.step_layer_matrix(ds, "mean", variable="cfg_residual_cosine", statuses=unknown,
                                       layers=not_encoder)
save(redundancy_plots.plot_step_layer_heatmap(
    residual, title="cos(r_s, r_{s−1}) of the CFG residual, unknown positions", colorbar_label="mean cosine",
    cmap="viridis"), "nb_condition_residual_heatmap");
above = phenomena.fraction_above(ds, (0.95, 0.99), variable="cfg_residual_cosine", statuses=unknown)
per_layer = above.groupby("layer").mean().drop(columns="count")
display(per_layer.round(4))
display(Markdown(
    f"Residual cosine over all layers and steps: mean {float(residual.mean()):.4f}, lowest step x layer mean "
    f"{float(residual.min()):.4f}; {float(per_layer['above_0.99'].mean()):.1%} of unknown positions stay above 0.99 "
    f"per step on average."))

# %% [markdown]
# ## Branch change vs residual change
#
# The paper reports the residual changing about 35x less than the branches. Two ways to measure it here:
# **relative** changes from the recording (each quantity against its own size), and **absolute** changes
# ‖x_s − x_{s−1}‖ from a live run (the recording keeps no norms).

# %%
relative = phenomena.branch_vs_residual(ds, statistic="median")
display(relative.round(4))
save(redundancy_plots.plot_change_ratio(
    relative, title="Relative change: branch / residual (median over samples, steps, positions)",
    ylabel="branch / residual relative change"), "nb_condition_relative_ratio");
last = relative.index[-1]
per_step = phenomena.branch_vs_residual(ds, statistic="median", by="step", layers=[last]).xs(last, level="layer")
save(redundancy_plots.plot_branch_vs_residual(per_step, title=f"Relative change per step at {last} (median)"),
     "nb_condition_relative_change");
display(Markdown(
    f"Relative to their own size, the cond branch at `{last}` changes {relative.loc[last, 'cond_over_residual']:.2f}x "
    f"as much as the residual (uncond: {relative.loc[last, 'uncond_over_residual']:.2f}x); over all layers the "
    f"ratio ranges from {relative['cond_over_residual'].min():.2f} to {relative['cond_over_residual'].max():.2f}."))

# %%
from lazymar.checkpoint import load_model
from lazymar.runs import balanced_labels

model = load_model(MODEL)
labels = balanced_labels(LIVE_SAMPLES, model.config.class_num)
captured = phenomena.capture_step_features(model, labels, settings, layers=LIVE_LAYERS, seed=SEED)
absolute = {layer: phenomena.absolute_change(f) for layer, f in captured.items()}
ratios = pd.DataFrame({layer: phenomena.overall_change_ratio(df) for layer, df in absolute.items()}).T
ratios.index.name = "layer"
display(ratios.round(3))
save(redundancy_plots.plot_branch_vs_residual(
    absolute[LIVE_LAYERS[-1]], ylabel="‖x_s − x_{s−1}‖ (mean over positions)",
    title=f"Absolute change per step at {LIVE_LAYERS[-1]} ({LIVE_SAMPLES} live samples)"), "nb_condition_absolute_change");
display(Markdown(
    f"In absolute terms (summed over steps, {LIVE_SAMPLES} live samples) the cond branch changes "
    + ", ".join(f"{r:.2f}x" for r in ratios["cond_over_residual"])
    + f" as much as the residual at {', '.join(f'`{l}`' for l in ratios.index)} (the paper reports about 35x). "
    + ("The residual is the stabler quantity in every layer shown." if (ratios["cond_over_residual"] > 1).all()
       else "The residual is not the stabler quantity in every layer shown.")))

# %% [markdown]
# ## Diffusion head
#
# Inside one MAR step the head runs its own reverse diffusion. The released LazyMAR code reuses, between full head
# steps, the eps CFG difference and the residual updates of some res-blocks. Their relative change from one head
# step to the next (median over samples and MAR steps):

# %%
head = phenomena.head_change_profile(ds, statistic="median")
save(redundancy_plots.plot_head_change(head), "nb_condition_head_change");
late = head.loc[head.index >= head.index.max() // 2]
display(Markdown(
    "Median relative change per head step, averaged over the head steps: "
    + ", ".join(f"{part} {head[part].mean():.3f}" for part in head.columns)
    + "; over the second half of the head steps: "
    + ", ".join(f"{part} {late[part].mean():.3f}" for part in late.columns) + "."))
