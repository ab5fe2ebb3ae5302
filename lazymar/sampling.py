"""MAR's sampling loop, written as an explicit loop over steps with one seam per step.

Each step builds a :class:`StepContext` (masks, statuses, CFG scale) that observers (the redundancy recorder) read
and that a :class:`StepRunner` (plain, or the cache engine) executes. Module hooks can find the active step with
:func:`current_step`. The loop itself follows the official ``sample_tokens``.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .config import SamplingSettings
from .errors import SettingsError
from .guards import FiniteGuard
from .head_steps import FrequencyWeightedSteps, HeadSampler
from .model import MAR
from .orders import generation_order
from .precision import autocast
from .step_counts import generation_steps

__all__ = ["SamplingSettings", "StepContext", "StepRunner", "StepObserver", "generate", "observe_steps",
           "current_step", "sample_head", "step_cfg_scale"]

Phase = Literal["transformer", "head"]
BRANCHES = ("cond", "uncond")


@dataclass
class StepContext:
    """Everything about one sampling step. Masks are (B, seq_len) booleans over the B samples (not doubled).

    Statuses of token positions at step s partition them: ``known`` (decoded before s-1), ``new`` (decoded at
    s-1), ``to_predict`` (decoded at s) and ``masked`` (still unknown after s). With CFG the network batch is
    [cond; uncond] of size 2B.

    The last four fields are the seam between a step runner and the observers' module hooks: ``phase`` says
    which network is running; ``branches`` the branches of the network batch, in order; ``encoder_rows`` /
    ``decoder_rows`` the positions (indices into buffer + sequence, LongTensor (network batch, n)) of the rows a
    block call holds, set by a runner before it runs blocks on other rows than the plain model does (None: the
    plain layout, i.e. the buffer and the known positions in order for the encoder, all positions for the
    decoder).
    """

    model: MAR
    step: int
    num_iter: int
    tokens: Tensor                 # (B, L, D) tokens known before this step (zeros where unknown)
    labels: Tensor                 # (B,)
    known: Tensor
    new: Tensor
    to_predict: Tensor
    masked: Tensor
    mask_ratio: float              # fraction of positions still unknown after this step (cosine schedule)
    cfg_scale: float               # guidance scale of this step (after the cfg schedule)
    use_cfg: bool
    z: Optional[Tensor] = None     # (2B or B, L, dec) head conditioning, set after the transformer pass
    sampled: Optional[Tensor] = None  # (n_to_predict, D) tokens sampled at this step
    phase: Phase = "transformer"
    branches: tuple[str, ...] = ()    # () = the default: ("cond", "uncond") with CFG, ("cond",) without
    encoder_rows: Optional[Tensor] = None
    decoder_rows: Optional[Tensor] = None
    # The positions of the new and to-predict tokens, (B, n) sorted per row, and the token counts per sample (equal
    # for every sample): the loop knows them from the generation orders, so runners need no host round-trip
    # (nonzero, .sum()) to learn them. Computed from the masks when a context is built without them.
    new_positions: Optional[Tensor] = None
    to_predict_positions: Optional[Tensor] = None
    num_masked: Optional[int] = None
    # (B, buffer + known before this step) positions into buffer + sequence that the encoder sees, sorted per row
    visible_positions: Optional[Tensor] = None
    head_steps: Optional[FrequencyWeightedSteps] = None  # the head's steps per token (None: uniform; head_steps)

    def __post_init__(self) -> None:
        if not self.branches:
            self.branches = BRANCHES if self.use_cfg else BRANCHES[:1]
        if self.new_positions is None:
            self.new_positions = _positions(self.new)
        if self.to_predict_positions is None:
            self.to_predict_positions = _positions(self.to_predict)
        if self.num_masked is None:
            self.num_masked = int(self.masked[0].sum()) if self.masked.numel() else 0
        if self.visible_positions is None:
            self.visible_positions = self.model.visible_positions(self.unknown)

    @property
    def num_new(self) -> int:
        return self.new_positions.shape[1]

    @property
    def num_to_predict(self) -> int:
        return self.to_predict_positions.shape[1]

    @property
    def num_known(self) -> int:
        return self.known.shape[1] - self.num_new - self.num_to_predict - self.num_masked

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def unknown(self) -> Tensor:
        """Positions unknown before this step: what the network sees as masked."""
        return self.to_predict | self.masked

    def doubled(self, x: Tensor) -> Tensor:
        """x repeated for the [cond; uncond] network batch when CFG is on."""
        return torch.cat([x, x]) if self.use_cfg else x

    def network_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens, float mask with 1 = unknown, class embeddings) of the network batch."""
        model, B = self.model, self.batch_size
        emb = model.class_embedding(self.labels, B)
        if self.use_cfg:
            emb = torch.cat([emb, model.class_embedding(None, B)])
        return self.doubled(self.tokens), self.doubled(self.unknown).float(), emb

    def visible_for(self, rows: int) -> Tensor:
        """The visible positions of a network batch of ``rows`` rows (both branches, or the cond one)."""
        return self.doubled(self.visible_positions) if rows == 2 * self.batch_size else self.visible_positions


