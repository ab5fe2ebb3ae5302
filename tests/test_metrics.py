"""Quality metrics: the Frechet distance on hand cases, the digits classifier and digits-FID on real and noise
images, fidelity metrics, and input errors."""
import math

import numpy as np
import pytest
import torch

from lazymar import metrics
from lazymar.digits import digits_split
from lazymar.metrics import (MetricsInputError, class_accuracy, digits_fid, evaluate_digits, fid_floor,
                             frechet_distance, hidden_features, psnr, token_mse)


def _random_spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


# --- Frechet distance ------------------------------------------------------------------------------------
def test_frechet_distance_diagonal_closed_form():
    # diagonal covariances commute: d = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 9.0, 1.0])
    expected = (1 + 0 + 4) + ((1 - 2) ** 2 + (2 - 3) ** 2 + (0.5 - 1) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # one dimension: (m1 - m2)^2 + (std1 - std2)^2
    assert frechet_distance(np.array([2.0]), np.array([[9.0]]), np.array([0.0]), np.array([[1.0]])) \
        == pytest.approx(4.0 + 4.0, rel=1e-10)


def test_frechet_distance_scaled_full_covariance():
    # sigma2 = c^2 sigma1 (dense): sqrt(sigma1 sigma2) = c sigma1, so d = tr(sigma1) (1 - c)^2
    sigma = _random_spd(5, seed=1)
    mu = np.arange(5.0)
    assert frechet_distance(mu, sigma, mu, 9.0 * sigma) == pytest.approx(np.trace(sigma) * 4.0, rel=1e-8)


def test_frechet_distance_zero_for_identical_statistics():
    sigma, mu = _random_spd(6, seed=2), np.linspace(-1, 1, 6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    singular = np.diag([2.0, 1.0, 0.0, 0.0])  # dead feature units give zero-variance directions
    assert frechet_distance(np.zeros(4), singular, np.zeros(4), singular) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_singular_covariances():
    # N(0, diag(1, 0)) vs N(0, [[1, 1], [1, 1]]): both singular; sqrt(s1 s2) = s1 s2 (idempotent), trace 1
    s1, s2 = np.diag([1.0, 0.0]), np.ones((2, 2))
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(1.0 + 2.0 - 2.0, abs=1e-6)


def test_frechet_distance_errors():
    with pytest.raises(MetricsInputError, match="means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(MetricsInputError, match="means"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(MetricsInputError, match="real square root"):  # not a covariance
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))


# --- the classifier, accuracy and digits-FID ---------------------------------------------------------------
def test_classifier_held_out_accuracy():
    images, labels = digits_split("held_out")
    assert class_accuracy(images, labels) >= 0.97
    assert class_accuracy(images, labels.roll(1)) < 0.25  # wrong labels score near chance
    assert class_accuracy(images.numpy(), labels.numpy()) == class_accuracy(images, labels)


def test_real_images_score_near_the_floor_noise_far_above():
    held_out, labels = digits_split("held_out")
    floor = fid_floor()
    assert floor == digits_fid(held_out) and 0.0 < floor
    half = slice(0, len(held_out) // 2)  # half the sample size: a little above the floor, still real
    assert digits_fid(held_out[half]) < 4 * floor
    assert class_accuracy(held_out[half], labels[half]) >= 0.95

    noise = torch.rand(len(held_out), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert digits_fid(noise) > 30 * floor
    assert class_accuracy(noise, labels) < 0.25  # ~chance (0.1)
    blank = -torch.ones(100, 1, 8, 8)
    assert digits_fid(blank) > 30 * floor


def test_evaluate_digits_combines_the_metrics():
    images, labels = digits_split("held_out")
    result = evaluate_digits(images[:200], labels[:200])
    assert result == {"accuracy": class_accuracy(images[:200], labels[:200]), "fid": digits_fid(images[:200]),
                      "fid_floor": fid_floor(), "num_samples": 200}


def test_hidden_features_clip_overshoot_like_to_pixels():
    images, _ = digits_split("held_out")
    feats = hidden_features(images[:20])
    assert feats.shape == (20, metrics.HIDDEN_UNITS) and (feats >= 0).all()
    overshoot = images[:20] * 1.2  # sampled tokens may leave [-1, 1] slightly; they are clipped like to_pixels
    np.testing.assert_array_equal(hidden_features(overshoot), hidden_features(overshoot.clamp(-1, 1)))
    assert not np.array_equal(hidden_features(overshoot), feats)


def test_training_recipe_reproduces_the_committed_classifier(tmp_path, monkeypatch):
    # with no file, load_classifier trains (fixed seed) and caches; the cached file round-trips exactly
    committed = metrics.load_classifier()
    monkeypatch.setattr(metrics, "CLASSIFIER_PATH", tmp_path / "classifier.npz")
    metrics.load_classifier.cache_clear()
    try:
        fresh = metrics.load_classifier()
        assert (tmp_path / "classifier.npz").exists()
        reloaded = metrics.DigitsClassifier.load(tmp_path / "classifier.npz")
        for name in ("w1", "b1", "w2", "b2"):
            np.testing.assert_array_equal(getattr(reloaded, name), getattr(fresh, name))
        images, labels = digits_split("held_out")
        x = metrics._classifier_input(images)
        assert (fresh.predict(x) == labels.numpy()).mean() >= 0.97
        # the same recipe: the same network up to BLAS round-off across machines
        assert (fresh.predict(x) == committed.predict(x)).mean() >= 0.98
    finally:
        metrics.load_classifier.cache_clear()


# --- fidelity metrics ---------------------------------------------------------------------------------------
def test_token_mse_and_psnr_hand_cases():
    a = torch.zeros(2, 4, 1)
    b = torch.full((2, 4, 1), 0.5)
    assert token_mse(a, b) == pytest.approx(0.25)
    assert psnr(a, b) == pytest.approx(10 * math.log10(4 / 0.25))  # 12.04 dB for data range 2
    assert psnr(a, b, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.25))
    c = np.array([[0.0, 1.0], [2.0, -1.0]])
    d = np.array([[1.0, 1.0], [0.0, -1.0]])
    assert token_mse(c, d) == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert token_mse(torch.from_numpy(c), d) == token_mse(c, d)
    assert psnr(b, b) == math.inf and token_mse(b, b) == 0.0


def test_fidelity_metric_errors():
    with pytest.raises(MetricsInputError, match="shapes differ"):
        token_mse(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(MetricsInputError, match="shapes differ"):
        psnr(np.zeros(4), np.zeros(5))
    with pytest.raises(MetricsInputError, match="data_range"):
        psnr(np.zeros(4), np.ones(4), data_range=0.0)
    with pytest.raises(MetricsInputError, match="Tensor or numpy"):
        token_mse([0.0], [1.0])


# --- input errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (4, 8, 8), (4, 1, 16, 16), (0, 1, 8, 8), (64,)])
def test_wrong_image_shapes_are_rejected(shape):
    images = torch.zeros(shape)
    for metric in (hidden_features, digits_fid):
        with pytest.raises(MetricsInputError, match=r"shape \(N, 1, 8, 8\)"):
            metric(images)
    with pytest.raises(MetricsInputError, match=r"shape \(N, 1, 8, 8\)"):
        class_accuracy(images, torch.zeros(len(images), dtype=torch.long))


def test_bad_values_and_labels_are_rejected():
    images, labels = digits_split("held_out")
    with pytest.warns(metrics.MetricsInputWarning, match=r"in \[-1, 1\]"):
        features = hidden_features((images[:5] + 1) * 8)  # the 0..16 pixel scale: clipped, scored, warned
    np.testing.assert_array_equal(features, hidden_features(((images[:5] + 1) * 8).clamp(-1, 1)))
    with pytest.raises(MetricsInputError, match="NaN"):
        hidden_features(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(MetricsInputError, match=r"labels must have shape \(5,\)"):
        class_accuracy(images[:5], labels[:4])
    with pytest.raises(MetricsInputError, match="0..9"):
        class_accuracy(images[:2], torch.tensor([0, 10]))
    with pytest.raises(MetricsInputError, match="integers"):
        class_accuracy(images[:2], torch.tensor([0.0, 1.0]))
    with pytest.raises(MetricsInputError, match="N >= 2"):
        digits_fid(images[:1])
