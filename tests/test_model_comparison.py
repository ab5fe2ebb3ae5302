"""analysis.model_comparison: two small recorded models (4x4 and 8x8 tokens, one NetCDF and one Zarr) side by side,
each table checked against a hand computation from the recording, missing files reported rather than raised."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import model_comparison as mc  # noqa: E402
from lazymar import get_config  # noqa: E402
from lazymar.recording import STATUS_CODES, record  # noqa: E402
from lazymar.sampling import SamplingSettings  # noqa: E402
from lazymar.schedules import RedundancyProfile  # noqa: E402
from lazymar.sweep import load_sweep, pareto_front  # noqa: E402
from builders import tiny_mar  # noqa: E402
from conftest import REPO  # noqa: E402

SWEEP = REPO / "data" / "sweeps" / "digits_heldout_seed7.csv"
SKIPPABLE_CODES = [STATUS_CODES[s] for s in ("buffer", "known", "masked")]
UNKNOWN_CODES = [STATUS_CODES[s] for s in ("to_predict", "masked")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, tuple]:
    """{name: (recording, sweep)}: "grid4" (4x4 tokens, NetCDF) and "grid8" (8x8 tokens, Zarr), 3 samples and 4
    steps each, both with the committed digits sweep as their sweep."""
    folder = tmp_path_factory.mktemp("models")
    settings = SamplingSettings(num_iter=4, cfg=2.0)
    out = {}
    for name, img_size, suffix in (("grid4", 64, ".nc"), ("grid8", 128, ".zarr")):
        model = tiny_mar(img_size=img_size, num_sampling_steps="5", randomise="head", std=0.1, token_std=0.5)
        record(model, folder / f"{name}{suffix}", num_samples=3, settings=settings, seed=1, batch_size=3,
               model_name=name, progress=False)
        out[name] = (folder / f"{name}{suffix}", SWEEP)
    return out


@pytest.fixture(scope="module")
def models(paths) -> mc.Models:
    return mc.open_models(paths)


def test_open_models_reads_both_formats_lazily_and_reports_what_is_missing(paths, tmp_path):
    opened = mc.open_models({**paths, "absent": (tmp_path / "absent.zarr", SWEEP),
                             "no sweep": (paths["grid4"][0], tmp_path / "absent.csv"),
                             "not given": paths["grid8"][0]})
    assert list(opened.recordings) == ["grid4", "grid8", "no sweep", "not given"]
    assert hasattr(opened.recordings["grid8"]["token_cosine"].data, "dask")  # the Zarr store is not loaded
    assert list(opened.sweeps) == ["grid4", "grid8"]
    assert set(opened.missing) == {"absent", "no sweep", "not given"}
    text = opened.missing_markdown()
    assert "no recording at" in text and "absent.zarr" in text and "no sweep at" in text and "absent.csv" in text
    assert len(text.splitlines()) == 3


def test_token_redundancy_equals_a_hand_count(models):
    table = mc.token_redundancy(models.recordings, thresholds=(0.99, 0.9999))
    assert list(dict.fromkeys(table["model"])) == ["grid4", "grid8"]
    for model, ds in models.recordings.items():
        status = ds["status"].values  # (sample, step, position)
        reusable = np.isin(status, SKIPPABLE_CODES)
        for block, layer in (("first decoder block", "decoder.0"), ("last decoder block", "decoder.1")):
            cos = ds["token_cosine"].sel(layer=layer, kind="v").values
            for t in (0.99, 0.9999):
                part = table[(table["model"] == model) & (table["block"] == block) & (table["threshold"] == t)]
                assert (part["layer"] == layer).all()
                for step in range(1, ds.sizes["step"]):
                    values = cos[:, step][reusable[:, step] & np.isfinite(cos[:, step])]
                    row = part[part["step"] == step].iloc[0]
                    assert row["count"] == values.size > 0
                    assert row["fraction"] == pytest.approx((values > t).mean())
        assert 0 not in set(table.loc[table["model"] == model, "step"])  # no previous step at step 0
    # positions to predict and those just decoded are left out: the count is below all positions
    grid4 = models.recordings["grid4"]
    assert table.loc[table["model"] == "grid4", "count"].max() < grid4.sizes["sample"] * grid4.sizes["position"]


def test_condition_redundancy_is_the_mean_residual_cosine_on_unknown_positions(models):
    table = mc.condition_redundancy(models.recordings)
    assert list(dict.fromkeys(table["model"])) == ["grid4", "grid8"] and set(table["layer"]) == {"z"}
    for model, ds in models.recordings.items():
        cos = ds["cfg_residual_cosine"].sel(layer="z").values
        unknown = np.isin(ds["status"].values, UNKNOWN_CODES) & np.isfinite(cos)
        rows = table[table["model"] == model].set_index("step")["residual_cosine"]
        expected = {s: cos[:, s][unknown[:, s]].mean() for s in range(ds.sizes["step"]) if unknown[:, s].any()}
        assert sorted(rows.index) == sorted(expected) and 0 not in expected
        for step, value in expected.items():
            assert rows[step] == pytest.approx(value, rel=1e-6)


def test_selection_layers_are_each_models_study(models, paths):
    table = mc.selection_layers(models.recordings)
    assert list(dict.fromkeys(table["model"])) == ["grid4", "grid8"]
    for model, tokens in (("grid4", 16), ("grid8", 64)):
        buffer = get_config("mar_tiny", img_size=64 if tokens == 16 else 128).buffer_size
        assert set(table.loc[table["model"] == model, "grid"]) == {f"{tokens} tokens + {buffer} buffer"}
    for model, (stats, _) in paths.items():
        study = RedundancyProfile.from_stats(stats).selection
        rows = table[table["model"] == model].set_index("layer")
        assert list(rows.index) == list(study.index) == ["decoder.0", "decoder.1"]
        np.testing.assert_allclose(rows[["auroc", "spearman"]].to_numpy(), study[["auroc", "spearman"]].to_numpy())
        assert rows["recommended"].sum() == 1
        assert rows.loc[rows["recommended"], "block"].item() == study.attrs["recommended"]


def _sweep(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["name", "family", "flops_ratio", "wall_ratio", "psnr", "accuracy", "fid"])


def test_best_derived_row_is_the_fastest_no_worse_than_the_preset():
    sweep = _sweep([("none", "none", 1.0, 1.0, np.inf, 0.9, 2.0),
                    ("lazymar", "lazymar", 2.6, 2.4, 30.0, 0.9, 3.0),
                    ("fast but worse", "derived", 5.0, 4.0, 29.0, 0.9, 2.9),
                    ("good", "derived", 4.0, 3.0, 31.0, 0.9, 2.95),
                    ("slower", "derived", 3.0, 2.0, 35.0, 0.9, 2.5),
                    ("sharp but worse fid", "derived", 4.5, 3.5, 33.0, 0.9, 3.5),
                    ("peer", "gtr", 6.0, 5.0, 40.0, 0.9, 2.0)])
    best = mc.best_schedules({"m": sweep})
    assert list(best.index) == [("m", "lazymar preset"), ("m", "best derived")]
    assert best.loc[("m", "best derived"), "name"] == "good" and best.loc[("m", "best derived"), "no_worse_than_lazymar"]
    assert best.loc[("m", "lazymar preset"), "psnr"] == 30.0
    # none no worse than the preset: the fastest derived row on the front, flagged
    worse = sweep[sweep["name"].isin(["none", "lazymar", "fast but worse"])]
    fallback = mc.best_schedules({"m": worse}).loc[("m", "best derived")]
    assert fallback["name"] == "fast but worse" and not fallback["no_worse_than_lazymar"]


def test_committed_sweep_best_schedules_and_fronts(models):
    best = mc.best_schedules(models.sweeps)
    sweep = load_sweep(SWEEP)
    for model in ("grid4", "grid8"):
        preset = best.loc[(model, "lazymar preset")]
        assert preset["flops_ratio"] == sweep.loc[sweep["name"] == "lazymar", "flops_ratio"].item()
        derived = best.loc[(model, "best derived")]
        assert derived["name"] == "digits_4.5x" and derived["psnr"] >= preset["psnr"] and derived["fid"] <= preset["fid"]
    fronts = mc.pareto_fronts(models.sweeps)
    assert list(fronts.columns[:1]) == ["model"]
    assert list(fronts.loc[fronts["model"] == "grid8", "name"]) == list(pareto_front(sweep)["name"])
    assert mc.pareto_fronts({}).empty and mc.best_schedules({}).empty


def test_figures_have_labelled_axes_and_every_model(models):
    figures = {
        "token": mc.plot_token_redundancy(mc.token_redundancy(models.recordings)),
        "condition": mc.plot_condition_redundancy(mc.condition_redundancy(models.recordings)),
        "selection": mc.plot_selection_layers(mc.selection_layers(models.recordings)),
        "tradeoff": mc.plot_tradeoffs(models.sweeps, mc.best_schedules(models.sweeps)),
    }
    for name, fig in figures.items():
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), name
        labels = " ".join(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        assert "grid4" in labels and "grid8" in labels, name
    assert [ax.get_title() for ax in figures["token"].axes] == ["first decoder block", "last decoder block"]
    empty = mc.plot_tradeoffs({})
    assert empty.axes[0].texts[0].get_text() == "no sweep to compare"
