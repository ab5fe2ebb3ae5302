"""The recorder's statistics, computed for many layers (or head steps) in one batched op.

Hooks only stash features; these functions turn one sampling step's stash into statistics at the step's end, so
the per-step cost is a few ops per group of same-shaped layers instead of a few ops per layer (and per head
step). Every statistic is computed row by row over the last dim, exactly as a per-layer loop would.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def unit(x: Tensor) -> Tensor:
    """x over its norm along the last dim (clamped at 1e-8), as ``F.cosine_similarity`` normalises: a step's unit
    vectors serve its cosines with the previous step and with the next, so each is computed once."""
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-8)


def relative_change(now: Tensor, before: Tensor) -> Tensor:
    """||now - before|| / ||before|| per row (over the last dim)."""
    return torch.linalg.vector_norm(now - before, dim=-1) / torch.linalg.vector_norm(before, dim=-1)


def token_cosines(units: Tensor, valid: Tensor, previous_units: Tensor, previous_valid: Tensor, B: int) -> Tensor:
    """Cosines of layers' cond rows with the previous step's, averaged over groups (heads), NaN where a position
    is missing at either step: units (L, B, P, K, G, d), valid (L, R, P) -> (B, L, K, P). Equals
    ``F.cosine_similarity(h, h_previous, dim=-1).mean(-1)`` bit for bit."""
    both = valid[:, :B] & previous_valid[:, :B]
    cos = (units * previous_units).sum(-1).mean(-1)                                  # (L, B, P, K)
    return torch.where(both.unsqueeze(-1), cos, float("nan")).permute(1, 0, 3, 2)


def cfg_statistics(features: Tensor, valid: Tensor, previous: Tensor, previous_valid: Tensor, B: int) -> Tensor:
    """The CFG statistics (CFG_STATS order) of layers' outputs [cond; uncond] against the previous step's:
    features (L, 2B, P, ...), valid (L, 2B, P) -> (B, L, 4, P), NaN where a row is missing."""
    h, ph = features.flatten(3), previous.flatten(3)                                  # (L, 2B, P, C)
    cond, uncond, pcond, puncond = h[:, :B], h[:, B:], ph[:, :B], ph[:, B:]
    residual, previous_residual = cond - uncond, pcond - puncond
    stats = torch.stack([
        F.cosine_similarity(residual, previous_residual, dim=-1),
        relative_change(residual, previous_residual),
        relative_change(cond, pcond),
        relative_change(uncond, puncond),
    ], dim=2)                                                                         # (L, B, 4, P)
    ok = valid[:, :B] & previous_valid[:, :B] & valid[:, B:] & previous_valid[:, B:]
    return torch.where(ok.unsqueeze(2), stats, float("nan")).transpose(0, 1)


class LayerFeatures:
    """Same-shaped layers at one step, scattered to all positions and stacked along L: ``units`` (L, B, P, K, G, d)
    the cond rows' unit vectors (for the token cosines), ``features`` (L, 2B, P, K, G, d) the raw [cond; uncond]
    outputs (for the CFG statistics; None for K/V or without an uncond branch), ``valid`` (L, R, P)."""

    __slots__ = ("step", "layers", "units", "features", "valid")

    def __init__(self, step: int, layers: tuple[int, ...], units: Tensor, features: Optional[Tensor],
                 valid: Tensor):
        self.step, self.layers, self.units, self.features, self.valid = step, layers, units, features, valid

    def rows(self, index: list[int]) -> "LayerFeatures":
        """The layers at ``index`` (their cond rows only unless all keep both branches)."""
        features = self.features[index] if self.features is not None else None
        return LayerFeatures(self.step, tuple(self.layers[i] for i in index), self.units[index], features,
                         self.valid[index])


class HeadStep:
    """What the hooks stash for one head network evaluation: references, no compute. ``blocks[k]`` is res-block
    k's (input, output); ``output`` the final layer's output."""

    __slots__ = ("index", "blocks", "output")

    def __init__(self, index: int):
        self.index, self.blocks, self.output = index, {}, None


class HeadChanges:
    """Relative changes between consecutive head steps of one MAR step, computed in chunks of stashed steps.

    The carry (the last step's eps CFG difference and residual updates) links chunks, so chunking only bounds
    memory and never changes a value. Writes into ``head`` (head_steps, 1 + K, n)."""

    def __init__(self, head: Tensor, num_tokens: int, token_dim: int, num_blocks: int):
        self.head, self.n, self.D, self.K = head, num_tokens, token_dim, num_blocks
        self.carry: Optional[tuple[int, Optional[Tensor], dict[int, Tensor]]] = None

    def add(self, steps: list[HeadStep]) -> None:
        """The statistics of ``steps`` (consecutive stashed head steps, in order)."""
        if not steps:
            return
        n, D, K = self.n, self.D, self.K
        doubled = [s.output is not None and s.output.shape[0] == 2 * n for s in steps]
        complete = [len(s.blocks) == K for s in steps]
        eps = deltas = None
        if all(doubled):
            outputs = torch.stack([s.output for s in steps])
            eps = outputs[:, :n, :D] - outputs[:, n:2 * n, :D]                            # (m, n, D)
        if all(complete) and K:
            chained = all(s.blocks[k][0] is s.blocks[k - 1][1] for s in steps for k in range(1, K))
            if chained:  # block k's input is block k-1's output: K + 1 tensors per head step
                x = torch.stack([t[:n] for s in steps for t in (s.blocks[0][0], *(s.blocks[k][1] for k in range(K)))])
                x = x.unflatten(0, (len(steps), K + 1))                                 # (m, K + 1, n, w)
                deltas = x[:, 1:] - x[:, :-1]                                             # (m, K, n, w)
            else:
                inputs = torch.stack([s.blocks[k][0][:n] for s in steps for k in range(K)])
                outputs = torch.stack([s.blocks[k][1][:n] for s in steps for k in range(K)])
                deltas = (outputs - inputs).unflatten(0, (len(steps), K))               # (m, K, n, w)
        carry, first = self.carry, steps[0].index
        linked = carry is not None and carry[0] == first - 1
        consecutive = all(b.index == a.index + 1 for a, b in zip(steps, steps[1:]))
        if consecutive and (eps is not None or not any(doubled)) and deltas is not None and \
                (not linked or (len(carry[2]) == K and (carry[1] is not None) == (eps is not None))):
            self._batched(first, eps, deltas, carry if linked else None)
        else:
            self._one_by_one(steps, eps, deltas)
        last = steps[-1]
        self.carry = (last.index, None if eps is None else eps[-1],
                      {k: deltas[-1, k] for k in range(K)} if deltas is not None else
                      {k: o[:n] - i[:n] for k, (i, o) in last.blocks.items()})

    def _batched(self, first: int, eps: Optional[Tensor], deltas: Tensor, carry) -> None:
        m = deltas.shape[0]
        if carry is not None:  # prepend the previous chunk's last step
            deltas = torch.cat([torch.stack([carry[2][k] for k in range(self.K)])[None], deltas])
            eps = None if eps is None else torch.cat([carry[1][None], eps])
        start = first if carry is not None else first + 1
        rows = slice(start, first + m)
        if eps is not None:
            self.head[rows, 0] = relative_change(eps[1:], eps[:-1])
        self.head[rows, 1:] = relative_change(deltas[1:], deltas[:-1])

    def _one_by_one(self, steps: list[HeadStep], eps: Optional[Tensor], deltas: Optional[Tensor]) -> None:
        """The general case (some res blocks or the uncond half missing at some head steps)."""
        n, D, K = self.n, self.D, self.K
        previous = self.carry
        for j, s in enumerate(steps):
            e = (eps[j] if eps is not None else s.output[:n, :D] - s.output[n:2 * n, :D]
                 if s.output is not None and s.output.shape[0] == 2 * n else None)
            d = ({k: deltas[j, k] for k in range(K)} if deltas is not None else
                 {k: o[:n] - i[:n] for k, (i, o) in s.blocks.items()})
            if previous is not None and previous[0] == s.index - 1:
                if e is not None and previous[1] is not None:
                    self.head[s.index, 0] = relative_change(e, previous[1])
                for k in d.keys() & previous[2].keys():
                    self.head[s.index, 1 + k] = relative_change(d[k], previous[2][k])
            previous = (s.index, e, d)
