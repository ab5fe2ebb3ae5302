"""Peer methods in the harness: MARché's attention-score selection rule and GtR's two-stage generation order."""
import types
from dataclasses import replace

import pandas as pd
import pytest
import torch

from lazymar import peers
from lazymar.cache.attention_selection import attention_received, scoring_queries
from lazymar.cache.engine import CacheEngine
from lazymar.cache.engine import estimate_generation_flops
from lazymar.cache.flops import step_counts
from lazymar.cache.schedule_file import CacheSchedule, ScheduleError, none_schedule
from lazymar.config import SamplingSettings, get_config
from lazymar.model import MAR
from lazymar.orders import TwoStageOrder, checkerboard, generation_order, mask_length, random_orders
from lazymar.sampling import StepObserver, generate, observe_steps
from test_cache_engine import NUM_ITER, tiny_model



@pytest.fixture(scope="module")
def model() -> MAR:
    return tiny_model()


def attention_schedule(num_iter=NUM_ITER, keep=0.3, layer=0) -> CacheSchedule:
    refresh = [s in (0, 3) for s in range(num_iter)]
    return none_schedule(num_iter).with_changes(refresh=refresh, keep_fraction=[keep] * num_iter,
                                                selection="attention", selection_layer=layer)


# --- MARché ----------------------------------------------------------------------------------------------------
def test_attention_received_by_hand():
    q, k = torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3)
    positions = torch.tensor([[1, 4]])
    expected = torch.zeros(5)
    for h in range(2):
        for i in (1, 4):
            expected += torch.softmax(torch.stack([q[0, h, i] @ k[0, h, j] for j in range(5)]) / 3 ** 0.5, 0)
    assert torch.allclose(attention_received(q, k, positions)[0], expected, atol=1e-6)


def test_scoring_queries_are_the_new_and_to_predict_positions_after_the_buffer():
    new = torch.tensor([[0], [2]])  # positions in the sequence (no host round-trip to find them from masks)
    to_predict = torch.tensor([[3], [0]])
    assert scoring_queries(new, to_predict, buffer_size=2).tolist() == [[2, 5], [2, 4]]


