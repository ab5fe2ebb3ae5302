"""Write the workbook's notebooks (01-04) with nbformat, without outputs.

The notebooks are generated from this file so that they stay short, consistent and output-free; edit here and
run ``python notebooks/build_notebooks.py`` (or edit a notebook in Jupyter and clear its outputs before saving).
Every number in the prose is computed by the notebook (``display(Markdown(f"..."))``), never typed in.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import sys
from pathlib import Path

if (Path.cwd().parent / "analysis").is_dir():  # run from notebooks/: the repository, if lazymar is not installed
    sys.path.insert(0, str(Path.cwd().parent))

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from analysis import phenomena, plots
from lazymar.recording import load_stats
'''

LOAD = '''\
ds = load_stats(STATS)
attrs = ds.attrs
settings = phenomena.sampling_settings(attrs)
display(Markdown(
    f"Recording `{STATS}`: model **{attrs['model']}**, {ds.sizes['sample']} samples, {ds.sizes['step']} MAR steps, "
    f"CFG {settings.cfg:g} ({settings.cfg_schedule}), temperature {settings.temperature:g}, "
    f"{ds.sizes['position']} positions (buffer {int(attrs['buffer_size'])} + {int(attrs['seq_len'])} tokens), "
    f"layers {', '.join(map(str, ds.layer.values))}."))
'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str, tags: tuple[str, ...] = ()):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def params(text: str):
    return code(text, ("parameters",))


# --- 01 --------------------------------------------------------------------------------------------------------
NB01 = [
    md("""
# 01 · Token redundancy

How much does each position's feature change from one MAR step to the next? For every layer the recording holds
the cosine similarity of each position's features at step *s* with step *s−1*, and each position's status at *s*:
`buffer` (class positions), `known` (decoded before *s−1*), `new` (decoded at *s−1*), `to_predict` (decoded at *s*)
and `masked`. Similarities sit very close to 1, so the plots show **1 − cosine on a log axis**.

The parameters cell points at the recording (made with `lazymar record`) and the model used for the live
step x step similarity (which a recording does not keep). Paths are relative to `notebooks/`.
"""),
    params('''\
STATS = "../data/stats/digits.nc"   # a recording made with `lazymar record`
MODEL = "digits"                    # "digits" or a path to an official MAR checkpoint (live step x step matrix)
KIND = "output"                     # feature kind for the distributions: "output", "k" or "v"
FOCUS_LAYER = "decoder.3"           # the layer quoted in the prose
THRESHOLDS = (0.95, 0.99)
LIVE_SAMPLES = 4                    # samples generated for the step x step matrix
LIVE_LAYER = "z"                    # "decoder.i" or "z"
SEED = 0
'''),
    code(SETUP),
    code(LOAD),
    md("""
## Distributions by position status

One panel per layer: the ECDF of 1 − cosine over all samples, steps and positions, one curve per status.
"""),
    code('''\
plots.plot_cosine_ecdf(ds, kind=KIND);
groups = phenomena.values_by_status(ds, FOCUS_LAYER, kind=KIND)
change = {status: float(np.mean(1 - v)) for status, v in groups.items()}
display(Markdown(
    f"Mean 1 − cosine at `{FOCUS_LAYER}` ({KIND}) by status: "
    + ", ".join(f"{s} {c:.2e}" for s, c in change.items())
    + f". The tokens decoded at the previous step change {change['new'] / change['known']:.0f}x more than the "
      f"tokens known before it, and {change['new'] / change['masked']:.0f}x more than the still-masked positions."))
'''),
    md("""
LazyMAR ranks positions by the similarity of their attention **values V**; the same distributions for V in the
decoder (violins of log10(1 − cosine), a fixed random subsample per violin):
"""),
    code('''\
decoder_layers = [layer for layer in map(str, ds.layer.values) if layer.startswith("decoder.")]
plots.plot_cosine_violin(ds, layers=decoder_layers, kind="v");
'''),
    md("""
