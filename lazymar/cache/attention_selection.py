"""MARché's selective KV refresh as a selection rule of the decoder's token cache ("attention").

MARché (arXiv 2506.12035) splits tokens into an active set (being generated) and a cached set whose K/V are
reused, and refreshes the cached tokens that the newly generated ones attend to most, since those change most.
Here, on a cached step, the queries of the positions decoded at the previous step (``new``) and of those decoded
now (``to_predict``) at the selection layer score every position by the attention weight they give it, summed over
heads and those queries; the highest-scored positions are recomputed after the selection layer.

The weights are computed once more beside the block's fused attention (softmax(q k^T / sqrt(d)) of the chosen
queries), so their product q k^T is charged to the ledger (:func:`lazymar.cache.flops.attention_score_flops`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


def scoring_queries(new: Tensor, to_predict: Tensor, buffer_size: int) -> Tensor:
    """Positions (N, n_q) into buffer + seq of the scoring queries: the new and to-predict tokens, given by their
    positions (N, n_new) and (N, n_to_predict) in the sequence (disjoint; the result sorted per row)."""
    return torch.cat([new, to_predict], dim=1).sort(dim=1).values + buffer_size


def attention_received(q: Tensor, k: Tensor, positions: Tensor) -> Tensor:
    """Attention mass (N, total) each key position receives from the queries at ``positions`` (N, n_q), summed over
    heads and queries; q and k are (N, heads, total, head_dim)."""
    N, heads, _, head_dim = q.shape
    index = positions[:, None, :, None].expand(-1, heads, -1, head_dim)
    chosen = q.gather(2, index)                                      # (N, heads, n_q, head_dim)
    weights = torch.softmax(chosen @ k.transpose(-1, -2) * head_dim ** -0.5, dim=-1)  # (N, heads, n_q, total)
    return weights.sum(dim=(1, 2))


@contextlib.contextmanager
def capturing_queries(attention: nn.Module, into: dict) -> Iterator[None]:
    """While active, ``into["q"]`` is set to the queries (N, heads, total, head_dim) of each call of ``attention``
    (a model Attention: fused qkv Linear, timm layout), read from its qkv projection by a forward hook."""
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        B, n, three_dim = output.shape
        dim = three_dim // 3
        into["q"] = output[..., :dim].reshape(B, n, attention.num_heads, dim // attention.num_heads).transpose(1, 2)

    handle = attention.qkv.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
