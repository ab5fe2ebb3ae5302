"""The recorder's statistics, computed for many layers (or head steps) in one batched op.

Hooks only stash features; these functions turn one sampling step's stash into statistics at the step's end, so
the per-step cost is a few ops per group of same-shaped layers instead of a few ops per layer (and per head
step). Every statistic is computed row by row over the last dim, exactly as a per-layer loop would.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dataset import RecordingError


def unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """(x over its norm along the last dim clamped at 1e-8, as ``F.cosine_similarity`` normalises; the norm): a
    step's unit vectors and norms serve its statistics against the previous step and the next's against it, so
    each is computed once."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min(1e-8), norm.squeeze(-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Sum of products over the last dim: the cosine of unit vectors."""
    return (a * b).sum(-1)


def features_at_positions(feats: Tensor, rows: Optional[Tensor], branches: tuple[str, ...],
                          keep: tuple[str, ...], B: int, P: int) -> tuple[Tensor, Tensor]:
    """Layers' network rows (L, NB, n, ...) -> (L, len(keep) * B, P, ...) features at their positions,
    [cond; uncond], and validity (len(keep) * B, P)."""
    if rows is None and branches[: len(keep)] == keep:
        full = feats[:, : len(keep) * B]
        return full, torch.ones(full.shape[1:3], dtype=torch.bool, device=feats.device)
    if rows is not None and rows.shape != feats.shape[1:3]:
        raise RecordingError(f"row positions of shape {tuple(rows.shape)} do not match features "
                             f"{tuple(feats.shape[1:3])}")
    full = feats.new_zeros((feats.shape[0], len(keep) * B, P) + feats.shape[3:])
    valid = torch.zeros(len(keep) * B, P, dtype=torch.bool, device=feats.device)
    samples = torch.arange(B, device=feats.device).unsqueeze(1)
    for j, branch in enumerate(branches):
        if branch not in keep:
            continue
        src, dst = slice(j * B, (j + 1) * B), slice(keep.index(branch) * B, (keep.index(branch) + 1) * B)
        if rows is None:
            full[:, dst], valid[dst] = feats[:, src], True
        else:
            full[:, dst][:, samples, rows[src]] = feats[:, src]
            valid[dst][samples, rows[src]] = True
    return full, valid


class LayerFeatures:
    """Same-shaped layers at one step, scattered to all positions and stacked along L, with what the statistics
    against the neighbouring steps need: ``units`` (L, B, P, K, G, d) the cond rows' unit vectors (token cosines);
    for outputs with both branches also ``features`` (L, 2B, P, C) the raw [cond; uncond], the unit CFG residual
    cond - uncond and the norms of cond, uncond and the residual (L, B, P) (CFG statistics). ``valid`` (L, R, P).
    Memory per layer: B (K/V: 2 kinds x B) rows of units, plus 4B rows for outputs with CFG."""

    __slots__ = ("step", "layers", "units", "features", "valid", "residual_units", "norms", "cond_norms")

    def __init__(self, step: int, layers: tuple[int, ...], full: Optional[Tensor], valid: Tensor, B: int,
                 with_cfg: bool):
        self.step, self.layers, self.valid = step, layers, valid
        self.features = self.residual_units = self.norms = None
        if full is None:  # filled by rows()
            return
        self.units, cond_norm = unit(full[:, :B])
        self.cond_norms = cond_norm                                                     # (L, B, P, K, G)
        if with_cfg:
            self.features = h = full.flatten(3)                                         # (L, 2B, P, C)
            residual_units, residual_norm = unit(h[:, :B] - h[:, B:])
            self.residual_units = residual_units
            self.norms = torch.stack([residual_norm, cond_norm.flatten(2),
                                      torch.linalg.vector_norm(h[:, B:], dim=-1)])        # (3, L, B, P)

    def rows(self, index: list[int]) -> "LayerFeatures":
        """The layers at ``index``."""
        part = LayerFeatures(self.step, tuple(self.layers[i] for i in index), None, self.valid[index], 0, False)
        part.units, part.cond_norms = self.units[index], self.cond_norms[index]
        if self.features is not None:
            part.features, part.residual_units = self.features[index], self.residual_units[index]
            part.norms = self.norms[:, index]
        return part


def token_cosines(now: LayerFeatures, before: LayerFeatures, B: int) -> Tensor:
    """Cosines of layers' cond rows with the previous step's, averaged over groups (heads), NaN where a position
    is missing at either step -> (B, L, K, P). Equals ``F.cosine_similarity(h, h_previous, dim=-1).mean(-1)``
    bit for bit."""
    both = now.valid[:, :B] & before.valid[:, :B]
    cos = _dot(now.units, before.units)                                                # (L, B, P, K, G)
    cos = cos.squeeze(-1) if cos.shape[-1] == 1 else cos.mean(-1)                       # a mean of one is exact
    return torch.where(both.unsqueeze(-1), cos, float("nan")).permute(1, 0, 3, 2)


def cfg_statistics(now: LayerFeatures, before: LayerFeatures, B: int) -> Tensor:
    """The CFG statistics (CFG_STATS order) of layers' outputs [cond; uncond] against the previous step's ->
    (B, L, 4, P), NaN where a row is missing. ||before|| comes from the previous step's norms."""
    h, ph = now.features, before.features
    residual_change = torch.linalg.vector_norm((h[:, :B] - h[:, B:]) - (ph[:, :B] - ph[:, B:]), dim=-1)
    stats = torch.stack([
        _dot(now.residual_units, before.residual_units),
        residual_change / before.norms[0],
        torch.linalg.vector_norm(h[:, :B] - ph[:, :B], dim=-1) / before.norms[1],
        torch.linalg.vector_norm(h[:, B:] - ph[:, B:], dim=-1) / before.norms[2],
    ], dim=2)                                                                          # (L, B, 4, P)
    v, pv = now.valid, before.valid
    ok = v[:, :B] & pv[:, :B] & v[:, B:] & pv[:, B:]
    return torch.where(ok.unsqueeze(2), stats, float("nan")).transpose(0, 1)


def relative_change(now: Tensor, before: Tensor) -> Tensor:
    """||now - before|| / ||before|| per row (over the last dim)."""
    return torch.linalg.vector_norm(now - before, dim=-1) / torch.linalg.vector_norm(before, dim=-1)


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