## Step x layer heat maps

Left to right the generation proceeds; top to bottom the layers (encoder, decoder, then z, the head's
conditioning). First the typical change of a position, the mean of log10(1 − cosine) over all positions (a
geometric mean); then the mean cosine of the tokens decoded at the previous step, the ones that change most.
"""),
    code('''\
typical = phenomena.step_layer_matrix(ds, "log10_change", kind=KIND)
plots.plot_step_layer_heatmap(typical, title=f"Typical change of a position ({KIND})",
                              colorbar_label="mean log10(1 − cosine to step s−1)");
new = phenomena.step_layer_matrix(ds, "mean", kind=KIND, statuses=["new"])
plots.plot_step_layer_heatmap(new, title="Mean cosine of the tokens decoded at step s−1",
                              colorbar_label="mean cosine", cmap="magma");
'''),
    md("## Fraction of positions above 0.95 and 0.99 per step"),
    code('''\
fraction_layers = [layer for layer in (decoder_layers[0], FOCUS_LAYER, "z") if layer in ds.layer]
fractions = phenomena.fraction_above(ds, THRESHOLDS, layers=list(dict.fromkeys(fraction_layers)), kind=KIND)
plots.plot_fraction_above(fractions);
per_layer = phenomena.fraction_above(ds, THRESHOLDS, kind=KIND).groupby("layer").mean().drop(columns="count")
display(per_layer.round(4))
focus = per_layer.loc[FOCUS_LAYER]
others = ["buffer", "known", "to_predict", "masked"]
rest = phenomena.fraction_above(ds, THRESHOLDS, layers=[FOCUS_LAYER], kind=KIND, statuses=others).mean()
just_decoded = phenomena.fraction_above(ds, THRESHOLDS, layers=[FOCUS_LAYER], kind=KIND, statuses=["new"]).mean()
display(Markdown(
    f"Averaged over steps, {focus.iloc[0]:.1%} of the positions at `{FOCUS_LAYER}` keep a cosine above "
    f"{THRESHOLDS[0]:g} to the previous step and {focus.iloc[-1]:.1%} above {THRESHOLDS[-1]:g}; the lowest share "
    f"above {THRESHOLDS[-1]:g} in any layer is {per_layer.iloc[:, -1].min():.1%} (`{per_layer.iloc[:, -1].idxmin()}`). "
    f"Leaving out the tokens decoded at the previous step, {rest.iloc[-1]:.2%} stay above {THRESHOLDS[-1]:g}; of those "
    f"tokens, {just_decoded.iloc[-1]:.1%} do."))
'''),
    md("""
## Encoder vs decoder

The encoder sees only the buffer and the known tokens, the decoder every position. On the positions both see:
"""),
    code('''\
evd = phenomena.encoder_vs_decoder(ds, kind=KIND)
plots.plot_encoder_vs_decoder(evd);
display(phenomena.group_summary(ds, THRESHOLDS, kind=KIND).round(5))
display(Markdown(
    f"On the buffer and known tokens the encoder's features change by 1 − cos = {evd.encoder_change.mean():.2e} "
    f"per step on average, the decoder's by {evd.decoder_change.mean():.2e} "
    f"({evd.decoder_change.mean() / evd.encoder_change.mean():.1f}x the encoder's)."))
'''),
    md("""
## Step x step similarity (live)

