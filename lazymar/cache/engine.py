"""The cache engine: a StepRunner that executes a CacheSchedule inside MAR's sampling loop.

It composes one object per caching mechanism, each with its own state and ``reset``:

- :class:`~lazymar.cache.encoder.EncoderCache` - the encoder's incremental K/V (cached steps run only the buffer
  and the tokens decoded at the previous step);
- :class:`~lazymar.cache.decoder.DecoderTokenCache` - the decoder's token cache (after ``selection_layer`` only
  the kept positions run);
- :class:`~lazymar.cache.condition.ConditionCache` - the condition (CFG) cache (cached steps run the cond branch);
- :class:`~lazymar.cache.head.HeadCache` - the diffusion-head cache (inside the head's reverse loop).

The mechanisms drive the model's own methods (embedding of given positions, blocks run on given rows against
given K/V through the attention's ``kv_hook``, the head network part by part); the model stays a plain module.
Refresh steps run exactly the model's computation (bit for bit) and, when later steps need them, fill the caches.
Caches hold only the rows that cached steps run: the cond half when every cached step uses the condition cache.
They are stored in the dtype of the sampling precision (lazymar.precision.cache_dtype): bfloat16 / float16 under
bf16 / fp16 autocast or for a model cast to that dtype, ``CACHE_DTYPE`` (float16) for a float32 computation,
unless the engine is given its own ``cache_dtype``.

The engine keeps a :class:`~lazymar.cache.flops.FlopsLedger` of what it ran (``engine.flops``), charged from the
tensor shapes by the mechanisms. For observers it fills the step context's ``branches``, ``encoder_rows`` and
``decoder_rows`` before each block call on other rows than the plain model's.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..model import MAR
from ..precision import cache_dtype as matching_cache_dtype
from ..sampling import BRANCHES, SamplingSettings, StepContext, StepRunner, sample_head
from . import flops as F
from .condition import ConditionCache
from .decoder import DecoderTokenCache
from .encoder import EncoderCache
from .head import HeadCache
from .schedule_file import CacheSchedule
from .buffers import CACHE_DTYPE


class CacheEngine(StepRunner):
    """Run MAR under ``schedule``. One engine can run many generations (``start`` resets it)."""

    def __init__(self, schedule: CacheSchedule, cache_dtype: Optional[torch.dtype] = None):
        self.schedule, self.requested_dtype = schedule, cache_dtype  # None: the precision's (see the module doc)
        self.cache_dtype = cache_dtype or CACHE_DTYPE  # of the caches (set by start for its generation)
        self.flops = F.FlopsLedger()
        self.model: Optional[MAR] = None
        self.encoder: Optional[EncoderCache] = None
        self.decoder: Optional[DecoderTokenCache] = None
        self.condition = ConditionCache(self.cache_dtype)
        self.head_cache: Optional[HeadCache] = None

    def start(self, model: MAR, settings: SamplingSettings, batch_size: int) -> None:
        sch = self.schedule
        sch.validate_for(model.config, settings.num_iter)
        self.model = model
        plans = self.plans = [sch.step_plan(s, settings.cfg != 1.0) for s in range(sch.num_iter)]
        # rows kept in caches: the network rows that cached steps run (cond first)
        both = any(p.branches == 2 for p in plans if not p.refresh)
        self.cache_rows = batch_size * (2 if both else 1)
        # whether a step's work must be kept for later steps: some later step reuses it
        later = lambda use: [any(use(p) for p in plans[s + 1:]) for s in range(sch.num_iter)]  # noqa: E731
        self.later_cached = later(lambda p: not p.refresh)
        self.later_incremental = later(lambda p: p.incremental_encoder)
        self.later_condition = later(lambda p: p.condition_cache)
        self.flops = F.FlopsLedger()
        self.cache_dtype = self.requested_dtype or matching_cache_dtype(
            settings.precision, next(model.parameters()).dtype, CACHE_DTYPE)
        self.encoder = EncoderCache(model, self.cache_rows, self.flops, self.cache_dtype)
        self.decoder = DecoderTokenCache(model, sch, self.cache_rows, self.flops, self.cache_dtype)
        self.condition.dtype = self.cache_dtype
        self.condition.reset()
        self.head_cache = HeadCache(model, sch.head, self.flops)

    def reset(self) -> None:
        """Release every cache (done after the last step of a generation)."""
        for mechanism in (self.encoder, self.decoder, self.condition, self.head_cache):
            if mechanism is not None:
                mechanism.reset()

    def transformer(self, ctx: StepContext) -> Tensor:
        plan, s = self.plans[ctx.step], ctx.step
        self.flops.begin_step()
        ctx.branches = BRANCHES[: plan.branches]
        if plan.branches == 2 or not ctx.use_cfg:
            tokens, mask, class_emb = ctx.network_inputs()
        else:
            tokens, mask, class_emb = self.condition.cond_inputs(ctx)
        if plan.incremental_encoder:
            x = self.encoder.incremental(ctx, plan, tokens, class_emb)
        else:
            x = self.encoder.full(ctx, tokens, mask, class_emb, store=self.later_incremental[s])
        x = self.decoder.run(ctx, plan, x, store=self.later_cached[s])
        if ctx.use_cfg:
            if plan.branches == 1:
                x = self.condition.complete(x)
            elif self.later_condition[s]:
                self.condition.store(x)
        return self.model.decoder_output(x)

    def head(self, ctx: StepContext, z: Tensor, temperature: float, generator: Optional[torch.Generator]) -> Tensor:
        if self.plans[ctx.step].head_cache:
            sample = lambda rows, steps: self.head_cache.sample(ctx, rows, temperature, generator, steps)  # noqa: E731
        else:
            sample = lambda rows, steps: self._sample_uncached(ctx, rows, temperature, generator, steps)  # noqa: E731
        sampled = sample_head(ctx, z, sample)
        if ctx.step == ctx.num_iter - 1:
            self.reset()
        return sampled[: z.shape[0] // 2] if ctx.use_cfg else sampled

    def _sample_uncached(self, ctx: StepContext, z: Tensor, temperature: float,
                         generator: Optional[torch.Generator], steps: Optional[int] = None) -> Tensor:
        diffloss, config = self.model.diffloss, self.model.config
        cfg = ctx.cfg_scale if ctx.use_cfg else None
        plain = diffloss.denoiser(cfg, diffloss.sampling_diffusion(steps))

        def denoise(x: Tensor, i: Tensor, zz: Tensor) -> Tensor:
            self.flops.add("head", F.head_net_flops(config, x.shape[0]))
            return plain(x, i, zz)
        return diffloss.sample(z, temperature, cfg, generator, denoise=denoise, steps=steps)