def _positions(mask: Tensor) -> Tensor:
    """The True positions of a (B, L) mask with the same count in every row, (B, n) sorted per row."""
    return mask.nonzero()[:, 1].reshape(mask.shape[0], -1)


def rows_at(x: Tensor, positions: Tensor) -> Tensor:
    """x (N, L, C) at ``positions`` (N, n): (N * n, C), in the order of boolean-mask indexing when the positions
    are sorted per row (x[mask] without the host round-trip that a boolean index costs)."""
    return x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[2])).reshape(-1, x.shape[2])


def sample_head(ctx: StepContext, z: Tensor, sample: HeadSampler) -> Tensor:
    """The head's tokens for the rows of z (the step's to-predict tokens, [cond; uncond] with CFG) under the step's
    allocation: one ``sample`` call with the model's steps, or under FTS one per group of rows (full steps, then
    reduced; an empty group is not sampled and draws no noise)."""
    allocation = ctx.head_steps
    if allocation is None:
        return sample(z, None)
    full = allocation.full_tokens(ctx.tokens, ~ctx.unknown, ctx.to_predict_positions)  # (B, n)
    B, n = full.shape
    k = allocation.full_count(n)  # full-step tokens per sample: known on the host, no read-back of ``full``
    # per sample, its full-step tokens then the others, each in position order (a stable sort of "not full"),
    # as row indices of the cond half: the order in which boolean masks would pick them
    ranked = torch.sort((~full).to(torch.uint8), dim=1, stable=True).indices
    ranked = ranked + n * torch.arange(B, device=full.device)[:, None]
    out = z.new_empty(z.shape[0], ctx.model.token_dim)
    for rows, steps in ((ranked[:, :k], None), (ranked[:, k:], allocation.reduced_steps)):
        if rows.numel():  # an empty group is not sampled and draws no noise
            rows = rows.reshape(-1)
            rows = torch.cat([rows, rows + B * n]) if ctx.use_cfg else rows  # the same tokens' uncond rows
            out[rows] = sample(z[rows], steps)
    return out


