"""The diffusion head of MAR: an AdaLN MLP denoiser and ADM-style Gaussian diffusion over one token.

Cosine noise schedule over 1000 training steps, epsilon prediction, learned-range variance, and respacing for
sampling (the network always sees the original timestep). Schedules are kept in float64, as in ADM.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor


# --- the denoiser network (SimpleMLPAdaLN) -------------------------------------------------------------------
def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal features ([cos, sin], max period 10000) of the timestep, then an MLP."""

    def __init__(self, hidden: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        # the frequencies once (not per head step); not in the state dict, so checkpoints load unchanged
        self.register_buffer("freqs", self.frequencies(), persistent=False)

    def frequencies(self, device: Optional[torch.device] = None) -> Tensor:
        half = self.frequency_size // 2
        return torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=device) / half)

    def _apply(self, fn, recurse=True):
        """Move and cast like any module, but keep the frequencies in float32 (a model cast with
        ``.to(torch.bfloat16)`` would otherwise round them, and t * freqs by up to 2 radians)."""
        super()._apply(fn, recurse)
        if self.freqs.dtype != torch.float32:
            self.freqs = self.frequencies(self.freqs.device)
        return self

    def forward(self, t: Tensor) -> Tensor:
        args = t[:, None].float() * self.freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # the weights' dtype (a cast model's, or float32)


class ResBlock(nn.Module):
    """x + gate * mlp(modulate(ln(x))), with shift/scale/gate from the conditioning y."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def modulation(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(shift, scale, gate) from the conditioning y."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return shift, scale, gate

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(y)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))

    def with_mlp_output(self, x: Tensor, y: Tensor, mlp_output: Tensor) -> Tensor:
        """The block with a given MLP output (fresh gate): the head cache's reuse of an earlier step's MLP."""
        return x + self.modulation(y)[2] * mlp_output


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Denoiser eps_theta(x_t, t, z): returns (N, 2 * token_dim) = [eps, variance interpolation]."""

    def __init__(self, in_channels: int, model_channels: int, z_channels: int, num_res_blocks: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, 2 * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [*self.res_blocks, self.final_layer]:  # adaLN-zero
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, t: Tensor, c: Tensor) -> Tensor:
        """The conditioning y of the res-blocks: time embedding plus the projected MAR output."""
        return self.time_embed(t) + self.cond_embed(c)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        x = self.input_proj(x)
        y = self.embed(t, c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x: Tensor, t: Tensor, c: Tensor, cfg_scale: float) -> Tensor:
        """CFG as in MAR: c = [cond; uncond]; the first half of x is used for both; eps mixed, variance kept."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        cond_eps, uncond_eps = out[:, : self.in_channels].chunk(2)
        return self.guide(cond_eps, uncond_eps, out[:, self.in_channels:], cfg_scale)

    @staticmethod
    def guide(cond_eps: Tensor, uncond_eps: Tensor, rest: Tensor, cfg_scale: float) -> Tensor:
        """The CFG output for [cond; uncond] rows: the guided eps in both halves, then the variance part ``rest``
        (2n rows)."""
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


# --- Gaussian diffusion -----------------------------------------------------------------------------------
def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """ADM's respacing: evenly strided steps kept from each section ("100" -> 100 steps in one section)."""
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


