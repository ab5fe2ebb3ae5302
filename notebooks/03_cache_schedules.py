# %% [markdown]
# # 03 · Cache schedules
#
# Derive a cache schedule from the recording with five thresholds and a selection layer (see `lazymar/schedules/`):
#
# - **tau_token**: on cached steps the decoder recomputes, after the selection layer, the positions whose V
#   similarity to the previous step is below tau_token (plus the tokens to predict and those just decoded);
# - **tau_refresh**: refresh everything when the change accumulated since the last refresh reaches tau_refresh
#   (in units of an average step's change);
# - **tau_cfg**: reuse the CFG residual while its estimated similarity to the last computed one stays ≥ tau_cfg;
# - **tau_head**: the head reuses the parts whose accumulated change stays ≤ tau_head.
# - **tau_buffer**: the encoder keeps the buffer cached too (only the newly decoded tokens run) while the buffer's
#   accumulated change since a refresh keeps a similarity ≥ tau_buffer (1.0: recompute it, as LazyMAR).
#
# Moving a slider re-derives the schedule: the summary (the slider that moved last in bold), the heat map
# (1 = recomputed) and its predicted FLOPs ratio on the measured trade-off front update.
#
# **Measure** runs the uncached sampler, the derived schedule and the released LazyMAR preset on `CHECK_SAMPLES`
# samples in a background thread: a progress bar with an estimate, a **Cancel** button, and the sliders stay live
# meanwhile. Each check adds a row to the table, named by the schedule it measured and its thresholds; earlier
# rows stay for comparison. The sample grid shows the runs side by side.
#
# **Save schedule** writes the schedule the sliders show as `lazymar derive --out` does: the JSON and a markdown
# report beside it (an existing file is kept unless "overwrite" is ticked). The default path is in the ignored
# `runs/`. Use the file with the other commands, e.g. from the repository root:
#
#     lazymar bench --schedule runs/schedules/explorer.json --num-samples 16
#     lazymar sweep --schedule runs/schedules/explorer.json --out runs/sweep_explorer.csv
#
# (`explorer.save_schedule(path)` does the same from code.) Voila shows this notebook as an app:
# `voila notebooks/03_cache_schedules.ipynb`.

# %% tags=["parameters"]
STATS = "../data/stats/digits.nc"      # the recording to derive from: a .nc file or a .zarr store (read chunk
                                       # by chunk: a store larger than memory works)
SWEEP = "../data/sweeps/digits.csv"    # trade-off sweep (`lazymar sweep`), optional
MODEL = "digits"                       # model for the measured check: "digits", "digits16" or a checkpoint path
VAE = None                             # path to the KL-16 VAE of an official MAR (sample grids, PSNR); None: none
DEVICE = "cpu"                         # torch device of the measured check
ARCH = None                            # architecture of a checkpoint that does not name it (e.g. "mar_base")
CHECK_SAMPLES = 8                      # samples of the measured check (button)
SEED = 0
SAVE_TO = "../runs/schedules/explorer.json"  # default file of "Save schedule" (the .md report goes beside it)
FIGURES = "../runs/figures/03"         # folder to save the starting schedule's heat map into (None: no file)

# %%
from pathlib import Path

from IPython.display import Markdown, display

from analysis import workbook
from analysis.explorer import ScheduleExplorer
from lazymar.schedules import RedundancyProfile
from lazymar.sweep import load_sweep

profile = RedundancyProfile.from_stats(STATS)
sweep = load_sweep(SWEEP) if SWEEP and Path(SWEEP).is_file() else None
study = profile.selection
best = study.loc[study["recommended"]].iloc[0]
display(Markdown(
    f"Recording `{STATS}`: {profile.num_samples} samples, {profile.num_iter} steps. The selection-layer study "
    f"recommends `{best.name}` (AUROC {best['auroc']:.3f} for finding the 20% most changing positions, Spearman "
    f"{best['spearman']:.3f}). Trade-off sweep: "
    + (f"{len(sweep)} measured points from `{SWEEP}`." if sweep is not None else f"none found at `{SWEEP}`.")))
display(study.drop(columns=["recommended"]).round(3))

# %%
loaded = {}


def load_for_check():
    """Model (and VAE) of the measured check, loaded on the first press of Measure."""
    if not loaded:
        loaded["model"], loaded["vae"] = workbook.load_model(MODEL, VAE, DEVICE, ARCH)
        explorer.vae = loaded["vae"]
    return loaded["model"]


explorer = ScheduleExplorer(profile, sweep=sweep, model_loader=load_for_check, check_samples=CHECK_SAMPLES,
                            seed=SEED, save_path=SAVE_TO)
display(explorer.widget)
if FIGURES and explorer.derived is not None:
    from analysis import figures, schedule_plots
    from lazymar.schedules import schedule_matrix

    schedule = explorer.derived.schedule
    figures.save_figure(schedule_plots.plot_schedule(schedule_matrix(schedule), title=schedule.name), "nb_explorer_schedule",
                      FIGURES)
