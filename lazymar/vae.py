"""The KL-16 VAE that maps MAR's tokens to pixels: an LDM AutoencoderKL written here, in the official key layout.

MAR models ImageNet as 16x16 latents of 16 channels from this autoencoder (embed_dim=16, ch_mult=(1,1,2,2,4)) and
decodes its samples with ``vae.decode(tokens / 0.2325)``. Our module's state dict equals the official ``kl16.ckpt``
(key ``"model"``) key for key, so that file loads unchanged. Sizes are configurable so that tests can use a tiny one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import CheckpointError, check_state_dict, read_checkpoint
from .download import resolve as resolve_download
from .model import MAR
from .precision import autocast

# MAR scales the VAE's latents by this factor for training; tokens are divided by it before decoding.
LATENT_SCALE = 0.2325


@dataclass(frozen=True)
class VAEConfig:
    """Constructor settings of an LDM AutoencoderKL; the defaults are MAR's KL-16 VAE."""

    embed_dim: int = 16
    z_channels: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    double_z: bool = True
    encoder_attn_levels: tuple[int, ...] = (4,)  # down levels with attention after each res block
    decoder_attn_levels: tuple[int, ...] = field(default=())  # up levels with attention (none in KL-16)
    norm_groups: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus the input (through a 1x1 ``nin_shortcut`` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv q, k, v and output projection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Halve the resolution: pad one pixel right and bottom, then a stride-2 3x3 conv (as in LDM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, each optionally followed by attention, then a
    resampler."""

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock], resample: Optional[nn.Module], name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.resample_name = name
        if resample is not None:
            self.add_module(name, resample)  # "downsample" or "upsample", as in the official keys

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class MidBlock(nn.Module):
    """Res block, attention, res block at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> (B, 2 z_channels, H/f, W/f) moments (mean and log variance) before ``quant_conv``."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        g = c.norm_groups
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        widths = [c.ch * m for m in (1, *c.ch_mult)]
        self.down = nn.ModuleList()
        for level, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            blocks = [ResnetBlock(w_in if i == 0 else w_out, w_out, g) for i in range(c.num_res_blocks)]
            attns = [AttnBlock(w_out, g) for _ in blocks] if level in c.encoder_attn_levels else []
            last = level == len(c.ch_mult) - 1
            self.down.append(Level(blocks, attns, None if last else Downsample(w_out), "downsample"))
        self.mid = MidBlock(widths[-1], g)
        self.norm_out = group_norm(widths[-1], g)
        self.conv_out = nn.Conv2d(widths[-1], 2 * c.z_channels if c.double_z else c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h*f, w*f). ``up[i]`` is the level at resolution i, so it runs
    from the last index to the first."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        g = c.norm_groups
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], g)
        levels = []
        w_in = widths[-1]
        for level in reversed(range(len(widths))):
            w_out = widths[level]
            blocks = [ResnetBlock(w_in if i == 0 else w_out, w_out, g) for i in range(c.num_res_blocks + 1)]
            attns = [AttnBlock(w_out, g) for _ in blocks] if level in c.decoder_attn_levels else []
            levels.insert(0, Level(blocks, attns, Upsample(w_out) if level != 0 else None, "upsample"))
            w_in = w_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(widths[0], g)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """LDM's KL autoencoder: ``encode`` gives the posterior mean, ``decode`` maps latents to images in [-1, 1]."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        moments = 2 * c.z_channels if c.double_z else c.z_channels
        self.quant_conv = nn.Conv2d(moments, 2 * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log variance of the diagonal Gaussian posterior, each (B, embed_dim, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> the posterior mean latent (MAR multiplies it by 0.2325 to get tokens)."""
        return self.encode_moments(images)[0]

    def decode(self, latent: Tensor) -> Tensor:
        """Latent (B, embed_dim, h, w) -> images (B, 3, h*f, w*f) on the [-1, 1] scale (not clamped)."""
        return self.decoder(self.post_quant_conv(latent))


