"""Quality at each digits model's own resolution: fid32 (the 32x32 classifier), roughness, and the evaluator."""
import math

import numpy as np
import pytest
import torch

from lazymar import metrics
from lazymar.config import get_config
from lazymar.digits import digits_split, to_8x8, upsample
from lazymar.metrics import class_accuracy, digits_fid, evaluate_native, fid_floor
from lazymar.model import MAR
from lazymar.roughness import add_pixel_noise, noisy_copies, per_image_roughness, roughness, roughness_real
from lazymar.runs.images import DigitsQuality, quality_evaluator


def _uniform_noise(images: torch.Tensor, amplitude: float, seed: int = 0) -> torch.Tensor:
    """Uniform noise in [-amplitude, amplitude], a kind the 32x32 classifier was not trained on, clipped."""
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return (images + amplitude * noise).clamp(-1, 1)


# --- roughness ----------------------------------------------------------------------------------------------
def test_roughness_hand_cases():
    assert roughness(torch.full((3, 1, 4, 4), 0.3)) == 0.0
    checker = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).reshape(1, 1, 2, 2)
    assert roughness(checker) == 2.0  # all four neighbour pairs differ by 2
    ramp = torch.linspace(-1, 1, 5).repeat(5, 1).reshape(1, 1, 5, 5)  # steps of 0.5 across, 0 down
    assert roughness(ramp) == pytest.approx(0.25)
    np.testing.assert_allclose(per_image_roughness(torch.cat([ramp, ramp * 0])), [0.25, 0.0])
    assert roughness(ramp * 3) == roughness(ramp.sign())  # scored clipped to [-1, 1]


@pytest.mark.parametrize("side", [8, 32])
def test_roughness_of_noisy_digits_is_farther_from_real(side):
    images, _ = digits_split("held_out", side)
    real = roughness_real(side)
    assert roughness(images) == real
    train_gap = abs(roughness(digits_split("train", side)[0]) - real) / real
    assert train_gap < 0.02  # real digits of the other split: within 2 %
    gaps = [abs(roughness(_uniform_noise(images, a)) - real) / real for a in (0.1, 0.3)]
    assert train_gap < gaps[0] < gaps[1]
    assert gaps[0] > (0.15 if side == 32 else 0.005)  # 32x32 digits are smooth: noise shows at once
    assert roughness_real(32) < roughness_real(8) / 3  # upsampling spreads each step over four pixels


def test_pixel_noise_kinds():
    images, _ = digits_split("held_out", 32)
    images = images[:10]
    g = torch.Generator().manual_seed(0)
    block = add_pixel_noise(torch.zeros(2, 1, 32, 32), "block", 0.1, g)  # mid-grey: nothing clipped
    for di, dj in ((0, 1), (1, 0), (1, 1)):  # constant over each 2x2 block (a digits16 token)
        assert torch.equal(block[..., 0::2, 0::2], block[..., di::2, dj::2])
    assert block.unique().numel() == 2 * 16 * 16  # one value per block
    speckled = add_pixel_noise(images, "speckle", 0.4, g)
    assert 0.05 < (speckled != images).float().mean() < 0.15  # ~ amplitude / 4 of the pixels
    with pytest.raises(ValueError, match="noise kind"):
        add_pixel_noise(images, "pink", 0.1, g)
    assert torch.equal(noisy_copies(images, 3), noisy_copies(images, 3))
    assert roughness(noisy_copies(images, 3)) > 1.5 * roughness(images)


# --- fid32 ----------------------------------------------------------------------------------------------------
def test_classifier32_accuracy_and_floor():
    images, labels = digits_split("held_out", 32)
    assert class_accuracy(images, labels, side=32) >= 0.97
    floor = fid_floor(32)
    assert floor == digits_fid(images, side=32) and 0 < floor
    assert metrics.hidden_features(images[:5], side=32).shape == (5, metrics.HIDDEN_UNITS)
    with pytest.raises(metrics.MetricsInputError, match=r"shape \(N, 1, 32, 32\)"):
        digits_fid(torch.zeros(4, 1, 8, 8), side=32)


def test_fid32_sees_the_noise_that_to_8x8_averages_away():
    images, _ = digits_split("held_out", 32)
    clean32, clean8 = fid_floor(32), digits_fid(to_8x8(images))
    fid32, fid8 = [], []
    for amplitude in (0.05, 0.1, 0.2):
        noisy = _uniform_noise(images, amplitude)
        fid32.append(digits_fid(noisy, side=32))
        fid8.append(digits_fid(to_8x8(noisy)))
    assert clean32 < fid32[0] < fid32[1] < fid32[2]  # graded: more noise, farther from real
    assert fid32[1] > 5 * clean32  # noise of +-0.1 (5 % of the range) is far from real at 32x32 ...
    assert fid8[1] < 1.1 * clean8  # ... and barely moves digits-FID after to_8x8 (the same images)
    assert fid32[2] / clean32 > 10 * fid8[2] / clean8


