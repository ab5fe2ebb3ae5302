"""The diffusion-head cache, over the head's reverse steps inside one MAR step (``DiffLoss.sample``'s ``denoise``
seam), under a :class:`~lazymar.cache.schedule_file.HeadCachePolicy`.

Full head steps run the network on both CFG halves and refill the caches: the cond - uncond eps, the residual
update of each reused res-block, and the MLP output of the others. Cached head steps run only the cond half under
the CFG cache, add the cached residual updates instead of running those blocks, and (``reuse_mlp``) run the other
blocks with a fresh gate but the cached MLP output. With ``hoist_invariants`` the cond embedding runs once per MAR
step and the time embedding once per head step.

The network runs through its own parts (input_proj, time/cond embedding, res-blocks as modules, final layer), so
forward hooks on them fire; a hook on each res-block's MLP captures its output for reuse while a step runs.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..model import MAR
from ..sampling import StepContext, sample_head
from . import flops as F
from .mechanism import CacheMechanism, EngineRun, HeadPass, StepPrice, tensor_bytes
from .schedule_file import HeadCachePolicy


class HeadCache(CacheMechanism):
    """The diffusion head, cached under the policy on the steps whose plan says so, else run as the model's.
    State (of the MAR step being sampled; ``reset`` after it): the hoisted cond embedding, the cond - uncond eps of
    the last full head step, the cached residual updates and MLP outputs per res-block. Built without a model, it
    is bound by ``start``."""

    def __init__(self, model: Optional[MAR] = None, policy: Optional[HeadCachePolicy] = None,
                 ledger: Optional[F.FlopsLedger] = None):
        self.use_cfg, self.cfg_scale, self.n, self.cached_rows = False, 1.0, 0, 0
        self.head_step: Optional[int] = None
        self.reset()
        if model is not None:
            self.bind(model, policy if policy is not None else HeadCachePolicy(), ledger)

    def bind(self, model: MAR, policy: HeadCachePolicy, ledger: F.FlopsLedger) -> None:
        self.model, self.policy, self.ledger = model, policy, ledger
        self.config = model.config
        self.net = model.diffloss.net
        self.use_diffusion(None)

    def start(self, run: EngineRun) -> None:
        self.bind(run.model, run.schedule.head, run.ledger)
        self.reset()

    def run_head(self, ctx: StepContext, head: HeadPass) -> None:
        sample = self.sample if head.plan.head_cache else self.sample_uncached
        head.sampled = sample_head(ctx, head.z, lambda rows, steps: sample(ctx, rows, head.temperature,
                                                                           head.generator, steps))

    def flops(self, price: StepPrice) -> dict[str, int]:
        """The head's reverse steps for the step's tokens, under the policy where the plan caches the head; under
        a frequency-weighted allocation the tokens of reduced steps are sampled as their own group."""
        c, to_predict, allocation = price.config, price.counts.to_predict, price.head_steps
        policy = price.schedule.head if price.plan.head_cache else None
        full = to_predict if allocation is None else allocation.full_count(to_predict)
        flops = F.head_sampling_flops(c, price.batch_size * full, price.use_cfg, policy)
        if allocation is not None:
            flops += F.head_sampling_flops(c, price.batch_size * (to_predict - full), price.use_cfg, policy,
                                           head_steps=allocation.reduced_steps)
        return {"head": flops}

    def sample_uncached(self, ctx: StepContext, z: Tensor, temperature: float,
                        generator: Optional[torch.Generator], steps: Optional[int] = None) -> Tensor:
        """``DiffLoss.sample`` of the rows of z as the model runs it (both CFG halves returned), charged per call
        of its denoiser."""
        diffloss = self.model.diffloss
        cfg = ctx.cfg_scale if ctx.use_cfg else None
        plain = diffloss.denoiser(cfg, diffloss.sampling_diffusion(steps))

        def denoise(x: Tensor, i: Tensor, zz: Tensor) -> Tensor:
            self.ledger.add("head", F.head_net_flops(self.config, x.shape[0]))
            return plain(x, i, zz)
        return diffloss.sample(z, temperature, cfg, generator, denoise=denoise, steps=steps)

    def held_bytes(self) -> int:
        """The head's caches (not its diffusion tables); they live within one MAR step."""
        return tensor_bytes(self.cond, self.eps_difference, self.deltas, self.mlps, self._mlp_out)

    def reset(self) -> None:
        self.cond: Optional[Tensor] = None         # hoisted cond_embed(z)
        self.eps_difference: Optional[Tensor] = None  # cond - uncond eps of the last full step
        self.deltas: dict[int, Tensor] = {}         # block -> cached residual update (gate * mlp)
        self.mlps: dict[int, Tensor] = {}           # block -> cached MLP output
        self._mlp_out: dict[int, Tensor] = {}

    @property
    def empty(self) -> bool:
        return self.cond is None and self.eps_difference is None and not self.deltas and not self.mlps

    def use_diffusion(self, steps: Optional[int]) -> None:
        """Run the head's reverse steps of ``DiffLoss.sampling_diffusion(steps)`` (None: the model's)."""
        self.diffusion = self.model.diffloss.sampling_diffusion(steps)
        self.num_steps, self.timestep_map = self.diffusion.num_timesteps, self.diffusion.timestep_map

    def sample(self, ctx: StepContext, z: Tensor, temperature: float,
               generator: Optional[torch.Generator], steps: Optional[int] = None) -> Tensor:
        """``DiffLoss.sample`` of the rows of z with this cache as the denoiser (both CFG halves returned), over
        ``steps`` head steps (None: the model's; the policy's refresh steps count within them)."""
        self.use_diffusion(steps)
        self.begin(ctx.use_cfg, ctx.cfg_scale, z)
        self.head_step = self.num_steps - 1  # DiffLoss.sample's reverse loop runs num_steps - 1 down to 0
        try:
            with self.capturing_mlps():
                cfg = ctx.cfg_scale if ctx.use_cfg else None
                return self.model.diffloss.sample(z, temperature, cfg, generator, denoise=self.denoise, steps=steps)
        finally:
            self.reset()
            self.use_diffusion(None)

    def begin(self, use_cfg: bool, cfg_scale: float, z: Tensor) -> None:
        """Start a MAR step whose head conditions on z ([cond; uncond] with CFG)."""
        self.reset()
        self.use_cfg, self.cfg_scale = use_cfg, cfg_scale
        self.n = z.shape[0] // 2 if use_cfg else z.shape[0]
        # rows that cached steps run: the cond half under the CFG cache
        self.cached_rows = self.n if (use_cfg and self.policy.cfg_cache) else z.shape[0]
        self.timestep_map = self.diffusion.timesteps_on(z.device)  # copied to the device once per diffusion
        self.head_step = None  # the next head step when counted (sample), else read from i
        if self.policy.hoist_invariants:
            self.cond = self.net.cond_embed(z)
            self.ledger.add("head", F.head_cond_flops(self.config, z.shape[0]))

    @contextlib.contextmanager
    def capturing_mlps(self) -> Iterator[None]:
        """Forward hooks that keep the MLP output of the res-blocks whose MLP output is reused (``reuse_mlp``)."""
        handles = []
        if self.policy.reuse_mlp:
            handles = [block.mlp.register_forward_hook(self._capture(b)) for b, block in enumerate(self.net.res_blocks)
                       if b not in self.policy.reuse_blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _capture(self, b: int):
        def hook(module: torch.nn.Module, inputs: tuple, output: Tensor) -> None:
            self._mlp_out[b] = output
        return hook

    def denoise(self, x: Tensor, i: Tensor, z: Tensor) -> Tensor:
        """The network output for head step ``i`` (respaced index, one per row), CFG-guided with CFG on."""
        if self.head_step is None:
            step = int(i[0])
        else:  # counted: reading i would cost a host round-trip per head step
            step, self.head_step = self.head_step, self.head_step - 1
        full = self.policy.full_step(step, self.num_steps)
        n = self.n
        if full or not (self.use_cfg and self.policy.cfg_cache):
            rows = 2 * n if self.use_cfg else n
            x_in = torch.cat([x[:n], x[:n]]) if self.use_cfg else x
        else:
            rows, x_in = n, x[:n]
        out = self._run(x_in, i[:rows], z[:rows], full, self.policy.mlp_fresh(step, self.num_steps))
        if not self.use_cfg:
            return out
        D = self.net.in_channels
        eps, rest = out[:, :D], out[:, D:]
        if rows == 2 * n:
            cond_eps, uncond_eps = eps.chunk(2)
            if full and self.policy.cfg_cache:
                self.eps_difference = cond_eps - uncond_eps
        else:  # CFG cache: only the cond half ran
            cond_eps = eps
            uncond_eps = cond_eps - self.eps_difference
            rest = torch.cat([rest, rest])
        return self.net.guide(cond_eps, uncond_eps, rest, self.cfg_scale)

    def _run(self, x: Tensor, i: Tensor, z: Tensor, full: bool, mlp_fresh: bool) -> Tensor:
        """The network on the given rows, part by part, with the policy's reuse on cached steps."""
        net, policy, c, rows = self.net, self.policy, self.config, x.shape[0]
        charge = lambda flops: self.ledger.add("head", flops)  # noqa: E731
        t = self.timestep_map[i]
        h = net.input_proj(x)
        charge(F.head_input_flops(c, rows))
        if policy.hoist_invariants:
            y = net.time_embed(t[:1]) + self.cond[:rows]
            charge(F.head_time_flops(c, 1))
        else:
            y = net.embed(t, z)
            charge(F.head_time_flops(c, rows) + F.head_cond_flops(c, rows))
        keep = self.cached_rows
        for b, block in enumerate(net.res_blocks):
            if not full and b in policy.reuse_blocks:  # the cached residual update
                h = h + self.deltas[b][:rows]
            elif full or mlp_fresh:
                out = block(h, y)
                charge(F.head_res_block_flops(c, rows))
                if policy.reuse_mlp and b not in policy.reuse_blocks:
                    self.mlps[b] = self._mlp_out.pop(b)[:keep]
                if full and b in policy.reuse_blocks:
                    self.deltas[b] = (out - h)[:keep]
                h = out
            else:  # fresh gate, cached MLP output
                h = block.with_mlp_output(h, y, self.mlps[b][:rows])
                charge(F.head_res_block_flops(c, rows, mlp=False))
        out = net.final_layer(h, y)
        charge(F.head_final_flops(c, rows))
        return out
