"""Which samples a run draws: labels, batches and seeds. The one seed rule of every command.

A run of ``num_samples`` samples with ``seed`` and ``batch_size`` is cut into batches of consecutive samples;
batch k holds samples [k * batch_size, (k + 1) * batch_size) and its generator is seeded with
:func:`batch_seed` (seed, k). So the same seed, labels and batch size give the same samples in ``sample``,
``eval``, ``record``, ``bench`` and ``sweep``, on one process or split over ranks (batches go round robin), and
different seeds give independent streams (``seed + k`` would make seed 1 batch 0 equal seed 0 batch 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ArgumentError

SEED_RULE = "batch k (samples k*batch_size...) uses torch seed SeedSequence([seed, k]).generate_state(1)[0]"


def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed of batch ``batch_index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(1)[0])


def balanced_labels(num_samples: int, num_classes: int) -> list[int]:
    """0, 1, ..., C-1, 0, 1, ...: equal class counts (MAR's evaluation draws 50 per class for 50k)."""
    return [i % num_classes for i in range(num_samples)]


@dataclass(frozen=True)
class Batch:
    """One batch of a run: its index, its samples [start, stop), their labels and its generator seed."""

    index: int
    start: int
    stop: int
    labels: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class SamplePlan:
    """The labels of every sample of a run, its seed and batch size."""

    labels: tuple[int, ...]
    seed: int
    batch_size: int

    def __post_init__(self) -> None:
        if not self.labels:
            raise ArgumentError("a run needs at least one sample")
        if self.batch_size < 1:
            raise ArgumentError(f"batch size must be >= 1, got {self.batch_size}")

    @classmethod
    def balanced(cls, num_samples: int, num_classes: int, seed: int, batch_size: int) -> "SamplePlan":
        return cls(tuple(balanced_labels(num_samples, num_classes)), int(seed), int(batch_size))

    @classmethod
    def of(cls, labels: Sequence[int], seed: int, batch_size: int) -> "SamplePlan":
        return cls(tuple(int(x) for x in labels), int(seed), int(batch_size))

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def batches(self, rank: int = 0, world_size: int = 1) -> list[Batch]:
        """The batches rank ``rank`` of ``world_size`` runs (round robin; all of them on one process)."""
        if not 0 <= rank < world_size:
            raise ArgumentError(f"rank {rank} is not in 0..{world_size - 1}")
        out = [Batch(k, start, min(start + self.batch_size, self.num_samples),
                     self.labels[start:start + self.batch_size], batch_seed(self.seed, k))
               for k, start in enumerate(range(0, self.num_samples, self.batch_size))]
        return out[rank::world_size]
