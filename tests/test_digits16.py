"""The digits16 layout (32x32 upsampled digits, 2x2-pixel tokens, the official 256 + 64 positions), its way back to
the 8x8 scale the digits classifier works on, and training that resumes after a kill."""
from __future__ import annotations

import pytest
import torch

from lazymar.config import get_config
from lazymar.digits import digits_split, to_8x8, upsample
from lazymar.model import MAR
from lazymar.runs.images import DigitsQuality, is_digits_model
from lazymar.train import train


def test_digits16_has_the_official_layout():
    config = get_config("digits16")
    model = MAR(config)
    assert (config.seq_len, config.token_dim, config.buffer_size) == (256, 4, 64)
    assert model.seq_len + model.buffer_size == 320  # as MAR-B/L/H: 256 latent tokens + 64 buffer positions
    assert is_digits_model(config) and is_digits_model(get_config("digits"))
    assert not is_digits_model(get_config("mar_base"))


def test_upsampled_data_stays_in_range_and_patches_are_not_constant():
    images, labels = digits_split("train", size=32)
    small, small_labels = digits_split("train")
    assert images.shape == (len(small), 1, 32, 32) and torch.equal(labels, small_labels)
    assert images.min() >= -1 and images.max() <= 1
    tokens = MAR(get_config("digits16")).patchify(images[:16])  # (16, 256, 4)
    spread = tokens.max(-1).values - tokens.min(-1).values
    assert (spread > 0.05).float().mean() > 0.2  # the 4 channels of a token differ (nearest upsampling would not)


def test_to_8x8_inverts_the_upsampling():
    small, _ = digits_split("held_out")
    assert torch.allclose(to_8x8(upsample(small, 32)), small, atol=1e-5)
    assert torch.equal(to_8x8(small), small)
    # a hand case: a constant image maps to the same constant, a linear ramp is reproduced
    assert torch.allclose(to_8x8(torch.full((1, 1, 32, 32), 0.5)), torch.full((1, 1, 8, 8), 0.5), atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        to_8x8(torch.zeros(1, 1, 32, 16))


def test_digits_quality_scores_upsampled_images_like_the_8x8_ones():
    small, labels = digits_split("held_out")
    small, labels = small[:60], labels[:60].tolist()
    evaluator = DigitsQuality()
    a, b = evaluator(small, labels), evaluator(upsample(small, 32), labels)
    assert a["accuracy"] == b["accuracy"]
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-3)


def _tiny_run(tmp_path, fail_at=None):
    config = get_config("digits", encoder_embed_dim=16, decoder_embed_dim=16, encoder_depth=1, decoder_depth=1,
                        diffloss_w=16, diffloss_d=1)
    images, labels = digits_split("train")
    state = tmp_path / "state.pth"
    return train(config, images[:64], labels[:64], steps=6, batch_size=8, warmup=2, log_every=1, progress=False,
                 state_path=state, save_every=2), state


def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    (model, ema, log), state = _tiny_run(tmp_path / "straight")
    assert not any(p.isnan().any() for p in model.parameters())

    import lazymar.train as train_module
    real_loss, calls = train_module.mar_loss, {"n": 0}

    def killed_at_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(train_module, "mar_loss", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path / "killed")
    saved = torch.load(tmp_path / "killed" / "state.pth", weights_only=True)
    assert saved["next_step"] == 4  # saved every 2 steps: steps 0-3 done
    monkeypatch.setattr(train_module, "mar_loss", real_loss)
    (resumed, resumed_ema, resumed_log), _ = _tiny_run(tmp_path / "killed")
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), resumed_ema.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["loss"] for r in log] == [r["loss"] for r in resumed_log]


@pytest.mark.parametrize("name", ["digits", "digits16"])
def test_train_defaults_reproduce_the_committed_checkpoints_settings(name):
    """`lazymar train --model NAME` with no other flags trains what data/checkpoints/NAME.pth was trained with."""
    import inspect
    from lazymar.checkpoint import EMBEDDED
    from lazymar.train import TRAINING_STEPS, train_digits
    args = torch.load(EMBEDDED[name], map_location="cpu", weights_only=False)["args"]
    defaults = inspect.signature(train_digits).parameters
    assert args["steps"] == TRAINING_STEPS[name]
    assert (args["seed"], args["batch_size"], args["lr"]) == tuple(defaults[k].default for k in ("seed", "batch_size", "lr"))
    assert args == {**get_config(name).to_dict(), **{k: args[k] for k in ("seed", "steps", "batch_size", "lr")}}


