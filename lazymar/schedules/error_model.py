"""The error model of searches: what a schedule leaves stale, per component, and how much PSNR that costs.

:func:`error_components` reads the staleness of a schedule from the recording alone; an :class:`ErrorModel`
weighs the components into a predicted MSE vs the uncached run. Its weights are calibrated by measuring one probe
schedule per component (:func:`calibrate_error_model`), or, uncalibrated, rank candidates without sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..cache.schedule_file import CacheSchedule, HeadCachePolicy, none_schedule
from .derive import DerivedSchedule
from .predicted_flops import predicted_flops
from .profile import DerivationError, RedundancyProfile

PSNR_RANGE = 2.0  # PSNR <-> MSE conversions inside the error model; any value works, it cancels

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
