"""No host round-trip inside the step loop: between the start of the first step and the end of the last one,
``generate`` (plain, under the cache engine's presets, a derived schedule, and GtR's order with frequency-weighted
head steps) reads nothing back from its tensors.

On a GPU every such read (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``.cpu()``, ``nonzero``, a boolean
index) waits for the device. Here, without one, an observer arms a guard at the first step and disarms it after
the last: a torch dispatch mode that rejects the ATen operations behind those reads (``_local_scalar_dense``,
``nonzero``, indexing with boolean masks, ``masked_select``) and patched ``Tensor.tolist/numpy/cpu``. On a machine
with a GPU, torch's sync debug mode is armed over the same window as well.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lazymar.cache.engine import CacheEngine
from lazymar.cache.schedule_file import load_schedule, read_schedule_file
from lazymar.checkpoint import load_model
from lazymar.sampling import SamplingSettings, StepObserver, generate, observe_steps

DATA = Path(__file__).resolve().parents[1] / "data"
aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default: "a scalar read (.item(), bool(t), int(t), float(t))",
           aten.nonzero.default: "nonzero", aten.masked_select.default: "masked_select",
           aten.is_nonzero.default: "bool(t)"}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostSync(AssertionError):
    pass


class NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING:
            raise HostSync(f"host round-trip inside the step loop: {SYNCING[func]}")
        if func in INDEXING:
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or []):
                raise HostSync("host round-trip inside the step loop: indexing with a boolean mask")
        return func(*args, **(kwargs or {}))


class StepLoopGuard(StepObserver):
    """Armed from the first step's start to the last step's end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.monkeypatch, self.mode, self.steps = monkeypatch, None, 0

    def on_step_start(self, ctx) -> None:
        if ctx.step == 0:
            self.mode = NoHostReads()
            self.mode.__enter__()
            for name in ("tolist", "numpy", "cpu"):
                self.monkeypatch.setattr(torch.Tensor, name, self._refuse(name))
        self.steps += 1

    def on_step_end(self, ctx) -> None:
        if ctx.step == ctx.num_iter - 1:
            self.disarm()

    def disarm(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
            self.monkeypatch.undo()

    @staticmethod
    def _refuse(name):
        def refuse(*args, **kwargs):
            raise HostSync(f"host round-trip inside the step loop: Tensor.{name}()")
        return refuse


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


def guarded_generate(model, settings, runner, monkeypatch):
    guard = StepLoopGuard(monkeypatch)
    try:
        with observe_steps(guard):
            tokens = generate(model, [1, 4, 7], settings, seed=3, runner=runner)
    finally:
        guard.disarm()
    assert guard.steps == settings.num_iter and guard.mode is None
    return tokens


def test_the_guard_catches_host_reads(digits, monkeypatch):
    """The guard is not vacuous: each kind of read inside a step fails."""
    settings = SamplingSettings(num_iter=2, cfg=2.0)
    reads = [lambda z: z.sum().item(), lambda z: bool(z.sum() > 0), lambda z: int(z.argmax()), lambda z: z.tolist(),
             lambda z: z.cpu(), lambda z: z.nonzero(), lambda z: z[z > 0], lambda z: torch.nonzero(z)]
    for read in reads:
        class Reader(StepObserver):
            def on_step_end(self, ctx):
                if ctx.step == 1:
                    read(ctx.z)
        with observe_steps(Reader()), pytest.raises(HostSync):
            guarded_generate(digits, settings, None, monkeypatch)


CASES = [("plain", 1.0), ("plain", 3.0), ("none", 3.0), ("lazymar", 1.0), ("lazymar", 3.0),
         ("lazymar-released", 3.0), ("lazymar-new-tokens", 3.0), ("digits_3.5x.json", 3.0)]


@pytest.mark.parametrize("schedule,cfg", CASES)
def test_no_host_reads_between_the_first_and_last_step(digits, monkeypatch, schedule, cfg):
    settings = SamplingSettings(num_iter=6, cfg=cfg)
    if schedule == "plain":
        runner_of = lambda: None  # noqa: E731
    else:
        spec = str(DATA / "schedules" / schedule) if schedule.endswith(".json") else schedule
        if spec.endswith(".json"):
            settings = SamplingSettings(num_iter=read_schedule_file(spec).num_iter, cfg=cfg)
        runner_of = lambda: CacheEngine(load_schedule(spec, settings.num_iter, digits.config))  # noqa: E731
    expected = generate(digits, [1, 4, 7], settings, seed=3, runner=runner_of())
    assert torch.equal(guarded_generate(digits, settings, runner_of(), monkeypatch), expected)


@pytest.mark.parametrize("rule", ["random", "attention"])
def test_no_host_reads_with_other_selection_rules_and_gtr(digits, monkeypatch, rule):
    from dataclasses import replace
    settings = SamplingSettings(num_iter=6, cfg=3.0, order="gtr:2", head_steps="fts:0.5:5")
    schedule = replace(load_schedule("lazymar", settings.num_iter, digits.config), selection=rule)
    expected = generate(digits, [1, 4, 7], settings, seed=3, runner=CacheEngine(schedule))
    assert torch.equal(guarded_generate(digits, settings, CacheEngine(schedule), monkeypatch), expected)


class CudaSyncGuard(StepObserver):
    """On a GPU: torch's own sync debug mode, set to raise between the first step's start and the last step's end."""

    def on_step_start(self, ctx) -> None:
        if ctx.step == 0:
            torch.cuda.set_sync_debug_mode("error")

    def on_step_end(self, ctx) -> None:
        if ctx.step == ctx.num_iter - 1:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("schedule", ["plain", "lazymar"])
def test_no_synchronising_cuda_call_in_the_step_loop(digits, schedule):
    model = load_model("digits", device="cuda")
    settings = SamplingSettings(num_iter=6, cfg=3.0)
    runner_of = (lambda: None) if schedule == "plain" else \
        (lambda: CacheEngine(load_schedule(schedule, settings.num_iter, model.config)))  # noqa: E731
    generator = lambda: torch.Generator("cuda").manual_seed(3)  # noqa: E731
    expected = generate(model, [1, 4, 7], settings, seed=generator(), runner=runner_of())  # warm: tables on the GPU
    try:
        with observe_steps(CudaSyncGuard()):
            tokens = generate(model, [1, 4, 7], settings, seed=generator(), runner=runner_of())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(tokens, expected)
