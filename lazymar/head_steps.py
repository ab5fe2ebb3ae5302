"""Head step allocation: how many reverse steps the diffusion head runs for each token (a sampler option,
``SamplingSettings.head_steps``).

``"uniform"`` (the default) runs the model's ``num_sampling_steps`` for every token: bit for bit the default
sampler.

``"fts:<fraction>:<reduced steps>"`` is GtR's Frequency-Weighted Token Selection (arXiv 2510.17171): the head's
budget goes to the tokens on image detail, found by their high-frequency energy. The stored descriptions of the
paper (abstract and summaries: "more computation budget to tokens on image details, localized based on the energy
of high frequency information", "extra diffusion steps for high-frequency detail tokens") do not give the exact
score or split, so this is the reading implemented:

- Score. A token's own value is unknown until the head samples it, so its high-frequency energy is measured from
  the tokens decoded before the step around it: the mean squared deviation of its known 4-neighbours from their
  mean (summed over channels), i.e. the local variation that a smooth interpolation of the neighbours cannot
  explain. A position with fewer than two known neighbours scores 0. In GtR's detail stage every detail token
  has its four neighbours in the structure already, so the score is fully measured exactly where GtR spends it.
- Split. At every MAR step, per sample, the ``floor(fraction * n + 1/2)`` of its ``n`` to-predict tokens with the
  highest score (ties: the lower position) run the model's full head steps; the others run ``reduced steps``, the
  same cosine schedule respaced to that many steps (ADM respacing, as the official code respaces
  ``num_sampling_steps``). The count per sample is fixed, so FLOPs follow from the token counts alone.

With CFG the cond and uncond rows of a token run the same steps (they share their noise). The two groups are
sampled one after the other (full, then reduced), each in the rows' own order, so ``fts:1:<k>`` equals
``"uniform"`` bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SettingsError

HEAD_STEPS_SPECS = "uniform, fts:<fraction>:<reduced steps>"
# sample(rows of z, head steps or None for the model's) -> sampled tokens of those rows (both CFG halves)
HeadSampler = Callable[[Tensor, Optional[int]], Tensor]


def neighbour_energy(tokens: Tensor, known: Tensor) -> Tensor:
    """(B, L) high-frequency energy at every position of the square token grid: the mean squared deviation of the
    known 4-neighbours' tokens from their mean, summed over channels; 0 with fewer than two known neighbours.
    ``tokens`` (B, L, D), ``known`` (B, L) bool."""
    B, L, D = tokens.shape
    side = math.isqrt(L)
    if side * side != L:
        raise SettingsError(f"frequency-weighted head steps need a square token grid; {L} tokens is not one")
    mask = known.reshape(B, side, side, 1).to(tokens.dtype)
    grid = F.pad(tokens.reshape(B, side, side, D) * mask, (0, 0, 1, 1, 1, 1))
    mask = F.pad(mask, (0, 0, 1, 1, 1, 1))
    shifts = ((0, 1), (2, 1), (1, 0), (1, 2))  # above, below, left, right
    values = torch.stack([grid[:, r:r + side, c:c + side] for r, c in shifts], dim=1)  # (B, 4, side, side, D)
    present = torch.stack([mask[:, r:r + side, c:c + side] for r, c in shifts], dim=1)
    count = present.sum(dim=1).clamp(min=1)
    mean = values.sum(dim=1) / count
    energy = (((values - mean[:, None]) ** 2) * present).sum(dim=(1, 4)) / count[..., 0]
    return torch.where(present.sum(dim=(1, 4)) >= 2, energy, torch.zeros_like(energy)).reshape(B, L)


@dataclass(frozen=True)
class FrequencyWeightedSteps:
    """GtR's FTS: the top ``fraction`` of each step's tokens by high-frequency energy run the full head steps, the
    others ``reduced_steps``."""

    fraction: float
    reduced_steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0.0 <= self.fraction <= 1.0):
            raise SettingsError(f"the fraction of full-step tokens must lie in [0, 1], got {self.fraction!r}")
        if not isinstance(self.reduced_steps, int) or self.reduced_steps < 1:
            raise SettingsError(f"the reduced head steps must be an integer >= 1, got {self.reduced_steps!r}")

    @property
    def spec(self) -> str:
        return f"fts:{self.fraction:g}:{self.reduced_steps}"

    def check_for(self, full_steps: int) -> None:
        """The reduced steps must be fewer than the model's ``full_steps``."""
        if self.reduced_steps >= full_steps:
            raise SettingsError(f"head steps {self.spec}: the reduced steps must be fewer than the model's "
                                f"{full_steps} head steps")

    def full_count(self, tokens: int) -> int:
        """How many of a sample's ``tokens`` to-predict tokens run the full head steps."""
        return math.floor(self.fraction * tokens + 0.5)

    def full_tokens(self, tokens: Tensor, known: Tensor, positions: Tensor) -> Tensor:
        """(B, n) bool: which to-predict ``positions`` (B, n) run the full head steps, from the ``known`` tokens."""
        score = neighbour_energy(tokens, known).gather(1, positions)
        ranked = torch.sort(score, dim=1, descending=True, stable=True).indices
        full = torch.zeros_like(positions, dtype=torch.bool)
        return full.scatter_(1, ranked[:, :self.full_count(positions.shape[1])], True)


class HeadSteps(str):
    """A head-steps setting parsed once: the spec text (what settings store, print and compare) with its
    ``allocation``, None for "uniform" or the :class:`FrequencyWeightedSteps` it names. ``HeadSteps(spec)`` raises
    SettingsError on a bad spec and returns a HeadSteps unchanged. JSON writes it as its text."""

    allocation: Optional[FrequencyWeightedSteps]

    def __new__(cls, spec: "str | HeadSteps") -> "HeadSteps":
        if isinstance(spec, HeadSteps):
            return spec
        if not isinstance(spec, str):
            raise SettingsError(f"head steps must be a text spec ({HEAD_STEPS_SPECS}), got {spec!r}")
        value = super().__new__(cls, spec)
        value.allocation = head_step_allocation(spec)
        return value

    def __reduce__(self):  # copies and pickles parse the spec again (SamplingSettings.to_dict stores plain text)
        return HeadSteps, (str(self),)

    def check_for(self, full_steps: int) -> None:
        """The allocation must fit a head of ``full_steps`` steps (FTS: fewer reduced steps)."""
        if self.allocation is not None:
            self.allocation.check_for(full_steps)


def head_step_allocation(spec: str) -> Optional[FrequencyWeightedSteps]:
    """The allocation named by ``spec``: None for "uniform" (every token the model's steps), or
    "fts:<fraction>:<reduced steps>"."""
    if isinstance(spec, HeadSteps):
        return spec.allocation
    if spec == "uniform":
        return None
    name, _, args = spec.partition(":")
    if name != "fts":
        raise SettingsError(f"unknown head steps {spec!r}; known: {HEAD_STEPS_SPECS}")
    fraction, _, reduced = args.partition(":")
    try:
        return FrequencyWeightedSteps(float(fraction), int(reduced))
    except ValueError as err:
        if isinstance(err, SettingsError):
            raise SettingsError(f"bad head steps {spec!r}: {err}") from None
        raise SettingsError(f"bad head steps {spec!r}: expected fts:<fraction>:<reduced steps>, "
                            f"e.g. fts:0.5:25") from None

