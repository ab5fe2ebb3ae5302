"""The cache engine: a StepRunner that executes a CacheSchedule inside MAR's sampling loop.

It composes a list of cache mechanisms (:class:`~lazymar.cache.mechanism.CacheMechanism`), each with its own state,
its part of every step and the FLOPs of that part; :func:`default_mechanisms` are

- :class:`~lazymar.cache.condition.ConditionCache` - the condition (CFG) cache (cached steps run the cond branch);
- :class:`~lazymar.cache.encoder.EncoderCache` - the encoder's incremental K/V (cached steps run only the buffer
  and the tokens decoded at the previous step);
- :class:`~lazymar.cache.decoder.DecoderTokenCache` - the decoder's token cache (after ``selection_layer`` only
  the kept positions run);
- :class:`~lazymar.cache.head.HeadCache` - the diffusion-head cache (inside the head's reverse loop).

The mechanisms drive the model's own methods (embedding of given positions, blocks run on given rows against
given K/V through the attention's ``kv_hook``, the head network part by part); the model stays a plain module.
Refresh steps run exactly the model's computation (bit for bit) and, when later steps need them, fill the caches.
Caches hold only the rows that cached steps run: the cond half when every cached step uses the condition cache.
They are stored in the dtype of the sampling precision (lazymar.precision.cache_dtype): bfloat16 / float16 under
bf16 / fp16 autocast or for a model cast to that dtype, ``CACHE_DTYPE`` (float16) for a float32 computation,
unless the engine is given its own ``cache_dtype``.

The engine keeps a :class:`~lazymar.cache.flops.FlopsLedger` of what it ran (``engine.flops``), charged from the
tensor shapes by the mechanisms; :func:`estimate_generation_flops` predicts it from token counts by asking the same
mechanisms. For observers the mechanisms fill the step context's ``branches``, ``encoder_rows`` and
``decoder_rows`` before each block call on other rows than the plain model's.
"""
from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import torch
from torch import Tensor

from ..config import MARConfig
from ..head_steps import head_step_allocation
from ..model import MAR
from ..orders import generation_order
from ..precision import cache_dtype as matching_cache_dtype
from ..sampling import BRANCHES, SamplingSettings, StepContext, StepRunner
from ..step_counts import generation_steps
from . import flops as F
from .condition import ConditionCache
from .decoder import DecoderTokenCache
from .encoder import EncoderCache
from .head import HeadCache
from .mechanism import CacheMechanism, CacheShape, EngineRun, HeadPass, StepPrice, TransformerPass
from .schedule_file import CacheSchedule
from .buffers import CACHE_DTYPE

Mechanism = TypeVar("Mechanism", bound=CacheMechanism)


def default_mechanisms() -> list[CacheMechanism]:
    """The engine's mechanisms, fresh: condition cache, encoder, decoder token cache, head (the order in which they
    take part in each phase of a step)."""
    return [ConditionCache(), EncoderCache(), DecoderTokenCache(), HeadCache()]


