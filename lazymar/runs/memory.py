"""Peak memory of a run. On CUDA ``torch.cuda.max_memory_allocated`` during the run (weights included; the device
is synchronised before and after). On CPU the peak resident set size during the run (VmHWM, reset before each run)
minus the process's size without the model (its resident size less the weights' bytes), so again weights +
activations + caches.

The resident set counts what glibc's allocator holds, not only live tensors, so CPU measurements run inside
:func:`cpu_memory_measurement`, which tells glibc to serve every block of 128 KiB and more by mmap and to give back
what it keeps: freed tensors then leave the resident set and each run's peak is its own. Without this, the many small
row gathers of cached steps fragmented glibc's heap: on digits at batch 100 the resident set of the lazymar run grew
from 61 to 176 MiB over 64 steps while its caches held 45 MiB (malloc_trim gave the rest back). With it, the cached
run's extra peak equals its caches' bytes, as on CUDA. The setting makes every large allocation a fresh mmap (page
faults, system time), so it must not be on while wall time is measured: ``lazymar bench`` measures CPU memory in
one untimed repetition per run first, on a fresh heap (after the timed ones, glibc's heap holds up to GBs that no
trim gives back), then times its repetitions with large thresholds.
"""
from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path
from typing import Iterator, Optional

import torch

MMAP_THRESHOLD = 128 << 10


def _status_kb(field_name: str, pid: int | str = "self") -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# glibc mallopt parameters: while measuring, blocks >= 128 KiB come from mmap and go back when freed; afterwards
# the thresholds glibc's own adaptation reaches for large tensors (heap reuse, no page faults per allocation)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MEASURING = {M_MMAP_THRESHOLD: MMAP_THRESHOLD, M_TRIM_THRESHOLD: MMAP_THRESHOLD}
AFTERWARDS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}


def _mallopt(settings: dict[int, int]) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = all(libc.mallopt(param, value) for param, value in settings.items())
        libc.malloc_trim(0)
        return done
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def cpu_memory_measurement() -> Iterator[bool]:
    """Inside: glibc returns every freed block of 128 KiB and more, so the resident set follows live memory
    (yields False where glibc cannot be told, off Linux). Afterwards: large thresholds, so later timed work is not
    taxed by a page fault per allocation. Run it before timed work, on a fresh heap."""
    measuring = _mallopt(MEASURING)
    try:
        yield measuring
    finally:
        if measuring:
            _mallopt(AFTERWARDS)


def weights_mb(model: torch.nn.Module) -> float:
    """The bytes of a model's parameters and buffers, in MiB."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def resident_mb(pid: int | str = "self") -> Optional[float]:
    """The resident set size of this process (or of process ``pid``) in MiB (None off Linux, or once it ended)."""
    kb = _status_kb("VmRSS", pid)
    return None if kb is None else kb / 1024


def peak_resident_mb() -> Optional[float]:
    """This process's peak resident set size (VmHWM) in MiB since it started or since :class:`PeakMemory` last
    reset it (None off Linux)."""
    kb = _status_kb("VmHWM")
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
            hwm = peak_resident_mb()
            self.peak_mb = None if hwm is None else hwm - self.cpu_baseline_mb
