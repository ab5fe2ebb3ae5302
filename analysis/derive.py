"""Cache schedules derived from a redundancy recording, with no per-model constants.

A recording (lazymar.recording layout) says, per step, how much each position's features changed since the step
before. :class:`RedundancyProfile` condenses it once into per-step arrays; :func:`derive_schedule` then turns five
thresholds into a :class:`~lazymar.cache.schedule.CacheSchedule` in milliseconds (notebook sliders call it live):

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

Predicted FLOPs come from :func:`lazymar.cache.flops.estimate_generation_flops` (per image, batch 1: the
conservative figure; a batch shares the hoisted time embedding, so measured ratios at batch 100 are ~4% higher).

Searches (``lazymar derive --target-flops-ratio`` / ``--min-psnr``): every point of a threshold grid is derived
(a few seconds); an error model, the sum of weight x stale component (token, condition, head; see
:func:`error_components`), is calibrated by measuring one probe schedule per component against the uncached run,
ranks the candidates, and the best few are measured (PSNR vs uncached on fixed seeds); the measured best wins.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from lazymar.cache.flops import estimate_generation_flops, head_net_flops
from lazymar.cache.schedule import CacheSchedule, HeadCachePolicy, none_schedule
from lazymar.config import MARConfig
from lazymar.recording import STATUS_CODES, load_stats
from lazymar.errors import LazymarError

ALWAYS_KEEP = ("to_predict", "new")
TAU_TOKEN_ALL = 1.000001  # above every cosine: recompute all positions


class DerivationError(LazymarError):
    """Thresholds or a recording from which no schedule can be derived; the message names the problem."""


# --- the profile ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadProfile:
    """Median relative change per head step (execution order) of each head part, and the head's layout."""

    parts: tuple[str, ...]          # "eps_cfg", "res_block.0", ...
    timestep: np.ndarray            # (T,) respaced index i of each head step (T-1 first)
    change: np.ndarray              # (T, parts) median relative change since the previous head step (NaN at 0)


