# %% [markdown]
# # 01 · Token redundancy
#
# How much does each position's feature change from one MAR step to the next? For every layer the recording holds
# the cosine similarity of each position's features at step *s* with step *s−1*, and each position's status at *s*:
# `buffer` (class positions), `known` (decoded before *s−1*), `new` (decoded at *s−1*), `to_predict` (decoded at *s*)
# and `masked`. Similarities sit very close to 1, so the plots show **1 − cosine on a log axis**.
#
# The parameters cell points at the recording (made with `lazymar record`) and the model used for the live
# step x step similarity (which a recording does not keep). Paths are relative to `notebooks/`.

# %% tags=["parameters"]
STATS = "../data/stats/digits.nc"   # a recording made with `lazymar record`: a .nc file or a .zarr store (read
                                    # lazily, chunk by chunk: a store larger than memory works)
MODEL = "digits"                    # "digits" or a path to an official MAR checkpoint (live step x step matrix)
VAE = None                          # path to the KL-16 VAE of an official MAR checkpoint (None: none)
DEVICE = "cpu"                      # torch device of the live measurement
ARCH = None                         # architecture of a checkpoint that does not name it (e.g. "mar_base")
KIND = "output"                     # feature kind for the distributions: "output", "k" or "v"
FOCUS_LAYER = "decoder.3"           # the layer quoted in the prose
THRESHOLDS = (0.95, 0.99)
LIVE_SAMPLES = 4                    # samples generated for the step x step matrix
LIVE_LAYER = "z"                    # "decoder.i" or "z"
SEED = 0
FIGURES = "../runs/figures/01"      # folder to also save the figures into (None: display only)

# %%
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from analysis import live_features, phenomena, redundancy_plots, workbook
from lazymar.recording import load_stats


writer = workbook.FigureWriter(FIGURES)
save = writer.figure

# %%
ds = load_stats(STATS)
settings = phenomena.sampling_settings(ds.attrs)
display(Markdown(workbook.describe_recording(ds, STATS)))

# %% [markdown]
# ## Distributions by position status
#
# One panel per layer: the ECDF of 1 − cosine over all samples, steps and positions, one curve per status.

# %%
save(redundancy_plots.plot_cosine_ecdf(ds, kind=KIND), "nb_token_cosine_ecdf");
change = (1 - phenomena.mean_by_status(ds, FOCUS_LAYER, kind=KIND)["mean"]).to_dict()
display(Markdown(
    f"Mean 1 − cosine at `{FOCUS_LAYER}` ({KIND}) by status: "
    + ", ".join(f"{s} {c:.2e}" for s, c in change.items())
    + f". The tokens decoded at the previous step change {change['new'] / change['known']:.0f}x more than the "
      f"tokens known before it, and {change['new'] / change['masked']:.0f}x more than the still-masked positions."))

# %% [markdown]
# LazyMAR ranks positions by the similarity of their attention **values V**; the same distributions for V in the
# decoder (violins of log10(1 − cosine), drawn from histograms of every value):

# %%
decoder_layers = [layer for layer in map(str, ds.layer.values) if layer.startswith("decoder.")]
save(redundancy_plots.plot_cosine_violin(ds, layers=decoder_layers, kind="v"), "nb_token_cosine_violin");

# %% [markdown]
# ## Step x layer heat maps
#
# Left to right the generation proceeds; top to bottom the layers (encoder, decoder, then z, the head's
# conditioning). First the typical change of a position, the mean of log10(1 − cosine) over all positions (a
# geometric mean); then the mean cosine of the tokens decoded at the previous step, the ones that change most.

# %%
typical = phenomena.step_layer_matrix(ds, "log10_change", kind=KIND)
save(redundancy_plots.plot_step_layer_heatmap(typical, title=f"Typical change of a position ({KIND})",
                                              colorbar_label="mean log10(1 − cosine to step s−1)"),
     "nb_token_heatmap_change");
new = phenomena.step_layer_matrix(ds, "mean", kind=KIND, statuses=["new"])
save(redundancy_plots.plot_step_layer_heatmap(new, title="Mean cosine of the tokens decoded at step s−1",
                                              colorbar_label="mean cosine", cmap="magma"), "nb_token_heatmap_new");

# %% [markdown]
# ## Fraction of positions above 0.95 and 0.99 per step
#
# **What the toy model does.** `digits` has 64 tokens and samples 64 steps: it decodes exactly **one token per
# step**. Its decoder sees 128 positions (64 buffer + 64 tokens), and at each step only the one token just decoded
# changes status; so a share of 99.22 % of decoder positions above cosine 0.95 (as in
# `data/figures/token_group_summary.md`) is exactly 127/128: every position except the one just decoded. That is a
# structural effect of decoding one token per step, not evidence of redundancy at MAR's usual step counts.
# `digits16` (256 tokens at the official layout, 1-7 tokens per step at 64 steps) behaves like MAR: run this
# notebook with `STATS="../data/stats/digits16.zarr"`, `MODEL="digits16"` for the research numbers.

# %%
fraction_layers = [layer for layer in (decoder_layers[0], FOCUS_LAYER, "z") if layer in ds.layer]
fractions = phenomena.fraction_above(ds, THRESHOLDS, layers=list(dict.fromkeys(fraction_layers)), kind=KIND)
save(redundancy_plots.plot_fraction_above(fractions), "nb_token_fraction_above");
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

# %% [markdown]
# ## Encoder vs decoder
#
# The encoder sees only the buffer and the known tokens, the decoder every position. On the positions both see:

# %%
evd = phenomena.encoder_vs_decoder(ds, kind=KIND)
save(redundancy_plots.plot_encoder_vs_decoder(evd), "nb_token_encoder_vs_decoder");
display(phenomena.group_summary(ds, THRESHOLDS, kind=KIND).round(5))
display(Markdown(
    f"On the buffer and known tokens the encoder's features change by 1 − cos = {evd.encoder_change.mean():.2e} "
    f"per step on average, the decoder's by {evd.decoder_change.mean():.2e} "
    f"({evd.decoder_change.mean() / evd.encoder_change.mean():.1f}x the encoder's)."))

# %% [markdown]
# ## Step x step similarity (live)
#
# A recording keeps only adjacent steps. Here the model generates a few samples with forward hooks that keep one
# layer's features at every step (conditional branch), and the matrix shows the mean cosine between any two steps.

# %%
from lazymar.runs import balanced_labels

model, vae = workbook.load_model(MODEL, VAE, DEVICE, ARCH)
labels = balanced_labels(LIVE_SAMPLES, model.config.class_num)
features = live_features.capture_step_features(model, labels, settings, layers=[LIVE_LAYER], seed=SEED,
                                          progress=True)[LIVE_LAYER]
cond = features[:, :LIVE_SAMPLES]  # rows are [cond; uncond] under CFG
similarity = live_features.step_similarity_matrix(cond)
save(redundancy_plots.plot_step_similarity(similarity, LIVE_LAYER), "nb_token_step_similarity");
lags = {k: float(np.mean(np.diagonal(similarity, k))) for k in (1, 4, 16) if k < len(similarity)}
display(Markdown(
    f"`{LIVE_LAYER}` on {LIVE_SAMPLES} samples: mean cosine between steps k apart "
    + ", ".join(f"{v:.4f} at k = {k}" for k, v in lags.items())
    + f"; first vs last step {similarity[0, -1]:.4f}. Similarity decays with the distance in steps, which is why "
      "a cache must be refreshed now and then."))
