"""The redundancy profile: a recording condensed once into the per-step arrays that derivation needs.

:meth:`RedundancyProfile.from_stats` reads a recording with xarray reductions (means and medians over samples and
positions) that dask runs chunk by chunk when the recording is opened lazily, and collects the selection layer's
similarity levels one chunk of samples at a time, so a recording larger than memory can be condensed. The methods
turn one threshold each into a per-step decision (see :mod:`lazymar.schedules.derive` for the thresholds).
"""
from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ..errors import LazymarError
from ..cache.schedule_file import HeadCachePolicy
from ..config import MARConfig
from ..recording import STATUS_CODES, load_stats
from ..recording.dataset import reading
from .levels import count_below, levels_from_counts, merge_counts, sample_chunks, stored_bits, value_counts
from .predicted_flops import head_flops
from .selection import selection_study

DERIVED_ALWAYS_KEEP = ("to_predict", "new")  # the statuses a derived schedule always recomputes
TAU_TOKEN_ALL = 1.000001  # above every cosine: recompute all positions


class DerivationError(LazymarError):
    """Thresholds or a recording from which no schedule can be derived; the message names the problem."""


@dataclass(frozen=True)
class HeadProfile:
    """Median relative change per head step (execution order) of each head part, and the head's layout."""

    parts: tuple[str, ...]          # "eps_cfg", "res_block.0", ...
    timestep: np.ndarray            # (T,) respaced index i of each head step (T-1 first)
    change: np.ndarray              # (T, parts) median relative change since the previous head step (NaN at 0)


