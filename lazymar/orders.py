"""Generation orders: which positions a sampling loop decodes at which step (a sampler option,
``SamplingSettings.order``).

An order gives each sample a permutation of positions (the first ``mask_len`` stay masked after a step, so the
last ones are decoded first) and the number of positions still masked after each step. ``"mar"`` is MAR's: one
random permutation per sample and the cosine schedule (bit for bit the default sampler).

``"gtr:<k>"`` is GtR's two-stage order (Generation then Reconstruction, arXiv 2510.17171): a checkerboard half of
the token grid (the structure) is generated first, over all but the last ``k`` steps, with the cosine schedule
over those steps; the other half (the reconstruction of details between structure tokens, whose neighbours are
all known by then) follows in the last ``k`` steps, also on a cosine schedule. Within each stage the order is
random. Which checkerboard colour is the structure is drawn per sample (on even token counts, where both have the
same size). GtR's Frequency-Weighted Token Selection (more head steps for high-frequency tokens) is the separate
sampler option ``SamplingSettings.head_steps`` (lazymar.head_steps), which combines with any order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import Tensor

from .errors import SettingsError


def random_orders(batch_size: int, seq_len: int, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """One random generation order (a permutation of positions) per sample."""
    return torch.argsort(torch.rand(batch_size, seq_len, generator=generator, device=device), dim=1)


def mask_length(step: int, num_iter: int, seq_len: int, num_unknown: int) -> int:
    """Positions left unknown after ``step``: floor(L cos(pi/2 (s+1)/N)), clamped to [1, unknown - 1]."""
    target = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
    return max(1, min(num_unknown - 1, target))


class GenerationOrder(Protocol):
    def orders(self, batch_size: int, seq_len: int, generator: Optional[torch.Generator],
               device: torch.device) -> Tensor: ...

    def mask_length(self, step: int, num_iter: int, seq_len: int, num_unknown: int) -> int: ...


class MAROrder:
    """MAR's order: random permutations, cosine mask schedule."""

    def orders(self, batch_size: int, seq_len: int, generator: Optional[torch.Generator],
               device: torch.device) -> Tensor:
        return random_orders(batch_size, seq_len, generator, device)

    def mask_length(self, step: int, num_iter: int, seq_len: int, num_unknown: int) -> int:
        return mask_length(step, num_iter, seq_len, num_unknown)


def checkerboard(seq_len: int) -> Tensor:
    """(seq_len,) bool: the positions with (row + col) even on the square token grid."""
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise SettingsError(f"a checkerboard needs a square token grid; {seq_len} tokens is not one")
    rows, cols = torch.arange(seq_len) // side, torch.arange(seq_len) % side
    return (rows + cols) % 2 == 0


@dataclass(frozen=True)
class TwoStageOrder:
    """GtR: the structure (a checkerboard half) over the first steps, the rest in the last ``detail_steps``."""

    detail_steps: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.detail_steps, int) or self.detail_steps < 1:
            raise SettingsError(f"the detail stage needs >= 1 step, got {self.detail_steps!r}")

    def orders(self, batch_size: int, seq_len: int, generator: Optional[torch.Generator],
               device: torch.device) -> Tensor:
        board = checkerboard(seq_len).to(device)
        structure = board.expand(batch_size, -1).clone()
        if seq_len % 2 == 0:  # both colours have seq_len / 2 positions: draw the structure colour per sample
            flip = torch.rand(batch_size, 1, generator=generator, device=device) < 0.5
            structure ^= flip
        key = torch.rand(batch_size, seq_len, generator=generator, device=device) + structure.float()
        return torch.argsort(key, dim=1)  # detail positions (key < 1) first: they stay masked longest

    def mask_length(self, step: int, num_iter: int, seq_len: int, num_unknown: int) -> int:
        structure_steps = num_iter - self.detail_steps
        if structure_steps < 1:
            raise SettingsError(f"gtr:{self.detail_steps} needs more than {self.detail_steps} MAR steps, got {num_iter}")
        side = math.isqrt(seq_len)
        if side * side != seq_len:
            checkerboard(seq_len)  # raises the SettingsError
        n_structure = (seq_len + 1) // 2  # the (row + col) even positions of a side x side grid, counted on the host
        n_detail = seq_len - n_structure
        if step < structure_steps:
            target = n_detail + math.floor(n_structure * math.cos(math.pi / 2 * (step + 1) / structure_steps))
        else:
            target = math.floor(n_detail * math.cos(math.pi / 2 * (step - structure_steps + 1) / self.detail_steps))
        return max(1, min(num_unknown - 1, target))


def generation_order(spec: str) -> GenerationOrder:
    """The order named by ``spec``: "mar" or "gtr:<detail steps>"."""
    if spec == "mar":
        return MAROrder()
    name, _, arg = spec.partition(":")
    if name == "gtr":
        try:
            return TwoStageOrder(int(arg or 2))
        except ValueError:
            raise SettingsError(f"bad generation order {spec!r}: expected gtr:<detail steps>, e.g. gtr:2") from None
    raise SettingsError(f"unknown generation order {spec!r}; known: mar, gtr:<detail steps>")
