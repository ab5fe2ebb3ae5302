"""GtR's frequency-weighted head steps (SamplingSettings.head_steps, lazymar.head_steps): the default is today's
sampler, FTS with every token at full steps is the uniform sampler, the selection and the FLOPs by hand, and bad
specs."""
import pytest
import torch

from lazymar import peers
from lazymar.cache.engine import CacheEngine
from lazymar.cache.engine import estimate_generation_flops
from lazymar.cache.flops import head_net_flops
from lazymar.cache.schedule_file import lazymar_schedule, none_schedule
from lazymar.config import get_config
from lazymar.errors import SettingsError
from lazymar.head_steps import FrequencyWeightedSteps, head_step_allocation, neighbour_energy
from lazymar.model import MAR
from lazymar.sampling import (SamplingSettings, StepContext, StepObserver, StepRunner, generate, observe_steps,
                              sample_head)
from builders import tiny_model

LABELS = [3, 7, 1]
NUM_ITER = 6


@pytest.fixture(scope="module")
def model() -> MAR:
    return tiny_model()  # 10 head steps, 16 tokens on a 4x4 grid


class TodaysRunner(StepRunner):
    """The head runner before head steps were an option: one DiffLoss.sample call over all rows."""

    def head(self, ctx, z, temperature, generator):
        cfg = ctx.cfg_scale if ctx.use_cfg else None
        sampled = ctx.model.diffloss.sample(z, temperature, cfg, generator)
        return sampled[: z.shape[0] // 2] if ctx.use_cfg else sampled


def sample(model, head_steps="uniform", cfg=3.0, runner=None, order="mar", seed=5):
    settings = SamplingSettings(num_iter=NUM_ITER, cfg=cfg, head_steps=head_steps, order=order)
    return generate(model, LABELS, settings, seed=seed, runner=runner)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_uniform_default_is_todays_sampler(model, cfg):
    assert SamplingSettings().head_steps == "uniform"
    today = sample(model, cfg=cfg, runner=TodaysRunner())
    assert torch.equal(sample(model, cfg=cfg), today)
    assert torch.equal(sample(model, cfg=cfg, runner=CacheEngine(none_schedule(NUM_ITER))), today)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("order", ["mar", "gtr:2"])
def test_every_token_at_full_steps_is_the_uniform_sampler(model, cfg, order):
    uniform = sample(model, cfg=cfg, order=order)
    assert torch.equal(sample(model, "fts:1:3", cfg=cfg, order=order), uniform)
    cached = lazymar_schedule(NUM_ITER, model.config)  # the head cache too
    assert torch.equal(sample(model, "fts:1:3", cfg, CacheEngine(cached), order),
                       sample(model, cfg=cfg, runner=CacheEngine(cached), order=order))
    assert not torch.equal(sample(model, "fts:0.5:3", cfg=cfg, order=order), uniform)


def test_energy_and_selection_by_hand():
    # 3x3 grid, positions     values (known: 0, 1, 3, 5, 7; position 4 holds a value it must not see)
    #   0 1 2                  1 2 .
    #   3 4 5                  4 . 6
    #   6 7 8                  . 8 .
    values = torch.tensor([1., 2, 0, 4, 100, 6, 0, 8, 0])
    tokens = torch.stack([values, torch.zeros(9)], dim=-1)[None]  # 2 channels, the second all zero
    known = torch.zeros(1, 9, dtype=torch.bool)
    known[0, [0, 1, 3, 5, 7]] = True
    energy = neighbour_energy(tokens, known)[0]
    # known neighbour values: 4: 2, 4, 6, 8 (mean 5): (9 + 1 + 1 + 9) / 4 = 5; 2: 2, 6 (mean 4): 4; 6: 4, 8: 4;
    # 8: 6, 8: 1; 0: 2, 4: 1; 1, 3, 5, 7 have fewer than two known neighbours: 0
    assert energy.tolist() == [1, 0, 4, 0, 5, 0, 4, 0, 1]
    positions = torch.tensor([[2, 4, 6, 8]])
    assert FrequencyWeightedSteps(0.5, 3).full_tokens(tokens, known, positions).tolist() == [[True, True, False,
                                                                                                False]]  # tie: 2
    assert FrequencyWeightedSteps(0.25, 3).full_tokens(tokens, known, positions).tolist() == [[False, True, False,
                                                                                                 False]]
    assert [FrequencyWeightedSteps(f, 3).full_count(4) for f in (0, 0.1, 0.125, 0.6, 0.65, 1)] == [0, 0, 1, 2, 3, 4]


def test_cond_and_uncond_rows_share_their_step_count(model):
    """Every group the head samples holds the cond and the uncond row of the same tokens, in the same order, and
    the rows come back to their places."""
    calls = []

    class Tagging(StepRunner):
        def head(self, ctx, z, temperature, generator):
            n = z.shape[0] // 2
            tags = torch.cat([torch.arange(n), torch.arange(n) + 1000]).float()[:, None].expand(-1, z.shape[1])

            def record(rows, steps):
                calls.append((ctx.step, steps, rows[:, 0].clone()))
                return rows[:, :ctx.model.token_dim]
            placed = sample_head(ctx, tags, record)
            assert torch.equal(placed, tags[:, :ctx.model.token_dim])
            return super().head(ctx, z, temperature, generator)

    sample(model, "fts:0.5:3", runner=Tagging())
    assert {steps for _, steps, _ in calls} == {None, 3}
    for _, _, rows in calls:
        cond, uncond = rows.chunk(2)
        assert torch.equal(uncond, cond + 1000) and bool((cond < 1000).all())
    per_step = {}
    for step, steps, rows in calls:
        per_step.setdefault(step, {})[steps] = len(rows) // 2
    for step, counts in per_step.items():
        n = sum(counts.values()) // len(LABELS)
        assert counts.get(None, 0) == len(LABELS) * FrequencyWeightedSteps(0.5, 3).full_count(n)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_head_flops_shrink_by_hand(model, cfg):
    """Uncached head: each row costs head_net_flops(1) per head step, so a step with n tokens per sample and
    k = floor(n/2 + 1/2) at full steps costs B (10 k + 3 (n - k)) rows-steps instead of B * 10 n."""
    counts = []

    class Counts(StepObserver):
        def on_step_end(self, ctx: StepContext) -> None:
            counts.append(ctx.num_to_predict)

    engine = CacheEngine(none_schedule(NUM_ITER))
    with observe_steps(Counts()):
        sample(model, "fts:0.5:3", cfg, engine)
    branches, B, per_row = (2 if cfg != 1.0 else 1), len(LABELS), head_net_flops(model.config, 1)
    full = [n // 2 + n % 2 for n in counts]  # floor(n/2 + 1/2)
    row_steps = sum(B * branches * (10 * k + 3 * (n - k)) for n, k in zip(counts, full))
    assert engine.flops.totals()["head"] == row_steps * per_row
    uniform = CacheEngine(none_schedule(NUM_ITER))
    sample(model, cfg=cfg, runner=uniform)
    assert uniform.flops.totals()["head"] == sum(B * branches * 10 * n for n in counts) * per_row
    assert engine.flops.totals()["encoder"] == uniform.flops.totals()["encoder"]


@pytest.mark.parametrize("schedule", ["none", "lazymar"])
def test_ledger_matches_the_analytic_model(model, schedule):
    sch = none_schedule(NUM_ITER) if schedule == "none" else lazymar_schedule(NUM_ITER, model.config)
    engine = CacheEngine(sch)
    sample(model, "fts:0.4:4", runner=engine, order="gtr:2")
    predicted = estimate_generation_flops(model.config, sch, len(LABELS), True, "gtr:2", "fts:0.4:4")
    assert engine.flops.steps == predicted.steps
    assert predicted.total < estimate_generation_flops(model.config, sch, len(LABELS), True, "gtr:2").total


@pytest.mark.parametrize("spec, match", [
    ("fts", "expected fts:<fraction>:<reduced steps>"), ("fts:0.5", "expected fts"), ("fts:a:3", "expected fts"),
    ("fts:0.5:2.5", "expected fts"), ("fts:1.5:3", r"\[0, 1\]"), ("fts:nan:3", r"\[0, 1\]"),
    ("fts:0.5:0", ">= 1"), ("disa", "unknown head steps"), ("", "unknown head steps"),
])
def test_bad_specs_are_one_line_settings_errors(spec, match):
    for make in (lambda: SamplingSettings(head_steps=spec), lambda: head_step_allocation(spec)):
        with pytest.raises(SettingsError, match=match) as err:
            make()
        assert "\n" not in str(err.value)


def test_reduced_steps_must_be_fewer_than_the_model_s(model):
    with pytest.raises(SettingsError, match="fewer than the model's 10 head steps"):
        sample(model, "fts:0.5:10")


def test_recording_refuses_fts(model):
    from lazymar.errors import LazymarError
    from lazymar.recording.recorder import RedundancyRecorder
    with pytest.raises(LazymarError, match="recording needs uniform head steps"):
        with RedundancyRecorder(model):
            sample(model, "fts:0.5:3")


def test_cli_rejects_a_bad_head_steps_spec(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from lazymar.cli import main
    assert main(["sample", "--head-steps", "fts:2:10", "--out", "unused.png"]) == 2
    err = capsys.readouterr().err
    assert "--head-steps: bad head steps 'fts:2:10'" in err and err.count("\n") == 1
    assert main(["sample", "--num-iter", "4", "--head-steps", "fts:0.5:100", "--out", "unused.png"]) == 2
    assert "fewer than the model's 100 head steps" in capsys.readouterr().err


def test_gtr_family_has_the_fts_preset():
    config, settings = get_config("digits"), SamplingSettings(num_iter=64, cfg=3.0)
    fts = peers.preset_point("gtr-fts", settings, config)
    assert fts.settings.head_steps == "fts:0.25:50" and fts.settings.order == "gtr:2" and fts.name == "gtr-fts"
    assert peers.preset_point("gtr", settings, config).settings.head_steps == "uniform"
    points = peers.family_points("gtr", settings, config)
    assert {"gtr", "gtr-fts", "gtr-16+2-fts-0.5-25"} <= {p.name for p in points}
    ratio = (estimate_generation_flops(config, none_schedule(18), 100, True, "gtr:2").total
             / estimate_generation_flops(config, none_schedule(18), 100, True, "gtr:2", "fts:0.25:50").total)
    assert 1.05 < ratio < 1.5  # the head is about half of GtR's FLOPs on digits; FTS cuts 3/8 of it
