"""MAR (Li et al. 2024): a bidirectional encoder-decoder over continuous tokens with a diffusion MLP head.

The module names and parameter layout follow the official implementation, so its checkpoints load unchanged.
The model computes one transformer pass (``forward_mae_encoder`` then ``forward_mae_decoder``); the sampling loop
lives in :mod:`lazymar.sampling` and the diffusion head in :mod:`lazymar.diffusion`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import MARConfig, SamplingSettings
from .diffusion import DiffLoss

# Called with (k, v) of shape (B, heads, N, head_dim); returns the K/V that the queries attend to.
# The cache engine uses it to attend over fresh K/V of recomputed positions plus cached K/V of the others.
KVHook = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# layer index -> that block's KVHook (or None)
KVHooks = Callable[[int], Optional[KVHook]]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, kv_hook: Optional[KVHook] = None) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv_hook is not None:
            k, v = kv_hook(k, v)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block: x + attn(norm1 x), then x + mlp(norm2 x)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, kv_hook: Optional[KVHook] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), kv_hook)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: Tensor, kv_hooks: Optional[KVHooks] = None,
               layers: Optional[range] = None) -> Tensor:
    """x through ``blocks[layers]`` (all by default) in order, block i with the K/V hook ``kv_hooks(i)``."""
    for layer in layers if layers is not None else range(len(blocks)):
        x = blocks[layer](x, kv_hooks(layer) if kv_hooks is not None else None)
    return x


class MAR(nn.Module):
    """Masked autoregressive model: MAE-style encoder over known tokens, decoder over all positions.

    ``sampling_defaults`` are the settings :func:`lazymar.sampling.generate` uses when given none (checkpoints
    store theirs)."""

    sampling_defaults: SamplingSettings

    def __init__(self, config: MARConfig, sampling_defaults: Optional[SamplingSettings] = None):
        super().__init__()
        self.config = c = config
        self.sampling_defaults = sampling_defaults or SamplingSettings()
        self.seq_len, self.token_dim, self.buffer_size = c.seq_len, c.token_dim, c.buffer_size
        enc, dec, total = c.encoder_embed_dim, c.decoder_embed_dim, c.seq_len + c.buffer_size

        self.class_emb = nn.Embedding(c.class_num, enc)
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))  # the "no class" embedding used for CFG
        self.z_proj = nn.Linear(self.token_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, enc))
        self.encoder_blocks = nn.ModuleList(
            Block(enc, c.encoder_num_heads, c.mlp_ratio) for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(enc, eps=1e-6)

        self.decoder_embed = nn.Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, dec))
        self.decoder_blocks = nn.ModuleList(
            Block(dec, c.decoder_num_heads, c.mlp_ratio) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, c.seq_len, dec))

        self.diffloss = DiffLoss(c.token_dim, dec, c.diffloss_w, c.diffloss_d, c.num_sampling_steps, c.clip_denoised)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialisation of the official code (used only when training from scratch)."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("diffloss"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # --- tokens <-> images --------------------------------------------------------------------------------
    def patchify(self, latents: Tensor) -> Tensor:
        """(B, C, H, W) latents -> (B, seq_len, token_dim) tokens."""
        B, C, H, W = latents.shape
        p, h, w = self.config.patch_size, H // self.config.patch_size, W // self.config.patch_size
        x = latents.reshape(B, C, h, p, w, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(B, h * w, C * p * p)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(B, seq_len, token_dim) tokens -> (B, C, H, W) latents."""
        B = tokens.shape[0]
        p, g, C = self.config.patch_size, self.config.grid_size, self.config.vae_embed_dim
        x = tokens.reshape(B, g, g, C, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(B, C, g * p, g * p)

    # --- transformer ------------------------------------------------------------------------------------
    # The paper's pass is forward_mae_encoder then forward_mae_decoder. Each is written from smaller steps (embed
    # given positions, keep the visible rows, run blocks with optional K/V hooks, scatter into mask tokens) that
    # the cache engine calls on subsets of rows; the plain pass is unchanged by them.
    def with_buffer(self, mask: Tensor) -> Tensor:
        """Prepend the always-visible buffer (class) positions to a (B, seq_len) mask; 1 = masked."""
        return torch.cat([mask.new_zeros(mask.shape[0], self.buffer_size), mask], dim=1)

    def embed_encoder_input(self, tokens: Tensor, class_embedding: Tensor,
                            positions: Optional[Tensor] = None, n_buf: Optional[int] = None) -> Tensor:
        """Encoder inputs (class embedding or projected token, plus position, normalised) of ``positions`` (N, n)
        of buffer + sequence, buffer positions first in every row (``n_buf`` of them: counted from the positions
        when not given, a host round-trip); all positions by default."""
        buf = self.buffer_size
        if positions is None:
            n_buf, z, pos = buf, self.z_proj(tokens), self.encoder_pos_embed_learned
        else:
            n_buf = int((positions[0] < buf).sum()) if n_buf is None else n_buf
            index = (positions[:, n_buf:] - buf).unsqueeze(-1).expand(-1, -1, tokens.shape[2])
            z, pos = self.z_proj(tokens.gather(1, index)), self.encoder_pos_embed_learned[0][positions]
        x = torch.cat([class_embedding.unsqueeze(1).expand(-1, n_buf, -1).to(z.dtype), z], dim=1)
        return self.z_proj_ln(x + pos)

    def visible_positions(self, mask: Tensor) -> Tensor:
        """(B, buffer + known) positions into buffer + sequence of the buffer and the known tokens (mask 0), sorted
        per row. Found with ``nonzero``, a host round-trip: the sampling loop passes them from the orders instead."""
        return (1 - self.with_buffer(mask)).nonzero()[:, 1].reshape(mask.shape[0], -1)

    def visible_rows(self, x: Tensor, mask: Tensor, visible: Optional[Tensor] = None) -> Tensor:
        """The rows of x (B, buffer + seq, C) at the buffer and known positions (mask 0), in position order;
        ``visible``: those positions (:meth:`visible_positions`) when known."""
        visible = self.visible_positions(mask) if visible is None else visible
        return x.gather(1, visible.unsqueeze(-1).expand(-1, -1, x.shape[2]))

    def run_encoder(self, x: Tensor, kv_hooks: Optional[KVHooks] = None) -> Tensor:
        """The encoder blocks and norm on embedded rows x (N, n, enc); ``kv_hooks`` can supply the K/V of
        positions that are not among the rows."""
        return self.encoder_norm(run_blocks(self.encoder_blocks, x, kv_hooks))

    def forward_mae_encoder(self, tokens: Tensor, mask: Tensor, class_embedding: Tensor,
                            visible: Optional[Tensor] = None) -> Tensor:
        """Encode the buffer and the known (unmasked) tokens; returns (B, buffer + known, enc)."""
        return self.run_encoder(self.visible_rows(self.embed_encoder_input(tokens, class_embedding), mask, visible))

    def decoder_embeddings(self, x: Tensor, mask: Tensor, visible: Optional[Tensor] = None) -> Tensor:
        """Mask tokens everywhere, the embedded encoder outputs x at the buffer and known positions (``visible``,
        when known; no positional embedding yet)."""
        x = self.decoder_embed(x)
        visible = self.visible_positions(mask) if visible is None else visible
        full = self.mask_token.expand(mask.shape[0], mask.shape[1] + self.buffer_size, -1).to(x.dtype)
        return full.scatter(1, visible.unsqueeze(-1).expand(-1, -1, x.shape[2]), x)

    def with_decoder_positions(self, x: Tensor) -> Tensor:
        return x + self.decoder_pos_embed_learned

    def scatter_decoder_input(self, x: Tensor, mask: Tensor, visible: Optional[Tensor] = None) -> Tensor:
        """The decoder input of all positions from the encoder outputs x."""
        return self.with_decoder_positions(self.decoder_embeddings(x, mask, visible))

    def run_decoder(self, x: Tensor, layers: Optional[range] = None, kv_hooks: Optional[KVHooks] = None) -> Tensor:
        """Decoder blocks ``layers`` (all by default) on rows x (N, n, dec); no norm (see decoder_output)."""
        return run_blocks(self.decoder_blocks, x, kv_hooks, layers)

    def decoder_output(self, x: Tensor) -> Tensor:
        """After the last decoder block: norm, drop the buffer, add the diffusion positions -> z."""
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.diffusion_pos_embed_learned

    def forward_mae_decoder(self, x: Tensor, mask: Tensor, visible: Optional[Tensor] = None) -> Tensor:
        """Decode all positions; returns the head conditioning z of shape (B, seq_len, dec)."""
        return self.decoder_output(self.run_decoder(self.scatter_decoder_input(x, mask, visible)))

    def forward_transformer(self, tokens: Tensor, mask: Tensor, class_embedding: Tensor,
                            visible: Optional[Tensor] = None) -> Tensor:
        """One full MAR pass: tokens (B, L, D), mask (B, L) with 1 = unknown, class embeddings (B, enc) -> z.
        ``visible``: the buffer and known positions (:meth:`visible_positions`) when the caller knows them."""
        visible = self.visible_positions(mask) if visible is None else visible
        return self.forward_mae_decoder(self.forward_mae_encoder(tokens, mask, class_embedding, visible), mask,
                                        visible)

    def class_embedding(self, labels: Optional[Tensor], batch_size: int) -> Tensor:
        """Class embeddings for ``labels``; the learned fake latent for unconditional positions (label -1 or None)."""
        fake = self.fake_latent.expand(batch_size, -1)
        if labels is None:
            return fake
        emb = self.class_emb(labels.clamp(min=0))
        return torch.where((labels < 0).unsqueeze(1), fake, emb)
