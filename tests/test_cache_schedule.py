"""CacheSchedule: validation, presets (the released LazyMAR scheme), JSON round trip, loading."""
import json

import pytest

from lazymar.cache.schedule_file import (LAZYMAR_REFRESH, CacheSchedule, HeadCachePolicy, ScheduleError,
                                    lazymar_schedule, load_schedule, none_schedule)
from lazymar.config import get_config


def _plain(num_iter=4, **changes):
    return none_schedule(num_iter).with_changes(**changes)


def test_lazymar_preset_is_the_released_scheme_at_64_steps():
    s = lazymar_schedule(64, get_config("mar_base"))
    assert [i for i, r in enumerate(s.refresh) if r] == [0, 1, 2, 3, 4, 5, 14, 23, 32, 41, 50, 59]
    assert s.condition_cache == tuple(not r for r in s.refresh)
    assert s.keep_fraction[:20] == (1.0,) * 20
    assert s.keep_fraction[20] == 0.6 and s.keep_fraction[21:25] == (0.5,) * 4
    assert s.keep_fraction[25:30] == (0.4,) * 5 and s.keep_fraction[30:35] == (0.15,) * 5
    assert s.keep_fraction[35:40] == (0.12,) * 5 and s.keep_fraction[40:] == (0.05,) * 24
    assert s.selection == "similarity" and s.selection_layer == 3 and s.encoder == "incremental"
    assert set(s.always_keep) == {"to_predict", "new"}
    assert s.head.refresh_every == 7 and s.head.cfg_cache and s.head.reuse_blocks == (1, 2, 3, 4)
    # kept = max(n_pred(s) + n_pred(s-1) + 15, int(320 * ratio)) of the 320 positions
    assert s.kept_count(40, 320, 10) == 25 and s.kept_count(20, 320, 10) == 192
    assert s.kept_count(30, 320, 40) == 55


def test_lazymar_preset_maps_other_step_counts_by_fraction():
    s128 = lazymar_schedule(128)
    assert [i for i, r in enumerate(s128.refresh) if r] == [2 * k for k in sorted(LAZYMAR_REFRESH)]
    assert s128.keep_fraction[41] == lazymar_schedule(64).keep_fraction[20]
    s16 = lazymar_schedule(16)
    # step s covers 64-steps [4s, 4s+4): it refreshes when one of them is a released refresh step
    assert [i for i, r in enumerate(s16.refresh) if r] == [0, 1, 3, 5, 8, 10, 12, 14]
    assert s16.keep_fraction[10] == 0.05


def test_lazymar_preset_fits_shallow_models():
    digits = get_config("digits")  # 4 decoder blocks, 3 head res-blocks
    s = lazymar_schedule(64, digits)
    assert s.selection_layer == 0 and s.head.reuse_blocks == (1, 2)
    s.validate_for(digits, 64)
    with pytest.raises(ScheduleError, match="reuse block 3 out of range"):
        lazymar_schedule(64).validate_for(digits)


@pytest.mark.parametrize("changes, message", [
    (dict(refresh=[True, False]), "refresh has 2 entries but the schedule has 4 steps"),
    (dict(keep_fraction=[1.0, 1.5, 1.0, 1.0]), r"keep_fraction must lie in \[0, 1\]; step 1 has 1.5"),
    (dict(keep_fraction=[1.0, -0.1, 1.0, 1.0]), "step 1 has -0.1"),
    (dict(keep_min_extra=2.0), "keep_min_extra"),
    (dict(selection="magic"), "unknown selection rule 'magic'"),
    (dict(selection_layer=-1), "selection_layer must be an integer >= 0"),
    (dict(always_keep=("to_predict", "old")), "unknown always_keep status 'old'"),
    (dict(encoder="lazy"), "unknown encoder policy 'lazy'"),
    (dict(refresh=[False, True, True, True]), "step 0 must refresh"),
    (dict(condition_cache=[True, False, False, False]), "step 0 cannot use the condition cache"),
    (dict(condition_cache=[False, "yes", False, False]), "condition_cache entries must be booleans"),
])
def test_bad_schedules_name_the_problem(changes, message):
    with pytest.raises(ScheduleError, match=message):
        _plain(**changes)


def test_bad_head_policies_and_model_checks():
    with pytest.raises(ScheduleError, match="refresh_every must be an integer >= 1"):
        HeadCachePolicy(refresh_every=0)
    with pytest.raises(ScheduleError, match="distinct"):
        HeadCachePolicy(reuse_blocks=(1, 1))
    cfg = get_config("mar_tiny")  # 2 decoder blocks, 2 head res-blocks
    with pytest.raises(ScheduleError, match="selection_layer 2 out of range: the decoder has 2 blocks"):
        _plain(selection_layer=2, refresh=[True, False, True, True]).validate_for(cfg)
    _plain(selection_layer=2).validate_for(cfg)  # no cached step: the selection layer is never used
    with pytest.raises(ScheduleError, match="head reuse block 2 out of range"):
        _plain(head=HeadCachePolicy(reuse_blocks=(2,)), head_cache=[True] * 4).validate_for(cfg)
    with pytest.raises(ScheduleError, match="has 4 steps but sampling uses 8"):
        _plain().validate_for(cfg, 8)
    assert issubclass(ScheduleError, ValueError)


