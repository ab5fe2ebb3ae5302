"""The sampling loop: reproducible seeds, MAR's mask and CFG schedules, statuses that partition positions."""
import math

import pytest
import torch

from lazymar import MAR, SamplingSettings, StepObserver, generate, observe_steps
from lazymar.orders import mask_length
from lazymar.sampling import current_step
from builders import tiny_mar


@pytest.fixture(scope="module")
def tiny() -> MAR:
    return tiny_mar(img_size=64, num_sampling_steps="5", randomise="none")  # 4x4 grid, 16 tokens


class StepLog(StepObserver):
    def __init__(self):
        self.steps = []

    def on_step_end(self, ctx):
        self.steps.append({k: getattr(ctx, k).clone() for k in ("known", "new", "to_predict", "masked")}
                          | {"cfg_scale": ctx.cfg_scale, "z_rows": ctx.z.shape[0], "step": ctx.step})


def test_same_seed_same_tokens(tiny):
    settings = SamplingSettings(num_iter=6, cfg=2.0)
    a = generate(tiny, [1, 2, 3], settings, seed=7)
    b = generate(tiny, [1, 2, 3], settings, seed=7)
    c = generate(tiny, [1, 2, 3], settings, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (3, tiny.seq_len, tiny.token_dim)


@pytest.mark.parametrize("num_iter", [1, 4, 16])
def test_statuses_partition_and_every_position_decoded_once(tiny, num_iter):
    log = StepLog()
    with observe_steps(log):
        generate(tiny, [0, 5], SamplingSettings(num_iter=num_iter, cfg=1.5), seed=0)
    assert len(log.steps) == num_iter
    decoded = torch.zeros(2, tiny.seq_len, dtype=torch.long)
    previous_to_predict = torch.zeros(2, tiny.seq_len, dtype=torch.bool)
    for s in log.steps:
        total = s["known"].long() + s["new"].long() + s["to_predict"].long() + s["masked"].long()
        assert torch.equal(total, torch.ones_like(total))
        assert torch.equal(s["new"], previous_to_predict)
        assert (s["to_predict"].sum(1) >= 1).all()
        decoded += s["to_predict"].long()
        previous_to_predict = s["to_predict"]
    assert torch.equal(decoded, torch.ones_like(decoded))
    assert not log.steps[-1]["masked"].any()


def test_mask_schedule_and_linear_cfg_follow_mar(tiny):
    num_iter, cfg, L = 5, 3.0, tiny.seq_len
    log = StepLog()
    with observe_steps(log):
        generate(tiny, [4], SamplingSettings(num_iter=num_iter, cfg=cfg), seed=1)
    unknown = L
    for s in log.steps[:-1]:
        expected = max(1, min(unknown - 1, math.floor(L * math.cos(math.pi / 2 * (s["step"] + 1) / num_iter))))
        assert int(s["masked"].sum()) == expected
        assert s["cfg_scale"] == pytest.approx(1 + (cfg - 1) * (L - expected) / L)
        assert s["z_rows"] == 2  # [cond; uncond]
        unknown = expected


def test_no_cfg_runs_single_branch(tiny):
    log = StepLog()
    with observe_steps(log):
        generate(tiny, [4, 3], SamplingSettings(num_iter=3, cfg=1.0), seed=1)
    assert all(s["z_rows"] == 2 for s in log.steps)  # batch of 2 samples, not doubled


def test_current_step_visible_to_module_hooks_only_during_sampling(tiny):
    seen = []
    handle = tiny.decoder_blocks[0].register_forward_hook(lambda m, i, o: seen.append(current_step().step))
    try:
        generate(tiny, [1], SamplingSettings(num_iter=3, cfg=2.0), seed=0)
    finally:
        handle.remove()
    assert seen == [0, 1, 2]
    assert current_step() is None


def test_mask_length_clamps():
    assert mask_length(0, 64, 256, 256) == math.floor(256 * math.cos(math.pi / 2 / 64))
    assert mask_length(62, 64, 256, 3) == 2  # floor(256 cos(pi/2 63/64)) = 6, clamped to unknown - 1
    assert mask_length(62, 64, 256, 1) == 1  # never below 1
    assert mask_length(5, 8, 16, 2) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"num_iter": 0}, "num_iter"), ({"cfg_schedule": "cosine"}, "cfg_schedule"), ({"temperature": 0}, "temperature"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingSettings(**kwargs)


def test_label_out_of_range(tiny):
    with pytest.raises(ValueError, match="out of range"):
        generate(tiny, [10], SamplingSettings(num_iter=2))


class PositionLog(StepObserver):
    """What the loop hands runners without a host round-trip, beside what the masks say."""

    def __init__(self):
        self.checks = []

    def on_step_end(self, ctx):
        expected = {name: getattr(ctx, name).nonzero()[:, 1].reshape(ctx.batch_size, -1)
                    for name in ("new", "to_predict")}
        self.checks.append((
            torch.equal(ctx.new_positions, expected["new"]),
            torch.equal(ctx.to_predict_positions, expected["to_predict"]),
            (ctx.num_known, ctx.num_new, ctx.num_to_predict, ctx.num_masked)
            == tuple(int(getattr(ctx, name)[0].sum()) for name in ("known", "new", "to_predict", "masked")),
        ))


@pytest.mark.parametrize("num_iter", [1, 5])
def test_step_context_positions_and_counts_match_the_masks(tiny, num_iter):
    log = PositionLog()
    with observe_steps(log):
        generate(tiny, [0, 5, 9], SamplingSettings(num_iter=num_iter, cfg=2.0), seed=3)
    assert len(log.checks) == num_iter
    assert all(all(check) for check in log.checks), log.checks


def test_rows_at_equals_boolean_indexing():
    from lazymar.sampling import rows_at
    x = torch.randn(4, 10, 3)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    for row, cols in enumerate(([1, 7], [0, 9], [3, 4], [2, 8])):
        mask[row, cols] = True
    positions = mask.nonzero()[:, 1].reshape(4, -1)
    assert torch.equal(rows_at(x, positions), x[mask])
