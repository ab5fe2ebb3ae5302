"""The encoder's incremental K/V cache.

On a cached step only the buffer and the tokens decoded at the previous step run through the encoder ("new-tokens":
only those tokens; the buffer's K/V and outputs stay as cached too). A per-layer cache holds the buffer's K/V and
then the known tokens' K/V in the order they became known (attention does not depend on the order of the keys);
the rows that run write their fresh K/V into it (the new tokens appended) and attend over it. Older tokens' K/V
and encoder outputs stay as cached. The encoder outputs are kept as decoder embeddings of all positions (mask
tokens where unknown), so a cached step scatters its fresh rows in and hands the decoder its full input.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..model import MAR, KVHook
from ..sampling import StepContext
from . import flops as F
from .mechanism import CacheMechanism, CacheShape, EngineRun, StepPrice, TransformerPass
from .schedule_file import StepPlan
from .buffers import CACHE_DTYPE, keep_rows, scatter_rows, write_slices


class EncoderCache(CacheMechanism):
    """The encoder, full or incremental as each step's plan says. State: per-layer K/V of the buffer and the known
    tokens, the number of known tokens they hold, and the decoder embeddings of the last encoder outputs; ``rows``
    network rows are kept. Built without a model, it is bound by ``start``."""

    def __init__(self, model: Optional[MAR] = None, rows: int = 0, ledger: Optional[F.FlopsLedger] = None,
                 dtype: torch.dtype = CACHE_DTYPE):
        self.model, self.rows, self.ledger, self.dtype = model, rows, ledger, dtype
        self.keep: list[bool] = []  # per step: whether a later step runs incrementally (start)
        self.reset()

    def start(self, run: EngineRun) -> None:
        self.model, self.rows, self.ledger, self.dtype = run.model, run.rows, run.ledger, run.dtype
        self.keep = run.later(lambda p: p.incremental_encoder)
        self.reset()

    def run_encoder(self, ctx: StepContext, step: TransformerPass) -> None:
        if step.plan.incremental_encoder:
            step.x = self.incremental(ctx, step.plan, step.tokens, step.class_emb)
        else:
            step.x = self.full(ctx, step.tokens, step.mask, step.class_emb, store=self.keep[ctx.step])

    def flops(self, price: StepPrice) -> dict[str, int]:
        """The encoder on the rows that run (all visible positions, or the buffer and the new tokens against the
        cached K/V) and their decoder embedding."""
        c, counts, plan, N = price.config, price.counts, price.plan, price.rows
        visible = c.buffer_size + counts.known + counts.new
        if plan.incremental_encoder:
            embedded, run = counts.new, c.buffer_size * plan.encoder_buffer + counts.new
        else:
            embedded, run = c.seq_len, visible
        blocks = c.encoder_depth * F.encoder_block_flops(c, N, run, visible)
        return {"encoder": F.token_embed_flops(c, N * embedded) + blocks, "decoder": F.decoder_embed_flops(c, N * run)}

    def cache_bytes(self, shape: CacheShape) -> int:
        """K and V of every encoder block and the decoder embeddings, for every position (buffer + tokens), when a
        later step runs the encoder incrementally."""
        c = shape.config
        if not shape.later(lambda p: p.incremental_encoder):
            return 0
        positions = c.buffer_size + c.seq_len
        return shape.rows * positions * (2 * c.encoder_depth * c.encoder_embed_dim + c.decoder_embed_dim) \
            * shape.element_bytes

    def reset(self) -> None:
        depth = len(self.model.encoder_blocks) if self.model is not None else 0
        self.keys: list[Optional[Tensor]] = [None] * depth
        self.values: list[Optional[Tensor]] = [None] * depth
        self.length = 0                           # known tokens held by the K/V caches
        self.embedded: Optional[Tensor] = None    # (rows, buffer + seq, dec) decoder embeddings, no positions

    @property
    def empty(self) -> bool:
        return self.embedded is None and all(k is None for k in self.keys)

    def full(self, ctx: StepContext, tokens: Tensor, mask: Tensor, class_emb: Tensor, store: bool) -> Tensor:
        """The model's encoder on the buffer and all known tokens (bit for bit); with ``store`` it fills the
        caches for later incremental steps. Returns the decoder input of all positions."""
        model, c = self.model, self.model.config
        ctx.encoder_rows = None
        visible = ctx.visible_for(tokens.shape[0])
        x = model.visible_rows(model.embed_encoder_input(tokens, class_emb), mask, visible)
        N, n = x.shape[:2]
        x = model.run_encoder(x, self._store_hook if store else None)
        self.length = n - model.buffer_size
        self.ledger.add("encoder", F.token_embed_flops(c, N * model.seq_len)
                        + len(model.encoder_blocks) * F.encoder_block_flops(c, N, n, n))
        embedded = model.decoder_embeddings(x, mask, visible)
        self.ledger.add("decoder", F.decoder_embed_flops(c, N * n))
        if store:
            self.embedded = keep_rows(self.embedded, embedded, self.rows, dtype=self.dtype)
        return model.with_decoder_positions(embedded)

    def _store_hook(self, layer: int) -> KVHook:
        """Keep the K/V of the buffer and the known tokens (a full pass: in position order)."""
        def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            shape = (k.shape[1], self.model.buffer_size + self.model.seq_len, k.shape[3])
            self.keys[layer] = keep_rows(self.keys[layer], k, self.rows, shape, self.dtype)
            self.values[layer] = keep_rows(self.values[layer], v, self.rows, shape, self.dtype)
            return k, v
        return hook

    def incremental(self, ctx: StepContext, plan: StepPlan, tokens: Tensor, class_emb: Tensor) -> Tensor:
        """Only the tokens decoded at the previous step (and the buffer, if the plan says so) run; they attend over
        their fresh K/V and the cached K/V of the other visible positions. Returns the decoder input."""
        model, c = self.model, self.model.config
        N, buf = tokens.shape[0], model.buffer_size
        if self.length != ctx.num_known:
            raise RuntimeError("encoder cache out of step with the known tokens")  # a bug, not a user error
        new = ctx.doubled(ctx.new_positions) if N == 2 * ctx.batch_size else ctx.new_positions
        n_buf, n_new = (buf if plan.encoder_buffer else 0), ctx.num_new
        rows = torch.cat([torch.arange(n_buf, device=tokens.device).expand(N, n_buf), new + buf], dim=1)
        ctx.encoder_rows = rows
        start, end = buf + self.length, buf + self.length + n_new  # cache slots of the new tokens
        x = model.embed_encoder_input(tokens, class_emb, rows, n_buf)
        x = model.run_encoder(x, lambda layer: self._append_hook(layer, N, n_buf, start, end))
        self.length += n_new
        self.ledger.add("encoder", F.token_embed_flops(c, N * n_new)
                        + len(model.encoder_blocks) * F.encoder_block_flops(c, N, n_buf + n_new, end))
        y = model.decoder_embed(x)
        self.ledger.add("decoder", F.decoder_embed_flops(c, N * (n_buf + n_new)))
        # the other positions hold the embeddings of earlier steps, or mask tokens where still unknown
        embedded = scatter_rows(self.embedded[:N], 1, rows.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)
        return model.with_decoder_positions(embedded)

    def _append_hook(self, layer: int, n_rows: int, n_buf: int, start: int, end: int) -> KVHook:
        """Write the fresh K/V (buffer rows, if they ran, then the new tokens at start:end); attend over the cache
        up to ``end``."""
        def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            slots = [(slice(0, n_buf), slice(0, n_buf)), (slice(start, end), slice(n_buf, None))]
            return (write_slices(self.keys[layer][:n_rows], k, slots, end),
                    write_slices(self.values[layer][:n_rows], v, slots, end))
        return hook