def test_attention_selection_keeps_the_most_attended_positions(model):
    engine = CacheEngine(attention_schedule(keep=0.5))
    engine.start(model, SamplingSettings(num_iter=NUM_ITER, cfg=1.0), batch_size=1)
    total, H, hd = model.buffer_size + model.seq_len, 4, 16
    q, k = torch.randn(1, H, total, hd), torch.randn(1, H, total, hd)
    new = torch.zeros(1, model.seq_len, dtype=torch.bool)
    to_predict = torch.zeros_like(new)
    new[0, 3], to_predict[0, 9] = True, True
    engine.decoder._q = {"q": q, "k": k}
    ctx = types.SimpleNamespace(step=1, batch_size=1, to_predict=to_predict, new=new, num_to_predict=1, num_new=1,
                                new_positions=torch.tensor([[3]]), to_predict_positions=torch.tensor([[9]]))
    kept = engine.decoder.select(ctx, torch.zeros(1, H, total, hd))[0]
    buf = model.buffer_size
    score = attention_received(q, k, torch.tensor([[buf + 3, buf + 9]]))[0]
    score[[buf + 3, buf + 9]] = float("inf")  # always kept
    assert torch.equal(kept, torch.sort(torch.argsort(score, descending=True)[: total // 2]).values)
    hd_flops = 2 * 1 * H * 2 * total * hd
    assert engine.flops.totals()["decoder"] == hd_flops  # the q k^T of the two scoring queries, charged


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_attention_rule_runs_and_the_ledger_matches_the_analytic_model(model, cfg):
    schedule = attention_schedule(layer=1).with_changes(condition_cache=[s not in (0, 3) for s in range(NUM_ITER)])
    engine = CacheEngine(schedule)
    tokens = generate(model, [1, 2], SamplingSettings(num_iter=NUM_ITER, cfg=cfg), seed=0, runner=engine)
    assert torch.isfinite(tokens).all()
    assert engine.flops.total == estimate_generation_flops(model.config, schedule, 2, use_cfg=cfg != 1.0).total
    plain = estimate_generation_flops(model.config, schedule.with_changes(selection="random"), 2, cfg != 1.0)
    assert engine.flops.total > plain.total  # the scores are not free


def test_unknown_selection_rule_is_refused():
    with pytest.raises(ScheduleError, match="unknown selection rule"):
        none_schedule(4).with_changes(selection="attn")


# --- GtR -------------------------------------------------------------------------------------------------------
def test_mar_order_is_the_default_and_unchanged():
    order = generation_order(SamplingSettings().order)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(order.orders(2, 16, g1, torch.device("cpu")), random_orders(2, 16, g2, torch.device("cpu")))
    assert all(order.mask_length(s, 8, 16, 16 - s) == mask_length(s, 8, 16, 16 - s) for s in range(8))


def test_bad_orders_are_refused():
    for spec in ("gtr:0", "gtr:x", "zigzag"):
        with pytest.raises(ValueError):
            SamplingSettings(order=spec)
    with pytest.raises(ValueError, match="square"):
        checkerboard(12)


def test_checkerboard_by_hand():
    assert checkerboard(4).tolist() == [True, False, False, True]


def test_two_stage_order_decodes_a_checkerboard_colour_first(model):
    num_iter, detail = 7, 2
    settings = SamplingSettings(num_iter=num_iter, cfg=3.0, order=f"gtr:{detail}")
    statuses = []

    class Watch(StepObserver):
        def on_step_end(self, ctx):
            statuses.append((ctx.known | ctx.new | ctx.to_predict).clone())

    with observe_steps(Watch()):
        tokens = generate(model, [0, 1, 2, 3], settings, seed=1)
    assert torch.isfinite(tokens).all()
    board = checkerboard(model.seq_len)
    after_structure = statuses[num_iter - detail - 1]  # known after the last structure step
    for row in after_structure:
        assert torch.equal(row, board) or torch.equal(row, ~board)
    assert statuses[-1].all()
    counts = [int(s[0].sum()) for s in statuses]
    expected, known = [], 0
    for c in step_counts(model.seq_len, num_iter, settings.order):
        known += c.to_predict
        expected.append(known)
    assert counts == expected


def test_two_stage_ledger_matches_the_analytic_model(model):
    settings = SamplingSettings(num_iter=7, cfg=3.0, order="gtr:2")
    schedule = attention_schedule(num_iter=7, layer=1).with_changes(selection="similarity")
    engine = CacheEngine(schedule)
    generate(model, [4, 5], settings, seed=0, runner=engine)
    assert engine.flops.total == estimate_generation_flops(model.config, schedule, 2, True, settings.order).total
    assert engine.flops.total != estimate_generation_flops(model.config, schedule, 2, True).total


def test_two_stage_mask_lengths_by_hand():
    order = TwoStageOrder(2)
    # 16 tokens, 8 of them structure; 4 structure steps then 2 detail steps
    lengths, unknown = [], 16
    for s in range(5):
        unknown = order.mask_length(s, 6, 16, unknown)
        lengths.append(unknown)
    assert lengths[:4] == [8 + 7, 8 + 5, 8 + 3, 8]   # floor(8 cos(pi/2 (s+1)/4)) = 7, 5, 3, 0
    assert lengths[4] == 5                            # floor(8 cos(pi/4))


# --- sweep families --------------------------------------------------------------------------------------------
def test_peer_families_at_the_paper_settings():
    config, settings = get_config("digits"), SamplingSettings(num_iter=64, cfg=3.0)
    base = estimate_generation_flops(config, none_schedule(64), 100).total
    marche = peers.preset_point("marche", settings, config)
    assert marche.family == "marche" and marche.schedule.selection == "attention"
    assert not any(marche.schedule.condition_cache)
    assert 1.3 < base / estimate_generation_flops(config, marche.schedule, 100).total < 1.8
    gtr = peers.preset_point("gtr", settings, config)
    assert gtr.settings.num_iter == 18 and gtr.settings.order == "gtr:2" and gtr.schedule.num_iter == 18
    names = [p.name for f in ("marche", "gtr", "combo") for p in peers.family_points(f, settings, config)]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match="unknown peer preset"):
        peers.preset_point("fora", settings, config)
    assert replace(settings, order="mar") == settings


def test_sweep_command_takes_the_peer_presets(tmp_path, capsys):
    """`lazymar sweep --schedule marche gtr` runs the presets by name (the argument check knows them)."""
    from lazymar.cli import main
    out = tmp_path / "peers.csv"
    code = main(["sweep", "--model", "digits", "--no-defaults", "--schedule", "marche", "gtr", "--num-samples", "2",
                 "--batch-size", "2", "--num-iter", "4", "--no-quality", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert {"marche", "gtr"} <= set(pd.read_csv(out)["name"])
