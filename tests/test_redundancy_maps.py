"""Redundancy per grid position and per class: hand-computed means on a small synthetic recording, intervals
that hold the mean, and figures with labelled axes."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from analysis import redundancy_maps  # noqa: E402
from analysis.phenomena import AnalysisError  # noqa: E402
from test_plots import synthetic  # noqa: E402


def _recording():
    """Sample 0 changes by 0.1 at grid position (0, 1) and 0.3 elsewhere, sample 1 by 0.2 everywhere (output
    kind of decoder.0); step 0 has no predecessor (NaN)."""
    cos = np.full((2, 3, 3, 3, 5), np.nan, np.float32)
    cos[0, 1:, 1, 0, 1:] = 1 - 0.3
    cos[0, 1:, 1, 0, 2] = 1 - 0.1   # position 2 = token 1 = grid (0, 1)
    cos[1, 1:, 1, 0, 1:] = 1 - 0.2
    return synthetic(token_cosine=cos)


def test_change_by_position_is_the_mean_over_samples_and_steps():
    found = redundancy_maps.change_by_position(_recording(), "decoder.0")
    assert found["mean"].shape == (2, 2) and found.attrs["n_samples"] == 2
    np.testing.assert_allclose(found["mean"].values, [[0.25, 0.15], [0.25, 0.25]], atol=1e-6)
    assert (found["count"].values == 4).all()  # 2 samples x 2 steps with a predecessor
    assert (found["ci_low"] <= found["mean"] + 1e-9).all() and (found["mean"] <= found["ci_high"] + 1e-9).all()
    assert float(found["ci_low"][0, 1]) == pytest.approx(0.1, abs=1e-6)  # a resample of sample 0 twice
    assert float(found["ci_high"][0, 1]) == pytest.approx(0.2, abs=1e-6)


def test_change_by_class_keeps_each_class_apart():
    found = redundancy_maps.change_by_class(_recording(), "decoder.0")
    assert list(found.index) == [3, 7] and found["n_samples"].tolist() == [1, 1]
    assert found.loc[3, "mean"] == pytest.approx((0.3 * 3 + 0.1) / 4, abs=1e-6)
    assert found.loc[7, "mean"] == pytest.approx(0.2, abs=1e-6)
    assert np.isnan(found["ci_low"]).all()  # one sample per class: no interval


def test_an_unknown_layer_is_refused():
    with pytest.raises(AnalysisError, match="unknown layer 'decoder.9'"):
        redundancy_maps.change_by_position(_recording(), "decoder.9")


def test_figures_label_their_axes_and_state_n():
    ds = _recording()
    fig = redundancy_maps.plot_change_by_position(redundancy_maps.change_by_position(ds, "decoder.0"))
    assert "n = 2 samples" in fig._suptitle.get_text()
    assert all(ax.get_xlabel() for ax in fig.axes[:2])
    fig = redundancy_maps.plot_change_by_class(redundancy_maps.change_by_class(ds, "decoder.0"), "decoder.0")
    assert fig.axes[0].get_xlabel() == "class label" and "n=1" in [t.get_text() for t in fig.axes[0].texts]
