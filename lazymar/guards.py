"""Guards against non-finite numbers: in checkpoints (at load time) and in sampling (per step and layer).

:class:`FiniteGuard` is a step observer that :func:`lazymar.sampling.generate` always runs. While sampling it
only accumulates "is everything finite" flags on the device (no host round-trip per step); after the generation
it reads them once and, if any is false, raises :class:`~lazymar.errors.NonFiniteError` naming the first step and
the first layer (in execution order) whose output was not finite.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .errors import NonFiniteError


def first_non_finite(state: Mapping[str, Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor of ``state`` holding NaN or inf, or None."""
    for name, tensor in state.items():
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def watched_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs the guard checks, in execution order (embedding, blocks, norms)."""
    names = ["z_proj", *(f"encoder_blocks.{i}" for i in range(len(model.encoder_blocks))), "encoder_norm",
             "decoder_embed", *(f"decoder_blocks.{i}" for i in range(len(model.decoder_blocks))), "decoder_norm"]
    modules = dict(model.named_modules())
    return [(n, modules[n]) for n in names if n in modules]


HEAD = "the diffusion head"


class FiniteGuard:
    """Step observer: raises NonFiniteError after a generation whose features or tokens became non-finite."""

    _installed: dict[int, list] = {}  # model id -> hook handles (removed again by the next guard if left over)

    def __init__(self) -> None:
        self.names: list[str] = []
        self.flags: list[list[Tensor]] = []  # per step: one 0-d bool per watched output (in call order) + head
        self.order: list[list[int]] = []     # per step: the layer index of each flag

    def on_generation_start(self, model: nn.Module, settings, labels: Tensor) -> None:
        for handle in self._installed.pop(id(model), []):
            handle.remove()
        layers = watched_layers(model)
        self.names = [n for n, _ in layers] + [HEAD]
        self._installed[id(model)] = [module.register_forward_hook(self._hook(i)) for i, (_, module) in
                                      enumerate(layers)]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            if self.flags and isinstance(output, Tensor):
                self.flags[-1].append(torch.isfinite(output).all())
                self.order[-1].append(index)
        return hook

    def on_step_start(self, ctx) -> None:
        self.flags.append([])
        self.order.append([])

    def on_step_end(self, ctx) -> None:
        if ctx.sampled is not None:
            self.flags[-1].append(torch.isfinite(ctx.sampled).all())
            self.order[-1].append(len(self.names) - 1)

    def on_generation_end(self, model: nn.Module, tokens: Tensor) -> None:
        for handle in self._installed.pop(id(model), []):
            handle.remove()
        flat = [f for step in self.flags for f in step]
        if not flat or bool(torch.stack(flat).all()):  # the one host round-trip of the generation
            return
        for step, (flags, order) in enumerate(zip(self.flags, self.order)):
            values = torch.stack(flags).tolist() if flags else []
            for ok, index in zip(values, order):
                if not ok:
                    raise NonFiniteError(f"sampling produced non-finite values at step {step} in "
                                         f"{self.names[index]} (check the weights and the settings)")