@dataclass(frozen=True, eq=False)
class RedundancyProfile:
    """Per-step arrays from a recording, computed once; everything :func:`derive_schedule` needs."""

    config: MARConfig
    num_iter: int
    num_samples: int
    use_cfg: bool
    decoder_layers: tuple[str, ...]
    always_kept: np.ndarray          # (S,) always-kept positions per sample (to_predict + new)
    similarity_levels: tuple         # per decoder block, per step: (lower, upper, count) arrays, see _levels
    step_change: np.ndarray          # (S,) calibrated token change (mean 1 over steps >= 1; 0 at step 0)
    raw_step_change: np.ndarray      # (S,) mean 1 - cosine before calibration
    buffer_change: np.ndarray        # (S,) mean 1 - cosine of the buffer's encoder outputs with step s-1 (0 at 0)
    residual_angle: np.ndarray       # (S,) mean angle (rad) of r_t vs r_{t-1} at the last decoder block (0 w/o CFG)
    guidance_weight: np.ndarray      # (S,) ((cfg_s - 1) / (max cfg_s - 1))^2: how much the uncond branch matters
    head: HeadProfile
    selection: pd.DataFrame          # the selection-layer study (analysis.selection), indexed by layer
    source: str = "recording"
    attrs: dict = field(default_factory=dict)

    @property
    def total_positions(self) -> int:
        return self.config.buffer_size + self.config.seq_len

    @property
    def decoder_depth(self) -> int:
        return len(self.decoder_layers)

    @classmethod
    def from_stats(cls, stats: xr.Dataset | str | Path) -> "RedundancyProfile":
        """Condense a recording (a Dataset or a path, validated by ``load_stats``)."""
        source = "dataset"
        if not isinstance(stats, xr.Dataset):
            source = str(stats)
            stats = load_stats(stats)
        ds = stats
        try:
            config = MARConfig.from_dict(json.loads(ds.attrs["config"]))
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise DerivationError(f"{source}: attribute 'config' is not a model configuration ({err})") from None
        layers = [str(x) for x in ds["layer"].values]
        decoder = tuple(sorted((l for l in layers if l.startswith("decoder.")), key=lambda l: int(l.split(".")[1])))
        transformer = [l for l in layers if l.startswith(("encoder.", "decoder."))]
        if not decoder:
            raise DerivationError(f"{source} has no decoder layers")
        S, P = ds.sizes["step"], ds.sizes["position"]
        if S < 2:
            raise DerivationError(f"{source} has {S} step(s); deriving a schedule needs at least 2")
        status = ds["status"].values  # (n, S, P)
        n = status.shape[0]
        always = np.zeros_like(status, dtype=bool)
        for name in ALWAYS_KEEP:
            always |= status == STATUS_CODES[name]
        always_kept = always.sum(-1).mean(0)  # counts are equal for every sample; the mean is robust anyway

        cos = ds["token_cosine"]
        v = cos.sel(kind="v", layer=list(decoder)).transpose("layer", "step", "sample", "position").values
        v = np.where(always.transpose(1, 0, 2)[None], np.nan, v).reshape(len(decoder), S, n * P)
        bits = _stored_bits(ds.attrs.get("keep_bits"), "token_cosine")
        similarity_levels = tuple(tuple(_levels(row, bits) for row in layer) for layer in v)

        out = cos.sel(kind="output", layer=transformer).values  # (n, S, layers, P)
        with np.errstate(invalid="ignore"), _quiet():
            per_layer = np.nanmean(1.0 - out, axis=(0, 3))  # (S, layers)
            raw = np.nanmean(per_layer, axis=1)
        raw = np.nan_to_num(raw, nan=0.0)
        raw[0] = 0.0
        mean_change = raw[1:].mean()
        step_change = raw / mean_change if mean_change > 0 else np.ones_like(raw)
        step_change[0] = 0.0

        encoder = [l for l in transformer if l.startswith("encoder.")]
        buffer_out = cos.sel(kind="output", layer=encoder).values[..., : config.buffer_size]  # (n, S, layers, buf)
        with np.errstate(invalid="ignore"), _quiet():
            buffer_change = np.nan_to_num(np.nanmean(1.0 - buffer_out, axis=(0, 2, 3)), nan=0.0)
        buffer_change[0] = 0.0

        use_cfg = float(ds.attrs.get("cfg", 1.0)) != 1.0
        residual_angle = np.zeros(S)
        guidance_weight = np.zeros(S)
        if use_cfg:
            rc = ds["cfg_residual_cosine"].sel(layer=decoder[-1]).values  # (n, S, P)
            buf = config.buffer_size
            unknown = (status == STATUS_CODES["to_predict"]) | (status == STATUS_CODES["masked"])
            unknown[:, :, :buf] = False
            angle = np.where(unknown, np.arccos(np.clip(rc, -1.0, 1.0)), np.nan)
            with _quiet():
                residual_angle = np.nan_to_num(np.nanmean(angle, axis=(0, 2)), nan=0.0)
            residual_angle[0] = 0.0
            scale = np.asarray(ds["cfg_scale"].values, dtype=np.float64) - 1.0
            guidance_weight = (scale / scale.max()) ** 2 if scale.max() > 0 else np.zeros(S)

        parts = tuple(str(p) for p in ds["head_part"].values)
        with _quiet():
            head_change = np.nanmedian(ds["head_change"].values, axis=(0, 1))  # (T, parts)
        head = HeadProfile(parts=parts, timestep=np.asarray(ds["head_timestep"].values), change=head_change)
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in ds.attrs.items()}
        from .selection import selection_study
        return cls(config=config, num_iter=S, num_samples=n, use_cfg=use_cfg, decoder_layers=decoder,
                   always_kept=always_kept, similarity_levels=similarity_levels, step_change=step_change,
                   raw_step_change=raw, buffer_change=buffer_change, residual_angle=residual_angle,
                   guidance_weight=guidance_weight, head=head, selection=selection_study(ds),
                   source=source, attrs=attrs)

    @property
    def recommended_layer(self) -> int:
        """The selection layer the selection-layer study recommends."""
        return int(self.selection.attrs["recommended"])

    # --- pieces of the derivation ----------------------------------------------------------------------------
    def check_layer(self, selection_layer: int) -> int:
        if not isinstance(selection_layer, (int, np.integer)) or not 0 <= selection_layer < self.decoder_depth - 1:
            raise DerivationError(f"selection_layer must be a decoder block in 0..{self.decoder_depth - 2} (the last "
                                  f"block has no later blocks to save), got {selection_layer!r}")
        return int(selection_layer)

    @lru_cache(maxsize=256)
    def keep_fractions(self, tau_token: float, selection_layer: int) -> np.ndarray:
        """(S,) fraction of decoder positions recomputed per step: similarity < tau_token, or always kept.
        Memoised (searches ask for the same tau_token under many other thresholds), hence read-only."""
        levels = self.similarity_levels[self.check_layer(selection_layer)]
        below = np.array([_count_below(tau_token, *lv) for lv in levels]) / self.num_samples
        fractions = np.clip((self.always_kept + below) / self.total_positions, 0.0, 1.0)
        fractions.setflags(write=False)
        return fractions

    def refresh_steps(self, tau_refresh: float) -> np.ndarray:
        """(S,) bool: the accumulated calibrated change since the last refresh reaches tau_refresh."""
        refresh = np.zeros(self.num_iter, dtype=bool)
        refresh[0] = True
        acc = 0.0
        for s in range(1, self.num_iter):
            acc += self.step_change[s]
            if acc >= tau_refresh:
                refresh[s], acc = True, 0.0
        return refresh

    def buffer_drift(self, refresh: np.ndarray) -> np.ndarray:
        """(S,) the buffer's change accumulated since the last refresh (0 on refresh steps)."""
        drift, acc = np.zeros(self.num_iter), 0.0
        for s in range(1, self.num_iter):
            acc = 0.0 if refresh[s] else acc + self.buffer_change[s]
            drift[s] = acc
        return drift

    def encoder_policy(self, tau_buffer: float, refresh: np.ndarray) -> str:
        """"new-tokens" (the buffer is cached too) when its largest accumulated change d has 1 - d >= tau_buffer."""
        return "new-tokens" if 1.0 - self.buffer_drift(refresh).max() >= tau_buffer else "incremental"

    def condition_steps(self, tau_cfg: float, refresh: np.ndarray) -> np.ndarray:
        """(S,) bool: condition cache while the weighted residual similarity to the anchor stays >= tau_cfg."""
        return self.condition_drift(tau_cfg, refresh)[0]

    def condition_drift(self, tau_cfg: float, refresh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(condition cache per step, weighted dissimilarity to the anchor of each condition-cached step)."""
        cached, dissimilarity = np.zeros(self.num_iter, dtype=bool), np.zeros(self.num_iter)
        if not self.use_cfg:
            return cached, dissimilarity
        angle = 0.0
        for s in range(1, self.num_iter):
            if refresh[s]:
                angle = 0.0
                continue
            angle += self.residual_angle[s]
            d = self.guidance_weight[s] * (1.0 - math.cos(min(angle, math.pi)))
            if 1.0 - d >= tau_cfg:
                cached[s], dissimilarity[s] = True, d
            else:
                angle = 0.0  # both branches run: this step is the new anchor
        return cached, dissimilarity

    def head_errors(self, refresh_every: int) -> dict[str, float]:
        """Per head part, the mean accumulated change since the last full head step over the cached head steps."""
        change = np.nan_to_num(self.head.change, nan=0.0)
        T = len(self.head.timestep)
        acc = np.zeros(change.shape[1])
        total, cached = np.zeros(change.shape[1]), 0
        policy = HeadCachePolicy(refresh_every=refresh_every)
        for j, i in enumerate(self.head.timestep):
            if policy.full_step(int(i), T):
                acc[:] = 0.0
            else:
                acc += change[j]
                total += acc
                cached += 1
        errors = total / cached if cached else np.zeros_like(total)
        return dict(zip(self.head.parts, errors.tolist()))

    @lru_cache(maxsize=64)
    def head_policy(self, tau_head: float) -> HeadCachePolicy:
        """The head policy that saves the most FLOPs with every reused part's error <= tau_head."""
        T = len(self.head.timestep)
        best, best_saving = HeadCachePolicy(hoist_invariants=True), 0.0
        full_cost = self._head_cost(HeadCachePolicy(hoist_invariants=True))
        for k in range(2, T + 1):
            errors = self.head_errors(k)
            ok = [p for p, e in errors.items() if e <= tau_head]
            cfg_cache = self.use_cfg and "eps_cfg" in ok
            blocks = tuple(int(p.split(".")[1]) for p in ok if p.startswith("res_block."))
            if not cfg_cache and not blocks:
                continue
            policy = HeadCachePolicy(refresh_every=k, cfg_cache=cfg_cache, reuse_blocks=blocks,
                                     hoist_invariants=True)
            saving = full_cost - self._head_cost(policy)
            if saving > best_saving * (1 + 1e-12):
                best, best_saving = policy, saving
        return best

    def _head_cost(self, policy: HeadCachePolicy) -> float:
        """Head FLOPs per decoded token under ``policy`` (the per-row part of the flops module's head formula)."""
        c, T = self.config, len(self.head.timestep)
        rows = 2 if self.use_cfg else 1
        cached_rows = 1 if (self.use_cfg and policy.cfg_cache) else rows
        cost = 0.0
        for i in self.head.timestep:
            if policy.full_step(int(i), T):
                cost += head_net_flops(c, rows, time_rows=0, cond_rows=0)
            else:
                mlp_skipped = 0 if policy.mlp_fresh(int(i), T) else c.diffloss_d - len(policy.reuse_blocks)
                cost += head_net_flops(c, cached_rows, len(policy.reuse_blocks), mlp_skipped, time_rows=0,
                                       cond_rows=0)
        return cost

    def tau_token_at(self, quantile: float, selection_layer: int) -> float:
        """The tau_token at a quantile of the selection layer's similarity (0: below every value, so only the
        always-kept positions are recomputed; 1: above every value, all are)."""
        if not 0.0 <= quantile <= 1.0:
            raise DerivationError(f"token quantile must lie in [0, 1], got {quantile}")
        if quantile == 0.0:
            return -1.0
        if quantile == 1.0:
            return TAU_TOKEN_ALL
        return self.similarity_quantiles(selection_layer, [quantile])[float(quantile)]

    def similarity_quantiles(self, selection_layer: int, q: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)
                             ) -> dict[float, float]:
        """Quantiles of the selection layer's V similarity over all cached-candidate positions (slider ranges)."""
        levels = self.similarity_levels[self.check_layer(selection_layer)]
        values = np.concatenate([np.repeat((lo + hi) / 2, c) for lo, hi, c in levels])
        return {float(x): float(np.quantile(values, x)) for x in q} if len(values) else {}


