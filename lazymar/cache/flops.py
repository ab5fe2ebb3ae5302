"""FLOPs accounting of a generation: what each step ran, per component (encoder, decoder, head).

What is counted, as ``torch.utils.flop_counter.FlopCounterMode`` counts it: matrix products only, 2*m*n*k for a
(m x k) @ (k x n) product (Linear layers: 2 * rows * fan_in * fan_out, bias adds not counted) and attention as its
two batched products, 4 * batch * heads * q_len * kv_len * head_dim. Norms, activations, softmax, the diffusion
update, gathers and scatters are not counted. One FLOP is one multiply or one add (1 MAC = 2 FLOPs).

:class:`FlopsLedger` collects what ran (the cache engine's mechanisms charge it);
:func:`lazymar.cache.engine.estimate_generation_flops` predicts it from the token counts alone (no model needed),
which is how the MAR-B/L/H totals are computed, by asking the same mechanisms. Both price every operation with the
same function below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..config import MARConfig
from ..diffusion import space_timesteps
from ..orders import generation_order
from ..step_counts import StepCounts, generation_steps
from .schedule_file import HeadCachePolicy

COMPONENTS = ("encoder", "decoder", "head")
TIME_FREQUENCIES = 256  # the sinusoidal features the head's time embedder projects


# --- one function per operation -----------------------------------------------------------------------------
# The mechanisms charge these from the shapes they run and price a step from token counts with them (engine's
# estimate_generation_flops), as schedule derivation does: a change to the model changes one of them.
def linear_flops(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """softmax(q k^T) v: two batched products."""
    return 4 * batch * heads * q_len * kv_len * head_dim


def attention_score_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """q k^T of ``q_len`` queries, computed beside a fused attention to read its weights (MARché's selection)."""
    return 2 * batch * heads * q_len * kv_len * head_dim


def block_flops(batch: int, q_len: int, kv_len: int, dim: int, heads: int, mlp_hidden: int) -> int:
    """One pre-norm ViT block run on ``q_len`` rows per sample attending over ``kv_len`` keys."""
    rows = batch * q_len
    return (linear_flops(rows, dim, 3 * dim) + attention_flops(batch, heads, q_len, kv_len, dim // heads)
            + linear_flops(rows, dim, dim) + linear_flops(rows, dim, mlp_hidden) + linear_flops(rows, mlp_hidden, dim))


def encoder_block_flops(config: MARConfig, batch: int, q_len: int, kv_len: int) -> int:
    c = config
    return block_flops(batch, q_len, kv_len, c.encoder_embed_dim, c.encoder_num_heads,
                       int(c.encoder_embed_dim * c.mlp_ratio))


def decoder_block_flops(config: MARConfig, batch: int, q_len: int, kv_len: int) -> int:
    c = config
    return block_flops(batch, q_len, kv_len, c.decoder_embed_dim, c.decoder_num_heads,
                       int(c.decoder_embed_dim * c.mlp_ratio))


def token_embed_flops(config: MARConfig, rows: int) -> int:
    """z_proj of ``rows`` tokens (the encoder's input projection)."""
    return linear_flops(rows, config.token_dim, config.encoder_embed_dim)


def decoder_embed_flops(config: MARConfig, rows: int) -> int:
    """decoder_embed of ``rows`` encoder outputs."""
    return linear_flops(rows, config.encoder_embed_dim, config.decoder_embed_dim)


# the head's denoiser (SimpleMLPAdaLN), part by part
def head_input_flops(config: MARConfig, rows: int) -> int:
    return linear_flops(rows, config.token_dim, config.diffloss_w)


def head_time_flops(config: MARConfig, rows: int) -> int:
    w = config.diffloss_w
    return linear_flops(rows, TIME_FREQUENCIES, w) + linear_flops(rows, w, w)


def head_cond_flops(config: MARConfig, rows: int) -> int:
    return linear_flops(rows, config.decoder_embed_dim, config.diffloss_w)


def head_res_block_flops(config: MARConfig, rows: int, mlp: bool = True) -> int:
    """A res-block's modulation, and its MLP unless a cached MLP output stands in for it."""
    w = config.diffloss_w
    return linear_flops(rows, w, 3 * w) + (2 * linear_flops(rows, w, w) if mlp else 0)


def head_final_flops(config: MARConfig, rows: int) -> int:
    w = config.diffloss_w
    return linear_flops(rows, w, 2 * w) + linear_flops(rows, w, 2 * config.token_dim)


def head_net_flops(config: MARConfig, rows: int, skipped_blocks: int = 0, mlp_skipped_blocks: int = 0,
                   time_rows: Optional[int] = None, cond_rows: Optional[int] = None) -> int:
    """One call of the head's denoiser (SimpleMLPAdaLN) on ``rows`` rows; ``skipped_blocks`` res-blocks not run at
    all (cached residual), ``mlp_skipped_blocks`` run with fresh modulation but a cached MLP output; the time and
    cond embeddings on ``time_rows`` / ``cond_rows`` rows (default: all rows; fewer when hoisted)."""
    run = config.diffloss_d - skipped_blocks
    return (head_input_flops(config, rows)
            + head_time_flops(config, rows if time_rows is None else time_rows)
            + head_cond_flops(config, rows if cond_rows is None else cond_rows)
            + (run - mlp_skipped_blocks) * head_res_block_flops(config, rows)
            + mlp_skipped_blocks * head_res_block_flops(config, rows, mlp=False)
            + head_final_flops(config, rows))


def head_sampling_flops(config: MARConfig, tokens: int, use_cfg: bool = True,
                        policy: Optional[HeadCachePolicy] = None, shared: bool = True,
                        head_steps: Optional[int] = None) -> int:
    """The head's FLOPs at one MAR step decoding ``tokens`` tokens (all its reverse steps: the model's
    ``num_sampling_steps``, or ``head_steps``), uncached or under the head cache ``policy``; none when there is
    nothing to decode. ``shared=False`` leaves out what a hoisting policy computes once for all the step's rows
    (cond embedding once per MAR step, the time embedding once per head step): the per-token part, as a
    derivation prices policies."""
    if tokens == 0:
        return 0
    c = config
    steps = head_steps if head_steps is not None else len(_respaced_steps(config.num_sampling_steps))
    rows = 2 * tokens if use_cfg else tokens
    if policy is None:
        return steps * head_net_flops(c, rows)
    hoist = policy.hoist_invariants
    cached_rows = tokens if (use_cfg and policy.cfg_cache) else rows
    embed_rows = {"time_rows": int(shared), "cond_rows": 0} if hoist else {}
    total = head_cond_flops(c, rows) if (hoist and shared) else 0  # cond_embed once per MAR step
    skipped = len(policy.reuse_blocks)
    for i in reversed(range(steps)):
        if policy.full_step(i, steps):
            total += head_net_flops(c, rows, **embed_rows)
        else:
            mlp_skipped = 0 if policy.mlp_fresh(i, steps) else c.diffloss_d - skipped
            total += head_net_flops(c, cached_rows, skipped, mlp_skipped, **embed_rows)
    return total


# --- the ledger --------------------------------------------------------------------------------------------
@dataclass
class FlopsLedger:
    """FLOPs per step and component; ``add`` charges the step opened last by ``begin_step``."""

    steps: list[dict[str, int]] = field(default_factory=list)

    def begin_step(self) -> None:
        self.steps.append({c: 0 for c in COMPONENTS})

    def add(self, component: str, flops: int) -> None:
        if component not in COMPONENTS:
            raise ValueError(f"unknown FLOPs component {component!r}; known: {', '.join(COMPONENTS)}")
        if not self.steps:
            self.begin_step()
        self.steps[-1][component] += int(flops)

    def totals(self) -> dict[str, int]:
        out = {c: sum(s[c] for s in self.steps) for c in COMPONENTS}
        out["total"] = sum(out[c] for c in COMPONENTS)
        return out

    @property
    def total(self) -> int:
        return self.totals()["total"]

    def merge(self, other: "FlopsLedger") -> "FlopsLedger":
        """Step-wise sum of two ledgers (e.g. two batches of the same schedule)."""
        n = max(len(self.steps), len(other.steps))
        pad = [{c: 0 for c in COMPONENTS}]
        a, b = self.steps + pad * (n - len(self.steps)), other.steps + pad * (n - len(other.steps))
        return FlopsLedger([{c: x[c] + y[c] for c in COMPONENTS} for x, y in zip(a, b)])

    def to_dict(self) -> dict:
        return {"totals": self.totals(), "per_step": [dict(s) for s in self.steps]}


# --- prediction from token counts --------------------------------------------------------------------------
def step_counts(seq_len: int, num_iter: int, order: str = "mar") -> list[StepCounts]:
    """The token counts of every step of MAR's cosine mask schedule (or of another generation order): the
    sampling loop's own bookkeeping (lazymar.step_counts)."""
    return list(generation_steps(generation_order(order), seq_len, num_iter))


def floor_flops(config: MARConfig, batch_size: int = 1, use_cfg: bool = True) -> dict[str, int]:
    """A floor for the analysis: every position through the transformer once over the whole generation (as a
    causal KV cache would allow: the buffer and each token once through the encoder, each of the buffer + seq
    positions once through the decoder, attending over all positions) plus the head once per token (all its head
    steps), cond and uncond."""
    c = config
    N = batch_size * (2 if use_cfg else 1)
    total = c.buffer_size + c.seq_len
    enc = token_embed_flops(c, N * c.seq_len) + c.encoder_depth * encoder_block_flops(c, N, total, total)
    dec = decoder_embed_flops(c, N * total) + c.decoder_depth * decoder_block_flops(c, N, total, total)
    head = head_sampling_flops(c, batch_size * c.seq_len, use_cfg)
    return {"encoder": enc, "decoder": dec, "head": head, "total": enc + dec + head}


def _respaced_steps(section_counts: str) -> list[int]:
    return space_timesteps(1000, str(section_counts))
