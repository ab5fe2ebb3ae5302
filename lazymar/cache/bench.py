"""Benchmark a cache schedule against the uncached sampler: FLOPs, wall time, peak memory, fidelity, quality.

Both runs use the same model, labels, batches and seeds (batch i uses seed + i), so they draw the same orders and
noise and differ only by what the schedule reuses. Wall times come from the same process, repetitions interleaved
(baseline, cached, baseline, ...), median reported; process CPU time beside it (all threads: on a shared machine
it is less disturbed by other processes than wall time).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the run (weights included); on CPU the peak
resident set size during the run (VmHWM, reset before each run) minus the process's size before the model was
built, so again weights + activations + caches. glibc is told to serve allocations of 1 MiB and more by mmap, so
that freed tensors leave the resident set and each run's peak is its own (both runs pay the same page faults).
"""
from __future__ import annotations

import ctypes
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..model import MAR
from ..sampling import SamplingSettings, generate
from .engine import CacheEngine
from .flops import FlopsLedger
from .schedule import CacheSchedule, none_schedule

MMAP_THRESHOLD = 1 << 20


# --- memory ---------------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def prepare_cpu_memory_measurement() -> bool:
    """Fix glibc's mmap threshold (large blocks are returned to the OS when freed). True if it took effect."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def resident_mb() -> Optional[float]:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


class PeakMemory:
    """Peak memory of the code in the ``with`` block, in MiB (None where it cannot be measured)."""

    def __init__(self, device: torch.device, cpu_baseline_mb: Optional[float]):
        self.device, self.cpu_baseline_mb, self.peak_mb = device, cpu_baseline_mb, None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
                self._resettable = True
            except OSError:
                self._resettable = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._resettable and self.cpu_baseline_mb is not None:
            hwm = _status_kb("VmHWM")
            self.peak_mb = None if hwm is None else hwm / 1024 - self.cpu_baseline_mb


# --- runs -----------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    tokens: Tensor
    flops: FlopsLedger
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_memory_mb: list[float] = field(default_factory=list)


def run_schedule(model: MAR, labels: Sequence[int], settings: SamplingSettings, schedule: CacheSchedule,
                 seed: int, batch_size: int) -> tuple[Tensor, FlopsLedger]:
    """Tokens for ``labels`` in batches (batch i: seed + i) under ``schedule``, and the FLOPs of all batches."""
    out, ledger = [], FlopsLedger()
    for i, start in enumerate(range(0, len(labels), batch_size)):
        engine = CacheEngine(schedule)
        out.append(generate(model, list(labels[start:start + batch_size]), settings, seed=seed + i, runner=engine))
        ledger = ledger.merge(engine.flops)
    return torch.cat(out), ledger


def _timed(fn: Callable[[], tuple[Tensor, FlopsLedger]], device: torch.device,
           cpu_baseline_mb: Optional[float]) -> tuple[Tensor, FlopsLedger, float, float, Optional[float]]:
    with PeakMemory(device, cpu_baseline_mb) as memory:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        tokens, ledger = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return tokens, ledger, seconds, cpu_seconds, memory.peak_mb


def benchmark(model: MAR, labels: Sequence[int], settings: SamplingSettings, schedule: CacheSchedule, seed: int = 0,
              batch_size: int = 100, repeats: int = 3, warmup: bool = True,
              evaluate: Optional[Callable[[Tensor], dict]] = None, images: Optional[Callable[[Tensor], Tensor]] = None,
              cpu_baseline_mb: Optional[float] = None, progress: bool = True) -> dict:
    """Uncached ("none") against ``schedule``; returns the JSON-able comparison.

    ``images`` maps tokens to images for fidelity (default: the tokens themselves) and ``evaluate`` maps
    images to quality metrics (accuracy, fid)."""
    device = next(model.parameters()).device
    configs = {"baseline": none_schedule(settings.num_iter), "cached": schedule}
    if warmup:  # one sample each, untimed: allocator, kernels
        for s in configs.values():
            run_schedule(model, list(labels[:1]), settings, s, seed, batch_size)
    results: dict[str, RunResult] = {}
    nondeterministic: set[str] = set()
    bar = tqdm(total=repeats * 2, desc="bench", unit="run", disable=not progress)
    for _ in range(repeats):
        for name, s in configs.items():
            tokens, ledger, seconds, cpu_seconds, peak = _timed(
                lambda s=s: run_schedule(model, labels, settings, s, seed, batch_size), device, cpu_baseline_mb)
            if name not in results:
                results[name] = RunResult(tokens, ledger)
            elif not torch.equal(results[name].tokens, tokens):
                nondeterministic.add(name)
            results[name].seconds.append(seconds)
            results[name].cpu_seconds.append(cpu_seconds)
            if peak is not None:
                results[name].peak_memory_mb.append(peak)
            bar.update(1)
    bar.close()

    to_images = images or (lambda t: t)
    imgs = {name: to_images(r.tokens) for name, r in results.items()}
    out: dict = {}
    for name, r in results.items():
        totals = r.flops.totals()
        entry = {
            "flops": totals["total"], "flops_per_image": totals["total"] / len(labels),
            "flops_by_component": {k: v for k, v in totals.items() if k != "total"},
            "seconds": statistics.median(r.seconds), "seconds_all": r.seconds,
            "cpu_seconds": statistics.median(r.cpu_seconds), "cpu_seconds_all": r.cpu_seconds,
            "peak_memory_mb": max(r.peak_memory_mb) if r.peak_memory_mb else None,
            "accuracy": None, "fid": None,
        }
        if evaluate is not None:
            entry.update({k: v for k, v in evaluate(imgs[name]).items() if k in ("accuracy", "fid")})
        entry["repeats_identical"] = name not in nondeterministic
        out[name] = entry
    base, cached = out["baseline"], out["cached"]
    from ..metrics import psnr, token_mse
    out["flops_ratio"] = base["flops"] / cached["flops"]
    out["wall_ratio"] = base["seconds"] / cached["seconds"]
    out["cpu_time_ratio"] = base["cpu_seconds"] / cached["cpu_seconds"]
    out["memory_ratio"] = (cached["peak_memory_mb"] / base["peak_memory_mb"]
                           if base["peak_memory_mb"] and cached["peak_memory_mb"] else None)
    a, b = imgs["cached"].detach().cpu().float(), imgs["baseline"].detach().cpu().float()
    data_range = float(b.max() - b.min()) if images is None else 2.0
    out["token_mse"] = token_mse(results["cached"].tokens.cpu(), results["baseline"].tokens.cpu())
    out["psnr"] = psnr(a, b, data_range=data_range or 1.0)
    out["psnr_data_range"] = data_range
    for key in ("psnr", "token_mse"):
        if isinstance(out[key], float) and math.isinf(out[key]):
            out[key] = "inf"
    return out