def test_fid32_recipe_reproduces_the_committed_classifier(tmp_path, monkeypatch):
    committed = metrics.load_classifier(32)
    monkeypatch.setattr(metrics, "CLASSIFIER_PATH", tmp_path / "digits_classifier.npz")
    metrics.load_classifier.cache_clear()
    try:
        fresh = metrics.load_classifier(32)  # no file: trained with the recipe and saved
        saved = tmp_path / "digits32_classifier.npz"
        assert saved.exists() and not (tmp_path / "digits_classifier.npz").exists()
        reloaded = metrics.DigitsClassifier.load(saved)
        for name in ("w1", "b1", "w2", "b2"):
            np.testing.assert_array_equal(getattr(reloaded, name), getattr(fresh, name))
        assert fresh.w2.shape == (metrics.HIDDEN_UNITS, metrics.NUM_CLASSES + 1)  # the noisy class
        x = metrics._classifier_input(digits_split("held_out", 32)[0], 32)
        assert (fresh.predict(x) == committed.predict(x)).mean() >= 0.98
    finally:
        metrics.load_classifier.cache_clear()


# --- the evaluator --------------------------------------------------------------------------------------------
def test_native_quality_and_the_evaluator_at_both_resolutions():
    small, labels = digits_split("held_out")
    small, labels = small[:60], labels[:60].tolist()
    big = upsample(small, 32)
    assert set(evaluate_native(small)) == {"roughness", "roughness_real"}
    native = evaluate_native(big)
    assert native["fid32"] == digits_fid(big, side=32) and native["fid32_floor"] == fid_floor(32)
    assert native["roughness"] == roughness(big) and native["roughness_real"] == roughness_real(32)
    assert math.isnan(evaluate_native(big[:1])["fid32"])

    evaluator16 = quality_evaluator(MAR(get_config("digits16")))
    assert evaluator16.keys == ("accuracy", "fid", "fid_floor", "fid32", "fid32_floor", "roughness",
                                "roughness_real")
    assert quality_evaluator(MAR(get_config("digits"))).keys == DigitsQuality.keys
    scores = evaluator16(big, labels)
    assert set(scores) == set(evaluator16.keys)
    assert scores["fid"] == pytest.approx(DigitsQuality()(small, labels)["fid"], rel=1e-3)  # after to_8x8
    assert scores["fid32"] == native["fid32"] and scores["roughness"] == native["roughness"]
    noisy = evaluator16(_uniform_noise(big, 0.2), labels)
    assert noisy["fid32"] > 5 * scores["fid32"] and noisy["roughness"] > 1.5 * scores["roughness"]


def test_sweep_tables_show_the_native_quality_where_measured():
    import pandas as pd
    from lazymar.sweep import front_markdown
    row = {"name": "lazymar", "family": "lazymar", "flops_ratio": 2.6, "wall_ratio": 2.0, "psnr": 30.0,
           "accuracy": 0.97, "fid": 2.5}
    plain = front_markdown(pd.DataFrame([row])).splitlines()
    assert plain[0] == "| name | family | flops_ratio | wall_ratio | psnr | accuracy | fid |"
    native = front_markdown(pd.DataFrame([{**row, "fid32": 4.0, "roughness": 0.1234, "roughness_real": 0.0958}]))
    head, _, body = native.splitlines()
    assert head.endswith("| fid | fid32 | roughness | roughness_real |")
    assert body.endswith("| 2.50 | 4.00 | 0.123 | 0.096 |")


def test_intervals_and_verdicts_of_the_native_quality():
    from lazymar.runs import intervals
    from lazymar.runs.native_intervals import ROUGHNESS_GAP_MARGIN
    images, labels = digits_split("held_out", 32)
    images, labels = images[:200], labels[:200].tolist()
    evaluator = DigitsQuality(32)
    noisy_images = _uniform_noise(images, 0.1)
    arrays = {name: intervals.image_sample_arrays(x, labels, evaluator, reference_images=images)
              for name, x in (("clean", images), ("noisy", noisy_images))}
    assert arrays["clean"]["features_native"].shape == (200, metrics.HIDDEN_UNITS)
    np.testing.assert_array_equal(arrays["noisy"]["roughness"], per_image_roughness(noisy_images))
    options = intervals.IntervalOptions(resamples=200, baseline="clean")
    found = intervals.intervals([arrays], options, evaluator, baseline="clean")
    c, n = found["clean"], found["noisy"]
    assert c["fid32"] == pytest.approx(digits_fid(images, side=32), rel=1e-5)
    assert 0 < c["fid32_ci_low"] < c["fid32_ci_high"] < n["fid32_ci_low"]  # (resampled FID sits above the point)
    gap = abs(roughness(noisy_images) / roughness_real(32) - 1)
    assert n["roughness_gap"] == pytest.approx(gap) and gap > ROUGHNESS_GAP_MARGIN
    assert n["d_fid32_ci_low"] > 0 and n["verdict_fid32"] == "worse"
    assert n["verdict_roughness_gap"] == "worse" and n["verdict"] == "worse"
    # an 8x8 model's runs: the roughness gap only
    small = intervals.image_sample_arrays(to_8x8(images), labels, DigitsQuality(8))
    assert small["features_native"] is None and small["roughness"].shape == (200,)
