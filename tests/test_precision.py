"""Sampling precision (lazymar.precision): bf16/fp16 autocast, models cast to bfloat16, caches in the matching dtype,
and the --precision option of the sampling and measuring commands."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from lazymar.cache.engine import CacheEngine
from lazymar.cache.schedule_file import load_schedule
from lazymar.cli import build_parser, main
from lazymar.errors import SettingsError
from lazymar.precision import autocast, default_precision
from lazymar.sampling import SamplingSettings, StepContext, StepObserver, generate, observe_steps
from lazymar.vae import tokens_to_images
from builders import random_vae, tiny_mar, tiny_vae_config

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_ITER = 10  # the lazymar preset caches 3 of 10 steps (none of 6)
LABELS = list(range(10))
BF16_UNIT = 2.0 ** -8  # bfloat16 keeps 8 significant bits: a rounding changes a value by up to 2^-8 of it (relative)


def small_model(dtype: torch.dtype = torch.float32):
    """The tiny random MAR with its head's x0 clamped to [-1, 1] (as the digits models), so that tokens stay in
    range (an untrained head without the clamp samples tokens of size 1e5, which fp16 cannot hold)."""
    return tiny_mar(0, decoder_depth=3, diffloss_d=3, num_sampling_steps="10", clip_denoised=True).to(dtype)


def settings(precision: str = "fp32") -> SamplingSettings:
    return SamplingSettings(num_iter=NUM_ITER, cfg=3.0, precision=precision)


def lazymar_engine(model, **kwargs) -> CacheEngine:
    return CacheEngine(load_schedule("lazymar", NUM_ITER, model.config), **kwargs)


class CacheDtypes(StepObserver):
    """The dtypes of every tensor an engine's caches hold, after each step."""

    def __init__(self, engine: CacheEngine):
        self.engine, self.seen = engine, set()

    def on_step_end(self, ctx: StepContext) -> None:
        enc, dec = self.engine.encoder, self.engine.decoder
        held = enc.keys + enc.values + dec.keys + dec.values + [enc.embedded, dec.output, dec.previous_v,
                                                                 self.engine.condition.difference]
        self.seen |= {t.dtype for t in held if t is not None}


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "lazymar"])
def test_a_model_cast_to_bfloat16_samples_finite_tokens(cached):
    model = small_model(torch.bfloat16)
    engine = lazymar_engine(model) if cached else None
    observer = CacheDtypes(engine) if cached else StepObserver()
    with observe_steps(observer):
        tokens = generate(model, LABELS, settings(), seed=0, runner=engine)
    assert tokens.dtype == torch.bfloat16 and tokens.shape == (len(LABELS), model.seq_len, model.token_dim)
    assert bool(torch.isfinite(tokens).all()) and float(tokens.float().abs().max()) <= 1.0
    if cached:
        assert observer.seen == {torch.bfloat16}  # the caches follow the model's dtype
    # the tokens are those of the float32 model (same runner) up to bfloat16's rounding of weights, activations
    # and the tokens themselves
    exact = small_model()
    reference = generate(exact, LABELS, settings(), seed=0, runner=lazymar_engine(exact) if cached else None)
    assert rel_rms(tokens, reference) < 16 * BF16_UNIT


def test_a_cast_model_keeps_float32_timestep_frequencies():
    """t * freqs reaches 1000: rounded to bfloat16, the frequencies would shift the phases by up to 2 radians."""
    freqs = small_model(torch.bfloat16).diffloss.net.time_embed.freqs
    assert freqs.dtype == torch.float32
    assert torch.equal(freqs, small_model().diffloss.net.time_embed.freqs)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_bf16_autocast_gives_tokens_close_to_fp32():
    """Tolerance: every matrix product rounds its inputs to bf16 (relative error up to 2^-8); through a few blocks,
    the head's reverse steps and the MAR steps the tokens (RMS over all of them) stay within 8 such units; they
    are not equal (the products really ran in bf16)."""
    model = small_model()
    linear_dtypes = set()
    hook = model.decoder_blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: linear_dtypes.add(out.dtype))
    try:
        reference = generate(model, LABELS, settings(), seed=0)
        assert linear_dtypes == {torch.float32}
        tokens = generate(model, LABELS, settings("bf16"), seed=0)
    finally:
        hook.remove()
    assert linear_dtypes == {torch.float32, torch.bfloat16}
    assert tokens.dtype == torch.float32  # the model's dtype: the reverse process stays in float32
    assert 0 < rel_rms(tokens, reference) < 8 * BF16_UNIT


