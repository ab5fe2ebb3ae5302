"""The redundancy recorder: it never changes sampling, its statistics equal a direct computation from features
captured independently, its files validate, and the CLI refuses to overwrite (stores, ranks, resuming and merging:
test_recording_store.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from lazymar import MAR, get_config
from lazymar.cli import main
from lazymar.recording import STATUS_CODES, RecordingError, RedundancyRecorder, load_stats, save_stats
from lazymar.recording.driver import record
from lazymar.recording.summary import overview, summarize, tidy, tidy_head
from lazymar.sampling import SamplingSettings, StepObserver, StepRunner, current_step, generate, observe_steps
from builders import checkpoint, random_mar, saved, tiny_mar

SETTINGS = SamplingSettings(num_iter=5, cfg=2.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> MAR:
    """A 4x4-token MAR with random weights everywhere (the head's adaLN-zero init would make it inert)."""
    return tiny_mar(img_size=64, num_sampling_steps="6", randomise="head", std=0.1, token_std=0.5)


# --- independent capture ------------------------------------------------------------------------------------
class Capture(StepObserver):
    """Stores every feature the recorder summarises, per step, with its own hooks."""

    def __init__(self, model: MAR):
        self.model, self.steps, self.handles = model, [], []
        blocks = [*model.encoder_blocks, *model.decoder_blocks]
        for layer, block in enumerate(blocks):
            self.handles.append(block.register_forward_hook(self._keep(layer, "output")))
            self.handles.append(block.attn.qkv.register_forward_hook(self._keep(layer, "qkv")))
        net = model.diffloss.net
        for k, block in enumerate(net.res_blocks):
            self.handles.append(block.register_forward_hook(
                lambda m, a, o, k=k: self.cur["deltas"].__setitem__(k, (o - a[0]).clone())))
        self.handles.append(net.final_layer.register_forward_hook(self._head_output))

    def _keep(self, layer, what):
        encoder = layer < len(self.model.encoder_blocks)

        def hook(module, args, out):
            if self.cur.get("z") is None:  # the transformer pass, not the head
                ctx = current_step()
                rows = ctx.encoder_rows if encoder else ctx.decoder_rows
                self.cur["feats"][(layer, what)] = (out.clone(), rows, ctx.branches)
        return hook

    def _head_output(self, module, args, out):
        self.cur["head"].append((dict(self.cur["deltas"]), out.clone()))
        self.cur["deltas"] = {}

    def on_step_start(self, ctx):
        self.cur = {"feats": {}, "head": [], "deltas": {}, "z": None,
                    **{k: getattr(ctx, k).clone() for k in ("known", "new", "to_predict", "masked")}}

    def on_step_end(self, ctx):
        self.cur["z"] = ctx.z.clone()
        self.steps.append(self.cur)

    def close(self):
        for h in self.handles:
            h.remove()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _by_position(model: MAR, step: dict, layer: int, what: str, B: int) -> list[dict[int, dict[int, np.ndarray]]]:
    """Captured features of one layer at one step as [branch][sample][position] -> (G, d) float64 array."""
    P, buf, E = model.buffer_size + model.seq_len, model.buffer_size, len(model.encoder_blocks)
    if what == "z":
        feats = step["z"].unsqueeze(2)
        rows = torch.arange(buf, P).expand(feats.shape[0], -1)
        branches = ("cond", "uncond") if feats.shape[0] == 2 * B else ("cond",)
    else:
        feats, rows, branches = step["feats"][(layer, "output" if what == "output" else "qkv")]
        branches = branches or ("cond", "uncond")
        if what != "output":
            NB, n, C3 = feats.shape
            heads = model.encoder_blocks[0].attn.num_heads
            feats = feats.reshape(NB, n, 3, heads, C3 // (3 * heads))[:, :, 1 if what == "k" else 2]
        else:
            feats = feats.unsqueeze(2)
        if rows is None:
            if layer < E:  # the plain encoder: buffer and known positions, in order
                visible = torch.cat([torch.ones(B, buf, dtype=torch.bool), step["known"] | step["new"]], 1)
                rows = torch.stack([v.nonzero()[:, 0] for v in visible]).repeat(len(branches), 1)
            else:
                rows = torch.arange(P).expand(feats.shape[0], -1)
    out = [{b: {} for b in range(B)}, {b: {} for b in range(B)}]
    for r in range(feats.shape[0]):
        branch = ("cond", "uncond").index(branches[r // B])
        for j, p in enumerate(rows[r].tolist()):
            out[branch][r % B][p] = feats[r, j].double().numpy()
    return out


def expected_statistics(model: MAR, cap: Capture, B: int) -> dict[str, np.ndarray]:
    """token_cosine and the CFG statistics computed position by position from the captured features."""
    S, P, E = len(cap.steps), model.buffer_size + model.seq_len, len(model.encoder_blocks)
    L = E + len(model.decoder_blocks) + 1
    token = np.full((B, S, L, 3, P), np.nan)
    cfg = np.full((B, S, L, 4, P), np.nan)
    norm = np.full((B, S, L, P), np.nan)
    for s in range(S):  # the output norm of every step, step 0 included
        for layer in range(L):
            now = _by_position(model, cap.steps[s], layer, "z" if layer == L - 1 else "output", B)
            for b in range(B):
                for p, h in now[0][b].items():
                    norm[b, s, layer, p] = np.linalg.norm(h.ravel())
    for s in range(1, S):
        for layer in range(L):
            for kind, what in enumerate(("output", "k", "v")):
                if layer == L - 1 and kind > 0:
                    continue
                w = "z" if layer == L - 1 else what
                now = _by_position(model, cap.steps[s], layer, w, B)
                before = _by_position(model, cap.steps[s - 1], layer, w, B)
                for b in range(B):
                    for p, h in now[0][b].items():
                        if p in before[0][b]:
                            token[b, s, layer, kind, p] = np.mean([_cos(x, y) for x, y in zip(h, before[0][b][p])])
                        if kind == 0 and all(p in d[b] for d in (now[1], before[0], before[1])):
                            c, u, pc, pu = (d[b][p].ravel() for d in (now[0], now[1], before[0], before[1]))
                            cfg[b, s, layer, :, p] = [_cos(c - u, pc - pu), _rel(c - u, pc - pu), _rel(c, pc),
                                                      _rel(u, pu)]
    return {"token_cosine": token, "cfg": cfg, "token_norm": norm}


def expected_head(model: MAR, cap: Capture, B: int) -> np.ndarray:
    S, D = len(cap.steps), model.token_dim
    K, T = len(model.diffloss.net.res_blocks), model.diffloss.gen_diffusion.num_timesteps
    head = np.full((B, S, T, K + 1), np.nan)
    for s, step in enumerate(cap.steps):
        samples = step["to_predict"].nonzero()[:, 0].numpy()
        n = len(samples)
        for h in range(1, len(step["head"])):
            (deltas, out), (prev_deltas, prev_out) = step["head"][h], step["head"][h - 1]
            parts = [(out[:n, :D] - out[n:, :D], prev_out[:n, :D] - prev_out[n:, :D])]
            parts += [(deltas[k][:n], prev_deltas[k][:n]) for k in range(K)]
            for part, (now, before) in enumerate(parts):
                per_token = [_rel(now[i].double().numpy(), before[i].double().numpy()) for i in range(n)]
                for b in range(B):
                    head[b, s, h, part] = np.mean([v for v, sb in zip(per_token, samples) if sb == b])
    return head


def record_with_capture(model, labels, settings, seed=3, runner=None):
    cap = Capture(model)
    try:
        with observe_steps(cap), RedundancyRecorder(model, model_name="tiny", seed=seed) as rec:
            tokens = generate(model, labels, settings, seed=seed, runner=runner)
    finally:
        cap.close()
    return tokens, rec.to_dataset(), cap


# --- tests --------------------------------------------------------------------------------------------------
def test_recording_never_changes_the_tokens(tiny):
    plain = generate(tiny, [1, 2, 3], SETTINGS, seed=11)
    with RedundancyRecorder(tiny) as rec:
        recorded = generate(tiny, [1, 2, 3], SETTINGS, seed=11)
    again = generate(tiny, [1, 2, 3], SETTINGS, seed=11)
    assert torch.equal(plain, recorded) and torch.equal(plain, again)
    assert torch.equal(torch.from_numpy(rec.to_dataset()["tokens"].values), plain)


def test_hooks_are_removed_on_exit(tiny):
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.modules())
    with RedundancyRecorder(tiny):
        assert sum(len(m._forward_hooks) for m in tiny.modules()) > before
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.modules()) == before


def test_statistics_equal_a_direct_computation(tiny):
    B = 2
    _, ds, cap = record_with_capture(tiny, [4, 7], SETTINGS)
    want = expected_statistics(tiny, cap, B)
    np.testing.assert_allclose(ds["token_cosine"].values, want["token_cosine"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds["token_norm"].values, want["token_norm"], rtol=1e-5)
    assert np.isfinite(ds["token_norm"].sel(layer="decoder.0").values).all()  # every position, every step
    for k, name in enumerate(("residual_cosine", "residual_change", "cond_change", "uncond_change")):
        np.testing.assert_allclose(ds[f"cfg_{name}"].values, want["cfg"][:, :, :, k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds["head_change"].values, expected_head(tiny, cap, B), rtol=1e-4, atol=1e-6)
    # the direct computation is not vacuous: most entries exist, and missing ones are NaN, never 0
    assert np.isfinite(ds["token_cosine"].sel(layer="decoder.1", kind="v").values[:, 1:]).all()
    assert np.isfinite(ds["cfg_residual_change"].sel(layer="z").values[:, 1:, tiny.buffer_size:]).all()
    assert np.isnan(ds["token_cosine"].sel(layer="z").values[:, :, :, : tiny.buffer_size]).all()
    assert np.isnan(ds["token_cosine"].values[:, 0]).all()
    assert np.isfinite(ds["head_change"].values[:, :, 1:]).all() and np.isnan(ds["head_change"].values[:, :, 0]).all()
    enc = ds["token_cosine"].sel(layer="encoder.0", kind="output")
    new = ds["status"] == STATUS_CODES["new"]
    assert bool(enc.where(new).isnull().all())  # the encoder did not see a position decoded at s-1 at step s-1


def test_chunking_the_batched_statistics_changes_no_value(tiny, monkeypatch):
    """Statistics computed layer by layer and every 2 head steps (smallest chunks) equal those computed in one
    batch per step, bit for bit, also under a runner with varying rows and branches."""
    import lazymar.recording.recorder as recorder_module

    def record(runner):
        with RedundancyRecorder(tiny) as rec:
            generate(tiny, [2, 8], SETTINGS, seed=5, runner=runner)
        return rec.to_dataset()

    batched = [record(None), record(SubsetRunner())]
    monkeypatch.setattr(recorder_module, "LAYER_CHUNK", 1)
    monkeypatch.setattr(recorder_module, "HEAD_CHUNK", 2)
    chunked = [record(None), record(SubsetRunner())]
    for a, b in zip(batched, chunked):
        for name in ("token_cosine", "cfg_residual_cosine", "cfg_uncond_change", "head_change"):
            assert np.array_equal(a[name].values, b[name].values, equal_nan=True), name
    assert np.isfinite(batched[0]["head_change"].values[:, :, 1:]).all()  # not vacuous: all head steps compared
    assert np.isfinite(batched[1]["token_cosine"].sel(layer="decoder.0", kind="output").values[:, 1]).any()


def test_statuses_partition_positions_at_every_step(tiny):
    _, ds, cap = record_with_capture(tiny, [0, 9], SamplingSettings(num_iter=4, cfg=1.0))
    status = ds["status"].values
    buf = tiny.buffer_size
    assert (status[:, :, :buf] == STATUS_CODES["buffer"]).all()
    for s, step in enumerate(cap.steps):
        codes = np.zeros_like(status[:, s, buf:])
        for name in ("known", "new", "to_predict", "masked"):
            assert not (codes[step[name].numpy()] > 0).any()  # no position gets two statuses
            codes[step[name].numpy()] = STATUS_CODES[name]
        assert (codes > 0).all()
        np.testing.assert_array_equal(status[:, s, buf:], codes)
    # without CFG no condition statistic exists
    assert ds["cfg_residual_change"].isnull().all() and ds["head_change"].sel(head_part="eps_cfg").isnull().all()


class SubsetRunner(StepRunner):
    """A stand-in for a cache engine: on odd steps the decoder runs only the cond branch on a shuffled subset of
    positions (and the head sees uncond = cond); it follows the recorder's row contract."""

    def transformer(self, ctx):
        model = ctx.model
        tokens, mask, emb = ctx.network_inputs()
        x = model.scatter_decoder_input(model.forward_mae_encoder(tokens, mask, emb), mask)
        if ctx.step % 2 == 0:
            for block in model.decoder_blocks:
                x = block(x)
            return model.decoder_output(x)
        B, P = ctx.batch_size, x.shape[1]
        g = torch.Generator().manual_seed(ctx.step)
        rows = torch.stack([torch.randperm(P, generator=g)[: P // 2] for _ in range(B)])
        ctx.decoder_rows, ctx.branches = rows, ("cond",)
        h = x[:B].gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        for block in model.decoder_blocks:
            h = block(h)
        full = x[:B].scatter(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[2]), h)
        return ctx.doubled(model.decoder_output(full))


def test_row_contract_of_step_runners(tiny):
    B = 2
    _, ds, cap = record_with_capture(tiny, [1, 5], SETTINGS, runner=SubsetRunner())
    want = expected_statistics(tiny, cap, B)
    np.testing.assert_allclose(ds["token_cosine"].values, want["token_cosine"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds["token_norm"].values, want["token_norm"], rtol=1e-5)  # NaN where not computed
    np.testing.assert_allclose(ds["cfg_residual_change"].values, want["cfg"][:, :, :, 1], rtol=1e-4, atol=1e-5)
    dec = ds["token_cosine"].sel(layer="decoder.1", kind="output")
    P = dec.sizes["position"]
    assert int(dec.sel(step=1).notnull().sum()) == B * (P // 2)  # only the rows computed at step 1
    assert bool(ds["cfg_residual_change"].sel(layer="decoder.0", step=[1, 2]).isnull().all())
    assert bool(ds["cfg_residual_change"].sel(layer="z", step=1).isel(position=slice(tiny.buffer_size, None))
                .notnull().all())


def test_mar_base_shaped_model_records():
    model = random_mar(get_config("mar_base", encoder_depth=2, decoder_depth=2, diffloss_d=2, num_sampling_steps="3"),
                       randomise="none")
    with RedundancyRecorder(model, model_name="mar_base-2+2") as rec:
        generate(model, [3, 999], SamplingSettings(num_iter=3, cfg=3.0), seed=0)
    ds = rec.to_dataset()
    assert dict(ds.sizes) | {} == {"sample": 2, "step": 3, "layer": 5, "kind": 3, "position": 320, "head_step": 3,
                                   "head_part": 3, "token": 256, "channel": 16}
    assert np.isfinite(ds["token_cosine"].sel(layer="decoder.1").values[:, 1:]).all()
    assert np.isfinite(ds["cfg_residual_cosine"].sel(layer="decoder.1").values[:, 1:]).all()


def test_save_load_roundtrip_and_rounding(tiny, tmp_path):
    _, ds, _ = record_with_capture(tiny, [2, 3], SETTINGS)
    save_stats(ds, tmp_path / "a.nc")
    loaded = load_stats(tmp_path / "a.nc")
    xr.testing.assert_identical(loaded.drop_attrs(), ds.drop_attrs())
    assert loaded.attrs["cfg"] == 2.5 and loaded.attrs["num_iter"] == 5 and loaded.attrs["schedule"] == "none"
    assert not list(tmp_path.glob(".*tmp*"))
    save_stats(ds, tmp_path / "b.nc", keep_bits=8)
    rounded = load_stats(tmp_path / "b.nc")["token_cosine"].values
    exact = ds["token_cosine"].values
    np.testing.assert_array_equal(np.isnan(rounded), np.isnan(exact))
    ok = np.isfinite(exact)
    err = np.abs(rounded[ok] - exact[ok]) / np.abs(exact[ok])
    assert err.max() <= 2.0 ** -9 and err.max() > 0
    save_stats(ds, tmp_path / "c.nc", keep_bits="compact")  # per statistic: cosines 14 bits, changes 9
    compact = load_stats(tmp_path / "c.nc")
    for name, bits in (("token_cosine", 14), ("cfg_cond_change", 9)):
        exact, rounded = ds[name].values, compact[name].values
        ok = np.isfinite(exact) & (exact != 0)
        assert (np.abs(rounded[ok] - exact[ok]) / np.abs(exact[ok])).max() <= 2.0 ** -(bits + 1)
    np.testing.assert_array_equal(compact["tokens"].values, ds["tokens"].values)
    with pytest.raises(RecordingError, match="keep_bits must be"):
        save_stats(ds, tmp_path / "d.nc", keep_bits="tiny")


def test_loader_names_what_is_wrong(tiny, tmp_path):
    (tmp_path / "text.nc").write_text("not a netcdf file")
    with pytest.raises(RecordingError, match="not a NetCDF4 file"):
        load_stats(tmp_path / "text.nc")
    with pytest.raises(RecordingError, match="not found"):
        load_stats(tmp_path / "absent.nc")
    xr.Dataset({"x": ("a", np.arange(3))}).to_netcdf(tmp_path / "other.nc", engine="netcdf4")
    with pytest.raises(RecordingError, match="not a lazymar redundancy recording"):
        load_stats(tmp_path / "other.nc")
    _, ds, _ = record_with_capture(tiny, [2], SETTINGS)
    save_stats(ds.drop_vars("cfg_residual_change"), tmp_path / "novar.nc")
    with pytest.raises(RecordingError, match="lacks variable 'cfg_residual_change'"):
        load_stats(tmp_path / "novar.nc")
    no_attr = ds.copy()
    del no_attr.attrs["num_iter"]
    save_stats(no_attr, tmp_path / "noattr.nc")
    with pytest.raises(RecordingError, match="lacks attribute.*num_iter"):
        load_stats(tmp_path / "noattr.nc")
    for name in ("text", "other", "novar", "noattr"):
        try:
            load_stats(tmp_path / f"{name}.nc")
        except RecordingError as err:
            assert "\n" not in str(err)


def _tiny_checkpoint(model: MAR, path) -> str:
    sampling = {"num_iter": 4, "cfg": 2.0, "cfg_schedule": "linear", "temperature": 1.0}
    return str(saved(path, checkpoint(model, sampling=sampling)))


def test_cli_records_refuses_overwrite_and_reports_json(tiny, tmp_path, capsys):
    ckpt = _tiny_checkpoint(tiny, tmp_path / "tiny.pth")
    out = tmp_path / "stats.nc"
    args = ["record", "--model", ckpt, "--num-samples", "3", "--batch-size", "2", "--num-iter", "3",
            "--out", str(out), "--no-progress", "--json"]
    assert main(args) == 0
    assert '"samples": 3' in capsys.readouterr().out
    size = out.stat().st_size
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.stat().st_size == size
    assert main(args + ["--force", "--seed", "4"]) == 0
    assert load_stats(out).attrs["seed"] == 4


def test_cli_records_under_a_cache_schedule(tiny, tmp_path):
    ckpt = _tiny_checkpoint(tiny, tmp_path / "tiny.pth")
    out = tmp_path / "lazy.nc"
    assert main(["record", "--model", ckpt, "--num-samples", "2", "--batch-size", "2", "--num-iter", "8",
                 "--schedule", "lazymar", "--out", str(out), "--no-progress"]) == 0
    ds = load_stats(out)
    assert ds.attrs["schedule"] == "lazymar"
    plain = record(tiny, tmp_path / "plain.nc", 2, SamplingSettings(num_iter=8, cfg=2.0), batch_size=2,
                   progress=False)
    # cached steps leave positions uncomputed (missing), so fewer values than the plain model records
    assert int(ds["token_cosine"].count()) < int(plain["token_cosine"].count())
    assert bool(ds["token_cosine"].notnull().any())


def test_tidy_and_summaries(tiny):
    _, ds, _ = record_with_capture(tiny, [1, 2], SETTINGS)
    df = tidy(ds, kind="v", layer=["decoder.0", "decoder.1"])
    values = ds["token_cosine"].sel(kind="v", layer=["decoder.0", "decoder.1"]).values
    assert len(df) == np.isfinite(values).sum()
    row = df.iloc[len(df) // 2]
    assert row["token_cosine"] == ds["token_cosine"].sel(
        sample=row["sample"], step=row["step"], layer=row["layer"], kind="v", position=row["position"]).item()
    assert row["status"] == ("buffer", "known", "new", "to_predict", "masked")[
        int(ds["status"].sel(sample=row["sample"], step=row["step"], position=row["position"]))]
    table = summarize(ds, "token_cosine", kind="output", thresholds=(0.5,), quantiles=(0.5,))
    step, layer, status = 2, "decoder.1", "masked"
    values = ds["token_cosine"].sel(step=step, layer=layer, kind="output").values
    chosen = values[(ds["status"].sel(step=step).values == STATUS_CODES[status]) & np.isfinite(values)]
    got = table.loc[(step, layer, status)]
    assert got["count"] == chosen.size and np.isclose(got["mean"], chosen.mean())
    assert np.isclose(got["q0.5"], np.median(chosen)) and np.isclose(got["above_0.5"], (chosen > 0.5).mean())
    assert len(tidy_head(ds)) == np.isfinite(ds["head_change"].values).sum()
    assert set(overview(ds)["per_layer"]) == set(ds["layer"].values.tolist())
