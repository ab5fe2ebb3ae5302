"""Loading official-layout MAR checkpoints and the VAE: round trips, weight choice, inference, clear errors."""
import argparse
import pickle
from functools import partial

import pytest
import torch

from builders import checkpoint, random_mar, random_vae, saved, tiny_mar
from conftest import reference_dir
from lazymar import MAR, MARConfig, get_config
from lazymar.checkpoint import EMBEDDED, CheckpointError, load_model
from lazymar.vae import LATENT_SCALE, AttnBlock, Downsample, VAEConfig, load_vae, tokens_to_images

TINY = get_config("mar_tiny")
TINY_VAE = VAEConfig(embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_levels=(1,))


def random_model(config: MARConfig = TINY, seed: int = 0) -> MAR:
    """A MAR with every tensor random (the official init leaves some at zero, which would hide mix-ups)."""
    return random_mar(config, seed, randomise="all", std=0.2)


random_tiny_vae = partial(random_vae, TINY_VAE, std=0.1)  # every tensor random, as for the MAR


@torch.no_grad()
def outputs(model: MAR) -> tuple[torch.Tensor, torch.Tensor]:
    """z for a half-masked CFG batch and the head output on it: a fingerprint of every weight."""
    g = torch.Generator().manual_seed(1)
    B, L = 2, model.seq_len
    tokens = torch.randn(B, L, model.token_dim, generator=g)
    mask = (torch.rand(B, L, generator=g).argsort(dim=1) < L // 2).float()  # MAR masks: same count per row
    labels = torch.tensor([1, 3])
    emb = torch.cat([model.class_embedding(labels, B), model.class_embedding(None, B)])
    z = model.forward_transformer(torch.cat([tokens, tokens]), torch.cat([mask, mask]), emb)
    x = torch.randn(2 * B * L, model.token_dim, generator=g)
    head = model.diffloss.net(x, torch.full((2 * B * L,), 7), z.reshape(-1, z.shape[-1]))
    return z, head


def assert_same_outputs(a: MAR, b: MAR) -> None:
    for x, y in zip(outputs(a), outputs(b)):
        assert torch.equal(x, y)


# --- round trips and weight choice --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["dict args", "namespace args", "no args", "bare state dict"])
def test_round_trip_gives_identical_outputs(tmp_path, layout):
    model = random_model()
    state = model.state_dict()
    ckpt = {"model": state, "model_ema": state}
    if layout == "dict args":
        ckpt["args"] = TINY.to_dict()
    elif layout == "namespace args":  # the official training script stores its argparse Namespace
        ckpt["args"] = argparse.Namespace(**TINY.to_dict(), lr=1e-4, epochs=400)
    elif layout == "bare state dict":
        ckpt = state
    loaded = load_model(saved(tmp_path / "m.pth", ckpt))
    assert loaded.config == TINY
    assert not loaded.training
    assert_same_outputs(model, loaded)


def test_model_ema_is_preferred_and_model_is_the_fallback(tmp_path):
    live, ema = random_model(seed=1), random_model(seed=2)
    both = load_model(saved(tmp_path / "both.pth", {"model": live.state_dict(), "model_ema": ema.state_dict(),
                                                    "args": TINY.to_dict()}))
    assert both.weights == "model_ema"
    assert_same_outputs(ema, both)
    only = load_model(saved(tmp_path / "only.pth", {"model": live.state_dict(), "args": TINY.to_dict()}))
    assert only.weights == "model"
    assert_same_outputs(live, only)


def test_sampling_defaults_come_from_the_checkpoint(tmp_path):
    ckpt = {"model_ema": random_model().state_dict(), "args": TINY.to_dict(),
            "sampling": {"num_iter": 16, "cfg": 2.5, "cfg_schedule": "constant", "temperature": 0.9}}
    defaults = load_model(saved(tmp_path / "m.pth", ckpt)).sampling_defaults
    assert (defaults.num_iter, defaults.cfg, defaults.cfg_schedule, defaults.temperature) == (16, 2.5, "constant", 0.9)


# --- architecture inference -------------------------------------------------------------------------------------
def test_fixture_without_args_is_inferred_and_reproduces_the_official_outputs(tmp_path):
    fixture = reference_dir() / "mar_tiny_a.pth"
    ckpt = torch.load(fixture, map_location="cpu", weights_only=False)
    args_config = MARConfig.from_dict(ckpt["args"])
    model = load_model(saved(tmp_path / "noargs.pth", {"model": ckpt["model"], "model_ema": ckpt["model_ema"]}))
    assert model.config == args_config  # heads too: they come from the matching named configuration
    io = torch.load(fixture.with_name("mar_tiny_a_io.pt"), map_location="cpu", weights_only=False)
    B = io["labels"].shape[0]
    emb = torch.cat([model.class_embedding(io["labels"], B), model.class_embedding(None, B)])
    mask = torch.cat([io["mask_32"], io["mask_32"]])
    with torch.no_grad():
        z = model.forward_transformer(torch.cat([io["tokens"], io["tokens"]]), mask, emb)
    assert float((z - io["z_32"]).norm() / io["z_32"].norm()) <= 1e-5


def test_named_arch_overrides_args(tmp_path):
    ckpt = torch.load(reference_dir() / "mar_tiny_a.pth", map_location="cpu", weights_only=False)
    ckpt["args"] = {"encoder_embed_dim": 32}  # wrong args are ignored when the user names the architecture
    model = load_model(saved(tmp_path / "m.pth", ckpt), arch="mar_tiny")
    assert model.config == TINY and model.arch == "mar_tiny"


def test_unnamed_shapes_are_inferred_with_head_size_64(tmp_path):
    config = MARConfig(img_size=96, vae_stride=16, vae_embed_dim=16, encoder_embed_dim=128, encoder_depth=1,
                       encoder_num_heads=2, decoder_embed_dim=192, decoder_depth=3, decoder_num_heads=3,
                       mlp_ratio=2.0, buffer_size=8, diffloss_d=1, diffloss_w=48, class_num=7)
    model = random_model(config)
    with pytest.warns(UserWarning, match="head"):
        loaded = load_model(saved(tmp_path / "m.pth", {"model_ema": model.state_dict()}))
    assert loaded.config == config  # 128/64 = 2 and 192/64 = 3 heads; 36 tokens of 16 -> 96 px at stride 16
    assert loaded.arch is None
    assert_same_outputs(model, loaded)


def test_pixel_tokens_are_inferred_as_pixels(tmp_path):
    config = get_config("digits", encoder_embed_dim=64, decoder_embed_dim=64, encoder_depth=1, decoder_depth=1,
                        encoder_num_heads=1, decoder_num_heads=1, diffloss_d=1, diffloss_w=32)
    with pytest.warns(UserWarning):
        loaded = load_model(saved(tmp_path / "m.pth", {"model": random_model(config).state_dict()}))
    assert (loaded.config.img_size, loaded.config.vae_stride, loaded.config.vae_embed_dim) == (8, 1, 1)


def test_official_training_args_name_the_model(tmp_path):
    """The official script's args hold the model name and settings but not the transformer sizes."""
    official = {k: v for k, v in TINY.to_dict().items() if "embed_dim" not in k or k == "vae_embed_dim"}
    official = {k: v for k, v in official.items() if "depth" not in k and "heads" not in k}
    official.update(model="mar_tiny", num_sampling_steps=10, lr=1e-4, cfg=3.0, vae_path="pretrained/kl16.ckpt")
    model = random_model()
    loaded = load_model(saved(tmp_path / "m.pth", {"model_ema": model.state_dict(),
                                                  "args": argparse.Namespace(**official)}))
    assert loaded.config == TINY and loaded.arch == "mar_tiny"
    assert_same_outputs(model, loaded)


def test_args_without_sizes_or_known_name_combine_with_inferred_shapes(tmp_path):
    config = MARConfig(img_size=48, vae_stride=8, encoder_embed_dim=64, encoder_depth=1, encoder_num_heads=1,
                       decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=1, buffer_size=4, diffloss_d=1,
                       diffloss_w=32, class_num=3, num_sampling_steps="7")
    args = {"model": "mar_custom", "img_size": 48, "vae_stride": 8, "num_sampling_steps": 7}
    with pytest.warns(UserWarning, match="guess"):
        loaded = load_model(saved(tmp_path / "m.pth", {"model": random_model(config).state_dict(), "args": args}))
    assert loaded.config == config


@pytest.mark.parametrize("name, layout", [("digits", (64, 1, 64)), ("digits16", (256, 4, 64))])
def test_embedded_models_load_by_name(name, layout):
    assert EMBEDDED[name].is_file(), f"the embedded {name} checkpoint is not committed"
    model = load_model(name)
    assert (model.seq_len, model.token_dim, model.buffer_size, model.training) == (*layout, False)
    assert model.config == get_config(name)  # the committed checkpoint is the named configuration
    assert 1 <= model.sampling_defaults.num_iter <= model.seq_len


# --- errors -----------------------------------------------------------------------------------------------------
def tiny_checkpoint(**changes) -> dict:
    return checkpoint(random_model(), "model_ema", **changes)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_model(tmp_path / "nope.pth")


@pytest.mark.parametrize("content", ["text", "list pickle", "plain pickle", "dict without tensors"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "text":
        path.write_text("hello, I am not a checkpoint\n")
    elif content == "list pickle":
        torch.save([torch.zeros(2)], path)
    elif content == "plain pickle":
        path.write_bytes(pickle.dumps({"model": "weights"}))
    else:
        torch.save({"epoch": 3, "note": "hi"}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint") as err:
        load_model(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_keys_are_listed(tmp_path):
    ckpt = tiny_checkpoint()
    del ckpt["model_ema"]["mask_token"], ckpt["model_ema"]["decoder_norm.bias"]
    with pytest.raises(CheckpointError, match="missing keys mask_token, decoder_norm.bias"):
        load_model(saved(tmp_path / "m.pth", ckpt))


def test_unexpected_keys_are_listed_first_few(tmp_path):
    ckpt = tiny_checkpoint()
    for i in range(7):
        ckpt["model_ema"][f"extra.{i}.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_model(saved(tmp_path / "m.pth", ckpt))
    message = str(err.value)
    assert "unexpected keys extra.0.weight, extra.1.weight" in message and "and 2 more" in message
    assert "extra.6.weight" not in message and "missing" not in message


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    ckpt = tiny_checkpoint()
    ckpt["model_ema"]["class_emb.weight"] = torch.zeros(12, 64)
    with pytest.raises(CheckpointError, match=r"class_emb.weight: expected \(10, 64\), found \(12, 64\)"):
        load_model(saved(tmp_path / "m.pth", ckpt))


def test_arch_that_does_not_fit_names_the_keys(tmp_path):
    with pytest.raises(CheckpointError, match=r"mar_tiny_a.pth.*missing keys encoder_blocks.2.norm1.weight, "):
        load_model(reference_dir() / "mar_tiny_a.pth", arch="mar_base")  # 12 blocks wanted, 2 found
    shallow = get_config("mar_base", encoder_depth=2, decoder_depth=2, diffloss_d=2)
    with pytest.raises(CheckpointError, match=r"shape mismatch for fake_latent: expected \(1, 768\), found \(1, 64\)"):
        load_model(saved(tmp_path / "m.pth", tiny_checkpoint(args=shallow.to_dict())))


def test_a_vae_is_not_a_mar(tmp_path):
    with pytest.raises(CheckpointError, match="vae.ckpt: cannot infer the architecture: no z_proj.weight"):
        load_model(saved(tmp_path / "vae.ckpt", {"model": random_tiny_vae().state_dict()}))


def test_unknown_arch_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="unknown architecture 'mar_gigantic'.*mar_base"):
        load_model(reference_dir() / "mar_tiny_a.pth", arch="mar_gigantic")


def test_checkpoint_error_is_a_value_error_for_the_cli():
    assert issubclass(CheckpointError, ValueError)


# --- the VAE ----------------------------------------------------------------------------------------------------
def test_tiny_vae_round_trip(tmp_path):
    vae = random_tiny_vae()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latent = vae.encode(images)
        assert latent.shape == (2, 4, 8, 8)
        loaded = load_vae(saved(tmp_path / "vae.ckpt", {"model": vae.state_dict()}))
        assert loaded.config == TINY_VAE
        assert torch.equal(loaded.encode(images), latent)
        assert torch.equal(loaded.decode(latent), vae.decode(latent))
        assert loaded.decode(latent).shape == (2, 3, 16, 16)


def test_vae_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "kl16.ckpt")
    with pytest.raises(CheckpointError, match=r"mar.pth: not an AutoencoderKL state dict.*encoder.conv_in.weight"):
        load_vae(saved(tmp_path / "mar.pth", {"model": random_model().state_dict()}))
    state = random_tiny_vae().state_dict()
    state["decoder.conv_out.bias"] = torch.zeros(4)
    with pytest.raises(CheckpointError, match=r"decoder.conv_out.bias: expected \(3,\), found \(4,\)"):
        load_vae(saved(tmp_path / "vae.ckpt", {"model": state}), config=TINY_VAE)


def test_attention_block_is_single_head_softmax_over_pixels():
    torch.manual_seed(0)
    block = AttnBlock(32, groups=32).eval()
    x = torch.randn(1, 32, 3, 2)
    h = block.norm(x).flatten(2)  # (1, C, HW)
    q, k, v = (conv.weight[:, :, 0, 0] @ h + conv.bias[:, None] for conv in (block.q, block.k, block.v))
    attn = torch.softmax(q.transpose(1, 2) @ k / 32**0.5, dim=-1)  # (1, HW queries, HW keys)
    out = block.proj_out.weight[:, :, 0, 0] @ (v @ attn.transpose(1, 2)) + block.proj_out.bias[:, None]
    with torch.no_grad():
        assert torch.allclose(block(x), x + out.reshape(1, 32, 3, 2), atol=1e-5)


def test_downsample_pads_right_and_bottom():
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks the top-left input of each 3x3 window
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(down(x), x[:, :, ::2, ::2])  # no padding on the top/left


def test_tokens_to_images_with_vae_decodes_scaled_latents():
    model = tiny_mar(vae_embed_dim=4, randomise="none")  # 8x8 grid of 4-channel latents
    vae = random_tiny_vae()
    tokens = torch.randn(2, model.seq_len, 4)
    images = tokens_to_images(model, tokens, vae)
    assert images.shape == (2, 3, 16, 16)
    latent = tokens.reshape(2, 8, 8, 4).permute(0, 3, 1, 2)  # token (i, j) is latent pixel (i, j)
    with torch.no_grad():
        assert torch.allclose(images, vae.decode(latent / LATENT_SCALE), atol=1e-6)


def test_tokens_to_images_without_vae_for_pixel_tokens():
    model = MAR(get_config("digits")).eval()
    tokens = torch.randn(3, 64, 1)
    images = tokens_to_images(model, tokens)
    assert images.shape == (3, 1, 8, 8)
    assert torch.equal(images[:, 0, 2, 5], tokens[:, 2 * 8 + 5, 0])


def test_latent_tokens_need_a_vae():
    with pytest.raises(CheckpointError, match="--vae"):
        tokens_to_images(tiny_mar(randomise="none"), torch.zeros(1, 64, 16))


def test_vae_latent_size_must_match_the_model_tokens():
    with pytest.raises(CheckpointError, match="VAE latent has 4 channels but the model's tokens have 1"):
        tokens_to_images(MAR(get_config("digits")), torch.zeros(1, 64, 1), random_tiny_vae())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected_at_load_time_naming_the_tensor(tmp_path, value):
    ckpt = tiny_checkpoint()
    ckpt["model_ema"]["encoder_blocks.1.attn.qkv.weight"][2, 5] = value
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"model_ema.*encoder_blocks\.1\.attn\.qkv\.weight.*non-finite"):
        load_model(tmp_path / "bad.pth")


@pytest.mark.parametrize("what", ["checkpoint", "fid stats"])
def test_torch_without_safe_globals_names_the_version_needed(tmp_path, monkeypatch, what):
    """A torch older than the floor (no torch.serialization.safe_globals) gets one line naming the version needed,
    not a misleading "not a checkpoint"."""
    import numpy as np
    from lazymar.compat import TORCH_FLOOR, TorchVersionError
    from lazymar.imagenet import load_reference_stats
    path = tmp_path / "file.pt"
    if what == "checkpoint":
        torch.save(tiny_checkpoint(), path)
        load = lambda: load_model(path)  # noqa: E731
    else:
        torch.save({"mu": np.zeros(4), "sigma": np.eye(4)}, path)
        load = lambda: load_reference_stats(path)  # noqa: E731
    load()  # loads with this torch
    monkeypatch.delattr(torch.serialization, "safe_globals")
    with pytest.raises(TorchVersionError, match=f"needs torch >= {TORCH_FLOOR} .*safe_globals.*this is torch") as err:
        load()
    assert "\n" not in str(err.value) and "not a checkpoint" not in str(err.value)


def test_torch_floor_matches_pyproject():
    import re
    from pathlib import Path
    from lazymar.compat import TORCH_FLOOR
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"torch>=([0-9.]+)"', text).group(1) == TORCH_FLOOR
