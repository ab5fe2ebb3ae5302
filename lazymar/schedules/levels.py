"""Similarity levels: the distinct recorded cosines of a (layer, step) with their counts, accumulated chunk by chunk.

A compact recording rounded cosines to a few mantissa bits, so each stored value stands for the interval of values
that round to it; :func:`levels_from_counts` turns (value, count) pairs into (lower, upper, count) intervals and
:func:`count_below` counts how many values lie below a threshold, spreading each over its interval, so that keep
fractions are continuous in tau_token. Counts merge across chunks of samples, so a recording larger than memory
is condensed one chunk at a time (memory: the distinct values, few for a compact recording).
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

Levels = tuple[np.ndarray, np.ndarray, np.ndarray]  # (lower, upper, count)


def stored_bits(keep_bits, variable: str) -> Optional[int]:
    """Mantissa bits a compact recording kept for ``variable`` (None: exact float32)."""
    if keep_bits is None or keep_bits == "none":
        return None
    try:
        return int(json.loads(keep_bits)[variable])
    except (TypeError, ValueError, KeyError, json.JSONDecodeError):
        return None


def value_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct finite values (float64, ascending) and how often each occurs."""
    finite = values[np.isfinite(values)].astype(np.float64)
    return np.unique(finite, return_counts=True)


def merge_counts(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(values, counts) of two chunks combined."""
    values, inverse = np.unique(np.concatenate([a[0], b[0]]), return_inverse=True)
    counts = np.zeros(len(values), dtype=np.int64)
    np.add.at(counts, inverse, np.concatenate([a[1], b[1]]))
    return values, counts


def levels_from_counts(level: np.ndarray, count: np.ndarray, bits: Optional[int]) -> Levels:
    """(lower, upper, count): each value stands for the interval that rounds to it at ``bits`` mantissa bits
    (capped at 1, the largest cosine). Exact values (``bits`` None) have lower == upper."""
    if bits is None:
        return level, level, count
    magnitude = np.abs(level)
    exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    above = np.where(magnitude > 0, 2.0 ** (exponent - bits), 0.0)
    below = np.where(magnitude == 2.0 ** exponent, above / 2, above)  # the spacing halves below a power of two
    lower = level - np.where(level >= 0, below, above) / 2
    upper = np.minimum(level + np.where(level >= 0, above, below) / 2, 1.0)
    return lower, upper, count


def levels(values: np.ndarray, bits: Optional[int]) -> Levels:
    """The distinct finite values of one array as (lower, upper, count) intervals."""
    return levels_from_counts(*value_counts(values), bits)


def count_below(tau: float, lower: np.ndarray, upper: np.ndarray, count: np.ndarray) -> float:
    """How many values are < tau, values spread uniformly over their [lower, upper] interval."""
    width = upper - lower
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(width > 0, np.clip((tau - lower) / np.where(width > 0, width, 1.0), 0.0, 1.0),
                         (upper < tau).astype(float))
    return float(share @ count)


def sample_chunks(variable, default: int = 64) -> list[slice]:
    """Slices along ``sample`` that follow the variable's dask chunks (or blocks of ``default`` samples when it is
    in memory): the unit of work of every chunked pass over a recording."""
    n = variable.sizes["sample"]
    sizes = (variable.chunksizes or {}).get("sample") or [default] * (-(-n // default))
    out, start = [], 0
    for size in sizes:
        stop = min(start + size, n)
        if stop > start:
            out.append(slice(start, stop))
        start = stop
    return out