def infer_vae_config(state: Mapping[str, Tensor]) -> VAEConfig:
    """The AutoencoderKL sizes that produce the tensor shapes of ``state`` (all shape-determining fields)."""
    try:
        ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
        ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
        z_channels = state["decoder.conv_in.weight"].shape[1]
        embed_dim = state["post_quant_conv.weight"].shape[1]
        return VAEConfig(
            embed_dim=int(embed_dim), z_channels=int(z_channels), ch=int(ch), ch_mult=ch_mult,
            num_res_blocks=num_res_blocks, in_channels=int(in_channels),
            out_channels=int(state["decoder.conv_out.weight"].shape[0]),
            double_z=state["encoder.conv_out.weight"].shape[0] == 2 * z_channels,
            encoder_attn_levels=tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state),
            decoder_attn_levels=tuple(i for i in levels if f"decoder.up.{i}.attn.0.q.weight" in state),
        )
    except (KeyError, IndexError, ValueError) as err:
        raise CheckpointError(
            f"not an AutoencoderKL state dict: cannot infer its sizes ({type(err).__name__}: {err})") from None


def load_vae(path: str | Path, config: Optional[VAEConfig] = None, device: str | torch.device = "cpu") -> AutoencoderKL:
    """The VAE of a checkpoint (MAR's ``kl16.ckpt``: key ``"model"``; LDM's ``"state_dict"`` or a bare state dict
    also work), or the downloaded one by name ("kl16"), in eval mode.

    Sizes are inferred from the tensor shapes unless ``config`` is given.
    """
    path = resolve_download(path, "vae")  # "kl16": the downloaded one (lazymar.download)
    ckpt = read_checkpoint(path)
    state = next((ckpt[k] for k in ("model", "state_dict") if isinstance(ckpt.get(k), Mapping)), ckpt)
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}  # LDM training checkpoints carry the loss
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"not a VAE checkpoint: {path} has no 'model' dict of tensors")
    if config is None:
        try:
            config = infer_vae_config(state)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
    with torch.device("meta"):
        expected = AutoencoderKL(config).state_dict()
    check_state_dict(expected, state, path)
    vae = AutoencoderKL(config)
    vae.load_state_dict(state)
    return vae.eval().to(device)


def check_vae_fits(model: MAR, vae: Optional[AutoencoderKL]) -> None:
    """CheckpointError unless ``tokens_to_images(model, tokens, vae)`` can work: call it before sampling to fail fast."""
    if vae is None:
        if model.config.vae_stride != 1:
            raise CheckpointError(
                f"this model's tokens are {model.config.vae_embed_dim}-channel VAE latents (stride "
                f"{model.config.vae_stride}), not pixels: pass the VAE it was trained with (--vae PATH)")
    elif vae.config.embed_dim != model.config.vae_embed_dim:
        raise CheckpointError(
            f"VAE latent has {vae.config.embed_dim} channels but the model's tokens have "
            f"{model.config.vae_embed_dim} (vae_embed_dim): use the VAE the model was trained with")


@torch.no_grad()
def tokens_to_images(model: MAR, tokens: Tensor, vae: Optional[AutoencoderKL] = None,
                     precision: str = "fp32") -> Tensor:
    """MAR tokens (B, seq_len, token_dim) -> images (B, C, H, W) on the [-1, 1] scale.

    With a VAE: ``vae.decode(unpatchify(tokens) / 0.2325)``, under autocast to ``precision`` (lazymar.precision;
    the official evaluation decodes under the sampler's autocast). Without one the tokens must be pixels
    (vae_stride 1, as in the embedded digits model) and are only rearranged into images.
    """
    check_vae_fits(model, vae)
    latents = model.unpatchify(tokens)
    if vae is None:
        return latents
    weight = next(vae.parameters())
    with autocast(precision, weight.device):
        return vae.decode(latents.to(weight.device, weight.dtype) / LATENT_SCALE)