A recording keeps only adjacent steps. Here the model generates a few samples with forward hooks that keep one
layer's features at every step (conditional branch), and the matrix shows the mean cosine between any two steps.
"""),
    code('''\
from lazymar.checkpoint import load_model
from lazymar.grid import balanced_labels

model = load_model(MODEL)
labels = balanced_labels(LIVE_SAMPLES, model.config.class_num)
features = phenomena.capture_step_features(model, labels, settings, layers=[LIVE_LAYER], seed=SEED)[LIVE_LAYER]
cond = features[:, :LIVE_SAMPLES]  # rows are [cond; uncond] under CFG
similarity = phenomena.step_similarity_matrix(cond)
plots.plot_step_similarity(similarity, LIVE_LAYER);
lags = {k: float(np.mean(np.diagonal(similarity, k))) for k in (1, 4, 16) if k < len(similarity)}
display(Markdown(
    f"`{LIVE_LAYER}` on {LIVE_SAMPLES} samples: mean cosine between steps k apart "
    + ", ".join(f"{v:.4f} at k = {k}" for k, v in lags.items())
    + f"; first vs last step {similarity[0, -1]:.4f}. Similarity decays with the distance in steps, which is why "
      "a cache must be refreshed now and then."))
'''),
]

# --- 02 --------------------------------------------------------------------------------------------------------
NB02 = [
    md("""
# 02 · Condition redundancy

With classifier-free guidance every step runs a conditional and an unconditional branch. LazyMAR reuses their
difference, the residual *r = h_cond − h_uncond*, between refreshes, because it changes little from step to step.
The recording holds, per layer, step and position, the cosine of *r_s* with *r_{s−1}* and the relative changes
‖x_s − x_{s−1}‖ / ‖x_{s−1}‖ of *r*, of *h_cond* and of *h_uncond*; and in the diffusion head, across its own
sampling steps, the relative change of the eps CFG difference and of each res-block's residual update.
"""),
    params('''\
STATS = "../data/stats/digits.nc"   # a recording made with `lazymar record` (with CFG)
MODEL = "digits"                    # model for the live absolute-change measurement
LIVE_SAMPLES = 4
LIVE_LAYERS = ("decoder.0", "decoder.3", "z")
SEED = 0
'''),
    code(SETUP),
    code(LOAD + '''\
if settings.cfg == 1.0:
    raise ValueError(f"{STATS} was recorded without CFG (cfg = 1): there is no condition redundancy to show")
'''),
    md("""
## Residual similarity per step and layer

Mean cosine of *r_s* with *r_{s−1}* over the positions still unknown (to predict or masked), whose *z* the head
reads; the first step has no predecessor.
"""),
    code('''\
unknown = ["to_predict", "masked"]
not_encoder = [layer for layer in map(str, ds.layer.values) if not layer.startswith("encoder.")]  # sees no unknowns
residual = phenomena.step_layer_matrix(ds, "mean", variable="cfg_residual_cosine", statuses=unknown,
                                       layers=not_encoder)
plots.plot_step_layer_heatmap(residual, title="cos(r_s, r_{s−1}) of the CFG residual, unknown positions",
                              colorbar_label="mean cosine", cmap="viridis");
above = phenomena.fraction_above(ds, (0.95, 0.99), variable="cfg_residual_cosine", statuses=unknown)
per_layer = above.groupby("layer").mean().drop(columns="count")
display(per_layer.round(4))
display(Markdown(
    f"Residual cosine over all layers and steps: mean {float(residual.mean()):.4f}, lowest step x layer mean "
    f"{float(residual.min()):.4f}; {float(per_layer['above_0.99'].mean()):.1%} of unknown positions stay above 0.99 "
    f"per step on average."))
'''),
    md("""
## Branch change vs residual change