@contextmanager
def _quiet():
    """Silence all-NaN slice warnings (NaN marks values that were not computed)."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _similarity_levels(ds: xr.Dataset, decoder: Sequence[str], always: xr.DataArray) -> tuple:
    """Per decoder block, per step: (lower, upper, count) of the V similarity of the positions the token cache
    may skip, accumulated over chunks of samples."""
    cos = ds["token_cosine"]
    S = ds.sizes["step"]
    counts = [[(np.empty(0), np.empty(0, dtype=np.int64))] * S for _ in decoder]
    for chunk in sample_chunks(cos):
        v = cos.isel(sample=chunk).sel(kind="v", layer=list(decoder))
        v = v.where(~always.isel(sample=chunk)).transpose("layer", "step", "sample", "position").values
        for i, layer in enumerate(v):
            for s, row in enumerate(layer):
                counts[i][s] = merge_counts(counts[i][s], value_counts(row))
    bits = stored_bits(ds.attrs.get("keep_bits"), "token_cosine")
    return tuple(tuple(levels_from_counts(*c, bits) for c in layer) for layer in counts)


def _mean_change(similarity: xr.DataArray, dims: Sequence[str]) -> np.ndarray:
    """(step,) mean of 1 - cosine over ``dims`` (NaN skipped; 0 where nothing was recorded, and at step 0)."""
    with _quiet():
        change = (1.0 - similarity).mean(dim=list(dims), skipna=True).values
    change = np.nan_to_num(np.asarray(change, dtype=np.float64), nan=0.0)
    change[0] = 0.0
    return change


@dataclass(frozen=True, eq=False)
class RedundancyProfile:
    """Per-step arrays from a recording, computed once; everything :func:`derive_schedule` needs."""

    config: MARConfig
    num_iter: int
    num_samples: int
    use_cfg: bool
    decoder_layers: tuple[str, ...]
    always_kept: np.ndarray          # (S,) always-kept positions per sample (to_predict + new)
    similarity_levels: tuple         # per decoder block, per step: (lower, upper, count) arrays (levels module)
    step_change: np.ndarray          # (S,) calibrated token change (mean 1 over steps >= 1; 0 at step 0)
    raw_step_change: np.ndarray      # (S,) mean 1 - cosine before calibration
    buffer_change: np.ndarray        # (S,) mean 1 - cosine of the buffer's encoder outputs with step s-1 (0 at 0)
    residual_angle: np.ndarray       # (S,) mean angle (rad) of r_t vs r_{t-1} at the last decoder block (0 w/o CFG)
    guidance_weight: np.ndarray      # (S,) ((cfg_s - 1) / (max cfg_s - 1))^2: how much the uncond branch matters
    head: HeadProfile
    selection: pd.DataFrame          # the selection-layer study (lazymar.schedules.selection), indexed by layer
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
        """Condense a recording (a Dataset, in memory or dask-backed, or a path validated by ``load_stats``)."""
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
        encoder = [l for l in transformer if l.startswith("encoder.")]
        if not decoder:
            raise DerivationError(f"{source} has no decoder layers")
        S, n = ds.sizes["step"], ds.sizes["sample"]
        if S < 2:
            raise DerivationError(f"{source} has {S} step(s); deriving a schedule needs at least 2")
        status = ds["status"]  # (n, S, P)
        always = status.isin([STATUS_CODES[name] for name in DERIVED_ALWAYS_KEEP])
        # counts are equal for every sample; the mean is robust anyway
        always_kept = np.asarray(always.sum("position").mean("sample").values, dtype=np.float64)

        cos = ds["token_cosine"]
        per_layer = (1.0 - cos.sel(kind="output", layer=transformer)).mean(("sample", "position"), skipna=True)
        with _quiet():
            raw = np.nan_to_num(np.asarray(per_layer.mean("layer", skipna=True).values, np.float64), nan=0.0)
        raw[0] = 0.0
        mean_change = raw[1:].mean()
        step_change = raw / mean_change if mean_change > 0 else np.ones_like(raw)
        step_change[0] = 0.0

        buffer = cos.sel(kind="output", layer=encoder).isel(position=slice(0, config.buffer_size))
        buffer_change = _mean_change(buffer, ("sample", "layer", "position"))

        use_cfg = float(ds.attrs.get("cfg", 1.0)) != 1.0
        residual_angle, guidance_weight = np.zeros(S), np.zeros(S)
        if use_cfg:
            rc = ds["cfg_residual_cosine"].sel(layer=decoder[-1])  # (n, S, P)
            tokens = xr.DataArray(np.arange(ds.sizes["position"]) >= config.buffer_size, dims="position")
            unknown = status.isin([STATUS_CODES["to_predict"], STATUS_CODES["masked"]]) & tokens
            angle = np.arccos(rc.clip(-1.0, 1.0)).where(unknown)
            with _quiet():
                residual_angle = np.nan_to_num(np.asarray(angle.mean(("sample", "position"), skipna=True).values,
                                                          np.float64), nan=0.0)
            residual_angle[0] = 0.0
            scale = np.asarray(ds["cfg_scale"].values, dtype=np.float64) - 1.0
            guidance_weight = (scale / scale.max()) ** 2 if scale.max() > 0 else np.zeros(S)

        parts = tuple(str(p) for p in ds["head_part"].values)
        head_change = ds["head_change"]
        if head_change.chunks is not None:  # a dask median needs the reduced dimensions in one chunk
            head_change = head_change.chunk({"sample": -1, "step": -1, "head_step": 1})
        with _quiet():
            head_median = head_change.median(("sample", "step"), skipna=True).transpose("head_step", "head_part")
            head_median = np.asarray(head_median.values)
        head = HeadProfile(parts=parts, timestep=np.asarray(ds["head_timestep"].values), change=head_median)
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in ds.attrs.items()}
        return cls(config=config, num_iter=S, num_samples=n, use_cfg=use_cfg, decoder_layers=decoder,
                   always_kept=always_kept, similarity_levels=_similarity_levels(ds, decoder, always),
                   step_change=step_change, raw_step_change=raw, buffer_change=buffer_change,
                   residual_angle=residual_angle, guidance_weight=guidance_weight, head=head,
                   selection=selection_study(ds), source=source, attrs=attrs)

    def check_model(self, config: MARConfig, num_iter: Optional[int], model: str) -> None:
        """Refuse a model of ``config`` (named ``model``) other than the recording's, in one line naming both
        (fingerprint.ModelMismatchError), and, with ``num_iter``, another step count (DerivationError): the
        recording's schedules only fit that model and step count."""
        from ..fingerprint import check_same_model
        check_same_model(f"recording {self.source}", self.config, config, model,
                         str(self.attrs.get("model", "")) or None)
        if num_iter is not None and num_iter != self.num_iter:
            raise DerivationError(f"the recording has {self.num_iter} steps but sampling uses {num_iter}; "
                                  f"pass --num-iter {self.num_iter}")

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
        below = np.array([count_below(tau_token, *lv) for lv in levels]) / self.num_samples
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

    def _head_cost(self, policy: HeadCachePolicy) -> int:
        """Head FLOPs of one image decoded in one step under ``policy`` (the flops module's accounting; head FLOPs
        grow linearly with the tokens decoded, so this ranks policies as the whole generation does)."""
        return head_flops(self.config, 1, self.use_cfg, 1, policy)

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
        lower, upper, count = (np.concatenate(a) for a in zip(*self.similarity_levels[self.check_layer(
            selection_layer)]))
        order = np.argsort((lower + upper) / 2, kind="stable")
        return _weighted_quantiles(((lower + upper) / 2)[order], count[order], q)


def _weighted_quantiles(values: np.ndarray, counts: np.ndarray, q: Sequence[float]) -> dict[float, float]:
    """``np.quantile`` (linear interpolation) of ``values`` each repeated ``counts`` times, without repeating."""
    total = int(counts.sum())
    if total == 0:
        return {}
    ends = np.cumsum(counts)  # the k-th repeated value (0-based) is values[searchsorted(ends, k, "right")]

    def at(k: int) -> float:
        return float(values[np.searchsorted(ends, k, side="right")])

    out = {}
    for x in q:
        h = (total - 1) * float(x)
        lo = int(math.floor(h))
        hi = min(lo + 1, total - 1)
        out[float(x)] = at(lo) + (h - lo) * (at(hi) - at(lo))
    return out


def load_profile(stats: str | Path) -> RedundancyProfile:
    """The redundancy profile of the recording at ``stats``; a recording without any finite token similarity (e.g.
    all NaN) cannot rank positions, so it is rejected with one line instead of failing inside the search. A
    damaged chunk of a lazily opened store surfaces while the profile reads it: one line naming the store."""
    ds = load_stats(stats)
    with reading(stats):
        if "token_cosine" in ds and not np.isfinite(ds["token_cosine"].values).any():
            raise DerivationError(f"{stats}: token_cosine holds no finite values (all NaN); record it again")
        return replace(RedundancyProfile.from_stats(ds), source=str(stats))
