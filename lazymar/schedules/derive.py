"""Thresholds -> cache schedule: derivation from a redundancy profile, with no per-model constants.

A recording (lazymar.recording layout) says, per step, how much each position's features changed since the step
before. :class:`~lazymar.schedules.profile.RedundancyProfile` condenses it once into per-step arrays; :func:`derive_schedule` then turns five
thresholds into a :class:`~lazymar.cache.schedule_file.CacheSchedule` in milliseconds (notebook sliders call it live):

- token cache (``tau_token``, a cosine): on a cached step s the decoder recomputes, after the selection layer, the
  positions whose V similarity with step s-1 at that layer is below ``tau_token`` (the engine's own ranking), plus
  the always-kept ones (to predict now, decoded at s-1). ``keep_fraction[s]`` is the mean over the recorded samples
  of that count over all decoder positions (buffer + sequence).
- refresh (``tau_refresh``, in step-equivalents of change): a TeaCache-style accumulator. The change of step s is
  1 - cosine of the block outputs with step s-1, averaged over positions and samples and then over all encoder and
  decoder blocks, and calibrated on the recording: divided by its mean over steps, so 1.0 is an average step's
  change. The accumulated change since the last refresh grows step by step; the step at which it reaches
  ``tau_refresh`` refreshes and the accumulator restarts. Step 0 always refreshes.
- condition cache (``tau_cfg``, a cosine): the cond-uncond residual r of the last decoder block is reused from the
  last step that ran both branches (the anchor). The angle between r and its anchor value is bounded by the sum of
  the per-step angles arccos(cosine(r_t, r_{t-1})) since the anchor (triangle inequality on the sphere), each the
  mean over the positions still unknown at t (those whose z the head will use). A stale residual moves the guided
  output by (cfg_s - 1) times its error, so the dissimilarity is weighted by ((cfg_s - 1) / (max cfg_s - 1))^2
  (the recording's per-step guidance scale; early steps of the linear schedule barely use the unconditional
  branch). A cached step uses the condition cache while 1 - weight * (1 - cos(angle sum)) stays >= tau_cfg,
  otherwise both branches run and it becomes the anchor. Refresh steps run both branches.
- encoder buffer (``tau_buffer``, a cosine): the incremental encoder runs only the buffer and the newly decoded
  tokens, keeping the older tokens' K/V as the released scheme does. If the buffer's encoder outputs drift as
  little, they can be kept too (encoder policy "new-tokens"). The buffer's change per step is 1 - cosine of its
  encoder block outputs with step s-1 (mean over buffer positions, samples and encoder blocks); accumulated since
  the last refresh, its largest value over the cached steps d sets the policy: "new-tokens" when 1 - d >=
  tau_buffer, else "incremental" (the default 1.0 keeps the buffer recomputed, as LazyMAR).
- diffusion head (``tau_head``, a relative change): from the median relative change per head step of the eps CFG
  difference and of each res-block's residual update. For a refresh interval k over head steps, a part's error is
  the mean, over the head steps that reuse it, of its accumulated change since the last full head step. Each k
  reuses the parts whose error is <= tau_head (eps difference -> CFG cache; res-blocks -> reused residuals); the
  k that saves the most head FLOPs wins (ties: the smaller k). The exact hoisting of the head's invariants is on.

Predicted FLOPs come from :func:`lazymar.cache.engine.estimate_generation_flops` (per image, batch 1: the
conservative figure; a batch shares the hoisted time embedding, so measured ratios at batch 100 are ~4% higher),
memoised in :mod:`lazymar.schedules.predicted_flops`. The per-step decisions are methods of
:class:`~lazymar.schedules.profile.RedundancyProfile`; searches live in :mod:`lazymar.schedules.search`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ..cache.schedule_file import CacheSchedule
from ..fingerprint import ModelFingerprint
from .predicted_flops import predicted_flops
from .profile import DERIVED_ALWAYS_KEEP, TAU_TOKEN_ALL, DerivationError, RedundancyProfile


@dataclass(frozen=True)
class DerivedSchedule:
    """A derived schedule, the thresholds it came from, and what they predict."""

    schedule: CacheSchedule
    params: dict
    predicted_flops_ratio: float
    flops: dict
    head_errors: dict
    profile_source: str

    def summary(self) -> str:
        s, p = self.schedule, self.params
        cached = [i for i in range(s.num_iter) if not s.refresh[i]]
        refresh = [i for i in range(s.num_iter) if s.refresh[i]]
        keep = [s.keep_fraction[i] for i in cached]
        keep_text = (f"keeps {min(keep):.0%}-{max(keep):.0%} (mean {np.mean(keep):.0%}) of decoder positions after "
                     f"block {s.selection_layer} on {len(cached)} cached steps" if cached else "no cached steps")
        h = s.head
        if h.refresh_every > 1:
            reuse = [x for x in (["CFG"] if h.cfg_cache else []) + [f"block {b}" for b in h.reuse_blocks]]
            head_text = f"head refreshes every {h.refresh_every} head steps, reusing {', '.join(reuse)}"
        else:
            head_text = "head exact (invariants hoisted)"
        return (f"{s.name}: predicted FLOPs ratio {self.predicted_flops_ratio:.2f}x. "
                f"tau_token {p['tau_token']:g} {keep_text}; "
                f"tau_refresh {p['tau_refresh']:g} refreshes {len(refresh)} steps {_ranges(refresh)}; "
                f"tau_cfg {p['tau_cfg']:g} condition cache on {sum(s.condition_cache)} steps; "
                f"tau_head {p['tau_head']:g}: {head_text}; "
                f"tau_buffer {p['tau_buffer']:g}: encoder {s.encoder}.")

    def to_dict(self) -> dict:
        return {"params": self.params, "predicted_flops_ratio": self.predicted_flops_ratio, "flops": self.flops,
                "head_errors": self.head_errors, "source": self.profile_source, "summary": self.summary()}


def derive_schedule(profile: RedundancyProfile | xr.Dataset | str | Path, tau_token: Optional[float] = None,
                    tau_refresh: float = 8.0, tau_cfg: float = 0.999, selection_layer: Optional[int] = None,
                    tau_head: float = 0.2, name: Optional[str] = None,
                    token_quantile: Optional[float] = None, flops_batch_size: int = 1,
                    tau_buffer: float = 1.0) -> DerivedSchedule:
    """A CacheSchedule from a recording and five thresholds (see the module docstring).

    ``profile`` is a :class:`RedundancyProfile` (fast: build it once) or a recording. ``selection_layer`` None
    takes the recommendation of the selection-layer study. ``token_quantile`` (in [0, 1]) gives tau_token as
    that quantile of the selection layer's similarity instead (a model-independent slider); with neither,
    the median. ``flops_batch_size``: the batch the predicted FLOPs ratio assumes (1: per image, conservative).
    Deterministic; about 10 ms."""
    if not isinstance(profile, RedundancyProfile):
        profile = RedundancyProfile.from_stats(profile)
    if selection_layer is None:
        selection_layer = profile.recommended_layer
    selection_layer = profile.check_layer(selection_layer)
    if token_quantile is not None:
        if tau_token is not None:
            raise DerivationError("pass tau_token or token_quantile, not both")
        tau_token = profile.tau_token_at(token_quantile, selection_layer)
    elif tau_token is None:
        tau_token = profile.tau_token_at(0.5, selection_layer)
    for label, value, top in (("tau_token", tau_token, TAU_TOKEN_ALL), ("tau_cfg", tau_cfg, 1.0),
                              ("tau_buffer", tau_buffer, 1.0)):
        if not isinstance(value, (int, float)) or math.isnan(value) or not -1.0 <= value <= top:
            raise DerivationError(f"{label} is a cosine similarity threshold in [-1, {top}], got {value!r}")
    if not isinstance(tau_refresh, (int, float)) or not tau_refresh > 0:
        raise DerivationError(f"tau_refresh must be > 0 (step-equivalents of change), got {tau_refresh!r}")
    if not isinstance(tau_head, (int, float)) or math.isnan(tau_head) or tau_head < 0:
        raise DerivationError(f"tau_head must be >= 0 (accumulated relative change), got {tau_head!r}")

    refresh = profile.refresh_steps(tau_refresh)
    keep = np.where(refresh, 1.0, profile.keep_fractions(tau_token, selection_layer))
    condition = profile.condition_steps(tau_cfg, refresh)
    head = profile.head_policy(float(tau_head))
    encoder = profile.encoder_policy(tau_buffer, refresh)
    params = {"tau_token": float(tau_token), "tau_refresh": float(tau_refresh), "tau_cfg": float(tau_cfg),
              "selection_layer": selection_layer, "tau_head": float(tau_head), "tau_buffer": float(tau_buffer)}
    if flops_batch_size != 1:
        params["flops_batch_size"] = int(flops_batch_size)
    schedule = CacheSchedule(
        num_iter=profile.num_iter, refresh=refresh.tolist(), keep_fraction=[round(float(k), 6) for k in keep],
        condition_cache=condition.tolist(), head_cache=[True] * profile.num_iter,
        name=name or _default_name(params), keep_min_extra=0.0, selection="similarity",
        selection_layer=selection_layer, always_keep=DERIVED_ALWAYS_KEEP, encoder=encoder, head=head,
        made_for=ModelFingerprint.of(profile.config))
    schedule.validate_for(profile.config, profile.num_iter)
    flops = predicted_flops(schedule, profile.config, profile.use_cfg, flops_batch_size)
    return DerivedSchedule(schedule=schedule, params=params, predicted_flops_ratio=flops["ratio"], flops=flops,
                           head_errors=profile.head_errors(head.refresh_every) if head.refresh_every > 1 else {},
                           profile_source=profile.source)


def _default_name(params: dict) -> str:
    name = "derived-t{tau_token:g}-r{tau_refresh:g}-c{tau_cfg:g}-l{selection_layer}-h{tau_head:g}".format(**params)
    return name + ("-b{:g}".format(params["tau_buffer"]) if params["tau_buffer"] < 1.0 else "")


def _ranges(steps: Sequence[int]) -> str:
    """[0-4, 9, 14] style."""
    out, start = [], None
    for i, s in enumerate(steps):
        if start is None:
            start = s
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return "[" + ", ".join(out) + "]"


# --- the heat map ----------------------------------------------------------------------------------------------
def schedule_matrix(schedule: CacheSchedule) -> pd.DataFrame:
    """Step x component table for heat maps: refresh (0/1), keep_fraction (1 on refresh steps: all recomputed),
    condition_cache (0/1), head_cache (1 where the head policy reuses anything on that step, else 0)."""
    head_on = schedule.head.refresh_every > 1 and (schedule.head.cfg_cache or bool(schedule.head.reuse_blocks)
                                                   or schedule.head.reuse_mlp)
    frame = pd.DataFrame({
        "refresh": np.asarray(schedule.refresh, dtype=float),
        "keep_fraction": np.where(schedule.refresh, 1.0, schedule.keep_fraction),
        "condition_cache": np.asarray(schedule.condition_cache, dtype=float),
        "head_cache": np.asarray(schedule.head_cache, dtype=float) * float(head_on),
    }, index=pd.Index(range(schedule.num_iter), name="step"))
    frame.columns.name = "component"
    return frame
