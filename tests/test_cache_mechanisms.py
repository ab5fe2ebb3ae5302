"""Each cache mechanism on its own: when it reuses nothing it reproduces the uncached computation, and ``reset``
empties it; and steps that predict no token run under every mechanism."""
import types

import pytest
import torch

from lazymar.cache.condition import ConditionCache
from lazymar.cache.decoder import DecoderTokenCache
from lazymar.cache.encoder import EncoderCache
from lazymar.cache.engine import CacheEngine
from lazymar.cache.engine import estimate_generation_flops
from lazymar.cache.flops import FlopsLedger, step_counts
from lazymar.cache.head import HeadCache
from lazymar.cache.schedule_file import HeadCachePolicy, load_schedule, none_schedule
from lazymar.model import MAR
from lazymar.sampling import SamplingSettings, StepObserver, generate, observe_steps
from builders import tiny_mar, tiny_model
from test_cache_engine import LABELS, NUM_ITER, relative_error


@pytest.fixture(scope="module")
def model() -> MAR:
    return tiny_model()


@pytest.fixture(scope="module")
def contexts(model):
    """The step contexts of a plain generation with CFG."""
    seen = []

    class Keep(StepObserver):
        def on_step_start(self, ctx):
            seen.append(ctx)

    with observe_steps(Keep()):
        generate(model, LABELS, SamplingSettings(num_iter=NUM_ITER, cfg=3.0), seed=0)
    return seen


def ledger() -> FlopsLedger:
    out = FlopsLedger()
    out.begin_step()
    return out


def plain_decoder_input(model, ctx):
    tokens, mask, emb = ctx.network_inputs()
    return model.scatter_decoder_input(model.forward_mae_encoder(tokens, mask, emb), mask)


def test_encoder_cache(model, contexts):
    """A full pass is the model's encoder bit for bit; the incremental pass at step 1 runs the buffer and every
    visible token (nothing older is cached yet), so it reuses nothing and equals the full encoder."""
    first, second = contexts[0], contexts[1]
    B, buf = len(LABELS), model.buffer_size
    cache = EncoderCache(model, 2 * B, ledger(), torch.float32)
    assert cache.empty
    tokens, mask, emb = first.network_inputs()
    assert torch.equal(cache.full(first, tokens, mask, emb, store=True), plain_decoder_input(model, first))
    assert not cache.empty and cache.length == 0
    plan = none_schedule(NUM_ITER).with_changes(refresh=[s == 0 for s in range(NUM_ITER)]).step_plan(1)
    assert plan.incremental_encoder
    tokens, mask, emb = second.network_inputs()
    out = cache.incremental(second, plan, tokens, emb)
    new = second.new[0].nonzero().flatten() + buf
    assert torch.equal(second.encoder_rows[0], torch.cat([torch.arange(buf), new]))
    assert relative_error(out, plain_decoder_input(model, second)) < 1e-6
    assert cache.length == len(new)
    cache.reset()
    assert cache.empty and cache.length == 0


def test_decoder_token_cache(model, contexts):
    """Keeping every position after the selection layer reuses nothing: the plain decoder."""
    schedule = none_schedule(NUM_ITER).with_changes(refresh=[s == 0 for s in range(NUM_ITER)], selection_layer=0)
    B, total = len(LABELS), model.buffer_size + model.seq_len
    cache = DecoderTokenCache(model, schedule, 2 * B, ledger(), torch.float32)
    assert cache.empty
    for step in (0, 1, 2):
        ctx, plan = contexts[step], schedule.step_plan(step)
        x = plain_decoder_input(model, ctx)
        out = cache.run(ctx, plan, x, store=True)
        if step == 0:
            assert torch.equal(out, model.run_decoder(x)) and ctx.decoder_rows is None
        else:
            assert plan.token_cache and torch.equal(ctx.decoder_rows, torch.arange(total).expand(2 * B, -1))
            assert relative_error(out, model.run_decoder(x)) < 1e-6
    assert not cache.empty
    cache.reset()
    assert cache.empty


def test_condition_cache(contexts):
    """The difference cached at a step completes that step's cond half into both branches."""
    cache = ConditionCache(torch.float32)
    both = torch.randn(4, 7, 5)
    with pytest.raises(RuntimeError, match="before any step ran both branches"):
        cache.complete(both[:2])
    cache.store(both)
    assert not cache.empty
    assert (cache.complete(both[:2]) - both).abs().max() < 1e-6
    cache.reset()
    assert cache.empty
    ctx = contexts[2]
    for cond, both_halves in zip(cache.cond_inputs(ctx), ctx.network_inputs()):
        assert torch.equal(cond, both_halves[: len(LABELS)])


@pytest.mark.parametrize("cfg", [2.5, None])
def test_head_cache_that_refreshes_every_step_is_the_plain_head(model, cfg):
    policy = HeadCachePolicy(refresh_every=1, cfg_cache=True, reuse_blocks=(1,), reuse_mlp=True)
    ctx = types.SimpleNamespace(use_cfg=cfg is not None, cfg_scale=cfg or 1.0)
    z = torch.randn(6 if cfg else 3, model.config.decoder_embed_dim)
    plain = model.diffloss.sample(z, 1.0, cfg, torch.Generator().manual_seed(1))
    cache = HeadCache(model, policy, ledger())
    assert torch.equal(cache.sample(ctx, z, 1.0, torch.Generator().manual_seed(1)), plain)
    assert cache.empty  # released after the MAR step
    hoisted = HeadCache(model, HeadCachePolicy(hoist_invariants=True), ledger())
    assert relative_error(hoisted.sample(ctx, z, 1.0, torch.Generator().manual_seed(1)), plain) < 1e-5
    nothing = FlopsLedger()
    empty = HeadCache(model, HeadCachePolicy(hoist_invariants=True), nothing).sample(ctx, z[:0], 1.0, None)
    assert empty.shape == (0, model.token_dim) and nothing.total == 0


def test_every_mechanism_runs_when_each_step_decodes_one_token():
    """4 tokens over 4 steps, the most steps a 4-token model allows (one token per step; more steps would decode
    nothing and are refused by generate)."""
    from lazymar.errors import SettingsError
    model = tiny_mar(img_size=32, num_sampling_steps="10")  # the zero-initialised weights made random: z matters
    steps = model.seq_len
    assert all(c.to_predict == 1 for c in step_counts(model.seq_len, steps))
    with pytest.raises(SettingsError, match="exceeds the model's 4 tokens"):
        generate(model, LABELS, SamplingSettings(num_iter=steps + 1, cfg=2.0), seed=0)
    settings = SamplingSettings(num_iter=steps, cfg=2.0)
    plain = generate(model, LABELS, settings, seed=0)
    reuse_nothing = none_schedule(steps).with_changes(
        head_cache=[True] * steps, head=HeadCachePolicy(hoist_invariants=True), selection_layer=0,
        refresh=[s == 0 for s in range(steps)], encoder="full")
    for schedule in (load_schedule("lazymar", steps, model.config), reuse_nothing):
        engine = CacheEngine(schedule, torch.float32)
        tokens = generate(model, LABELS, settings, seed=0, runner=engine)
        assert torch.isfinite(tokens).all()
        assert engine.flops.steps == estimate_generation_flops(model.config, schedule, len(LABELS)).steps
        if schedule is reuse_nothing:
            assert relative_error(tokens, plain) < 1e-5
