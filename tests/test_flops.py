"""FLOPs accounting: hand computations, the engine's ledger against torch's FlopCounterMode, and the analytic
prediction from token counts against the ledger."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lazymar.cache import flops as F
from lazymar.cache.engine import CacheEngine, estimate_generation_flops
from lazymar.cache.schedule_file import HeadCachePolicy, load_schedule, none_schedule
from lazymar.config import get_config
from lazymar.model import MAR
from lazymar.sampling import SamplingSettings, StepObserver, generate, observe_steps
from builders import tiny_mar

NUM_ITER = 5


@pytest.fixture(scope="module")
def model() -> MAR:
    return tiny_mar(decoder_depth=3, diffloss_d=3, num_sampling_steps="6", randomise="none")


def test_formulas_by_hand():
    assert F.linear_flops(3, 4, 5) == 120
    assert F.attention_flops(2, 4, 10, 12, 8) == 2 * (2 * 4 * 10 * 12 * 8) * 2
    # dim 8, 2 heads, mlp 32; 3 query rows over 5 keys, batch 1
    qkv, attn, proj, mlp = 2 * 3 * 8 * 24, 4 * 2 * 3 * 5 * 4, 2 * 3 * 8 * 8, 2 * (2 * 3 * 8 * 32)
    assert F.block_flops(1, 3, 5, 8, 2, 32) == qkv + attn + proj + mlp
    cfg = get_config("mar_tiny")  # head width 96, token 16, z 64, 2 res-blocks
    w, d, z = 96, 16, 64
    full = 2 * (d * w + 256 * w + w * w + z * w + 2 * (3 * w * w + 2 * w * w) + 2 * w * w + w * 2 * d)
    assert F.head_net_flops(cfg, 1) == full
    assert F.head_net_flops(cfg, 1, skipped_blocks=1, mlp_skipped_blocks=1, time_rows=0, cond_rows=0) == (
        full - 2 * (256 * w + w * w + z * w + 3 * w * w + 2 * (2 * w * w)))


def test_step_counts_follow_the_mask_schedule(model):
    counts = F.step_counts(model.seq_len, 8)
    seen = []

    class Counts(StepObserver):
        def on_step_start(self, ctx):
            seen.append((int(ctx.known[0].sum()), int(ctx.new[0].sum()), int(ctx.to_predict[0].sum())))

    with observe_steps(Counts()):
        generate(model, [1, 2], SamplingSettings(num_iter=8, cfg=1.0))
    assert [(c.known, c.new, c.to_predict) for c in counts] == seen
    assert sum(c.to_predict for c in counts) == model.seq_len


class MeasuredFlops(StepObserver):
    """FlopCounterMode over a generation, attributed per step: encoder = z_proj + encoder blocks, decoder =
    decoder_embed + decoder blocks, head = everything else (the head's layers)."""

    def __init__(self, model, counter):
        self.counter, self.steps, self.handles = counter, [], []
        units = [("encoder", model.z_proj), *[("encoder", b) for b in model.encoder_blocks],
                 ("decoder", model.decoder_embed), *[("decoder", b) for b in model.decoder_blocks]]
        for component, module in units:
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._post(component)))

    def _pre(self, module, inputs):
        self._before = self.counter.get_total_flops()

    def _post(self, component):
        def hook(module, inputs, output):
            self.steps[-1][component] += self.counter.get_total_flops() - self._before
        return hook

    def on_step_start(self, ctx):
        self._step_start = self.counter.get_total_flops()
        self.steps.append({"encoder": 0, "decoder": 0, "head": 0})

    def on_step_end(self, ctx):
        step = self.steps[-1]
        step["head"] = self.counter.get_total_flops() - self._step_start - step["encoder"] - step["decoder"]

    def remove(self):
        for h in self.handles:
            h.remove()


def flop_counter() -> FlopCounterMode:
    """torch's counter, with the CPU attention kernel counted as its two batched products like the others."""
    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa})