class StepRunner:
    """Does a step's network work. This one runs the plain model; the cache engine replaces it."""

    def start(self, model: MAR, settings: SamplingSettings, batch_size: int) -> None:
        """Called once before the first step of a generation."""

    def transformer(self, ctx: StepContext) -> Tensor:
        tokens, mask, class_emb = ctx.network_inputs()
        return ctx.model.forward_transformer(tokens, mask, class_emb, ctx.visible_for(len(tokens)))

    def head(self, ctx: StepContext, z: Tensor, temperature: float, generator: Optional[torch.Generator]) -> Tensor:
        """Sample the tokens of the rows of z (the to-predict positions, [cond; uncond] with CFG)."""
        cfg = ctx.cfg_scale if ctx.use_cfg else None
        sampled = sample_head(ctx, z, lambda rows, steps: ctx.model.diffloss.sample(
            rows, temperature, cfg, generator, steps=steps))
        return sampled[: z.shape[0] // 2] if ctx.use_cfg else sampled


class StepObserver:
    """Receives every step of every generation while registered with :func:`observe_steps`."""

    def on_generation_start(self, model: MAR, settings: SamplingSettings, labels: Tensor) -> None: ...
    def on_step_start(self, ctx: StepContext) -> None: ...
    def on_step_end(self, ctx: StepContext) -> None: ...
    def on_generation_end(self, model: MAR, tokens: Tensor) -> None: ...


_observers: contextvars.ContextVar[tuple[StepObserver, ...]] = contextvars.ContextVar("lazymar_observers", default=())
_current_step: contextvars.ContextVar[Optional[StepContext]] = contextvars.ContextVar("lazymar_step", default=None)


@contextlib.contextmanager
def observe_steps(observer: StepObserver) -> Iterator[StepObserver]:
    """Register ``observer`` for the generations run inside the ``with`` block."""
    token = _observers.set(_observers.get() + (observer,))
    try:
        yield observer
    finally:
        _observers.reset(token)


def current_step() -> Optional[StepContext]:
    """The step being computed (None outside sampling); for module hooks."""
    return _current_step.get()


def step_cfg_scale(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    if schedule == "linear":
        return 1 + (cfg - 1) * (seq_len - mask_len) / seq_len
    return cfg


def _as_generator(seed: Optional[int | torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device=device).manual_seed(int(seed))


@torch.no_grad()
def generate(model: MAR, labels: Sequence[int] | Tensor, settings: Optional[SamplingSettings] = None,
             seed: Optional[int | torch.Generator] = 0, runner: Optional[StepRunner] = None,
             progress: bool = False) -> Tensor:
    """Generate tokens (B, seq_len, token_dim) for class ``labels`` (-1 = unconditional).

    The seed (or generator) fixes the orders and all noise, so the same seed gives the same tokens. The network
    runs under ``settings.precision`` (lazymar.precision); the tokens are in the model's parameter dtype.
    """
    settings = settings or model.sampling_defaults
    runner = runner or StepRunner()
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() and int(labels.max()) >= model.config.class_num:
        raise SettingsError(f"label {int(labels.max())} out of range: the model has {model.config.class_num} classes")
    settings.check_for(model.seq_len, model.diffloss.gen_diffusion.num_timesteps)
    generator = _as_generator(seed, device)
    with autocast(settings.precision, device):
        return _generate(model, labels, settings, generator, runner, progress)


def _generate(model: MAR, labels: Tensor, settings: SamplingSettings, generator: Optional[torch.Generator],
              runner: StepRunner, progress: bool) -> Tensor:
    device, dtype = labels.device, next(model.parameters()).dtype
    B, L, D = labels.shape[0], model.seq_len, model.token_dim
    use_cfg = settings.cfg != 1.0
    observers = _observers.get() + (FiniteGuard(),)  # non-finite features: one clear error

    tokens = torch.zeros(B, L, D, device=device, dtype=dtype)
    order = generation_order(settings.order)
    head_steps = settings.head_steps.allocation
    orders = order.orders(B, L, generator, device)
    unknown = torch.ones(B, L, dtype=torch.bool, device=device)
    new = torch.zeros_like(unknown)
    new_positions = orders[:, :0]
    buffer_positions = torch.arange(model.buffer_size, device=device).expand(B, -1)
    runner.start(model, settings, B)
    for obs in observers:
        obs.on_generation_start(model, settings, labels)
    # the counts per sample, on the host (the loop needs no device round-trip)
    steps = generation_steps(order, L, settings.num_iter)
    for counts in tqdm(steps, total=settings.num_iter, desc="steps", disable=not progress, leave=False):
        step, mask_len, still_masked, num_unknown = counts.step, counts.mask_len, counts.masked, counts.unknown
        masked = torch.zeros_like(unknown).scatter_(1, orders[:, :still_masked], True)  # none after the last step
        to_predict_positions = orders[:, still_masked:num_unknown].sort(dim=1).values
        known_positions = orders[:, num_unknown:].sort(dim=1).values  # decoded before this step (known and new)
        visible_positions = torch.cat([buffer_positions, known_positions + model.buffer_size], dim=1)
        ctx = StepContext(
            model=model, step=step, num_iter=settings.num_iter, tokens=tokens, labels=labels,
            known=~unknown & ~new, new=new, to_predict=unknown & ~masked, masked=masked,
            mask_ratio=mask_len / L if step < settings.num_iter - 1 else 0.0,
            cfg_scale=step_cfg_scale(settings.cfg, settings.cfg_schedule, mask_len, L), use_cfg=use_cfg,
            new_positions=new_positions, to_predict_positions=to_predict_positions, num_masked=still_masked,
            visible_positions=visible_positions,
            head_steps=head_steps,
        )
        reset = _current_step.set(ctx)
        try:
            for obs in observers:
                obs.on_step_start(ctx)
            ctx.z = runner.transformer(ctx)
            ctx.phase = "head"
            z_rows = rows_at(ctx.z, ctx.doubled(to_predict_positions))  # = ctx.z[ctx.doubled(ctx.to_predict)]
            ctx.sampled = runner.head(ctx, z_rows, settings.temperature, generator)
            index = to_predict_positions.unsqueeze(-1).expand(-1, -1, D)
            tokens = tokens.scatter(1, index, ctx.sampled.reshape(B, -1, D).to(dtype))  # tokens[to_predict] = sampled
            for obs in observers:
                obs.on_step_end(ctx)
        finally:
            _current_step.reset(reset)
        new, unknown = ctx.to_predict, masked
        new_positions = to_predict_positions
    for obs in observers:
        obs.on_generation_end(model, tokens)
    return tokens
