"""The interactive schedule explorer of notebook 03: threshold sliders that re-derive a cache schedule live
(lazymar.schedules), its heat map, the predicted FLOPs ratio against the measured trade-off front, a measured
check (uncached vs the derived schedule vs the released preset on a few samples) that runs in a background thread
with a progress bar, an estimate and a cancel button, and a button that saves the tuned schedule as `lazymar
derive` does (JSON + markdown report), ready for `lazymar bench --schedule PATH` and `lazymar sweep --schedule`.

Why it is built this way: JupyterLab 4 sends widget messages over kernel subshells, which ipykernel 7 handles in
their own threads, so callbacks may run concurrently. Every figure is therefore a plain matplotlib ``Figure``
(analysis.figures.subplots, no pyplot state), rendered to PNG bytes and shown in an ``ipywidgets.Image``; widget
state is written under one lock; nothing uses ``Output`` capture, which follows the thread that runs it.

Slider ranges come from the recording: tau_token spans the lower tail of the selection layer's V similarity, so
the same notebook works for a recording of any model. Nothing is measured until the button is pressed.
"""
from __future__ import annotations

import html
import math
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import ipywidgets as widgets
import numpy as np
import pandas as pd
from IPython.display import display
from matplotlib.figure import Figure

from lazymar.runs import balanced_labels
from lazymar.sampling import SamplingSettings, StepObserver, observe_steps
from lazymar.schedules import DerivationError, DerivedSchedule, RedundancyProfile, derive_schedule, schedule_matrix

from . import figures, schedule_plots
from .schedule_runs import Measurement, measure_schedules
from .phenomena import sampling_settings

SUMMARY_CLASS = "lazymar-summary"
SAMPLES_CLASS = "lazymar-samples"  # the measured sample grid (an Image widget)
PROGRESS_CLASS = "lazymar-progress"
STATUS_CLASS = "lazymar-status"
RESULTS_CLASS = "lazymar-results"
SAVE_STATUS_CLASS = "lazymar-save-status"
METRICS = ["predicted_flops_ratio", "flops_ratio", "psnr", "token_mse", "accuracy", "wall_ratio"]


def tau_token_range(profile: RedundancyProfile, layer: int, quantile: float = 0.01) -> tuple[float, float, float]:
    """(min, step, initial) of a tau_token slider ending at 1: the min is the ``quantile`` of the layer's V
    similarity rounded down, about 80 steps span the range, the initial value is the lower quartile."""
    q = profile.similarity_quantiles(layer, q=(quantile, 0.25))
    low = q.get(quantile, 0.9)
    span = max(1.0 - low, 1e-4)
    step = 10.0 ** math.floor(math.log10(span / 50))
    low = math.floor(low / step) * step
    initial = min(1.0 - step, max(low, round(q.get(0.25, 1.0 - 10 * step) / step) * step))
    return low, step, initial


def recording_settings(profile: RedundancyProfile) -> SamplingSettings:
    """The sampling settings the recording was made with (a schedule derived from it has its num_iter)."""
    return sampling_settings({"cfg": 1.0, **profile.attrs, "num_iter": profile.num_iter})


class MeasurementCancelled(Exception):
    """Raised inside the sampler (at the next MAR step) when the cancel button was pressed."""


class _StepCounter(StepObserver):
    """Counts MAR steps of every generation in the measuring thread; stops the run when asked to."""

    def __init__(self, on_step: Callable[[], None], cancel: threading.Event):
        self.on_step, self.cancel = on_step, cancel

    def on_step_start(self, ctx) -> None:
        if self.cancel.is_set():
            raise MeasurementCancelled()

    def on_step_end(self, ctx) -> None:
        self.on_step()


