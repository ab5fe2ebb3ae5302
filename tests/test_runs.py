"""The run/compare core (lazymar.runs): one seed rule whichever command samples, batches split over ranks, the
reference run equal to the plain sampler, image-space PSNR by hand, images through a VAE, and the quality seam."""
from __future__ import annotations

import math

import pytest
import torch

from analysis.schedule_runs import measure_schedules
from lazymar import MAR, get_config
from lazymar.runs.bench import benchmark_runs
from lazymar.cache.flops import FlopsLedger
from lazymar.cache.schedule_file import exact_schedule, lazymar_schedule, none_schedule
from lazymar.runs import (DigitsQuality, ImageSpace, Reference, Run, RunError, SamplePlan, batch_seed, fidelity,
                          generate_tokens, quality_evaluator)
from lazymar.sampling import SamplingSettings, generate
from lazymar.vae import LATENT_SCALE, AutoencoderKL
from builders import tiny_mar, tiny_vae

SETTINGS = SamplingSettings(num_iter=4, cfg=2.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> MAR:
    """mar_tiny on a 4x4 token grid, the zero-initialised head weights made random (so caching changes tokens)."""
    return tiny_mar(img_size=64, num_sampling_steps="4", randomise="head", std=0.1)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return tiny_vae(seed=1)


PLAN = SamplePlan.of([3, 1, 4, 1, 5], seed=5, batch_size=2)  # batches [3, 1], [4, 1], [5]


def test_same_plan_same_tokens_in_every_command_path(tiny):
    plain, _ = generate_tokens(tiny, PLAN, SETTINGS)  # sample: the plain sampler
    eval_path, _ = generate_tokens(tiny, PLAN, SETTINGS, exact_schedule(4))  # eval: the exact (hoisted) sampler
    sweep_reference = Reference(tiny, PLAN, SETTINGS, evaluator=None).tokens  # sweep / derive
    bench_baseline = benchmark_runs(tiny, PLAN, SETTINGS, lazymar_schedule(4, tiny.config), repeats=1,
                                    warmup=False, progress=False)["baseline"].tokens
    measured = measure_schedules(tiny, {"lazymar": lazymar_schedule(4, tiny.config)}, PLAN.labels, SETTINGS,
                                 seed=PLAN.seed, batch_size=PLAN.batch_size).reference.tokens  # explorer, notebooks
    assert torch.equal(eval_path, sweep_reference)
    assert torch.equal(eval_path, bench_baseline)
    assert torch.equal(eval_path, measured)
    # hoisting the head's invariants changes float rounding only
    assert float((plain - eval_path).norm() / plain.norm()) < 1e-5
    # batch k is the plain sampler on its labels with the torch seed SeedSequence([seed, k])
    last = generate(tiny, [5], SETTINGS, seed=batch_seed(5, 2))
    assert torch.equal(plain[4:], last)
    # another seed gives other samples; seed + 1 is not batch 1 of seed (independent streams)
    other, _ = generate_tokens(tiny, SamplePlan.of([4, 1], seed=6, batch_size=2), SETTINGS)
    assert not torch.equal(other, plain[2:4])


def test_ranks_together_give_the_one_process_batches(tiny):
    whole, whole_flops = generate_tokens(tiny, PLAN, SETTINGS, none_schedule(4))
    parts = {rank: generate_tokens(tiny, PLAN, SETTINGS, none_schedule(4), rank=rank, world_size=2)
             for rank in (0, 1)}
    assembled = torch.empty_like(whole)
    for rank, (tokens, _) in parts.items():
        offset = 0
        for batch in PLAN.batches(rank, 2):
            n = batch.stop - batch.start
            assembled[batch.start:batch.stop] = tokens[offset:offset + n]
            offset += n
        assert offset == len(tokens)
    assert torch.equal(assembled, whole)
    assert parts[0][1].total + parts[1][1].total == whole_flops.total
    empty, ledger = generate_tokens(tiny, SamplePlan.of([1], 0, 1), SETTINGS, rank=1, world_size=2)
    assert empty.shape == (0, tiny.seq_len, tiny.token_dim) and ledger.total == 0


def test_reference_is_the_exact_hoisted_sampler(tiny):
    """The uncached reference is the fastest exact sampler: the plain one up to float rounding, fewer FLOPs."""
    reference = Reference(tiny, PLAN, SETTINGS, evaluator=None)
    assert reference.schedule == exact_schedule(4) and reference.schedule.head.hoist_invariants
    plain = torch.cat([generate(tiny, list(b.labels), SETTINGS, seed=b.seed) for b in PLAN.batches()])
    assert float((reference.tokens - plain).norm() / plain.norm()) < 1e-5
    _, plain_flops = generate_tokens(tiny, PLAN, SETTINGS, none_schedule(4))
    assert 0 < reference.run.flops.total < plain_flops.total
    row = reference.row()
    assert row["flops_ratio"] == 1.0 and row["token_mse"] == 0.0
    assert row["psnr"] is None  # latent tokens without a VAE: no image space
    with pytest.raises(RunError, match="no VAE"):
        reference.psnr(lazymar_schedule(4, tiny.config))


def _run(images: torch.Tensor, tokens: torch.Tensor, flops: int, seconds: float) -> Run:
    ledger = FlopsLedger()
    ledger.add("encoder", flops)
    return Run("x", SamplePlan.of([0], 0, 1), SETTINGS, None, tokens=tokens, flops=ledger, seconds=[seconds],
               cpu_seconds=[seconds], images=images)


def test_psnr_by_hand():
    reference = _run(torch.zeros(1, 1, 2, 2), torch.zeros(1, 4, 1), 300, 2.0)
    candidate = _run(torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]), torch.tensor([[[0.5], [0.0], [0.0], [0.0]]]),
                     100, 1.0)
    out = fidelity(candidate, reference)
    # MSE 1/4 over images in [-1, 1] (data range 2): 10 log10(2^2 / 0.25) = 10 log10(16)
    assert out["psnr"] == pytest.approx(10 * math.log10(16)) == pytest.approx(12.0412, abs=1e-4)
    assert out["token_mse"] == pytest.approx(0.5 ** 2 / 4)  # one of four tokens off by 0.5
    assert out["flops_ratio"] == 3.0 and out["wall_ratio"] == 2.0
    assert fidelity(reference, reference)["psnr"] == math.inf
    other_plan = Run("y", SamplePlan.of([1], 0, 1), SETTINGS, None, tokens=reference.tokens)
    with pytest.raises(RunError, match="same plan"):
        fidelity(candidate, other_plan)


def test_images_through_a_vae_and_psnr_in_image_space(tiny, vae):
    tokens, _ = generate_tokens(tiny, PLAN, SETTINGS)
    images = ImageSpace(tiny, vae, decode_batch=2)(tokens)
    with torch.no_grad():
        expected = vae.decode(tiny.unpatchify(tokens) / LATENT_SCALE)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-6)
    assert ImageSpace(tiny)(tokens) is None
    reference = Reference(tiny, PLAN, SETTINGS, vae=vae, evaluator=None)
    assert math.isinf(reference.psnr(exact_schedule(4)))
    cached = reference.psnr(lazymar_schedule(4, tiny.config))
    assert 0 < cached < math.inf


def test_quality_evaluator_seam():
    digits = MAR(get_config("digits"))
    assert isinstance(quality_evaluator(digits), DigitsQuality)
    assert quality_evaluator(tiny_mar()) is None
    from lazymar.digits import digits_split
    images, labels = digits_split("held_out")
    scores = DigitsQuality()(images[:20], labels[:20].tolist())
    assert set(scores) == set(DigitsQuality.keys) and scores["accuracy"] > 0.8
    assert math.isnan(DigitsQuality()(images[:1], [int(labels[0])])["fid"])
