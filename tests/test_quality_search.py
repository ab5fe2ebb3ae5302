"""The quality-aware budget search: calibration seeds apart from evaluation seeds, the objective, provenance."""
import json

import numpy as np
import pytest

from lazymar.cache.schedule_file import CacheSchedule, HeadCachePolicy, load_schedule
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
    ({"verdict_psnr": "better", "verdict_accuracy": "no worse", "verdict_fid": "no worse"}, True),
    ({"verdict_psnr": "better", "verdict_accuracy": "inconclusive", "verdict_fid": "better"}, False),
    ({"verdict_psnr": "worse", "verdict_accuracy": "better", "verdict_fid": "better"}, False),
    ({"verdict_psnr": "no worse", "verdict_accuracy": "no worse"}, True),   # no FID measured: the others decide
    ({}, False),                                                            # nothing measured: not accepted
])
def test_objective_feasibility(row, ok):
    assert QualityObjective().feasible(row) is ok


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
    """Stands in for lazymar.runs.Reference: measured rows from a table (no sampling), each with per-sample arrays
    in place of the run (a run's accuracy per sample, its squared errors for its PSNR, no FID features)."""

    def __init__(self, rows, seed=101, num_samples=200):
        self.plan = SamplePlan.balanced(num_samples, 10, seed, 100)
        self.settings = SamplingSettings(num_iter=64, cfg=3.0)
        self.evaluator, self.run = object(), None
        self.rows, self.measured = rows, []

    def measure(self, schedule, settings=None, quality=True, name=None):
        self.measured.append(schedule.name)
        row, n = dict(self.rows[schedule.name]), self.plan.num_samples
        correct = np.zeros(n)
        correct[:round(row["accuracy"] * n)] = 1.0
        rng = np.random.default_rng(0)  # the same samples for every run: paired
        sq_err = 4.0 * 10 ** (-row["psnr"] / 10) * rng.uniform(0.5, 1.5, n)
        return {"sq_err": sq_err, "correct": correct, "features": None}, row


def candidates():
    base = load_schedule("data/schedules/digits_3.5x.json", 64, CONFIG)
    return with_head_policies([base], HEAD_GRID)


def test_search_picks_the_fastest_feasible_candidate():
    cands = candidates()
    ratio = {s.name: predicted_flops(s, CONFIG, True, 100)["ratio"] for s in cands}
    rows = {"lazymar": FLOOR}
    for s in cands:  # the two fastest lose 1.5 dB PSNR (beyond the 0.5 dB margin); the rest gain 2 dB
        bad = ratio[s.name] > 4.7
        rows[s.name] = {"flops_ratio": ratio[s.name], "wall_ratio": 3.0, "psnr": 28.5 if bad else 32.0,
                        "accuracy": 0.97, "fid": 2.4}
    reference = FakeReference(rows)
    floor = load_schedule("lazymar", 64, CONFIG)
    result = quality_search(reference, floor, cands, CONFIG, 4.5, max_measured=10)
    feasible = [n for n in ratio if ratio[n] >= 4.5 and ratio[n] <= 4.7]
    assert result.best.name == max(feasible, key=ratio.get)
    assert reference.measured[0] == "lazymar"
    assert all(ratio[n] >= 4.5 for n in reference.measured[1:])
    assert result.search_record(101, 200, "o")["seeds"] == [101]
    verdicts = {r["name"]: (r["verdict_psnr"], r["verdict_accuracy"]) for r in result.measured}
    assert all(v == (("worse" if ratio[n] > 4.7 else "better"), "no worse") for n, v in verdicts.items())
    assert all(r["d_psnr_ci_low"] <= r["d_psnr"] <= r["d_psnr_ci_high"] for r in result.measured)


def test_search_rejects_a_point_estimate_inside_the_noise():
    """A candidate 0.4 points below the floor's accuracy is within the margin by its point value, but 200
    samples cannot show it: the verdict is inconclusive and it is not accepted."""
    base = load_schedule("data/schedules/digits_3.5x.json", 64, CONFIG)
    rows = {"lazymar": FLOOR, base.name: {**FLOOR, "flops_ratio": 3.6, "psnr": 32.0, "accuracy": 0.965}}
    result = quality_search(FakeReference(rows), load_schedule("lazymar", 64, CONFIG), [base], CONFIG, 3.0)
    assert result.measured[0]["verdict_accuracy"] == "inconclusive" and result.best is None


def test_search_record_keeps_the_seeds_that_made_the_base():
    """A base from `lazymar derive` was searched on its own seed: the searched schedule names both."""
    derive_record = {"seeds": [1], "num_samples": 32}
    base = load_schedule("data/schedules/digits_3.5x.json", 64, CONFIG).with_changes(search=derive_record)
    rows = {"lazymar": FLOOR, base.name: {**FLOOR, "flops_ratio": 3.6, "psnr": 31.0, "fid": 2.4}}
    result = quality_search(FakeReference(rows), load_schedule("lazymar", 64, CONFIG), [base], CONFIG, 3.0)
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
    from lazymar.schedules.quality import quality_report_markdown
    native = {"fid32": 4.0, "roughness": 0.12, "roughness_real": 0.096}
    base = load_schedule("data/schedules/digits_3.5x.json", 64, CONFIG)
    rows = {"lazymar": {**FLOOR, **native}, base.name: {**FLOOR, **native, "flops_ratio": 3.6, "fid32": 5.0}}
    result = quality_search(FakeReference(rows), load_schedule("lazymar", 64, CONFIG), [base], CONFIG, 3.4)
    assert result.measured[0]["fid32"] == 5.0 and result.floor["roughness"] == 0.12
    assert result.search_record(101, 200, "o")["floor"]["fid32"] == 4.0
    report = quality_report_markdown(result.best.with_changes(search={"objective": "o", "seeds": [101]}), result,
                                     seed=101, num_samples=200, batch_size=100, bases=[base.name], floor="lazymar",
                                     target_flops_ratio=3.4)
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert "| fid32 | roughness | roughness_real | d_psnr [95% CI] |" in table[0]
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| 5.00 | 0.120 | 0.096 | " in table[-1] and table[-1].endswith(f"| {result.measured[0]['feasible']} |")
