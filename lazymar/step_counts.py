"""The token counts of every step of a generation: the one mask bookkeeping that the sampling loop follows and the
analytic FLOPs model prices (lazymar.cache.flops). Counts are per sample and equal for every sample of a batch;
they follow from the generation order's mask lengths alone, on the host."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .orders import GenerationOrder


@dataclass(frozen=True)
class StepCounts:
    """Per-sample token counts of one step."""

    step: int
    known: int        # decoded before s-1
    new: int          # decoded at s-1
    to_predict: int   # decoded at s
    masked: int = 0   # still unknown after s (0 at the last step)
    mask_len: int = 0  # the order's mask length at s (the CFG schedule reads it; = masked but at the last step)

    @property
    def unknown(self) -> int:
        """Positions unknown before this step (to predict or still masked)."""
        return self.to_predict + self.masked


def generation_steps(order: GenerationOrder, seq_len: int, num_iter: int) -> Iterator[StepCounts]:
    """The counts of each of ``num_iter`` steps of ``order`` over ``seq_len`` positions, one step at a time (the
    order's mask length of a step is asked for when that step comes)."""
    unknown, new = seq_len, 0
    for step in range(num_iter):
        mask_len = order.mask_length(step, num_iter, seq_len, unknown)
        masked = 0 if step == num_iter - 1 else mask_len
        yield StepCounts(step, seq_len - unknown - new, new, unknown - masked, masked, mask_len)
        new, unknown = unknown - masked, masked
