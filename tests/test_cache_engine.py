"""The cache engine against the plain sampler and against small independent reference computations."""
import types

import pytest
import torch

from lazymar.cache.engine import CacheEngine
from lazymar.cache.flops import FlopsLedger
from lazymar.cache.head import HeadCache
from lazymar.cache.schedule_file import HeadCachePolicy, ScheduleError, load_schedule, none_schedule
from lazymar.model import MAR
from lazymar.sampling import SamplingSettings, StepContext, StepObserver, current_step, generate, observe_steps
from builders import tiny_model  # other test modules import it from here too

NUM_ITER = 6
LABELS = [3, 7]


@pytest.fixture(scope="module")
def model() -> MAR:
    return tiny_model()


class Capture(StepObserver):
    """Keeps each step's inputs and z."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, ctx: StepContext) -> None:
        self.steps.append(types.SimpleNamespace(
            step=ctx.step, z=ctx.z.clone(), tokens=ctx.tokens.clone(), labels=ctx.labels, known=ctx.known,
            new=ctx.new, to_predict=ctx.to_predict, unknown=ctx.unknown, use_cfg=ctx.use_cfg))


def run(model, schedule=None, cfg=3.0, num_iter=NUM_ITER, labels=LABELS, seed=0, cache_dtype=torch.float32):
    """Tokens, captured steps and engine; float32 caches by default (the reference computations are float32)."""
    settings = SamplingSettings(num_iter=num_iter, cfg=cfg)
    runner = CacheEngine(schedule, cache_dtype) if schedule is not None else None
    with observe_steps(Capture()) as capture:
        tokens = generate(model, labels, settings, seed=seed, runner=runner)
    return tokens, capture.steps, runner


def cached_steps(refresh_at=(0,), num_iter=NUM_ITER, **changes):
    """A schedule that refreshes at ``refresh_at`` and caches (by default: reusing nothing) elsewhere."""
    refresh = [s in refresh_at for s in range(num_iter)]
    return none_schedule(num_iter).with_changes(**{"refresh": refresh, "encoder": "full", **changes})


def network_inputs(model, st, both=True):
    B = st.tokens.shape[0]
    emb = model.class_embedding(st.labels, B)
    if not both:
        return st.tokens, st.unknown.float(), emb
    return (torch.cat([st.tokens, st.tokens]), torch.cat([st.unknown, st.unknown]).float(),
            torch.cat([emb, model.class_embedding(None, B)]))


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- exactness against the plain sampler ----------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_none_schedule_is_the_plain_sampler_bit_for_bit(model, cfg):
    plain, _, _ = run(model, cfg=cfg)
    engine = CacheEngine(load_schedule("none", NUM_ITER, model.config))
    cached_anything = []

    class Caches(StepObserver):
        def on_step_end(self, ctx):
            cached_anything.append(not all(m.empty for m in (engine.encoder, engine.decoder, engine.condition)))

    with observe_steps(Caches()):
        cached = generate(model, LABELS, SamplingSettings(num_iter=NUM_ITER, cfg=cfg), seed=0, runner=engine)
    assert torch.equal(plain, cached)
    assert cached_anything == [False] * NUM_ITER  # nothing was cached at any step


def test_a_schedule_that_reuses_nothing_equals_the_plain_sampler(model):
    plain, plain_steps, _ = run(model)
    schedule = cached_steps(head_cache=[True] * NUM_ITER, head=HeadCachePolicy(hoist_invariants=True))
    cached, steps, engine = run(model, schedule)
    assert engine.decoder.empty and engine.encoder.empty  # released after the last step
    for a, b in zip(steps, plain_steps):
        assert (a.z - b.z).abs().max() < 1e-5
    assert relative_error(cached, plain) < 1e-5


def test_caching_changes_the_result_and_stays_finite(model):
    plain, _, _ = run(model)
    cached, _, engine = run(model, load_schedule("lazymar", NUM_ITER, model.config))
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    assert engine.cache_rows == len(LABELS)  # every cached step runs the cond half only: only it is cached


def test_half_precision_caches_round_only_the_reused_values(model):
    """The default float16 caches hold half the bytes and change z only by rounding the reused values."""
    schedule = cached_steps(refresh_at=(0, 3), encoder="new-tokens", keep_fraction=[0.5] * NUM_ITER,
                            selection="random", selection_layer=0,  # (similarity: near-ties may flip)
                            condition_cache=[s not in (0, 3) for s in range(NUM_ITER)])
    _, exact_steps, _ = run(model, schedule)
    engine = CacheEngine(schedule)
    assert engine.cache_dtype == torch.float16
    seen = []

    class CacheDtypes(StepObserver):
        def on_step_end(self, ctx: StepContext) -> None:
            enc, dec = engine.encoder, engine.decoder
            held = enc.keys + enc.values + dec.keys + dec.values + [enc.embedded, dec.output]
            seen.extend(t.dtype for t in held + [engine.condition.difference] if t is not None)
    with observe_steps(Capture()) as capture, observe_steps(CacheDtypes()):
        generate(model, LABELS, SamplingSettings(num_iter=NUM_ITER, cfg=3.0), seed=0, runner=engine)
    assert seen and set(seen) == {torch.float16}
    first_cached = next(s for s in range(NUM_ITER) if not schedule.step_plan(s, True).refresh)
    for half, exact in zip(capture.steps, exact_steps):
        if half.step < first_cached:  # refresh steps before any reuse: bit for bit
            assert torch.equal(half.z, exact.z)
        elif half.step == first_cached:  # same inputs, rounded caches
            assert 0 < (half.z - exact.z).abs().max() < 1e-2 * exact.z.abs().max()


# --- the mechanisms against independent reference computations ------------------------------------------------
@pytest.mark.parametrize("encoder", ["incremental", "new-tokens"])
def test_incremental_encoder_reuses_frozen_kv_of_older_tokens(model, encoder):
    """"incremental" reruns the buffer and the new tokens; "new-tokens" only the new tokens (the buffer's K/V and
    outputs stay those of the last refresh)."""
    schedule = cached_steps(refresh_at=(0, 3), encoder=encoder)
    _, steps, _ = run(model, schedule)
    buf, enc_blocks = model.buffer_size, model.encoder_blocks
    k_cache, v_cache, out_cache = {}, {}, None
    for st in steps:
        tokens, mask, emb = network_inputs(model, st)
        N = tokens.shape[0]
        visible = ~model.with_buffer(mask.bool())
        x_all = model.embed_encoder_input(tokens, emb)
        if st.step in (0, 3):
            rows = visible
        else:
            new = torch.cat([st.new, st.new])
            rows = model.with_buffer(new)
            rows[:, :buf] = encoder == "incremental"
        x = x_all[rows].reshape(N, -1, x_all.shape[-1])
        for layer, block in enumerate(enc_blocks):
            def hook(k, v, layer=layer):
                kc = k_cache.setdefault(layer, k.new_zeros(N, k.shape[1], visible.shape[1], k.shape[3]))
                vc = v_cache.setdefault(layer, v.new_zeros(N, k.shape[1], visible.shape[1], k.shape[3]))
                for r in range(N):
                    kc[r][:, rows[r]] = k[r]
                    vc[r][:, rows[r]] = v[r]
                keys = torch.stack([kc[r][:, visible[r]] for r in range(N)])
                values = torch.stack([vc[r][:, visible[r]] for r in range(N)])
                return keys, values
            x = block(x, hook)
        x = model.encoder_norm(x)
        if out_cache is None:
            out_cache = x.new_zeros(N, visible.shape[1], x.shape[-1])
        out_cache[rows] = x.reshape(-1, x.shape[-1])
        encoded = out_cache[visible].reshape(N, -1, x.shape[-1])
        z_ref = model.forward_mae_decoder(encoded, mask)
        assert (st.z - z_ref).abs().max() < 1e-5, f"step {st.step}"


@pytest.mark.parametrize("rule", ["status", "random"])
def test_decoder_token_cache_runs_kept_positions_over_cached_kv(model, rule):
    schedule = cached_steps(refresh_at=(0, 3), keep_fraction=[0.3] * NUM_ITER, selection=rule, selection_layer=0)
    engine_selections = []

    class Kept(StepObserver):
        def on_step_end(self, ctx):
            engine_selections.append(ctx.decoder_rows)

    with observe_steps(Kept()):
        _, steps, _ = run(model, schedule)
    blocks, sel = model.decoder_blocks, 0
    k_cache, v_cache, last = {}, {}, None
    for st, kept_rows in zip(steps, engine_selections):
        tokens, mask, emb = network_inputs(model, st)
        N = tokens.shape[0]
        x = model.scatter_decoder_input(model.forward_mae_encoder(tokens, mask, emb), mask)
        for layer in range(sel + 1):
            x = blocks[layer](x)
        if st.step in (0, 3):
            for layer in range(sel + 1, len(blocks)):
                def store(k, v, layer=layer):
                    k_cache[layer], v_cache[layer] = k.clone(), v.clone()
                    return k, v
                x = blocks[layer](x, store)
            last = x.clone()
        else:
            always = model.with_buffer(torch.cat([st.to_predict | st.new] * 2))
            if rule == "status":
                assert torch.equal(kept_rows, always.nonzero(as_tuple=True)[1].reshape(N, -1))
            else:
                n_keep = schedule.kept_count(st.step, always.shape[1], int(always[0].sum()))
                assert kept_rows.shape == (N, n_keep)
                assert all(set(always[r].nonzero().flatten().tolist()) <= set(kept_rows[r].tolist()) for r in range(N))
            for r in range(N):  # one row at a time, positional caches
                rows = kept_rows[r]
                h = x[r:r + 1, rows]
                for layer in range(sel + 1, len(blocks)):
                    def splice(k, v, layer=layer, r=r, rows=rows):
                        k_cache[layer][r][:, rows] = k[0]
                        v_cache[layer][r][:, rows] = v[0]
                        return k_cache[layer][r:r + 1], v_cache[layer][r:r + 1]
                    h = blocks[layer](h, splice)
                last[r, rows] = h[0]
            x = last.clone()
        z_ref = model.decoder_output(x)
        assert (st.z - z_ref).abs().max() < 1e-5, f"step {st.step}"


def test_similarity_selection_keeps_the_least_similar_positions(model):
    schedule = cached_steps(keep_fraction=[0.5] * NUM_ITER, keep_min_extra=0.0)
    engine = CacheEngine(schedule)
    engine.start(model, SamplingSettings(num_iter=NUM_ITER, cfg=1.0), batch_size=1)
    total, H, hd = model.buffer_size + model.seq_len, 4, 16
    v_prev = torch.randn(1, H, total, hd)
    change = torch.rand(total)  # position p changes by change[p]
    v_now = v_prev + change[None, None, :, None] * torch.randn(1, H, total, hd) * 3
    engine.decoder.previous_v = v_prev
    to_predict = torch.zeros(1, model.seq_len, dtype=torch.bool)
    to_predict[0, 5] = True
    ctx = types.SimpleNamespace(step=1, batch_size=1, to_predict=to_predict, new=torch.zeros_like(to_predict),
                                num_to_predict=1, num_new=0)
    kept = engine.decoder.select(ctx, v_now)[0]
    cos = torch.nn.functional.cosine_similarity(v_now, v_prev, dim=-1).mean(dim=1)[0]
    cos[model.buffer_size + 5] = -2.0  # always kept
    expected = torch.sort(torch.argsort(cos)[: total // 2]).values
    assert torch.equal(kept, expected)


def test_condition_cache_reuses_the_cond_uncond_difference_of_the_last_block(model):
    schedule = cached_steps(refresh_at=(0, 3), condition_cache=[s not in (0, 3) for s in range(NUM_ITER)])
    _, steps, _ = run(model, schedule)
    outputs = []
    handle = model.decoder_blocks[-1].register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        for st in steps:
            B = st.tokens.shape[0]
            if st.step in (0, 3):
                model.forward_transformer(*network_inputs(model, st))
                diff = outputs[-1][B:] - outputs[-1][:B]
                z_ref = model.decoder_output(outputs[-1])
            else:
                model.forward_transformer(*network_inputs(model, st, both=False))
                cond = outputs[-1]
                z_ref = model.decoder_output(torch.cat([cond, cond + diff]))
            assert (st.z - z_ref).abs().max() < 1e-5, f"step {st.step}"
    finally:
        handle.remove()


@pytest.mark.parametrize("reuse_mlp", [True, False])
def test_head_cache_by_hand(model, reuse_mlp):
    policy = HeadCachePolicy(refresh_every=3, cfg_cache=True, reuse_blocks=(1,), reuse_mlp=reuse_mlp,
                             mlp_fresh_above=1.0)
    head = HeadCache(model, policy, FlopsLedger())
    net, tmap, D = model.diffloss.net, model.diffloss.gen_diffusion.timestep_map, model.token_dim
    n, s = 3, 2.5
    z = torch.randn(2 * n, model.config.decoder_embed_dim)
    head.begin(True, s, z)
    capturing = head.capturing_mlps()
    capturing.__enter__()
    denoise = head.denoise
    x9, x7 = torch.randn(n, D), torch.randn(n, D)
    index = lambda i, rows=2 * n: torch.full((rows,), i, dtype=torch.long)  # noqa: E731

    out9 = denoise(torch.cat([x9, x9]), index(9), z)  # the first head step: full
    assert (out9 - net.forward_with_cfg(torch.cat([x9, x9]), tmap[index(9)], z, s)).abs().max() < 1e-6

    # what the full step leaves behind, by hand
    h, y = net.input_proj(torch.cat([x9, x9])), net.time_embed(tmap[index(9)]) + net.cond_embed(z)
    mlp_out, delta = {}, {}
    for b, block in enumerate(net.res_blocks):
        shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
        mlp_out[b] = block.mlp(block.in_ln(h) * (1 + scale) + shift)
        delta[b] = gate * mlp_out[b]
        h = h + delta[b]
    eps9 = net.final_layer(h, y)[:, :D]
    diff = eps9[:n] - eps9[n:]

    out7 = denoise(torch.cat([x7, x7]), index(7), z)  # 7 % 3 != 0: cached, cond half only
    h, y = net.input_proj(x7), net.time_embed(tmap[index(7, n)]) + net.cond_embed(z[:n])
    for b, block in enumerate(net.res_blocks):
        if b == 1:
            h = h + delta[1][:n]
            continue
        shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
        m = mlp_out[b][:n] if reuse_mlp else block.mlp(block.in_ln(h) * (1 + scale) + shift)
        h = h + gate * m
    out = net.final_layer(h, y)
    cond, rest = out[:, :D], out[:, D:]
    uncond = cond - diff
    guided = uncond + s * (cond - uncond)
    expected = torch.cat([torch.cat([guided, guided]), torch.cat([rest, rest])], dim=1)
    assert (out7 - expected).abs().max() < 1e-6

    out6 = denoise(torch.cat([x7, x7]), index(6), z)  # 6 % 3 == 0: full again
    assert (out6 - net.forward_with_cfg(torch.cat([x7, x7]), tmap[index(6)], z, s)).abs().max() < 1e-6
    capturing.__exit__(None, None, None)
    assert not any(block.mlp._forward_hooks for block in net.res_blocks)
    assert not head.empty
    head.reset()
    assert head.empty


# --- the contract with the recorder ---------------------------------------------------------------------------
def test_row_subsets_are_announced_before_each_block(model):
    schedule = load_schedule("lazymar", NUM_ITER, model.config).with_changes(
        keep_fraction=[0.3] * NUM_ITER, refresh=[True, True, False, False, True, False],
        condition_cache=[False, False, True, False, False, True])
    seen = []

    def check(kind):
        def hook(module, inputs, output):
            ctx = current_step()
            x = inputs[0]
            B, buf = ctx.batch_size, model.buffer_size
            assert x.shape[0] == len(ctx.branches) * B and ctx.phase == "transformer"
            rows = ctx.encoder_rows if kind == "encoder" else ctx.decoder_rows
            if rows is None:
                default = buf + int((~ctx.unknown[0]).sum()) if kind == "encoder" else buf + model.seq_len
                assert x.shape[1] == default
            else:
                assert rows.shape == x.shape[:2] and rows.dtype == torch.long
                if kind == "encoder":  # the buffer and the tokens decoded at the previous step
                    new = ctx.new[0].nonzero().flatten() + buf
                    assert torch.equal(rows[0], torch.cat([torch.arange(buf), new]))
            seen.append((ctx.step, kind, rows is None, ctx.branches))
        return hook

    handles = [b.register_forward_hook(check("encoder")) for b in model.encoder_blocks]
    handles += [b.register_forward_hook(check("decoder")) for b in model.decoder_blocks]
    try:
        run(model, schedule)
    finally:
        for h in handles:
            h.remove()
    assert (2, "encoder", False, ("cond",)) in seen and (2, "decoder", False, ("cond",)) in seen
    assert (3, "encoder", True, ("cond", "uncond")) in seen  # the uncond branch missed step 2: full encoder
    assert (3, "decoder", False, ("cond", "uncond")) in seen
    assert (0, "decoder", True, ("cond", "uncond")) in seen


def test_engine_rejects_schedules_that_do_not_fit(model):
    engine = CacheEngine(load_schedule("lazymar", 8))
    with pytest.raises(ScheduleError, match="has 8 steps but sampling uses 6"):
        generate(model, LABELS, SamplingSettings(num_iter=6, cfg=2.0), runner=engine)
    engine = CacheEngine(cached_steps(selection_layer=3))
    with pytest.raises(ScheduleError, match="selection_layer 3 out of range: the decoder has 3 blocks"):
        generate(model, LABELS, SamplingSettings(num_iter=NUM_ITER, cfg=2.0), runner=engine)