class CacheEngine(StepRunner):
    """Run MAR under ``schedule`` with ``mechanisms`` (default: :func:`default_mechanisms`). One engine can run many
    generations (``start`` restarts its mechanisms)."""

    def __init__(self, schedule: CacheSchedule, cache_dtype: Optional[torch.dtype] = None,
                 mechanisms: Optional[Sequence[CacheMechanism]] = None):
        self.schedule, self.requested_dtype = schedule, cache_dtype  # None: the precision's (see the module doc)
        self.cache_dtype = cache_dtype or CACHE_DTYPE  # of the caches (set by start for its generation)
        self.flops = F.FlopsLedger()
        self.model: Optional[MAR] = None
        self.mechanisms = list(mechanisms) if mechanisms is not None else default_mechanisms()

    def mechanism(self, kind: type[Mechanism]) -> Optional[Mechanism]:
        """The engine's first mechanism of class ``kind`` (None if it has none)."""
        return next((m for m in self.mechanisms if isinstance(m, kind)), None)

    @property
    def encoder(self) -> Optional[EncoderCache]:
        return self.mechanism(EncoderCache)

    @property
    def decoder(self) -> Optional[DecoderTokenCache]:
        return self.mechanism(DecoderTokenCache)

    @property
    def condition(self) -> Optional[ConditionCache]:
        return self.mechanism(ConditionCache)

    @property
    def head_cache(self) -> Optional[HeadCache]:
        return self.mechanism(HeadCache)

    def schedule_plans(self, settings: SamplingSettings) -> list:
        """The schedule's plan of every step under ``settings`` (with or without CFG)."""
        return [self.schedule.step_plan(s, settings.cfg != 1.0) for s in range(self.schedule.num_iter)]

    def start(self, model: MAR, settings: SamplingSettings, batch_size: int) -> None:
        sch = self.schedule
        sch.validate_for(model.config, settings.num_iter)
        self.model = model
        plans = self.plans = self.schedule_plans(settings)
        # rows kept in caches: the network rows that cached steps run (cond first)
        both = any(p.branches == 2 for p in plans if not p.refresh)
        self.cache_rows = batch_size * (2 if both else 1)
        self.flops = F.FlopsLedger()
        self.cache_dtype = self.requested_dtype or matching_cache_dtype(
            settings.precision, next(model.parameters()).dtype, CACHE_DTYPE)
        run = EngineRun(model, sch, plans, self.cache_rows, self.flops, self.cache_dtype)
        for mechanism in self.mechanisms:
            mechanism.start(run)
        self.peak_cache_bytes = {type(m).__name__: 0 for m in self.mechanisms}  # measured, after each step

    def reset(self) -> None:
        """Release every cache (done after the last step of a generation)."""
        for mechanism in self.mechanisms:
            mechanism.reset()

    def transformer(self, ctx: StepContext) -> Tensor:
        step = TransformerPass(self.plans[ctx.step])
        self.flops.begin_step()
        ctx.branches = BRANCHES[: step.plan.branches]
        for mechanism in self.mechanisms:
            mechanism.run_inputs(ctx, step)
        if step.tokens is None:
            step.tokens, step.mask, step.class_emb = ctx.network_inputs()
        for mechanism in self.mechanisms:
            mechanism.run_encoder(ctx, step)
        for mechanism in self.mechanisms:
            mechanism.run_decoder(ctx, step)
        for mechanism in self.mechanisms:
            mechanism.run_output(ctx, step)
        for mechanism in self.mechanisms:  # what the caches keep for later steps (a few tensors: cheap)
            name = type(mechanism).__name__
            self.peak_cache_bytes[name] = max(self.peak_cache_bytes[name], mechanism.held_bytes())
        return self.model.decoder_output(step.x)

    def head(self, ctx: StepContext, z: Tensor, temperature: float, generator: Optional[torch.Generator]) -> Tensor:
        head = HeadPass(self.plans[ctx.step], z, temperature, generator)
        for mechanism in self.mechanisms:
            mechanism.run_head(ctx, head)
        if head.sampled is None:  # a bug (an engine without a head mechanism), not a user error
            raise RuntimeError("no cache mechanism sampled the head")
        if ctx.step == ctx.num_iter - 1:
            self.reset()
        return head.sampled[: z.shape[0] // 2] if ctx.use_cfg else head.sampled


def estimate_generation_flops(config: MARConfig, schedule: CacheSchedule, batch_size: int = 1,
                              use_cfg: bool = True, order: str = "mar", head_steps: str = "uniform",
                              mechanisms: Optional[Sequence[CacheMechanism]] = None) -> F.FlopsLedger:
    """The FLOPs a generation of ``batch_size`` samples runs under ``schedule`` (its num_iter steps) with the
    generation ``order`` and the head's step allocation ``head_steps`` (SamplingSettings' fields), from the token
    counts alone: each step priced by the engine's ``mechanisms`` (default: :func:`default_mechanisms`), the
    objects that charge the ledger of an actual run. Equals that ledger (tests check it)."""
    allocation = head_step_allocation(head_steps)
    mechanisms = list(mechanisms) if mechanisms is not None else default_mechanisms()
    ledger = F.FlopsLedger()
    for counts in generation_steps(generation_order(order), config.seq_len, schedule.num_iter):
        ledger.begin_step()
        price = StepPrice(config, schedule, schedule.step_plan(counts.step, use_cfg), counts, batch_size, use_cfg,
                          allocation)
        for mechanism in mechanisms:
            for component, flops in mechanism.flops(price).items():
                ledger.add(component, flops)
    return ledger


def estimate_cache_bytes(config: MARConfig, schedule: CacheSchedule, batch_size: int = 1, use_cfg: bool = True,
                         cache_dtype: torch.dtype = CACHE_DTYPE,
                         mechanisms: Optional[Sequence[CacheMechanism]] = None) -> dict[str, int]:
    """The bytes each mechanism (by class name) keeps between steps at its largest, for a generation of
    ``batch_size`` samples under ``schedule``: the cache-memory model, asked of the same mechanism objects the
    engine runs (default: :func:`default_mechanisms`). An engine measures the same quantity in
    ``peak_cache_bytes``. The head cache lives within one MAR step and keeps nothing between steps."""
    mechanisms = list(mechanisms) if mechanisms is not None else default_mechanisms()
    plans = [schedule.step_plan(s, use_cfg) for s in range(schedule.num_iter)]
    both = any(p.branches == 2 for p in plans if not p.refresh)
    shape = CacheShape(config, schedule, plans, batch_size * (2 if both else 1), batch_size,
                       torch.empty((), dtype=cache_dtype).element_size())
    return {type(m).__name__: m.cache_bytes(shape) for m in mechanisms}
