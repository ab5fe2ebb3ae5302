"""The cache-memory model: what each mechanism keeps between steps, predicted from the shapes alone, equals what
the engine's mechanisms hold in a run (measured after every step)."""
import pytest
import torch

from builders import tiny_model
from lazymar.cache import CacheEngine, estimate_cache_bytes, load_schedule
from lazymar.cache.schedule_file import none_schedule
from lazymar.sampling import SamplingSettings, generate

pytestmark = pytest.mark.usefixtures("one_thread")


def _measured(model, schedule, settings, batch, cache_dtype=None):
    engine = CacheEngine(schedule, cache_dtype=cache_dtype)
    generate(model, list(range(batch)), settings, seed=0, runner=engine)
    return engine.peak_cache_bytes, engine.cache_dtype


@pytest.mark.parametrize("spec, cfg", [("lazymar", 3.0), ("lazymar-new-tokens", 3.0), ("lazymar", 1.0)])
def test_the_model_predicts_the_bytes_the_caches_hold(spec, cfg):
    model = tiny_model()
    settings = SamplingSettings(num_iter=16, cfg=cfg)
    schedule = load_schedule(spec, 16, model.config)
    measured, dtype = _measured(model, schedule, settings, batch=3)
    predicted = estimate_cache_bytes(model.config, schedule, batch_size=3, use_cfg=cfg != 1.0, cache_dtype=dtype)
    assert measured == predicted
    assert predicted["EncoderCache"] > 0 and predicted["DecoderTokenCache"] > 0
    assert (predicted["ConditionCache"] > 0) == (cfg != 1.0)
    assert predicted["HeadCache"] == 0  # lives within one MAR step


def test_selection_rule_and_dtype_change_the_bytes_as_predicted():
    model = tiny_model()
    settings = SamplingSettings(num_iter=16, cfg=3.0)
    base = load_schedule("lazymar", 16, model.config)
    for schedule in (base.with_changes(selection="random"), base.with_changes(selection="attention")):
        measured, dtype = _measured(model, schedule, settings, batch=2, cache_dtype=torch.float32)
        assert dtype == torch.float32
        assert measured == estimate_cache_bytes(model.config, schedule, 2, cache_dtype=torch.float32)
    similarity = estimate_cache_bytes(model.config, base, 2, cache_dtype=torch.float32)["DecoderTokenCache"]
    random = estimate_cache_bytes(model.config, base.with_changes(selection="random"), 2,
                                  cache_dtype=torch.float32)["DecoderTokenCache"]
    assert similarity > random  # the similarity rule keeps the selection layer's V of the previous step


def test_an_exact_schedule_keeps_nothing():
    model = tiny_model()
    assert not any(estimate_cache_bytes(model.config, none_schedule(16), 4).values())
    measured, _ = _measured(model, none_schedule(16), SamplingSettings(num_iter=16, cfg=3.0), batch=2)
    assert not any(measured.values())