def test_step_plans():
    s = lazymar_schedule(64)
    p = s.step_plan(6)
    assert not p.refresh and p.token_cache and p.incremental_encoder and p.branches == 1 and p.condition_cache
    p = s.step_plan(5)
    assert p.refresh and not p.token_cache and not p.incremental_encoder and p.branches == 2
    assert s.step_plan(6, use_cfg=False).branches == 1 and not s.step_plan(6, use_cfg=False).condition_cache
    # a step that runs the uncond branch after a step that did not must rebuild the encoder cache
    t = _plain(refresh=[True, False, False, False], condition_cache=[False, True, False, False])
    assert t.step_plan(1).incremental_encoder and not t.step_plan(2).incremental_encoder
    assert not none_schedule(8).caches_anything and s.caches_anything


def test_json_round_trip_and_loading(tmp_path):
    s = lazymar_schedule(32, get_config("digits"))
    path = s.save(tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert data["format"] == "lazymar-cache-schedule/1" and len(data["refresh"]) == 32
    assert CacheSchedule.from_dict(data) == s
    assert load_schedule(path, 32, get_config("digits")) == s
    with pytest.raises(ScheduleError, match="has 32 steps but sampling uses 64"):
        load_schedule(path, 64)
    data["keep_fraction"][3] = 7
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ScheduleError, match="step 3 has 7.0"):
        load_schedule(tmp_path / "bad.json", 32)
    (tmp_path / "extra.json").write_text(json.dumps({**s.to_dict(), "speed": "fast"}))
    with pytest.raises(ScheduleError, match="unknown schedule field 'speed'"):
        load_schedule(tmp_path / "extra.json", 32)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        load_schedule(tmp_path / "broken.json", 32)
    with pytest.raises(ScheduleError, match="unknown schedule 'fastest'"):
        load_schedule("fastest", 32)
    assert load_schedule("none", 8) == none_schedule(8)
    assert load_schedule("lazymar-released", 64).head.hoist_invariants is False
    assert load_schedule("lazymar", 64).head.hoist_invariants is True


def test_typed_fields_name_the_field():
    base = lazymar_schedule(8).to_dict()
    for field_name, value, words in [("seed", "0", "seed"), ("seed", 1.5, "seed"), ("seed", None, "seed"),
                                     ("seed", 2**63, "2**63"), ("always_keep", "new", "always_keep must be a list"),
                                     ("keep_min_extra", "0.1", "keep_min_extra"), ("selection_layer", True, "selection_layer"),
                                     ("name", 3, "name"), ("head", {"reuse_blocks": "12"}, "reuse_blocks"),
                                     ("head", {"mlp_fresh_above": "x"}, "mlp_fresh_above"),
                                     ("head", {"cfg_cache": "yes"}, "cfg_cache"),
                                     ("keep_fraction", ["0.5"] * 8, "keep_fraction")]:
        with pytest.raises(ScheduleError, match=field_name):
            CacheSchedule.from_dict({**base, field_name: value})
        with pytest.raises(ScheduleError) as err:
            CacheSchedule.from_dict({**base, field_name: value})
        assert words in str(err.value)


@pytest.mark.parametrize("preset", ["none", "lazymar", "lazymar-released"])
def test_every_preset_runs_any_step_count_up_to_the_sequence_length(preset):
    import torch

    from lazymar.cache.engine import CacheEngine
    from builders import tiny_mar
    from lazymar.sampling import SamplingSettings, generate
    model = tiny_mar(img_size=144, num_sampling_steps="2", randomise="none")  # 9 x 9 = 81 tokens
    config = model.config
    assert model.seq_len == 81
    for num_iter in (1, 7, 64, 65, model.seq_len):
        schedule = load_schedule(preset, num_iter, config)
        assert schedule.num_iter == num_iter and schedule.refresh[0]
        tokens = generate(model, [3], SamplingSettings(num_iter=num_iter, cfg=2.0), seed=0,
                          runner=CacheEngine(schedule))
        assert tokens.shape == (1, 81, 16) and torch.isfinite(tokens).all()
        if preset != "none" and num_iter >= 64:  # the released refresh steps keep their place in the generation
            assert sum(schedule.refresh) >= len(LAZYMAR_REFRESH)