def format_params(params: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class ScheduleExplorer:
    """Sliders for tau_token, tau_refresh, tau_cfg, tau_head, tau_buffer and the selection layer; a summary (an
    HTML widget with the CSS class ``lazymar-summary``) that follows them; the schedule heat map; the trade-off
    plot; a measured check in a background thread (progress, estimate, cancel; its results accumulate in a table
    naming each schedule and its thresholds); and "Save schedule". ``model_loader`` is called on the first check.
    ``save_path``: the default file of the save box (relative paths are relative to the kernel's directory)."""

    def __init__(self, profile: RedundancyProfile, sweep: Optional[pd.DataFrame] = None,
                 model_loader: Optional[Callable[[], object]] = None, check_samples: int = 8, seed: int = 0,
                 save_path: str | Path = "../runs/schedules/explorer.json", vae=None):
        self.profile, self.sweep, self.model_loader, self.vae = profile, sweep, model_loader, vae
        self.check_samples, self.seed = check_samples, seed
        self.model = None
        self.baseline: Optional[Measurement] = None
        self.last_check: Optional[Measurement] = None
        self.last_measured: Optional[dict] = None  # the derived row of the last check
        self.history: list[dict] = []  # one row per measured run, in order
        self.derived: Optional[DerivedSchedule] = None
        self.moved: Optional[str] = None  # the description of the slider that moved last
        self.error: Optional[BaseException] = None  # the last check's failure, if any
        self._lock = threading.RLock()  # derivation and widget writes, from any callback thread
        self._cancel = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self._checks = 0
        layer = profile.recommended_layer
        low, step, initial = tau_token_range(profile, layer)
        self._digits = max(2, -int(math.floor(math.log10(step))))
        common = dict(continuous_update=False, style={"description_width": "110px"},
                      layout=widgets.Layout(width="520px"))
        self.tau_token = widgets.FloatSlider(value=initial, min=low, max=1.0, step=step, description="tau_token",
                                             readout_format=f".{self._digits}f", **common)
        self.tau_refresh = widgets.FloatSlider(value=min(8.0, profile.num_iter), min=1.0, max=float(profile.num_iter),
                                               step=0.5, description="tau_refresh", readout_format=".1f", **common)
        self.tau_cfg = widgets.FloatSlider(value=0.95, min=0.5, max=1.0, step=0.005, description="tau_cfg",
                                           readout_format=".3f", disabled=not profile.use_cfg, **common)
        self.tau_head = widgets.FloatSlider(value=0.3, min=0.0, max=2.0, step=0.05, description="tau_head",
                                            readout_format=".2f", **common)
        self.tau_buffer = widgets.FloatSlider(value=1.0, min=0.99, max=1.0, step=0.0005, description="tau_buffer",
                                              readout_format=".4f", **common)
        self.selection_layer = widgets.IntSlider(value=layer, min=0, max=profile.decoder_depth - 2,
                                                 description="selection_layer", **common)
        self.sliders = [self.tau_token, self.tau_refresh, self.tau_cfg, self.tau_head, self.tau_buffer,
                        self.selection_layer]
        self.summary = widgets.HTML(layout=widgets.Layout(width="900px"))
        self.summary.add_class(SUMMARY_CLASS)
        # measured check: button, cancel, progress bar and a status line with the estimate
        self.button = widgets.Button(description=f"Measure on {check_samples} samples", icon="play",
                                     layout=widgets.Layout(width="220px"))
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True,
                                            layout=widgets.Layout(width="100px"))
        self.progress = widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="measured",
                                              layout=widgets.Layout(width="360px"))
        self.progress.add_class(PROGRESS_CLASS)
        self.status = widgets.HTML(value="Nothing measured yet: the sliders only predict.")
        self.status.add_class(STATUS_CLASS)
        self.results = widgets.HTML()
        self.results.add_class(RESULTS_CLASS)
        self.samples = widgets.Image(format="png", layout=widgets.Layout(display="none", align_self="flex-start",
                                                                          max_width="100%"))
        self.samples.add_class(SAMPLES_CLASS)
        # figures: PNG images, drawn without pyplot
        self.heatmap = widgets.Image(format="png", layout=widgets.Layout(object_fit="contain"))
        self.heatmap.add_class("lazymar-heatmap")
        self.tradeoff = widgets.Image(format="png", layout=widgets.Layout(object_fit="contain"))
        self.tradeoff.add_class("lazymar-tradeoff")
        # save what you tuned
        self.save_path = widgets.Text(value=str(save_path), description="save to",
                                      style={"description_width": "60px"}, layout=widgets.Layout(width="420px"))
        self.overwrite = widgets.Checkbox(value=False, description="overwrite an existing file", indent=False,
                                          layout=widgets.Layout(width="200px"))
        self.save_button = widgets.Button(description="Save schedule", icon="save",
                                          layout=widgets.Layout(width="140px"))
        self.save_status = widgets.HTML()
        self.save_status.add_class(SAVE_STATUS_CLASS)
        for slider in self.sliders:
            slider.observe(self._on_change, names="value")
        self.button.on_click(self._on_click)
        self.cancel_button.on_click(lambda _button: self.cancel())
        self.save_button.on_click(self._on_save)
        self.update()

    # --- layout ---------------------------------------------------------------------------------------------
    @property
    def widget(self) -> widgets.Widget:
        controls = widgets.VBox(self.sliders)
        measure = widgets.HBox([self.button, self.cancel_button, self.progress])
        save = widgets.HBox([self.save_path, self.overwrite, self.save_button])
        return widgets.VBox([controls, self.summary, widgets.HBox([self.heatmap, self.tradeoff],
                                                                 layout=widgets.Layout(flex_flow="row wrap")), measure,
                             self.status, self.results, self.samples, save, self.save_status])

    def _ipython_display_(self) -> None:
        display(self.widget)

    # --- live derivation ------------------------------------------------------------------------------------
    def params(self) -> dict:
        return {"tau_token": float(self.tau_token.value), "tau_refresh": float(self.tau_refresh.value),
                "tau_cfg": float(self.tau_cfg.value), "tau_head": float(self.tau_head.value),
                "tau_buffer": float(self.tau_buffer.value), "selection_layer": int(self.selection_layer.value)}

    def _on_change(self, change) -> None:
        self.moved = change["owner"].description
        self.update()

    def _head(self) -> str:
        """The slider that moved last, in bold, and the other thresholds."""
        parts = []
        for slider in self.sliders:
            value = (f"{slider.value:.{self._digits}f}" if slider is self.tau_token else
                     f"{slider.value:g}")
            text = f"{slider.description} = {value}"
            parts.append(f"<b>{text}</b>" if slider.description == self.moved else text)
        return " &middot; ".join(parts)

    def update(self) -> Optional[DerivedSchedule]:
        """Re-derive from the sliders; refresh the summary, heat map and trade-off plot."""
        with self._lock:
            p = self.params()
            head = self._head()
            try:
                self.derived = derive_schedule(self.profile, **p)
            except DerivationError as err:
                self.derived = None
                self.summary.value = f"{head}<br><span style='color:#b00'>{html.escape(str(err))}</span>"
                return None
            d = self.derived
            self.summary.value = (f"{head}<br>predicted FLOPs ratio <b>{d.predicted_flops_ratio:.2f}x</b> &middot; "
                                  f"{html.escape(d.summary())}")
            self.heatmap.value = figures.figure_png(schedule_plots.plot_schedule(schedule_matrix(d.schedule),
                                                                      title=d.schedule.name))
            self.tradeoff.value = figures.figure_png(self.tradeoff_figure())
            return d

    def tradeoff_figure(self) -> Figure:
        """The sweep's points and front with the current schedule's predicted FLOPs ratio (dashed line) and,
        after a check, its measured point."""
        from lazymar.sweep import pareto_front
        fig, ax = figures.subplots(figsize=(8.0, 4.6))
        measured = None
        if self.last_measured is not None:
            measured = {"flops_ratio": self.last_measured["flops_ratio"], "psnr": self.last_measured["psnr"],
                        "label": f"measured: {self.last_measured['schedule']}"}
        if self.sweep is not None and len(self.sweep):
            schedule_plots.plot_tradeoff(self.sweep, label="name", front=pareto_front(self.sweep), highlight=measured, ax=ax)
        else:
            ax.text(0.5, 0.5, "no sweep CSV: measure points with `lazymar sweep`", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
            ax.set_xlabel("FLOPs ratio (uncached / cached)")
            ax.set_ylabel("PSNR vs uncached (dB)")
            if measured is not None and np.isfinite(measured["psnr"]):
                ax.scatter([measured["flops_ratio"]], [measured["psnr"]], marker="*", s=90, label=measured["label"])
        if self.derived is not None:
            ax.axvline(self.derived.predicted_flops_ratio, color="#1f77b4", linestyle="--", linewidth=1,
                       label=f"current (predicted {self.derived.predicted_flops_ratio:.2f}x)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        return fig

    # --- measured check (background thread) -----------------------------------------------------------------
    @property
    def measuring(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _on_click(self, _button) -> None:
        self.start_check()

    def start_check(self) -> Optional[threading.Thread]:
        """Measure the schedule the sliders show now, in a background thread (the sliders stay live); None when
        a check is already running or the thresholds derive nothing."""
        with self._lock:
            if self.measuring:
                return None
            if self.derived is None:
                self.status.value = "Nothing to measure: the thresholds derive no schedule."
                return None
            self._cancel.clear()
            self.error = None
            self._checks += 1
            job = (self._checks, self.derived, self.params())
            self.button.disabled, self.cancel_button.disabled = True, False
            self.progress.value, self.progress.bar_style = 0.0, ""
            self.status.value = f"check {self._checks}: measuring <code>{html.escape(self.derived.schedule.name)}" \
                                f"</code> &hellip;"
            self._worker = threading.Thread(target=self._run_check, args=job, name="lazymar-explorer-check",
                                            daemon=True)
            self._worker.start()
            return self._worker

    def run_check(self, timeout: Optional[float] = None) -> Optional[Measurement]:
        """Measure the current schedule and wait for it (scripts and tests); the Measurement, or None when
        cancelled or failed (``error`` holds the failure)."""
        worker = self.start_check()
        if worker is None:
            return None
        worker.join(timeout)
        return None if self.error is not None or self._cancel.is_set() else self.last_check

    def cancel(self) -> None:
        """Stop the running check at its next MAR step."""
        if self.measuring:
            self._cancel.set()
            with self._lock:
                self.status.value += " cancelling&hellip;"

    def _run_check(self, number: int, derived: DerivedSchedule, params: dict) -> None:
        from lazymar.cache.schedule_file import lazymar_schedule
        start = time.perf_counter()
        try:
            if self.model is None:
                if self.model_loader is None:
                    raise RuntimeError("no model_loader: the explorer cannot run measured checks")
                self._set_status(f"check {number}: loading the model &hellip;")
                self.model = self.model_loader()
            settings = recording_settings(self.profile)
            labels = balanced_labels(self.check_samples, self.model.config.class_num)
            schedules = {"derived": derived.schedule}
            if not any(row["schedule"] == "lazymar" for row in self.history):
                schedules["lazymar"] = lazymar_schedule(settings.num_iter, self.model.config)
            reuse = self.baseline is not None and self.baseline.reusable_for(self.model, labels, settings, self.seed)
            total = settings.num_iter * (len(schedules) + (0 if reuse else 1))
            done, shown = [0], [0.0]

            def step() -> None:
                done[0] += 1
                now = time.perf_counter()
                if now - shown[0] > 0.25 or done[0] >= total:  # at most 4 updates a second
                    shown[0] = now
                    elapsed = now - start
                    left = elapsed / done[0] * max(total - done[0], 0)
                    self._set_progress(min(done[0] / total, 1.0),
                                       f"check {number}: <code>{html.escape(derived.schedule.name)}</code> &middot; "
                                       f"{min(done[0], total)}/{total} MAR steps &middot; {elapsed:.0f} s elapsed, "
                                       f"about {left:.0f} s left")

            with observe_steps(_StepCounter(step, self._cancel)):
                result = measure_schedules(self.model, schedules, labels, settings, seed=self.seed,
                                           baseline=self.baseline, vae=self.vae, keep_images=True)
            self._finish(number, derived, params, result, labels, time.perf_counter() - start)
        except MeasurementCancelled:
            self._set_progress(self.progress.value, f"check {number} cancelled after "
                                                    f"{time.perf_counter() - start:.0f} s; nothing recorded.",
                               style="warning")
        except Exception as err:  # noqa: BLE001 - shown in the page, not lost in the kernel log
            self.error = err
            self._set_progress(self.progress.value, f"<span style='color:#b00'>check {number} failed: "
                                                    f"{html.escape(type(err).__name__)}: {html.escape(str(err))}</span>",
                               style="danger")
        finally:
            with self._lock:
                self.button.disabled, self.cancel_button.disabled = False, True

    def _set_status(self, text: str) -> None:
        with self._lock:
            self.status.value = text

    def _set_progress(self, fraction: float, text: str, style: str = "") -> None:
        with self._lock:
            self.progress.value, self.progress.bar_style, self.status.value = fraction, style, text

    def _finish(self, number: int, derived: DerivedSchedule, params: dict, result: Measurement, labels,
                seconds: float) -> None:
        table = result.table
        rows = []
        if not self.history:
            rows.append({"check": number, "schedule": "none", "parameters": "uncached reference",
                         "predicted_flops_ratio": 1.0, **table.loc["none"].to_dict()})
        if "lazymar" in table.index:
            rows.append({"check": number, "schedule": "lazymar", "parameters": "released preset",
                         "predicted_flops_ratio": np.nan, **table.loc["lazymar"].to_dict()})
        row = {"check": number, "schedule": derived.schedule.name, "parameters": format_params(params),
               "predicted_flops_ratio": derived.predicted_flops_ratio, **table.loc["derived"].to_dict()}
        rows.append(row)
        grid = None
        if result.images.get("none") is not None:  # an image space: pixels (digits) or a VAE
            grid = self.sample_figure({"uncached": result.images["none"], "derived": result.images["derived"],
                                       **({"lazymar": result.images["lazymar"]} if "lazymar" in result.images
                                          else {})}, labels)
        with self._lock:
            self.history.extend(rows)
            self.baseline, self.last_check, self.last_measured = result, result, row
            self.results.value = self.history_table().to_html(float_format=lambda v: f"{v:.3f}", index=False,
                                                               border=0, na_rep="")
            if grid is not None:
                self.samples.value = figures.figure_png(grid)
                self.samples.layout.display = None
            self.tradeoff.value = figures.figure_png(self.tradeoff_figure())
            self.progress.value, self.progress.bar_style = 1.0, "success"
            self.status.value = (f"check {number}: measured <code>{html.escape(derived.schedule.name)}</code> on "
                                 f"{len(labels)} samples in {seconds:.0f} s"
                                 + ("" if grid is not None else "; sample grids need images (latent tokens "
                                    "without a VAE are compared by token MSE only)"))

    def sample_figure(self, images: dict, labels) -> Figure:
        """The measured runs' samples side by side (the grid a browser test counts)."""
        return schedule_plots.plot_sample_comparison(images, labels=labels)

    def history_table(self) -> pd.DataFrame:
        """Every measured run so far: check number, schedule name, its thresholds and the metrics."""
        columns = ["check", "schedule", "parameters"] + METRICS
        return pd.DataFrame(self.history, columns=columns)

    # --- save what you tuned ---------------------------------------------------------------------------------
    def save_schedule(self, path: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
        """Write the current schedule as ``lazymar derive --out PATH`` does: the JSON (for `lazymar bench
        --schedule PATH`, `lazymar sweep --schedule PATH`) and its markdown report beside it. An existing file
        is kept unless ``overwrite``."""
        from lazymar.schedules import derived_record, write_derived
        with self._lock:
            derived = self.derived
        if derived is None:
            raise DerivationError("the thresholds derive no schedule: nothing to save")
        path = Path(path)
        if path.suffix != ".json":
            raise ValueError(f"save to a .json file (the report goes beside it as .md), got {str(path)!r}")
        existing = [p for p in (path, path.with_suffix(".md")) if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{existing[0]} exists: tick 'overwrite' (or pass overwrite=True) to replace it")
        record = derived_record(derived, self.profile, self.profile.source or "the explorer's recording")
        return write_derived(derived.schedule, record, path)

    def _on_save(self, _button) -> None:
        try:
            path, report = self.save_schedule(self.save_path.value.strip(), overwrite=self.overwrite.value)
        except Exception as err:  # noqa: BLE001 - one line in the page
            message = f"<span style='color:#b00'>not saved: {html.escape(str(err))}</span>"
        else:
            message = (f"saved <code>{html.escape(str(path))}</code> and <code>{html.escape(str(report))}</code>; "
                       f"run it with <code>lazymar bench --schedule {html.escape(str(path))}</code>")
            self.overwrite.value = False  # confirm again for the next overwrite
        with self._lock:
            self.save_status.value = message
