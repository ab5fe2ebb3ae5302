"""ImageNet quality through the runs core (lazymar.runs + lazymar.imagenet.ImageNetQuality): a tiny latent MAR with
a tiny random KL VAE, the stand-in extractor and reference statistics computed here; decoded images are streamed
(not kept) and give the same FID/IS and PSNR as all images at once. Parametrised over the available devices."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch

from lazymar.imagenet import ImageNetQuality, InceptionStats, ReferenceStats
from lazymar.metrics import psnr, token_mse
from lazymar.runs import ImageSpace, Reference, Run, SamplePlan, decode_and_score, quality_evaluator
from lazymar.cache.schedule_file import load_schedule
from lazymar.sampling import SamplingSettings
from lazymar.vae import tokens_to_images
from builders import tiny_mar, tiny_vae
from standins import StandInExtractor

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SETTINGS = SamplingSettings(num_iter=4, cfg=2.0)


latent_mar = partial(tiny_mar, num_sampling_steps="5")  # 8x8 latent tokens of 16 channels
upsampling_vae = partial(tiny_vae, z_channels=16, ch_mult=(1, 2))  # random KL VAE: 8x8 latents -> 16x16 images


class DeviceExtractor(StandInExtractor):
    """The stand-in extractor computing on ``device`` (as torch-fidelity's network does on the run's device)."""

    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)
        self.conv, self.fc = self.conv.to(self.device), self.fc.to(self.device)

    def __call__(self, images):
        return super().__call__(images.to(self.device))


@pytest.fixture
def imagenet_quality():
    """An ImageNet evaluator with the stand-in extractor on a device, passed to the runs explicitly."""
    def make(device: str) -> ImageNetQuality:
        reference = ReferenceStats(np.random.default_rng(0).normal(size=64) * 0.1, np.eye(64) * 0.05, "test")
        return ImageNetQuality(DeviceExtractor(device), reference)
    return make


@pytest.mark.parametrize("device", DEVICES)
def test_a_vae_model_is_scored_by_the_evaluator_it_is_given(device, imagenet_quality):
    """No global switch: a latent model has no evaluator of its own, and a run scores with the one passed to it."""
    model, vae = latent_mar().to(device), upsampling_vae().to(device)
    assert quality_evaluator(model) is None
    plan = SamplePlan.balanced(2, 10, seed=1, batch_size=2)
    assert Reference(model, plan, SETTINGS, vae=vae).evaluator is None
    quality = imagenet_quality(device)
    assert Reference(model, plan, SETTINGS, vae=vae, evaluator=quality).evaluator is quality
    assert Reference(model, plan, SETTINGS, vae=vae).evaluator is None  # nothing lingers from the last one


@pytest.mark.parametrize("device", DEVICES)
def test_streamed_scores_equal_all_images_at_once(device, imagenet_quality):
    model, vae, quality = latent_mar().to(device), upsampling_vae().to(device), imagenet_quality(device)
    plan = SamplePlan.balanced(12, 10, seed=4, batch_size=5)
    run = Run("none", plan, SETTINGS, None).repeat(model)
    space = ImageSpace(model, vae, decode_batch=5)
    assert not space.keep  # decoded images are streamed by default
    run.finish(space, quality)
    assert run.images is None and run.tokens.device.type == "cpu"
    images = tokens_to_images(model, run.tokens.to(device), vae).cpu().float()
    assert images.shape == (12, 3, 16, 16)
    direct = quality(images, plan.labels)  # one shot, no streaming
    assert set(direct) == set(ImageNetQuality.keys)
    np.testing.assert_allclose([run.quality[k] for k in quality.keys], [direct[k] for k in quality.keys],
                               rtol=1e-6)  # the extractor's float32 conv differs by batch size
    stats = InceptionStats()
    stats.add_images(StandInExtractor(), images)
    assert math.isclose(run.quality["fid"], stats.fid(quality.reference), rel_tol=1e-6)
    assert run.quality["inception_score"] >= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_reference_measures_psnr_streamed_as_on_kept_images(device, imagenet_quality):
    model, vae, quality = latent_mar().to(device), upsampling_vae().to(device), imagenet_quality(device)
    plan = SamplePlan.balanced(6, 10, seed=2, batch_size=3)
    schedule = load_schedule("lazymar", SETTINGS.num_iter, model.config)
    streamed = Reference(model, plan, SETTINGS, vae=vae, evaluator=quality)
    kept = Reference(model, plan, SETTINGS, vae=vae, keep_images=True, evaluator=quality)
    run_s, row_s = streamed.measure(schedule)
    run_k, row_k = kept.measure(schedule)
    assert run_s.images is None and run_k.images is not None
    assert torch.equal(run_s.tokens, run_k.tokens)
    # per-sample float64 sums (equal for any number of ranks) against numpy's float32 mean over all of them
    assert row_k["psnr"] == pytest.approx(psnr(run_k.images, kept.images, data_range=2.0), rel=1e-6)
    assert math.isclose(row_s["psnr"], row_k["psnr"], rel_tol=1e-6) and math.isfinite(row_s["psnr"])
    assert row_s["token_mse"] == pytest.approx(token_mse(run_s.tokens, streamed.tokens), rel=1e-6)
    assert row_s["token_mse"] > 0
    assert row_s["fid"] == pytest.approx(row_k["fid"], rel=1e-6)
    assert streamed.row()["psnr"] == math.inf and streamed.quality()["fid"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_runs_sample_on_the_device_with_the_seed_rule(device):
    """Run.repeat on ``device`` equals generating each batch with its seed on that device, in plan order; the tokens
    come back to the CPU and a second repetition is identical."""
    from lazymar.sampling import generate
    model = latent_mar().to(device)
    plan = SamplePlan.balanced(5, 10, seed=7, batch_size=2)
    run = Run("none", plan, SETTINGS, None).repeat(model).repeat(model)
    expected = torch.cat([generate(model, list(b.labels), SETTINGS, seed=torch.Generator(device).manual_seed(b.seed))
                          for b in plan.batches()]).cpu()
    assert run.tokens.device.type == "cpu" and torch.equal(run.tokens, expected)
    assert run.repeats_identical and len(run.seconds) == 2 and run.world_size == 1
    if device == "cuda":
        assert run.peak_memory_mb and all(m > 0 for m in run.peak_memory_mb)


def test_decode_and_score_without_image_space_is_empty():
    model = latent_mar()
    assert decode_and_score(ImageSpace(model), torch.zeros(2, model.seq_len, model.token_dim), [0, 1]) == (None, {})


def test_eval_without_torch_fidelity_says_so_in_one_line_before_sampling(tmp_path, monkeypatch, capsys):
    import sys

    from conftest import reference_dir
    from lazymar.cli import main
    checkpoint = reference_dir() / "mar_tiny_a.pth"
    if not checkpoint.is_file():
        pytest.skip("mar_tiny_a.pth fixture not available")
    torch.save({"model": upsampling_vae(ch=32, norm_groups=32).state_dict()}, tmp_path / "vae.ckpt")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as when it is not installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    import lazymar.runs.execute as execute
    monkeypatch.setattr(execute, "generate_tokens", lambda *a, **k: pytest.fail("sampled before failing"))
    code = main(["eval", "--model", str(checkpoint), "--vae", str(tmp_path / "vae.ckpt"),
                 "--fid-stats", str(tmp_path / "stats.npz"), "--num-samples", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "torch-fidelity" in err and err.startswith("lazymar eval: error:")
    assert main(["eval", "--model", str(checkpoint), "--fid-stats", str(tmp_path / "stats.npz")]) == 2
    assert "--vae" in capsys.readouterr().err


def test_imagenet_runs_get_fid_intervals_from_their_kept_features(imagenet_quality):
    """A VAE model's sweep row gets FID intervals and a paired FID verdict, resampled from the Inception features
    the stream kept (no image scored again); the point FID is the run's own."""
    from lazymar.runs import intervals
    model, vae, quality = latent_mar(), upsampling_vae(), imagenet_quality("cpu")
    plan = SamplePlan.balanced(12, 10, seed=3, batch_size=6)
    reference = Reference(model, plan, SETTINGS, vae=vae, evaluator=quality)
    run, row = reference.measure(load_schedule("lazymar", SETTINGS.num_iter, model.config))
    arrays = {"none": intervals.sample_arrays(reference.run, reference.run, quality),
              "lazymar": intervals.sample_arrays(run, reference.run, quality)}
    assert arrays["lazymar"]["features"].shape == (12, 64)
    found = intervals.intervals([arrays], intervals.IntervalOptions(resamples=200, baseline="none"), quality,
                                baseline="none")
    fid = found["lazymar"]
    assert fid["fid"] == pytest.approx(row["fid"], rel=1e-5)
    assert math.isfinite(fid["fid_ci_low"]) and fid["fid_ci_high"] > fid["fid_ci_low"]
    assert "d_fid" in fid and fid["verdict_fid"] in ("better", "no worse", "worse", "inconclusive")
