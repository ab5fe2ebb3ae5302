"""One validator per kind of command-line value, shared by every subcommand.

The argparse types (``positive_int``, ``finite_float``, ``seed``, ...) reject a bad value while the arguments are
parsed, so argparse prints one ``lazymar <cmd>: error: argument --x: ...`` line and exits 2 before any work. Each
returns the typed value the package uses (``Labels``, ``KeepBits``, ``HeadSteps``, ``ScheduleChoice``, a torch
device), so nothing downstream parses the text again. The checks that need more than one value or the file system
(output paths and their side files, ``num_iter`` against the model's sequence length) raise
:class:`~lazymar.errors.LazymarError` subclasses, which the CLI prints the same way.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from .config import check_num_iter  # noqa: F401 (the one step-count check, here for the commands)
from .errors import OutputError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from .cache.schedule_file import ScheduleChoice
    from .grid import Labels
    from .head_steps import HeadSteps
    from .recording.dataset import KeepBits

from .seeds import SEED_LIMIT


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """A count that must be >= 1 (samples, batch size, steps, repetitions, threads)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def step_list(text: str) -> tuple[int, ...]:
    """A comma-separated list of optimiser steps, each >= 1, e.g. ``500,1000,2000`` (sorted, without repeats)."""
    try:
        return tuple(sorted({positive_int(part) for part in text.split(",") if part.strip()}))
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: each step {error}") from None


def non_negative_int(text: str) -> int:
    """An index or count that may be 0 (a layer index)."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed(text: str) -> int:
    """A random seed in [0, 2**63)."""
    value = _integer(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed must lie in [0, 2**63), got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite real number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (temperature, learning rate)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def float_in(low: float, high: float) -> Callable[[str], float]:
    """A finite number in [low, high] (quantiles, cosine thresholds)."""
    def check(text: str) -> float:
        value = finite_float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low:g}, {high:g}], got {value:g}")
        return value
    check.__name__ = f"number in [{low:g}, {high:g}]"
    return check


def _parsed(parse: Callable[[str], Any], text: str) -> Any:
    """``parse(text)``, its one-line error an argparse error (argparse names the option)."""
    try:
        return parse(text)
    except ValueError as err:  # LazymarError included
        raise argparse.ArgumentTypeError(str(err)) from None


def labels(text: str) -> "Labels":
    """Class labels "0,1,2" or "0-9" (ranges ascending; -1 = unconditional): :class:`lazymar.grid.Labels`."""
    from .grid import Labels
    return _parsed(Labels, text)


def keep_bits(text: str) -> "KeepBits":
    """--keep-bits: N mantissa bits (1..22), 'compact' or 'exact': :class:`lazymar.recording.dataset.KeepBits`."""
    from .recording.dataset import KeepBits
    return _parsed(KeepBits, text)


# --- checks after parsing ------------------------------------------------------------------------------------


IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def image_path(path: str | Path) -> Path:
    """The file an image is written to: ``path``, with ``.png`` appended when it has no suffix (as matplotlib
    does), so that messages name the real file."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give a file name")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        if path.suffix:
            raise OutputError(f"{path}: unsupported image type {path.suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
        path = path.with_name(path.name + ".png")
    return path


def check_outputs(paths: Iterable[Optional[str | Path]], force: bool = False, resume: bool = False) -> list[Path]:
    """Every file a command will write, checked before any work: not a directory, distinct from each other, in a
    writable folder, and (unless ``force``, or ``resume`` for files that are continued) not already there."""
    checked: list[Path] = []
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.is_dir() and path.suffix != ".zarr":  # a Zarr store is a folder; anything else must be a file
            raise OutputError(f"{path}: is a directory; give a file name")
        if any(path.resolve() == p.resolve() for p in checked):
            raise OutputError(f"{path}: would be written twice (the command writes {', '.join(map(str, checked))} "
                              f"beside it); choose another name")
        if path.exists() and not (force or resume):
            raise OutputError(f"{path}: exists; pass --force to overwrite it")
        if path.exists() and not os.access(path, os.W_OK):
            raise OutputError(f"{path}: not writable (permission denied)")
        folder = path.parent
        while not folder.exists():  # the command creates missing folders; the first existing one must allow it
            folder = folder.parent
        if not folder.is_dir():
            raise OutputError(f"{path}: cannot create it, {folder} is not a directory")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"{path}: cannot write in {folder} (permission denied)")
        checked.append(path)
    return checked


DEVICE_NAMES = {"cuda": "CUDA", "mps": "MPS", "xpu": "XPU"}


def device(text: str) -> "torch.device":
    """A torch device that is there (cpu, cuda, cuda:1, mps, ...): checked while the arguments are parsed, so a
    missing one is one line before any model is loaded. The one device check of every command."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu: is_available(), device_count()
    name = DEVICE_NAMES.get(dev.type, dev.type)
    if backend is None or not hasattr(backend, "is_available"):
        raise argparse.ArgumentTypeError(f"{text!r}: lazymar computes on cpu, cuda, mps or xpu devices")
    if not backend.is_available():
        raise argparse.ArgumentTypeError(f"no {name} device here (torch.{dev.type}.is_available() is False); "
                                         f"use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if dev.index is not None and count is not None and dev.index >= count:
        raise argparse.ArgumentTypeError(f"no {name} device {dev.index}: this machine has {count} "
                                         f"({dev.type}:0 to {dev.type}:{count - 1})")
    return dev


def model_arch(text: str) -> str:
    """A named model configuration (mar_base, mar_large, mar_huge, mar_tiny, digits)."""
    from .config import CONFIGS
    if text not in CONFIGS:
        raise argparse.ArgumentTypeError(f"unknown architecture {text!r}; known: {', '.join(CONFIGS)}")
    return text


def schedule_spec(text: str) -> "ScheduleChoice":
    """--schedule: a preset name, or a schedule JSON file, read once here (its step count and model are checked
    later, against the sampling settings and the model): :class:`lazymar.cache.schedule_file.ScheduleChoice`."""
    from .cache.schedule_file import ScheduleChoice
    return _parsed(ScheduleChoice.parse, text)


def head_steps_spec(text: str) -> "HeadSteps":
    """--head-steps: "uniform" or GtR's frequency-weighted "fts:<fraction>:<reduced steps>":
    :class:`lazymar.head_steps.HeadSteps`."""
    from .head_steps import HeadSteps
    return _parsed(HeadSteps, text)


def sweep_schedule_spec(text: str) -> "str | ScheduleChoice":
    """--schedule of ``sweep``: a peer preset name (``lazymar.peers``), or a schedule (see :func:`schedule_spec`)."""
    from .peers import PEER_PRESETS
    return text if text in PEER_PRESETS else schedule_spec(text)


def greater_than(low: float) -> Callable[[str], float]:
    """A finite number > low (e.g. a FLOPs ratio target above 1, which is no caching)."""
    def check(text: str) -> float:
        value = finite_float(text)
        if not value > low:
            raise argparse.ArgumentTypeError(f"must be > {low:g}, got {value:g}")
        return value
    check.__name__ = f"number > {low:g}"
    return check
