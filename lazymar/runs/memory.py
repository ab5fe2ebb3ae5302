"""Peak memory of a run. On CUDA ``torch.cuda.max_memory_allocated`` during the run (weights included; the device
is synchronised before and after). On CPU the peak resident set size during the run (VmHWM, reset before each run)
minus the process's size before the model was built, so again weights + activations + caches.

The resident set counts what glibc's allocator holds, not only live tensors, so a CPU measurement first tells glibc
(:func:`prepare_cpu_memory_measurement`) to serve every block of 128 KiB and more by mmap and to give back what it
keeps: freed tensors then leave the resident set and each run's peak is its own. Without this, the many small
row gathers of cached steps fragmented glibc's heap: on digits at batch 100 the resident set of the lazymar run grew
from 61 to 176 MiB over 64 steps while its caches held 45 MiB (malloc_trim gave the rest back). With it, the cached
run's extra peak equals its caches' bytes, as on CUDA. The setting makes every large allocation a fresh mmap (page
faults, system time), so it must not be on while wall time is measured: ``lazymar bench`` times its repetitions
with the allocator as it is and measures CPU memory in one extra untimed repetition per run afterwards.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

MMAP_THRESHOLD = 128 << 10


def _status_kb(field_name: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def prepare_cpu_memory_measurement() -> bool:
    """Fix glibc's mmap threshold (blocks >= 128 KiB are returned to the OS when freed) and return the free memory
    glibc holds. True if it took effect. It stays in effect for the process: call it after any timed work."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fixed = bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
        return fixed
    except (OSError, AttributeError):
        return False


def resident_mb() -> Optional[float]:
    """The process's resident set size in MiB (None off Linux)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


class PeakMemory:
    """Peak memory of the code in the ``with`` block, in MiB (None where it cannot be measured: on CPU without a
    ``cpu_baseline_mb`` or without /proc)."""

    def __init__(self, device: torch.device, cpu_baseline_mb: Optional[float] = None):
        self.device, self.cpu_baseline_mb = torch.device(device), cpu_baseline_mb
        self.peak_mb: Optional[float] = None
        self._resettable = False

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
