"""The decoder's token cache.

On a cached step the decoder layers up to ``selection_layer`` run on all positions. There the positions are
ranked (cosine similarity of V with the previous step's V, mean over heads, least similar first; or random; or
the always-kept statuses only) and the kept ones continue alone: the later layers run the kept positions only,
attending over a positional K/V cache with the fresh rows scattered in, and the cached last-layer output fills
the other positions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..model import MAR, KVHook
from ..sampling import StepContext
from . import flops as F
from .mechanism import CacheMechanism, CacheShape, EngineRun, StepPrice, TransformerPass
from .schedule_file import CacheSchedule, StepPlan
from .attention_selection import attention_received, capturing_queries, scoring_queries
from .buffers import CACHE_DTYPE, keep_rows, scatter_rows


class DecoderTokenCache(CacheMechanism):
    """The decoder blocks, with the token cache on the steps whose plan says so. State: per-layer K/V after the
    selection layer, the last block's output, V at the selection layer (for the similarity rule) and the random
    rule's generator; ``rows`` network rows are kept, in ``dtype`` except V (in the model's dtype: the ranking,
    near-ties included, does not depend on the storage). Built without a model, it is bound by ``start``."""

    def __init__(self, model: Optional[MAR] = None, schedule: Optional[CacheSchedule] = None, rows: int = 0,
                 ledger: Optional[F.FlopsLedger] = None, dtype: torch.dtype = CACHE_DTYPE):
        self.model, self.schedule, self.rows, self.ledger, self.dtype = model, schedule, rows, ledger, dtype
        self.device = next(model.parameters()).device if model is not None else None
        self.keep: list[bool] = []  # per step: whether a later step is a cached one (start)
        self.reset()

    def start(self, run: EngineRun) -> None:
        self.model, self.schedule, self.rows, self.ledger, self.dtype = (run.model, run.schedule, run.rows,
                                                                         run.ledger, run.dtype)
        self.device = next(run.model.parameters()).device
        self.keep = run.later(lambda p: not p.refresh)
        self.reset()

    def run_decoder(self, ctx: StepContext, step: TransformerPass) -> None:
        step.x = self.run(ctx, step.plan, step.x, store=self.keep[ctx.step])

    def flops(self, price: StepPrice) -> dict[str, int]:
        """All blocks on all positions, or on a token-cache step the blocks up to the selection layer on all
        positions and the later ones on the kept positions (plus the scores of the "attention" rule)."""
        c, sch, counts, N = price.config, price.schedule, price.counts, price.rows
        total = c.buffer_size + c.seq_len
        if not price.plan.token_cache:
            return {"decoder": c.decoder_depth * F.decoder_block_flops(c, N, total, total)}
        always = counts.to_predict * ("to_predict" in sch.always_keep) + counts.new * (
            "new" in sch.always_keep) + c.buffer_size * ("buffer" in sch.always_keep)
        keep = sch.kept_count(counts.step, total, always)
        full_layers = sch.selection_layer + 1
        flops = (full_layers * F.decoder_block_flops(c, N, total, total)
                 + (c.decoder_depth - full_layers) * F.decoder_block_flops(c, N, keep, total))
        if sch.selection == "attention" and sch.selection_layer < c.decoder_depth - 1:
            flops += F.attention_score_flops(N, c.decoder_num_heads, counts.new + counts.to_predict, total,
                                             c.decoder_embed_dim // c.decoder_num_heads)
        return {"decoder": flops}

    def cache_bytes(self, shape: CacheShape) -> int:
        """When a later step is a cached one: the last block's output, K and V of the blocks after the selection
        layer, and (similarity selection) the selection layer's V, each for every position."""
        c, sch = shape.config, shape.schedule
        if not shape.later(lambda p: not p.refresh):
            return 0
        arrays = 1 + 2 * (c.decoder_depth - sch.selection_layer - 1) + (sch.selection == "similarity")
        return shape.rows * (c.buffer_size + c.seq_len) * c.decoder_embed_dim * arrays * shape.element_bytes

    def reset(self) -> None:
        if self.model is None:  # not bound yet
            self.keys, self.values, self.output, self.previous_v = [], [], None, None
            return
        depth = len(self.model.decoder_blocks)
        self.keys: list[Optional[Tensor]] = [None] * depth
        self.values: list[Optional[Tensor]] = [None] * depth
        self.output: Optional[Tensor] = None          # (rows, buffer + seq, dec) last decoder block output
        self.previous_v: Optional[Tensor] = None      # (rows, heads, buffer + seq, head_dim) at the selection layer
        self.generator = torch.Generator(device=self.device).manual_seed(self.schedule.seed)
        self._v: Optional[Tensor] = None
        self._q: dict[str, Tensor] = {}               # the "attention" rule's q and k at the selection layer

    @property
    def empty(self) -> bool:
        return self.output is None and self.previous_v is None and all(k is None for k in self.keys)

    def run(self, ctx: StepContext, plan: StepPlan, x: Tensor, store: bool) -> Tensor:
        """The decoder blocks on the decoder input x (N, buffer + seq, dec); returns the last block's output.
        With ``store`` the caches are refilled (a later step reuses them)."""
        model, c, sel = self.model, self.model.config, self.schedule.selection_layer
        N, total = x.shape[:2]
        depth = len(model.decoder_blocks)
        select = plan.token_cache and sel < depth - 1
        need_v = self.schedule.selection == "similarity" and store
        ctx.decoder_rows = None

        def hooks(layer: int) -> Optional[KVHook]:
            if layer == sel and select:
                return self._capture_v
            if layer == sel and need_v:  # kept at once: holding v would keep the layer's whole qkv alive
                return self._store_v
            return self._store_hook(layer) if layer > sel and store else None

        if not select:
            x = model.run_decoder(x, kv_hooks=hooks)
            self.ledger.add("decoder", depth * F.decoder_block_flops(c, N, total, total))
            if store:
                self.output = keep_rows(self.output, x, self.rows, dtype=self.dtype)
            return x
        if self.schedule.selection == "attention":  # MARché: the selection layer's queries score positions
            with capturing_queries(model.decoder_blocks[sel].attn, self._q):
                x = model.run_decoder(x, range(sel + 1), hooks)
        else:
            x = model.run_decoder(x, range(sel + 1), hooks)
        kept = self.select(ctx, self._v)
        if need_v:
            self.previous_v = keep_rows(self.previous_v, self._v, self.rows, dtype=self.dtype)
        self._v = None
        x = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        ctx.decoder_rows = kept
        x = model.run_decoder(x, range(sel + 1, depth), lambda layer: self._scatter_hook(layer, N, kept))
        self.ledger.add("decoder", (sel + 1) * F.decoder_block_flops(c, N, total, total)
                        + (depth - sel - 1) * F.decoder_block_flops(c, N, kept.shape[1], total))
        output = scatter_rows(self.output[:N], 1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
        return output.clone() if output.dtype == self.output.dtype else output  # never the cache itself

    def _capture_v(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._v = v
        if self.schedule.selection == "attention":
            self._q["k"] = k
        return k, v

    def _store_v(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.previous_v = keep_rows(self.previous_v, v, self.rows, dtype=self.dtype)
        return k, v

    def _store_hook(self, layer: int) -> KVHook:
        def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            self.keys[layer] = keep_rows(self.keys[layer], k, self.rows, dtype=self.dtype)
            self.values[layer] = keep_rows(self.values[layer], v, self.rows, dtype=self.dtype)
            return k, v
        return hook

    def _scatter_hook(self, layer: int, n_rows: int, kept: Tensor) -> KVHook:
        def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            index = kept[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            return (scatter_rows(self.keys[layer][:n_rows], 2, index, k),
                    scatter_rows(self.values[layer][:n_rows], 2, index, v))
        return hook

    def select(self, ctx: StepContext, v: Tensor) -> Tensor:
        """Indices (N, n_keep), sorted, of the positions recomputed after the selection layer, given V (N, heads,
        buffer + seq, head_dim) there; ``ctx`` gives the step and the statuses."""
        sch, buf = self.schedule, self.model.buffer_size
        N, _, total, _ = v.shape
        statuses = {"to_predict": ctx.to_predict, "new": ctx.new}
        always = torch.zeros(ctx.batch_size, total, dtype=torch.bool, device=v.device)
        for status in sch.always_keep:
            if status == "buffer":
                always[:, :buf] = True
            else:
                always[:, buf:] |= statuses[status]
        if N == 2 * ctx.batch_size:
            always = torch.cat([always, always])
        counts = {"to_predict": ctx.num_to_predict, "new": ctx.num_new, "buffer": buf}
        n_keep = sch.kept_count(ctx.step, total, sum(counts[status] for status in set(sch.always_keep)))
        if sch.selection == "similarity":
            previous = self.previous_v[:N].to(v.dtype)
            dot = (v * previous).sum(-1)
            norms = v.norm(dim=-1) * previous.norm(dim=-1)
            score = (dot / norms.clamp_min(1e-12)).mean(dim=1)  # (N, total): high = unchanged
        elif sch.selection == "attention":  # high attention from the new and to-predict tokens = recompute
            q, k = self._q.pop("q"), self._q.pop("k")
            both = N == 2 * ctx.batch_size
            positions = scoring_queries(ctx.doubled(ctx.new_positions) if both else ctx.new_positions,
                                        ctx.doubled(ctx.to_predict_positions) if both else ctx.to_predict_positions,
                                        self.model.buffer_size)
            score = -attention_received(q, k, positions)
            self.ledger.add("decoder", F.attention_score_flops(N, q.shape[1], positions.shape[1], total, q.shape[3]))
        elif sch.selection == "random":
            score = torch.rand(N, total, generator=self.generator, device=v.device)
        else:
            score = torch.zeros(N, total, device=v.device)
        score = score.masked_fill(always, float("-inf"))
        kept = torch.topk(score, n_keep, dim=1, largest=False).indices
        return kept.sort(dim=1).values