class GaussianDiffusion:
    """Diffusion over ``betas``; ``timestep_map[i]`` is the training timestep that respaced step i stands for."""

    def __init__(self, betas: np.ndarray, timestep_map: Optional[list[int]] = None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(betas)))
        alphas = 1.0 - betas
        self.alphas_cumprod = acp = np.cumprod(alphas)
        acp_prev = np.append(1.0, acp[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(acp)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - acp)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / acp)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / acp - 1)
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)
        self.log_betas = np.log(betas)
        self._tables: dict[tuple[str, torch.device], Tensor] = {}

    @classmethod
    def create(cls, respacing: str = "", num_train_steps: int = 1000) -> "GaussianDiffusion":
        """The cosine-schedule diffusion, respaced to ``respacing`` steps ("" keeps all of them)."""
        base = cosine_betas(num_train_steps)
        if not respacing:
            return cls(base)
        kept = space_timesteps(num_train_steps, respacing)
        last, betas = 1.0, []
        for i, acp in enumerate(np.cumprod(1.0 - base)):
            if i in kept:
                betas.append(1 - acp / last)
                last = acp
        return cls(np.array(betas), kept)

    def timesteps_on(self, device: torch.device) -> Tensor:
        """``timestep_map`` on ``device``, copied there once (not per head step)."""
        key = ("timestep_map", torch.device(device))
        if key not in self._tables:
            self._tables[key] = self.timestep_map.to(device)
        return self._tables[key]

    def _at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """The float64 table ``name`` at t, as float32 on t's device, broadcast over the token dimension."""
        key = (name, t.device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(getattr(self, name)).float().to(t.device)
        return self._tables[key][t].reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        mean = self._at("posterior_mean_coef1", t, xt) * x0 + self._at("posterior_mean_coef2", t, xt) * xt
        return mean, self._at("posterior_log_variance_clipped", t, xt)

    def p_mean_variance(self, model_output: Tensor, x: Tensor, t: Tensor, clip_denoised: bool = False) -> dict[str, Tensor]:
        """Mean, log variance and predicted x0 of p(x_{t-1} | x_t) from the network output at respaced index t."""
        eps, var_values = model_output.split(x.shape[1], dim=1)
        min_log = self._at("posterior_log_variance_clipped", t, x)
        max_log = self._at("log_betas", t, x)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._at("sqrt_recip_alphas_cumprod", t, x) * x - self._at("sqrt_recipm1_alphas_cumprod", t, x) * eps
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_xstart, x, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def training_loss(self, net: Callable[..., Tensor], x0: Tensor, c: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Per-sample loss: eps MSE plus the variational bound term for the learned variance (ADM's hybrid loss)."""
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        xt = self.q_sample(x0, t, noise)
        out = net(xt, t, c)
        eps, var_values = out.split(x0.shape[1], dim=1)
        mse = ((noise - eps) ** 2).mean(dim=1)
        # vb term: only trains the variance (the mean is detached), as in ADM
        frozen = self.p_mean_variance(torch.cat([eps.detach(), var_values], dim=1), xt, t)
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        kl = 0.5 * (-1.0 + frozen["log_variance"] - true_log_var + torch.exp(true_log_var - frozen["log_variance"])
                    + (true_mean - frozen["mean"]) ** 2 * torch.exp(-frozen["log_variance"]))
        kl = kl.mean(dim=1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, frozen["mean"], 0.5 * frozen["log_variance"]).mean(dim=1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl) * self.num_timesteps / 1000.0
        return mse + vb


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


class DiffLoss(nn.Module):
    """MAR's per-token diffusion head: ``net`` plus the training and the (respaced) sampling diffusions."""

    def __init__(self, token_dim: int, z_channels: int, width: int, depth: int, num_sampling_steps: str,
                 clip_denoised: bool = False):
        super().__init__()
        self.in_channels = token_dim
        self.clip_denoised = clip_denoised
        self.net = SimpleMLPAdaLN(token_dim, width, z_channels, depth)
        self.train_diffusion = GaussianDiffusion.create("")
        self.gen_diffusion = GaussianDiffusion.create(str(num_sampling_steps))
        self._respaced: dict[int, GaussianDiffusion] = {}

    def forward(self, target: Tensor, z: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Training loss for targets (N, token_dim) conditioned on z (N, z_channels), averaged over ``mask``."""
        loss = self.train_diffusion.training_loss(self.net, target, z)
        if mask is None:
            return loss.mean()
        return (loss * mask).sum() / mask.sum()

    def sampling_diffusion(self, steps: Optional[int] = None) -> GaussianDiffusion:
        """The diffusion sampling runs: the model's (``num_sampling_steps``), or the same cosine schedule respaced to
        ``steps`` steps, as the official code respaces ``num_sampling_steps`` (fewer head steps for some tokens:
        lazymar.head_steps)."""
        if steps is None:
            return self.gen_diffusion
        if steps not in self._respaced:
            self._respaced[steps] = GaussianDiffusion.create(str(steps))
        return self._respaced[steps]

    def denoiser(self, cfg: Optional[float], diffusion: Optional[GaussianDiffusion] = None
                 ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """eps_theta(x, respaced index, z), with CFG when ``cfg`` is given (z is then [cond; uncond]); the index is
        one of ``diffusion``'s steps (default: the model's sampling diffusion)."""
        diffusion = diffusion or self.gen_diffusion

        def run(x: Tensor, i: Tensor, z: Tensor) -> Tensor:
            t = diffusion.timesteps_on(i.device)[i]
            if cfg is None:
                return self.net(x, t, z)
            return self.net.forward_with_cfg(x, t, z, cfg)
        return run

    @torch.no_grad()
    def sample(self, z: Tensor, temperature: float = 1.0, cfg: Optional[float] = None,
               generator: Optional[torch.Generator] = None,
               denoise: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
               steps: Optional[int] = None) -> Tensor:
        """Sample one token per row of z by the reverse process; with CFG, z = [cond; uncond] and the noise is
        shared by the two halves, so both halves of the result are equal (callers keep the first).

        ``denoise`` replaces the network call (the head cache uses it); it receives (x, respaced index, z).
        ``steps`` runs that many reverse steps (``sampling_diffusion``) instead of the model's."""
        diffusion = self.sampling_diffusion(steps)
        denoise = denoise or self.denoiser(cfg, diffusion)
        n = z.shape[0] // 2 if cfg is not None else z.shape[0]
        if n == 0:  # nothing to predict at this MAR step (draws no noise, as the loop would not)
            return z.new_empty(z.shape[0], self.in_channels)
        x = torch.randn(n, self.in_channels, device=z.device, generator=generator)
        if cfg is not None:
            x = torch.cat([x, x])
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=z.device, dtype=torch.long)
            # the reverse process stays in float32; the network sees x in z's dtype (a cast model's)
            out = diffusion.p_mean_variance(denoise(x.to(z.dtype), t, z), x, t, self.clip_denoised)
            noise = torch.randn(n, self.in_channels, device=z.device, generator=generator)
            if cfg is not None:
                noise = torch.cat([noise, noise])
            x = out["mean"] if i == 0 else out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return x
