"""The interactive schedule explorer of notebook 03: threshold sliders that re-derive a cache schedule live
(lazymar.schedules), its heat map, the predicted FLOPs ratio against the measured trade-off front, and a button
that runs a quick measured check (uncached vs derived vs the released preset on a few samples).

Slider ranges come from the recording: tau_token spans the lower tail of the selection layer's V similarity, so
the same notebook works for a recording of any model. Nothing is measured until the button is pressed.
"""
from __future__ import annotations

import html
import math
from typing import Callable, Optional

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from lazymar.runs import balanced_labels
from lazymar.sampling import SamplingSettings

from . import plots
from lazymar.schedules import DerivationError, DerivedSchedule, RedundancyProfile, derive_schedule, schedule_matrix
from .measure import Measurement, measure_schedules
from .phenomena import sampling_settings

SUMMARY_CLASS = "lazymar-summary"


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


class ScheduleExplorer:
    """Sliders for tau_token, tau_refresh, tau_cfg, tau_head, tau_buffer and the selection layer; a summary (an
    HTML widget with the CSS class ``lazymar-summary``) that follows them; the schedule heat map; the trade-off
    plot; and a button for a measured check. ``model_loader`` is called on the first check only."""

    def __init__(self, profile: RedundancyProfile, sweep: Optional[pd.DataFrame] = None,
                 model_loader: Optional[Callable[[], object]] = None, check_samples: int = 8, seed: int = 0):
        self.profile, self.sweep, self.model_loader = profile, sweep, model_loader
        self.check_samples, self.seed = check_samples, seed
        self.model = None
        self.baseline: Optional[Measurement] = None
        self.last_check: Optional[Measurement] = None
        self.derived: Optional[DerivedSchedule] = None
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
        self.button = widgets.Button(description=f"Measure on {check_samples} samples", icon="play",
                                     layout=widgets.Layout(width="220px"))
        self.heatmap = widgets.Output()
        self.tradeoff = widgets.Output()
        self.check = widgets.Output()
        for slider in self.sliders:
            slider.observe(self._on_change, names="value")
        self.button.on_click(self._on_click)
        self.update()

    # --- layout ---------------------------------------------------------------------------------------------
    @property
    def widget(self) -> widgets.Widget:
        controls = widgets.VBox(self.sliders + [self.button])
        return widgets.VBox([controls, self.summary, widgets.HBox([self.heatmap, self.tradeoff]), self.check])

    def _ipython_display_(self) -> None:
        display(self.widget)

    # --- live derivation ------------------------------------------------------------------------------------
    def params(self) -> dict:
        return {"tau_token": float(self.tau_token.value), "tau_refresh": float(self.tau_refresh.value),
                "tau_cfg": float(self.tau_cfg.value), "tau_head": float(self.tau_head.value),
                "tau_buffer": float(self.tau_buffer.value), "selection_layer": int(self.selection_layer.value)}

    def _on_change(self, change) -> None:
        self.update()

    def update(self) -> Optional[DerivedSchedule]:
        """Re-derive from the sliders; refresh the summary, heat map and trade-off plot."""
        p = self.params()
        head = f"<b>tau_token = {p['tau_token']:.{self._digits}f}</b>"
        try:
            self.derived = derive_schedule(self.profile, **p)
        except DerivationError as err:
            self.derived = None
            self.summary.value = f"{head} &middot; <span style='color:#b00'>{html.escape(str(err))}</span>"
            return None
        d = self.derived
        self.summary.value = (f"{head} &middot; predicted FLOPs ratio <b>{d.predicted_flops_ratio:.2f}x</b><br>"
                              f"{html.escape(d.summary())}")
        self._draw(self.heatmap, plots.plot_schedule(schedule_matrix(d.schedule), title=d.schedule.name))
        self._draw(self.tradeoff, self.tradeoff_figure())
        return d

    def tradeoff_figure(self):
        """The sweep's points and front with the current schedule's predicted FLOPs ratio (dashed line) and,
        after a check, its measured point."""
        from lazymar.sweep import pareto_front
        fig, ax = plt.subplots(figsize=(5.2, 3.4), constrained_layout=True)
        measured = None
        if self.last_check is not None and "derived" in self.last_check.table.index:
            row = self.last_check.table.loc["derived"]
            measured = {"flops_ratio": row["flops_ratio"], "psnr": row["psnr"], "label": "last measured check"}
        if self.sweep is not None and len(self.sweep):
            plots.plot_tradeoff(self.sweep, label="name", front=pareto_front(self.sweep), highlight=measured, ax=ax)
        else:
            ax.text(0.5, 0.5, "no sweep CSV: measure points with `lazymar sweep`", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
            ax.set_xlabel("FLOPs ratio (uncached / cached)")
            ax.set_ylabel("PSNR vs uncached (dB)")
            if measured is not None:
                ax.scatter([measured["flops_ratio"]], [measured["psnr"]], marker="*", s=90, label=measured["label"])
        if self.derived is not None:
            ax.axvline(self.derived.predicted_flops_ratio, color="#1f77b4", linestyle="--", linewidth=1,
                       label=f"current (predicted {self.derived.predicted_flops_ratio:.2f}x)")
        ax.legend(fontsize=7)
        return fig

    @staticmethod
    def _draw(output: widgets.Output, fig) -> None:
        with output:
            output.clear_output(wait=True)
            display(fig)
        plt.close(fig)

    # --- measured check -------------------------------------------------------------------------------------
    def _on_click(self, _button) -> None:
        try:
            self.run_check()
        except Exception as err:  # noqa: BLE001 - shown to the user in the page, not lost in the kernel log
            with self.check:
                print(f"measured check failed: {type(err).__name__}: {err}")

    def run_check(self) -> Optional[Measurement]:
        """Uncached, the derived schedule and the "lazymar" preset on ``check_samples`` balanced labels (the
        uncached run is reused between checks); shows the table and the sample grids."""
        if self.derived is None:
            return None
        from lazymar.cache.schedule import lazymar_schedule
        self.button.disabled = True
        try:
            with self.check:
                self.check.clear_output(wait=True)
                print(f"measuring {self.derived.schedule.name} on {self.check_samples} samples ...")
            if self.model is None:
                if self.model_loader is None:
                    raise RuntimeError("no model_loader: the explorer cannot run measured checks")
                self.model = self.model_loader()
            settings = recording_settings(self.profile)
            labels = balanced_labels(self.check_samples, self.model.config.class_num)
            schedules = {"derived": self.derived.schedule,
                         "lazymar": lazymar_schedule(settings.num_iter, self.model.config)}
            result = measure_schedules(self.model, schedules, labels, settings, seed=self.seed,
                                       baseline=self.baseline)
            self.baseline, self.last_check = result, result
            with self.check:
                self.check.clear_output(wait=True)
                display(result.table.round(3))
                if result.images["none"] is not None:  # an image space: pixels (digits) or a VAE
                    fig = plots.plot_sample_comparison({"uncached": result.images["none"],
                                                        "derived": result.images["derived"],
                                                        "lazymar": result.images["lazymar"]}, labels=labels)
                    display(fig)
                    plt.close(fig)
                else:
                    print("sample grids need images: latent tokens without a VAE are compared by token MSE only")
            self._draw(self.tradeoff, self.tradeoff_figure())
            return result
        finally:
            self.button.disabled = False
