"""The condition (CFG) cache: on a cached step only the conditional branch runs through the transformer, and the
unconditional output of the last decoder block is cond + (uncond - cond), the difference cached at the last step
that ran both branches."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..sampling import StepContext
from .buffers import CACHE_DTYPE


class ConditionCache:
    """State: the uncond - cond difference (B, buffer + seq, dec) at the last decoder block."""

    def __init__(self, dtype: torch.dtype = CACHE_DTYPE) -> None:
        self.dtype = dtype
        self.reset()

    def reset(self) -> None:
        self.difference: Optional[Tensor] = None

    @property
    def empty(self) -> bool:
        return self.difference is None

    @staticmethod
    def cond_inputs(ctx: StepContext) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens, float mask with 1 = unknown, class embeddings) of the conditional branch alone."""
        return ctx.tokens, ctx.unknown.float(), ctx.model.class_embedding(ctx.labels, ctx.batch_size)

    def store(self, both: Tensor) -> None:
        """Keep uncond - cond of a [cond; uncond] last-block output."""
        cond, uncond = both.chunk(2)
        self.difference = (uncond - cond).to(self.dtype)

    def complete(self, cond: Tensor) -> Tensor:
        """[cond; cond + cached difference]: the network batch of both branches from the cond half."""
        if self.difference is None:
            raise RuntimeError("condition cache used before any step ran both branches")  # a bug, not a user error
        return torch.cat([cond, cond + self.difference.to(cond.dtype)])