The paper reports the residual changing about 35x less than the branches. Two ways to measure it here:
**relative** changes from the recording (each quantity against its own size), and **absolute** changes
‖x_s − x_{s−1}‖ from a live run (the recording keeps no norms).
"""),
    code('''\
relative = phenomena.branch_vs_residual(ds, statistic="median")
display(relative.round(4))
plots.plot_change_ratio(relative, title="Relative change: branch / residual (median over samples, steps, positions)",
                        ylabel="branch / residual relative change");
last = relative.index[-1]
per_step = phenomena.branch_vs_residual(ds, statistic="median", by="step", layers=[last]).xs(last, level="layer")
plots.plot_branch_vs_residual(per_step, title=f"Relative change per step at {last} (median)");
display(Markdown(
    f"Relative to their own size, the cond branch at `{last}` changes {relative.loc[last, 'cond_over_residual']:.2f}x "
    f"as much as the residual (uncond: {relative.loc[last, 'uncond_over_residual']:.2f}x); over all layers the "
    f"ratio ranges from {relative['cond_over_residual'].min():.2f} to {relative['cond_over_residual'].max():.2f}."))
'''),
    code('''\
from lazymar.checkpoint import load_model
from lazymar.grid import balanced_labels

model = load_model(MODEL)
labels = balanced_labels(LIVE_SAMPLES, model.config.class_num)
captured = phenomena.capture_step_features(model, labels, settings, layers=LIVE_LAYERS, seed=SEED)
absolute = {layer: phenomena.absolute_change(f) for layer, f in captured.items()}
ratios = pd.DataFrame({layer: phenomena.overall_change_ratio(df) for layer, df in absolute.items()}).T
ratios.index.name = "layer"
display(ratios.round(3))
plots.plot_branch_vs_residual(absolute[LIVE_LAYERS[-1]], ylabel="‖x_s − x_{s−1}‖ (mean over positions)",
                              title=f"Absolute change per step at {LIVE_LAYERS[-1]} ({LIVE_SAMPLES} live samples)");
display(Markdown(
    f"In absolute terms (summed over steps, {LIVE_SAMPLES} live samples) the cond branch changes "
    + ", ".join(f"{r:.2f}x" for r in ratios["cond_over_residual"])
    + f" as much as the residual at {', '.join(f'`{l}`' for l in ratios.index)} (the paper reports about 35x). "
    + ("The residual is the stabler quantity in every layer shown." if (ratios["cond_over_residual"] > 1).all()
       else "The residual is not the stabler quantity in every layer shown.")))
'''),
    md("""
## Diffusion head

Inside one MAR step the head runs its own reverse diffusion. The released LazyMAR code reuses, between full head
steps, the eps CFG difference and the residual updates of some res-blocks. Their relative change from one head
step to the next (median over samples and MAR steps):
"""),
    code('''\
head = phenomena.head_change_profile(ds, statistic="median")
plots.plot_head_change(head);
late = head.loc[head.index >= head.index.max() // 2]
display(Markdown(
    "Median relative change per head step, averaged over the head steps: "
    + ", ".join(f"{part} {head[part].mean():.3f}" for part in head.columns)
    + "; over the second half of the head steps: "
    + ", ".join(f"{part} {late[part].mean():.3f}" for part in late.columns) + "."))
'''),
]

# --- 03 --------------------------------------------------------------------------------------------------------
NB03 = [
    md("""
# 03 · Cache schedules

Derive a cache schedule from the recording with five thresholds and a selection layer (see `analysis/derive.py`):

- **tau_token**: on cached steps the decoder recomputes, after the selection layer, the positions whose V
  similarity to the previous step is below tau_token (plus the tokens to predict and those just decoded);