def test_a_state_from_other_settings_is_refused(tmp_path):
    from lazymar.errors import SettingsError
    _tiny_run(tmp_path)
    config = get_config("digits", encoder_embed_dim=16, decoder_embed_dim=16, encoder_depth=1, decoder_depth=1)
    images, labels = digits_split("train")
    with pytest.raises(SettingsError, match="other settings"):
        train(config, images[:64], labels[:64], steps=6, batch_size=8, progress=False,
              state_path=tmp_path / "state.pth")


def test_the_new_tokens_preset_is_the_committed_official_schedule():
    from pathlib import Path
    from lazymar.cache.schedule_file import load_schedule, read_schedule_file
    official = read_schedule_file(Path(__file__).parents[1] / "data/schedules/official/lazymar_new_tokens.json")
    preset = load_schedule("lazymar-new-tokens", 64, get_config("mar_base"))
    assert preset.to_dict() == official.to_dict()
    fitted = load_schedule("lazymar-new-tokens", 64, get_config("digits16"))  # 3 head blocks, 4 decoder blocks
    assert fitted.encoder == "new-tokens" and fitted.head.reuse_blocks == (1, 2)
    assert fitted.keep_fraction == load_schedule("lazymar", 64, get_config("digits16")).keep_fraction


def test_eval_scores_digits16_samples_on_the_8x8_scale(capsys):
    import json
    from lazymar.cli import main
    assert main(["eval", "--model", "digits16", "--num-samples", "4", "--batch-size", "4", "--num-iter", "2",
                 "--seed", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_samples"] == 4 and 0.0 <= out["accuracy"] <= 1.0 and out["fid"] > 0


def test_the_whole_pipeline_runs_on_digits16(tmp_path, capsys):
    """record -> derive -> sweep -> bench on the 16x16-token model, at a few steps and samples."""
    import json
    from lazymar.cli import main
    small = ["--model", "digits16", "--num-iter", "4", "--seed", "2"]
    stats, schedule = tmp_path / "rec.zarr", tmp_path / "derived.json"
    assert main(["record", *small, "--num-samples", "2", "--batch-size", "2", "--out", str(stats), "--no-progress"]) == 0
    assert main(["derive", "--stats", str(stats), "--model", "digits16", "--num-iter", "4", "--out", str(schedule),
                 "--target-flops-ratio", "1.2", "--measure-samples", "2", "--candidates", "1", "--seed", "11"]) == 0
    derived = json.loads(schedule.read_text())
    assert derived["num_iter"] == 4 and derived["search"]["seeds"] == [11]  # the search seed travels with it
    assert "seed 11" in schedule.with_suffix(".md").read_text()
    capsys.readouterr()
    assert main(["sweep", *small, "--no-defaults", "--schedule", "lazymar", "lazymar-new-tokens", str(schedule),
                 "--num-samples", "2", "--batch-size", "2", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"none", "lazymar", "lazymar-new-tokens", "derived"}
    assert rows["lazymar"]["flops_ratio"] > 1 and rows["lazymar"]["psnr"] > 0
    assert main(["bench", *small, "--schedule", "lazymar", "--num-samples", "2", "--batch-size", "2",
                 "--repeats", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops_ratio"] > 1


def test_save_at_writes_loadable_intermediate_checkpoints(tmp_path):
    """`lazymar train --save-at 2` keeps the weights after step 2 (a study over training reads them back)."""
    from lazymar.checkpoint import load_model
    from lazymar.train import snapshot_path, train_digits
    out = tmp_path / "tiny.pth"
    train_digits(out, steps=3, batch_size=4, progress=False, save_at=(2,), encoder_embed_dim=16,
                 decoder_embed_dim=16, encoder_depth=1, decoder_depth=1)
    early = torch.load(snapshot_path(out, 2), map_location="cpu", weights_only=False)
    final = torch.load(out, map_location="cpu", weights_only=False)
    assert early["args"]["steps_done"] == 2 and "steps_done" not in final["args"]
    assert early["train_log"] and max(r["step"] for r in early["train_log"]) < 2  # the log so far
    assert not snapshot_path(out, 1).exists() and not snapshot_path(out, 3).exists()
    changed = [not torch.equal(a, b) for a, b in zip(early["model_ema"].values(), final["model_ema"].values())]
    assert any(changed)  # step 3 moved the weights
    assert load_model(snapshot_path(out, 2)).config.encoder_embed_dim == 16


def test_save_at_outside_the_run_is_refused(tmp_path):
    from lazymar.errors import SettingsError
    from lazymar.train import train_digits
    with pytest.raises(SettingsError, match="--save-at"):
        train_digits(tmp_path / "x.pth", steps=3, save_at=(3,), progress=False)
