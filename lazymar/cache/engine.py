"""The cache engine: a StepRunner that executes a CacheSchedule inside MAR's sampling loop.

It drives the model's own modules (blocks, norms, embeddings, the head's layers); the model stays a plain module.
Reuse enters through the attention's ``kv_hook``: a block run on a subset of rows attends over the fresh K/V of
those rows written into a cache that holds the K/V of the other positions from earlier steps.

Per step (see :class:`~lazymar.cache.schedule.CacheSchedule`):

- refresh steps run exactly the model's computation (bit for bit) and, when later steps need them, fill caches;
- encoder, incremental: only the buffer and the tokens decoded at the previous step run ("new-tokens": only those
  tokens; the buffer stays as cached too); a per-layer cache holds the buffer's K/V and then the known tokens' K/V
  (in the order they became known; attention does not depend on the order of the keys); the rows that run write
  their fresh K/V into it (the new tokens appended) and attend over it; older tokens' K/V and encoder outputs stay
  as cached;
- decoder token cache: layers up to ``selection_layer`` run on all positions; there the positions are ranked
  (cosine similarity of V with the previous step's V, mean over heads, least similar first; or random; or the
  always-kept statuses only); later layers run the kept positions only, attending over a positional K/V cache
  (fresh rows scattered in) and the cached last-layer output fills the other positions;
- condition cache: only the cond half runs; uncond = cond + (uncond - cond) at the last decoder block output,
  cached at the last step that ran both;
- head cache: the head's reverse loop through ``DiffLoss.sample(denoise=...)`` with the HeadCachePolicy.

Caches hold only the rows that cached steps run: the cond half when every cached step uses the condition cache.
The engine keeps a :class:`~lazymar.cache.flops.FlopsLedger` of what it ran (``engine.flops``), charged from the
tensor shapes at each call. For the recorder: before each block call on a subset of rows it sets
``ctx.extras["encoder_rows"]`` / ``ctx.extras["decoder_rows"]`` (indices into buffer + seq, per network row;
None = all rows of the default layout) and ``ctx.extras["branches"]`` for the step.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..model import MAR
from ..sampling import SamplingSettings, StepContext, StepRunner
from . import flops as F
from .schedule import CacheSchedule, StepPlan


class CacheEngine(StepRunner):
    """Run MAR under ``schedule``. One engine can run many generations (``start`` resets it)."""

    def __init__(self, schedule: CacheSchedule):
        self.schedule = schedule
        self.flops = F.FlopsLedger()

    # --- generation state ------------------------------------------------------------------------------------
    def start(self, model: MAR, settings: SamplingSettings, batch_size: int) -> None:
        sch = self.schedule
        sch.validate_for(model.config, settings.num_iter)
        self.model, self.batch_size = model, batch_size
        self.use_cfg = settings.cfg != 1.0
        self.plans = [sch.step_plan(s, self.use_cfg) for s in range(sch.num_iter)]
        # rows kept in caches: the network rows that cached steps run (cond first)
        both = any(p.branches == 2 for p in self.plans if not p.refresh)
        self.cache_rows = batch_size * (2 if both else 1)
        # whether a step's work must be written to the token caches: some later step is a cached one
        self.later_cached = [any(not p.refresh for p in self.plans[s + 1:]) for s in range(sch.num_iter)]
        self.later_condition = [any(p.condition_cache for p in self.plans[s + 1:]) for s in range(sch.num_iter)]
        self.flops = F.FlopsLedger()
        self.enc_k: list[Optional[Tensor]] = [None] * model.config.encoder_depth
        self.enc_v: list[Optional[Tensor]] = [None] * model.config.encoder_depth
        self.enc_len = 0                      # known tokens held by the encoder K/V caches
        self.dec_in: Optional[Tensor] = None  # (R, total, dec) decoder inputs (no positions) of visible positions
        self.dec_k: list[Optional[Tensor]] = [None] * model.config.decoder_depth
        self.dec_v: list[Optional[Tensor]] = [None] * model.config.decoder_depth
        self.dec_out: Optional[Tensor] = None  # (R, total, dec) last decoder block output
        self.v_prev: Optional[Tensor] = None   # (R, heads, total, head_dim) V at the selection layer
        self.cond_diff: Optional[Tensor] = None  # (B, total, dec) uncond - cond at the last decoder block
        device = next(model.parameters()).device
        self.select_generator = torch.Generator(device=device).manual_seed(sch.seed)
        self._v_now: Optional[Tensor] = None

    def _release(self) -> None:
        self.enc_k = [None] * len(self.enc_k)
        self.enc_v = [None] * len(self.enc_v)
        self.dec_k = [None] * len(self.dec_k)
        self.dec_v = [None] * len(self.dec_v)
        self.dec_in = self.dec_out = self.v_prev = self.cond_diff = None

    # --- transformer -----------------------------------------------------------------------------------------
    def transformer(self, ctx: StepContext) -> Tensor:
        plan = self.plans[ctx.step]
        self.flops.begin_step()
        ctx.extras["cache_plan"] = plan
        ctx.extras["branches"] = ("cond", "uncond") if plan.branches == 2 else ("cond",)
        model, B = self.model, ctx.batch_size
        if plan.branches == 2 or not ctx.use_cfg:
            tokens, mask, class_emb = ctx.network_inputs()
        else:
            tokens, mask, class_emb = ctx.tokens, ctx.unknown.float(), model.class_embedding(ctx.labels, B)
        store = self.later_cached[ctx.step]
        if plan.incremental_encoder:
            x = self._encode_incremental(ctx, plan, tokens, class_emb)
        else:
            x = self._encode_full(ctx, tokens, mask, class_emb, store)
        x = self._decode(ctx, plan, x, store)
        if ctx.use_cfg:
            if plan.branches == 2:
                if self.later_condition[ctx.step]:
                    self.cond_diff = x[B:] - x[:B]
            else:
                x = torch.cat([x, x + self.cond_diff])
        return model.decoder_output(x)

    def _store_rows(self, n_rows: int) -> int:
        return min(n_rows, self.cache_rows)

    def _cache_like(self, shape_tail: tuple[int, ...], like: Tensor) -> Tensor:
        return like.new_empty((self.cache_rows, *shape_tail))

    # encoder ---------------------------------------------------------------------------------------------
    def _encode_full(self, ctx: StepContext, tokens: Tensor, mask: Tensor, class_emb: Tensor, store: bool) -> Tensor:
        """The model's encoder on the buffer and all known tokens (bit for bit), filling the K/V caches; returns
        the decoder input (mask tokens at unknown positions, plus positions) of all positions."""
        model, cfg = self.model, self.model.config
        incremental_later = store and self.schedule.encoder != "full"
        x = model.embed_encoder_input(tokens, class_emb)
        N, total, C = x.shape
        self.flops.add("encoder", F.linear_flops(N * cfg.seq_len, cfg.token_dim, C))
        visible = (1 - model.with_buffer(mask)).nonzero(as_tuple=True)
        x = x[visible].reshape(N, -1, C)
        n_vis = x.shape[1]
        ctx.extras["encoder_rows"] = None
        for layer, block in enumerate(model.encoder_blocks):
            x = block(x, self._encoder_store_hook(layer, N) if incremental_later else None)
            self._charge_block("encoder", block, N, n_vis, n_vis)
        self.enc_len = n_vis - model.buffer_size
        x = model.encoder_norm(x)
        # as model.scatter_decoder_input, keeping the embedded inputs for later incremental steps
        y = model.decoder_embed(x)
        self.flops.add("decoder", F.linear_flops(N * n_vis, C, y.shape[-1]))
        full = model.mask_token.expand(N, total, -1).to(y.dtype).clone()
        full[visible] = y.reshape(-1, y.shape[-1])
        if incremental_later:
            if self.dec_in is None:
                self.dec_in = self._cache_like(full.shape[1:], full)
            n = self._store_rows(N)
            self.dec_in[:n].copy_(full[:n])
        return full + model.decoder_pos_embed_learned

    def _encoder_store_hook(self, layer: int, n_rows: int) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Keep the K/V of the buffer and the known tokens (all rows of a full encoder pass)."""
        def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            if self.enc_k[layer] is None:
                shape = (k.shape[1], self.model.buffer_size + self.model.seq_len, k.shape[3])
                self.enc_k[layer], self.enc_v[layer] = self._cache_like(shape, k), self._cache_like(shape, v)
            n, length = self._store_rows(n_rows), k.shape[2]
            self.enc_k[layer][:n, :, :length].copy_(k[:n])
            self.enc_v[layer][:n, :, :length].copy_(v[:n])
            return k, v
        return hook

    def _encode_incremental(self, ctx: StepContext, plan: StepPlan, tokens: Tensor, class_emb: Tensor) -> Tensor:
        """Only the tokens decoded at the previous step (and the buffer, if the plan says so) run; they attend over
        their fresh K/V and the cached K/V of the other visible positions."""
        model, cfg = self.model, self.model.config
        N, buf, D = tokens.shape[0], model.buffer_size, cfg.token_dim
        new = ctx.doubled(ctx.new) if N == 2 * ctx.batch_size else ctx.new
        new_pos = new.nonzero(as_tuple=True)[1].reshape(N, -1)  # (N, n_new), sorted per row
        n_new = new_pos.shape[1]
        if self.enc_len != int(ctx.known[0].sum()):
            raise RuntimeError("encoder cache out of step with the known tokens")  # a bug, not a user error
        z = model.z_proj(tokens.gather(1, new_pos.unsqueeze(-1).expand(-1, -1, D)))
        C = z.shape[-1]
        self.flops.add("encoder", F.linear_flops(N * n_new, D, C))
        n_buf = buf if plan.encoder_buffer else 0
        rows = torch.cat([torch.arange(n_buf, device=z.device).expand(N, n_buf), new_pos + buf], dim=1)
        x = torch.cat([class_emb.unsqueeze(1).expand(N, n_buf, C), z], dim=1)
        pos = model.encoder_pos_embed_learned[0][rows]
        x = model.z_proj_ln(x + pos)
        start, length = buf + self.enc_len, buf + self.enc_len + n_new  # cache slots of the new tokens
        ctx.extras["encoder_rows"] = rows
        for layer, block in enumerate(model.encoder_blocks):
            x = block(x, self._encoder_append_hook(layer, N, n_buf, start, length))
            self._charge_block("encoder", block, N, n_buf + n_new, length)
        self.enc_len += n_new
        x = model.encoder_norm(x)
        y = model.decoder_embed(x)
        self.flops.add("decoder", F.linear_flops(N * (n_buf + n_new), C, y.shape[-1]))
        dec_in = self.dec_in[:N]
        dec_in.scatter_(1, rows.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)
        visible = ~model.with_buffer(ctx.unknown)  # buffer and known positions
        visible = torch.cat([visible, visible]) if N == 2 * ctx.batch_size else visible
        full = torch.where(visible.unsqueeze(-1), dec_in, model.mask_token.to(y.dtype))
        return full + model.decoder_pos_embed_learned

    def _encoder_append_hook(self, layer: int, n_rows: int, n_buf: int, start: int, length: int):
        """Write the fresh K/V (buffer rows, if they ran, then the new tokens at start:length); attend over the
        cache up to ``length``."""
        def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            kc, vc = self.enc_k[layer][:n_rows], self.enc_v[layer][:n_rows]
            kc[:, :, :n_buf], vc[:, :, :n_buf] = k[:, :, :n_buf], v[:, :, :n_buf]
            kc[:, :, start:length], vc[:, :, start:length] = k[:, :, n_buf:], v[:, :, n_buf:]
            return kc[:, :, :length], vc[:, :, :length]
        return hook

    # decoder ---------------------------------------------------------------------------------------------
    def _decode(self, ctx: StepContext, plan: StepPlan, x: Tensor, store: bool) -> Tensor:
        """Decoder blocks; returns the last block's output (N, total, dec)."""
        model, sch = self.model, self.schedule
        N, total, _ = x.shape
        depth, sel = len(model.decoder_blocks), sch.selection_layer
        select = plan.token_cache and sel < depth - 1
        need_v = sch.selection == "similarity" and store
        kept: Optional[Tensor] = None
        ctx.extras["decoder_rows"] = None
        for layer, block in enumerate(model.decoder_blocks):
            if kept is None:
                hook = None
                if layer == sel and (need_v or select):
                    hook = self._capture_v_hook()
                elif layer > sel and store:
                    hook = self._decoder_store_hook(layer, N)
                x = block(x, hook)
                self._charge_block("decoder", block, N, total, total)
                if layer == sel and select:
                    kept = self._select(ctx, plan, self._v_now)
                    x = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                    ctx.extras["decoder_rows"] = kept
                if layer == sel and need_v:
                    self._store_v(self._v_now)
                self._v_now = None
            else:
                x = block(x, self._decoder_scatter_hook(layer, N, kept))
                self._charge_block("decoder", block, N, kept.shape[1], total)
        if kept is not None:
            out = self.dec_out[:N]
            out.scatter_(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
            return out.clone()
        if store:
            if self.dec_out is None:
                self.dec_out = self._cache_like(x.shape[1:], x)
            n = self._store_rows(N)
            self.dec_out[:n].copy_(x[:n])
        return x

    def _capture_v_hook(self):
        def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            self._v_now = v
            return k, v
        return hook

    def _store_v(self, v: Tensor) -> None:
        if self.v_prev is None:
            self.v_prev = self._cache_like(v.shape[1:], v)
        n = self._store_rows(v.shape[0])
        self.v_prev[:n].copy_(v[:n])

    def _decoder_store_hook(self, layer: int, n_rows: int):
        def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            if self.dec_k[layer] is None:
                self.dec_k[layer] = self._cache_like(k.shape[1:], k)
                self.dec_v[layer] = self._cache_like(v.shape[1:], v)
            n = self._store_rows(n_rows)
            self.dec_k[layer][:n].copy_(k[:n])
            self.dec_v[layer][:n].copy_(v[:n])
            return k, v
        return hook

    def _decoder_scatter_hook(self, layer: int, n_rows: int, kept: Tensor):
        def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            kc, vc = self.dec_k[layer][:n_rows], self.dec_v[layer][:n_rows]
            index = kept[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            kc.scatter_(2, index, k)
            vc.scatter_(2, index, v)
            return kc, vc
        return hook

    def _select(self, ctx: StepContext, plan: StepPlan, v_now: Tensor) -> Tensor:
        """Indices (N, n_keep), sorted, of the positions recomputed after the selection layer."""
        sch, model = self.schedule, self.model
        N, _, total, _ = v_now.shape
        statuses = {"to_predict": ctx.to_predict, "new": ctx.new}
        always = torch.zeros(ctx.batch_size, total, dtype=torch.bool, device=v_now.device)
        for status in sch.always_keep:
            if status == "buffer":
                always[:, : model.buffer_size] = True
            else:
                always[:, model.buffer_size:] |= statuses[status]
        if N == 2 * ctx.batch_size:
            always = torch.cat([always, always])
        n_keep = sch.kept_count(ctx.step, total, int(always[0].sum()))
        if sch.selection == "similarity":
            prev = self.v_prev[:N]
            dot = (v_now * prev).sum(-1)
            norms = v_now.norm(dim=-1) * prev.norm(dim=-1)
            score = (dot / norms.clamp_min(1e-12)).mean(dim=1)  # (N, total): high = unchanged
        elif sch.selection == "random":
            score = torch.rand(N, total, generator=self.select_generator, device=v_now.device)
        else:
            score = torch.zeros(N, total, device=v_now.device)
        score = score.masked_fill(always, float("-inf"))
        kept = torch.topk(score, n_keep, dim=1, largest=False).indices
        return kept.sort(dim=1).values

    def _charge_block(self, component: str, block, batch: int, q_len: int, kv_len: int) -> None:
        dim = block.attn.qkv.in_features
        self.flops.add(component, F.block_flops(batch, q_len, kv_len, dim, block.attn.num_heads,
                                                block.mlp.fc1.out_features))

    # --- head ------------------------------------------------------------------------------------------------
    def head(self, ctx: StepContext, z: Tensor, temperature: float, generator: Optional[torch.Generator]) -> Tensor:
        plan = self.plans[ctx.step]
        diffloss = self.model.diffloss
        cfg = ctx.cfg_scale if ctx.use_cfg else None
        if plan.head_cache:
            with CachedHeadDenoiser(self, ctx, z) as denoise:
                sampled = diffloss.sample(z, temperature, cfg, generator, denoise=denoise)
        else:
            plain = diffloss.denoiser(cfg)

            def denoise(x: Tensor, i: Tensor, zz: Tensor) -> Tensor:
                self.flops.add("head", F.head_net_flops(self.model.config, x.shape[0]))
                return plain(x, i, zz)
            sampled = diffloss.sample(z, temperature, cfg, generator, denoise=denoise)
        if ctx.step == ctx.num_iter - 1:
            self._release()
        return sampled[: z.shape[0] // 2] if ctx.use_cfg else sampled


class CachedHeadDenoiser:
    """The head's network call for one MAR step under the schedule's HeadCachePolicy (``DiffLoss.sample``'s
    ``denoise`` seam): full steps run both CFG halves and refill the caches; cached steps reuse them.

    Res-blocks that run in full are called as modules (their forward hooks fire); a hook on each block's MLP,
    held while the object is used as a context manager, captures the MLP output for reuse."""

    def __init__(self, engine: CacheEngine, ctx: StepContext, z: Tensor):
        self.engine, self.ctx = engine, ctx
        self.policy = engine.schedule.head
        self.net = engine.model.diffloss.net
        self.config = engine.model.config
        self.num_steps = engine.model.diffloss.gen_diffusion.num_timesteps
        self.timestep_map = engine.model.diffloss.gen_diffusion.timestep_map.to(z.device)
        self.use_cfg = ctx.use_cfg
        self.n = z.shape[0] // 2 if ctx.use_cfg else z.shape[0]
        # rows that cached steps run: the cond half under the CFG cache
        self.cached_rows = self.n if (ctx.use_cfg and self.policy.cfg_cache) else z.shape[0]
        self.cond = None
        if self.policy.hoist_invariants:
            self.cond = self.net.cond_embed(z)
            self._charge(F.linear_flops(z.shape[0], z.shape[1], self.cond.shape[1]))
        self.eps_diff: Optional[Tensor] = None  # cond - uncond eps of the last full step
        self.deltas: dict[int, Tensor] = {}     # block -> cached residual update (gate * mlp)
        self.mlps: dict[int, Tensor] = {}       # block -> cached MLP output
        self._mlp_out: dict[int, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> "CachedHeadDenoiser":
        if self.policy.reuse_mlp:
            for b, block in enumerate(self.net.res_blocks):
                if b not in self.policy.reuse_blocks:
                    self._handles.append(block.mlp.register_forward_hook(self._capture(b)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _capture(self, b: int):
        def hook(module, inputs, output):
            self._mlp_out[b] = output
        return hook

    def _charge(self, flops: int) -> None:
        self.engine.flops.add("head", flops)

    def __call__(self, x: Tensor, i: Tensor, z: Tensor) -> Tensor:
        step = int(i[0])
        full = self.policy.full_step(step, self.num_steps)
        n, D = self.n, self.net.in_channels
        if full or not (self.use_cfg and self.policy.cfg_cache):
            rows = 2 * n if self.use_cfg else n
            x_in = torch.cat([x[:n], x[:n]]) if self.use_cfg else x
        else:
            rows, x_in = n, x[:n]
        out = self._run(x_in, i[:rows], z[:rows], full, self.policy.mlp_fresh(step, self.num_steps))
        if not self.use_cfg:
            return out
        eps, rest = out[:, :D], out[:, D:]
        s = self.ctx.cfg_scale
        if rows == 2 * n:
            cond_eps, uncond_eps = eps.chunk(2)
            if full and self.policy.cfg_cache:
                self.eps_diff = cond_eps - uncond_eps
        else:  # CFG cache: only the cond half ran
            cond_eps = eps
            uncond_eps = cond_eps - self.eps_diff
            rest = torch.cat([rest, rest])
        guided = uncond_eps + s * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)

    def _run(self, x: Tensor, i: Tensor, z: Tensor, full: bool, mlp_fresh: bool) -> Tensor:
        """SimpleMLPAdaLN.forward on the given rows, with the policy's reuse on cached steps."""
        net, policy, rows = self.net, self.policy, x.shape[0]
        w = net.input_proj.out_features
        t = self.timestep_map[i]
        h = net.input_proj(x)
        self._charge(F.linear_flops(rows, x.shape[1], w))
        if policy.hoist_invariants:
            time = net.time_embed(t[:1])
            self._charge(F.linear_flops(1, net.time_embed.frequency_size, w) + F.linear_flops(1, w, w))
            y = time + self.cond[:rows]
        else:
            y = net.time_embed(t) + net.cond_embed(z)
            self._charge(F.linear_flops(rows, net.time_embed.frequency_size, w) + F.linear_flops(rows, w, w)
                         + F.linear_flops(rows, z.shape[1], w))
        keep = self.cached_rows
        for b, block in enumerate(net.res_blocks):
            if not full and b in policy.reuse_blocks:  # the cached residual update
                h = h + self.deltas[b][:rows]
                continue
            self._charge(F.linear_flops(rows, w, 3 * w))
            if full or mlp_fresh:
                out = block(h, y)
                self._charge(2 * F.linear_flops(rows, w, w))
                if policy.reuse_mlp and b not in policy.reuse_blocks:
                    self.mlps[b] = self._mlp_out.pop(b)[:keep]
                if full and b in policy.reuse_blocks:
                    self.deltas[b] = (out - h)[:keep]
                h = out
            else:  # fresh modulation, cached MLP output
                shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
                h = h + gate * self.mlps[b][:rows]
        out = net.final_layer(h, y)
        self._charge(F.linear_flops(rows, w, 2 * w) + F.linear_flops(rows, w, out.shape[1]))
        return out


