"""Notebooks 01-02 on a recording larger than memory: every analysis and plot function they call on a recording,
run on a Zarr store with small chunks under a dask callback, holds no task result larger than two chunks of
token_cosine (the median tables: one layer of one variable, as documented), and gives the in-memory results."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from dask.callbacks import Callback  # noqa: E402

from analysis import phenomena, redundancy_plots, workbook  # noqa: E402
from lazymar.recording import STATUS_CODES, load_stats, save_stats  # noqa: E402
from lazymar.recording.dataset import make_dataset  # noqa: E402

SAMPLES, STEPS, POSITIONS, BATCH = 48, 4, 33, 1
LAYERS = ["encoder.0", "encoder.1", "decoder.0", "decoder.1", "z"]
BINS = 20  # small histograms, so that a count array is smaller than a chunk of this small test recording


class LargestResult(Callback):
    """Records the largest task result (nbytes) computed while active."""

    def __init__(self):
        super().__init__()
        self.largest, self.tasks = 0, 0

    def _posttask(self, key, result, dsk, state, worker_id):
        self.tasks += 1
        self.largest = max(self.largest, int(getattr(result, "nbytes", 0)))


def recording() -> "xr.Dataset":  # noqa: F821
    """A random recording with CFG: statuses as MAR's (buffer, then tokens masked -> to_predict -> new -> known),
    NaN at step 0 and where the encoder sees no token."""
    rng = np.random.default_rng(0)
    S, T, L, P = SAMPLES, STEPS, len(LAYERS), POSITIONS
    status = np.empty((S, T, P), np.int8)
    status[:, :, 0] = STATUS_CODES["buffer"]
    order = np.argsort(rng.random((S, P - 1)), axis=1)  # decoding order of the tokens per sample
    per_step = (P - 1) // T
    for t in range(T):
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(P - 1)[None].repeat(S, 0), axis=1)
        codes = np.where(rank < per_step * (t - 1), STATUS_CODES["known"],
                         np.where(rank < per_step * t, STATUS_CODES["new"],
                                  np.where(rank < per_step * (t + 1), STATUS_CODES["to_predict"],
                                           STATUS_CODES["masked"])))
        status[:, t, 1:] = codes
    token_cosine = (1 - rng.uniform(0, 0.3, (S, T, L, 3, P)) ** 3).astype(np.float32)
    token_cosine[:, 0] = np.nan
    encoder_blind = np.isin(status, [STATUS_CODES["to_predict"], STATUS_CODES["masked"]])
    token_cosine[:, :, :2] = np.where(encoder_blind[:, :, None, None, :], np.nan, token_cosine[:, :, :2])
    variables = {"status": status, "token_cosine": token_cosine,
                 "head_change": rng.uniform(0.01, 1, (S, T, 3, 2)).astype(np.float32),
                 "tokens": np.zeros((S, P - 1, 2), np.float32)}
    variables["head_change"][:, :, 0] = np.nan
    for name in ("residual_cosine", "residual_change", "cond_change", "uncond_change"):
        values = rng.uniform(0.01, 1, (S, T, L, P)).astype(np.float32)
        values[:, 0] = np.nan
        variables[f"cfg_{name}"] = values
    return make_dataset(variables, samples=np.arange(S), labels=np.arange(S) % 10, batch=np.arange(S) // BATCH,
                        mask_ratio=np.linspace(0.75, 0.0, T), cfg_scale=np.full(T, 2.0), layers=LAYERS,
                        head_parts=["eps_cfg", "res_block.0"], buffer_size=1, grid_size=int((P - 1) ** 0.5),
                        attrs={"model": "synthetic", "num_iter": T, "cfg": 2.0, "batch_size": BATCH, "config": "{}",
                               "temperature": 1.0, "cfg_schedule": "linear", "seed": 0, "schedule": "none"})


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    path = tmp_path_factory.mktemp("ooc") / "stats.zarr"
    save_stats(recording(), path)
    lazy, eager = load_stats(path), load_stats(path, lazy=False)
    assert hasattr(lazy["token_cosine"].data, "dask") and not hasattr(eager["token_cosine"].data, "dask")
    yield lazy, eager
    plt.close("all")


def _chunk_bytes(da) -> int:
    return int(np.prod([max(c) for c in da.data.chunks])) * da.dtype.itemsize


def _drawn(fig) -> list[np.ndarray]:
    """What a figure draws: the data of its lines and the vertices of its filled areas, axes by axes."""
    out = []
    for ax in fig.axes:
        out += [np.asarray(line.get_xydata()) for line in ax.get_lines()]
        out += [path.vertices for c in ax.collections for path in c.get_paths()]
    return out


def _notebook_01(ds) -> dict:
    decoder = [x for x in map(str, ds.layer.values) if x.startswith("decoder.")]
    return {
        "describe": workbook.describe_recording(ds, "stats.zarr"),
        "ecdf": redundancy_plots.plot_cosine_ecdf(ds, kind="output", bins=BINS),
        "mean_by_status": phenomena.mean_by_status(ds, "decoder.1", kind="output"),
        "violin": redundancy_plots.plot_cosine_violin(ds, layers=decoder, kind="v", bins=BINS),
        "log10_change": phenomena.step_layer_matrix(ds, "log10_change"),
        "mean_new": phenomena.step_layer_matrix(ds, "mean", statuses=["new"]),
        "fractions": phenomena.fraction_above(ds, (0.95, 0.99), layers=["decoder.0", "z"]),
        "fractions_new": phenomena.fraction_above(ds, (0.95, 0.99), layers=["decoder.1"], statuses=["new"]),
        "encoder_vs_decoder": phenomena.encoder_vs_decoder(ds),
        "groups": phenomena.group_summary(ds, (0.95, 0.99)),
    }


def _notebook_02_chunked(ds) -> dict:
    not_encoder = [x for x in map(str, ds.layer.values) if not x.startswith("encoder.")]
    unknown = ["to_predict", "masked"]
    return {"residual": phenomena.step_layer_matrix(ds, "mean", variable="cfg_residual_cosine", statuses=unknown,
                                                    layers=not_encoder),
            "above": phenomena.fraction_above(ds, (0.95, 0.99), variable="cfg_residual_cosine", statuses=unknown)}


def _notebook_02_medians(ds) -> dict:
    return {"relative": phenomena.branch_vs_residual(ds, statistic="median"),
            "per_step": phenomena.branch_vs_residual(ds, statistic="median", by="step", layers=["z"]),
            "head": phenomena.head_change_profile(ds, statistic="median")}


def _assert_same(lazy: dict, eager: dict) -> None:
    assert lazy.keys() == eager.keys()
    for name in lazy:
        a, b = lazy[name], eager[name]
        if isinstance(a, pd.DataFrame):
            pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6, obj=name)  # float32 sums
            assert a.attrs == b.attrs, name
        elif isinstance(a, plt.Figure):
            drawn_a, drawn_b = _drawn(a), _drawn(b)
            assert len(drawn_a) == len(drawn_b) > 0, name
            for x, y in zip(drawn_a, drawn_b):
                np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=name)
        elif isinstance(a, str):
            assert a == b, name
        else:
            assert a.identical(b) or np.allclose(a.values, b.values, rtol=1e-5, atol=1e-6, equal_nan=True), name


def test_notebook_01_reads_the_store_chunk_by_chunk(stores):
    lazy, eager = stores
    chunk = _chunk_bytes(lazy["token_cosine"])
    assert lazy["token_cosine"].nbytes >= 20 * chunk  # the recording is many chunks
    with LargestResult() as watch:
        results = _notebook_01(lazy)
    assert watch.tasks > 100
    assert watch.largest <= 2 * chunk, f"a task result of {watch.largest} bytes; a chunk is {chunk}"
    _assert_same(results, _notebook_01(eager))


def test_notebook_02_reads_the_store_chunk_by_chunk_and_medians_one_layer_at_a_time(stores):
    lazy, eager = stores
    chunk = _chunk_bytes(lazy["token_cosine"])
    with LargestResult() as watch:
        chunked = _notebook_02_chunked(lazy)
    assert watch.tasks > 50 and watch.largest <= 2 * chunk
    _assert_same(chunked, _notebook_02_chunked(eager))
    one_layer = lazy["cfg_cond_change"].isel(layer=0).nbytes  # the documented memory of the median tables
    assert one_layer * len(LAYERS) == lazy["cfg_cond_change"].nbytes
    with LargestResult() as watch:
        medians = _notebook_02_medians(lazy)
    assert watch.tasks > 50 and watch.largest <= one_layer
    _assert_same(medians, _notebook_02_medians(eager))


def test_histogram_tables_match_every_value(stores):
    """The chunk-wise ECDF and means against the values themselves (values_by_status, in memory)."""
    lazy, eager = stores
    edges = np.geomspace(1e-6, 2.0, 41)
    ecdf = phenomena.ecdf_by_status(lazy, "decoder.0", kind="k", edges=edges)
    means = phenomena.mean_by_status(lazy, "decoder.0", kind="k")
    values = phenomena.values_by_status(eager, "decoder.0", kind="k")
    assert list(ecdf.columns) == list(values) == list(means.index)
    for status, v in values.items():
        distance = np.clip(1.0 - v, edges[0], edges[-1])  # float32, as the tables compute it
        expected = np.array([(distance < e).mean() for e in edges[1:-1]] + [1.0])
        np.testing.assert_allclose(ecdf[status].values, expected, atol=1e-12)
        assert ecdf.attrs["count"][status] == means.loc[status, "count"] == v.size
        assert means.loc[status, "mean"] == pytest.approx(float(v.astype(np.float64).mean()), rel=1e-6)


def test_intervals_over_samples_stay_out_of_core(stores):
    """fraction_above and encoder_vs_decoder with intervals: the same values as without, 95 % bands over the
    samples around them, lazy equal to in-memory, no task result over two chunks; the figures draw the bands and
    state n."""
    lazy, eager = stores
    chunk = _chunk_bytes(lazy["token_cosine"])
    watch = LargestResult()
    with watch:
        fractions = phenomena.fraction_above(lazy, (0.95, 0.99), layers=["decoder.0", "z"], intervals=True)
        evd = phenomena.encoder_vs_decoder(lazy, intervals=True)
    assert watch.tasks > 0 and watch.largest <= 2 * chunk
    pd.testing.assert_frame_equal(fractions, phenomena.fraction_above(eager, (0.95, 0.99), layers=["decoder.0", "z"],
                                                                      intervals=True))
    plain = phenomena.fraction_above(eager, (0.95, 0.99), layers=["decoder.0", "z"])
    pd.testing.assert_frame_equal(fractions[plain.columns], plain)
    for t in ("0.95", "0.99"):
        assert (fractions[f"above_{t}_ci_low"] <= fractions[f"above_{t}"] + 1e-12).all()
        assert (fractions[f"above_{t}"] <= fractions[f"above_{t}_ci_high"] + 1e-12).all()
    assert (fractions["above_0.99_ci_high"] > fractions["above_0.99_ci_low"]).all()  # all cosines pass 0.95 here
    assert (fractions["n_samples"] == SAMPLES).all()
    np.testing.assert_allclose(evd["decoder_cosine"], phenomena.encoder_vs_decoder(eager)["decoder_cosine"],
                               rtol=1e-6)
    assert ((evd["decoder_change_ci_low"] <= evd["decoder_change"] + 1e-12)
            & (evd["decoder_change"] <= evd["decoder_change_ci_high"] + 1e-12)).all()
    fig = redundancy_plots.plot_fraction_above(fractions)
    assert len(fig.axes[0].collections) == 4 and f"n = {SAMPLES} samples" in fig.axes[0].get_title()
    fig = redundancy_plots.plot_encoder_vs_decoder(evd)
    assert len(fig.axes[0].collections) == 2 and f"n = {SAMPLES}" in fig.axes[0].get_title()