def _stored_bits(keep_bits, variable: str) -> Optional[int]:
    """Mantissa bits a compact recording kept for ``variable`` (None: exact float32)."""
    if keep_bits is None or keep_bits == "none":
        return None
    try:
        return int(json.loads(keep_bits)[variable])
    except (TypeError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _levels(values: np.ndarray, bits: Optional[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct finite values as (lower, upper, count). A compact recording rounded cosines to ``bits``
    mantissa bits, so each stored value stands for the interval that rounds to it (capped at 1, the largest
    cosine); counting fractions of those intervals makes keep fractions continuous in tau_token. Exact values
    have lower == upper."""
    finite = values[np.isfinite(values)].astype(np.float64)
    level, count = np.unique(finite, return_counts=True)
    if bits is None:
        return level, level, count
    magnitude = np.abs(level)
    exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    above = np.where(magnitude > 0, 2.0 ** (exponent - bits), 0.0)
    below = np.where(magnitude == 2.0 ** exponent, above / 2, above)  # the spacing halves below a power of two
    lower = level - np.where(level >= 0, below, above) / 2
    upper = np.minimum(level + np.where(level >= 0, above, below) / 2, 1.0)
    return lower, upper, count


def _count_below(tau: float, lower: np.ndarray, upper: np.ndarray, count: np.ndarray) -> float:
    """How many values are < tau, values spread uniformly over their [lower, upper] interval."""
    width = upper - lower
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(width > 0, np.clip((tau - lower) / np.where(width > 0, width, 1.0), 0.0, 1.0),
                         (upper < tau).astype(float))
    return float(share @ count)


# --- derivation ----------------------------------------------------------------------------------------------
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
        selection_layer=selection_layer, always_keep=ALWAYS_KEEP, encoder=encoder, head=head)
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


@lru_cache(maxsize=16)
def _baseline_flops(config: MARConfig, num_iter: int, use_cfg: bool, batch_size: int) -> int:
    return estimate_generation_flops(config, none_schedule(num_iter), use_cfg=use_cfg, batch_size=batch_size).total


@lru_cache(maxsize=256)
def _head_flops(config: MARConfig, num_iter: int, use_cfg: bool, batch_size: int, head: HeadCachePolicy) -> int:
    """Head FLOPs of a generation whose every step runs the head under ``head`` (they do not depend on the rest)."""
    schedule = none_schedule(num_iter).with_changes(head_cache=[True] * num_iter, head=head)
    return estimate_generation_flops(config, schedule, use_cfg=use_cfg, batch_size=batch_size).totals()["head"]


@lru_cache(maxsize=4096)
def _transformer_flops(config: MARConfig, no_head: CacheSchedule, use_cfg: bool, batch_size: int) -> dict:
    """FLOPs totals of a schedule whose head is uncached (the encoder and decoder parts are what matter)."""
    return estimate_generation_flops(config, no_head, use_cfg=use_cfg, batch_size=batch_size).totals()


def predicted_flops(schedule: CacheSchedule, config: MARConfig, use_cfg: bool = True, batch_size: int = 1) -> dict:
    """FLOPs of ``schedule`` and of no caching for a batch of ``batch_size`` (flops-module accounting), and their
    ratio. The ratio grows a little with the batch (the hoisted time embedding is shared by a batch's rows);
    batch 1, a single image, is the conservative figure.

    A schedule that runs the head cache on every step (all derived ones) is priced in two exact parts: the encoder
    and decoder with the head uncached, and the head's total for its policy (memoised), so that searches over
    thousands of schedules stay fast."""
    if all(schedule.head_cache):
        # the name and head policy do not change the transformer's FLOPs: normalised, grid points share them
        no_head = schedule.with_changes(head_cache=[False] * schedule.num_iter, head=HeadCachePolicy(), name="")
        totals = dict(_transformer_flops(config, no_head, use_cfg, batch_size))
        totals["head"] = _head_flops(config, schedule.num_iter, use_cfg, batch_size, schedule.head)
        totals["total"] = totals["encoder"] + totals["decoder"] + totals["head"]
    else:
        totals = estimate_generation_flops(config, schedule, use_cfg=use_cfg, batch_size=batch_size).totals()
    base = _baseline_flops(config, schedule.num_iter, use_cfg, batch_size)
    return {**{k: int(v) for k, v in totals.items()}, "baseline": int(base), "ratio": base / totals["total"]}


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


# --- budget and fidelity-floor search ------------------------------------------------------------------------
DEFAULT_GRID = {
    # tau_token as quantiles of the selection layer's similarity (0: only the always-kept positions)
    "token_quantile": (0.0, 0.25, 0.5, 0.75),
    "tau_refresh": (4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 1e9),
    "tau_cfg": (0.9, 0.99, 0.995, 0.998, 0.999, 0.9995, 1.0),
    "tau_head": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8),
    "tau_buffer": (1.0, 0.999, 0.998),
}
PSNR_RANGE = 2.0  # PSNR <-> MSE conversions inside the error model; any value works, it cancels


def candidate_schedules(profile: RedundancyProfile, grid: Optional[dict] = None,
                        layers: Optional[Iterable[int]] = None, progress: bool = False,
                        flops_batch_size: int = 1) -> list[DerivedSchedule]:
    """Every grid point derived (duplicate schedules dropped), sorted by predicted FLOPs ratio. ``grid`` may give
    "tau_token" values directly instead of "token_quantile"s."""
    from itertools import product

    from tqdm.auto import tqdm
    grid = {**DEFAULT_GRID, **(grid or {})}
    layers = list(range(profile.decoder_depth - 1)) if layers is None else list(layers)
    points = []
    for layer in layers:
        if "tau_token" in grid:
            tokens = list(grid["tau_token"])
        else:
            tokens = [profile.tau_token_at(q, layer) for q in grid["token_quantile"]]
        points += [(t, r, c, h, b, layer) for t, r, c, h, b in product(
            tokens, grid["tau_refresh"], grid["tau_cfg"], grid["tau_head"], grid["tau_buffer"])]
    seen, out = set(), []
    for t, r, c, h, b, l in tqdm(points, desc="derive", unit="schedule", disable=not progress):
        d = derive_schedule(profile, tau_token=t, tau_refresh=r, tau_cfg=c, selection_layer=l, tau_head=h,
                            tau_buffer=b, flops_batch_size=flops_batch_size)
        key = d.schedule.with_changes(name="")  # frozen and hashable: equal plans under different names
        if key not in seen:
            seen.add(key)
            out.append(d)
    return sorted(out, key=lambda d: d.predicted_flops_ratio)


ERROR_COMPONENTS = ("token", "condition", "head", "encoder")


def error_components(profile: RedundancyProfile, derived: DerivedSchedule) -> dict[str, float]:
    """What a schedule leaves stale, per component, from the recording alone (each >= 0, 0 when unused):

    - token: per step, the share of decoder positions not recomputed times the calibrated change accumulated
      since the last refresh, averaged over steps;
    - condition: the weighted dissimilarity of the reused residual to its anchor (see the module docstring),
      averaged over steps;
    - head: the sum over reused head parts of their squared error (accumulated relative change);
    - encoder: under the "new-tokens" encoder, the buffer's accumulated change, averaged over steps."""
    s = derived.schedule
    token, acc = 0.0, 0.0
    for i in range(1, s.num_iter):
        if s.refresh[i]:
            acc = 0.0
            continue
        acc += profile.step_change[i]
        token += (1.0 - s.keep_fraction[i]) * acc
    _, dissimilarity = profile.condition_drift(derived.params["tau_cfg"], np.asarray(s.refresh))
    condition = float(dissimilarity[np.asarray(s.condition_cache)].sum())
    errors = profile.head_errors(s.head.refresh_every) if s.head.refresh_every > 1 else {}
    reused = (["eps_cfg"] if s.head.cfg_cache else []) + [f"res_block.{b}" for b in s.head.reuse_blocks]
    head = float(sum(errors.get(p, 0.0) ** 2 for p in reused))
    encoder = float(profile.buffer_drift(np.asarray(s.refresh)).mean()) if s.encoder == "new-tokens" else 0.0
    return {"token": token / s.num_iter, "condition": condition / s.num_iter, "head": head, "encoder": encoder}


@dataclass(frozen=True)
class ErrorModel:
    """Predicted MSE vs the uncached run = sum of weight x component (:func:`error_components`). Calibrated by
    measuring one probe per component (a schedule that caches only that component); uncalibrated weights are
    1 / the component's mean over the candidates, a unitless ranking."""

    weights: dict
    calibrated: bool = False
    probes: tuple = ()

    def mse(self, components: dict) -> float:
        return float(sum(self.weights[k] * components[k] for k in ERROR_COMPONENTS))

    def psnr(self, components: dict) -> float:
        mse = self.mse(components)
        return math.inf if mse <= 0 else 10.0 * math.log10(PSNR_RANGE ** 2 / mse)


def uncalibrated_error_model(profile: RedundancyProfile, candidates: Sequence[DerivedSchedule]) -> ErrorModel:
    comps = [error_components(profile, d) for d in candidates]
    weights = {}
    for k in ERROR_COMPONENTS:
        mean = float(np.mean([c[k] for c in comps])) if comps else 0.0
        weights[k] = 1.0 / mean if mean > 0 else 0.0
    return ErrorModel(weights)


def component_probe(derived: DerivedSchedule, component: str) -> CacheSchedule:
    """``derived``'s schedule caching only ``component`` (the head's exact hoisting stays on; the encoder is
    incremental in all but the encoder probe, whose token cache keeps every position)."""
    s, n = derived.schedule, derived.schedule.num_iter
    exact_head = HeadCachePolicy(hoist_invariants=True)
    if component == "token":
        return s.with_changes(condition_cache=[False] * n, head=exact_head, encoder="incremental",
                              name=s.name + "-probe-token")
    if component == "condition":
        return s.with_changes(keep_fraction=[1.0] * n, head=exact_head, encoder="incremental",
                              name=s.name + "-probe-condition")
    if component == "encoder":
        return s.with_changes(keep_fraction=[1.0] * n, condition_cache=[False] * n, head=exact_head,
                              name=s.name + "-probe-encoder")
    if component == "head":
        return none_schedule(n).with_changes(head_cache=[True] * n, head=s.head, name=s.name + "-probe-head")
    raise DerivationError(f"unknown error component {component!r}; known: {', '.join(ERROR_COMPONENTS)}")


def calibrate_error_model(profile: RedundancyProfile, candidates: Sequence[DerivedSchedule],
                          measure: Callable[[CacheSchedule], float]) -> tuple[ErrorModel, list[dict]]:
    """Measure one probe per component and set weight = probe MSE / probe component. Each probe is built from the
    candidate with the median (upper) value of that component among the candidates that use it, so the linear
    model is calibrated at the operating point (errors grow faster than linearly far from it). Returns the model
    and the measured probe rows."""
    weights, rows = {}, []
    comps = [(d, error_components(profile, d)) for d in candidates]
    for k in ERROR_COMPONENTS:
        using = sorted((dc for dc in comps if dc[1][k] > 0), key=lambda dc: (dc[1][k], dc[0].schedule.name))
        if not using:
            weights[k] = 0.0
            continue
        derived, c = using[len(using) // 2]
        probe = component_probe(derived, k)
        psnr = float(measure(probe))
        mse = 0.0 if math.isinf(psnr) else PSNR_RANGE ** 2 / 10 ** (psnr / 10)
        weights[k] = mse / c[k]
        rows.append({"name": probe.name, "role": f"probe ({k})", **derived.params,
                     "predicted_flops_ratio": predicted_flops(probe, profile.config, profile.use_cfg,
                                                              derived.params.get("flops_batch_size", 1))["ratio"],
                     "predicted_psnr": None, "psnr": psnr})
    return ErrorModel(weights, calibrated=True, probes=tuple(r["name"] for r in rows)), rows


@dataclass
class SearchResult:
    best: DerivedSchedule
    measured: list[dict]       # the probes and candidates measured: name, role, thresholds, ratio, PSNR, ...
    considered: int
    error_model: ErrorModel


def _row(profile: RedundancyProfile, d: DerivedSchedule, model: ErrorModel, psnr: float, role: str) -> dict:
    return {"name": d.schedule.name, "role": role, **d.params, "predicted_flops_ratio": d.predicted_flops_ratio,
            "predicted_psnr": model.psnr(error_components(profile, d)) if model.calibrated else None,
            "psnr": psnr}


def search_budget(profile: RedundancyProfile, target_flops_ratio: float,
                  measure: Optional[Callable[[CacheSchedule], float]] = None, num_measured: int = 4,
                  band: float = 0.15, grid: Optional[dict] = None, progress: bool = False,
                  flops_batch_size: int = 1) -> SearchResult:
    """The schedule with predicted FLOPs ratio >= ``target_flops_ratio`` and the best fidelity.

    The candidates within ``band`` (relative) above the budget are ranked by the error model; with ``measure``
    (schedule -> PSNR in dB vs uncached, e.g. ``analysis.sweep.Reference.psnr``) the model is first calibrated
    on one probe per component, then the ``num_measured`` best-predicted candidates are measured and the highest
    measured PSNR wins. Without ``measure`` the best-predicted (uncalibrated) candidate wins."""
    if not target_flops_ratio > 0:
        raise DerivationError(f"target FLOPs ratio must be > 0, got {target_flops_ratio}")
    candidates = candidate_schedules(profile, grid, progress=progress, flops_batch_size=flops_batch_size)
    feasible = [d for d in candidates if d.predicted_flops_ratio >= target_flops_ratio]
    if not feasible:
        reach = max(d.predicted_flops_ratio for d in candidates)
        raise DerivationError(f"no derived schedule reaches a FLOPs ratio of {target_flops_ratio:g}; the most any "
                              f"grid point reaches on this recording is {reach:.2f}")
    limit = max(feasible[0].predicted_flops_ratio, target_flops_ratio) * (1 + band)
    near = [d for d in feasible if d.predicted_flops_ratio <= limit]
    rows: list[dict] = []
    if measure is None:
        model = uncalibrated_error_model(profile, near)
    else:
        model, rows = calibrate_error_model(profile, near, measure)
    ranked = sorted(near, key=lambda d: (model.mse(error_components(profile, d)), -d.predicted_flops_ratio))
    if measure is None:
        return SearchResult(best=ranked[0], measured=[], considered=len(candidates), error_model=model)
    measured = []
    for d in ranked[:num_measured]:
        psnr = float(measure(d.schedule))
        measured.append((psnr, d.predicted_flops_ratio, d))
        rows.append(_row(profile, d, model, psnr, "candidate"))
    best = max(measured, key=lambda x: (x[0], x[1]))[2]
    return SearchResult(best=best, measured=rows, considered=len(candidates), error_model=model)


def search_fidelity(profile: RedundancyProfile, min_psnr: float, measure: Callable[[CacheSchedule], float],
                    grid: Optional[dict] = None, progress: bool = False, max_measured: int = 8,
                    flops_batch_size: int = 1) -> SearchResult:
    """The fastest schedule (highest predicted FLOPs ratio) whose measured PSNR vs uncached is >= ``min_psnr``.

    The error model is calibrated on probes from all candidates; along the predicted front (ratio up, predicted
    PSNR down) a bisection measures at most ``max_measured`` candidates."""
    candidates = candidate_schedules(profile, grid, progress=progress, flops_batch_size=flops_batch_size)
    model, rows = calibrate_error_model(profile, candidates, measure)
    scored = sorted(((d.predicted_flops_ratio, model.psnr(error_components(profile, d)), d) for d in candidates),
                    key=lambda x: (-x[0], -x[1]))
    front, best_psnr = [], -math.inf
    for ratio, psnr, d in scored:  # fastest first; keep those with a better predicted PSNR than any faster one
        if psnr > best_psnr:
            front.append(d)
            best_psnr = psnr
    front = front[::-1]  # ratio ascending, predicted PSNR descending
    cache: dict[int, float] = {}

    def psnr_of(i: int) -> float:
        if i not in cache:
            cache[i] = float(measure(front[i].schedule))
            rows.append(_row(profile, front[i], model, cache[i], "candidate"))
        return cache[i]

    lo, hi = 0, len(front) - 1  # the last index with measured PSNR >= min_psnr
    if psnr_of(lo) < min_psnr:
        raise DerivationError(f"no derived schedule reaches PSNR {min_psnr:g} dB; the most cautious candidate "
                              f"({front[lo].schedule.name}) measures {cache[lo]:.2f} dB")
    while lo < hi and len(cache) < max_measured:
        mid = (lo + hi + 1) // 2
        if psnr_of(mid) >= min_psnr:
            lo = mid
        else:
            hi = mid - 1
    best = max((i for i, v in cache.items() if v >= min_psnr), key=lambda i: front[i].predicted_flops_ratio)
    return SearchResult(best=front[best], measured=rows, considered=len(candidates), error_model=model)


class _quiet:
    """Silence numpy's all-NaN slice warnings (NaN marks values that were not computed)."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
