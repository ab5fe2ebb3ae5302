"""The qualitative figure: cached against uncached samples of the same plan, with difference maps."""
import numpy as np
import pytest

from analysis.sample_differences import SampleDifferences, draw_sample_differences, sample_differences
from lazymar import load_model
from lazymar.cache import load_schedule
from lazymar.runs import SamplePlan
from lazymar.sampling import SamplingSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def found():
    model = load_model("digits")  # pixel tokens: images without a VAE
    settings = SamplingSettings(num_iter=4, cfg=2.0)
    schedules = {"reuse nothing": load_schedule("none", 4, model.config),
                 "lazymar": load_schedule("lazymar", 4, model.config)}
    return sample_differences(model, schedules, SamplePlan((1, 2, 3), seed=5, batch_size=3), settings)


def test_a_schedule_that_reuses_nothing_has_no_difference(found):
    assert found.uncached.shape == (3, 8, 8, 1)
    assert np.abs(found.difference("reuse nothing")).max() < 1e-5
    assert found.difference("lazymar").max() > 1e-3  # the preset reuses features, so its samples move
    assert np.isfinite(found.psnr("lazymar")).all()


def test_differences_are_the_per_pixel_absolute_error():
    a = np.zeros((1, 2, 2, 3))
    b = a.copy()
    b[0, 0, 1] = [0.3, 0.6, 0.0]
    found = SampleDifferences((0,), a, {"x": b})
    np.testing.assert_allclose(found.difference("x")[0], [[0.0, 0.3], [0.0, 0.0]])
    assert found.psnr("x")[0] == pytest.approx(10 * np.log10(4 / (0.45 / 12)))


def test_the_figure_has_a_column_per_image_and_map(found, tmp_path):
    from analysis.figures import save_figure
    fig = draw_sample_differences(found, title="tiny")
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 3 * 5  # 3 samples x (uncached + 2 x (sample, map))
    paths = save_figure(fig, "differences", tmp_path)
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)


def test_the_uncached_name_is_reserved(found):
    with pytest.raises(ValueError, match="reference run"):
        sample_differences(None, {"uncached": None}, None, None)
