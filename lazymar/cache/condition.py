"""The condition (CFG) cache: on a cached step only the conditional branch runs through the transformer, and the
unconditional output of the last decoder block is cond + (uncond - cond), the difference cached at the last step
that ran both branches."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..sampling import StepContext
from .mechanism import CacheMechanism, CacheShape, EngineRun, TransformerPass
from .buffers import CACHE_DTYPE


class ConditionCache(CacheMechanism):
    """State: the uncond - cond difference (B, buffer + seq, dec) at the last decoder block. It runs no network of
    its own (its saving shows in the rows the other mechanisms run: ``StepPlan.branches``), so it charges nothing."""

    def __init__(self, dtype: torch.dtype = CACHE_DTYPE) -> None:
        self.dtype = dtype
        self.keep: list[bool] = []  # per step: whether a later step uses the condition cache (start)
        self.reset()

    def start(self, run: EngineRun) -> None:
        self.dtype = run.dtype
        self.keep = run.later(lambda p: p.condition_cache)
        self.reset()

    def run_inputs(self, ctx: StepContext, step: TransformerPass) -> None:
        if ctx.use_cfg and step.plan.branches == 1:
            step.tokens, step.mask, step.class_emb = self.cond_inputs(ctx)

    def run_output(self, ctx: StepContext, step: TransformerPass) -> None:
        if not ctx.use_cfg:
            return
        if step.plan.branches == 1:
            step.x = self.complete(step.x)
        elif self.keep[ctx.step]:
            self.store(step.x)

    def cache_bytes(self, shape: CacheShape) -> int:
        """uncond - cond of the last block's output, for every position of the batch, when a step reuses it."""
        c = shape.config
        if not shape.later(lambda p: p.condition_cache):
            return 0
        return shape.batch_size * (c.buffer_size + c.seq_len) * c.decoder_embed_dim * shape.element_bytes

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