SCHEDULES = {
    "none": lambda cfg: none_schedule(NUM_ITER),
    "lazymar": lambda cfg: load_schedule("lazymar", NUM_ITER, cfg),
    "lazymar-released": lambda cfg: load_schedule("lazymar-released", NUM_ITER, cfg),
    "mixed": lambda cfg: none_schedule(NUM_ITER).with_changes(
        refresh=[True, False, False, True, False], condition_cache=[False, True, False, False, True],
        keep_fraction=[1.0, 0.3, 0.5, 1.0, 0.2], selection="random", keep_min_extra=0.1, selection_layer=1,
        always_keep=("to_predict", "buffer"), head_cache=[True, True, False, True, True],
        head=HeadCachePolicy(refresh_every=2, reuse_blocks=(0, 2), reuse_mlp=True, mlp_fresh_above=0.7)),
    "new-tokens": lambda cfg: load_schedule("lazymar", NUM_ITER, cfg).with_changes(encoder="new-tokens"),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("cfg", [2.0, 1.0])
def test_ledger_matches_flop_counter_and_prediction(model, name, cfg):
    schedule = SCHEDULES[name](model.config)
    engine = CacheEngine(schedule)
    with flop_counter() as counter:
        measured = MeasuredFlops(model, counter)
        try:
            with observe_steps(measured):
                generate(model, [1, 2, 3], SamplingSettings(num_iter=NUM_ITER, cfg=cfg), runner=engine)
        finally:
            measured.remove()
    assert engine.flops.steps == measured.steps
    assert engine.flops.total == counter.get_total_flops()
    predicted = estimate_generation_flops(model.config, schedule, batch_size=3, use_cfg=cfg != 1.0)
    assert predicted.steps == engine.flops.steps
    if name != "none":
        plain = estimate_generation_flops(model.config, none_schedule(NUM_ITER), batch_size=3, use_cfg=cfg != 1.0)
        assert predicted.total < plain.total


def test_floor_by_hand():
    cfg = get_config("mar_tiny")  # seq 64, buffer 16, width 64, 2 + 2 blocks of 4 heads, token 16, head 10 steps
    total, N = 80, 2
    block = F.block_flops(N, total, total, 64, 4, 256)
    expected = (F.linear_flops(N * 64, 16, 64) + 2 * block + F.linear_flops(N * total, 64, 64) + 2 * block
                + 10 * F.head_net_flops(cfg, N * 64))
    assert F.floor_flops(cfg)["total"] == expected


def test_ledger_merge_and_totals():
    a, b = F.FlopsLedger(), F.FlopsLedger()
    a.begin_step(), a.add("encoder", 3), a.add("head", 1)
    b.begin_step(), b.add("decoder", 2), b.begin_step(), b.add("head", 5)
    merged = a.merge(b)
    assert merged.totals() == {"encoder": 3, "decoder": 2, "head": 6, "total": 11}
    assert len(merged.steps) == 2
    with pytest.raises(ValueError, match="unknown FLOPs component 'vae'"):
        a.add("vae", 1)


def test_head_sampling_flops_by_hand():
    cfg = get_config("mar_tiny")  # 10 head steps
    assert F.head_sampling_flops(cfg, 0) == 0
    assert F.head_sampling_flops(cfg, 0, policy=HeadCachePolicy(hoist_invariants=True)) == 0
    assert F.head_sampling_flops(cfg, 3) == 10 * F.head_net_flops(cfg, 6)
    assert F.head_sampling_flops(cfg, 3, use_cfg=False) == 10 * F.head_net_flops(cfg, 3)
    policy = HeadCachePolicy(refresh_every=3, cfg_cache=True, reuse_blocks=(1,), reuse_mlp=True, hoist_invariants=True)
    per_token = F.head_sampling_flops(cfg, 1, policy=policy, shared=False)
    assert F.head_sampling_flops(cfg, 4, policy=policy, shared=False) == 4 * per_token
    # what a hoisting policy computes once for all rows of the MAR step: cond embedding once, time once per step
    shared = F.head_cond_flops(cfg, 8) + 10 * F.head_time_flops(cfg, 1)
    assert F.head_sampling_flops(cfg, 4, policy=policy) == 4 * per_token + shared
    # full head steps 9, 6, 3, 0 on both halves; the others on the cond half, block 1 reused, block 0 from its MLP
    full = F.head_net_flops(cfg, 2, time_rows=0, cond_rows=0)
    cached = (F.head_input_flops(cfg, 1) + F.head_res_block_flops(cfg, 1, mlp=False) + F.head_final_flops(cfg, 1))
    assert per_token == 4 * full + 6 * cached
