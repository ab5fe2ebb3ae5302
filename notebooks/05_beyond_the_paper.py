# %% [markdown]
# # 05 · Beyond the paper
#
# The questions a reader of notebooks 01-04 asks next. This notebook answers two of them so far:
#
# 1. **What does caching do to the samples?** Cached against uncached samples of the same plan (same labels, orders
#    and noise) with per-pixel difference maps: the figure a caching paper shows first.
# 2. **Where in the image, and for which classes, are features redundant?** Token change per grid position, as a
#    map, and per class, each with a 95 % interval over samples and its n.
#
# Still to come (issue "The workbook answers the next questions"): step count and guidance, error attribution per
# mechanism, attention, redundancy over training, and lean caches.

# %% tags=["parameters"]
STATS = "../data/stats/digits16.zarr"    # a recording (`lazymar record`) of MODEL
MODEL = "digits16"                       # "digits", "digits16" or a path to an official MAR checkpoint
VAE = None                               # path to the KL-16 VAE of an official MAR checkpoint (None: none)
DEVICE = "cpu"                           # torch device
ARCH = None                              # architecture of a checkpoint that does not name it (e.g. "mar_base")
NUM_ITER = None                          # MAR steps of the sample comparison (None: the model's default)
SCHEDULES = {                            # figure column name -> schedule (preset name or JSON path) for MODEL
    "lazymar preset": "lazymar", "digits16_3.5x_q": "../data/schedules/digits16_3.5x_q.json"}
ALSO = {                                 # other models drawn the same way: model -> {column name: schedule}
    "digits": {"lazymar preset": "lazymar", "digits_4.5x": "../data/schedules/digits_4.5x.json"}}
LABELS = (0, 2, 5, 8)                    # one sample of each class per figure
SEED = 7                                 # a held-out seed (no schedule search used it)
LAYER = "decoder.3"                      # the layer whose token change is mapped
INK = -0.5                               # a pixel above this value (range -1 blank .. 1 full) carries ink
FIGURES = "../runs/figures/05"           # folder to also save the figures into (None: display only)

# %%
from dataclasses import replace

from IPython.display import Markdown, display
from tqdm.auto import tqdm

from analysis import redundancy_maps, workbook
from analysis.sample_differences import draw_sample_differences, sample_differences
from lazymar.cache import load_schedule
from lazymar.recording import load_stats
from lazymar.runs import SamplePlan

writer = workbook.FigureWriter(FIGURES)
save = writer.figure

# %% [markdown]
# ## Cached against uncached samples
#
# Each row is one sample: the uncached image, then for each schedule its image (titled with its PSNR against the
# uncached one) and the absolute per-pixel difference, on one colour scale per figure. The schedules share every
# random draw with the uncached run, so the maps show only what reuse changed.

# %%
for name, schedules in tqdm({MODEL: SCHEDULES, **ALSO}.items(), desc="models"):
    model, vae = workbook.load_model(name, VAE if name == MODEL else None, DEVICE, ARCH if name == MODEL else None)
    settings = model.sampling_defaults if NUM_ITER is None else replace(model.sampling_defaults, num_iter=NUM_ITER)
    plan = SamplePlan(tuple(LABELS), seed=SEED, batch_size=len(LABELS))
    runs = {column: load_schedule(spec, settings.num_iter, model.config) for column, spec in schedules.items()}
    found = sample_differences(model, runs, plan, settings, vae=vae, progress=True)
    label = workbook.model_label(name)
    save(draw_sample_differences(found, title=f"{label}: cached against uncached samples, seed {SEED}"),
         f"nb_sample_differences_{label}")
    ink = (found.uncached.mean(axis=-1) > INK)  # pixels with ink in the uncached sample
    lines = []
    for column in runs:
        difference = found.difference(column)
        share = (f"{difference[ink].sum() / difference.sum():.0%} of the absolute difference lies on the "
                 f"{ink.mean():.0%} of pixels that carry ink in the uncached sample" if difference.sum() > 0
                 else "identical to the uncached samples (no step reuses anything at these settings)")
        lines.append(f"- {column}: PSNR {found.psnr(column).min():.1f}-{found.psnr(column).max():.1f} dB; {share}")
    display(Markdown(f"**{label}** ({len(LABELS)} samples, {settings.num_iter} steps, cfg {settings.cfg:g}):\n"
                     + "\n".join(lines)))

# %% [markdown]
# ## Token change by position and by class
#
# The mean change 1 - cos(h_s, h_{s-1}) of the known and unknown positions at one layer, averaged over steps, per
# position of the token grid (left) with the width of its 95 % interval (right; samples resampled), and per class.

# %%
ds = load_stats(STATS)
display(Markdown(workbook.describe_recording(ds, STATS)))
by_position = redundancy_maps.change_by_position(ds, LAYER)
save(redundancy_maps.plot_change_by_position(by_position), "nb_change_by_position")
by_class = redundancy_maps.change_by_class(ds, LAYER)
save(redundancy_maps.plot_change_by_class(by_class, LAYER), "nb_change_by_class")
display(by_class.round(5))
rows, cols = by_position["mean"].shape
centre = by_position["mean"].values[rows // 4:3 * rows // 4, cols // 4:3 * cols // 4]
display(Markdown(
    f"With n = {by_position.attrs['n_samples']} samples, each class rests on {by_class['n_samples'].min()}-"
    f"{by_class['n_samples'].max()} of them (a class with one sample has no interval, and an interval over two "
    f"samples says little): read the class figure as a first look, not a finding. By position, the central quarter of the "
    f"grid changes by {centre.mean():.2e} on average, the whole grid by {float(by_position['mean'].mean()):.2e} "
    f"(ratio {centre.mean() / float(by_position['mean'].mean()):.2f})."))

# %%
if FIGURES:
    display(Markdown("Written: " + ", ".join(sorted({p.name for p in writer.written}))))
