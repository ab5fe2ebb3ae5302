"""FID and IS of decoded samples (lazymar.imagenet): the real code path with a stand-in extractor and reference
statistics computed here; torch-fidelity itself (not installable here) is replaced by a fake module or absent."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from scipy.special import softmax

from lazymar.imagenet import (INSTALL_HINT, ImageNetMetricsError, InceptionStats, ReferenceStats, load_inception,
                              load_reference_stats, save_pngs, to_uint8)
from standins import StandInExtractor


def random_images(n: int, seed: int = 0, size: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2.2 - 1.1  # a little outside [-1, 1], as decoders give


def features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + 3.0, torch.randn(n, 5, generator=g) * 3


def stats_of(batches, starts=None) -> InceptionStats:
    s = InceptionStats()
    for i, (x, z) in enumerate(batches):
        s.add(x, z, None if starts is None else starts[i])
    return s


# --- images ------------------------------------------------------------------------------------------
def test_to_uint8_is_the_official_expression():
    x = torch.cat([random_images(4).flatten(), torch.tensor([-1.0, 1.0, 0.0, -3.0, 2.0, -0.5, 0.5, -1e-6, 1e-6])])
    x = x.reshape(1, 3, 1, -1)
    official = np.round(np.clip(((x.numpy() + 1) / 2) * 255, 0, 255)).astype(np.uint8)  # engine_mar.py's order
    got = to_uint8(x)
    assert got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), official)
    assert got.flatten()[-9:].tolist() == [0, 255, 128, 0, 255, 64, 191, 127, 128]  # 127.5 rounds half to even


def test_to_uint8_rejects_non_rgb():
    with pytest.raises(ImageNetMetricsError, match="RGB"):
        to_uint8(torch.zeros(2, 1, 8, 8))


def test_pngs_hold_the_uint8_images(tmp_path):
    from PIL import Image
    images = to_uint8(random_images(3))
    paths = save_pngs(images, tmp_path, start=40)
    assert [p.name for p in paths] == ["00040.png", "00041.png", "00042.png"]
    back = np.stack([np.asarray(Image.open(p)) for p in paths]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(back, images.numpy())


def test_the_extractor_sees_the_uint8_images():
    extractor, images = StandInExtractor(), random_images(5)
    InceptionStats().add_images(extractor, images)
    assert torch.equal(extractor.calls[0], to_uint8(images))


# --- FID ---------------------------------------------------------------------------------------------
def test_feature_statistics_equal_numpy():
    batches = [features(n, seed=n) for n in (7, 1, 12)]
    x = torch.cat([b[0] for b in batches]).double().numpy()
    mu, sigma = stats_of(batches).feature_statistics()
    np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-13)


def test_fid_against_own_statistics_is_zero_and_against_shifted_is_the_shift():
    stats = InceptionStats()
    extractor = StandInExtractor()
    for k in range(4):
        stats.add_images(extractor, random_images(100, seed=k))
    mu, sigma = stats.feature_statistics()
    assert stats.fid(ReferenceStats(mu, sigma, "own")) == pytest.approx(0.0, abs=1e-6)
    delta = np.linspace(-0.3, 0.5, len(mu))
    assert stats.fid(ReferenceStats(mu + delta, sigma, "shifted")) == pytest.approx(float(delta @ delta), rel=1e-6)
    # another covariance: ||dmu||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) with S2 = 4 S1 gives tr(S1) (1 + 4 - 4)
    assert stats.fid(ReferenceStats(mu, 4 * sigma, "scaled")) == pytest.approx(float(np.trace(sigma)), rel=1e-6)


def test_fid_needs_matching_dimensions_and_two_samples():
    stats = stats_of([features(10)])
    with pytest.raises(ImageNetMetricsError, match="ref.npz holds statistics of 3-dim features.*8-dim"):
        stats.fid(ReferenceStats(np.zeros(3), np.eye(3), "ref.npz"))
    with pytest.raises(ImageNetMetricsError, match="at least 2 samples"):
        stats_of([features(1)]).feature_statistics()


# --- IS ----------------------------------------------------------------------------------------------
def test_inception_score_of_uniform_logits_is_one():
    stats = stats_of([(torch.randn(40, 4), torch.zeros(40, 10))])
    mean, std = stats.inception_score(splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_the_number_of_classes():
    logits = 60.0 * torch.eye(10)  # sample i is surely class i
    mean, _ = stats_of([(torch.randn(10, 4), logits)]).inception_score(splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9)


def test_inception_score_follows_torch_fidelity_recipe():
    """Samples permuted with RandomState(2020), cut into splits, exp(mean KL(p || mean p)) per split."""
    batches = [features(n, seed=n) for n in (13, 20, 17)]
    z = torch.cat([b[1] for b in batches]).double().numpy()
    z = z[np.random.RandomState(2020).permutation(len(z))]
    scores = []
    for i in range(5):
        p = softmax(z[i * len(z) // 5:(i + 1) * len(z) // 5], axis=1)
        scores.append(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(axis=0))), axis=1))))
    mean, std = stats_of(batches).inception_score(splits=5)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12) and std == pytest.approx(np.std(scores), rel=1e-9)


def test_inception_score_needs_every_sample_once():
    (x, z) = features(6)
    with pytest.raises(ImageNetMetricsError, match="samples 3..4 are missing"):
        stats_of([(x[:3], z[:3]), (x[3:], z[3:])], starts=[0, 5]).inception_score(splits=2)
    with pytest.raises(ImageNetMetricsError, match="at least 10 samples"):
        stats_of([(x, z)]).inception_score(splits=10)


# --- streaming and merging ---------------------------------------------------------------------------
def test_streaming_over_batches_equals_one_shot():
    batches = [features(n, seed=n) for n in (5, 9, 3, 11)]
    one = stats_of([tuple(torch.cat(parts) for parts in zip(*batches))])
    streamed = stats_of(batches)
    for a, b in zip(one.feature_statistics(), streamed.feature_statistics()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(one.ordered_logits(), streamed.ordered_logits())
    assert one.inception_score(splits=4) == streamed.inception_score(splits=4)


def test_merging_rank_accumulators_equals_one_bit_for_bit():
    """Batches dealt round robin to 3 ranks, merged in rank order: the same float64 sums as adding them in order."""
    batches = [features(8, d=32, seed=k) for k in range(12)]
    starts = list(np.cumsum([0] + [8] * 11))
    single = stats_of(batches, starts)
    ranks = [stats_of(batches[r::3], starts[r::3]) for r in range(3)]
    merged = InceptionStats.merged(ranks + [InceptionStats()])  # an idle rank contributes nothing
    assert merged.count == single.count == 96
    for a, b in zip(single.feature_statistics(), merged.feature_statistics()):
        np.testing.assert_array_equal(a, b)
    ref = ReferenceStats(np.zeros(32), np.eye(32), "ref")
    assert merged.scores(ref, splits=4) == single.scores(ref, splits=4)


# --- reference statistics ----------------------------------------------------------------------------
def test_reference_statistics_from_npz_and_torch_fidelity_cache(tmp_path):
    mu, sigma = np.arange(4.0), np.diag([1.0, 2.0, 3.0, 4.0])
    np.savez(tmp_path / "adm_in256_stats.npz", mu=mu, sigma=sigma)
    torch.save({"mu": mu.astype(np.float32), "sigma": sigma}, tmp_path / "cache-stat-fid-2048.pt")
    for name in ("adm_in256_stats.npz", "cache-stat-fid-2048.pt"):
        ref = load_reference_stats(tmp_path / name)
        np.testing.assert_array_equal(ref.mu, mu)
        np.testing.assert_array_equal(ref.sigma, sigma)
        assert ref.mu.dtype == np.float64 and ref.path.endswith(name)


def test_bad_reference_statistics_name_the_file(tmp_path):
    with pytest.raises(ImageNetMetricsError, match="not found: .*nothing.npz"):
        load_reference_stats(tmp_path / "nothing.npz")
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(ImageNetMetricsError, match="text.npz is not FID reference statistics"):
        load_reference_stats(tmp_path / "text.npz")
    np.savez(tmp_path / "keys.npz", mean=np.zeros(3))
    with pytest.raises(ImageNetMetricsError, match="keys.npz is not FID reference statistics.*'mu'"):
        load_reference_stats(tmp_path / "keys.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ImageNetMetricsError, match=r"shape.npz: 'mu' must be \(D,\)"):
        load_reference_stats(tmp_path / "shape.npz")


# --- the real extractor ------------------------------------------------------------------------------
def fake_torch_fidelity(monkeypatch, network_class) -> None:
    package = types.ModuleType("torch_fidelity")
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = network_class
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)


def test_missing_torch_fidelity_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as when it is not installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImageNetMetricsError) as err:
        load_inception()
    assert str(err.value).startswith(INSTALL_HINT) and "\n" not in str(err.value)
    assert "pip install torch-fidelity torchvision" in str(err.value)


def test_missing_inception_weights_is_one_clear_line(monkeypatch):
    class Offline(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nTraceback ...")

    fake_torch_fidelity(monkeypatch, Offline)
    with pytest.raises(ImageNetMetricsError, match="Inception weights failed: OSError: <urlopen") as err:
        load_inception()
    assert "\n" not in str(err.value)


def test_the_real_extractor_asks_torch_fidelity_for_pool_features_and_unbiased_logits(monkeypatch):
    class FakeInception(torch.nn.Module):
        """Stands for FeatureExtractorInceptionV3: returns the requested features in the requested order."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__()
            self.name, self.features_list, self.weights = name, features_list, feature_extractor_weights_path
            self.batch_sizes = []

        def forward(self, x):
            assert x.dtype == torch.uint8
            self.batch_sizes.append(len(x))
            pooled = x.float().mean(dim=(2, 3))
            out = {"2048": pooled.repeat(1, 4), "logits_unbiased": pooled[:, :2]}
            return tuple(out[f] for f in self.features_list)

    fake_torch_fidelity(monkeypatch, FakeInception)
    extractor = load_inception("cpu", weights_path="w.pth", batch_size=4)
    net = extractor.network
    assert (net.name, net.features_list, net.weights) == ("inception-v3-compat", ["2048", "logits_unbiased"], "w.pth")
    images = to_uint8(random_images(10))
    feats, logits = extractor(images)
    assert net.batch_sizes == [4, 4, 2] and feats.shape == (10, 12) and logits.shape == (10, 2)
    np.testing.assert_allclose(logits.numpy(), images.float().mean(dim=(2, 3))[:, :2].numpy())
