"""Property-based: any mutation of a valid schedule JSON gives a valid CacheSchedule or a ScheduleError (a
LazymarError), never another exception."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings, strategies as st

from lazymar.cache.schedule_file import CacheSchedule, ScheduleError, lazymar_schedule, load_schedule, none_schedule
from lazymar.config import get_config
from lazymar.errors import LazymarError

BASES = [none_schedule(3).to_dict(), lazymar_schedule(8, get_config("digits")).to_dict(),
         lazymar_schedule(5, hoist_invariants=False).to_dict()]
FIELDS = sorted(set(BASES[1]) | {"unknown_field"})
HEAD_FIELDS = sorted(set(BASES[1]["head"]) | {"unknown_field"})

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2**62, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.sampled_from(["new", "to_predict", "buffer", "similarity", "full", "lazymar-cache-schedule/1"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=9),
                                                     st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                      max_leaves=12)


@st.composite
def mutated(draw) -> dict:
    data = json.loads(json.dumps(draw(st.sampled_from(BASES))))
    for _ in range(draw(st.integers(1, 3))):
        target = data
        if draw(st.booleans()) and isinstance(data.get("head"), dict):
            target = data["head"]
            key = draw(st.sampled_from(HEAD_FIELDS))
        else:
            key = draw(st.sampled_from(FIELDS))
        action = draw(st.sampled_from(["replace", "delete", "wrap", "entry"]))
        if action == "delete":
            target.pop(key, None)
        elif action == "wrap" and key in target:
            target[key] = [target[key]]
        elif action == "entry" and isinstance(target.get(key), list) and target[key]:
            target[key][draw(st.integers(0, len(target[key]) - 1))] = draw(values)
        else:
            target[key] = draw(values)
    return data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_any_mutation_gives_a_schedule_or_a_schedule_error(data):
    try:
        schedule = CacheSchedule.from_dict(data)
    except ScheduleError:
        return
    assert CacheSchedule.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule


@settings(max_examples=100, deadline=None)
@given(mutated())
def test_loading_a_mutated_file_raises_only_our_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "s.json"
    path.write_text(json.dumps(data))
    num_iter = data.get("num_iter") if isinstance(data.get("num_iter"), int) else 3
    try:
        load_schedule(path, num_iter, get_config("digits"))
    except LazymarError:
        pass