- **tau_refresh**: refresh everything when the change accumulated since the last refresh reaches tau_refresh
  (in units of an average step's change);
- **tau_cfg**: reuse the CFG residual while its estimated similarity to the last computed one stays ≥ tau_cfg;
- **tau_head**: the head reuses the parts whose accumulated change stays ≤ tau_head.
- **tau_buffer**: the encoder keeps the buffer cached too (only the newly decoded tokens run) while the buffer's
  accumulated change since a refresh keeps a similarity ≥ tau_buffer (1.0: recompute it, as LazyMAR).

Moving a slider re-derives the schedule: the summary, the heat map (1 = recomputed) and its predicted FLOPs ratio
on the measured trade-off front update. The button runs the uncached sampler, the derived schedule and the
released LazyMAR preset on a few samples and shows fidelity and the samples side by side.
"""),
    params('''\
STATS = "../data/stats/digits.nc"      # the recording to derive from
SWEEP = "../data/sweeps/digits.csv"    # trade-off sweep (`lazymar sweep`), optional
MODEL = "digits"                       # model for the measured check
CHECK_SAMPLES = 8                      # samples of the measured check (button)
SEED = 0
'''),
    code('''\
import sys
from pathlib import Path

if (Path.cwd().parent / "analysis").is_dir():  # run from notebooks/: the repository, if lazymar is not installed
    sys.path.insert(0, str(Path.cwd().parent))

from IPython.display import Markdown, display

from analysis.derive import RedundancyProfile
from analysis.explorer import ScheduleExplorer
from analysis.sweep import load_sweep
from lazymar.checkpoint import load_model

profile = RedundancyProfile.from_stats(STATS)
sweep = load_sweep(SWEEP) if Path(SWEEP).is_file() else None
study = profile.selection
best = study.loc[study["recommended"]].iloc[0]
display(Markdown(
    f"Recording `{STATS}`: {profile.num_samples} samples, {profile.num_iter} steps. The selection-layer study "
    f"recommends `{best.name}` (AUROC {best['auroc']:.3f} for finding the 20% most changing positions, Spearman "
    f"{best['spearman']:.3f}). Trade-off sweep: "
    + (f"{len(sweep)} measured points from `{SWEEP}`." if sweep is not None else f"none found at `{SWEEP}`.")))
display(study.drop(columns=["recommended"]).round(3))
'''),
    code('''\
explorer = ScheduleExplorer(profile, sweep=sweep, model_loader=lambda: load_model(MODEL),
                            check_samples=CHECK_SAMPLES, seed=SEED)
display(explorer.widget)
'''),
]

# --- 04 --------------------------------------------------------------------------------------------------------
NB04 = [
    md("""
# 04 · Paper figures

Regenerates every figure (PNG and PDF) and table (CSV and Markdown) of the write-up into `FIGURES`:
token redundancy, condition redundancy, the schedules, the speed/quality table (none / lazymar / derived), and
the ablations (each cache mechanism alone; similarity vs random selection; refresh interval). The ablations are
measured here on `ABLATION_SAMPLES` samples at the recording's settings; FID needs more samples than that, so
they report FLOPs ratio, PSNR against the uncached run and class accuracy.
"""),
    params('''\
STATS = "../data/stats/digits.nc"
SWEEP = "../data/sweeps/digits.csv"        # speed/quality from the sweep when present, else measured here
SCHEDULES = "../data/schedules"            # derived schedules (JSON) to include; none: derive with defaults
MODEL = "digits"
FIGURES = "../data/figures"
LIVE_SAMPLES = 4                           # live captures (step x step matrix, absolute changes)
ABLATION_SAMPLES = 10                      # measured runs of the ablations (one per class for digits)
REFRESH_INTERVALS = (3, 5, 9, 16)          # refresh every k steps after the warm-up (9 = released at 64 steps)
SEED = 0
'''),
    code(SETUP + '''\
import json

import matplotlib.pyplot as plt

from analysis import measure
from analysis.derive import RedundancyProfile, derive_schedule, schedule_matrix
from lazymar.cache.schedule import CacheSchedule, lazymar_schedule
from lazymar.checkpoint import load_model
from lazymar.grid import balanced_labels

written = []


def save(fig, name):
    written.extend(plots.save_figure(fig, name, FIGURES))
    return fig


def save_table(df, name):
    path = Path(FIGURES) / name
    df.to_csv(path.with_suffix(".csv"), float_format="%.6g")
    path.with_suffix(".md").write_text(plots.markdown_table(df))
    written.extend([path.with_suffix(".csv"), path.with_suffix(".md")])
    return df
'''),
    code(LOAD + '''\
model = load_model(MODEL)
live_labels = balanced_labels(LIVE_SAMPLES, model.config.class_num)
'''),
    md("## Token redundancy"),
    code('''\
decoder_layers = [layer for layer in map(str, ds.layer.values) if layer.startswith("decoder.")]
save(plots.plot_cosine_ecdf(ds, layers=decoder_layers, kind="v", ncols=len(decoder_layers)), "token_ecdf_v");
save(plots.plot_step_layer_heatmap(phenomena.step_layer_matrix(ds, "log10_change"),
                                   title="Typical change of a position (block outputs)",
                                   colorbar_label="mean log10(1 − cosine to step s−1)"), "token_heatmap_change");
save(plots.plot_step_layer_heatmap(phenomena.step_layer_matrix(ds, "mean", statuses=["new"]),
                                   title="Mean cosine of the tokens decoded at step s−1", colorbar_label="mean cosine",
                                   cmap="magma"), "token_heatmap_new");
fractions = phenomena.fraction_above(ds, (0.95, 0.99), layers=[decoder_layers[0], decoder_layers[-1], "z"])
save(plots.plot_fraction_above(fractions), "token_fraction_above");
save(plots.plot_encoder_vs_decoder(phenomena.encoder_vs_decoder(ds)), "token_encoder_vs_decoder");
captured = phenomena.capture_step_features(model, live_labels, settings, layers=(decoder_layers[0], "z"), seed=SEED)
similarity = phenomena.step_similarity_matrix(captured["z"][:, :LIVE_SAMPLES])
save(plots.plot_step_similarity(similarity, "z"), "token_step_similarity");
save_table(phenomena.group_summary(ds, (0.95, 0.99)), "token_group_summary")
'''),
    md("## Condition redundancy"),
    code('''\
unknown = ["to_predict", "masked"]
not_encoder = [layer for layer in map(str, ds.layer.values) if not layer.startswith("encoder.")]
save(plots.plot_step_layer_heatmap(
    phenomena.step_layer_matrix(ds, "mean", variable="cfg_residual_cosine", statuses=unknown, layers=not_encoder),
    title="cos(r_s, r_{s−1}) of the CFG residual, unknown positions", colorbar_label="mean cosine"),
    "condition_residual_heatmap");
relative = save_table(phenomena.branch_vs_residual(ds, statistic="median"), "condition_relative_change")
save(plots.plot_change_ratio(relative, ylabel="branch / residual relative change"), "condition_relative_ratio");
absolute = {layer: phenomena.absolute_change(f) for layer, f in captured.items()}
ratios = pd.DataFrame({layer: phenomena.overall_change_ratio(df) for layer, df in absolute.items()}).T
ratios.index.name = "layer"
save_table(ratios, "condition_absolute_ratio")
save(plots.plot_branch_vs_residual(absolute["z"], ylabel="‖x_s − x_{s−1}‖ (mean over positions)",
                                   title=f"Absolute change per step at z ({LIVE_SAMPLES} live samples)"),
     "condition_absolute_change");
save(plots.plot_head_change(phenomena.head_change_profile(ds, statistic="median")), "head_change");
display(Markdown(
    f"Absolute change, branch over residual (z): cond {ratios.loc['z', 'cond_over_residual']:.2f}x, "
    f"uncond {ratios.loc['z', 'uncond_over_residual']:.2f}x; relative change at z: cond "
    f"{relative.loc['z', 'cond_over_residual']:.2f}x."))
'''),
    md("## Schedules"),
    code('''\
profile = RedundancyProfile.from_stats(ds)
derived = {}
for path in sorted(Path(SCHEDULES).glob("*.json")) if Path(SCHEDULES).is_dir() else []:
    schedule = CacheSchedule.from_dict(json.loads(path.read_text()))
    if schedule.num_iter == settings.num_iter:
        derived[f"derived ({path.stem})"] = schedule
if not derived:
    default = derive_schedule(profile)
    derived[f"derived ({default.schedule.name})"] = default.schedule
released = lazymar_schedule(settings.num_iter, model.config)
shown = {"lazymar": released, **derived}
fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.9 * len(shown)), constrained_layout=True)
for ax, (name, schedule) in zip(np.atleast_1d(axes), shown.items()):
    plots.plot_schedule(schedule_matrix(schedule), title=name, ax=ax)
save(fig, "schedules");
display(Markdown("Schedules: " + ", ".join(f"`{name}`" for name in shown) + "."))
'''),
    md("## Speed / quality"),
    code('''\
from analysis.sweep import load_sweep, pareto_front

if Path(SWEEP).is_file():
    sweep = load_sweep(SWEEP)
    table = measure.speed_quality_from_sweep(sweep)
    samples = f"{int(sweep['num_samples'].iloc[0])} samples" if "num_samples" in sweep else "its samples"
    source = f"the sweep `{SWEEP}` ({samples}; derived rows: those on the Pareto front)"
    save(plots.plot_tradeoff(sweep, label="name", front=pareto_front(sweep)), "tradeoff");
else:
    labels = balanced_labels(ABLATION_SAMPLES, model.config.class_num)
    runs = measure.measure_schedules(model, {"lazymar": released, **derived}, labels, settings, seed=SEED)
    table = runs.table[["flops_ratio", "wall_ratio", "psnr", "accuracy"]]
    source = f"measured here on {ABLATION_SAMPLES} samples (no sweep at `{SWEEP}`; FID needs more samples)"
save_table(table, "speed_quality")
display(table.round(3))
display(Markdown(f"Speed/quality from {source}."))
'''),
    md("## Ablations"),
    code('''\
labels = balanced_labels(ABLATION_SAMPLES, model.config.class_num)
metrics = [("flops_ratio", "FLOPs ratio (uncached / cached)"), ("psnr", "PSNR vs uncached (dB)")]
mechanisms = measure.ablation_schedules(model.config, settings.num_iter)
selection = {f"token cache, {k} selection": s for k, s in measure.selection_schedules(model.config, settings.num_iter,
                                                                                      seed=SEED).items()}
intervals = {f"refresh every {k}": measure.refresh_interval_schedule(model.config, settings.num_iter, k)
             for k in REFRESH_INTERVALS}
runs = measure.measure_schedules(model, {**mechanisms, **selection, **intervals}, labels, settings, seed=SEED)
table = runs.table
save_table(table, "ablations")
save(plots.plot_ablation(table.loc[list(mechanisms)], metrics, title="Cache mechanisms alone and together"),
     "ablation_mechanisms");
save(plots.plot_ablation(table.loc[list(selection)], metrics, title="Token cache: which positions to recompute"),
     "ablation_selection");
refresh = table.loc[list(intervals)].assign(interval=list(REFRESH_INTERVALS))
save(plots.plot_metric_lines(refresh, "interval", metrics, "refresh interval (MAR steps)",
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
'''),
    code('''\
display(Markdown(f"Wrote {len(written)} files to `{FIGURES}`:\\n\\n" + "\\n".join(f"- `{Path(p).name}`" for p in written)))
'''),
]


def write(name: str, cells: list) -> Path:
    for i, cell in enumerate(cells):  # stable ids: rebuilding an unchanged notebook rewrites identical bytes
        cell.id = f"{name[:2]}-{i:02d}"
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.validate(nb)
    path = HERE / name
    nbformat.write(nb, path)
    return path


def main() -> None:
    for name, cells in (("01_token_redundancy.ipynb", NB01), ("02_condition_redundancy.ipynb", NB02),
                        ("03_cache_schedules.ipynb", NB03), ("04_paper_figures.ipynb", NB04)):
        print(write(name, cells))


if __name__ == "__main__":
    main()
