"""The protocol of a cache mechanism: one class that holds its own state, takes part in the phases of every step
the engine runs, and prices its part of a step for the analytic FLOPs model.

The engine (:class:`~lazymar.cache.engine.CacheEngine`) composes a list of mechanisms. For each generation it calls
``start`` on every one; for each step it builds a :class:`TransformerPass` and runs the phases in order, each on
every mechanism in list order: ``run_inputs`` (the network rows: both CFG branches, or the cond one),
``run_encoder`` (sets ``x``, the decoder input), ``run_decoder`` (``x`` becomes the last block's output) and
``run_output`` (changes to that output); then ``run_head`` on a :class:`HeadPass` (sets ``sampled``). A mechanism
implements the phases it takes part in; the others do nothing. Each charges the engine's ledger with what it ran.

The analytic model (:func:`~lazymar.cache.engine.estimate_generation_flops`) asks the same objects: ``flops`` gets
a step's :class:`StepPrice` (configuration, schedule, plan and token counts; no model) and returns the FLOPs per
component that the mechanism charges the ledger on that step, so the estimate cannot drift from the ledger.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ..config import MARConfig
from ..head_steps import FrequencyWeightedSteps
from ..model import MAR
from ..sampling import StepContext
from ..step_counts import StepCounts
from .flops import FlopsLedger
from .schedule_file import CacheSchedule, StepPlan


@dataclass
class EngineRun:
    """What every mechanism is started with for one generation."""

    model: MAR
    schedule: CacheSchedule
    plans: list[StepPlan]   # one per step
    rows: int               # network rows the caches keep (the rows cached steps run, cond first)
    ledger: FlopsLedger     # the engine's ledger of this generation
    dtype: torch.dtype      # of the caches

    def later(self, use: Callable[[StepPlan], bool]) -> list[bool]:
        """Per step, whether a later step's plan satisfies ``use``: then that step's work must be kept."""
        return [any(use(p) for p in self.plans[s + 1:]) for s in range(len(self.plans))]


@dataclass
class TransformerPass:
    """One step's transformer pass as the mechanisms hand it on, phase by phase."""

    plan: StepPlan
    tokens: Optional[Tensor] = None     # inputs phase: the network rows' tokens, float mask (1 = unknown) and
    mask: Optional[Tensor] = None       # class embeddings (left None: the engine takes both branches'
    class_emb: Optional[Tensor] = None  # StepContext.network_inputs)
    x: Optional[Tensor] = None          # encoder phase: the decoder input; decoder phase on: the last block's output


@dataclass
class HeadPass:
    """One step's head phase: the rows ``z`` to sample ([cond; uncond] with CFG) and, once sampled, their tokens."""

    plan: StepPlan
    z: Tensor
    temperature: float
    generator: Optional[torch.Generator]
    sampled: Optional[Tensor] = None


@dataclass(frozen=True)
class CacheShape:
    """What the cache-memory model tells a mechanism about a generation: every step's plan, the rows the caches
    keep (the batch, or twice it when cached steps run both CFG branches) and the bytes of one cached element."""

    config: MARConfig
    schedule: CacheSchedule
    plans: list[StepPlan]
    rows: int
    batch_size: int
    element_bytes: int

    def later(self, use: Callable[[StepPlan], bool]) -> bool:
        """Whether some step after the first satisfies ``use`` (then an earlier step keeps its work)."""
        return any(use(p) for p in self.plans[1:])


@dataclass(frozen=True)
class StepPrice:
    """What the analytic FLOPs model tells a mechanism about one step of a generation of ``batch_size`` samples."""

    config: MARConfig
    schedule: CacheSchedule
    plan: StepPlan
    counts: StepCounts
    batch_size: int
    use_cfg: bool
    head_steps: Optional[FrequencyWeightedSteps]  # the head's step allocation (None: uniform)

    @property
    def rows(self) -> int:
        """Network rows of the transformer pass: the batch times the branches that run."""
        return self.batch_size * self.plan.branches


class CacheMechanism:
    """A cache mechanism of the engine. Subclasses override ``start``/``reset``/``empty`` for their state, the
    ``run_*`` phases they take part in, and ``flops`` for what those phases charge the ledger."""

    def start(self, run: EngineRun) -> None:
        """Called before the first step of each generation: bind to the model, plan what to keep, reset."""

    def reset(self) -> None:
        """Release the mechanism's state (after the last step of a generation)."""

    @property
    def empty(self) -> bool:
        """Whether the mechanism holds nothing."""
        return True

    def run_inputs(self, ctx: StepContext, step: TransformerPass) -> None:
        """Choose the network rows (``step.tokens``, ``mask``, ``class_emb``)."""

    def run_encoder(self, ctx: StepContext, step: TransformerPass) -> None:
        """Run the encoder: ``step.x`` becomes the decoder input."""

    def run_decoder(self, ctx: StepContext, step: TransformerPass) -> None:
        """Run the decoder blocks: ``step.x`` becomes the last block's output."""

    def run_output(self, ctx: StepContext, step: TransformerPass) -> None:
        """Read or change the last block's output ``step.x``."""

    def run_head(self, ctx: StepContext, head: HeadPass) -> None:
        """Sample the head's tokens (``head.sampled``)."""

    def flops(self, price: StepPrice) -> dict[str, int]:
        """The FLOPs per component (lazymar.cache.flops.COMPONENTS) this mechanism charges on the step ``price``
        describes; none by default."""
        return {}

    def cache_bytes(self, shape: CacheShape) -> int:
        """The bytes this mechanism keeps between steps at its largest, for the generation ``shape`` describes (the
        cache-memory model; :meth:`held_bytes` measures it); none by default."""
        return 0

    def held_bytes(self) -> int:
        """The bytes of the tensors the mechanism holds now (its attributes, and lists and dicts of tensors in
        them), each storage counted once; a mechanism with constant tables overrides it to count its caches."""
        return tensor_bytes(*vars(self).values())


def tensor_bytes(*values) -> int:
    """The bytes of the tensors in ``values`` (and in lists, tuples and dicts of them), each storage once."""
    seen: dict[int, int] = {}

    def visit(value) -> None:
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
    for value in values:
        visit(value)
    return sum(seen.values())