def test_fp32_precision_is_the_computation_as_written():
    model = small_model()
    assert settings().precision == SamplingSettings().precision == "fp32"
    assert torch.equal(generate(model, LABELS, settings(), seed=0), generate(model, LABELS, settings("fp32"), seed=0))
    assert isinstance(autocast("fp32", "cpu"), type(autocast("fp32", "cuda")))  # a null context on any device


@pytest.mark.parametrize("precision, expected", [("fp32", torch.float16), ("bf16", torch.bfloat16),
                                                 ("fp16", torch.float16)])
def test_caches_are_stored_in_the_precision_dtype(precision, expected):
    """fp32: the default half-size float16 storage (as before); bf16 / fp16: the autocast dtype."""
    model = small_model()
    engine = lazymar_engine(model)
    with observe_steps(CacheDtypes(engine)) as observer:
        tokens = generate(model, LABELS, settings(precision), seed=0, runner=engine)
    assert engine.cache_dtype == expected and observer.seen == {expected}
    assert bool(torch.isfinite(tokens).all())


def test_an_engine_given_a_cache_dtype_keeps_it_under_autocast():
    model = small_model()
    engine = lazymar_engine(model, cache_dtype=torch.float32)
    with observe_steps(CacheDtypes(engine)) as observer:
        generate(model, LABELS, settings("bf16"), seed=0, runner=engine)
    assert observer.seen == {torch.float32}


def test_bf16_autocast_with_the_lazymar_cache_stays_close_to_its_uncached_run():
    model = small_model()
    uncached = generate(model, LABELS, settings("bf16"), seed=0)
    cached = generate(model, LABELS, settings("bf16"), seed=0, runner=lazymar_engine(model))
    exact_cached = generate(model, LABELS, settings(), seed=0, runner=lazymar_engine(model))
    exact = generate(model, LABELS, settings(), seed=0)
    # caching changes the bf16 tokens as much as the fp32 ones, give or take a few bf16 roundings (the fidelity of
    # a schedule does not depend on the precision; `lazymar sweep --precision bf16` measures it on digits16)
    assert rel_rms(exact_cached, exact) > 8 * BF16_UNIT  # the schedule does change the tokens
    assert abs(rel_rms(cached, uncached) - rel_rms(exact_cached, exact)) < 4 * BF16_UNIT


def test_vae_decode_runs_under_the_precision():
    vae = random_vae(tiny_vae_config())
    model = tiny_mar(randomise="none", img_size=64)
    tokens = torch.randn(2, model.seq_len, model.token_dim)
    exact = tokens_to_images(model, tokens, vae)
    half = tokens_to_images(model, tokens, vae, precision="bf16")
    assert exact.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert 0 < rel_rms(half, exact) < 8 * BF16_UNIT


def test_bad_precision_is_a_settings_error():
    with pytest.raises(SettingsError, match="precision must be one of fp32, bf16, fp16"):
        SamplingSettings(precision="fp64")
    with pytest.raises(SettingsError):
        replace(settings(), precision="float16")


def test_default_precision_is_fp32_on_cpu_and_for_pixel_models():
    assert default_precision(small_model()) == "fp32"  # a VAE-latent model, on the CPU
    assert default_precision(small_model(), fallback="bf16") == "bf16"  # a checkpoint's stored precision


COMMANDS = {
    "sample": [], "eval": [], "bench": [], "record": ["--out", "x.zarr"], "sweep": [],
    "derive": ["--stats", "stats.nc"], "search-quality": ["--base", "lazymar", "--target-flops-ratio", "2"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_sampling_command_takes_precision(command):
    for precision in ("fp32", "bf16", "fp16"):
        args = build_parser().parse_args([command, *COMMANDS[command], "--precision", precision])
        assert args.precision == precision
    assert build_parser().parse_args([command, *COMMANDS[command]]).precision is None  # the model's default


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_precision_is_one_line(command, capsys):
    assert main([command, *COMMANDS[command], "--precision", "fp64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lazymar {command}: error: ") and "--precision" in err[0], err


def test_sample_runs_in_bf16(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--labels", "3", "--per-label", "2", "--num-iter", "2", "--precision", "bf16",
                 "--schedule", "lazymar", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16"
    assert out.exists()
