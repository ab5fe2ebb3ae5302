"""The quality-aware budget search: calibration seeds apart from evaluation seeds, the objective, provenance."""
import json
import types

import pytest

from lazymar.cache.schedule import CacheSchedule, HeadCachePolicy, load_schedule
from lazymar.config import SamplingSettings, get_config
from lazymar.runs import SamplePlan
from lazymar.schedules.predicted_flops import predicted_flops
from lazymar.schedules.profile import DerivationError
from lazymar.schedules.quality import (EVALUATION_SEEDS, HEAD_GRID, QualityObjective, check_calibration_plan,
                                       quality_search, with_head_policies)

CONFIG = get_config("digits")
FLOOR = {"name": "lazymar", "flops_ratio": 2.6, "wall_ratio": 2.0, "psnr": 30.0, "accuracy": 0.97, "fid": 2.5}


def test_calibration_plan_keeps_away_from_evaluation_seeds():
    for seed in sorted(EVALUATION_SEEDS):
        with pytest.raises(DerivationError, match="evaluation seed"):
            check_calibration_plan(seed, 300)
    with pytest.raises(DerivationError, match="200"):
        check_calibration_plan(101, 199)
    check_calibration_plan(101, 200)


@pytest.mark.parametrize("row, ok", [
    ({"psnr": 30.0, "accuracy": 0.965, "fid": 2.5}, True),     # ties and the accuracy tolerance
    ({"psnr": 29.9, "accuracy": 0.99, "fid": 2.0}, False),     # PSNR below the floor
    ({"psnr": 35.0, "accuracy": 0.964, "fid": 2.0}, False),    # accuracy more than 0.5 points below
    ({"psnr": 35.0, "accuracy": 0.99, "fid": 2.51}, False),    # FID above
])
def test_objective_feasibility(row, ok):
    assert QualityObjective(accuracy_tolerance=0.005).feasible(row, FLOOR) is ok


def test_head_policies_combine_with_every_base():
    base = load_schedule("lazymar", 64, CONFIG)
    out = with_head_policies([base])
    assert len(out) == len(HEAD_GRID) and len({s.name for s in out}) == len(HEAD_GRID)
    assert all(all(s.head_cache) for s in out) and [s.head for s in out] == list(HEAD_GRID)
    assert out[0].refresh == base.refresh


def test_search_record_round_trips_and_is_not_part_of_the_plan(tmp_path):
    schedule = load_schedule("lazymar", 64, CONFIG)
    record = {"seeds": [101], "num_samples": 200, "objective": "x"}
    searched = schedule.with_changes(search=record)
    assert searched == schedule and hash(searched) == hash(schedule)
    path = searched.save(tmp_path / "s.json")
    assert json.loads(path.read_text())["search"] == record
    assert load_schedule(path, 64).search == record
    assert "search" not in schedule.to_dict()


class FakeReference:
    """Stands in for lazymar.runs.Reference: measured rows from a table (no sampling)."""

    def __init__(self, rows, seed=101, num_samples=200):
        self.plan = SamplePlan.balanced(num_samples, 10, seed, 100)
        self.settings = SamplingSettings(num_iter=64, cfg=3.0)
        self.evaluator = object()
        self.rows, self.measured = rows, []

    def measure(self, schedule, settings=None, quality=True, name=None):
        self.measured.append(schedule.name)
        return None, dict(self.rows[schedule.name])


def candidates():
    base = load_schedule("data/schedules/digits_3.5x.json", 64, CONFIG)
    return with_head_policies([base], HEAD_GRID)


def test_search_picks_the_fastest_feasible_candidate():
    cands = candidates()
    ratio = {s.name: predicted_flops(s, CONFIG, True, 100)["ratio"] for s in cands}
    rows = {"lazymar": FLOOR}
    for s in cands:  # the two fastest fail on FID; the rest pass
        bad = ratio[s.name] > 4.7
        rows[s.name] = {"flops_ratio": ratio[s.name], "wall_ratio": 3.0, "psnr": 32.0, "accuracy": 0.97,
                        "fid": 3.0 if bad else 2.4}
    reference = FakeReference(rows)
    floor = load_schedule("lazymar", 64, CONFIG)
    result = quality_search(reference, floor, cands, CONFIG, 4.5, max_measured=10)
    feasible = [n for n in ratio if ratio[n] >= 4.5 and ratio[n] <= 4.7]
    assert result.best.name == max(feasible, key=ratio.get)
    assert reference.measured[0] == "lazymar"
    assert all(ratio[n] >= 4.5 for n in reference.measured[1:])
    assert result.search_record(101, 200, "o")["seeds"] == [101]


def test_search_record_keeps_the_seeds_that_made_the_base():
    """A base from `lazymar derive` was searched on its own seed: the searched schedule names both."""
    derive_record = {"seeds": [1], "num_samples": 32}
    base = load_schedule("data/schedules/digits_3.5x.json", 64, CONFIG).with_changes(search=derive_record)
    rows = {"lazymar": FLOOR, base.name: {**FLOOR, "flops_ratio": 3.6, "psnr": 31.0, "fid": 2.4}}
    result = quality_search(FakeReference(rows), load_schedule("lazymar", 64, CONFIG), [base], CONFIG, 3.5)
    record = result.search_record(101, 200, "o")
    assert result.best.name == base.name
    assert record["seeds"] == [1, 101] and record["base_search"] == derive_record


def test_search_refuses_evaluation_seeds_and_unreachable_budgets():
    floor = load_schedule("lazymar", 64, CONFIG)
    with pytest.raises(DerivationError, match="evaluation seed"):
        quality_search(FakeReference({}, seed=7), floor, candidates(), CONFIG, 4.5)
    with pytest.raises(DerivationError, match="no candidate reaches"):
        quality_search(FakeReference({}), floor, candidates(), CONFIG, 9.0)


def test_cli_refuses_an_evaluation_seed_in_one_line(capsys):
    from lazymar.cli import main
    code = main(["search-quality", "--base", "lazymar", "--target-flops-ratio", "4.5", "--seed", "7"])
    assert code == 2
    err = capsys.readouterr().err
    assert "evaluation seed" in err and len(err.strip().splitlines()) == 1


def test_search_reports_the_native_quality_beside_the_objective():
    """fid32 and roughness (digits16) pass through to the measured rows, the record and the report table."""
    from lazymar.commands.quality import _report
    native = {"fid32": 4.0, "roughness": 0.12, "roughness_real": 0.096}
    base = load_schedule("data/schedules/digits_3.5x.json", 64, CONFIG)
    rows = {"lazymar": {**FLOOR, **native}, base.name: {**FLOOR, **native, "flops_ratio": 3.6, "fid32": 5.0}}
    result = quality_search(FakeReference(rows), load_schedule("lazymar", 64, CONFIG), [base], CONFIG, 3.5)
    assert result.measured[0]["fid32"] == 5.0 and result.floor["roughness"] == 0.12
    assert result.search_record(101, 200, "o")["floor"]["fid32"] == 4.0
    args = types.SimpleNamespace(seed=101, num_samples=200, batch_size=100, base=[base.name], floor="lazymar",
                                 target_flops_ratio=3.5)
    table = [line for line in _report(result.best.with_changes(search={"objective": "o", "seeds": [101]}),
                                      result, args).splitlines() if line.startswith("|")]
    assert "| fid32 | roughness | roughness_real | feasible |" in table[0]
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| 5.00 | 0.120 | 0.096 | True |" in table[-1]
